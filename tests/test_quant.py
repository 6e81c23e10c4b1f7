"""Quantized checkpoints in the safetensors layouts (ComfyUI `comfy_quant` fp8/int8/ConvRot, its
`_quantization_metadata`, legacy scaled fp8, mmgp/quanto int8, plain fp8 casts): tiny files written in each
exact layout load, stay quantized, and compute what the same model built from the dequantized weights
computes (dequantized here with the layout's own formula, not the app's); on-the-fly quantization round
trips through ComfyUI's layout; broken files give one clear WeightsError."""

import base64
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.anima.anima_model import QUANTIZABLE_WEIGHTS, load_anima_model, save_anima_model
from models.anima.quant import QuantizedWeight, _fp8_linear, hadamard, quantize_weight, stored_nbytes
from models.anima.text_encoder import load_text_encoder
from models.anima.weights import WeightsError, load_module_strict, open_state_dict
from tests.tiny_dit import make_dit_state_dict
from tests.tiny_text_encoder import make_text_encoder_state_dict

SIZES = dict(model_channels=64, num_blocks=2, num_heads=4, text_dim=32, adaln_lora_dim=16)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
H4 = torch.tensor([[1.0, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])


@pytest.fixture(scope="module")
def master():
    """The bf16 tiny DiT, with `net.` keys, as the official file."""
    return make_dit_state_dict(seed=5, **SIZES)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 1, 8, 8, generator=g)
    qwen = torch.randn(1, 7, SIZES["text_dim"], generator=g)
    return x, torch.tensor([0.6]), qwen, torch.randint(0, 32128, (1, 7), generator=g)


@torch.no_grad()
def run(model):
    x, t, qwen, ids = inputs()
    return model(x, t, model.preprocess_text_embeds(qwen, ids)).float()


def assert_close(actual, expected, rel=1e-5):
    assert (actual - expected).abs().max() <= rel * expected.abs().max(), (actual - expected).abs().max()


def test_hadamard_is_the_kronecker_power_of_h4_symmetric_and_orthogonal():
    assert torch.equal(hadamard(4), H4 / 2)
    h = hadamard(64)
    assert torch.allclose(h, torch.kron(torch.kron(H4, H4), H4) / 8)
    assert torch.equal(h, h.T)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Writers of the real layouts (independent of the app's code) and the dequantized reference
# ---------------------------------------------------------------------------------------------------


def group_for(in_features):
    return next(g for g in (256, 64, 16) if in_features % g == 0)


def rotate(w, group):
    """Each group of `group` input features times the normalised Kronecker power of H4 (its own inverse)."""
    h = H4
    while h.shape[0] < group:
        h = torch.kron(h, H4)
    return (w.unflatten(-1, (-1, group)) @ (h / group**0.5)).flatten(-2)


def quantize(w, kind, *, rowwise=False, group=0):
    """(codes, scale, dequantized) of a [out, in] weight as a ComfyUI-style quantizer stores it."""
    w = w.float()
    if kind == "int8":
        stored = rotate(w, group) if group else w
        absmax = stored.abs().amax(dim=1, keepdim=True) if rowwise else stored.abs().amax()
        scale = absmax / 127
        codes = (stored / scale).round().clamp(-127, 127).to(torch.int8)
        dequant = codes.float() * scale
        return codes, scale, rotate(dequant, group) if group else dequant
    scale = w.abs().amax() / FP8_MAX[kind]
    codes = (w / scale).to(kind)
    return codes, scale, codes.float() * scale


def comfy_file(master, kind, *, rowwise=False, convrot=False, prefix="net.", metadata_configs=False,
               input_scales=False):
    """(file tensors, file metadata, reference fp32 state dict) for ComfyUI's per-layer layout on the
    attention and MLP weights (the rest bf16), like Ronysoc/Anima-Base-FP8 and Bedovyy/Anima-INT8."""
    tensors, reference, layers = {}, {}, {}
    for key, w in master.items():
        name = prefix + key.removeprefix("net.")
        reference[key] = w.float()
        if not QUANTIZABLE_WEIGHTS.fullmatch(key.removeprefix("net.")):
            tensors[name] = w
            continue
        group = group_for(w.shape[1]) if convrot else 0
        codes, scale, reference[key] = quantize(w, kind, rowwise=rowwise, group=group)
        layer = name.removesuffix(".weight")
        conf = {"format": "int8_tensorwise" if kind == "int8" else str(kind)[6:]}
        if group:
            conf |= {"convrot": True, "convrot_groupsize": group}
        tensors[name], tensors[layer + ".weight_scale"] = codes, scale.reshape(-1) if rowwise and not convrot else scale
        if input_scales and "q_proj" in layer:
            tensors[layer + ".input_scale"] = torch.tensor(0.02)
        if metadata_configs:
            layers[layer] = conf
        else:
            tensors[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if layers else None
    return tensors, metadata, reference


def legacy_scaled_fp8_file(master):
    """ComfyUI's old scaled fp8: a `scaled_fp8` marker, `scale_weight` [1] and `scale_input` per layer."""
    tensors, reference = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, w in master.items():
        reference[key] = w.float()
        if not QUANTIZABLE_WEIGHTS.fullmatch(key.removeprefix("net.")):
            tensors[key] = w
            continue
        codes, scale, reference[key] = quantize(w, torch.float8_e4m3fn)
        layer = key.removesuffix(".weight")
        tensors |= {key: codes, layer + ".scale_weight": scale.reshape(1), layer + ".scale_input": torch.ones(1)}
    return tensors, None, reference


def quanto_int8_file(master):
    """mmgp's `offload.save_model(..., do_quantize=True)` layout (Wan2GP's *_quanto_bf16_int8 files, as mmgp
    3.7.12 writes them): `weight._data` int8, `weight._scale` bf16 [out, 1], unused activation scales, and
    the quanto map base64-encoded in the metadata."""
    tensors, reference, qmap = {}, {}, {}
    for key, w in master.items():
        name = key.removeprefix("net.")
        reference[key] = w.float()
        if not QUANTIZABLE_WEIGHTS.fullmatch(name):
            tensors[name] = w
            continue
        codes, scale, _ = quantize(w, "int8", rowwise=True)
        scale = scale.to(torch.bfloat16)
        reference[key] = codes.float() * scale.float()
        layer = name.removesuffix(".weight")
        tensors |= {name + "._data": codes, name + "._scale": scale, layer + ".input_scale": torch.tensor(
            1.0, dtype=torch.bfloat16), layer + ".output_scale": torch.tensor(1.0, dtype=torch.bfloat16)}
        qmap[layer] = {"weights": "qint8", "activations": "none"}
    encoded = base64.b64encode(json.dumps(qmap).encode()).decode()
    return tensors, {"quantization_map_base64": encoded, "quantization_format": "quanto"}, reference


def fp8_cast_file(master):
    """A file simply cast to fp8 (no scales, no markers); ComfyUI upcasts its weights."""
    tensors = {k: w.to(torch.float8_e4m3fn) if QUANTIZABLE_WEIGHTS.fullmatch(k[4:]) else w for k, w in master.items()}
    return tensors, None, {k: w.float() for k, w in tensors.items()}


LAYOUTS = {
    "comfy float8_e4m3fn + input_scale": lambda m: comfy_file(m, torch.float8_e4m3fn, input_scales=True),
    "comfy float8_e5m2 via _quantization_metadata": lambda m: comfy_file(
        m, torch.float8_e5m2, prefix="model.diffusion_model.", metadata_configs=True),
    "comfy int8_tensorwise": lambda m: comfy_file(m, "int8"),
    "comfy int8 rowwise": lambda m: comfy_file(m, "int8", rowwise=True, prefix=""),
    "comfy int8 ConvRot": lambda m: comfy_file(m, "int8", rowwise=True, convrot=True),
    "legacy scaled_fp8": legacy_scaled_fp8_file,
    "mmgp quanto int8": quanto_int8_file,
    "plain fp8 cast": fp8_cast_file,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_file_computes_as_its_dequantized_weights(tmp_path, master, layout):
    tensors, metadata, reference = LAYOUTS[layout](master)
    path = tmp_path / "anima_quantized.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    model = load_anima_model(path, dtype=torch.float32)
    q_proj = model.blocks[1].self_attn.q_proj.weight
    assert isinstance(q_proj, QuantizedWeight) and q_proj.dtype == torch.float32 and q_proj.shape == (64, 64)
    assert q_proj.qdata.dtype in (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
    assert type(model.t_embedder[1].linear_1.weight.data) is torch.Tensor  # the rest is plain
    assert_close(run(model), run(load_anima_model(reference, dtype=torch.float32)))


def test_quantized_layers_stay_small_in_memory(tmp_path, master):
    tensors, _, _ = comfy_file(master, "int8", rowwise=True, convrot=True)
    path = tmp_path / "anima_int8.safetensors"
    save_file(tensors, str(path))
    model = load_anima_model(path, dtype=torch.bfloat16)
    held = sum(stored_nbytes(t) for t in model.state_dict().values())
    comfy_quant_bytes = sum(t.numel() for k, t in tensors.items() if k.endswith("comfy_quant"))
    assert held == sum(t.numel() * t.element_size() for t in tensors.values()) - comfy_quant_bytes
    assert held < path.stat().st_size


def test_text_encoder_loads_comfy_int8_convrot(tmp_path):
    """A ComfyUI int8 ConvRot Qwen3 file (`model.` keys, attention and MLP projections quantized)."""
    plain = make_text_encoder_state_dict(seed=2)
    tensors, reference = {}, {}
    for key, w in plain.items():
        reference[key] = w.float()
        if w.dim() == 2 and "embed" not in key:
            group = group_for(w.shape[1])
            codes, scale, reference[key] = quantize(w, "int8", rowwise=True, group=group)
            conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}
            layer = key.removesuffix(".weight")
            tensors |= {layer + ".weight_scale": scale, layer + ".comfy_quant": torch.tensor(
                list(json.dumps(conf).encode()), dtype=torch.uint8)}
            w = codes
        tensors[key] = w
    save_file(tensors, str(tmp_path / "te.safetensors"))
    ids = torch.tensor([[9707, 11, 1879, 0, 151643]])
    with torch.no_grad():
        quantized = load_text_encoder(tmp_path / "te.safetensors")(input_ids=ids).last_hidden_state
        expected = load_text_encoder(reference)(input_ids=ids).last_hidden_state
    assert_close(quantized, expected)


def test_fp8_matmul_matches_comfyui_fp8_path():
    """The CUDA fused path (run here on the CPU build of torch._scaled_mm): input quantized by its
    input_scale, or dynamically by absmax / 448 when the file has none."""
    g = torch.Generator().manual_seed(0)
    weight = quantize_weight(torch.randn(48, 32, generator=g) / 6, "fp8").to(torch.bfloat16)
    x = torch.randn(2, 5, 32, generator=g).to(torch.bfloat16)
    for input_scale in (None, torch.tensor(0.01)):
        weight.input_scale = input_scale
        scale_x = input_scale if input_scale is not None else x.float().abs().amax() / 448
        x_fp8 = (x.float() / scale_x).clamp(-448, 448).to(torch.float8_e4m3fn)
        expected = (x_fp8.float() * scale_x) @ (weight.qdata.float() * weight.scale).T
        assert_close(_fp8_linear(x, weight, None).float(), expected, rel=1e-2)


# ---------------------------------------------------------------------------------------------------
# On-the-fly quantization and ComfyUI's layout
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how, fmt, codes_dtype, scale_shape", [
    ("int8", {"format": "int8_tensorwise"}, torch.int8, (64, 1)),
    ("int8_convrot", {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}, torch.int8, (64, 1)),
    ("fp8", {"format": "float8_e4m3fn"}, torch.float8_e4m3fn, ()),
])
def test_quantize_save_load_round_trip(tmp_path, how, fmt, codes_dtype, scale_shape):
    master = make_dit_state_dict(seed=6, **SIZES)
    save_file(master, str(tmp_path / "bf16.safetensors"))
    model = load_anima_model(tmp_path / "bf16.safetensors", dtype=torch.float32, quantize=how)
    save_anima_model(model, tmp_path / "int8.safetensors")
    saved = open_state_dict(tmp_path / "int8.safetensors", what="test")  # ComfyUI's raw view of the file
    with safe_open(str(tmp_path / "int8.safetensors"), "pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    assert raw.keys() == set(master) | {k[:-6] + s for k in master if QUANTIZABLE_WEIGHTS.fullmatch(k[4:])
                                        for s in ("weight_scale", "comfy_quant")}
    q_proj = "net.blocks.0.self_attn.q_proj."
    assert json.loads(bytes(raw[q_proj + "comfy_quant"].tolist())) == fmt
    assert raw[q_proj + "weight"].dtype == codes_dtype and raw[q_proj + "weight_scale"].dtype == torch.float32
    assert raw[q_proj + "weight_scale"].shape == scale_shape
    assert raw["net.blocks.0.adaln_modulation_mlp.1.weight"].dtype == torch.bfloat16
    assert torch.equal(raw["net.llm_adapter.embed.weight"], master["net.llm_adapter.embed.weight"])
    assert isinstance(saved["net.blocks.1.mlp.layer2.weight"], QuantizedWeight)
    reloaded = load_anima_model(tmp_path / "int8.safetensors", dtype=torch.float32)
    assert torch.equal(run(reloaded), run(model))
    # and it stays close to the unquantized model
    bf16 = run(load_anima_model(tmp_path / "bf16.safetensors", dtype=torch.float32))
    assert (run(model) - bf16).norm() < (0.05 if how == "fp8" else 0.01) * bf16.norm()


def test_on_the_fly_quantization_touches_only_block_attention_and_mlp(master):
    model = load_anima_model(master, dtype=torch.bfloat16, quantize="int8")
    quantized = {k for k, t in model.state_dict().items() if isinstance(t, QuantizedWeight)}
    assert quantized == {k[4:] for k in master if QUANTIZABLE_WEIGHTS.fullmatch(k[4:])}
    assert len(quantized) == SIZES["num_blocks"] * 10
    assert not any(k.startswith(("t_embedder", "llm_adapter", "x_embedder", "final_layer")) or "adaln" in k
                   for k in quantized)


# ---------------------------------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------------------------------


def write(tmp_path, tensors, metadata=None):
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_missing_scale_names_the_layer(tmp_path, master):
    tensors, _, _ = comfy_file(master, "int8")
    del tensors["net.blocks.1.mlp.layer1.weight_scale"]
    with pytest.raises(WeightsError, match=r"layer 'net\.blocks\.1\.mlp\.layer1'.*weight_scale' is missing"):
        load_anima_model(write(tmp_path, tensors))


def test_unknown_format_names_the_layer_and_the_format(tmp_path, master):
    tensors, _, _ = comfy_file(master, "int8")
    tensors["net.blocks.0.mlp.layer2.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    with pytest.raises(WeightsError, match=r"blocks\.0\.mlp\.layer2'.*format 'nvfp4' is not supported"):
        load_anima_model(write(tmp_path, tensors))


def test_quantized_norm_is_refused(tmp_path, master):
    tensors = dict(master)
    conf = torch.tensor(list(b'{"format": "int8_tensorwise"}'), dtype=torch.uint8)
    tensors |= {"net.t_embedding_norm.weight": torch.ones(64, dtype=torch.int8), "net.t_embedding_norm.weight_scale":
                torch.tensor(0.1), "net.t_embedding_norm.comfy_quant": conf}
    with pytest.raises(WeightsError, match=r"t_embedding_norm'.*2-D torch.int8 weight"):
        load_anima_model(write(tmp_path, tensors))


def test_int8_weight_without_any_scale_is_refused(tmp_path, master):
    tensors = {**master, "net.blocks.0.mlp.layer1.weight": torch.ones(256, 64, dtype=torch.int8)}
    with pytest.raises(WeightsError, match=r"'blocks\.0\.mlp\.layer1\.weight' as torch.int8 with no scale"):
        load_anima_model(write(tmp_path, tensors))


def test_quantized_weight_where_full_precision_is_needed(master):
    module = torch.nn.Module()
    module.table = torch.nn.Parameter(torch.empty(4, 8, device="meta"))
    sd = {"table": quantize_weight(torch.randn(4, 8), "int8")}
    with pytest.raises(WeightsError, match=r"'table' quantized, but this tensor must be in full precision"):
        load_module_strict(module, sd, dtype=torch.float32, device="cpu", what="test")


# ---------------------------------------------------------------------------------------------------
# The handler's quantizeTransformer / save_quantized
# ---------------------------------------------------------------------------------------------------


def test_handler_quantizes_and_saves_in_comfy_layout(tmp_path):
    from models.anima.anima_handler import family_handler
    from tests.tiny_ckpts import DIT_FILE, write_tiny_ckpts

    ckpts = write_tiny_ckpts(tmp_path)
    model, pipe = family_handler.load_model(str(ckpts / DIT_FILE), quantizeTransformer="fp8", save_quantized=True)
    assert isinstance(pipe["transformer"].blocks[0].mlp.layer1.weight, QuantizedWeight)
    saved = ckpts / "anima-preview_fp8.safetensors"
    with safe_open(str(saved), "pt") as f:
        assert json.loads(bytes(f.get_tensor("net.blocks.0.mlp.layer1.comfy_quant").tolist())) == {
            "format": "float8_e4m3fn"}
    again, _ = family_handler.load_model(str(saved), quantizeTransformer=False)
    assert torch.equal(run(again.transformer), run(model.transformer))


def test_handler_lets_upstream_wan2gp_save_and_register_the_file(tmp_path, monkeypatch):
    """Inside upstream Wan2GP, `--save-quantized` goes to the host's own `save_quantized_model`."""
    import sys
    import types

    from models.anima.anima_handler import family_handler
    from tests.tiny_ckpts import DIT_FILE, write_tiny_ckpts

    calls = []
    host = types.SimpleNamespace(save_quantized_model=lambda *args: calls.append(args))
    monkeypatch.setitem(sys.modules, "wgp", host)
    ckpts = write_tiny_ckpts(tmp_path)
    model, _ = family_handler.load_model(str(ckpts / DIT_FILE), model_type="anima", save_quantized=True)
    assert calls == [(model.transformer, "anima", str(ckpts / DIT_FILE), model.dtypes.transformer, None)]
    assert not isinstance(model.transformer.blocks[0].mlp.layer1.weight, QuantizedWeight)  # the host quantizes
    assert not list(ckpts.glob("*int8*"))


def test_quantized_weights_refuse_in_place_writes_and_show_plain_values_elsewhere():
    weight = quantize_weight(torch.randn(8, 16), "int8")
    assert torch.equal(weight.t(), weight.dequantize().t()) and type(weight.clone()) is torch.Tensor
    with pytest.raises(TypeError, match="cannot be modified in place"):
        weight.add_(1.0)


def test_merging_a_lora_into_quantized_weights_is_a_clear_error(tmp_path, master):
    from models.anima.lora import LoraPatcher

    model = load_anima_model(master, dtype=torch.float32, quantize="int8")
    save_file({"diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64),
               "diffusion_model.blocks.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="quantized"):
        LoraPatcher(model).set_loras([(tmp_path / "lora.safetensors", 1.0)])


@pytest.mark.parametrize("how", ["int8_convrot", "fp8"])
def test_quantized_linear_traces_under_torch_compile(how):
    """`--compile` traces the blocks: the weight subclass must go through dynamo and fake tensors."""
    linear = torch.nn.Linear(64, 32, bias=False)
    linear.weight = torch.nn.Parameter(quantize_weight(torch.randn(32, 64), how).float(), requires_grad=False)
    x = torch.randn(4, 64)
    assert torch.equal(torch.compile(linear, backend="aot_eager")(x), linear(x))
