"""Placing a loaded model: mmgp streams its modules to the GPU when CUDA is available; otherwise it all
stays on the CPU. mmgp is imported only on the CUDA path: its import takes seconds, and its profiling
cannot run without CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Wan2GP's half profiles: 3.5 is profile 3 without pinned memory, 4.5 profile 4 without async transfers.
_HALF_PROFILE_OPTIONS = {3.5: {"pinnedMemory": False}, 4.5: {"asyncTransfers": False}}


def offload_pipe(pipe: Mapping[str, Any], profile: float, dtype: torch.dtype) -> Any:
    """mmgp's offload object for a handler's pipe dict (`{"transformer": m, ...}` or `{"pipe": {...},
    **profile_kwargs}`) with CUDA; None without it (the modules stay on the CPU).

    `profile` is mmgp's profile number (1 = most VRAM and RAM ... 5 = least); `dtype` is the dtype leftover
    fp32 weights are converted to (modules with a `_model_dtype` attribute keep theirs)."""
    if not torch.cuda.is_available():
        return None
    from mmgp import offload

    modules, extra = (pipe["pipe"], {k: v for k, v in pipe.items() if k != "pipe"}) if "pipe" in pipe else (pipe, {})
    options = {**_HALF_PROFILE_OPTIONS.get(profile, {}), **extra}
    return offload.profile(dict(modules), profile_no=int(profile), quantizeTransformer=False,
                           convertWeightsFloatTo=dtype, **options)
