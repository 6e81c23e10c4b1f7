"""Image inputs on the host side: the source image and mask files of a task become the tensors a family's
`generate()` takes, prepared as upstream Wan2GP prepares them (wgp.py `preprocess_video_with_mask`), so a
settings file gives the same images in both apps:

- files are read as an image viewer shows them: EXIF rotation applied, transparency over white, 16-bit
  and CMYK converted; anything that is not an image is a clear error;
- the source is resized (Lanczos) to the output size, the output size being the task's resolution or, when
  none was given, the source's own size rounded to the model's size multiple (16 for Anima);
- the mask (white = repaint; a transparent PNG: its painted, opaque pixels) is resized to the source,
  thresholded at 127.5, grown or shrunk by `mask_expand` pixels (three passes of an elliptic kernel, as
  OpenCV's dilate / erode in upstream) and optionally feathered by `mask_blur` (a Gaussian);
- outpainting ("top bottom left right" percentages) places the resized source inside the canvas at
  margins rounded to the model's quantum (16 for Anima), fills the margins with upstream's grey (127) and
  marks them for repainting.

Cross-setting rules (which letters apply, which files are needed) are `settle`, called by validation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from shared.settings_schema import (DEFAULT_SIZE_MULTIPLE, MAX_SIDE, SettingsError, guide_letters, letters_mask,
                                    outpainting_margins)

MASK_THRESHOLD = 127.5  # upstream's cv2.threshold(mask, 127.5, 255)
EXPAND_PASSES = 3  # upstream's iterations of cv2.dilate / cv2.erode
OUTPAINT_FILL = 127  # upstream's grey (its 127.5 default stored in uint8), the family's inpaint_color 7F7F7F
MAX_OUTPAINT_PERCENT = 100  # upstream's sliders


# --------------------------------------------------------------------------------------- settings rules


def settle(values: Mapping[str, Any]) -> list[str]:
    """Checks how the image-input settings of a validated task fit together (Wan2GP's rules: a letter
    V needs a source image, A without U a mask or outpainting); returns notices for files that will not
    be used. Raises SettingsError for a combination that cannot run."""
    if "image_guide" not in values:
        return []
    guide, mask = values["image_guide"], values["image_mask"]
    given = str(values["video_prompt_type"] or "")
    letters = guide_letters(values)
    margins = outpainting_margins(values["video_guide_outpainting"])
    notices = []
    if margins and max(margins) > MAX_OUTPAINT_PERCENT:
        raise SettingsError(f"video_guide_outpainting {values['video_guide_outpainting']!r}: each margin must be at "
                            f"most {MAX_OUTPAINT_PERCENT}% of the source.")
    if mask and not guide:
        raise SettingsError("image_mask is set but image_guide is not: give the source image the mask paints on "
                            "(--image).")
    if "V" in given and not guide:
        raise SettingsError(f"video_prompt_type {given!r} uses a source image (V) but image_guide is empty: "
                            "give one (--image).")
    if not guide:
        if margins:
            notices.append("video_guide_outpainting is not used: there is no source image (image_guide).")
        return notices
    if "V" not in letters:
        notices.append(f"image_guide is not used: video_prompt_type {given!r} has no V (a control image).")
        return notices
    masked = letters_mask(letters)
    if masked and not mask and not margins:
        raise SettingsError("Inpainting needs a mask: give image_mask (--mask, white = repaint), outpainting "
                            "margins, or use image mode 1 (image to image).")
    if mask and not masked:
        notices.append(f"image_mask is not used: video_prompt_type {letters!r} has no A (or has U).")
    if margins and not masked:
        notices.append(f"video_guide_outpainting is not used: video_prompt_type {letters!r} has no A (or has U).")
    return notices


# ------------------------------------------------------------------------------------------------ files


def open_image(path: str | Path, what: str = "image_guide") -> Image.Image:
    """The image at `path` in RGB, as a viewer shows it (EXIF orientation, transparency over white, 16-bit
    and CMYK converted). ValueError naming `what` for a file that is not an image."""
    image = _open(path, what)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("RGB", "L") and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def open_mask(path: str | Path) -> Image.Image:
    """The mask at `path` as 8-bit grey, 255 = repaint: its brightness, or for an image with transparency
    its alpha (the painted, opaque pixels), as upstream's mask editor saves a brush layer."""
    image = _open(path, "image_mask")
    if image.mode == "P":
        image = image.convert("RGBA")
    if "A" in image.mode:
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            return Image.fromarray(alpha)
    return open_image(path, "image_mask").convert("L")


def _open(path: str | Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        why = "is not an image" if isinstance(e, UnidentifiedImageError) else f"cannot be read ({e})"
        raise ValueError(f"{what}: {path} {why}: give a PNG, JPEG or WebP picture.") from None


def image_size(path: str | Path, what: str = "image_guide") -> tuple[int, int]:
    """(width, height) of the image as shown (after its EXIF rotation)."""
    return open_image(path, what).size


def native_resolution(path: str | Path, outpainting: str | None = None, multiple: int = DEFAULT_SIZE_MULTIPLE) -> str:
    """The output size of a task with a source image and no resolution: the source's own size (plus its
    outpainting margins) rounded to multiples of the model's `multiple`, as "WxH". ValueError past the
    4096-pixel limit."""
    width, height = image_size(path)
    margins = outpainting_margins(outpainting) or (0, 0, 0, 0)
    top, bottom, left, right = margins
    width, height = int(width * (100 + left + right) / 100), int(height * (100 + top + bottom) / 100)
    rounded = [max(multiple, round(v / multiple) * multiple) for v in (width, height)]
    if max(rounded) > MAX_SIDE:
        what = "with its outpainting margins " if any(margins) else ""
        raise ValueError(f"image_guide {path} is {width}x{height} {what}and the output would take that size, past the "
                         f"{MAX_SIDE}-pixel limit: give a resolution (--resolution), e.g. 1024x1024 (Anima works "
                         "best near 1 MP).")
    return f"{rounded[0]}x{rounded[1]}"


# ---------------------------------------------------------------------------------------- mask shaping


def ellipse_kernel(size: int) -> np.ndarray:
    """OpenCV's MORPH_ELLIPSE structuring element of size x size (anchor at its centre, size // 2)."""
    kernel = np.zeros((size, size), dtype=bool)
    radius, centre = size // 2, size // 2
    for row in range(size):
        dy = row - radius
        if abs(dy) <= radius:
            dx = round(centre * math.sqrt((radius * radius - dy * dy) / (radius * radius))) if radius else 0
            kernel[row, max(centre - dx, 0):min(centre + dx + 1, size)] = True
    return kernel


def expand_mask(mask: np.ndarray, pixels: int, passes: int = EXPAND_PASSES) -> np.ndarray:
    """A {0, 255} mask grown (pixels > 0) or shrunk (< 0) by `passes` dilations / erosions with an
    |pixels|-wide elliptic kernel, as OpenCV computes them (nothing grows in from beyond the border)."""
    if pixels == 0:
        return mask
    kernel = ellipse_kernel(abs(pixels))
    grow = pixels > 0
    anchor = abs(pixels) // 2
    height, width = mask.shape
    out = mask.astype(bool)
    for _ in range(passes):
        padded = np.full((height + abs(pixels), width + abs(pixels)), not grow)
        padded[anchor:anchor + height, anchor:anchor + width] = out
        result = np.full(mask.shape, not grow)
        for dy, dx in zip(*np.nonzero(kernel)):
            window = padded[dy:dy + height, dx:dx + width]
            result = result | window if grow else result & window
        out = result
    return out.astype(np.uint8) * 255


# ------------------------------------------------------------------------------------------ preparation


@dataclass(frozen=True)
class Placement:
    """Where the source sits on the canvas: its size and top-left corner, in pixels."""

    width: int
    height: int
    left: int
    top: int


def _quantize_axis(before: int, inner: int, total: int, quantum: int) -> tuple[int, int]:
    """Margins before and after the source rounded to multiples of `quantum`, keeping at least one quantum
    of source (upstream's `_quantize_outpainting_axis`); returns (inner, before)."""
    after = total - before - inner
    before = max(0, int(round(before / quantum) * quantum))
    after = max(0, int(round(after / quantum) * quantum))
    overflow = before + after + (quantum if total >= quantum else 1) - total
    if overflow > 0:
        if after >= before:
            after = max(0, after - math.ceil(overflow / quantum) * quantum)
        else:
            before = max(0, before - math.ceil(overflow / quantum) * quantum)
    return total - before - after, before


def outpaint_placement(width: int, height: int, margins: tuple[int, int, int, int],
                       quantum: int = DEFAULT_SIZE_MULTIPLE) -> Placement:
    """The source's place on a width x height canvas with margins "top bottom left right" in percent of the
    source (upstream's `get_outpainting_frame_location` with margins quantized to `quantum`)."""
    top, bottom, left, right = margins

    def axis(total: int, before_pct: int, after_pct: int) -> tuple[int, int]:
        inner = int(total / ((100 + before_pct + after_pct) / 100))
        before = int(before_pct / (100 + before_pct + after_pct) * total)
        if before + inner > total or after_pct == 0:
            before = total - inner
        return _quantize_axis(before, inner, total, quantum)

    inner_h, top_px = axis(height, top, bottom)
    inner_w, left_px = axis(width, left, right)
    return Placement(inner_w, inner_h, left_px, top_px)


@dataclass(frozen=True)
class PreparedInputs:
    """The image-input keyword arguments of `generate()` for one task, and what the user should know."""

    kwargs: dict[str, Any]
    notices: tuple[str, ...] = ()


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def _aspect_note(source: tuple[int, int], size: tuple[int, int]) -> str:
    before, after = source[0] / source[1], size[0] / size[1]
    return f" (stretched: aspect {before:.2f} -> {after:.2f})" if abs(before / after - 1) > 0.01 else ""


def prepare(values: Mapping[str, Any], width: int, height: int, quantum: int = DEFAULT_SIZE_MULTIPLE) -> PreparedInputs:
    """`generate()`'s image-input kwargs for a validated task of output size width x height: input_frames
    [3, 1, H, W] in [-1, 1] (x / 255 * 2 - 1, ComfyUI's arithmetic), input_masks [1, 1, H, W] in [0, 1] or
    None, the effective letters, image_mode and denoising / masking strengths (1 where a letter turns them
    off, as upstream does) and the outpainting margins, rounded to multiples of `quantum` (the model's
    `outpainting_quantize_margins`). Notices say what was resized or dropped."""
    import torch

    letters = guide_letters(values)
    guide = values.get("image_guide")
    if not guide or "V" not in letters:
        return PreparedInputs({"input_frames": None, "input_masks": None, "video_prompt_type": letters,
                               "image_mode": 1, "outpainting_dims": None, "denoising_strength": 1.0,
                               "masking_strength": 1.0})
    notices = []
    masked = letters_mask(letters)
    margins = outpainting_margins(values.get("video_guide_outpainting")) if masked else None
    place = outpaint_placement(width, height, margins, quantum) if margins else Placement(width, height, 0, 0)
    source = open_image(guide)
    inner = (place.width, place.height)
    if source.size != inner:
        where = f"its place on the {width}x{height} canvas" if margins else "the output size"
        notices.append(f"image_guide {source.width}x{source.height} resized to {inner[0]}x{inner[1]} ({where})"
                       f"{_aspect_note(source.size, inner)}.")
    canvas = np.full((height, width, 3), OUTPAINT_FILL, dtype=np.uint8)
    canvas[place.top:place.top + place.height, place.left:place.left + place.width] = np.asarray(
        _resized(source, inner))
    mask = None
    if masked:
        mask = _mask_canvas(values, source.size, place, width, height, "N" in letters, notices)
    kwargs = {
        "input_frames": torch.from_numpy(canvas).permute(2, 0, 1)[:, None].float() / 255.0 * 2.0 - 1.0,
        "input_masks": None if mask is None else torch.from_numpy(np.array(mask))[None, None].float() / 255.0,
        "video_prompt_type": letters,
        "image_mode": 2 if mask is not None else int(values.get("image_mode") or 1),
        "outpainting_dims": list(margins) if margins else None,
    }
    if "G" not in letters:  # upstream: without G the whole image is denoised and masked every step
        kwargs.update(denoising_strength=1.0, masking_strength=1.0)
    return PreparedInputs(kwargs, tuple(notices))


def _mask_canvas(values: Mapping[str, Any], source_size: tuple[int, int], place: Placement, width: int,
                 height: int, negate: bool, notices: list[str]) -> np.ndarray | None:
    """The {0..255} mask on the canvas (255 = repaint), or None (with a notice) when nothing is repainted."""
    inner = np.zeros((place.height, place.width), dtype=np.uint8)
    if values.get("image_mask"):
        mask = open_mask(values["image_mask"])
        if mask.size != source_size:
            notices.append(f"image_mask {mask.width}x{mask.height} is not the size of the source image "
                           f"({source_size[0]}x{source_size[1]}): resized to it.")
        grey = np.asarray(_resized(mask, (place.width, place.height)))
        inner = np.where(grey > MASK_THRESHOLD, 255, 0).astype(np.uint8)
        inner = expand_mask(inner, int(values.get("mask_expand") or 0))
        if negate:
            inner = 255 - inner
    canvas = np.full((height, width), 255, dtype=np.uint8)
    canvas[place.top:place.top + place.height, place.left:place.left + place.width] = inner
    if not canvas.any():
        notices.append("image_mask has no white (repaint) pixel: the whole image is denoised (image to image).")
        return None
    blur = int(values.get("mask_blur") or 0)
    if blur:
        canvas = np.asarray(Image.fromarray(canvas).filter(ImageFilter.GaussianBlur(blur)))
    return canvas
