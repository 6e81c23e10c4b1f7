"""The app's side of LoRAs: listing the LoRA folder, finding a file by name, and the short hash A1111
writes in `Lora hashes` (sha256 of the tensor data after the safetensors header, first 12 hex digits, the
"AutoV3"/addnet hash Civitai matches on)."""

from __future__ import annotations

import hashlib
import os
import struct
from functools import lru_cache
from pathlib import Path

LORA_SUFFIX = ".safetensors"


def list_loras(lora_dir: str | os.PathLike | None) -> list[str]:
    """LoRA files under `lora_dir` (subfolders included), as paths relative to it."""
    if lora_dir is None or not Path(lora_dir).is_dir():
        return []
    root = Path(lora_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{LORA_SUFFIX}") if p.is_file())


def find_lora(name: str, lora_dir: str | os.PathLike | None) -> Path:
    """`lora_dir/name` (`.safetensors` may be left out), else the same file name in a subfolder."""
    file_name = name if name.endswith(LORA_SUFFIX) else name + LORA_SUFFIX
    root = Path(lora_dir) if lora_dir is not None else None
    if root is not None:
        direct = root / file_name
        if direct.is_file():
            return direct
        found = sorted(p for p in root.rglob(Path(file_name).name) if p.is_file()) if root.is_dir() else []
        if found:
            return found[0]
    given = Path(name).expanduser()
    if given.is_file() and given.suffix == LORA_SUFFIX:
        return given
    where = f"in the LoRA folder '{root}'" if root is not None else "(no LoRA folder is set)"
    raise ValueError(f"LoRA '{name}' not found {where}; only {LORA_SUFFIX} files are loaded.")


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
