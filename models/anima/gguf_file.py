"""GGUF checkpoints: read memory-mapped with the `gguf` package, GGML blocks decoded in torch.

The DiT files come from city96's ComfyUI-GGUF converter (and stable-diffusion.cpp): the checkpoint's own
tensor names with the root prefix stripped, 1-D and small tensors in F32, the rest F16/BF16 or quantized
(checkpoints.md §3.3). Text encoders come from llama.cpp with its names (`blk.N.attn_q.weight`...), which
`llama_cpp_to_qwen3` maps to the Qwen3 names. Quantized tensors stay as raw blocks in a QuantizedWeight
and are decoded per layer in the forward by the functions below, on whatever device the blocks are; they
reproduce `gguf.quants.dequantize` (tests prove it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .quant import GGUFLayout, QuantizationError, QuantizedWeight

QK_K = 256  # values per K-quant super-block
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


def _f16(blocks: Tensor, start: int) -> Tensor:  # [n, 1] fp32 from the fp16 at byte `start` of each block
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: Tensor) -> Tensor:
    """[n, k, 32] bytes -> [n, 2k, 32]: the low nibbles of each 32-byte chunk, then its high nibbles."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=2).flatten(1, 2)


def _bits(packed: Tensor, shifts: tuple[int, ...], mask: int) -> Tensor:
    """[n, k, 32] -> [n, k * len(shifts), 32]: for every chunk, (byte >> s) & mask for each shift s."""
    shift = torch.tensor(shifts, dtype=torch.int32, device=packed.device).reshape(1, 1, -1, 1)
    return ((packed.int().unsqueeze(2) >> shift) & mask).flatten(1, 2)


def _q8_0(blocks: Tensor) -> Tensor:  # d, 32 x int8
    return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(blocks: Tensor) -> Tensor:  # d, 16 bytes of 4-bit codes (offset 8)
    q = _nibbles(blocks[:, 2:].reshape(-1, 1, 16)).reshape(-1, 32)
    return _f16(blocks, 0) * (q.float() - 8)


def _q5_0(blocks: Tensor) -> Tensor:  # d, 32 high bits (LE uint32), 16 bytes of low nibbles (offset 16)
    high = _bits(blocks[:, 2:6].reshape(-1, 4, 1), tuple(range(8)), 1).reshape(-1, 32)
    low = _nibbles(blocks[:, 6:].reshape(-1, 1, 16)).reshape(-1, 32)
    return _f16(blocks, 0) * ((low.int() | high << 4).float() - 16)


def _k_scales_mins(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block, from its 12 packed bytes. [n, 8] each."""
    p = packed.int()
    d, m, md = p[:, 0:4], p[:, 4:8], p[:, 8:12]
    scales = torch.cat((d & 63, (md & 15) | ((d >> 2) & 48)), dim=1)
    mins = torch.cat((m & 63, (md >> 4) | ((m >> 2) & 48)), dim=1)
    return scales.float(), mins.float()


def _q4_k(blocks: Tensor) -> Tensor:  # d, dmin, 12 scale bytes, 128 bytes of codes: 8 sub-blocks of 32
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).float()  # [n, 8, 32]
    values = _f16(blocks, 0)[..., None] * scales[..., None] * q - _f16(blocks, 2)[..., None] * mins[..., None]
    return values.reshape(-1, QK_K)


def _q5_k(blocks: Tensor) -> Tensor:  # d, dmin, 12 scale bytes, 32 high-bit bytes, 128 bytes of nibbles
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    high = _bits(blocks[:, 16:48].reshape(-1, 1, 32), tuple(range(8)), 1)  # [n, 8, 32]
    q = (_nibbles(blocks[:, 48:].reshape(-1, 4, 32)).int() | high << 4).float()
    values = _f16(blocks, 0)[..., None] * scales[..., None] * q - _f16(blocks, 2)[..., None] * mins[..., None]
    return values.reshape(-1, QK_K)


def _q6_k(blocks: Tensor) -> Tensor:  # 128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, d
    low = _nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = _bits(blocks[:, 128:192].reshape(-1, 2, 32), (0, 2, 4, 6), 3)  # [n, 8, 32]
    q = ((low.int() | high << 4) - 32).float().reshape(-1, 16, 16)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    return (_f16(blocks, 208)[..., None] * scales[..., None] * q).reshape(-1, QK_K)


def _q3_k(blocks: Tensor) -> Tensor:  # 32 high-bit bytes, 64 bytes of 2-bit codes, 12 scale bytes, d
    packed = blocks[:, 96:108].int()
    low = torch.stack((packed[:, :8] & 15, packed[:, :8] >> 4), dim=1).flatten(1)  # [n, 16]
    high = torch.stack([(packed[:, 8:12] >> s) & 3 for s in (0, 2, 4, 6)], dim=1).flatten(1)  # [n, 16]
    scales = ((low | high << 4) - 32).float()
    codes = _bits(blocks[:, 32:96].reshape(-1, 2, 32), (0, 2, 4, 6), 3).reshape(-1, 16, 16)
    missing_high = 1 - _bits(blocks[:, :32].reshape(-1, 1, 32), tuple(range(8)), 1).reshape(-1, 16, 16)
    q = (codes - (missing_high << 2)).float()  # the high bit *clear* subtracts 4
    return (_f16(blocks, 108)[..., None] * scales[..., None] * q).reshape(-1, QK_K)


# type name -> (values per block, bytes per block, decoder of [n, bytes] uint8 blocks to [n, values] fp32)
BLOCK_TYPES: dict[str, tuple[int, int, Callable[[Tensor], Tensor]]] = {
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q5_0": (32, 22, _q5_0),
    "Q3_K": (QK_K, 110, _q3_k),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}
PLAIN_TYPES = ("F32", "F16", "BF16")


def dequantize_blocks(type_name: str, data: Tensor) -> Tensor:
    """uint8 [..., bytes per row] raw GGML rows -> fp32 [..., values per row]."""
    block_values, block_bytes, decode = BLOCK_TYPES[type_name]
    rows = data.reshape(-1, data.shape[-1])
    values = decode(rows.reshape(-1, block_bytes))
    return values.reshape(*data.shape[:-1], data.shape[-1] // block_bytes * block_values)


_LAYOUTS = {name: GGUFLayout(name, lambda rows, name=name: dequantize_blocks(name, rows)) for name in BLOCK_TYPES}


class GGUFError(ValueError):
    """A GGUF file that cannot be read; worded for the user (the loaders add nothing)."""


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, object]]:
    """(tensors, metadata) of a GGUF file, tensors in torch order ([out, in]) as zero-copy views of a
    copy-on-write memory map: F32/F16/BF16 as plain tensors, block types as QuantizedWeight. Metadata holds
    the string and integer-array fields (e.g. `general.architecture`, `comfy.gguf.orig_shape.*`)."""
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"Reading '{path}' needs the 'gguf' package: pip install gguf") from None
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path, mode="c")
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise GGUFError(f"'{path}' is truncated or not a GGUF file ({error}); delete it and download it "
                        "again.") from None
    if reader.byte_order != "I":
        raise GGUFError(f"'{path}' is a big-endian GGUF file, which this app cannot read.")
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    file_size = path.stat().st_size
    tensors = {}
    for info in reader.tensors:
        type_name = info.tensor_type.name
        shape = [int(n) for n in reversed(info.shape.tolist())]
        if int(info.data_offset) + int(info.n_bytes) > file_size:
            raise GGUFError(f"'{path}' is truncated (tensor '{info.name}' runs past the end of the file); "
                            "delete it and download it again.")
        orig = metadata.get(ORIG_SHAPE_KEY + info.name)
        tensors[info.name] = _to_torch(torch.from_numpy(info.data), type_name, shape, path, info.name, orig)
    return tensors, metadata


def _to_torch(data: Tensor, type_name: str, shape: list[int], path: Path, name: str, orig) -> Tensor:
    if type_name in ("F32", "F16"):
        tensor = data.reshape(shape)
    elif type_name == "BF16":
        tensor = data.contiguous().view(torch.bfloat16).reshape(shape)
    elif type_name in BLOCK_TYPES and len(shape) == 2 and not (orig and list(orig) != shape):
        return QuantizedWeight(data.reshape(shape[0], -1), None, _LAYOUTS[type_name], tuple(shape))
    elif type_name in BLOCK_TYPES:
        raise GGUFError(f"'{path}': tensor '{name}' is a {type_name} tensor of shape {orig or shape}; only 2-D "
                        "weights stored in their own shape can be quantized here.")
    else:
        supported = ", ".join((*PLAIN_TYPES, *BLOCK_TYPES))
        raise GGUFError(f"'{path}': tensor '{name}' is stored as GGML type {type_name}, which this app cannot "
                        f"read (supported: {supported}).")
    return tensor.reshape(orig) if orig else tensor


def _field_value(field) -> object:
    """A metadata field as a str, an int, or a list of ints; other kinds as None (unused here)."""
    import gguf

    kinds = field.types
    if kinds == [gguf.GGUFValueType.STRING]:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    if kinds and kinds[0] == gguf.GGUFValueType.ARRAY and len(kinds) == 2 and kinds[1] != gguf.GGUFValueType.STRING:
        return [int(field.parts[i][0]) for i in field.data]
    if len(kinds) == 1 and kinds[0] != gguf.GGUFValueType.ARRAY:
        value = field.parts[field.data[0]][0]
        return value.item() if hasattr(value, "item") else value
    return None


# ---------------------------------------------------------------------------------------------------
# llama.cpp names of a Qwen3 text encoder
# ---------------------------------------------------------------------------------------------------

_LLAMA_CPP_QWEN3 = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_KEY = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def has_llama_cpp_names(keys) -> bool:
    keys = set(keys)
    return "token_embd.weight" in keys and any(k.startswith("blk.") for k in keys)


def llama_cpp_to_qwen3(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """llama.cpp tensor names -> Hugging Face Qwen3Model names (without `model.`). `output.weight` (an untied
    LM head, unused by an encoder) is dropped; a name it does not know is a QuantizationError. llama.cpp
    stores Qwen2/Qwen3 q/k projections unpermuted (NEOX rope), so only the names change."""
    out = {}
    for key, tensor in sd.items():
        if key == "output.weight":
            continue
        if key == "token_embd.weight":
            out["embed_tokens.weight"] = tensor
        elif key == "output_norm.weight":
            out["norm.weight"] = tensor
        elif (m := _BLOCK_KEY.fullmatch(key)) and m.group(2) in _LLAMA_CPP_QWEN3:
            out[f"layers.{m.group(1)}.{_LLAMA_CPP_QWEN3[m.group(2)]}.{m.group(3)}"] = tensor
        else:
            raise QuantizationError(f"'{key}' is not a tensor of a llama.cpp Qwen3 model")
    return out
