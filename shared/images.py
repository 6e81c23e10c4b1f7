"""Turning generated tensors into image files that carry their own settings.

Every saved image has two pieces of metadata:
- an A1111-style `parameters` text (prompt, `Negative prompt:`, then `Key: value, ...`), the format image
  viewers and Civitai read;
- the full settings as JSON, which `--process` and the UI accept back, so any image can be re-made.

PNG stores them as text chunks (`parameters`, and `comment`, where Wan2GP keeps its JSON); JPEG and WebP
store them in EXIF (UserComment for the A1111 text, as A1111 does; ImageDescription for the JSON).
Which settings go into the A1111 text, under which label, comes from the settings schema
(shared/settings_schema.py); the JSON holds every setting. Files are written to a temporary name first and
then linked into place, so a reader never sees half an image and an existing file is never overwritten;
they get the permissions the umask gives. This module imports torch only when a tensor is converted.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image, PngImagePlugin

from shared.settings import new_file_mode
from shared.settings_schema import SETTINGS, Schema, Setting, SettingsError

if TYPE_CHECKING:
    from torch import Tensor

IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
JSON_CHUNK = "comment"
PARAMETERS_CHUNK = "parameters"
_EXIF_IMAGE_DESCRIPTION = 0x010E
_EXIF_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
_SLUG_MAX_CHARS = 50
_SAVE_QUALITY = 95
MIN_FREE_BYTES = 32 << 20  # refuse to start generating when the output disk has less than this free
_NEGATIVE = "Negative prompt"
# A1111's order of the fields it knows; the schema's other labels follow in schema order
_A1111_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Shift", "Seed", "Size")
_A1111_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def tensor_to_pil(image: Tensor) -> Image.Image:
    """`image` [3, H, W] float in [-1, 1] (or uint8 in [0, 255]) -> RGB PIL image.

    Converted as ComfyUI saves images (to [0, 1], then 255 * x truncated), so the same latents give
    exactly its pixels."""
    import torch

    if image.dtype != torch.uint8:
        image = (((image.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def latent_preview(latent: Tensor, factors: list[list[float]], bias: list[float], min_side: int = 256) -> Image.Image:
    """Cheap RGB preview of the first image of `latent` [C, T, h, w] (or [C, h, w]): each pixel is
    `latent(c) . factors + bias` (one [r, g, b] row per channel), upscaled to at least `min_side`."""
    import torch

    x = latent[:, 0] if latent.dim() == 4 else latent  # [C, h, w]
    # explicit CPU tensors: mmgp leaves torch's default device on CUDA in the generating thread
    weights = torch.tensor(factors, dtype=torch.float32, device="cpu")  # [C, 3]
    offset = torch.tensor(bias, dtype=torch.float32, device="cpu").view(3, 1, 1)
    rgb = torch.einsum("chw,cr->rhw", x.detach().float().cpu(), weights) + offset
    image = tensor_to_pil(rgb)
    scale = max(1, -(-min_side // min(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.BILINEAR)


def prompt_slug(prompt: str) -> str:
    """A file-name-safe short form of the prompt (letters and digits of any script, joined by '-')."""
    slug = re.sub(r"[\W_]+", "-", prompt.lower()).strip("-")
    if len(slug) > _SLUG_MAX_CHARS:
        cut = slug[:_SLUG_MAX_CHARS]
        slug = cut.rsplit("-", 1)[0] if "-" in cut else cut
    return slug or "image"


def image_stem(when: datetime, seed: int, prompt: str, index: int) -> str:
    """`{YYYY-MM-DD-HHhMMmSSs}_seed{seed}_{slug}`, plus `_{index}` for the 2nd, 3rd... image of a batch."""
    stem = f"{when:%Y-%m-%d-%Hh%Mm%Ss}_seed{seed}_{prompt_slug(prompt)}"
    return f"{stem}_{index}" if index else stem


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def a1111_parameters(
    settings: Mapping[str, Any], *, model_name: str, loras: list[tuple[str, float, str | None]] = (),
    version: str | None = None, schema: Schema = SETTINGS,
) -> str:
    """The A1111 `parameters` text for one image. `loras` are (name, strength, short hash or None).

    As in A1111, LoRAs show up as `<lora:name:strength>` tags on the prompt line and by hash in
    `Lora hashes`; tags already written in the prompt are not repeated. The fields are the schema's
    settings that have an A1111 label, in A1111's order (an "off" setting only when it is on).
    """
    prompt = str(settings.get("prompt", ""))
    tags = [f"<lora:{name}:{_number(float(s))}>" for name, s, _ in loras if f"<lora:{name}:" not in prompt
            and f"<lora:{name}>" not in prompt]
    lines = [" ".join([prompt, *tags]).strip()]
    if settings.get("negative_prompt"):
        lines.append(f"{_NEGATIVE}: {settings['negative_prompt']}")
    fields: dict[str, str] = {}
    for setting in schema:
        value = settings.get(setting.key)
        if setting.a1111 != _NEGATIVE and setting.in_a1111(value, settings):
            fields[setting.a1111] = setting.a1111_value(value)
    rank = {label: i for i, label in enumerate(_A1111_ORDER)}
    fields = dict(sorted(fields.items(), key=lambda item: rank.get(item[0], len(rank))))
    fields["Model"] = model_name
    hashes = ", ".join(f"{name}: {h}" for name, _, h in loras if h)
    if hashes:
        fields["Lora hashes"] = hashes
    if version:
        fields["Version"] = version
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_a1111_parameters(text: str, schema: Schema = SETTINGS) -> tuple[dict[str, Any], list[str]]:
    """(settings, warnings) from an A1111 `parameters` text (ours or another app's). Keys it lacks are left
    out; a value that cannot be read is left out with a warning, so the model's default is used."""
    lines = text.strip().split("\n")
    params_line = lines.pop() if lines and _A1111_PARAM.match(lines[-1]) and "Steps:" in lines[-1] else ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(f"{_NEGATIVE}:"):
            in_negative, line = True, line[len(_NEGATIVE) + 1:].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    settings: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip()}
    if in_negative:
        settings["negative_prompt"] = "\n".join(negative_lines).strip()
    by_label: dict[str, list[Setting]] = {}
    for s in schema:
        if s.a1111 and s.a1111 != _NEGATIVE:
            by_label.setdefault(s.a1111, []).append(s)
    fields = _A1111_PARAM.findall(params_line)
    shared = [(label, raw) for label, raw in fields if len(by_label.get(label, ())) > 1]
    warnings = []
    # labels of one setting first: a shared label goes to the setting that applies given the others
    for label, raw in [f for f in fields if f not in shared] + shared:
        candidates = by_label.get(label)
        if not candidates:
            continue
        setting = next((c for c in candidates if c.a1111_applies(settings)), candidates[0])
        try:
            value = json.loads(raw) if raw.startswith('"') else raw.strip()
            settings[setting.key] = setting.parse(value)
        except (ValueError, SettingsError):
            warnings.append(f"the image's '{label}: {raw.strip()}' cannot be read; the model's default "
                            f"{setting.key} is used instead")
    return settings, warnings


def _png_info(parameters: str, settings_json: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_CHUNK, parameters)  # Pillow falls back to iTXt for non-Latin-1 text
    info.add_itxt(JSON_CHUNK, settings_json)
    return info


def _exif(parameters: str, settings_json: str) -> Image.Exif:
    exif = Image.Exif()
    exif[_EXIF_IMAGE_DESCRIPTION] = settings_json  # ASCII: the JSON is written with ensure_ascii
    exif.get_ifd(ExifTags.IFD.Exif)[_EXIF_USER_COMMENT] = _UNICODE_PREFIX + parameters.encode("utf-16-be")
    return exif


def _encode(image: Image.Image, path: Path, fmt: str, parameters: str, settings_json: str) -> None:
    if fmt == "png":
        image.save(path, format="PNG", pnginfo=_png_info(parameters, settings_json))
    else:
        image.save(path, format=fmt.upper(), quality=_SAVE_QUALITY, exif=_exif(parameters, settings_json))


def _place(tmp: Path, candidates) -> Path:
    """Give `tmp` the first free name of `candidates` without ever replacing an existing file."""
    for final in candidates:
        try:
            os.link(tmp, final)  # atomic and fails if `final` exists
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: reserve the name, then rename over it
            try:
                os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os.replace(tmp, final)
            return final
        tmp.unlink()
        return final
    raise AssertionError("unreachable: the candidate names never run out")


def _first_existing(folder: Path) -> Path:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate
    return folder


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """Refuse, before anything is generated, an output folder that cannot take images: one that is a file
    or lies under one, one this process cannot write to, or one on a full disk. Creates nothing."""
    out = Path(out_dir).expanduser()
    existing = _first_existing(out.absolute())
    if not existing.is_dir():
        what = "is a file" if existing == out.absolute() else f"lies under {existing}, which is a file"
        raise OSError(f"The output folder {out} {what}: choose a folder with --output-dir.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OSError(f"The output folder {out} is not writable ({e.strerror or e}): choose another with "
                      "--output-dir.") from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise OSError(f"The disk of the output folder {out} is full ({free >> 20} MiB free): free some space or "
                      "choose another folder with --output-dir.")


def save_image(
    image: Image.Image, out_dir: str | os.PathLike, *, stem: str, fmt: str,
    parameters: str, settings: Mapping[str, Any],
) -> Path:
    """Write `image` as `out_dir/stem.ext` (or `stem-2.ext`, `stem-3.ext`... if taken) with its metadata.

    A failure (a folder that cannot be written, a full disk) raises OSError naming the image and the
    folder; no temporary file is left behind, also when interrupted (KeyboardInterrupt) while writing."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"Unknown image format '{fmt}': choose one of {', '.join(IMAGE_FORMATS)}.")
    out = Path(out_dir)
    ext = IMAGE_FORMATS[fmt]
    settings_json = json.dumps(dict(settings), ensure_ascii=True, allow_nan=False)
    tmp = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".saving-", suffix=ext, dir=out)
        os.close(fd)
        tmp = Path(tmp_name)
        _encode(image, tmp, fmt, parameters, settings_json)
        os.chmod(tmp, new_file_mode())
        names = (out / f"{stem}{ext}" if n == 1 else out / f"{stem}-{n}{ext}" for n in itertools.count(1))
        return _place(tmp, names)
    except OSError as e:
        raise OSError(f"Cannot save {stem}{ext} in {out}: {e.strerror or e}.") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _decode_user_comment(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    if raw.startswith(_UNICODE_PREFIX):
        body = raw[len(_UNICODE_PREFIX):]
        return body.decode("utf-16-le" if body[1:2] == b"\x00" and body[:1] != b"\x00" else "utf-16-be")
    return raw[8:].decode("utf-8", errors="replace") if raw[:5] == b"ASCII" else raw.decode("utf-8", "replace")


def _json_settings(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def read_image_metadata(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """(JSON settings or None, A1111 parameters text or None) stored in an image file."""
    try:
        with Image.open(path) as im:
            info = dict(im.info)
            exif = im.getexif()
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not an image file this app can read ({e}).") from None
    settings = _json_settings(info.get(JSON_CHUNK))
    parameters = info.get(PARAMETERS_CHUNK)
    if settings is None:
        settings = _json_settings(exif.get(_EXIF_IMAGE_DESCRIPTION))
    comment = exif.get_ifd(ExifTags.IFD.Exif).get(_EXIF_USER_COMMENT)
    if comment is not None and parameters is None:
        text = _decode_user_comment(comment)
        settings = settings or _json_settings(text)  # Wan2GP keeps its JSON in UserComment
        parameters = None if _json_settings(text) else text
    return settings, parameters


def read_image_settings(path: str | os.PathLike, schema: Schema = SETTINGS) -> tuple[dict[str, Any], list[str]]:
    """(settings, warnings): what an image was made with, from its JSON chunk, else from its A1111 text
    (warnings name the values that text has but that cannot be read)."""
    settings, parameters = read_image_metadata(path)
    if settings is not None:
        return settings, []
    if parameters:
        return parse_a1111_parameters(parameters, schema)
    raise ValueError(f"{path}: this image carries no generation settings.")
