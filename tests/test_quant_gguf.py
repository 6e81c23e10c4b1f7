"""GGUF checkpoints: tiny files written with the `gguf` package as city96's converter lays out an Anima DiT
(the checkpoint's names without the root prefix, 1-D and small tensors F32, every other tensor in the file's
type where its rows fit the blocks, else Q8_0 or F16) and as llama.cpp names a Qwen3 text encoder. The torch
block decoders equal `gguf.quants.dequantize`; models compute what the same models built from
`gguf.quants.dequantize`d weights compute; broken files give one clear WeightsError."""

import inspect
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map  # noqa: E402

from models.anima.anima_model import load_anima_model  # noqa: E402
from models.anima.gguf_file import BLOCK_TYPES, dequantize_blocks  # noqa: E402
from models.anima.quant import QuantizedWeight, stored_nbytes  # noqa: E402
from models.anima.text_encoder import TextEncoderConfig, load_text_encoder  # noqa: E402
from models.anima.weights import WeightsError  # noqa: E402
from tests.test_quant import assert_close, run  # noqa: E402
from tests.tiny_dit import make_dit_state_dict  # noqa: E402
from tests.tiny_text_encoder import make_text_encoder_state_dict  # noqa: E402

TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "F16", "BF16", "F32"]
# Byte offsets of each block's fp16 scale(s), set to small values in random blocks so weights stay O(1/sqrt(in)).
FP16_FIELDS = {"Q3_K": ((108, 1 / 8),), "Q4_K": ((0, 1 / 150), (2, 1 / 150)), "Q5_K": ((0, 1 / 300), (2, 1 / 300)),
               "Q6_K": ((208, 1 / 500),)}
NUMPY_QUANTIZABLE = {"Q8_0", "Q5_0", "Q4_0", "BF16"}
rng = np.random.default_rng(0)


def random_blocks(type_name, rows, cols):
    """Raw blocks of a K-quant type (the gguf package only decodes these): random codes and scales."""
    values, size = gguf.GGML_QUANT_SIZES[getattr(T, type_name)]
    raw = rng.integers(0, 256, size=(rows, cols // values, size), dtype=np.uint8)
    for offset, magnitude in FP16_FIELDS[type_name]:
        d = (rng.uniform(0.5, 1.0, size=raw.shape[:2]) * magnitude / cols**0.5).astype(np.float16)
        raw[..., offset:offset + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def encoded(array, type_name):
    """(what GGUFWriter stores, its raw type, what `gguf.quants.dequantize` makes of it) for one tensor,
    falling back as the converters do when the rows do not fit the type's blocks."""
    cols = array.shape[-1]
    if array.ndim == 1 or array.size <= 1024 or type_name == "F32":
        return array.astype(np.float32), T.F32, array.astype(np.float32)
    if type_name not in ("F16", "BF16") and cols % gguf.GGML_QUANT_SIZES[getattr(T, type_name)][0]:
        type_name = "Q8_0" if cols % 32 == 0 else "F16"
    if type_name == "F16":
        return array.astype(np.float16), T.F16, array.astype(np.float16).astype(np.float32)
    qtype = getattr(T, type_name)
    if type_name in NUMPY_QUANTIZABLE:
        raw = gguf.quants.quantize(array, qtype)
    else:
        raw = random_blocks(type_name, *array.shape)
    return raw, qtype, gguf.quants.dequantize(raw, qtype)


def write_gguf(path, sd, type_name, arch):
    """Write `sd` (numpy-convertible tensors) and return the fp32 reference state dict."""
    writer = gguf.GGUFWriter(str(path), arch)
    reference = {}
    for key, tensor in sd.items():
        data, qtype, dequantized = encoded(tensor.float().numpy(), type_name)
        writer.add_tensor(key, data, raw_dtype=qtype)
        reference[key] = torch.from_numpy(dequantized.reshape(tensor.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


@pytest.fixture(scope="module")
def dit():
    """A tiny DiT 256 wide, so K-quant blocks fit most rows, with the converter's names (no `net.`)."""
    sd = make_dit_state_dict(seed=7, prefix="", model_channels=256, num_blocks=1, num_heads=4, text_dim=32,
                             adaln_lora_dim=16)
    return sd


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_torch_block_decoders_equal_the_gguf_package(type_name):
    values = gguf.GGML_QUANT_SIZES[getattr(T, type_name)][0]
    raw = (gguf.quants.quantize(rng.standard_normal((6, values * 3)).astype(np.float32), getattr(T, type_name))
           if type_name in NUMPY_QUANTIZABLE else random_blocks(type_name, 6, values * 3))
    expected = gguf.quants.dequantize(raw, getattr(T, type_name))
    assert np.array_equal(dequantize_blocks(type_name, torch.from_numpy(raw)).numpy(), expected)


@pytest.mark.parametrize("type_name", TYPES)
def test_gguf_dit_computes_as_its_dequantized_weights(tmp_path, dit, type_name):
    path = tmp_path / f"anima-{type_name}.gguf"
    reference = write_gguf(path, dit, type_name, "cosmos")
    model = load_anima_model(path, dtype=torch.float32)
    q_proj = model.blocks[0].self_attn.q_proj.weight
    if type_name in BLOCK_TYPES:
        assert isinstance(q_proj, QuantizedWeight) and q_proj.quant_layout.type_name == type_name
        assert isinstance(model.llm_adapter.embed.weight, QuantizedWeight)  # Q8_0, looked up row by row
    else:
        assert type(q_proj.data) is torch.Tensor
    assert_close(run(model), run(load_anima_model(reference, dtype=torch.float32)))


def test_gguf_model_holds_about_its_file_size(tmp_path, dit):
    path = tmp_path / "anima-Q8_0.gguf"
    write_gguf(path, dit, "Q8_0", "cosmos")
    model = load_anima_model(path, dtype=torch.bfloat16)
    held = sum(stored_nbytes(t) for t in model.state_dict().values())
    assert 0.9 * path.stat().st_size < held < path.stat().st_size  # F32 norms become bf16, nothing grows


def test_gguf_text_encoder_with_llama_cpp_names(tmp_path):
    hf = {k.removeprefix("model."): v for k, v in make_text_encoder_state_dict(seed=4).items()}
    config = TextEncoderConfig.from_state_dict(hf).to_qwen3_config()
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
        # transformers 5 takes a TensorProcessor as its second argument; 4.5x (upstream Wan2GP's pin) does not
        takes_processor = "processor" in inspect.signature(get_gguf_hf_weights_map).parameters
        names = get_gguf_hf_weights_map(model, *([TensorProcessor()] if takes_processor else []), model_type="qwen3")
    to_llama_cpp = {hf_name.removeprefix("model."): name for name, hf_name in names.items()}
    reference = write_gguf(tmp_path / "qwen3.gguf", {to_llama_cpp[k]: v for k, v in hf.items()}, "Q8_0", "qwen3")
    quantized = load_text_encoder(tmp_path / "qwen3.gguf")
    assert isinstance(quantized.layers[1].mlp.down_proj.weight, QuantizedWeight)
    assert isinstance(quantized.embed_tokens.weight, QuantizedWeight)
    expected_model = load_text_encoder({names[k]: v for k, v in reference.items()})
    ids = torch.tensor([[9707, 11, 1879, 0, 151643]])
    with torch.no_grad():
        assert_close(quantized(input_ids=ids).last_hidden_state, expected_model(input_ids=ids).last_hidden_state)


def test_truncated_gguf_is_a_clear_error(tmp_path, dit):
    path = tmp_path / "anima-Q4_0.gguf"
    write_gguf(path, dit, "Q4_0", "cosmos")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match=r"anima-Q4_0\.gguf' is truncated"):
        load_anima_model(path)


def test_unsupported_gguf_type_names_the_tensor(tmp_path, dit):
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "cosmos")
    for key, tensor in dit.items():
        if key != "blocks.0.mlp.layer1.weight":
            writer.add_tensor(key, tensor.float().numpy())
    writer.add_tensor("blocks.0.mlp.layer1.weight", np.zeros((1024, 136), np.uint8), raw_dtype=T.IQ4_XS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsError, match=r"'blocks\.0\.mlp\.layer1\.weight' is stored as GGML type IQ4_XS"):
        load_anima_model(tmp_path / "iq.gguf")
