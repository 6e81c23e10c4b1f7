"""LoRA names: A1111 `<lora:name:0.8>` tags in prompts, and the one rule that turns a name into a file.

The rule (`find_lora_file`), used for every LoRA name the app or a prompt gives:
1. `lora_dir/name`, `.safetensors` added when left out; the name may hold subfolders (`styles/ink`);
2. else a file of that name anywhere under `lora_dir` (the first, in sorted path order);
3. only when `allow_paths` (a path the local user typed on the command line): `name` as a path of its own.
A name that would leave the LoRA folder (absolute, or with `..`) is refused unless `allow_paths`, before
any file is looked at, so a remote client can neither load nor probe files elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath

LORA_SUFFIX = ".safetensors"
_LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
_MARK = "\x00"


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove A1111 `<lora:name:0.8>` / `<lora:name>` (strength 1.0) tags from `prompt`.

    Returns the prompt with the separators around each tag tidied ("a, <lora:x>, b" -> "a, b") and the
    [(name, strength)] found, in order. A prompt without tags comes back unchanged."""
    loras = []

    def take(match: re.Match) -> str:
        body = match.group(1).strip()
        name, sep, strength = body.rpartition(":")
        if not sep:
            name, strength = body, "1"
        try:
            value = float(strength)
        except ValueError:
            raise ValueError(f"LoRA tag '{match.group(0)}': the strength after the last ':' must be a number, "
                             "as in <lora:name:0.8>.") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"LoRA tag '{match.group(0)}': the strength must be a finite number.")
        if not name.strip():
            raise ValueError(f"LoRA tag '{match.group(0)}' names no LoRA; write it as <lora:name:0.8>.")
        loras.append((name.strip(), value))
        return _MARK

    marked = _LORA_TAG.sub(take, prompt.replace(_MARK, ""))
    if not loras:
        return prompt, []
    marked = re.sub(rf"\s*{_MARK}[\s{_MARK}]*", _MARK, marked)
    pieces = marked.split(_MARK)
    text = pieces[0]
    for right in pieces[1:]:
        text = _join_around_removed_tag(text, right)
    return text.strip(), loras


def _join_around_removed_tag(left: str, right: str) -> str:
    """Join the text on both sides of a removed tag, dropping the separator the tag leaves orphaned."""
    left_sep = left.endswith(",")
    if not left.strip():
        return right.lstrip(", \t\n")
    if not right.strip():
        return left.rstrip(", \t\n")
    if right.startswith(","):
        return left + right if not left_sep else left + right[1:]
    return left + " " + right


def _inside(name: str) -> bool:
    """Whether `name` stays inside the folder it is joined to (relative, no `..`, no drive)."""
    parts = PurePath(name.replace("\\", "/"))
    return not (parts.is_absolute() or parts.drive or ".." in parts.parts or name.startswith("~"))


def _find_by_name(root: Path, file_name: str) -> Path | None:
    matches = sorted(Path(folder) / file_name for folder, _, names in os.walk(root, followlinks=True)
                     if file_name in names)
    return next((m for m in matches if m.is_file()), None)


def find_lora_file(name: str | os.PathLike, lora_dir: str | os.PathLike | None, *,
                   allow_paths: bool = False) -> Path:
    """The LoRA file for `name` by the rule of this module's docstring; ValueError (naming only the LoRA
    folder) when there is none."""
    name = str(name).strip()
    file_name = name if name.endswith(LORA_SUFFIX) else name + LORA_SUFFIX
    root = Path(lora_dir).expanduser() if lora_dir is not None else None
    if _inside(name):
        if root is not None:
            direct = root / file_name
            if direct.is_file():
                return direct
            found = _find_by_name(root, PurePath(file_name).name) if root.is_dir() else None
            if found is not None:
                return found
    elif not allow_paths:
        raise ValueError(f"LoRA '{name}': a LoRA name must stay inside the LoRA folder "
                         f"'{root if root is not None else 'loras'}' (no absolute paths or '..').")
    if allow_paths:
        given = Path(name).expanduser()
        if given.is_file() and given.suffix == LORA_SUFFIX:
            return given
    where = f"in the LoRA folder '{root}' or its subfolders" if root is not None else "(no LoRA folder is set)"
    raise ValueError(f"LoRA '{name}' not found {where}; only {LORA_SUFFIX} files are loaded.")
