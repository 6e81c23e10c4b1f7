"""Small random-weight Wan 2.1 / Qwen-Image VAE checkpoints in the real file format.

The key names, tensor ranks (5-D CausalConv3d kernels, 4-D Conv2d kernels inside Resample and attention,
gammas shaped (C,1,1,1) / (C,1,1)) and the bf16 file dtype are those of `qwen_image_vae.safetensors`;
only the base width shrinks. dim_mult [1,2,4,4] and 2 residual blocks stay, because diffusers'
`convert_wan_vae_to_diffusers` hard-codes that layout.

Weights are scaled so activations stay O(1): conv kernels uniform with variance gain^2 / fan_in over
the spatial taps, gammas near 1 (not exactly 1, so a dropped gamma shows in parity tests), small
biases. The decoder's output conv is scaled down so its output stays inside the [-1, 1] clamp.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

Z_DIM = 16
DIM_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
TEMPORAL_DOWNSAMPLE = (False, True, True)
OUTPUT_CONV_GAIN = 0.3


def _conv3d(shapes: dict, name: str, cin: int, cout: int, k: int) -> None:
    shapes[f"{name}.weight"] = (cout, cin, k, k, k)
    shapes[f"{name}.bias"] = (cout,)


def _residual(shapes: dict, name: str, cin: int, cout: int) -> None:
    shapes[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
    _conv3d(shapes, f"{name}.residual.2", cin, cout, 3)
    shapes[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
    _conv3d(shapes, f"{name}.residual.6", cout, cout, 3)
    if cin != cout:
        _conv3d(shapes, f"{name}.shortcut", cin, cout, 1)


def _middle(shapes: dict, name: str, dim: int) -> None:
    _residual(shapes, f"{name}.0", dim, dim)
    shapes |= {
        f"{name}.1.norm.gamma": (dim, 1, 1),
        f"{name}.1.to_qkv.weight": (3 * dim, dim, 1, 1),
        f"{name}.1.to_qkv.bias": (3 * dim,),
        f"{name}.1.proj.weight": (dim, dim, 1, 1),
        f"{name}.1.proj.bias": (dim,),
    }
    _residual(shapes, f"{name}.2", dim, dim)


def _resample(shapes: dict, name: str, dim: int, *, up: bool, temporal: bool) -> None:
    out = dim // 2 if up else dim
    shapes[f"{name}.resample.1.weight"] = (out, dim, 3, 3)
    shapes[f"{name}.resample.1.bias"] = (out,)
    if temporal:
        time_out = 2 * dim if up else dim
        shapes[f"{name}.time_conv.weight"] = (time_out, dim, 3, 1, 1)
        shapes[f"{name}.time_conv.bias"] = (time_out,)


def vae_file_shapes(base_dim: int = 96) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original Wan 2.1 VAE checkpoint with base width `base_dim` (96 is the real file)."""
    shapes: dict[str, tuple[int, ...]] = {}
    dims = [base_dim * m for m in (1, *DIM_MULT)]
    _conv3d(shapes, "encoder.conv1", 3, dims[0], 3)
    index = 0
    for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(NUM_RES_BLOCKS):
            _residual(shapes, f"encoder.downsamples.{index}", cin, cout)
            cin, index = cout, index + 1
        if stage < len(DIM_MULT) - 1:
            _resample(shapes, f"encoder.downsamples.{index}", cout, up=False, temporal=TEMPORAL_DOWNSAMPLE[stage])
            index += 1
    _middle(shapes, "encoder.middle", dims[-1])
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    _conv3d(shapes, "encoder.head.2", dims[-1], 2 * Z_DIM, 3)
    _conv3d(shapes, "conv1", 2 * Z_DIM, 2 * Z_DIM, 1)
    _conv3d(shapes, "conv2", Z_DIM, Z_DIM, 1)

    dims = [base_dim * m for m in (DIM_MULT[-1], *reversed(DIM_MULT))]
    _conv3d(shapes, "decoder.conv1", Z_DIM, dims[0], 3)
    _middle(shapes, "decoder.middle", dims[0])
    index = 0
    temporal_upsample = TEMPORAL_DOWNSAMPLE[::-1]
    for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if stage > 0 else cin
        for _ in range(NUM_RES_BLOCKS + 1):
            _residual(shapes, f"decoder.upsamples.{index}", cin, cout)
            cin, index = cout, index + 1
        if stage < len(DIM_MULT) - 1:
            _resample(shapes, f"decoder.upsamples.{index}", cout, up=True, temporal=temporal_upsample[stage])
            index += 1
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    _conv3d(shapes, "decoder.head.2", dims[-1], 3, 3)
    return shapes


def _uniform(shape: tuple[int, ...], std: float, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    # uniform with the given std, drawn straight in the file dtype: ~3x faster than randn + cast, which
    # matters for the real-width (127M parameter) file
    bound = std * 3**0.5
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator)


def _random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    if key.endswith("gamma"):
        return _uniform(shape, 0.1, dtype, generator).add_(1.0)
    if key.endswith("bias"):
        return _uniform(shape, 0.02, dtype, generator)
    spatial_taps = shape[-1] * shape[-2]  # a single frame only meets the last temporal tap
    gain = OUTPUT_CONV_GAIN if key == "decoder.head.2.weight" else 1.0
    return _uniform(shape, gain / (shape[1] * spatial_taps) ** 0.5, dtype, generator)


def make_vae_state_dict(*, seed: int = 0, dtype: torch.dtype = torch.bfloat16, base_dim: int = 8) -> dict[str, Tensor]:
    """Random weights under the real key names and ranks, in `dtype` (the real file is bf16)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: _random_tensor(k, s, dtype, generator) for k, s in vae_file_shapes(base_dim).items()}


def write_vae_file(path: str | Path, **kw) -> Path:
    """Write `make_vae_state_dict(**kw)` as a safetensors file and return its path."""
    path = Path(path)
    save_file(make_vae_state_dict(**kw), str(path))
    return path
