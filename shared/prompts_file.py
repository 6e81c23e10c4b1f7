"""Prompt files in sd-scripts' format: one prompt a line, with inline overrides.

    # lines starting with '#' are comments; blank lines are skipped
    1girl, solo, smile --w 832 --h 1216 --d 42 --s 30 --l 4.5 --n lowres, bad hands

The options are the settings schema's `prompt_options` (shared/settings_schema.py): `--w` width, `--h`
height, `--d` seed, `--s` steps, `--l` (or `--g`) CFG scale, `--fs` flow shift, `--n` negative prompt
(the rest of that segment, commas included).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.settings_schema import SETTINGS, Schema, Setting, SettingsError

_OPTION = re.compile(r"^([a-z]+)(?:\s+(.*))?$", re.DOTALL)
# Word processors turn "--" into a dash; such an "option" would silently stay in the prompt.
_DASHED_OPTION = re.compile(r"(?:^|\s)([\u2012\u2013\u2014\u2015\u2212]{1,2})([a-z]+)(?=\s|$)")
_SIDES = ("width", "height")


def _options(schema: Schema) -> dict[str, tuple[Setting, str | None]]:
    """option -> (setting, side): a resolution's two options set its width and its height."""
    options = {}
    for setting in schema:
        for i, option in enumerate(setting.prompt_options):
            options[option] = (setting, _SIDES[i] if setting.type == "resolution" else None)
    return options


@dataclass(frozen=True)
class PromptLine:
    """One prompt of the file with its overrides, as settings keys (a resolution's sides as width/height)."""

    line_no: int
    prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def task(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """Settings for this line: `prompt`, the overrides, and `resolution` completed from `base`'s."""
        task = {k: v for k, v in self.overrides.items() if k not in _SIDES}
        task["prompt"] = self.prompt
        if any(side in self.overrides for side in _SIDES):
            width, height = str(base.get("resolution", "")).lower().partition("x")[::2]
            task["resolution"] = f"{self.overrides.get('width', width)}x{self.overrides.get('height', height)}"
        return task


def parse_prompt_line(text: str, *, where: str = "prompt", schema: Schema = SETTINGS) -> tuple[str, dict[str, Any]]:
    """(prompt, overrides) of one line; `where` names the line in error messages."""
    options = _options(schema)
    known = " ".join(f"--{o}" for o in options)
    dashed = next((m for m in _DASHED_OPTION.finditer(text) if m.group(2) in options), None)
    if dashed:
        raise ValueError(f"{where}: '{dashed.group(1)}{dashed.group(2)}' is written with a dash character; "
                         f"options take two hyphens: --{dashed.group(2)}.")
    prompt, *segments = text.split(" --")
    if prompt.startswith("--"):  # a line made of options only
        prompt, segments = "", [prompt[2:], *segments]
    overrides: dict[str, Any] = {}
    for segment in segments:
        match = _OPTION.match(segment.strip())
        if not match or match.group(1) not in options:
            name = segment.strip().split(" ", 1)[0]
            raise ValueError(f"{where}: unknown option '--{name}' (known: {known}).")
        option, value = match.group(1), (match.group(2) or "").strip()
        setting, side = options[option]
        if side is not None:
            if not value.isdigit():
                raise ValueError(f"{where}: --{option} needs a whole number, got '{value}'.")
            overrides[side] = int(value)
            continue
        try:
            overrides[setting.key] = setting.parse(value)
        except SettingsError as e:
            raise ValueError(f"{where}: --{option}: {e}") from None
    return prompt.strip(), overrides


def read_prompts_file(path: str | os.PathLike, schema: Schema = SETTINGS) -> list[PromptLine]:
    """Every prompt of the file, in order; a clear ValueError for a missing file or a bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"Prompts file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"Prompts file {path} is a folder, not a file.") from None
    except UnicodeDecodeError:
        raise ValueError(f"Prompts file {path} is not UTF-8 text.") from None
    lines = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        prompt, overrides = parse_prompt_line(stripped, where=f"{path} line {line_no}", schema=schema)
        lines.append(PromptLine(line_no, prompt, overrides))
    if not lines:
        raise ValueError(f"Prompts file {path} has no prompts (only blank or '#' lines).")
    return lines
