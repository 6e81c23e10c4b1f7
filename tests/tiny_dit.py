"""Small random-weight Anima DiT checkpoints in the real file format: the real key names (with the
`net.` prefix by default), bf16 tensors, and only the widths and depths shrunk.

Weights are scaled so activations stay O(1): linear weights ~ N(0, 1/fan_in), norm weights near 1
(not exactly 1, so a norm applied without its weight shows up in parity tests), small biases.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

LATENT_CHANNELS = 16
PATCH_FEATURES_PER_CHANNEL = 4  # 1 x 2 x 2 patches
T5_VOCAB_SIZE = 32128
MLP_RATIO = 4


def _dit_shapes(c: int, num_blocks: int, head_dim: int, text_dim: int, lora: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "x_embedder.proj.1.weight": (c, (LATENT_CHANNELS + 1) * PATCH_FEATURES_PER_CHANNEL),
        "t_embedder.1.linear_1.weight": (c, c),
        "t_embedder.1.linear_2.weight": (3 * c, c),
        "t_embedding_norm.weight": (c,),
        "final_layer.linear.weight": (LATENT_CHANNELS * PATCH_FEATURES_PER_CHANNEL, c),
        "final_layer.adaln_modulation.1.weight": (lora, c),
        "final_layer.adaln_modulation.2.weight": (2 * c, lora),
    }
    for i in range(num_blocks):
        b = f"blocks.{i}."
        for attn, context_dim in (("self_attn", c), ("cross_attn", text_dim)):
            shapes |= {
                f"{b}{attn}.q_proj.weight": (c, c),
                f"{b}{attn}.k_proj.weight": (c, context_dim),
                f"{b}{attn}.v_proj.weight": (c, context_dim),
                f"{b}{attn}.output_proj.weight": (c, c),
                f"{b}{attn}.q_norm.weight": (head_dim,),
                f"{b}{attn}.k_norm.weight": (head_dim,),
            }
        shapes |= {f"{b}mlp.layer1.weight": (MLP_RATIO * c, c), f"{b}mlp.layer2.weight": (c, MLP_RATIO * c)}
        for branch in ("self_attn", "cross_attn", "mlp"):
            shapes |= {f"{b}adaln_modulation_{branch}.1.weight": (lora, c),
                       f"{b}adaln_modulation_{branch}.2.weight": (3 * c, lora)}
    return shapes


def _adapter_shapes(d: int, num_layers: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    p = "llm_adapter."
    shapes = {
        f"{p}embed.weight": (T5_VOCAB_SIZE, d),
        f"{p}out_proj.weight": (d, d),
        f"{p}out_proj.bias": (d,),
        f"{p}norm.weight": (d,),
    }
    for i in range(num_layers):
        b = f"{p}blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            shapes |= {f"{b}norm_{attn}.weight": (d,)}
            shapes |= {f"{b}{attn}.{name}.weight": (d, d) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
            shapes |= {f"{b}{attn}.q_norm.weight": (head_dim,), f"{b}{attn}.k_norm.weight": (head_dim,)}
        shapes |= {
            f"{b}norm_mlp.weight": (d,),
            f"{b}mlp.0.weight": (MLP_RATIO * d, d),
            f"{b}mlp.0.bias": (MLP_RATIO * d,),
            f"{b}mlp.2.weight": (d, MLP_RATIO * d),
            f"{b}mlp.2.bias": (d,),
        }
    return shapes


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    values = torch.randn(shape, generator=generator)
    if key.endswith("embed.weight"):
        return values
    if "norm" in key:
        return 1.0 + 0.1 * values
    if key.endswith(".bias"):
        return 0.1 * values
    return values / shape[1] ** 0.5


def make_dit_state_dict(*, seed: int = 0, dtype: torch.dtype = torch.bfloat16, prefix: str = "net.",
                        model_channels: int = 64, num_blocks: int = 2, num_heads: int = 4, text_dim: int = 32,
                        adapter_layers: int = 2, adapter_heads: int = 4,
                        adaln_lora_dim: int = 16) -> dict[str, Tensor]:
    """DiT + LLM adapter tensors keyed as in `anima-preview.safetensors`. `text_dim` is the DiT's
    cross-attention width, the adapter width and the Qwen hidden size of the matching tiny encoder."""
    shapes = _dit_shapes(model_channels, num_blocks, model_channels // num_heads, text_dim, adaln_lora_dim)
    shapes |= _adapter_shapes(text_dim, adapter_layers, text_dim // adapter_heads)
    generator = torch.Generator().manual_seed(seed)
    return {prefix + key: _random_tensor(key, shape, generator).to(dtype) for key, shape in shapes.items()}


def write_dit_file(path: str | Path, **kw) -> Path:
    """`make_dit_state_dict(**kw)` saved as a safetensors file at `path`."""
    path = Path(path)
    save_file(make_dit_state_dict(**kw), str(path))
    return path
