"""One attention entry point for every model family, with Wan2GP's `pay_attention` signature.

Tensors are `[B, L, H, D]` (batch, tokens, heads, head dim). The caller passes `[q, k, v]` in a list and
drops its own references; the list is emptied here so each input can be freed as soon as it is consumed,
which lowers peak memory on small GPUs.

Backends: "sdpa" (torch's fused scaled-dot-product attention, always available), "flash"
(flash-attn), "sage" / "sage2" (SageAttention). A backend is used only when its package imports and it
was asked for; "auto" picks the best available one for the inputs. The mode comes from, in order: the
call's `force_attention`, the mode mmgp's `offload.shared_state["_attention"]` holds (upstream Wan2GP sets
it there), the mode set with `set_attention_mode`, then "auto".
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_MODES = ("auto", "sdpa", "flash", "sage", "sage2")
_MODULE_OF_MODE = {"flash": "flash_attn", "sage": "sageattention", "sage2": "sageattention"}
FUSED_MIN_CAPABILITY = 8  # flash-attn 2 and SageAttention need Ampere (sm80) or later

_configured_mode = "auto"


_available_modes: tuple[str, ...] | None = None


def available_attention_modes() -> tuple[str, ...]:
    """Modes whose backing package is importable here ("auto" and "sdpa" always are); looked up once."""
    global _available_modes
    if _available_modes is None:
        _available_modes = tuple(m for m in ATTENTION_MODES
                                 if m not in _MODULE_OF_MODE or importlib.util.find_spec(_MODULE_OF_MODE[m]))
    return _available_modes


def check_attention_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"Unknown attention mode '{mode}': choose one of {', '.join(ATTENTION_MODES)}.")
    if mode not in available_attention_modes():
        raise ValueError(
            f"Attention mode '{mode}' needs the package '{_MODULE_OF_MODE[mode]}', which is not installed here."
        )
    return mode


def set_attention_mode(mode: str) -> None:
    """Process-wide default mode (the app sets it once from `--attention`)."""
    global _configured_mode
    _configured_mode = check_attention_mode(mode)


def _requested_mode(force_attention: str | None) -> str:
    if force_attention:
        return force_attention
    offload = sys.modules.get("mmgp.offload")  # read it only if the host already imported mmgp (slow import)
    shared_state = getattr(offload, "shared_state", None) or {}
    return shared_state.get("_attention") or _configured_mode


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float | None, causal: bool, mask: Tensor | None) -> Tensor:
    # SDPA wants [B, H, L, D]; transposed views are fine for its kernels
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=scale
    )
    return out.transpose(1, 2)


# The extension kernels are opaque to torch.compile: each call runs outside the traced graph.
@torch.compiler.disable()
def _flash(q: Tensor, k: Tensor, v: Tensor, scale: float | None, causal: bool, mask: Tensor | None) -> Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)


@torch.compiler.disable()
def _sage(q: Tensor, k: Tensor, v: Tensor, scale: float | None, causal: bool, mask: Tensor | None) -> Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=causal, sm_scale=scale)


_BACKENDS: dict[str, Callable[..., Tensor]] = {"sdpa": _sdpa, "flash": _flash, "sage": _sage, "sage2": _sage}


def _fused_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= FUSED_MIN_CAPABILITY


def _resolve(mode: str, device: torch.device, dtype: torch.dtype, masked: bool) -> str:
    """The backend for a call: `mode` validated, "auto" made concrete, and any fused kernel that cannot
    take these inputs (CPU, fp32, a mask, a GPU before sm80) replaced by SDPA rather than failing."""
    check_attention_mode(mode)
    fused_ok = dtype in (torch.float16, torch.bfloat16) and not masked and _fused_capable(device)
    if mode == "auto":
        preferred = [m for m in ("sage2", "sage", "flash") if m in available_attention_modes()]
        return preferred[0] if preferred and fused_ok else "sdpa"
    return mode if mode == "sdpa" or fused_ok else "sdpa"


_resolved: dict[tuple[str, torch.device, torch.dtype, bool], Callable[..., Tensor]] = {}


def _backend(mode: str, q: Tensor, mask: Tensor | None) -> Callable[..., Tensor]:
    """The backend function, resolved once per (mode, device, dtype, masked)."""
    key = (mode, q.device, q.dtype, mask is not None)
    backend = _resolved.get(key)
    if backend is None:
        backend = _resolved[key] = _BACKENDS[_resolve(*key)]
    return backend


def pay_attention(
    qkv_list: list[Tensor],
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    version: int | None = None,
    force_attention: str | None = None,
    attention_mask: Tensor | None = None,
    recycle_q: bool = False,
    q_lens: list[int] | None = None,
    k_lens: list[int] | None = None,
) -> Tensor:
    """Attention over `[q, k, v]`, each `[B, L, H, D]`; returns `[B, Lq, H, D]` in q's dtype.

    `attention_mask` (bool or additive, broadcastable to `[B, H, Lq, Lk]`) forces SDPA. The other
    Wan2GP arguments (dropout, windows, varlen lengths) are accepted for signature compatibility;
    inference never uses dropout, and no Anima model uses windows or varlen batches. The SDPA path is
    traceable by torch.compile (no graph break); flash and sage run outside the graph.
    """
    q, k, v = qkv_list
    qkv_list.clear()
    if causal and attention_mask is not None:
        raise ValueError("pay_attention: give either causal=True or an attention_mask, not both.")
    backend = _backend(_requested_mode(force_attention), q, attention_mask)
    return backend(q, k, v, softmax_scale, causal, attention_mask).to(q.dtype)
