"""`load_anima_model`: architecture read from shapes, every accepted key prefix, files vs state dicts,
and one clear WeightsError for each way a user can hand it the wrong weights."""

import pytest
import torch
from safetensors.torch import save_file

from models.anima.anima_model import AdapterConfig, AnimaModel, DiTConfig, load_anima_model
from models.anima.weights import WeightsError
from tests.tiny_dit import make_dit_state_dict, write_dit_file

SIZES = dict(model_channels=48, num_blocks=3, num_heads=3, text_dim=24, adapter_layers=2, adapter_heads=2,
             adaln_lora_dim=8)


@pytest.fixture(scope="module")
def state_dict():
    return make_dit_state_dict(seed=3, **SIZES)


def test_config_is_read_from_shapes(state_dict):
    model = load_anima_model(state_dict, dtype=torch.float32)
    assert model.config == DiTConfig(in_channels=16, out_channels=16, model_channels=48, num_blocks=3, num_heads=3,
                                     mlp_hidden=192, crossattn_dim=24, adaln_lora_dim=8, patch_spatial=2,
                                     patch_temporal=1, rope_extrapolation_thw=(1.0, 4.0, 4.0))
    assert model.llm_adapter.config == AdapterConfig(source_dim=24, model_dim=24, num_layers=2, num_heads=2,
                                                     mlp_hidden=96, vocab_size=32128)


@pytest.mark.parametrize("prefix", ["net.", "model.diffusion_model.", "diffusion_model.", ""])
def test_every_prefix_loads_the_same_tensors(tmp_path, state_dict, prefix):
    path = tmp_path / "anima.safetensors"
    save_file({prefix + k.removeprefix("net."): v for k, v in state_dict.items()}, str(path))
    model = load_anima_model(path, dtype=torch.bfloat16)
    assert isinstance(model, AnimaModel)
    loaded = model.state_dict()
    assert loaded.keys() == {k.removeprefix("net.") for k in state_dict}
    assert all(torch.equal(loaded[k.removeprefix("net.")], v) for k, v in state_dict.items())
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in loaded.values())


def test_dtype_argument_casts_the_weights(state_dict):
    model = load_anima_model(state_dict, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.blocks[1].mlp.layer2.weight, state_dict["net.blocks.1.mlp.layer2.weight"].float())


def test_attribute_names_are_checkpoint_keys(state_dict):
    model = load_anima_model(state_dict, dtype=torch.float32)
    assert model.blocks[0].self_attn.q_proj.weight.shape == (48, 48)
    assert model.llm_adapter.blocks[1].cross_attn.o_proj.weight.shape == (24, 24)


def adapter_of_width(width):
    sd = make_dit_state_dict(**{**SIZES, "text_dim": width})
    return {k: v for k, v in sd.items() if "llm_adapter" in k}


def without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda sd: without(sd, "net.blocks.1.mlp.layer2.weight"), ["1 missing key", "blocks.1.mlp.layer2.weight"]),
        (lambda sd: without(sd, "net.llm_adapter.norm.weight"), ["1 missing key", "llm_adapter.norm.weight"]),
        (lambda sd: {**sd, "net.blocks.0.extra.weight": torch.zeros(2)},
         ["1 unexpected key", "blocks.0.extra.weight"]),
        (lambda sd: {**sd, "net.blocks.1.self_attn.q_proj.weight": torch.zeros(48, 40)},
         ["wrong shape", "blocks.1.self_attn.q_proj.weight (48, 40) (expected (48, 48))"]),
        (lambda sd: without(sd, "net.x_embedder.proj.1.weight"), ["lack 'x_embedder.proj.1.weight'"]),
        (lambda sd: {**sd, "net.blocks.0.self_attn.q_norm.weight": torch.ones(10)}, ["width 48", "q_norm size 10"]),
        (lambda sd: {k: v for k, v in sd.items() if "llm_adapter" not in k}, ["without Anima's LLM adapter"]),
        (lambda sd: {**{k: v for k, v in sd.items() if "llm_adapter" not in k}, **adapter_of_width(32)},
         ["adapter's width 32", "context width 24"]),
    ],
    ids=["missing-dit-key", "missing-adapter-key", "extra-key", "wrong-shape", "missing-size-key", "bad-head-dim",
         "no-adapter", "adapter-width-mismatch"],
)
def test_mismatched_state_dict_raises_one_clear_error(state_dict, edit, expected):
    with pytest.raises(WeightsError) as info:
        load_anima_model(edit(state_dict))
    message = str(info.value)
    assert all(text in message for text in expected), message
    assert "\n" not in message


def test_vae_file_is_named_as_a_vae(tmp_path):
    path = tmp_path / "qwen_image_vae.safetensors"
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(8, 1, 1, 1, dtype=torch.bfloat16),
               "decoder.head.0.gamma": torch.ones(8, 1, 1, 1, dtype=torch.bfloat16),
               "conv2.weight": torch.zeros(16, 16, 1, 1, 1, dtype=torch.bfloat16)}, str(path))
    with pytest.raises(WeightsError,
                       match=r"qwen_image_vae\.safetensors is a Wan 2\.1 / Qwen-Image VAE, not .*Anima DiT"):
        load_anima_model(path)


def test_text_encoder_file_is_named_as_a_text_encoder(tmp_path):
    path = tmp_path / "qwen_3_06b_base.safetensors"
    save_file({"model.layers.0.self_attn.q_norm.weight": torch.ones(8, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(32, dtype=torch.bfloat16)}, str(path))
    with pytest.raises(WeightsError, match=r"qwen_3_06b_base\.safetensors is a Qwen3 text encoder, not .*Anima DiT"):
        load_anima_model(path)


def test_truncated_file_is_reported(tmp_path):
    path = write_dit_file(tmp_path / "anima-preview.safetensors", **SIZES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated"):
        load_anima_model(path)


def test_non_safetensors_and_missing_files_are_reported(tmp_path):
    path = tmp_path / "anima.safetensors"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_anima_model(path)
    with pytest.raises(WeightsError, match="not found"):
        load_anima_model(tmp_path / "absent.safetensors")
