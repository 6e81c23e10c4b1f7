"""The app's side of LoRAs: listing the LoRA folder, finding a task's LoRA files, and the short hash A1111
writes in `Lora hashes` (sha256 of the tensor data after the safetensors header, first 12 hex digits, the
"AutoV3"/addnet hash Civitai matches on).

Names become files by the family's one rule (its handler's `find_lora`, the rule its `generate` applies
to prompt tags), so a name always means the same file. Names stay inside the LoRA folder; only paths the
local user gave on the command line (`local_paths`) may lie elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

LORA_SUFFIX = ".safetensors"
_MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TaskLora:
    name: str  # as the task or the prompt tag wrote it
    path: Path
    strength: float
    from_tag: bool  # written as a <lora:...> tag in the prompt


def list_loras(lora_dir: str | os.PathLike | None) -> list[str]:
    """LoRA files under `lora_dir` (subfolders included), as paths relative to it."""
    if lora_dir is None or not Path(lora_dir).is_dir():
        return []
    root = Path(lora_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{LORA_SUFFIX}") if p.is_file())


def _check_safetensors(name: str, path: Path) -> None:
    """A cheap look at the header, so a task with a broken LoRA fails before generating, not after."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header = json.loads(f.read(size)) if 2 <= size <= _MAX_HEADER_BYTES else None
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"LoRA '{name}' is not a readable safetensors file.")


def task_loras(task: Any, handler: type, lora_dir: Path, *,
               local_paths: Collection[str] = ()) -> tuple[str, list[TaskLora]]:
    """(the prompt without its LoRA tags, the task's LoRAs): `activated_loras` with their strengths, then
    the prompt's `<lora:name:strength>` tags. Every file is found and checked; ValueError names the first
    that is not."""
    prompt = task["prompt"]
    wanted = [(name, strength, False) for name, strength in zip(task["activated_loras"], task.lora_strengths())]
    if hasattr(handler, "split_lora_tags"):
        prompt, tags = handler.split_lora_tags(prompt)
        wanted += [(name, strength, True) for name, strength in tags]
    if wanted and not hasattr(handler, "find_lora"):
        raise ValueError("This model family cannot load LoRAs by name.")
    loras = []
    for name, strength, from_tag in wanted:
        path = Path(handler.find_lora(name, str(lora_dir), allow_paths=not from_tag and name in local_paths))
        _check_safetensors(name, path)
        loras.append(TaskLora(name, path, strength, from_tag))
    return prompt, loras


@lru_cache(maxsize=256)
def _cached_hash(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = f.read(8)
        if len(header) == 8:
            f.seek(8 + struct.unpack("<Q", header)[0])
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def lora_short_hash(path: str | os.PathLike) -> str:
    """A1111's LoRA short hash; cached per file version so a batch hashes each file once."""
    stat = Path(path).stat()
    return _cached_hash(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
