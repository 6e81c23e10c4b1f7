"""Every generation setting, declared once.

A `Setting` holds everything the app knows about one Wan2GP settings key: its type and rule (range,
choices or pattern), the host's default, the A1111 infotext label, the CLI flag, the prompt-file options,
the UI control and label, the help text and the `generate()` keyword it becomes. Everything else is
derived from these declarations:
- validation: `Setting.clean` (shared/settings.py turns a task into a typed `Task` with it);
- the CLI flags: `add_cli_flags` (shared/cli_args.py);
- the prompt-file overrides: `prompt_options` (shared/prompts_file.py);
- the metadata: A1111 `parameters` and the JSON (shared/images.py);
- the UI controls and their ranges (shared/ui.py);
- the `generate()` keyword arguments: `generate_kwargs` (shared/runtime.py).

Model-dependent values come from the family, through the model definition (`query_model_def` and
defaults/*.json): a setting names the definition key that holds its choices (`choices_from`), presets
(`presets_from`), upper bound (`high_from`) or size multiple (`multiple_from`); `Setting.rule(definition)`
resolves them, and the UI and validation both use that one `Rule`. Defaults here are Wan2GP's base
settings (its models/_settings.json); a family sets its own in `update_default_settings`.

Adding a setting is one `Setting(...)` in its group's tuple below (`kwarg` maps it to `generate()`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Wan2GP's defaults when a model definition does not say (wan2gp_contract.md §2)
DEFAULT_SIZE_MULTIPLE = 16
DEFAULT_BATCH_SIZE_MAX = 16
MAX_SIDE = 4096
MAX_SEED = 2**32 - 1
VALUE_TYPES = ("text", "int", "float", "resolution", "names", "numbers", "file")
# "mask": an editor painting on the "image" setting before it (white brush = repaint)
UI_KINDS = ("textbox", "number", "dropdown", "resolution", "image", "loras", "strengths", "mask")
_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX×*]\s*(\d+)\s*$")


class SettingsError(ValueError):
    """A setting a user gave is wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class Rule:
    """What a setting accepts for one model: the declaration with the family's values filled in."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is refused
    choices: tuple[tuple[str, Any], ...] = ()  # (label, value); empty: any value of the type
    presets: tuple[tuple[str, str], ...] = ()  # UI suggestions, not a restriction
    multiple: int = 1  # resolution: each side a multiple of it
    pattern: str | None = None  # text: must match it whole

    def range_text(self) -> str:
        """'between 1 and 1000', 'above 0 and at most 100', ... ('' without bounds)."""
        low, high = _plain(self.low), _plain(self.high)
        if self.low is not None and self.high is not None and not self.low_open:
            return f"between {low} and {high}"
        parts = [] if self.low is None else [f"above {low}" if self.low_open else f"at least {low}"]
        parts += [] if self.high is None else [f"at most {high}"]
        return " and ".join(parts)


def _plain(number: float | None) -> str:
    """The shortest exact text of a number: 4294967295 (not 4.29497e+09), 3 (not 3.0), 0.123456789."""
    return "" if number is None else str(int(number)) if float(number).is_integer() else repr(float(number))


def _choice_key(text: Any) -> str:
    """Spelling-blind form of a choice, so 'Euler a', 'euler_a' and 'DPM++ 2M SDE' / 'dpmpp_2m_sde' meet
    (A1111 and Forge write UI names, Wan2GP and ComfyUI write ids)."""
    text = re.sub(r"\(.*?\)", "", str(text).lower()).replace("++", "pp")
    return re.sub(r"[^a-z0-9.]", "", text)


def _has_nul(text: str) -> bool:
    return "\x00" in text


def _number(key: str, value: Any, whole: bool) -> float:
    what = "a whole number" if whole else "a number"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SettingsError(f"{key} is empty: it must be {what}.")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingsError(f"{key} must be {what}, got {value!r}.")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise SettingsError(f"{key} must be {what}, got {value!r}.") from None
    if not math.isfinite(number):
        raise SettingsError(f"{key} must be a finite number, got {value!r}.")
    if whole and not number.is_integer():
        raise SettingsError(f"{key} must be {what}, got {value!r}.")
    return number


def _check_range(key: str, number: float, rule: Rule, shown: Any) -> None:
    low_ok = rule.low is None or (number > rule.low if rule.low_open else number >= rule.low)
    if not low_ok or (rule.high is not None and number > rule.high):
        raise SettingsError(f"{key} must be {rule.range_text()}, got {shown}.")


def parse_resolution(value: Any, multiple: int = DEFAULT_SIZE_MULTIPLE, key: str = "resolution") -> tuple[int, int]:
    """'WxH' -> (width, height), both multiples of `multiple` and at most `MAX_SIDE`."""
    match = _RESOLUTION.match(str(value)) if isinstance(value, (str, int)) else None
    if not match:
        raise SettingsError(f"{key} must look like '1024x1024' (width x height), got {value!r}.")
    width, height = int(match.group(1)), int(match.group(2))
    if max(width, height) > MAX_SIDE:
        raise SettingsError(f"{key} {width}x{height} is too large: each side must be at most {MAX_SIDE} pixels.")
    if width < multiple or height < multiple or width % multiple or height % multiple:
        near = [max(multiple, round(v / multiple) * multiple) for v in (width, height)]
        raise SettingsError(f"{key} {width}x{height}: width and height must be multiples of {multiple} "
                            f"(nearest: {near[0]}x{near[1]}).")
    return width, height


def file_sha256(path: str | Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The file's SHA-256 (hex); `on_bytes(n)` hears of each block read (a progress bar)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One generation setting. Only `key`, `type`, `default` and `label` are required."""

    key: str  # the Wan2GP settings key (JSON, last-used settings, metadata)
    type: str  # one of VALUE_TYPES
    default: Any  # the host's default; the family's update_default_settings overrides it
    label: str  # UI label
    help: str = ""  # CLI help and UI info
    # the rule (see `rule`)
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_from: str | None = None  # model-definition key whose number replaces `high`
    choices: tuple[tuple[str, Any], ...] = ()
    choices_from: str | None = None  # model-definition key with the family's [(label, value)]
    presets_from: str | None = None  # model-definition key with UI suggestions [(label, value)]
    multiple_from: str | None = None  # model-definition key of the resolution multiple
    pattern: str | None = None  # text that must match this regex whole
    pattern_help: str = ""  # what `pattern` means, for the error message
    # where it appears
    cli: str | None = None  # e.g. "--steps"; None: no flag
    metavar: str | None = None
    prompt_options: tuple[str, ...] = ()  # prompt-file options, e.g. ("s",) for `--s 30`; resolution: (w, h)
    a1111: str | None = None  # A1111 infotext label, e.g. "Steps"
    # written only when this holds for the image's settings (None: whenever it has a value); two settings may
    # share a label when at most one applies to any image, and reading picks the one that applies
    a1111_when: Callable[[Mapping[str, Any]], bool] | None = None
    ui: str | None = "number"  # one of UI_KINDS; None: not in the UI
    ui_step: float | None = None
    ui_lines: int = 1
    kwarg: str | Callable[[Any], dict[str, Any]] | None = None  # the generate() keyword, or value -> kwargs
    # upstream Wan2GP's `custom_settings` entry holding this value when its id is not `key`: (id, factor
    # from its value to this one), e.g. CFG truncation there is a fraction, here a percentage
    upstream_custom: tuple[str, float] | None = None

    def __post_init__(self):
        if self.type not in VALUE_TYPES:
            raise ValueError(f"Setting {self.key}: unknown type '{self.type}' (one of {', '.join(VALUE_TYPES)}).")
        if self.ui is not None and self.ui not in UI_KINDS:
            raise ValueError(f"Setting {self.key}: unknown UI kind '{self.ui}' (one of {', '.join(UI_KINDS)}).")

    def rule(self, definition: Mapping[str, Any] | None = None) -> Rule:
        """The rule for a model, with the family's values (its model definition) filled in."""
        definition = definition or {}
        high = self.high
        if self.high_from and definition.get(self.high_from) is not None:
            high = float(definition[self.high_from])
        choices = self.choices
        if self.choices_from and definition.get(self.choices_from):
            choices = tuple((str(label), value) for label, value in definition[self.choices_from])
        presets = ()
        if self.presets_from and definition.get(self.presets_from):
            presets = tuple((str(p[0]), str(p[1])) if isinstance(p, (list, tuple)) else (str(p), str(p))
                            for p in definition[self.presets_from])
        multiple = int(definition.get(self.multiple_from) or DEFAULT_SIZE_MULTIPLE) if self.multiple_from else 1
        return Rule(self.low, high, self.low_open, choices, presets, multiple, self.pattern)

    # ------------------------------------------------------------------------------- validation

    def parse(self, value: Any) -> Any:
        """`value` converted to the setting's type, without the model's rule (ranges, choices)."""
        return self.clean(value, Rule())

    def clean(self, value: Any, rule: Rule) -> Any:
        """The value in its clean type, or a SettingsError naming the setting and the fix."""
        key = self.key
        if self.type in ("int", "float"):
            number = _number(key, value, whole=self.type == "int")
            clean = int(number) if self.type == "int" else number
            if rule.choices:
                return self._choose(value, rule, numeric=clean)
            _check_range(key, number, rule, int(number) if self.type == "int" else value)
            return clean
        if self.type == "text":
            text = "" if value is None else value
            if not isinstance(text, str):
                raise SettingsError(f"{key} must be text, got {value!r}.")
            if _has_nul(text):
                raise SettingsError(f"{key} contains a NUL character (\\x00), which no image format can store.")
            if rule.choices:
                return self._choose(text, rule)
            if rule.pattern and not re.fullmatch(rule.pattern, text):
                wanted = self.pattern_help or f"text matching {rule.pattern}"
                raise SettingsError(f"{key} must be {wanted}, got {text!r}.")
            return text
        if self.type == "resolution":
            width, height = parse_resolution(value, rule.multiple, key)
            return f"{width}x{height}"
        if self.type == "names":
            names = [value] if isinstance(value, str) else ([] if value is None else value)
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
                raise SettingsError(f"{key} must be a list of names, got {value!r}.")
            if any(_has_nul(n) for n in names):
                raise SettingsError(f"{key} contains a NUL character (\\x00).")
            return tuple(n.strip() for n in names)
        if self.type == "numbers":
            items = value.split() if isinstance(value, str) else ([] if value is None else value)
            if not isinstance(items, (list, tuple)):
                raise SettingsError(f"{key} must be numbers separated by spaces, got {value!r}.")
            try:
                numbers = [float(v) for v in items]
            except (TypeError, ValueError):
                raise SettingsError(f"{key} must be numbers separated by spaces, got {value!r}.") from None
            if not all(math.isfinite(n) for n in numbers):
                raise SettingsError(f"{key} must be finite numbers, got {value!r}.")
            return " ".join(_plain(n) for n in numbers)
        # file: a path to an existing file, or None
        if value in (None, ""):
            return None
        if not isinstance(value, (str, Path)) or _has_nul(str(value)):
            raise SettingsError(f"{key} must be a file path, got {value!r}.")
        if not Path(value).is_file():
            raise SettingsError(f"{key}: no such file: {value}")
        return os.path.abspath(value)  # the settings saved with an image name it from anywhere

    def _choose(self, value: Any, rule: Rule, numeric: float | None = None) -> Any:
        for label, choice in rule.choices:
            if numeric is not None:
                if float(choice) == numeric:
                    return choice
            elif value == choice or _choice_key(value) in (_choice_key(choice), _choice_key(label)):
                return choice
            elif choice == "" and _choice_key(value) == "none":  # the empty "off" choice, as users often write it
                return choice
        # an empty choice is named by its label ("Off"), which it also accepts
        names = ", ".join(str(choice) or label for label, choice in rule.choices)
        raise SettingsError(f"{self.key} {value!r} is not available: choose one of {names}.")

    # --------------------------------------------------------------------------------- metadata

    def a1111_value(self, value: Any) -> str:
        return _plain(value) if isinstance(value, float) else str(value)

    def in_a1111(self, value: Any, settings: Mapping[str, Any]) -> bool:
        """Whether the A1111 text records this value among `settings`: a labelled setting with a value, whose
        `a1111_when` holds (e.g. CFG truncation only when it is on, the hires fields only with a hires pass)."""
        return bool(self.a1111) and value not in (None, "", (), []) and self.a1111_applies(settings)

    def a1111_applies(self, settings: Mapping[str, Any]) -> bool:
        return self.a1111_when is None or bool(self.a1111_when(settings))

    def json_extras(self, value: Any) -> dict[str, Any]:
        """Extra JSON entries recorded beside the value: a file's SHA-256, so a re-make can tell it changed."""
        if self.type == "file" and value:
            return {f"{self.key}_sha256": file_sha256(value)}
        return {}

    def to_kwargs(self, value: Any) -> dict[str, Any]:
        if self.kwarg is None:
            return {}
        return {self.kwarg: value} if isinstance(self.kwarg, str) else self.kwarg(value)


@dataclass(frozen=True)
class SettingGroup:
    """Settings shown together (one UI section); `main` groups sit on the main panel, the others in an
    accordion titled `title`."""

    title: str
    settings: tuple[Setting, ...]
    main: bool = False


@dataclass(frozen=True)
class Schema:
    groups: tuple[SettingGroup, ...]
    _by_key: dict[str, Setting] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        by_key: dict[str, Setting] = {}
        for setting in self.settings:
            if setting.key in by_key:
                raise ValueError(f"Setting '{setting.key}' is declared twice.")
            by_key[setting.key] = setting
        object.__setattr__(self, "_by_key", by_key)

    @property
    def settings(self) -> tuple[Setting, ...]:
        return tuple(s for group in self.groups for s in group.settings)

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.settings)

    def __getitem__(self, key: str) -> Setting:
        return self._by_key[key]

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def keys(self) -> list[str]:
        return list(self._by_key)

    def defaults(self) -> dict[str, Any]:
        return {s.key: (list(s.default) if isinstance(s.default, (list, tuple)) else s.default) for s in self}

    def extra_json_keys(self) -> set[str]:
        """JSON keys the metadata adds beside the settings (read back without a warning)."""
        return {f"{s.key}_sha256" for s in self if s.type == "file"}

    def with_group(self, group: SettingGroup) -> Schema:
        return Schema((*self.groups, group))

    def generate_kwargs(self, values: Mapping[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for setting in self:
            kwargs.update(setting.to_kwargs(values[setting.key]))
        return kwargs


def add_cli_flags(group: Any, settings: Sequence[Setting], choices: Mapping[str, Sequence[str]] | None = None) -> None:
    """One argparse flag per setting that has one; the value lands in `args.<key>` (None when not given),
    raw: validation types and checks it against the model, like any other source. `choices` (by key: the
    values the models offer) are listed in the help."""
    for s in settings:
        if s.cli is None:
            continue
        names = (choices or {}).get(s.key)
        text = f"{s.help}: {', '.join(map(str, names))}" if names else s.help
        if s.type == "names":
            group.add_argument(s.cli, dest=s.key, action="append", metavar=s.metavar or "NAME", help=text)
        else:
            group.add_argument(s.cli, dest=s.key, metavar=s.metavar or _METAVARS[s.type], help=text)


_METAVARS = {"text": "TEXT", "int": "N", "float": "X", "resolution": "WxH", "numbers": "'X Y ...'", "file": "FILE"}


# ------------------------------------------------------------------------------------ declarations
# One tuple per feature group, so settings added by different changes touch different lines.

PROMPT_SETTINGS = (
    Setting(key="prompt", type="text", default="", label="Prompt", cli="--prompt", ui="textbox", ui_lines=4,
            help="generate images for this prompt, then exit", kwarg="input_prompt"),
    Setting(key="negative_prompt", type="text", default="", label="Negative prompt", cli="--negative-prompt",
            prompt_options=("n",), a1111="Negative prompt", ui="textbox", ui_lines=2,
            help="what the image should not show (unused at CFG 1)", kwarg="n_prompt"),
)

SIZE_SETTINGS = (
    Setting(key="resolution", type="resolution", default="832x480", label="Resolution (W x H)",
            cli="--resolution", prompt_options=("w", "h"), a1111="Size", ui="resolution",
            multiple_from="vae_block_size", presets_from="resolutions",
            help="width x height in pixels, multiples of the model's block size (16)",
            kwarg=lambda value: dict(zip(("width", "height"), parse_resolution(value, 1)))),
    Setting(key="batch_size", type="int", default=1, label="Batch size", low=1, high=DEFAULT_BATCH_SIZE_MAX,
            high_from="image_batch_size_max", cli="--batch-size", ui_step=1,
            help="images per prompt; image i uses seed + i", kwarg="batch_size"),
)

SAMPLING_SETTINGS = (
    Setting(key="num_inference_steps", type="int", default=30, label="Steps", low=1, high=1000, cli="--steps",
            prompt_options=("s",), a1111="Steps", ui_step=1, help="sampling steps", kwarg="sampling_steps"),
    Setting(key="guidance_scale", type="float", default=5.0, label="CFG scale", low=0, high=100,
            cli="--guidance", prompt_options=("l", "g"), a1111="CFG scale", ui_step=0.1,
            help="classifier-free guidance scale (1 skips the negative prompt)", kwarg="guide_scale"),
    Setting(key="flow_shift", type="float", default=3.0, label="Shift", low=0, low_open=True, high=100,
            cli="--shift", prompt_options=("fs",), a1111="Shift", ui_step=0.1,
            help="flow shift of the sigma schedule", kwarg="shift"),
    Setting(key="sample_solver", type="text", default="", label="Sampler", choices_from="sample_solvers",
            cli="--sampler", metavar="NAME", a1111="Sampler", ui="dropdown",
            help="sampler (ComfyUI's names)", kwarg="sample_solver"),
    Setting(key="seed", type="int", default=-1, label="Seed (-1 = random)", low=-1, high=MAX_SEED, cli="--seed",
            prompt_options=("d",), a1111="Seed", ui_step=1,
            help="-1 for a random seed; image i of a batch uses seed + i", kwarg="seed"),
)
# The sigma schedule, and CFG applied only in the first steps (issue 13).
SCHEDULER_SETTINGS = (
    Setting(key="scheduler", type="text", default="", label="Scheduler", choices_from="schedulers",
            cli="--scheduler", metavar="NAME", a1111="Schedule type", ui="dropdown",
            help="sigma schedule (ComfyUI's names)", kwarg="scheduler"),
    Setting(key="cfg_truncation_perc", type="float", default=100.0, label="CFG on the first % of steps", low=0,
            high=100, cli="--cfg-truncation", metavar="PERCENT", a1111="CFG truncation",
            a1111_when=lambda settings: float(settings.get("cfg_truncation_perc", 100.0)) != 100.0,
            ui_step=5, help="apply CFG only in this first percentage of the steps, the later ones run the positive "
            "prompt alone (faster); 100 = every step", kwarg=lambda value: {"cfg_truncation": value / 100},
            upstream_custom=("cfg_truncation", 100.0)),
)

LORA_SETTINGS = (
    Setting(key="activated_loras", type="names", default=(), label="LoRAs", cli="--lora", ui="loras",
            help="a LoRA file in the LoRA folder (or, on the command line, any path); repeat for several"),
    Setting(key="loras_multipliers", type="numbers", default="", label="LoRA strengths",
            cli="--lora-multipliers", ui="strengths", help="one strength per --lora, space separated (default 1)"),
)
# Image inputs, under Wan2GP's keys (guide image, mask, denoising / masking strength, outpainting), and the hires pass.


def outpainting_margins(text: Any) -> tuple[int, int, int, int] | None:
    """Wan2GP's `video_guide_outpainting` "top bottom left right" (whole percentages of the source) as a
    tuple; None when off ("", "#..." or all zero). Only well-formed text reaches here (the pattern)."""
    text = str(text or "").strip()
    if not text or text.startswith("#"):
        return None
    margins = tuple(int(v) for v in text.split())
    return margins if any(margins) and len(margins) == 4 else None


def guide_letters(settings: Mapping[str, Any]) -> str:
    """Wan2GP's `video_prompt_type` letters of a task: as given, or when empty, chosen from its files:
    a source image alone is image to image ("GUV"), with a mask, outpainting or image_mode 2 it is
    inpainting ("VAG"); without a source image, none."""
    letters = str(settings.get("video_prompt_type") or "")
    if letters or not settings.get("image_guide"):
        return letters
    try:
        margins = outpainting_margins(settings.get("video_guide_outpainting"))
    except ValueError:
        margins = None
    masked = settings.get("image_mask") or margins or str(settings.get("image_mode")) == "2"
    return "VAG" if masked else "GUV"


def _guided(settings: Mapping[str, Any]) -> bool:
    return bool(settings.get("image_guide")) and "V" in guide_letters(settings)


def _denoised_guide(settings: Mapping[str, Any]) -> bool:
    return _guided(settings) and "G" in guide_letters(settings)


def letters_mask(letters: str) -> bool:
    """Whether Wan2GP's letters mask the source: A (a mask) without U (its identity preprocessing)."""
    return "A" in letters and "U" not in letters


def _masked(settings: Mapping[str, Any]) -> bool:
    return _guided(settings) and letters_mask(guide_letters(settings))


def hires_on(scale: Any) -> bool:
    """Whether a `hires_scale` value asks for a hires pass (above 1; empty or unreadable: no)."""
    try:
        return float(scale or 1) > 1
    except (TypeError, ValueError):
        return False


def _hires(settings: Mapping[str, Any]) -> bool:
    return hires_on(settings.get("hires_scale"))


IMAGE_INPUT_SETTINGS = (
    Setting(key="image_guide", type="file", default=None, label="Source image", cli="--image",
            ui="image", help="image to image: start from this picture (resized to the output size; "
            "without --resolution the output takes its size)"),
    Setting(key="image_mask", type="file", default=None, label="Mask (white = repaint)", cli="--mask", ui="mask",
            help="inpainting: repaint the white area of this mask of the source image, keep the black"),
    Setting(key="denoising_strength", type="float", default=1.0, label="Denoising strength", low=0, high=1,
            cli="--denoise", a1111="Denoising strength", a1111_when=_denoised_guide, ui_step=0.01,
            help="how much of the source image is redrawn: 0 keeps it, 1 starts from pure noise (default 0.7)",
            kwarg="denoising_strength"),
    Setting(key="masking_strength", type="float", default=1.0, label="Masking strength", low=0, high=1,
            ui_step=0.01, cli="--masking-strength",
            help="keep the unmasked area during this fraction of the steps (lower: more freedom)",
            kwarg="masking_strength"),
    Setting(key="mask_expand", type="int", default=0, label="Expand / shrink mask (px)", low=-64, high=64,
            cli="--mask-expand", ui_step=1, help="grow (or, negative, shrink) the mask by about 3x this many pixels"),
    Setting(key="mask_blur", type="int", default=0, label="Mask blur (px)", low=0, high=64, cli="--mask-blur",
            a1111="Mask blur", a1111_when=_masked, ui_step=1, help="soften the mask's edge (Gaussian, pixels)"),
    Setting(key="video_guide_outpainting", type="text", default="", label="Outpaint (% top bottom left right)",
            pattern=r"\s*(#.*)?|\s*\d+\s+\d+\s+\d+\s+\d+\s*", cli="--outpaint", metavar="'T B L R'",
            pattern_help="four whole percentages of the source 'top bottom left right', e.g. '0 0 25 25'",
            ui="textbox", help="extend the canvas beyond the source image by these percentages and paint there"),
    Setting(key="image_mode", type="int", default=1, label="Mode",
            choices=(("Text / image to image", 1), ("Inpainting", 2)), cli="--image-mode", ui="dropdown",
            help="Wan2GP's tab: 1 text or image to image, 2 inpainting (a mask or outpainting also means 2)"),
    Setting(key="video_prompt_type", type="text", default="", label="Guide letters (empty = automatic)",
            pattern=r"[A-Za-z0-9+#-]*", pattern_help="Wan2GP's letters, e.g. GUV (image to image) or VAG (inpainting)",
            cli="--guide-letters", metavar="LETTERS", ui="textbox",
            help="Wan2GP's control letters; empty: GUV for a source image alone, VAG with a mask or outpainting"),
    Setting(key="hires_scale", type="float", default=1.0, label="Hires fix upscale (1 = off)", low=1, high=4,
            cli="--hires-scale", a1111="Hires upscale", a1111_when=_hires, ui_step=0.05,
            help="after generating, upscale by this factor (Lanczos, multiples of 16) and denoise again; "
            "Anima degrades past about 1.5", kwarg="hires_scale"),
    Setting(key="hires_denoise", type="float", default=0.5, label="Hires denoise", low=0, high=1,
            cli="--hires-denoise", a1111="Denoising strength",
            a1111_when=lambda s: _hires(s) and not _denoised_guide(s), ui_step=0.01,
            help="denoising strength of the hires pass", kwarg="hires_denoise"),
    Setting(key="hires_steps", type="int", default=0, label="Hires steps (0 = same)", low=0, high=1000,
            cli="--hires-steps", a1111="Hires steps", a1111_when=_hires, ui_step=1,
            help="steps of the hires pass (0: as many as the first pass)", kwarg="hires_steps"),
    Setting(key="hires_upscaler", type="text", default="Lanczos", label="Hires upscaler",
            choices=(("Lanczos", "Lanczos"),), cli="--hires-upscaler", a1111="Hires upscaler", a1111_when=_hires,
            ui="dropdown",
            help="how the first image is enlarged", kwarg="hires_upscaler"),
)


def _step_cache_on(settings: Mapping[str, Any]) -> bool:
    return bool(settings.get("skip_steps_cache_type"))


# Step-skipping caches, under Wan2GP's keys; the family lists its caches and multipliers in its definition.
STEP_CACHE_SETTINGS = (
    Setting(key="skip_steps_cache_type", type="text", default="", label="Step cache", choices=(("Off", ""),),
            choices_from="skip_steps_cache_choices", cli="--step-cache", metavar="NAME", a1111="Step cache",
            ui="dropdown", kwarg="skip_steps_cache_type",
            help="skip DiT evaluations that would change little: tea (TeaCache) or first_block (First-Block "
                 "Cache); off: every step computed in full"),
    Setting(key="skip_steps_multiplier", type="float", default=1.75, label="Step cache speed-up",
            choices=tuple((f"x{m:g}", m) for m in (1.5, 1.75, 2.0, 2.25, 2.5)),
            choices_from="skip_steps_multiplier_choices", cli="--step-cache-speed", a1111="Step cache speed",
            a1111_when=_step_cache_on, ui="dropdown", kwarg="skip_steps_multiplier",
            help="the step cache's target speed-up, e.g. 1.5, 2 or 2.5 (more skips, more change)"),
    Setting(key="skip_steps_start_step_perc", type="int", default=0, label="Step cache starts at (% of steps)",
            low=0, high=100, cli="--step-cache-start", metavar="PERCENT", a1111="Step cache start",
            a1111_when=_step_cache_on, ui_step=1, kwarg="skip_steps_start_step_perc",
            help="no skipping in this first percentage of the steps (the first and last steps always run)"),
)

SETTINGS = Schema((
    SettingGroup("Prompt", PROMPT_SETTINGS, main=True),
    SettingGroup("Size", SIZE_SETTINGS, main=True),
    SettingGroup("Sampling", SAMPLING_SETTINGS + SCHEDULER_SETTINGS, main=True),
    SettingGroup("LoRAs", LORA_SETTINGS),
    SettingGroup("Image input", IMAGE_INPUT_SETTINGS),
    SettingGroup("Step cache", STEP_CACHE_SETTINGS),
))
