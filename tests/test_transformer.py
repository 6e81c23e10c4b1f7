"""Parity of the Anima DiT and LLM adapter against diffusers (`CosmosTransformer3DModel`,
`AnimaTextConditioner`) on tiny random weights in the real checkpoint format, plus the precision paths."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

from models.anima.anima_model import MIN_CONTEXT_TOKENS, load_anima_model
from tests.reference import anima_text_conditioner_class, cosmos_transformer_class
from tests.tiny_dit import make_dit_state_dict

WIDTH, BLOCKS, HEADS, TEXT_DIM, ADAPTER_LAYERS, ADAPTER_HEADS, LORA_DIM = 64, 2, 4, 32, 2, 4, 16
ADAPTER_PREFIX = "net.llm_adapter."
FP32_TOLERANCE = 1e-5


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def state_dict():
    return make_dit_state_dict(seed=0, model_channels=WIDTH, num_blocks=BLOCKS, num_heads=HEADS, text_dim=TEXT_DIM,
                               adapter_layers=ADAPTER_LAYERS, adapter_heads=ADAPTER_HEADS, adaln_lora_dim=LORA_DIM)


@pytest.fixture(scope="module")
def model_fp32(state_dict):
    return load_anima_model(state_dict, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_dit(state_dict):
    dit_sd = {k: v.float() for k, v in state_dict.items() if not k.startswith(ADAPTER_PREFIX)}
    ref = cosmos_transformer_class()(
        in_channels=16, out_channels=16, num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS,
        num_layers=BLOCKS, mlp_ratio=4.0, text_embed_dim=TEXT_DIM, adaln_lora_dim=LORA_DIM,
        # max_size only bounds diffusers' RoPE position range; large enough for every case below
        max_size=(4, 320, 320), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True,
        extra_pos_embed_type=None,
    )
    ref.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(dit_sd), strict=True)
    # The checkpoint's q/k RMSNorms use eps 1e-6 (ComfyUI, and our model); diffusers' generic Attention
    # builds them with its 1e-5 default, a visible difference (~2e-6 relative) that is not under test here.
    for name, module in ref.named_modules():
        if name.endswith(("norm_q", "norm_k")):
            module.eps = 1e-6
    return ref.eval()


@pytest.fixture(scope="module")
def reference_adapter(state_dict):
    ref = anima_text_conditioner_class()(source_dim=TEXT_DIM, target_dim=TEXT_DIM, model_dim=TEXT_DIM,
                               num_layers=ADAPTER_LAYERS, num_attention_heads=ADAPTER_HEADS)
    adapter_sd = {k.removeprefix(ADAPTER_PREFIX): v.float() for k, v in state_dict.items()
                  if k.startswith(ADAPTER_PREFIX)}
    ref.load_state_dict(adapter_sd, strict=True)
    return ref.eval()


def dit_inputs(shape, sigmas, context_len=MIN_CONTEXT_TOKENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    context = torch.randn(shape[0], context_len, TEXT_DIM, generator=g)
    return x, torch.tensor(sigmas, dtype=torch.float32), context


def run_reference(ref, x, sigmas, context):
    padding_mask = torch.zeros(1, 1, *x.shape[-2:])
    with torch.no_grad():
        return ref(x, sigmas, context, padding_mask=padding_mask, return_dict=False)[0]


@pytest.mark.parametrize(
    ("shape", "sigmas", "context_len"),
    [
        ((1, 16, 1, 8, 8), [1.0], 512),
        ((2, 16, 1, 6, 10), [0.5, 0.0955], 512),  # non-square, a batch with different sigmas
        ((1, 16, 1, 16, 12), [0.0], 600),  # context longer than 512 (long prompts are never truncated)
        ((1, 16, 2, 4, 6), [0.7], 512),  # T > 1
        ((1, 16, 1, 2, 300), [0.3], 512),  # 150 patches wide: RoPE positions beyond 128 patches
    ],
)
def test_dit_matches_diffusers(model_fp32, reference_dit, shape, sigmas, context_len):
    x, t, context = dit_inputs(shape, sigmas, context_len)
    with torch.no_grad():
        ours = model_fp32(x, t, context)
    ref = run_reference(reference_dit, x, t, context)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert relative_error(ours, ref) <= FP32_TOLERANCE


@pytest.mark.parametrize("shape", [(1, 16, 1, 7, 9), (2, 16, 1, 5, 8), (1, 16, 1, 1, 1)])
def test_odd_latent_sizes_equal_circular_pad_run_crop(model_fp32, reference_dit, shape):
    x, t, context = dit_inputs(shape, [0.6] * shape[0])
    h, w = shape[-2:]
    padded = F.pad(x, (0, w % 2, 0, h % 2, 0, 0), mode="circular")
    with torch.no_grad():
        ours = model_fp32(x, t, context)
    ref = run_reference(reference_dit, padded, t, context)[..., :h, :w]
    assert ours.shape == x.shape
    assert relative_error(ours, ref) <= FP32_TOLERANCE


def test_a_four_dimensional_image_latent_is_one_frame(model_fp32):
    x, t, context = dit_inputs((2, 16, 1, 6, 10), [0.6, 0.3])
    with torch.no_grad():
        assert torch.equal(model_fp32(x[:, :, 0], t, context), model_fp32(x, t, context)[:, :, 0])


def adapter_inputs(batch, qwen_len, t5_len, seed=2):
    g = torch.Generator().manual_seed(seed)
    qwen_hidden = torch.randn(batch, qwen_len, TEXT_DIM, generator=g)
    t5_ids = torch.randint(0, 32128, (batch, t5_len), generator=g)
    t5_weights = 0.5 + torch.rand(batch, t5_len, generator=g)  # prompt weights in [0.5, 1.5)
    return qwen_hidden, t5_ids, t5_weights


@pytest.mark.parametrize(("batch", "qwen_len", "t5_len"), [(1, 7, 9), (2, 13, 5), (1, 40, 600)])
def test_adapter_matches_diffusers_times_weights_zero_padded(model_fp32, reference_adapter, batch, qwen_len, t5_len):
    qwen_hidden, t5_ids, t5_weights = adapter_inputs(batch, qwen_len, t5_len)
    with torch.no_grad():
        ours = model_fp32.preprocess_text_embeds(qwen_hidden, t5_ids, t5_weights)
        ref = reference_adapter(qwen_hidden, t5_ids)[:, :t5_len] * t5_weights[..., None]
    assert ours.shape == (batch, max(MIN_CONTEXT_TOKENS, t5_len), TEXT_DIM)
    assert relative_error(ours[:, :t5_len], ref) <= FP32_TOLERANCE
    # the DiT attends to the padding without a mask, so it must be exactly zero
    assert torch.equal(ours[:, t5_len:], torch.zeros_like(ours[:, t5_len:]))
    # ComfyUI passes the weights as [B, Lt, 1]: the same context
    with torch.no_grad():
        assert torch.equal(model_fp32.preprocess_text_embeds(qwen_hidden, t5_ids, t5_weights[..., None]), ours)


def test_adapter_without_weights_matches_diffusers_padding(model_fp32, reference_adapter):
    qwen_hidden, t5_ids, _ = adapter_inputs(1, 11, 20)
    with torch.no_grad():
        ours = model_fp32.preprocess_text_embeds(qwen_hidden, t5_ids, None)
        ref = reference_adapter(qwen_hidden, t5_ids)  # diffusers pads to min_sequence_length=512 itself
    assert ours.shape == ref.shape == (1, MIN_CONTEXT_TOKENS, TEXT_DIM)
    assert relative_error(ours, ref) <= FP32_TOLERANCE


# Rounding error of the low-precision paths against fp32. Weights, activations and every op output are
# rounded to the unit roundoff u (bf16 2^-9 ~ 2e-3, fp16 2^-12 ~ 2.4e-4) through two blocks of attention,
# MLP and residual adds, so the output carries a few u of error relative to max|v|: measured ~1e-2 (bf16)
# and ~1e-3 (fp16) here. The bounds leave ~4x margin and still fail on any real bug (O(1) differences).
LOW_PRECISION_TOLERANCE = {torch.bfloat16: 4e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(state_dict, model_fp32, dtype):
    model = load_anima_model(state_dict, dtype=dtype)
    x, t, context = dit_inputs((1, 16, 1, 12, 10), [0.4])
    qwen_hidden, t5_ids, t5_weights = adapter_inputs(1, 9, 12)
    with torch.no_grad():
        ours = model(x, t, model.preprocess_text_embeds(qwen_hidden, t5_ids, t5_weights))
        ref = model_fp32(x, t, model_fp32.preprocess_text_embeds(qwen_hidden, t5_ids, t5_weights))
    assert ours.dtype == torch.float32  # the output follows the input latents' dtype
    assert relative_error(ours, ref) <= LOW_PRECISION_TOLERANCE[dtype]


@pytest.mark.parametrize(("dtype", "residual_dtype"),
                         [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_residual_stream_dtype(state_dict, dtype, residual_dtype):
    model = load_anima_model(state_dict, dtype=dtype)
    seen = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for block in model.blocks]
    x, t, context = dit_inputs((1, 16, 1, 4, 4), [0.9])
    with torch.no_grad():
        model(x, t, context)
    for hook in hooks:
        hook.remove()
    assert seen == [residual_dtype] * BLOCKS
