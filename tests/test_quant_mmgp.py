"""Quantized weights under mmgp (Wan2GP's offloader), through mmgp's own helpers where they run without a
GPU: `offload.profile` itself needs CUDA, so its steps are replayed here with the functions it calls.
- size accounting and pinning read the stored tensors through `get_quantized_subtensors` (each one
  contiguous, so `view(torch.uint8)` works) and put the pinned copies back with `set_quantized_subtensors`;
- the per-parameter dtype check sees the compute dtype (`_model_dtype`), as for any other weight;
- a block is moved with `p.to(device, non_blocking=True)` and re-wrapped by `_make_parameter`;
- runtime LoRAs cast their factors to `module.weight.dtype`: the compute dtype, not int8."""

import pytest
import torch

from models.anima.anima_model import load_anima_model
from models.anima.quant import QuantizedWeight, stored_nbytes
from tests.test_quant import SIZES, run
from tests.tiny_dit import make_dit_state_dict

offload = pytest.importorskip("mmgp.offload")


@pytest.fixture()
def model():
    dit = load_anima_model(make_dit_state_dict(seed=8, **SIZES), dtype=torch.float32, quantize="int8_convrot")
    dit._model_dtype = torch.float32
    return dit


def test_sizes_and_dtypes_as_mmgp_reads_them(model):
    for name, p in model.named_parameters():
        subtensors = offload._get_quantized_subtensors(p)
        if isinstance(p, QuantizedWeight):
            assert offload._subtensors_nbytes(subtensors) == stored_nbytes(p)
            assert offload._get_tensor_ref(p) == p.qdata.data_ptr()
            assert all(t.is_contiguous() for _, t in subtensors)
        else:
            assert subtensors is None
        assert p.data.dtype == model._model_dtype, name  # mmgp asserts this for every unquantized parameter


def test_pinning_swap_and_block_moves_keep_the_outputs(model):
    expected = run(model)
    model.to("cpu").eval()  # the first thing offload.all does to every model
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            subtensors = offload._get_quantized_subtensors(p)
            if subtensors:  # what _pin_to_memory does, into an ordinary buffer instead of pinned memory
                copies = {}
                for sub_name, t in subtensors:
                    raw = (t.view(1) if t.dim() == 0 else t).view(torch.uint8).reshape(-1).clone()
                    copies[sub_name] = raw.view(t.dtype).reshape(t.shape)
                offload._set_quantized_subtensors(p, copies)
                assert p.qdata.data_ptr() == copies["qdata"].data_ptr()
            moved = offload._make_parameter(p.to("cpu", non_blocking=True))  # gpu_load_blocks' move
            setattr(module, name, moved)
    assert torch.equal(run(model), expected)


def test_runtime_lora_factors_get_the_compute_dtype(model, tmp_path):
    from safetensors.torch import save_file

    target = "blocks.0.self_attn.q_proj"
    lora = {f"diffusion_model.{target}.lora_A.weight": torch.randn(4, 64, dtype=torch.bfloat16),
            f"diffusion_model.{target}.lora_B.weight": torch.randn(64, 4, dtype=torch.bfloat16)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    model._loras_model_data = {m: {} for _, m in model.named_modules() if "weight" in m._parameters}
    model._loras_model_shortcuts = {}
    offload.load_loras_into_model(model, [str(tmp_path / "lora.safetensors")],
                                  preprocess_sd=lambda sd: model.preprocess_loras("anima", sd))
    assert model._loras_errors == []
    lora_a, lora_b = model._loras_model_data[model.get_submodule(target)]["0"][:2]
    assert lora_a.dtype == lora_b.dtype == torch.float32
    assert torch.equal(lora_a, lora[f"diffusion_model.{target}.lora_A.weight"].float())
