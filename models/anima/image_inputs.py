"""Image inputs of `generate()`: img2img, masked denoising (inpainting, outpainting) and the hires-fix pass,
with ComfyUI's semantics (`comfy/samplers.py` KSampler and KSamplerX0Inpaint, `comfy/utils.py` reshape_mask,
`nodes.py` VAEEncode, SetLatentNoiseMask and ImageScaleBy), so the same files, seed and settings give its
latents:

* img2img: with N steps and denoise d < 1 the sampler runs the last N + 1 sigmas of the schedule made for
  int(N / d) steps, from sigma0 * noise + (1 - sigma0) * source, the CONST noise scaling of the source's
  normalised latent (noise: the seed's CPU noise, as for text-to-image). d = 1 starts from the noise alone
  (text-to-image); d = 0 runs no step and returns the source latent.
* masked denoising, mask 1 = repaint: around every model call, outside the mask the input is the source
  re-noised to that sigma and the denoised estimate is the source itself. The pixel mask is resized to the
  latent grid as ComfyUI resizes a 5-D latent's mask (trilinear, not rounded), so its edge stays soft.
* masking_strength m (Wan2GP's setting): that blend runs in the first ceil(N * m) steps only.
* hires fix: the decoded image's pixels are upscaled with Lanczos to a size rounded to multiples of 16,
  then encoded and denoised as img2img, exactly as a second img2img run on the upscaled image.

The host prepares the tensors: upstream Wan2GP (or this app's shared/image_inputs.py) resizes the guide to
the canvas, thresholds, grows and pads the mask and fills the outpainted margins before `generate` runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from . import schedulers
from .registry import SIZE_MULTIPLE
from .sampling import Denoiser

FULL_DENOISE = 0.9999  # ComfyUI's KSampler: a denoise above this runs the whole schedule
HIRES_WARN_SCALE = 1.5  # the model card: Anima degrades beyond about 1.5 MP
HIRES_UPSCALERS = ("lanczos",)


@dataclass(frozen=True)
class ImageGuide:
    """The source image of an img2img / inpainting run, as `generate` checked it.

    pixels: [1, 3, H, W] float32 in [-1, 1] on the CPU. mask: [1, 1, H, W] float32 in [0, 1] (1 = repaint),
    None for the whole image. denoise: ComfyUI's denoise in [0, 1]. masking: the fraction of the steps
    that keep the unmasked area (Wan2GP's masking_strength)."""

    pixels: Tensor
    mask: Tensor | None
    denoise: float
    masking: float

    @property
    def needs_latent(self) -> bool:
        """d = 1 without a mask is text-to-image from the noise alone: the source is never used."""
        return self.mask is not None or self.denoise <= FULL_DENOISE


def _strength(name: str, value: float | None) -> float:
    value = 1.0 if value is None else float(value)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be between 0 and 1 (got {value:g}).")
    return value


def _as_image(tensor: Tensor, channels: int, what: str) -> Tensor:
    """[C, 1, H, W] (Wan2GP: channels, frames, height, width), [1, C, H, W], [C, H, W] or, for one
    channel, [H, W] -> [1, C, H, W] float32 on the CPU."""
    if tensor.ndim == 4 and tensor.shape[0] == channels and tensor.shape[1] == 1:
        tensor = tensor.transpose(0, 1)
    elif tensor.ndim == 3 and tensor.shape[0] == channels:
        tensor = tensor.unsqueeze(0)
    elif tensor.ndim == 2 and channels == 1:
        tensor = tensor[None, None]
    if tensor.ndim != 4 or tuple(tensor.shape[:2]) != (1, channels):
        raise ValueError(f"{what} must be one image [{channels}, 1, H, W]; got shape {tuple(tensor.shape)}.")
    tensor = tensor.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} holds NaN or infinite values.")
    return tensor


def image_guide(input_frames: Tensor | None, input_masks: Tensor | None, denoising_strength: float | None,
                masking_strength: float | None, video_prompt_type: str | None, width: int,
                height: int) -> ImageGuide | None:
    """The checked image input of a `generate` call, None without `input_frames` (text-to-image).

    As upstream Wan2GP's families do: the mask is ignored with the letter "U" in `video_prompt_type`
    (upstream's identity preprocessing sends an all-zero mask); an all-zero mask means img2img. Sizes must
    equal width x height (the host resizes); anything malformed is a ValueError."""
    denoise = _strength("denoising_strength", denoising_strength)
    masking = _strength("masking_strength", masking_strength)
    if input_frames is None:
        return None
    pixels = _as_image(input_frames, 3, "input_frames")
    if tuple(pixels.shape[-2:]) != (height, width):
        raise ValueError(f"input_frames is {pixels.shape[-1]}x{pixels.shape[-2]} but the image is {width}x{height}: "
                         "resize the source image to the output size first.")
    if pixels.min() < -1.0 or pixels.max() > 1.0:
        raise ValueError("input_frames must hold pixels in [-1, 1].")
    pixels = comfyui_input_pixels(pixels)
    mask = None
    if input_masks is not None and "U" not in (video_prompt_type or ""):
        mask = _as_image(input_masks, 1, "input_masks")
        if tuple(mask.shape[-2:]) != (height, width):
            raise ValueError(f"input_masks is {mask.shape[-1]}x{mask.shape[-2]} but the image is {width}x{height}.")
        if mask.min() < 0.0 or mask.max() > 1.0:
            raise ValueError("input_masks must hold values in [0, 1] (1 = repaint).")
        if not bool(mask.any()):
            mask = None
    return ImageGuide(pixels, mask, denoise, masking)


def comfyui_input_pixels(pixels: Tensor) -> Tensor:
    """8-bit pixels in [-1, 1] with ComfyUI's arithmetic (LoadImage's x / 255, VAEEncode's 2x - 1): hosts
    make the guide from 8-bit images but divide differently (upstream Wan2GP: x / 127.5 - 1), which can
    differ in the last bit, so the pixels are read back to 8 bits first and every host encodes the same."""
    levels = ((pixels + 1.0) * 127.5).round()  # [0, 255]
    return levels / 255.0 * 2.0 - 1.0


# ------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """The sigmas a pass runs (`sigmas`, len = steps run + 1, or empty for none) and the step number of its
    first sigma in the full schedule of `full_steps` steps (for per-step LoRA multipliers)."""

    sigmas: Tensor
    full_steps: int

    @property
    def steps(self) -> int:
        return max(len(self.sigmas) - 1, 0)

    @property
    def first_step(self) -> int:
        return self.full_steps - self.steps


def denoise_schedule(scheduler: str, steps: int, shift: float, sampler: str, denoise: float = 1.0) -> Schedule:
    """ComfyUI's KSampler.set_steps: d > 0.9999 runs the whole schedule of `steps`; d <= 0 runs nothing;
    otherwise the last steps + 1 sigmas of the schedule for int(steps / d) steps."""
    if denoise > FULL_DENOISE:
        return Schedule(schedulers.compute_sigmas(scheduler, steps, shift, sampler), steps)
    if denoise <= 0.0:
        return Schedule(torch.zeros(0, dtype=torch.float32, device="cpu"), steps)
    full_steps = int(steps / denoise)
    return Schedule(schedulers.compute_sigmas(scheduler, full_steps, shift, sampler)[-(steps + 1):], full_steps)


def masked_steps(steps: int, masking_strength: float) -> int:
    """How many of `steps` keep the unmasked area: ceil(steps * m), as Wan2GP counts them."""
    return math.ceil(steps * masking_strength)


# ----------------------------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class SourceLatents:
    """What a pass starts from besides noise: the source's normalised latents [B, C, 1, h, w] (float32, on
    the execution device), its latent mask (None: img2img of the whole image) and how many steps keep the
    unmasked area."""

    latents: Tensor
    mask: Tensor | None = None
    masked_steps: int = 0


def latent_mask(mask: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
    """A pixel mask [1, 1, H, W] on the latent grid [1, C, 1, h, w], as ComfyUI's SetLatentNoiseMask and
    `reshape_mask` give it for a 5-D latent: trilinear interpolation (bilinear within the one frame,
    align_corners False), not rounded, repeated over the channels."""
    channels, frames, h, w = latent_shape[-4:]
    grid = F.interpolate(mask.reshape(1, 1, -1, *mask.shape[-2:]), size=(frames, h, w), mode="trilinear")
    return grid.repeat(1, channels, 1, 1, 1)  # [1, C, 1, h, w]


def masked_denoiser(denoise: Denoiser, source: Tensor, noise: Tensor, mask: Tensor,
                    active: Callable[[], bool]) -> Denoiser:
    """ComfyUI's KSamplerX0Inpaint around `denoise`: while `active()`, the model sees the source re-noised
    to sigma (sigma * noise + (1 - sigma) * source) where mask is 0, and its estimate there is the source.
    source, noise: [B, C, 1, h, w]; mask: the latent mask, broadcast over the batch."""
    keep = 1.0 - mask

    def inpaint(x: Tensor, sigma: Tensor) -> Tensor:
        if not active():
            return denoise(x, sigma)
        x = x * mask + (sigma * noise + (1.0 - sigma) * source) * keep
        return denoise(x, sigma) * mask + source * keep

    return inpaint


# ----------------------------------------------------------------------------------------------- hires


@dataclass(frozen=True)
class HiresPass:
    """The hires-fix second pass: upscale by `scale`, then img2img at `denoise` for `steps` steps."""

    scale: float
    denoise: float
    steps: int
    upscaler: str = "lanczos"

    def size(self, width: int, height: int) -> tuple[int, int]:
        return hires_size(width, height, self.scale)


def hires_pass(scale: float | None, denoise: float | None, steps: int | None, base_steps: int,
               upscaler: str | None = None) -> HiresPass | None:
    """The checked hires settings; None when `scale` is None or 1 (no second pass). steps 0 / None: the
    first pass's step count; denoise None: 0.5. ValueError for values that cannot run."""
    if scale is None or float(scale) == 1.0:
        return None
    scale = float(scale)
    if not 1.0 < scale <= 4.0:
        raise ValueError(f"hires_scale must be above 1 and at most 4 (got {scale:g}).")
    denoise = _strength("hires_denoise", 0.5 if denoise is None else denoise)
    steps = int(steps or base_steps)
    if steps < 1:
        raise ValueError(f"hires_steps must be at least 1, or 0 for the same steps as the first pass (got {steps}).")
    upscaler = (upscaler or "lanczos").lower()
    if upscaler not in HIRES_UPSCALERS:
        raise ValueError(f"Unknown hires upscaler '{upscaler}': choose one of {', '.join(HIRES_UPSCALERS)}.")
    return HiresPass(scale, denoise, steps, upscaler)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """width x height times `scale`, each side rounded (half up) to a multiple of 16."""
    def side(n: int) -> int:
        return max(SIZE_MULTIPLE, math.floor(n * scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)

    return side(width), side(height)


def upscale_pixels(pixels: Tensor, width: int, height: int) -> Tensor:
    """uint8 images [B, 3, H, W] -> Lanczos-resized to width x height -> float32 [B, 3, height, width] in
    [-1, 1], with ComfyUI's arithmetic (ImageScaleBy's PIL Lanczos on 8-bit pixels, x / 255, then VAEEncode's
    2x - 1)."""
    out = []
    for image in pixels.to("cpu", torch.uint8):
        resized = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width, height), Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))  # [3, height, width] uint8
    return torch.stack(out).float() / 255.0 * 2.0 - 1.0
