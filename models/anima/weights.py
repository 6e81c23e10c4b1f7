"""Reading checkpoints (safetensors, GGUF) and loading them strictly into modules built on the meta device.

Files are memory-mapped copy-on-write and each tensor is a zero-copy view of the mapping, so opening a
4 GB checkpoint costs no RAM until a tensor is touched, and loading it in its own dtype on the CPU keeps
peak RAM near the file size (no second copy). Quantized layers (`quant.py`, `gguf_file.py`) arrive as one
QuantizedWeight per layer and stay quantized in the module. Every user-facing failure is a `WeightsError`
whose message names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

from .gguf_file import GGUFError, read_gguf
from .quant import QuantizationError, QuantizedWeight, pack_quantized, wrap_fp8_cast

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# A key suffix that only this kind of checkpoint has, and how to name the kind to a user.
_KIND_SIGNATURES = {
    "anima_dit": ("llm_adapter.blocks.0.cross_attn.q_proj.weight", "an Anima DiT checkpoint"),
    "cosmos_dit": ("blocks.0.mlp.layer1.weight", "a Cosmos-Predict2 DiT without Anima's LLM adapter"),
    "diffusers_dit": ("transformer_blocks.0.attn1.to_q.weight", "a diffusers-format transformer"),
    "wan_vae": ("decoder.middle.0.residual.0.gamma", "a Wan 2.1 / Qwen-Image VAE"),
    "qwen3_text_encoder": ("layers.0.self_attn.q_norm.weight", "a Qwen3 text encoder"),
    "lora": (None, "a LoRA"),
}
_LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1")


class WeightsError(ValueError):
    """A problem with a weight file, worded for the user; show the message as is."""


def source_name(source: object) -> str:
    """How to name a weights source in a message: its path, or "the given state dict"."""
    return str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"


def open_state_dict(source: str | os.PathLike | Mapping[str, Tensor], *, what: str) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` or `.gguf` file as zero-copy CPU views of a private memory map, or
    `source` itself when it is already a mapping. Quantized layers in any layout `quant.py` and
    `gguf_file.py` read become one QuantizedWeight under `<layer>.weight`. `what` names the expected content
    in error messages ("Anima DiT")."""
    if isinstance(source, Mapping):
        sd, metadata = dict(source), {}
    else:
        path = Path(source)
        if not path.is_file():
            raise WeightsError(f"{what} weights not found: '{path}' does not exist.")
        if path.suffix.lower() == ".gguf":
            try:
                return read_gguf(path)[0]
            except GGUFError as error:
                raise WeightsError(str(error)) from None
        sd, metadata = _open_safetensors(path, what)
    try:
        return pack_quantized(sd, metadata)
    except QuantizationError as error:
        raise WeightsError(f"{source_name(source)}: the quantized {what} weights are unusable: {error}.") from None


def _open_safetensors(path: Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = _read_header(f, size, path, what)
        if size == 0:
            return {}, {}
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + int.from_bytes(mapping[:8], "little")
    tensors = {}
    for name, entry in header.items():
        dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        count = end - begin
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype, device="cpu")
            continue
        flat = torch.frombuffer(mapping, dtype=dtype, count=count // dtype.itemsize, offset=data_start + begin)
        tensors[name] = flat.view(shape)
    return tensors, metadata


def _read_header(f, size: int, path: Path, what: str) -> dict:
    not_safetensors = WeightsError(f"'{path}' is not a safetensors file, so it cannot hold the {what} weights.")
    head = f.read(8)
    if len(head) < 8:
        raise not_safetensors
    header_len = int.from_bytes(head, "little")
    if header_len > _MAX_HEADER_BYTES:
        raise not_safetensors
    if 8 + header_len > size:
        raise WeightsError(f"'{path}' is truncated or corrupt (its header runs past the end of the file); "
                           "delete it and download it again.")
    try:
        header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise not_safetensors
    data_size = size - 8 - header_len
    for name, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"'{path}' is corrupt: the entry for tensor '{name}' is malformed.") from None
        if end > data_size:
            raise WeightsError(f"'{path}' is truncated ({size} bytes; tensor '{name}' needs data up to byte "
                               f"{8 + header_len + end}); delete it and download it again.")
        if end - begin != numel * dtype.itemsize or begin > end:
            raise WeightsError(f"'{path}' is corrupt: tensor '{name}' has the wrong number of bytes.")
    if metadata is not None:
        header["__metadata__"] = metadata
    return header


def strip_prefix(sd: Mapping[str, Tensor], prefixes: Sequence[str]) -> dict[str, Tensor]:
    """Remove the first of `prefixes` that some key starts with, from every key that has it."""
    for prefix in prefixes:
        if prefix and any(k.startswith(prefix) for k in sd):
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return dict(sd)


def required_shape(sd: Mapping[str, Tensor], key: str, *, what: str) -> tuple[int, ...]:
    """Shape of `sd[key]`, a tensor a loader reads the architecture from; a WeightsError when it is absent."""
    if key not in sd:
        raise WeightsError(f"The {what} weights lack '{key}', which is needed to tell the model's size; "
                           f"the file is incomplete or not a {what}.")
    return tuple(sd[key].shape)


def checkpoint_kind(keys: Iterable[str]) -> str | None:
    """What a state dict holds, from signature keys under any prefix: one of the keys of
    `_KIND_SIGNATURES` ("anima_dit", "wan_vae", "qwen3_text_encoder", ...) or None."""
    keys = list(keys)
    for kind, (suffix, _) in _KIND_SIGNATURES.items():
        if suffix and any(k.endswith(suffix) for k in keys):
            return kind
    if any(marker in k for k in keys for marker in _LORA_MARKERS):
        return "lora"
    return None


def require_kind(sd: Mapping[str, Tensor], kind: str, *, what: str, source: object) -> None:
    """Raise a WeightsError when `sd` is recognisably some other kind of checkpoint than `kind`."""
    found = checkpoint_kind(sd)
    if found == kind:
        return
    if not sd:
        raise WeightsError(f"{source_name(source)} holds no tensors, so it is not the {what} checkpoint.")
    described = _KIND_SIGNATURES[found][1] if found else "not a checkpoint this app recognises"
    raise WeightsError(f"{source_name(source)} is {described}, not the {what} checkpoint. "
                       f"Check which file you gave for the {what}.")


def load_module_strict(module: nn.Module, sd: Mapping[str, Tensor], *, dtype: torch.dtype,
                       device: torch.device | str, what: str) -> nn.Module:
    """Assign `sd` to `module` (built on the meta device) after checking it matches key for key and
    shape for shape. Floating tensors are cast to `dtype`; views of the file are kept when nothing
    needs converting; quantized weights stay quantized (they compute in `dtype`). Returns the module in
    eval mode without gradients."""
    check_layout(sd, {k: tuple(t.shape) for k, t in module.state_dict().items()},
                 f"The {what} weights do not match the model")
    sd = _place_quantized(module, sd, what)
    converted = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for k, t in sd.items()}
    module.load_state_dict(converted, strict=True, assign=True)
    still_meta = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"{what}: these tensors were not initialised by loading: {still_meta[:5]}")
    return module.requires_grad_(False).eval()


def _place_quantized(module: nn.Module, sd: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """Check that quantized tensors are Linear or Embedding weights (which dequantize per call); the rest of
    a model (norms, biases...) must be in full precision. A plain fp8 Linear weight (a file cast to fp8
    without scales) is kept in fp8 too."""
    out = dict(sd)
    expected = module.state_dict()
    for key, tensor in sd.items():
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise WeightsError(f"The {what} weights have '{key}' as {tensor.dtype} with no scale or quantization "
                               "config; the file is incomplete or in a layout this app does not know.")
        module_name, _, param = key.rpartition(".")
        target = module.get_submodule(module_name)
        is_weight = param == "weight" and isinstance(target, (nn.Linear, nn.Embedding))
        if isinstance(tensor, QuantizedWeight) and not is_weight:
            raise WeightsError(f"The {what} weights have '{key}' quantized, but this tensor must be in full "
                               "precision; the file was quantized wrongly. Use another file.")
        if is_weight and isinstance(target, nn.Linear) and tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            out[key] = wrap_fp8_cast(tensor)
    return out


def save_state_dict(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` as a safetensors file, one tensor at a time (no second copy of the model in RAM),
    into a temporary file renamed over `path` at the end, so an interrupted write leaves nothing behind."""
    codes = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": codes[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
            for tensor in tensors.values():
                if tensor.numel():
                    f.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def check_layout(sd: Mapping[str, Tensor], layout: Mapping[str, tuple[int, ...]], context: str) -> None:
    """Raise one WeightsError, "<context>: 1 missing key(s): ...; ...", when the keys or shapes of `sd`
    differ from `layout` (key -> expected shape); the first five of each kind are named."""
    missing = sorted(set(layout) - set(sd))
    unexpected = sorted(set(sd) - set(layout))
    wrong_shapes = [f"{k} {tuple(sd[k].shape)} (expected {tuple(layout[k])})"
                    for k in layout if k in sd and tuple(sd[k].shape) != tuple(layout[k])]
    parts = []
    for label, items in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                         ("key(s) with the wrong shape", wrong_shapes)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    if parts:
        raise WeightsError(f"{context}: " + "; ".join(parts) + ".")
