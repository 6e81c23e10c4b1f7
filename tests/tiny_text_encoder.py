"""Tiny Qwen3 text-encoder checkpoints in the real `qwen_3_06b_base.safetensors` layout.

Same keys as the real file (`model.`-prefixed HF Qwen3 names, no `lm_head.weight`), bf16, full Qwen vocab
(151936) so real prompt ids index it; only the widths and the layer count shrink. Written with `save_file`
from an explicit dict: `save_model` on a tied Qwen3ForCausalLM would keep `lm_head` and drop the embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

QWEN_VOCAB = 151936


def make_text_encoder_state_dict(*, seed: int = 0, dtype: torch.dtype = torch.bfloat16, hidden: int = 32,
                                 layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                                 intermediate: int = 64) -> dict[str, Tensor]:
    """Random weights scaled so activations stay O(1): linears ~ N(0, 1/fan_in), norm gains near 1."""
    generator = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> Tensor:
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    def gain(size: int) -> Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=generator)

    sd = {"model.embed_tokens.weight": torch.randn(QWEN_VOCAB, hidden, generator=generator)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": linear(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": linear(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": linear(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": linear(hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": gain(head_dim),
            p + "self_attn.k_norm.weight": gain(head_dim),
            p + "mlp.gate_proj.weight": linear(intermediate, hidden),
            p + "mlp.up_proj.weight": linear(intermediate, hidden),
            p + "mlp.down_proj.weight": linear(hidden, intermediate),
            p + "input_layernorm.weight": gain(hidden),
            p + "post_attention_layernorm.weight": gain(hidden),
        }
    sd["model.norm.weight"] = gain(hidden)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_text_encoder_file(path: str | Path, **kw) -> Path:
    """Write `make_text_encoder_state_dict(**kw)` to `path` and return it."""
    path = Path(path)
    save_file(make_text_encoder_state_dict(**kw), path)
    return path
