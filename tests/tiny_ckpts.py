"""A tiny but real-format Anima checkpoint folder: the three files under their real names, flat (`ckpts/`).

The DiT's cross-attention width equals the tiny text encoder's hidden size (32), as the real 1024 do.
"""

from __future__ import annotations

from pathlib import Path

from tests.tiny_dit import write_dit_file
from tests.tiny_text_encoder import write_text_encoder_file
from tests.tiny_vae import write_vae_file

DIT_FILE = "anima-preview.safetensors"
TEXT_ENCODER_FILE = "qwen_3_06b_base.safetensors"
VAE_FILE = "qwen_image_vae.safetensors"


def write_tiny_ckpts(directory: str | Path, *, seed: int = 0) -> Path:
    """Writes the DiT, text encoder and VAE files into `directory` (created if needed) and returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_dit_file(directory / DIT_FILE, seed=seed)
    write_text_encoder_file(directory / TEXT_ENCODER_FILE, seed=seed + 1)
    write_vae_file(directory / VAE_FILE, seed=seed + 2)
    return directory
