import torch
import pytest
from safetensors.torch import load_file, save_file
from torch import nn

from models.anima.weights import (WeightsError, checkpoint_kind, load_module_strict, open_state_dict,
                                  require_kind, strip_prefix)


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file({"net.weight": torch.randn(3, 4).bfloat16(), "net.bias": torch.randn(3).bfloat16(),
               "steps": torch.arange(4)}, path)
    return path


def test_open_state_dict_equals_safetensors_and_is_copy_on_write(small_file):
    sd = open_state_dict(small_file, what="test")
    reference = load_file(small_file)
    assert sd.keys() == reference.keys()
    for key in sd:
        assert sd[key].dtype == reference[key].dtype and torch.equal(sd[key], reference[key])
    sd["net.weight"].add_(1)  # writes stay private to this process
    assert torch.equal(load_file(small_file)["net.weight"], reference["net.weight"])


def test_missing_truncated_and_foreign_files_give_clear_errors(tmp_path, small_file):
    with pytest.raises(WeightsError, match="not found"):
        open_state_dict(tmp_path / "nope.safetensors", what="Anima DiT")
    data = small_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(WeightsError, match="truncated"):
        open_state_dict(tmp_path / "cut.safetensors", what="Anima DiT")
    (tmp_path / "cut_header.safetensors").write_bytes(data[:20])
    with pytest.raises(WeightsError, match="truncated"):
        open_state_dict(tmp_path / "cut_header.safetensors", what="Anima DiT")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04 a pickle zip archive, not safetensors")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        open_state_dict(tmp_path / "model.ckpt", what="Anima DiT")


def test_strip_prefix_and_kind_detection():
    sd = {"net.blocks.0.mlp.layer1.weight": 1, "net.llm_adapter.blocks.0.cross_attn.q_proj.weight": 2}
    assert set(strip_prefix(sd, ["model.diffusion_model.", "net."])) == {
        "blocks.0.mlp.layer1.weight", "llm_adapter.blocks.0.cross_attn.q_proj.weight"}
    assert checkpoint_kind(sd) == "anima_dit"
    assert checkpoint_kind(["decoder.middle.0.residual.0.gamma"]) == "wan_vae"
    assert checkpoint_kind(["model.layers.0.self_attn.q_norm.weight"]) == "qwen3_text_encoder"
    assert checkpoint_kind(["lora_unet_blocks_0_mlp_layer1.lora_down.weight"]) == "lora"
    assert checkpoint_kind(["something.else"]) is None
    with pytest.raises(WeightsError, match="is a Wan 2.1 / Qwen-Image VAE, not the Anima DiT"):
        require_kind({"decoder.middle.0.residual.0.gamma": 1}, "anima_dit", what="Anima DiT", source="vae.safetensors")


def test_load_module_strict_assigns_casts_and_reports_mismatches():
    with torch.device("meta"):
        module = nn.Linear(4, 3)
    weight, bias = torch.randn(3, 4).bfloat16(), torch.randn(3).bfloat16()
    load_module_strict(module, {"weight": weight, "bias": bias}, dtype=torch.bfloat16, device="cpu", what="test")
    assert module.weight.data_ptr() == weight.data_ptr()  # same dtype and device: no copy
    assert not module.weight.requires_grad and not module.training

    with torch.device("meta"):
        module = nn.Linear(4, 3)
    load_module_strict(module, {"weight": weight, "bias": bias}, dtype=torch.float32, device="cpu", what="test")
    assert module.weight.dtype == torch.float32 and torch.equal(module.weight, weight.float())

    with torch.device("meta"):
        module = nn.Linear(4, 3)
    with pytest.raises(WeightsError) as error:
        load_module_strict(module, {"weight": torch.zeros(3, 5), "extra": torch.zeros(1)},
                           dtype=torch.float32, device="cpu", what="Anima DiT")
    message = str(error.value)
    assert "1 missing key(s): bias" in message
    assert "1 unexpected key(s): extra" in message
    assert "weight (3, 5) (expected (3, 4))" in message
