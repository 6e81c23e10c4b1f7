"""Quantized weights: stored small (fp8, int8, GGUF blocks), dequantized per layer in the forward.

A `QuantizedWeight` is a tensor subclass that stands in for a Linear's (or an Embedding's) `weight`. It
reports the logical shape and the compute dtype, and keeps only the stored form: the fp8/int8 codes with
their scale, or the raw GGUF blocks. `F.linear` on it dequantizes that one weight into the input's dtype
(or, on CUDA GPUs with fp8 tensor cores, multiplies in fp8 with `torch._scaled_mm`, as ComfyUI does);
`F.embedding` dequantizes only the looked-up rows; any other operation sees the dequantized tensor.
So the modules stay plain `nn.Linear`s and everything that handles weights keeps working: strict loading,
`.to(device/dtype)`, and mmgp, which reads the stored tensors through `get_quantized_subtensors` (pinning,
size accounting), moves them per block, and casts LoRA factors to the reported dtype.

Layouts read (checkpoints.md §3): ComfyUI's per-layer `comfy_quant` (or the file's
`_quantization_metadata`) with `float8_e4m3fn`, `float8_e5m2` and `int8_tensorwise` (a scalar or one
scale per output row; ConvRot: activations rotated in groups by a Hadamard matrix, weights stored
pre-rotated), legacy scaled fp8 (`scaled_fp8` marker, `scale_weight`, `scale_input`), mmgp/quanto int8
and fp8 (`weight._data`, `weight._scale`, the `quantization_map` metadata), and fp8 casts without scales.
GGUF blocks come from `gguf_file.py`. Written: ComfyUI's `comfy_quant` layout (`comfy_quant_state_dict`).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

logger = logging.getLogger(__name__)

FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
INT8_FORMAT = "int8_tensorwise"
SUPPORTED_FORMATS = (*FP8_FORMATS, INT8_FORMAT)
INT8_MAX = 127.0
DEFAULT_CONVROT_GROUP = 256
CONVROT_GROUPS = (256, 64, 16)
# On-the-fly quantization: what `--quantize` accepts, and the ComfyUI layout each one writes.
QUANTIZE_CHOICES = ("int8", "int8_convrot", "fp8")


class QuantizationError(ValueError):
    """A quantized layer that cannot be used; the loaders reword it as a WeightsError naming the file."""


# ---------------------------------------------------------------------------------------------------
# Layouts: how the stored tensors become the weight
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaledLayout:
    """fp8 or int8 codes times a scale: a scalar, or one per output row ([out, 1]).

    `convrot_group` > 0: the codes are the weight rotated along its input dimension in groups of that
    size by the normalised Hadamard matrix H (W_stored = W @ H per group, H symmetric and orthogonal), so
    W = W_stored @ H. `full_precision_mm`: never multiply in fp8 (ComfyUI's `full_precision_matrix_mult`).
    """

    format: str
    convrot_group: int = 0
    full_precision_mm: bool = False

    def dequantize(self, qdata: Tensor, scale: Tensor) -> Tensor:  # [rows, in] fp32
        weight = qdata.float() * scale.float()
        if self.convrot_group:
            weight = rotate_groups(weight, self.convrot_group)
        return weight

    def comfy_quant(self) -> dict:
        conf: dict = {"format": self.format}
        if self.convrot_group:
            conf |= {"convrot": True, "convrot_groupsize": self.convrot_group}
        if self.full_precision_mm:
            conf["full_precision_matrix_mult"] = True
        return conf


@dataclass(frozen=True)
class GGUFLayout:
    """Raw GGML blocks, one row of blocks per weight row; `dequantize_rows` is the torch block decoder."""

    type_name: str
    dequantize_rows: Callable[[Tensor], Tensor]  # uint8 [rows, bytes] -> fp32 [rows, in]

    def dequantize(self, qdata: Tensor, scale: Tensor | None) -> Tensor:
        return self.dequantize_rows(qdata)


Layout = ScaledLayout | GGUFLayout


def _check_convrot_group(group: int, in_features: int) -> None:
    power_of_4 = group >= 4 and group & (group - 1) == 0 and (group.bit_length() - 1) % 2 == 0
    if not power_of_4 or in_features % group:
        raise QuantizationError(f"its ConvRot group size {group} is not a power of 4 dividing its input "
                                f"width {in_features}")


_HADAMARD_4 = ((1.0, 1.0, 1.0, -1.0), (1.0, 1.0, -1.0, 1.0), (1.0, -1.0, 1.0, 1.0), (-1.0, 1.0, 1.0, 1.0))
def hadamard(size: int, device: torch.device | str = "cpu") -> Tensor:
    """The regular Hadamard matrix of `size` (a power of 4): Kronecker powers of the symmetric 4x4 one,
    scaled by size^-1/2, so it is symmetric and orthogonal (its own inverse). fp32. Built on each call (a
    few microseconds; no cached tensor, which torch.compile's fake tensors could not mix with)."""
    base = torch.tensor(_HADAMARD_4, device=device)
    matrix = base
    while matrix.shape[0] < size:
        matrix = torch.kron(matrix, base)
    return matrix * size**-0.5


def rotate_groups(x: Tensor, group: int) -> Tensor:
    """x [..., n] with each consecutive group of `group` features multiplied by H (fp32 math)."""
    h = hadamard(group, x.device)
    return (x.float().unflatten(-1, (-1, group)) @ h).flatten(-2)


# ---------------------------------------------------------------------------------------------------
# The weight tensor
# ---------------------------------------------------------------------------------------------------


class QuantizedWeight(Tensor):
    """A quantized [out, in] weight that behaves as its dequantized self in the compute dtype.

    qdata: the stored codes (int8, fp8, or uint8 GGUF blocks [out, bytes]); scale: fp32 scalar or [out, 1]
    (None for GGUF); input_scale: fp32 scalar for the fp8 activations, or None (dynamic).
    """

    qdata: Tensor
    scale: Tensor | None
    input_scale: Tensor | None
    quant_layout: Layout

    @staticmethod
    def __new__(cls, qdata: Tensor, scale: Tensor | None, layout: Layout, shape: tuple[int, ...],
                dtype: torch.dtype = torch.bfloat16, input_scale: Tensor | None = None):
        return Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata: Tensor, scale: Tensor | None, layout: Layout, shape: tuple[int, ...],
                 dtype: torch.dtype = torch.bfloat16, input_scale: Tensor | None = None):
        self.qdata, self.scale, self.input_scale, self.quant_layout = qdata, scale, input_scale, layout

    def __repr__(self) -> str:
        return (f"QuantizedWeight({list(self.shape)}, {_layout_name(self.quant_layout)}, dtype={self.dtype}, "
                f"device={self.device})")

    def dequantize(self, dtype: torch.dtype | None = None, rows: Tensor | None = None) -> Tensor:
        """The weight (or only `rows` of it) in `dtype` (default: the reported dtype)."""
        qdata, scale = self.qdata, self.scale
        if rows is not None:
            qdata = qdata[rows]
            if scale is not None and scale.numel() > 1:
                scale = scale.reshape(-1, 1)[rows]
        elif scale is not None and scale.numel() > 1:
            scale = scale.reshape(-1, 1)
        weight = self.quant_layout.dequantize(qdata.reshape(-1, qdata.shape[-1]), scale)
        shape = self.shape if rows is None else (*rows.shape, self.shape[-1])
        return weight.reshape(shape).to(dtype or self.dtype)

    def stored_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.get_quantized_subtensors())

    # mmgp's protocol for quantized parameters (pinning, size accounting): the tensors that hold the data.
    def get_quantized_subtensors(self) -> list[tuple[str, Tensor]]:
        named = (("qdata", self.qdata), ("scale", self.scale), ("input_scale", self.input_scale))
        return [(name, t) for name, t in named if t is not None]

    def set_quantized_subtensors(self, sub_tensors) -> None:
        for name, tensor in dict(sub_tensors).items():
            setattr(self, name, tensor)

    def _rebuilt(self, fn: Callable[[Tensor], Tensor], dtype: torch.dtype | None = None) -> QuantizedWeight:
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        return QuantizedWeight(fn(self.qdata), apply(self.scale), self.quant_layout, tuple(self.shape),
                               dtype or self.dtype, apply(self.input_scale))

    # torch.compile / FakeTensor support
    def __tensor_flatten__(self):
        names = [name for name, _ in self.get_quantized_subtensors()]
        return names, (self.quant_layout, tuple(self.shape), self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict, context, outer_size, outer_stride) -> QuantizedWeight:
        layout, shape, dtype = context
        return QuantizedWeight(inner["qdata"], inner.get("scale"), layout, shape, dtype, inner.get("input_scale"))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return quantized_linear(*args, **kwargs)
        if func is F.embedding:
            ids, weight, max_norm = args[0], args[1], args[3] if len(args) > 3 else kwargs.get("max_norm")
            if isinstance(weight, QuantizedWeight) and max_norm is None:  # padding_idx only matters to gradients
                return weight.dequantize(rows=ids)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return args[0]._rebuilt(lambda t: t)
        if func is torch.ops.aten._to_copy.default:
            self, device = args[0], kwargs.get("device")
            dtype = kwargs.get("dtype") or self.dtype
            if not dtype.is_floating_point:
                raise TypeError(f"A quantized weight cannot be converted to {dtype}.")
            move = (lambda t: t.to(device, non_blocking=kwargs.get("non_blocking", False))) if device else (
                lambda t: t)
            return self._rebuilt(move, dtype)
        if func._schema.is_mutable:  # a write into a temporary dequantized copy would be silently lost
            raise TypeError(f"Quantized weights cannot be modified in place ({func}); load the unquantized "
                            "file to change them (e.g. to merge a LoRA).")
        # Anything else (a transpose, a clone...) sees the plain weight.
        plain = tree_map(lambda a: a.dequantize() if isinstance(a, QuantizedWeight) else a, (args, kwargs))
        return func(*plain[0], **plain[1])


def _layout_name(layout: Layout) -> str:
    if isinstance(layout, GGUFLayout):
        return f"GGUF {layout.type_name}"
    return layout.format + (f" ConvRot {layout.convrot_group}" if layout.convrot_group else "")


def stored_nbytes(tensor: Tensor) -> int:
    """Bytes a tensor really holds: the stored form of a QuantizedWeight, else numel * element size."""
    if isinstance(tensor, QuantizedWeight):
        return tensor.stored_nbytes()
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------------------
# The matmul
# ---------------------------------------------------------------------------------------------------

_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
_fused_fp8_failed: set[torch.device] = set()


def quantized_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear with a QuantizedWeight: fp8 tensor-core matmul where ComfyUI would use it, else the weight
    dequantized into x's dtype."""
    if not isinstance(weight, QuantizedWeight):  # a quantized input or bias: nothing to fuse
        with torch._C.DisableTorchFunctionSubclass():
            return F.linear(x, weight, bias)
    if _can_fuse_fp8(x, weight):
        try:
            return _fp8_linear(x, weight, bias)
        except RuntimeError as error:  # an unsupported shape or build: fall back for good on this device
            _fused_fp8_failed.add(x.device)
            logger.warning("fp8 matmul unavailable on %s (%s); dequantizing fp8 weights instead.", x.device, error)
    return F.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


def _can_fuse_fp8(x: Tensor, weight: QuantizedWeight) -> bool:
    layout = weight.quant_layout
    return (x.is_cuda and isinstance(layout, ScaledLayout) and layout.format == "float8_e4m3fn"
            and not layout.full_precision_mm and weight.scale.numel() == 1 and x.device not in _fused_fp8_failed
            and x.dtype in (torch.bfloat16, torch.float16) and weight.shape[0] % 16 == 0
            and weight.shape[1] % 16 == 0 and torch.cuda.get_device_capability(x.device) >= (8, 9))


def _fp8_linear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None) -> Tensor:
    # ComfyUI's TensorCoreFP8 path: the input is quantized with the file's input_scale, or with its own
    # absmax scale when the file has none; inputs of any rank are flattened to [tokens, in].
    x2d = x.reshape(-1, x.shape[-1])
    if weight.input_scale is not None:
        scale_x = weight.input_scale.to(x.device, torch.float32).reshape(())
    else:
        scale_x = (x2d.abs().amax().float() / _FP8_MAX).clamp(min=1e-12)
    x_fp8 = (x2d.float() / scale_x).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x_fp8, weight.qdata.t(), scale_a=scale_x, scale_b=weight.scale.float().reshape(()),
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------
# Reading the safetensors layouts
# ---------------------------------------------------------------------------------------------------


def pack_quantized(sd: dict[str, Tensor], metadata: Mapping[str, str]) -> dict[str, Tensor]:
    """Replace every quantized layer's `<layer>.weight` and its companion tensors (scales, `comfy_quant`,
    markers) by one QuantizedWeight under `<layer>.weight`; other tensors pass through. Raises
    QuantizationError naming the layer for a missing scale, an unknown format or a wrong storage dtype."""
    sd = dict(sd)
    configs = _layer_configs(sd, metadata)
    if not configs and not any(k.endswith((".weight_scale", ".scale_weight")) for k in sd):
        return sd
    for layer, conf in configs.items():
        try:
            sd[f"{layer}.weight"] = _packed_layer(sd, layer, conf)
        except QuantizationError as error:
            raise QuantizationError(f"layer '{layer}': {error}") from None
    for key in [k for k in sd if k.endswith(".weight_scale")]:
        raise QuantizationError(f"'{key}' is a scale for a layer with no quantized weight")
    return sd


def _layer_configs(sd: dict[str, Tensor], metadata: Mapping[str, str]) -> dict[str, dict]:
    """layer name -> {"format", ...} from every place a file can say it, removing the marker tensors."""
    configs: dict[str, dict] = {}
    if "_quantization_metadata" in metadata:
        try:
            configs |= {k: dict(v) for k, v in json.loads(metadata["_quantization_metadata"])["layers"].items()}
        except (ValueError, KeyError, TypeError):
            raise QuantizationError("its '_quantization_metadata' is not the JSON {\"layers\": {...}}") from None
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        layer = key[: -len(".comfy_quant")]
        try:
            configs[layer] = dict(json.loads(bytes(sd.pop(key).tolist()).decode("utf-8")))
        except (ValueError, TypeError):
            raise QuantizationError(f"'{key}' is not a JSON quantization config") from None
    for layer, conf in _quanto_map(metadata).items():  # mmgp / optimum-quanto files (Wan2GP's *_quanto_*_int8)
        if conf.get("weights", "none") != "none":
            configs[layer] = _from_quanto(sd, layer, conf)
    marker = sd.pop("scaled_fp8", None)
    for key in [k for k in sd if k.endswith(".scale_weight")]:  # legacy scaled fp8 (ComfyUI's old quants)
        layer = key[: -len(".scale_weight")]
        sd[f"{layer}.weight_scale"] = sd.pop(key)
        scale_input = sd.pop(f"{layer}.scale_input", None)
        if scale_input is not None and not bool((scale_input == 1.0).all()):
            sd[f"{layer}.input_scale"] = scale_input
        fmt = "float8_e5m2" if marker is not None and marker.dtype == torch.float8_e5m2 else "float8_e4m3fn"
        configs.setdefault(layer, {"format": fmt, "full_precision_matrix_mult": marker is not None
                                   and marker.numel() == 2})
    for key in [k for k in sd if k.endswith(".weight_scale")]:  # scales without a config: the weight's dtype
        layer = key[: -len(".weight_scale")]
        weight = sd.get(f"{layer}.weight")
        if layer not in configs and weight is not None and weight.dtype in (torch.int8, *FP8_FORMATS.values()):
            configs[layer] = {"format": INT8_FORMAT if weight.dtype == torch.int8 else str(weight.dtype)[6:]}
    return configs


def _quanto_map(metadata: Mapping[str, str]) -> dict:
    """mmgp's `offload.save_model` stores quanto's map base64-encoded (`quantization_map_base64`); older files
    have it as plain JSON (`quantization_map`)."""
    try:
        if "quantization_map_base64" in metadata:
            return json.loads(base64.b64decode(metadata["quantization_map_base64"]))
        return json.loads(metadata.get("quantization_map", "{}"))
    except ValueError:
        raise QuantizationError("its mmgp/quanto 'quantization_map' metadata is not valid JSON") from None


def _from_quanto(sd: dict[str, Tensor], layer: str, conf: Mapping[str, str]) -> dict:
    formats = {"qint8": INT8_FORMAT, "qfloat8": "float8_e4m3fn", "qfloat8_e4m3fn": "float8_e4m3fn",
               "qfloat8_e5m2": "float8_e5m2"}
    qtype, activations = conf["weights"], conf.get("activations", "none")
    if qtype not in formats or activations != "none":
        raise QuantizationError(f"layer '{layer}': the mmgp/quanto weights '{qtype}' with activations "
                                f"'{activations}' are not supported (supported: {', '.join(formats)}, activations "
                                "none)")
    for part, name in (("_data", "weight"), ("_scale", "weight_scale")):
        key = f"{layer}.weight.{part}"
        if key not in sd:
            raise QuantizationError(f"layer '{layer}': '{key}' is missing")
        sd[f"{layer}.{name}"] = sd.pop(key)
    for unused in ("input_scale", "output_scale"):  # quanto's activation scales: unused when activations are none
        sd.pop(f"{layer}.{unused}", None)
    return {"format": formats[qtype]}


def _packed_layer(sd: dict[str, Tensor], layer: str, conf: dict) -> QuantizedWeight:
    fmt = conf.get("format")
    if fmt not in SUPPORTED_FORMATS:
        raise QuantizationError(f"its quantization format {fmt!r} is not supported "
                                f"(supported: {', '.join(SUPPORTED_FORMATS)})")
    weight = sd.get(f"{layer}.weight")
    if weight is None:
        raise QuantizationError("it has a quantization config but no weight")
    storage = FP8_FORMATS.get(fmt, torch.int8)
    if weight.dtype != storage or weight.dim() != 2:
        raise QuantizationError(f"format {fmt} needs a 2-D {storage} weight, but it is {weight.dtype} "
                                f"{list(weight.shape)}")
    scale = sd.pop(f"{layer}.weight_scale", None)
    if scale is None:
        raise QuantizationError(f"'{layer}.weight_scale' is missing")
    if scale.numel() not in (1, weight.shape[0]) or not scale.is_floating_point():
        raise QuantizationError(f"its weight_scale has {scale.numel()} values; it needs 1 or one per output row "
                                f"({weight.shape[0]})")
    input_scale = sd.pop(f"{layer}.input_scale", None)
    group = int(conf.get("convrot_groupsize", DEFAULT_CONVROT_GROUP)) if conf.get("convrot") else 0
    if group:
        _check_convrot_group(group, weight.shape[1])
    layout = ScaledLayout(fmt, group, bool(conf.get("full_precision_matrix_mult", False)))
    scale = scale.float().reshape(()) if scale.numel() == 1 else scale.float().reshape(-1, 1)
    return QuantizedWeight(weight, scale, layout, tuple(weight.shape), torch.bfloat16,
                           None if input_scale is None else input_scale.float().reshape(()))


def wrap_fp8_cast(weight: Tensor) -> QuantizedWeight:
    """A plain fp8 tensor (a file cast to fp8 without scales, as ComfyUI loads them): scale 1."""
    layout = ScaledLayout(str(weight.dtype)[len("torch."):])
    return QuantizedWeight(weight, torch.ones((), dtype=torch.float32), layout, tuple(weight.shape))


# ---------------------------------------------------------------------------------------------------
# Quantizing on the fly, and writing ComfyUI's layout
# ---------------------------------------------------------------------------------------------------


def quantize_weight(weight: Tensor, how: str) -> QuantizedWeight:
    """Quantize a [out, in] float weight: "int8" (absmax per output row), "int8_convrot" (the same after the
    Hadamard rotation in groups of 256, or of 64 or 16 where the input width needs it) or "fp8"
    (float8_e4m3fn, one absmax scale, as ComfyUI's quantizer). The result reports `weight`'s dtype."""
    if how not in QUANTIZE_CHOICES:
        raise ValueError(f"Unknown quantization {how!r}; choose one of {', '.join(QUANTIZE_CHOICES)}.")
    w = weight.detach().float()
    if how == "fp8":
        scale = (w.abs().amax() / _FP8_MAX).clamp(min=1e-12)
        codes = (w / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        layout = ScaledLayout("float8_e4m3fn")
    else:
        # the largest Hadamard group dividing the input width, as the ConvRot quantizers choose it
        groups = [g for g in CONVROT_GROUPS if w.shape[1] % g == 0] if how == "int8_convrot" else []
        group = groups[0] if groups else 0
        if group:
            w = rotate_groups(w, group)
        scale = (w.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=1e-12)  # [out, 1]
        codes = (w / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        layout = ScaledLayout(INT8_FORMAT, group)
    return QuantizedWeight(codes, scale, layout, tuple(weight.shape), weight.dtype)


def comfy_quant_state_dict(sd: Mapping[str, Tensor], *, dtype: torch.dtype = torch.bfloat16,
                           prefix: str = "") -> dict[str, Tensor]:
    """`sd` (a model's state dict) in ComfyUI's per-layer layout: each quantized weight as its codes,
    `weight_scale` (fp32), `input_scale` when it has one and the `comfy_quant` JSON tensor; float tensors in
    `dtype`. GGUF weights have no such layout (QuantizationError)."""
    out = {}
    for key, tensor in sd.items():
        if not isinstance(tensor, QuantizedWeight):
            out[prefix + key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            continue
        if not isinstance(tensor.quant_layout, ScaledLayout):
            raise QuantizationError(f"'{key}' is a {_layout_name(tensor.quant_layout)} weight, which ComfyUI's "
                                    "safetensors layout cannot hold")
        layer = prefix + key[: -len("weight")]
        conf = json.dumps(tensor.quant_layout.comfy_quant()).encode("utf-8")
        out |= {layer + "weight": tensor.qdata, layer + "weight_scale": tensor.scale,
                layer + "comfy_quant": torch.tensor(list(conf), dtype=torch.uint8)}
        if tensor.input_scale is not None:
            out[layer + "input_scale"] = tensor.input_scale
    return out
