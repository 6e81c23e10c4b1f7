"""The Wan 2.1 causal 3-D VAE (`qwen_image_vae.safetensors`), specialised for single images.

Anima decodes one frame at a time, and for one frame the video machinery collapses:
* a CausalConv3d pads 2*p_t zero frames in front, so only its kernel's last temporal tap meets data and
  it is exactly a 2-D conv with that tap (`CausalConv`);
* every `time_conv` acts only on frames after the first, so it never runs;
* no temporal feature caches are needed.
Each layer therefore costs one 2-D conv instead of a 3-tap 3-D conv over a padded 3-frame tensor.

Weights load from the original key layout (`encoder.downsamples.N.residual.K...`, 5-D kernels,
`conv1`/`conv2` quant convs). The whole file layout is checked first; then each 5-D kernel is cut to its
last tap (only that slice is copied) and the unused `time_conv` tensors are dropped. The base width comes
from `decoder.head.0.gamma`.

`decode` takes normalised (DiT-space) latents and `encode` returns them: the Wan 2.1 per-channel
mean/std live here. Large images are processed in overlapping tiles blended with linear ramps, chosen
from the free memory of the device or by `tile_size`.

Reference semantics: ComfyUI `comfy/ldm/wan/vae.py`, `comfy/latent_formats.py` (Wan21); spec
anima_reference.md §6.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psutil
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.attention import pay_attention

from .weights import (WeightsError, check_layout, load_module_strict, open_state_dict, require_kind, source_name,
                      strip_prefix)

WHAT = "Wan 2.1 VAE"
CHECKPOINT_PREFIXES = ("vae.", "first_stage_model.")
WAN22_SIGNATURE = "decoder.upsamples.0.upsamples.0.residual.2.weight"  # how ComfyUI tells Wan 2.2 VAEs apart
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
SCALE = 8  # pixels per latent along each axis
NORM_EPS = 1e-12  # F.normalize's default, as in Wan's RMS_norm
MIN_TILE_LATENTS = 8
# Activations are channels-last: oneDNN and cuDNN convolve it without layout reorders, and the per-pixel
# channel norm reads contiguous memory (on CPU ~15% faster end to end than NCHW). The weights stay plain
# contiguous tensors (stride(-1) == 1), which mmgp needs to pin them (`view(torch.uint8)`); channels-last
# kernels gained nothing measurable on top of channels-last activations.
MEMORY_FORMAT = torch.channels_last
BAND_ELEMENTS = 1 << 23  # per band of rows in `banded_conv` (32 MB in fp32)
# Peak activation bytes of one decode or encode, per pixel, per base channel, per byte of dtype. Measured
# 2.4 for a 1024x1024 fp32 decode on CPU (two full-resolution tensors in a residual block, plus row
# bands); 4 leaves room for allocator slack, which weighs more on small images.
PEAK_BYTES_PER_PIXEL_CHANNEL = 4.0
MEMORY_BUDGET_FRACTION = 0.5  # of the device's free memory, leaving room for allocator slack


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> VAEConfig:
        """Only the base width varies between Wan 2.1 VAE files; the layout check catches the rest."""
        return cls(base_dim=sd["decoder.head.0.gamma"].shape[0])


# Modules whose parameters differ from the file's tensors define `file_shapes()` (the file's shapes of
# those parameters, or of file tensors they drop) and `from_file(name, tensor)` (file tensor -> parameter).


class CausalConv(nn.Conv2d):
    """Wan's CausalConv3d applied to one frame: the 2-D conv with the last temporal tap of its kernel.
    The file stores the 5-D kernel [out, in, k, k, k]."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int) -> None:
        super().__init__(in_dim, out_dim, kernel, padding=kernel // 2)

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        out_dim, in_dim, k, _ = self.weight.shape
        return {"weight": (out_dim, in_dim, k, k, k)}

    def from_file(self, name: str, tensor: Tensor) -> Tensor:
        return tensor[:, :, -1] if name == "weight" else tensor


class RMSNorm(nn.Module):
    """x / max(||x||_channels, eps) * sqrt(C) * gamma. `gamma` holds sqrt(C) * the file's gamma, whose
    shape is (C,1,1,1) in residual blocks and heads and (C,1,1) in attention (`file_ndim`)."""

    def __init__(self, dim: int, file_ndim: int = 4) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim, 1, 1))
        self.file_ndim = file_ndim

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"gamma": (self.gamma.shape[0],) + (1,) * (self.file_ndim - 1)}

    def from_file(self, name: str, tensor: Tensor) -> Tensor:
        return tensor.float().reshape(self.gamma.shape) * self.gamma.shape[0] ** 0.5

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        # the norm in fp32 even for bf16 activations, as Wan does
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)  # [B, 1, H, W]
        inv = norm.clamp_min_(NORM_EPS).reciprocal_().to(x.dtype)
        x = x.mul_(inv) if inplace else x * inv
        return x.mul_(self.gamma)


def banded_conv(conv: nn.Conv2d, x: Tensor, prologue: Callable[[Tensor], Tensor] | None = None,
                accumulate_into: Tensor | None = None) -> Tensor:
    """conv(prologue(x)), or `accumulate_into += conv(x)`, for a 3x3 conv with padding 1, computed in bands
    of rows (each read with a one-row halo) so that prologue(x) and the conv's own output exist only one
    band at a time. `prologue` must act on each pixel alone (norms, activations)."""
    n, channels, height, width = x.shape
    rows = max(1, BAND_ELEMENTS // (width * max(channels, conv.out_channels)))
    if rows >= height and accumulate_into is None:
        return conv(x if prologue is None else prologue(x))
    out = accumulate_into
    if out is None:
        out = torch.empty(n, conv.out_channels, height, width, dtype=x.dtype, device=x.device,
                          memory_format=MEMORY_FORMAT)
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        top, bottom = max(r0 - 1, 0), min(r1 + 1, height)
        band = x[:, :, top:bottom]
        # rows computed against the band's own zero padding (first/last, inside the image) are dropped
        y = conv(band if prologue is None else prologue(band))[:, :, r0 - top:r1 - top]
        if accumulate_into is None:
            out[:, :, r0:r1] = y
        else:
            out[:, :, r0:r1] += y
    return out


class ResidualBlock(nn.Module):
    """norm, SiLU, conv 3x3, norm, SiLU, conv 3x3, plus the (1x1 conv) shortcut. The ModuleDict keys are
    the checkpoint's `residual.K` indices (1, 4, 5 are SiLU and dropout, which hold no weights).

    `forward` consumes its input: without a shortcut conv the result is accumulated into x itself, so
    a block holds two activation-sized tensors (x and the hidden h) plus one band of rows."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.ModuleDict({
            "0": RMSNorm(in_dim), "2": CausalConv(in_dim, out_dim, 3),
            "3": RMSNorm(out_dim), "6": CausalConv(out_dim, out_dim, 3),
        })
        self.shortcut = CausalConv(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: Tensor) -> Tensor:
        norm1, conv1, norm2, conv2 = (self.residual[k] for k in "0236")
        h = banded_conv(conv1, x, prologue=lambda band: F.silu(norm1(band), inplace=True))
        h = F.silu(norm2(h, inplace=True), inplace=True)
        return banded_conv(conv2, h, accumulate_into=x if self.shortcut is None else self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions (the middle of encoder and decoder)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, file_ndim=3)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, 3C]
        q, k, v = (t.unsqueeze(2) for t in qkv.chunk(3, dim=-1))  # [B, HW, 1, C]
        del qkv
        qkv_list = [q, k, v]
        del q, k, v
        # the head dim is 4 * base_dim (384), beyond what flash/sage kernels take
        out = pay_attention(qkv_list, force_attention="sdpa")  # [B, HW, 1, C]
        out = out.reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)
        return self.proj(out).add_(x)


def _time_conv_shapes(in_dim: int, out_dim: int | None) -> dict[str, tuple[int, ...]]:
    """The file tensors of a down3d/up3d `time_conv`. It only mixes frames after the first, so it is
    checked in the file but not loaded."""
    if out_dim is None:
        return {}
    return {"time_conv.weight": (out_dim, in_dim, 3, 1, 1), "time_conv.bias": (out_dim,)}


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a 3x3 stride-2 conv (`resample.1`; `resample.0` is the pad)."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, dim, 3, stride=2)})
        self.time_conv_out = dim if temporal else None

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        return _time_conv_shapes(self.resample["1"].in_channels, self.time_conv_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.resample["1"](F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv halving the channels (`resample.1`, an `UpsampleConv`)."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.ModuleDict({"1": UpsampleConv(dim, dim // 2)})
        self.time_conv_out = 2 * dim if temporal else None

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        return _time_conv_shapes(self.resample["1"].in_dim, self.time_conv_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.resample["1"](x)


class UpsampleConv(nn.Module):
    """conv2d(nearest_upsample_2x(x), kernel_3x3, bias, padding=1) without building the upsampled tensor.

    Output row 2i reads input rows (i-1, i, i) and row 2i+1 reads (i, i, i+1) (columns alike), so each of
    the four output phases is a 2x2 conv of x whose taps are sums of the 3x3 kernel's taps: 16 instead
    of 36 multiply-adds per input pixel and channel pair. `weight` holds the four phase kernels
    [4 * out, in, 2, 2] (phase 2a + c for output rows 2i+a, columns 2j+c); the file holds the 3x3 kernel."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(4 * out_dim, in_dim, 2, 2))
        self.bias = nn.Parameter(torch.empty(out_dim))

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.out_dim, self.in_dim, 3, 3)}

    def from_file(self, name: str, tensor: Tensor) -> Tensor:
        return phase_kernels(tensor) if name == "weight" else tensor

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        out = torch.empty(b, self.out_dim, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=MEMORY_FORMAT)
        for phase, kernel in enumerate(self.weight.chunk(4)):
            a, c = divmod(phase, 2)
            # padding 1 on a 2x2 kernel gives (h+1, w+1) outputs; phase (a, c) starts at row a, column c
            y = F.conv2d(x, kernel, self.bias, padding=1)
            out[:, :, a::2, c::2] = y[:, :, a:a + h, c:c + w]
            del y
        return out


# _TAP_FOLD[a, p, k] = 1 when tap k of a 3x3 kernel lands on low-resolution position p for output phase a
_TAP_FOLD = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def phase_kernels(weight: Tensor) -> Tensor:
    """The 3x3 kernel [out, in, 3, 3] of an upsampling conv as `UpsampleConv`'s phase kernels
    [4 * out, in, 2, 2], summed in fp32."""
    fold = torch.tensor(_TAP_FOLD, dtype=torch.float32, device=weight.device)  # [phase, position, tap]
    kernels = torch.einsum("apk,cql,oikl->acoipq", fold, fold, weight.float())  # [2, 2, out, in, 2, 2]
    return kernels.reshape(4 * weight.shape[0], weight.shape[1], 2, 2)


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(in_dim: int, out_dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({"0": RMSNorm(in_dim), "2": CausalConv(in_dim, out_dim, 3)})


def _run_head(head: nn.ModuleDict, x: Tensor) -> Tensor:
    return head["2"](F.silu(head["0"](x, inplace=True), inplace=True))


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> [B, 2*z_dim, H/8, W/8] (mean and log-variance, before the quant conv)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv(3, dims[0], 3)
        layers: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(cfg.dim_mult) - 1:
                layers.append(Downsample(out_dim, cfg.temporal_downsample[stage]))
        self.downsamples = nn.ModuleList(layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x)
        return _run_head(self.head, x)


class Decoder(nn.Module):
    """Latent [B, z_dim, h, w] (after the post-quant conv) -> image [B, 3, 8h, 8w], unclamped."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv(cfg.z_dim, dims[0], 3)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            in_dim = in_dim // 2 if stage > 0 else in_dim  # each Upsample halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(cfg.dim_mult) - 1:
                layers.append(Upsample(out_dim, temporal_upsample[stage]))
        self.upsamples = nn.ModuleList(layers)
        self.head = _head(dims[-1], 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv1(z)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x)
        return _run_head(self.head, x)


class WanImageVAE(nn.Module):
    """`encode`: images [B,3,H,W] in [-1,1] -> normalised latents [B,16,H/8,W/8] (posterior mean).
    `decode`: normalised latents [B,16,h,w] or [B,16,1,h,w] -> images [B,3,8h,8w] in [-1,1].
    Both compute in the VAE's dtype and return it; batch items run one after another."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = CausalConv(2 * config.z_dim, 2 * config.z_dim, 1)  # quant conv
        self.conv2 = CausalConv(config.z_dim, config.z_dim, 1)  # post-quant conv
        self.decoder = Decoder(config)

    @torch.inference_mode()
    def decode(self, latents: Tensor, tile_size: int | None = None) -> Tensor:
        z = self._check_latents(latents)
        weight = self.conv2.weight
        mean, std = _latent_stats(weight.device)
        z = (z.to(weight.device, torch.float32) * std + mean).to(weight.dtype, memory_format=MEMORY_FORMAT)
        tile = self._tile_latents(z.shape[-2] * SCALE, z.shape[-1] * SCALE, tile_size)
        images = [_tiled(self._decode_one, one, tile, 1, SCALE) for one in z.split(1)]
        return (images[0] if len(images) == 1 else torch.cat(images)).contiguous()

    @torch.inference_mode()
    def encode(self, images: Tensor, tile_size: int | None = None) -> Tensor:
        x = self._check_images(images)
        weight = self.conv1.weight
        x = x.to(weight.device, weight.dtype, memory_format=MEMORY_FORMAT)
        tile = self._tile_latents(x.shape[-2], x.shape[-1], tile_size)
        mu = torch.cat([_tiled(self._encode_one, one, tile, SCALE, 1) for one in x.split(1)])
        mean, std = _latent_stats(weight.device)
        return ((mu.float() - mean) / std).to(weight.dtype).contiguous()

    def _decode_one(self, z: Tensor) -> Tensor:
        return self.decoder(self.conv2(z)).clamp_(-1.0, 1.0)

    def _encode_one(self, x: Tensor) -> Tensor:
        # only the mean half of the quant conv's output is used, so only it is computed
        z = self.config.z_dim
        return F.conv2d(self.encoder(x), self.conv1.weight[:z], self.conv1.bias[:z])

    def _check_latents(self, latents: Tensor) -> Tensor:
        z = self.config.z_dim
        if latents.ndim == 5:
            if latents.shape[2] != 1:
                raise ValueError(f"The VAE decodes single images: latents {tuple(latents.shape)} have "
                                 f"{latents.shape[2]} frames, expected 1.")
            latents = latents[:, :, 0]
        if latents.ndim != 4 or latents.shape[1] != z:
            raise ValueError(f"VAE latents must be [B, {z}, h, w] or [B, {z}, 1, h, w]; "
                             f"got shape {tuple(latents.shape)}.")
        return latents

    def _check_images(self, images: Tensor) -> Tensor:
        if images.ndim == 5 and images.shape[2] == 1:
            images = images[:, :, 0]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VAE input images must be RGB [B, 3, H, W]; got shape {tuple(images.shape)}.")
        height, width = images.shape[-2:]
        if height % SCALE or width % SCALE:
            raise ValueError(f"Image size {width}x{height} is not a multiple of {SCALE}: "
                             f"resize or crop it to e.g. {width // SCALE * SCALE}x{height // SCALE * SCALE}.")
        return images

    def _tile_latents(self, height: int, width: int, tile_size: int | None) -> int | None:
        """Tile edge in latents (None: untiled), from `tile_size` in pixels or from free memory."""
        if tile_size is not None:
            if tile_size < MIN_TILE_LATENTS * SCALE:
                raise ValueError(f"tile_size must be at least {MIN_TILE_LATENTS * SCALE} pixels, got {tile_size}.")
            return int(tile_size) // SCALE
        weight = self.conv2.weight
        bytes_per_pixel = PEAK_BYTES_PER_PIXEL_CHANNEL * self.config.base_dim * weight.element_size()
        budget = MEMORY_BUDGET_FRACTION * free_memory(weight.device)
        if height * width * bytes_per_pixel <= budget:
            return None
        side_latents = int(math.sqrt(budget / bytes_per_pixel)) // SCALE
        return max(MIN_TILE_LATENTS, side_latents // MIN_TILE_LATENTS * MIN_TILE_LATENTS)


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (on CUDA including torch's cached, unused blocks)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    return psutil.virtual_memory().available


def _latent_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(LATENT_MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(LATENT_STD, device=device).view(1, -1, 1, 1)
    return mean, std


def _tile_spans(n: int, tile: int) -> list[tuple[int, int]]:
    """Equal tiles of at most `tile` covering [0, n), neighbours sharing at least tile // 4."""
    if n <= tile:
        return [(0, n)]
    overlap = tile // 4
    count = math.ceil((n - overlap) / (tile - overlap))
    size = math.ceil((n + (count - 1) * overlap) / count)
    return [(s, s + size) for s in (round(i * (n - size) / (count - 1)) for i in range(count))]


def _blend_weights(spans: list[tuple[int, int]], scale: int, device: torch.device) -> list[Tensor]:
    """Per tile, weights along one axis in output units: linear ramps across each overlap with a
    neighbour, 1 elsewhere, normalised so the tiles covering any position sum to 1."""
    weights = []
    for i, (start, stop) in enumerate(spans):
        pos = torch.arange(start * scale, stop * scale, device=device, dtype=torch.float32) + 0.5
        w = torch.ones_like(pos)
        if i > 0:
            w = torch.minimum(w, (pos - start * scale) / ((spans[i - 1][1] - start) * scale))
        if i < len(spans) - 1:
            w = torch.minimum(w, (stop * scale - pos) / ((stop - spans[i + 1][0]) * scale))
        weights.append(w)
    total = torch.zeros(spans[-1][1] * scale, device=device)
    for (start, stop), w in zip(spans, weights):
        total[start * scale:stop * scale] += w
    return [w / total[start * scale:stop * scale] for (start, stop), w in zip(spans, weights)]


def _tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int | None, in_scale: int, out_scale: int) -> Tensor:
    """fn(x) computed on overlapping tiles of `tile` latents and blended. x is [1, C, H, W]; `in_scale` and
    `out_scale` are x's and fn's output units per latent (1 and 8 for decoding, 8 and 1 for encoding)."""
    height, width = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    if tile is None or (height <= tile and width <= tile):
        return fn(x)
    rows, cols = _tile_spans(height, tile), _tile_spans(width, tile)
    row_weights = _blend_weights(rows, out_scale, x.device)
    col_weights = _blend_weights(cols, out_scale, x.device)
    out = None
    for (r0, r1), wy in zip(rows, row_weights):
        for (c0, c1), wx in zip(cols, col_weights):
            y = fn(x[..., r0 * in_scale:r1 * in_scale, c0 * in_scale:c1 * in_scale]).float()
            if out is None:
                out = y.new_zeros(*y.shape[:2], height * out_scale, width * out_scale)
            out[..., r0 * out_scale:r1 * out_scale, c0 * out_scale:c1 * out_scale] += y * wy[:, None] * wx
    return out.to(x.dtype)


def _file_layout(model: WanImageVAE) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor the original checkpoint holds for this model's config."""
    layout = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for name, module in model.named_modules():
        if hasattr(module, "file_shapes"):
            layout |= {f"{name}.{k}": shape for k, shape in module.file_shapes().items()}
    return layout


def _image_weights(sd: Mapping[str, Tensor], model: WanImageVAE, dtype: torch.dtype) -> dict[str, Tensor]:
    """The file's tensors as the image model's parameters (each module's `from_file`), contiguous, conv
    kernels in `dtype`. Only the converted values are copied (a 5-D kernel's last tap, not the whole
    kernel); time_conv tensors are left out."""
    weights = {}
    for name, module in model.named_modules():
        from_file = getattr(module, "from_file", lambda _, tensor: tensor)
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{name}.{param_name}" if name else param_name
            tensor = from_file(param_name, sd[key])
            weights[key] = (tensor.to(dtype) if tensor.ndim == 4 else tensor).contiguous()
    return weights


def load_vae(source: str | os.PathLike | Mapping[str, Tensor], dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> WanImageVAE:
    """The Wan 2.1 / Qwen-Image VAE from a `.safetensors` path or a state dict in the original key layout."""
    sd = strip_prefix(open_state_dict(source, what=WHAT), CHECKPOINT_PREFIXES)
    require_kind(sd, "wan_vae", what=WHAT, source=source)
    if WAN22_SIGNATURE in sd:
        raise WeightsError(f"{source_name(source)} is a Wan 2.2 VAE (48 latent channels); Anima needs the "
                           f"{WHAT} / Qwen-Image VAE (qwen_image_vae.safetensors).")
    if "decoder.head.0.gamma" not in sd:
        raise WeightsError(f"{source_name(source)} has no 'decoder.head.0.gamma', so it is not a complete {WHAT}.")
    with torch.device("meta"):
        model = WanImageVAE(VAEConfig.from_state_dict(sd))
    check_layout(sd, _file_layout(model), f"{source_name(source)} does not have the {WHAT} layout")
    return load_module_strict(model, _image_weights(sd, model, dtype), dtype=dtype, device=device, what=WHAT)
