"""Prompt files in sd-scripts' format: one prompt a line, with inline overrides.

    # lines starting with '#' are comments; blank lines are skipped
    1girl, solo, smile --w 832 --h 1216 --d 42 --s 30 --l 4.5 --n lowres, bad hands

Overrides: `--w` width, `--h` height, `--d` seed, `--s` steps, `--l` (or `--g`) CFG scale, `--fs` flow
shift, `--n` negative prompt (the rest of that segment, commas included).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# option -> (settings key, type); width and height are combined into `resolution` later
_OPTIONS: dict[str, tuple[str, type]] = {
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "s": ("num_inference_steps", int),
    "l": ("guidance_scale", float),
    "g": ("guidance_scale", float),
    "fs": ("flow_shift", float),
    "n": ("negative_prompt", str),
}
_OPTION = re.compile(r"^([a-z]+)(?:\s+(.*))?$", re.DOTALL)


@dataclass(frozen=True)
class PromptLine:
    """One prompt of the file with its overrides, as settings keys."""

    line_no: int
    prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def task(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """Settings for this line: `prompt`, the overrides, and `resolution` completed from `base`'s."""
        task = {k: v for k, v in self.overrides.items() if k not in ("width", "height")}
        task["prompt"] = self.prompt
        if "width" in self.overrides or "height" in self.overrides:
            width, height = str(base.get("resolution", "1024x1024")).lower().split("x")
            task["resolution"] = f"{self.overrides.get('width', width)}x{self.overrides.get('height', height)}"
        return task


def parse_prompt_line(text: str, *, where: str = "prompt") -> tuple[str, dict[str, Any]]:
    """(prompt, overrides) of one line; `where` names the line in error messages."""
    prompt, *segments = text.split(" --")
    if prompt.startswith("--"):  # a line made of options only
        prompt, segments = "", [prompt[2:], *segments]
    overrides: dict[str, Any] = {}
    for segment in segments:
        match = _OPTION.match(segment.strip())
        if not match or match.group(1) not in _OPTIONS:
            name = segment.strip().split(" ", 1)[0]
            known = " ".join(f"--{o}" for o in _OPTIONS)
            raise ValueError(f"{where}: unknown option '--{name}' (known: {known}).")
        option, value = match.group(1), (match.group(2) or "").strip()
        key, kind = _OPTIONS[option]
        try:
            overrides[key] = kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{where}: --{option} needs {what}, got '{value}'.") from None
    return prompt.strip(), overrides


def read_prompts_file(path: str | os.PathLike) -> list[PromptLine]:
    """Every prompt of the file, in order; a clear ValueError for a missing file or a bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"Prompts file not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"Prompts file {path} is not UTF-8 text.") from None
    lines = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        prompt, overrides = parse_prompt_line(stripped, where=f"{path} line {line_no}")
        lines.append(PromptLine(line_no, prompt, overrides))
    if not lines:
        raise ValueError(f"Prompts file {path} has no prompts (only blank or '#' lines).")
    return lines
