"""End to end `generate()` on tiny real-format checkpoints: output format, seeds, abort, callbacks, CFG
batching, the prompt cache, low-memory mode and LoRA wiring; and the whole Euler loop against a reference
built from diffusers / transformers components and the spec's formulas."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage
from diffusers.loaders.single_file_utils import (
    convert_cosmos_transformer_checkpoint_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer, Qwen3Config, Qwen3Model

from models.anima.anima_handler import family_handler
from models.anima.anima_main import model_factory
from models.anima.text_encoder import TOKENIZER_DIR
from tests.reference import anima_text_conditioner_class, cosmos_transformer_class
from tests.tiny_ckpts import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEGATIVE = "a cat sitting on a red sofa", "worst quality, blurry"
SIZE = dict(width=64, height=48)


@pytest.fixture(scope="module")
def model(ckpts):
    model, pipe = family_handler.load_model([str(ckpts / DIT_FILE)])
    assert set(pipe) == {"transformer", "text_encoder", "vae"}
    return model


def run(model, **kw):
    args = dict(input_prompt=PROMPT, n_prompt=NEGATIVE, sampling_steps=3, seed=7, **SIZE) | kw
    return model.generate(**args)


class DiTCalls:
    """Counts DiT forwards and the batch of each (a forward hook on the real module)."""

    def __init__(self, module):
        self.batches = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_generate_returns_batch_of_images_of_requested_size(model):
    out = run(model, batch_size=2)
    images = out["x"]
    assert images.shape == (3, 2, 48, 64) and images.dtype == torch.uint8  # pixels, as ComfyUI saves them
    assert images.float().std() > 2  # not a constant image
    assert out["seed"] == 7


def test_same_seed_gives_identical_images(model):
    assert torch.equal(run(model)["x"], run(model)["x"])
    assert not torch.equal(run(model)["x"], run(model, seed=8)["x"])


@pytest.mark.parametrize("solver", ["er_sde", "euler", "euler_a", "dpmpp_2m_sde"])
def test_batch_image_i_equals_single_run_with_seed_plus_i(model, solver):
    batch = run(model, batch_size=3, seed=20, sample_solver=solver)["x"]
    for i in range(3):
        single = run(model, seed=20 + i, sample_solver=solver)["x"]
        assert torch.equal(batch[:, i:i + 1], single)  # bit for bit: "re-make any image alone" holds


def test_callback_sequence(model):
    calls = []
    run(model, batch_size=2, sampling_steps=4, callback=lambda *a, **k: calls.append((a, k)))
    start, steps = calls[0], calls[1:]
    assert start == ((-1, None, True), {"override_num_inference_steps": 4})
    assert [a[0] for a, _ in steps] == [0, 1, 2, 3]
    for (i, latent, refresh), kwargs in steps:
        assert latent.shape == (16, 2, 6, 8) and refresh is False and kwargs == {}  # [C, T = images, h, w]


def test_abort_returns_none_and_stops_sampling(model):
    def abort_after_second_step(i, *rest, **kw):
        if i == 1:
            model._interrupt = True

    with DiTCalls(model.transformer) as dit:
        assert run(model, sampling_steps=6, callback=abort_after_second_step) is None
    assert len(dit.batches) == 2
    with DiTCalls(model.transformer) as dit:
        assert run(model) is None  # still set: the caller resets it before the next run, as wgp does
    assert dit.batches == []
    model._interrupt = False
    assert run(model) is not None


def test_cfg_batching(model):
    with DiTCalls(model.transformer) as dit:
        joint = run(model, batch_size=2, joint_pass=True)["x"]
    assert dit.batches == [2] * 6  # per image and step, its cond and uncond in one forward
    with DiTCalls(model.transformer) as dit:
        sequential = run(model, batch_size=2, joint_pass=False)["x"]
    assert dit.batches == [1] * 12
    assert (joint.int() - sequential.int()).abs().max() <= 1  # only rounding differs
    with DiTCalls(model.transformer) as dit:
        run(model, batch_size=2, guide_scale=1.0)
    assert dit.batches == [1] * 6  # CFG 1: no negative pass


def test_image_size_must_be_a_multiple_of_16(model):
    with pytest.raises(ValueError, match=r"1010x600 is not supported.*multiples of 16, e\.g\. 1008x608"):
        model.generate(input_prompt=PROMPT, width=1010, height=600)


def test_prompts_are_encoded_once(model):
    calls = []
    handle = model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        run(model, input_prompt="a prompt seen once", n_prompt="another one")
        run(model, input_prompt="a prompt seen once", n_prompt="another one", seed=1)
    finally:
        handle.remove()
    assert len(calls) == 2


def test_low_memory_mode_frees_the_text_encoder(ckpts, model):
    lean = model_factory(ckpts / DIT_FILE, ckpts / TEXT_ENCODER_FILE, ckpts / VAE_FILE, low_memory=True)
    first = run(lean)
    assert lean.text_encoder is None
    assert torch.equal(first["x"], run(model)["x"])
    again = run(lean, input_prompt="a new prompt reloads the encoder")
    assert lean.text_encoder is None
    assert torch.equal(again["x"], run(model, input_prompt="a new prompt reloads the encoder")["x"])


def mmgp_cast(args):
    """What mmgp's hooks do to the arguments of a hooked call: float32 tensors become the module's dtype."""
    return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.dtype == torch.float32 else a for a in args)


def test_results_survive_mmgp_argument_casting(ckpts):
    files = (ckpts / DIT_FILE, ckpts / TEXT_ENCODER_FILE, ckpts / VAE_FILE)
    model = model_factory(*files, dtype=torch.bfloat16, vae_dtype=torch.bfloat16)
    plain = run(model)["x"]
    handle = model.transformer.register_forward_pre_hook(lambda module, args: mmgp_cast(args))
    decode = model.vae.decode
    model.vae.decode = lambda *args, **kw: decode(*mmgp_cast(args), **kw)
    try:
        hooked = run(model)["x"]
    finally:
        handle.remove()
    assert torch.equal(hooked, plain)  # the sigma timestep and the latents reach the models unrounded


# --- LoRAs ------------------------------------------------------------------------------------------


def write_lora(path, keys_and_shapes, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, (out_features, in_features), names in keys_and_shapes:
        sd[f"{prefix}.{names[0]}.weight"] = 0.5 * torch.randn(4, in_features, generator=g)
        sd[f"{prefix}.{names[1]}.weight"] = 0.5 * torch.randn(out_features, 4, generator=g)
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    comfy = ("lora_A", "lora_B")
    write_lora(folder / "style.safetensors", [("diffusion_model.blocks.0.self_attn.q_proj", (64, 64), comfy),
                                              ("diffusion_model.blocks.1.mlp.layer1", (256, 64), comfy)], seed=1)
    kohya = ("lora_down", "lora_up")
    write_lora(folder / "words.safetensors", [("lora_te_layers_0_self_attn_q_proj", (32, 32), kohya),
                                              ("lora_te_layers_1_mlp_up_proj", (64, 32), kohya)], seed=2)
    return folder


def test_loras_from_kwarg_and_prompt_tags(model, lora_dir):
    base = run(model, loras=[])["x"]
    styled = run(model, loras=[(lora_dir / "style.safetensors", 0.8)])["x"]
    assert (styled.int() - base.int()).abs().max() >= 1
    tagged = run(model, input_prompt=f"{PROMPT}, <lora:style:0.8>", loras=[], lora_dir=str(lora_dir))["x"]
    assert torch.equal(tagged, styled)  # the tag is removed from the prompt and activates the same LoRA
    assert torch.equal(run(model)["x"], styled)  # loras=None and no tag: the LoRA stays active
    assert torch.equal(run(model, loras=[])["x"], base)  # removed exactly


def test_text_encoder_lora_invalidates_cached_prompts(model, lora_dir):
    base = run(model, loras=[])["x"]  # the prompts are cached now
    worded = run(model, loras=[(lora_dir / "words.safetensors", 1.0)])["x"]
    assert (worded.int() - base.int()).abs().max() >= 1
    assert torch.equal(run(model, loras=[])["x"], base)


def test_missing_lora_tag_is_a_clear_error(model, lora_dir):
    with pytest.raises(ValueError, match="LoRA 'nope' not found"):
        run(model, input_prompt="x <lora:nope:1>", lora_dir=str(lora_dir))


# --- parity of the whole loop ----------------------------------------------------------------------

HIDDEN, TE_LAYERS, TE_HEADS, TE_KV_HEADS, TE_HEAD_DIM, TE_MLP = 32, 2, 4, 2, 8, 64
DIT_WIDTH, DIT_BLOCKS, DIT_HEADS, ADAPTER_LAYERS, ADAPTER_HEADS, ADALN_LORA = 64, 2, 4, 2, 4, 16
ADAPTER_PREFIX = "net.llm_adapter."


class Reference:
    """Anima per the spec from independent parts: transformers' Qwen3Model, diffusers' AnimaTextConditioner,
    CosmosTransformer3DModel and AutoencoderKLQwenImage (weights converted by diffusers' own converters),
    with the schedule, noise, CFG and Euler step written out from anima_reference.md §5."""

    def __init__(self, ckpts):
        te_sd = {k.removeprefix("model."): v.float() for k, v in load_file(ckpts / TEXT_ENCODER_FILE).items()}
        self.text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=151936, hidden_size=HIDDEN, intermediate_size=TE_MLP, num_hidden_layers=TE_LAYERS,
            num_attention_heads=TE_HEADS, num_key_value_heads=TE_KV_HEADS, head_dim=TE_HEAD_DIM, rms_norm_eps=1e-6,
            rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=32768,
            attention_bias=False, tie_word_embeddings=False)).eval()
        self.text_encoder.load_state_dict(te_sd, strict=True)
        self.qwen_tokenizer = Qwen2Tokenizer.from_pretrained(TOKENIZER_DIR / "qwen")
        self.t5_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "t5" / "tokenizer.json"))

        dit_sd = {k: v.float() for k, v in load_file(ckpts / DIT_FILE).items()}
        self.adapter = anima_text_conditioner_class()(source_dim=HIDDEN, target_dim=HIDDEN, model_dim=HIDDEN,
                                            num_layers=ADAPTER_LAYERS, num_attention_heads=ADAPTER_HEADS).eval()
        self.adapter.load_state_dict({k.removeprefix(ADAPTER_PREFIX): v for k, v in dit_sd.items()
                                      if k.startswith(ADAPTER_PREFIX)}, strict=True)
        self.dit = cosmos_transformer_class()(
            in_channels=16, out_channels=16, num_attention_heads=DIT_HEADS, attention_head_dim=DIT_WIDTH // DIT_HEADS,
            num_layers=DIT_BLOCKS, mlp_ratio=4.0, text_embed_dim=HIDDEN, adaln_lora_dim=ADALN_LORA,
            max_size=(4, 64, 64), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True,
            extra_pos_embed_type=None).eval()
        dit_only = {k: v for k, v in dit_sd.items() if not k.startswith(ADAPTER_PREFIX)}
        self.dit.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(dit_only), strict=True)
        for name, module in self.dit.named_modules():
            if name.endswith(("norm_q", "norm_k")):
                module.eps = 1e-6  # the checkpoint's q/k RMSNorm eps; diffusers' generic default is 1e-5
        vae_sd = {k: v.float() for k, v in load_file(ckpts / VAE_FILE).items()}
        self.vae = AutoencoderKLQwenImage(base_dim=8, dim_mult=[1, 2, 4, 4]).eval()  # a list: see test_vae
        self.vae.load_state_dict(convert_wan_vae_to_diffusers(vae_sd), strict=True)

    def context(self, text):
        qwen_ids = torch.tensor([self.qwen_tokenizer(text, add_special_tokens=False)["input_ids"]])
        t5_ids = torch.tensor([self.t5_tokenizer(text, add_special_tokens=False)["input_ids"] + [1]])  # + </s>
        hidden = self.text_encoder(input_ids=qwen_ids).last_hidden_state
        out = self.adapter(hidden, t5_ids)  # zero-padded to 512 tokens, no mask
        assert out.shape[1] == 512
        return out

    def sigmas(self, steps, shift=3.0):
        indices = [999 - int(i * 1000 / steps) for i in range(steps)]
        t = torch.tensor([(i + 1) / 1000 for i in indices], dtype=torch.float32)
        return torch.cat([shift * t / (1 + (shift - 1) * t), torch.zeros(1)])

    @torch.no_grad()
    def final_latent(self, prompt, negative, seed, steps, cfg, width, height):
        cond, uncond = self.context(prompt), self.context(negative)
        x = torch.randn(1, 16, 1, height // 8, width // 8, generator=torch.manual_seed(seed))
        padding_mask = torch.zeros(1, 1, height // 8, width // 8)
        sigmas = self.sigmas(steps)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = sigma.reshape(1)
            v_c = self.dit(x, t, cond, padding_mask=padding_mask, return_dict=False)[0]
            v_u = self.dit(x, t, uncond, padding_mask=padding_mask, return_dict=False)[0]
            x0_c, x0_u = x - sigma * v_c, x - sigma * v_u
            x0 = x0_u + cfg * (x0_c - x0_u)
            x = x + (x - x0) / sigma * (sigma_next - sigma)
        return x

    @torch.no_grad()
    def decode(self, latent):
        mean = torch.tensor(self.vae.config.latents_mean).view(1, 16, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std).view(1, 16, 1, 1, 1)
        return self.vae.decode(latent * std + mean).sample[:, :, 0].clamp(-1, 1)


def relative_error(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_whole_loop_matches_reference(ckpts, model):
    reference = Reference(ckpts)
    latents, decoded = [], []
    decode = model.vae.decode

    def recording_decode(z, **kw):
        latents.append(z)
        decoded.append(decode(z, **kw))
        return decoded[-1]

    model.vae.decode = recording_decode
    try:
        ours = run(model, sample_solver="euler", guide_scale=4.0, sampling_steps=5, seed=3, loras=[])
    finally:
        del model.vae.decode
    ref_latent = reference.final_latent(PROMPT, NEGATIVE, seed=3, steps=5, cfg=4.0, **SIZE)
    assert relative_error(latents[0], ref_latent) <= 1e-4
    ref_image = reference.decode(ref_latent)
    assert relative_error(decoded[0], ref_image) <= 1e-4
    assert F.mse_loss(decoded[0], ref_image) < 1e-9
    # the pixels returned are the decoded image as ComfyUI saves it: (x + 1) / 2 * 255, truncated
    ref_pixels = (((ref_image + 1) / 2).clamp(0, 1) * 255).floor()
    assert (ours["x"].transpose(0, 1).float() - ref_pixels).abs().max() <= 1  # 1: a value on a level's edge
