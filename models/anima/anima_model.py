"""The Anima diffusion transformer: Cosmos-Predict2's MiniTrainDIT plus the LLM adapter that turns
Qwen3 hidden states and T5 token ids into the DiT's cross-attention context.

Module attribute names equal the checkpoint keys without their `net.` prefix, so a checkpoint loads
with no renaming. The architecture is read from tensor shapes (`DiTConfig.from_state_dict`,
`AdapterConfig.from_state_dict`), so finetunes and tiny test files load through the same path.

Reference semantics: ComfyUI `comfy/ldm/cosmos/predict2.py` and `comfy/ldm/anima/model.py`
(spec: anima_reference.md §2, §3). Time convention: `timesteps` is sigma in [0, 1] (1 = pure noise)
and the output is the flow velocity v = noise - x0.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.attention import pay_attention

from .diffusers_format import is_diffusers_folder, read_diffusers_dit
from .lora import to_mmgp_lora_state_dict
from .quant import comfy_quant_state_dict, quantize_weight
from .step_cache import CachedRows
from .weights import (WeightsError, load_module_strict, open_state_dict, require_kind, required_shape,
                      save_state_dict, strip_prefix)

# Longest first: `model.diffusion_model.net.` (Forge) must not lose only its `model.diffusion_model.`.
CHECKPOINT_PREFIXES = ("model.diffusion_model.net.", "model.diffusion_model.", "diffusion_model.", "net.")
NORM_EPS = 1e-6
PATCH_SPATIAL = 2
PATCH_TEMPORAL = 1
ROPE_EXTRAPOLATION_THW = (1.0, 4.0, 4.0)  # Anima's rope_{t,h,w}_extrapolation_ratio
ROPE_THETA = 10000.0
TIMESTEP_MAX_PERIOD = 10000.0
MIN_CONTEXT_TOKENS = 512  # the T5 interface the DiT was trained with: context is zero-padded to this

RopeTable = tuple[Tensor, Tensor]  # (cos, sin), each [L, 1, head_dim // 2]


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    return required_shape(sd, key, what="Anima DiT")


def _count_blocks(sd: Mapping[str, Tensor], prefix: str) -> int:
    indices = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    if not indices or not all(i.isdigit() for i in indices):
        raise WeightsError(f"The Anima DiT weights have no '{prefix}<n>.*' tensors; the file is not an Anima DiT.")
    return 1 + max(int(i) for i in indices)


def _heads(width: int, head_dim: int, what: str) -> int:
    if head_dim == 0 or width % head_dim:
        raise WeightsError(f"The Anima DiT weights are inconsistent: the {what} width {width} is not a multiple "
                           f"of its q_norm size {head_dim}.")
    return width // head_dim


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int  # latent channels, without the padding-mask channel
    out_channels: int
    model_channels: int
    num_blocks: int
    num_heads: int
    mlp_hidden: int
    crossattn_dim: int  # width of the context tokens
    adaln_lora_dim: int
    patch_spatial: int
    patch_temporal: int
    rope_extrapolation_thw: tuple[float, float, float]

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> DiTConfig:
        """Architecture of an un-prefixed DiT state dict, from its tensor shapes."""
        patch_volume = PATCH_SPATIAL * PATCH_SPATIAL * PATCH_TEMPORAL
        model_channels, patch_features = _shape(sd, "x_embedder.proj.1.weight")
        return cls(
            in_channels=patch_features // patch_volume - 1,
            out_channels=_shape(sd, "final_layer.linear.weight")[0] // patch_volume,
            model_channels=model_channels,
            num_blocks=_count_blocks(sd, "blocks."),
            num_heads=_heads(model_channels, _shape(sd, "blocks.0.self_attn.q_norm.weight")[0], "DiT"),
            mlp_hidden=_shape(sd, "blocks.0.mlp.layer1.weight")[0],
            crossattn_dim=_shape(sd, "blocks.0.cross_attn.k_proj.weight")[1],
            adaln_lora_dim=_shape(sd, "blocks.0.adaln_modulation_self_attn.1.weight")[0],
            patch_spatial=PATCH_SPATIAL,
            patch_temporal=PATCH_TEMPORAL,
            rope_extrapolation_thw=ROPE_EXTRAPOLATION_THW,
        )


@dataclass(frozen=True)
class AdapterConfig:
    source_dim: int  # Qwen3 hidden size
    model_dim: int  # = output width = DiT crossattn_dim
    num_layers: int
    num_heads: int
    mlp_hidden: int
    vocab_size: int  # T5 vocabulary (32128)

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> AdapterConfig:
        """Architecture of the `llm_adapter.*` part of an un-prefixed Anima state dict."""
        vocab_size, model_dim = _shape(sd, "llm_adapter.embed.weight")
        return cls(
            source_dim=_shape(sd, "llm_adapter.blocks.0.cross_attn.k_proj.weight")[1],
            model_dim=model_dim,
            num_layers=_count_blocks(sd, "llm_adapter.blocks."),
            num_heads=_heads(model_dim, _shape(sd, "llm_adapter.blocks.0.self_attn.q_norm.weight")[0], "adapter"),
            mlp_hidden=_shape(sd, "llm_adapter.blocks.0.mlp.0.weight")[0],
            vocab_size=vocab_size,
        )


# ---------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------------


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the split-half pairs (x[j], x[j + D/2]) of every head by the table's angles.

    x [B, L, H, D]; cos, sin [L, 1, D/2]. The arithmetic runs in the table's dtype: the DiT passes an
    fp32 table (rotation in fp32, as the reference does), the adapter one already cast to x's dtype.
    """
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)  # [B, L, H, D/2] each
    # functional (no `out=` into views), so torch.compile traces it in one graph
    out = torch.cat((torch.addcmul(x1 * cos, x2, sin, value=-1),  # x1 cos - x2 sin
                     torch.addcmul(x2 * cos, x1, sin)), dim=-1)  # x2 cos + x1 sin
    return out.to(x.dtype)


def _axis_frequencies(dim: int, extrapolation: float, device: torch.device) -> Tensor:
    # NTK-aware theta: the ratio is spread over the axis' dims as ratio^(dim / (dim - 2))
    theta = ROPE_THETA * extrapolation ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim
    return 1.0 / theta**exponents  # [dim / 2]


def rope_3d_table(head_dim: int, t: int, h: int, w: int, extrapolation_thw: tuple[float, float, float],
                  device: torch.device) -> RopeTable:
    """fp32 cos/sin [t*h*w, 1, head_dim/2] for tokens in (t, h, w) row-major order at integer positions
    from 0; the angle layout per token is [t (dim_t/2) | h (dim_h/2) | w (dim_w/2)]."""
    dim_h = dim_w = head_dim // 6 * 2
    dim_t = head_dim - dim_h - dim_w
    per_axis = []
    for axis, (length, dim, ratio) in enumerate(zip((t, h, w), (dim_t, dim_h, dim_w), extrapolation_thw)):
        positions = torch.arange(length, device=device, dtype=torch.float32)
        axis_angles = torch.outer(positions, _axis_frequencies(dim, ratio, device))  # [length, dim / 2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = length
        per_axis.append(axis_angles.view(shape).expand(t, h, w, -1))
    angles = torch.cat(per_axis, dim=-1).reshape(t * h * w, 1, head_dim // 2)
    return angles.cos(), angles.sin()


def rope_1d_table(head_dim: int, length: int, dtype: torch.dtype, device: torch.device) -> RopeTable:
    """The adapter's rotary table [length, 1, head_dim/2]: computed in fp32, then cast to the activation
    dtype before use, as the reference does (so bf16 runs rotate in bf16)."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------


class _QKNormAttention(nn.Module):
    """q/k/v projections (no bias) with a per-head RMSNorm on q and k, then attention over heads."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        inner_dim = num_heads * head_dim
        self.q_proj = nn.Linear(query_dim, inner_dim, bias=False)
        self.k_proj = nn.Linear(context_dim, inner_dim, bias=False)
        self.v_proj = nn.Linear(context_dim, inner_dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.k_norm = nn.RMSNorm(head_dim, eps=NORM_EPS)

    def attend(self, x: Tensor, context: Tensor, q_rope: RopeTable | None, k_rope: RopeTable | None) -> Tensor:
        heads = (self.num_heads, -1)
        q = self.q_norm(self.q_proj(x).unflatten(-1, heads))  # [B, L, H, Dh]
        k = self.k_norm(self.k_proj(context).unflatten(-1, heads))  # [B, S, H, Dh]
        v = self.v_proj(context).unflatten(-1, heads)  # [B, S, H, Dh]
        if q_rope is not None:
            q = apply_rope(q, *q_rope)
        if k_rope is not None:
            k = apply_rope(k, *k_rope)
        qkv = [q, k, v]
        del q, k, v
        return pay_attention(qkv).flatten(2)  # [B, L, H*Dh]


class Attention(_QKNormAttention):
    """DiT attention; RoPE is applied (after the q/k norms) only in self-attention."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__(query_dim, context_dim, num_heads, head_dim)
        self.output_proj = nn.Linear(num_heads * head_dim, query_dim, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None, rope: RopeTable | None = None) -> Tensor:
        if context is None:
            return self.output_proj(self.attend(x, x, rope, rope))
        return self.output_proj(self.attend(x, context, None, None))


class AdapterAttention(_QKNormAttention):
    """Adapter attention: queries and keys are both rotated, each with its own positions."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__(query_dim, context_dim, num_heads, head_dim)
        self.o_proj = nn.Linear(num_heads * head_dim, query_dim, bias=False)

    def forward(self, x: Tensor, context: Tensor, q_rope: RopeTable, k_rope: RopeTable) -> Tensor:
        return self.o_proj(self.attend(x, context, q_rope, k_rope))


# ---------------------------------------------------------------------------------------------------
# DiT building blocks
# ---------------------------------------------------------------------------------------------------


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # LayerNorm without affine, then the adaLN shift/scale: norm(x) * (1 + scale) + shift
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=NORM_EPS), 1 + scale)


def _adaln_modulation(in_dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(
        nn.SiLU(), nn.Linear(in_dim, lora_dim, bias=False), nn.Linear(lora_dim, chunks * in_dim, bias=False)
    )


class Patchify(nn.Module):
    """[B, C, T, H, W] -> [B, T/pt, H/ps, W/ps, C*pt*ps*ps], feature index c*pt*ps*ps + r*ps*ps + m*ps + n
    (channel-major)."""

    def __init__(self, patch_spatial: int, patch_temporal: int):
        super().__init__()
        self.ps, self.pt = patch_spatial, patch_temporal

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // self.pt, self.pt, h // self.ps, self.ps, w // self.ps, self.ps)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)


class PatchEmbed(nn.Module):
    def __init__(self, patch_spatial: int, patch_temporal: int, in_channels: int, out_channels: int):
        super().__init__()
        features = in_channels * patch_spatial * patch_spatial * patch_temporal
        self.proj = nn.Sequential(
            Patchify(patch_spatial, patch_temporal), nn.Linear(features, out_channels, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Timesteps(nn.Module):
    """[B] (or a scalar) -> [B, 1, dim] sinusoid [cos(t*f), sin(t*f)] in fp32, f_i = 10000^(-i / (dim/2))."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, timesteps: Tensor) -> Tensor:
        half = self.dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
        frequencies = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * steps / half)
        angles = timesteps.float().reshape(-1, 1, 1) * frequencies  # [B, 1, half]
        return torch.cat((angles.cos(), angles.sin()), dim=-1)


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoid; with adaLN-LoRA its output is the LoRA term added to every modulation."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, sinusoid: Tensor) -> Tensor:
        return self.linear_2(self.activation(self.linear_1(sinusoid)))


class GPT2FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(F.gelu(self.layer1(x)))


class Block(nn.Module):
    """Self-attention, cross-attention and MLP, each with its own adaLN(-LoRA) shift/scale/gate."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d, heads, head_dim = cfg.model_channels, cfg.num_heads, cfg.head_dim
        self.self_attn = Attention(d, d, heads, head_dim)
        self.cross_attn = Attention(d, cfg.crossattn_dim, heads, head_dim)
        self.mlp = GPT2FeedForward(d, cfg.mlp_hidden)
        self.adaln_modulation_self_attn = _adaln_modulation(d, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = _adaln_modulation(d, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = _adaln_modulation(d, cfg.adaln_lora_dim, 3)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, rope: RopeTable, adaln_lora: Tensor) -> Tensor:
        """x [B, L, D] residual stream (fp32 when computing in fp16); emb [B, 1, D] and adaln_lora
        [B, 1, 3D] in the compute dtype; context [B, N, Dctx]."""
        compute_dtype = emb.dtype
        modulated, gate = self.self_attn_input(x, emb, adaln_lora)
        h = self.self_attn(modulated.to(compute_dtype), rope=rope)
        x = torch.addcmul(x, gate, h)

        shift, scale, gate = (self.adaln_modulation_cross_attn(emb) + adaln_lora).chunk(3, dim=-1)
        h = self.cross_attn(_modulate(x, shift, scale).to(compute_dtype), context)
        x = torch.addcmul(x, gate, h)

        shift, scale, gate = (self.adaln_modulation_mlp(emb) + adaln_lora).chunk(3, dim=-1)
        h = self.mlp(_modulate(x, shift, scale).to(compute_dtype))
        return torch.addcmul(x, gate, h)


    def self_attn_input(self, x: Tensor, emb: Tensor, adaln_lora: Tensor) -> tuple[Tensor, Tensor]:
        """(the modulated self-attention input norm(x) * (1 + scale) + shift [B, L, D], its gate [B, 1, D]);
        block 0's is also TeaCache's signature (step_cache.py)."""
        shift, scale, gate = (self.adaln_modulation_self_attn(emb) + adaln_lora).chunk(3, dim=-1)
        return _modulate(x, shift, scale), gate


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.model_channels
        self.adaln_modulation = _adaln_modulation(d, cfg.adaln_lora_dim, 2)
        patch_volume = cfg.patch_spatial * cfg.patch_spatial * cfg.patch_temporal
        self.linear = nn.Linear(d, patch_volume * cfg.out_channels, bias=False)

    def forward(self, x: Tensor, emb: Tensor, adaln_lora: Tensor) -> Tensor:
        """x [B, L, D] the residual stream (fp32 when computing in fp16: normalised before it is cast)."""
        d = x.shape[-1]
        shift, scale = (self.adaln_modulation(emb) + adaln_lora[..., : 2 * d]).chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale).to(emb.dtype))


class MiniTrainDIT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.model_channels
        self.x_embedder = PatchEmbed(cfg.patch_spatial, cfg.patch_temporal, cfg.in_channels + 1, d)
        self.t_embedder = nn.Sequential(Timesteps(d), TimestepEmbedding(d))
        self.t_embedding_norm = nn.RMSNorm(d, eps=NORM_EPS)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(cfg)
        # upstream Wan2GP's step-cache settings (its `skip_steps_cache` object), set by wgp before generating;
        # `generate` reads them (step_cache.host_cache_settings)
        self.cache = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.t_embedding_norm.weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, step_cache: CachedRows | None = None) -> Tensor:
        """Flow velocity for noisy latents.

        x [B, C, T, H, W] latents (any T, H, W >= 1); timesteps [B] sigma in [0, 1] (1 = pure noise);
        context [B, N, Dctx] (N >= 512, from `preprocess_text_embeds`). Returns v [B, C, T, H, W] in
        x's dtype (an image given as [B, C, H, W] gets [B, C, H, W] back). Computes in the weights'
        dtype; with fp16 weights the residual stream stays fp32. step_cache: the step-skipping cache bound
        to this call's rows (step_cache.py); None runs every block.
        """
        if x.dim() == 4:
            return self.forward(x[:, :, None], timesteps, context, step_cache)[:, :, 0]
        cfg, dtype = self.config, self.compute_dtype
        out_dtype, (_, _, t, h, w) = x.dtype, x.shape
        x = self._pad_to_patches(x.to(dtype))
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, 1))  # all-zero padding-mask channel, after the latents
        x = self.x_embedder(x)  # [B, Tp, Hp, Wp, D]
        tp, hp, wp = x.shape[1:4]
        x = x.flatten(1, 3)  # [B, L, D]
        rope = rope_3d_table(cfg.head_dim, tp, hp, wp, cfg.rope_extrapolation_thw, x.device)

        sinusoid = self.t_embedder[0](timesteps.to(x.device)).to(dtype)  # [B, 1, D]
        adaln_lora = self.t_embedder[1](sinusoid)  # [B, 1, 3D]
        emb = self.t_embedding_norm(sinusoid)  # [B, 1, D]
        context = context.to(x.device, dtype)

        if dtype == torch.float16:
            x = x.float()  # the residual stream overflows fp16; attention and MLP still run in fp16
        if step_cache is None:
            for block in self.blocks:
                x = block(x, emb, context, rope, adaln_lora)
        else:
            x = step_cache.run_blocks(self.blocks, x, emb, context, rope, adaln_lora)
        x = self.final_layer(x, emb, adaln_lora)  # [B, L, ps*ps*pt*C]
        return self._unpatchify(x, tp, hp, wp)[:, :, :t, :h, :w].to(out_dtype)

    def _pad_to_patches(self, x: Tensor) -> Tensor:
        # circular, as the reference: odd latent sizes wrap around, and the output is cropped back
        ps, pt = self.config.patch_spatial, self.config.patch_temporal
        t, h, w = x.shape[2:]
        pad = (0, -w % ps, 0, -h % ps, 0, -t % pt)
        return F.pad(x, pad, mode="circular") if any(pad) else x

    def _unpatchify(self, x: Tensor, tp: int, hp: int, wp: int) -> Tensor:
        # features are ordered (p1, p2, t, C): not the inverse of the channel-major patch embedding
        ps, pt = self.config.patch_spatial, self.config.patch_temporal
        b = x.shape[0]
        x = x.reshape(b, tp, hp, wp, ps, ps, pt, -1)
        x = x.permute(0, 7, 1, 6, 2, 4, 3, 5)  # [B, C, Tp, pt, Hp, p1, Wp, p2]
        return x.reshape(b, -1, tp * pt, hp * ps, wp * ps)


# ---------------------------------------------------------------------------------------------------
# LLM adapter
# ---------------------------------------------------------------------------------------------------


class AdapterBlock(nn.Module):
    # mmgp's `compile` compiles every block tower; the adapter runs once per prompt, so compiling it would
    # only cost a recompilation for every new prompt length
    _compile_me = False

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        d, heads, head_dim = cfg.model_dim, cfg.num_heads, cfg.head_dim
        self.norm_self_attn = nn.RMSNorm(d, eps=NORM_EPS)
        self.self_attn = AdapterAttention(d, d, heads, head_dim)
        self.norm_cross_attn = nn.RMSNorm(d, eps=NORM_EPS)
        self.cross_attn = AdapterAttention(d, cfg.source_dim, heads, head_dim)
        self.norm_mlp = nn.RMSNorm(d, eps=NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_hidden), nn.GELU(), nn.Linear(cfg.mlp_hidden, d))

    def forward(self, x: Tensor, source: Tensor, rope: RopeTable, source_rope: RopeTable) -> Tensor:
        h = self.norm_self_attn(x)
        x = x + self.self_attn(h, h, rope, rope)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, rope, source_rope)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """T5 token embeddings cross-attend to Qwen3 hidden states; no masks (reference semantics)."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(AdapterBlock(cfg) for _ in range(cfg.num_layers))
        self.out_proj = nn.Linear(cfg.model_dim, cfg.model_dim)
        self.norm = nn.RMSNorm(cfg.model_dim, eps=NORM_EPS)

    def forward(self, source_hidden_states: Tensor, target_input_ids: Tensor) -> Tensor:
        """source_hidden_states [B, Lq, Dsrc]; target_input_ids [B, Lt] T5 ids -> [B, Lt, D]."""
        x = self.embed(target_input_ids).to(source_hidden_states.dtype)  # [B, Lt, D]
        head_dim, device = self.config.head_dim, x.device
        rope = rope_1d_table(head_dim, x.shape[1], x.dtype, device)
        source_rope = rope_1d_table(head_dim, source_hidden_states.shape[1], x.dtype, device)
        for block in self.blocks:
            x = block(x, source_hidden_states, rope, source_rope)
        return self.norm(self.out_proj(x))


# ---------------------------------------------------------------------------------------------------
# Anima = DiT + adapter, and its loader
# ---------------------------------------------------------------------------------------------------


class AnimaModel(MiniTrainDIT):
    def __init__(self, dit: DiTConfig, adapter: AdapterConfig):
        super().__init__(dit)
        self.llm_adapter = LLMAdapter(adapter)

    def preprocess_text_embeds(self, qwen_hidden: Tensor, t5_ids: Tensor, t5_weights: Tensor | None = None) -> Tensor:
        """DiT context from one prompt's encodings.

        qwen_hidden [B, Lq, Dsrc] Qwen3 final hidden states; t5_ids [B, Lt] int64 T5 ids; t5_weights
        [B, Lt] (or ComfyUI's [B, Lt, 1]) per-token prompt weights or None. Returns [B, max(512, Lt), D] in
        the model dtype: the adapter output times the weights, zero-padded at the end to 512 tokens, never
        truncated.
        """
        out = self.llm_adapter(qwen_hidden.to(self.compute_dtype), t5_ids.to(qwen_hidden.device))  # [B, Lt, D]
        if t5_weights is not None:
            out = out * t5_weights.to(out.device, out.dtype).reshape(*out.shape[:2], 1)
        return F.pad(out, (0, 0, 0, max(0, MIN_CONTEXT_TOKENS - out.shape[1])))

    def preprocess_loras(self, model_type: str, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Upstream Wan2GP loads LoRAs into the DiT through mmgp and calls this first: it rewrites any Anima
        LoRA format into the keys mmgp reads for this model's module names."""
        return to_mmgp_lora_state_dict(sd, self)


# On-the-fly quantization touches only the attention and MLP linears of the blocks: the timestep embedder,
# the adaLN modulations, the patch embedding, the final layer and the whole LLM adapter stay in the compute
# dtype (quantizing t_embedder or the adapter hurts Anima; checkpoints.md §3.3).
QUANTIZABLE_WEIGHTS = re.compile(r"blocks\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|output_proj)\.weight"
                                 r"|blocks\.\d+\.mlp\.layer[12]\.weight")


def load_anima_model(source: str | os.PathLike | Mapping[str, Tensor], dtype: torch.dtype = torch.bfloat16,
                     device: torch.device | str = "cpu", quantize: str | None = None) -> AnimaModel:
    """Build an AnimaModel from a `.safetensors` or `.gguf` path, a diffusers-format folder
    (diffusers_format.py) or a state dict (keys prefixed `net.`, `model.diffusion_model.`,
    `model.diffusion_model.net.`, `diffusion_model.` or not at all), with the architecture (e.g. 28 or 40
    blocks) read from the tensor shapes. Built on the meta device and assigned from the memory-mapped file, so peak RAM stays
    near the file size. Quantized files (fp8, int8, ConvRot, GGUF; `quant.py`) stay quantized and compute
    in `dtype`. `quantize` ("int8", "int8_convrot" or "fp8") quantizes the full-precision attention and MLP
    weights while loading (`QUANTIZABLE_WEIGHTS`). Raises WeightsError with a user-facing message for any
    mismatch."""
    what = "Anima DiT"
    raw = read_diffusers_dit(source) if is_diffusers_folder(source) else open_state_dict(source, what=what)
    sd = strip_prefix(raw, CHECKPOINT_PREFIXES)
    require_kind(sd, "anima_dit", what=what, source=source)
    dit, adapter = DiTConfig.from_state_dict(sd), AdapterConfig.from_state_dict(sd)
    if adapter.model_dim != dit.crossattn_dim:
        raise WeightsError(f"The {what} weights are inconsistent: the LLM adapter's width {adapter.model_dim} "
                           f"differs from the DiT's context width {dit.crossattn_dim}.")
    if quantize:
        sd = {k: quantize_weight(t, quantize) if QUANTIZABLE_WEIGHTS.fullmatch(k) and t.dtype in (
            torch.bfloat16, torch.float16, torch.float32) and type(t) is Tensor else t for k, t in sd.items()}
    with torch.device("meta"):
        model = AnimaModel(dit, adapter)
    return load_module_strict(model, sd, dtype=dtype, device=device, what=what)


def save_anima_model(model: AnimaModel, path: str | os.PathLike) -> None:
    """Write the DiT + adapter as ComfyUI loads it: `net.`-prefixed keys, bf16 tensors, and each quantized
    layer in ComfyUI's per-layer `comfy_quant` layout (which ComfyUI, Forge and this app read)."""
    save_state_dict(comfy_quant_state_dict(model.state_dict(), prefix="net."), path)
