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


def write_tiny_lora(path: str | Path, *, width: int = 64, seed: int = 0) -> Path:
    """A kohya-format LoRA on the tiny DiT's first query projection (64 wide), strong enough to show; another
    `width` makes one that does not fit the model."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    key = "lora_unet_blocks_0_self_attn_q_proj"
    save_file({f"{key}.lora_down.weight": torch.randn(4, width, generator=g).to(torch.bfloat16),
               f"{key}.lora_up.weight": torch.randn(width, 4, generator=g).to(torch.bfloat16),
               f"{key}.alpha": torch.tensor(4.0, dtype=torch.bfloat16)}, str(path))
    return Path(path)
