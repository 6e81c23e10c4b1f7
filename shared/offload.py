"""Placing a loaded model: mmgp streams its modules to the GPU when CUDA is available (or, on request,
they are simply all placed on the GPU); otherwise it all stays on the CPU. mmgp is imported only on the
CUDA path: its import takes seconds, and its profiling cannot run without CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# Wan2GP's half profiles: 3.5 is profile 3 without pinned memory, 4.5 profile 4 without async transfers.
_HALF_PROFILE_OPTIONS = {3.5: {"pinnedMemory": False}, 4.5: {"asyncTransfers": False}}
PROFILE_NAMES = {
    1.0: "HighRAM_HighVRAM: every model pinned in RAM, each loaded whole on the GPU",
    2.0: "HighRAM_LowVRAM: every model pinned in RAM, streamed to the GPU in parts",
    3.0: "LowRAM_HighVRAM: the transformer pinned in RAM, each model loaded whole on the GPU",
    3.5: "LowRAM_HighVRAM without pinned memory",
    4.0: "LowRAM_LowVRAM: the transformer pinned in RAM, streamed to the GPU in parts",
    4.5: "LowRAM_LowVRAM without async transfers",
    5.0: "VerylowRAM_LowVRAM: nothing pinned, streamed to the GPU in small parts",
}
GIB = 1 << 30
# Room a generation needs on the GPU beside the model computing (activations, the VAE decode, allocator
# slack) for about 1 MP with CFG, and room RAM needs beside pinned weights for the OS and the app.
WORKING_VRAM = 6 * GIB
RAM_HEADROOM = 4 * GIB


def split_pipe(pipe: Mapping[str, Any]) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """A handler's pipe dict (`{"transformer": m, ...}` or `{"pipe": {...}, **profile_kwargs}`) as
    (modules, extra `offload.profile` kwargs)."""
    if "pipe" in pipe:
        return dict(pipe["pipe"]), {k: v for k, v in pipe.items() if k != "pipe"}
    return dict(pipe), {}


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def choose_profile(sizes: Mapping[str, int], free_vram: int, free_ram: int) -> tuple[float, str]:
    """The mmgp profile for models of `sizes` (bytes per module id) with this much free VRAM and RAM, and
    why. A model is loaded whole on the GPU (profiles 1, 3) when the largest one fits beside
    WORKING_VRAM, else streamed (2, 4, 5); every model is pinned in RAM when all fit beside RAM_HEADROOM
    (1, 2), else the transformer alone (3, 4), else nothing (3.5, 5)."""
    largest = max(sizes.values())
    everything, transformer = sum(sizes.values()), sizes.get("transformer", largest)
    whole = free_vram >= largest + WORKING_VRAM
    if free_ram >= everything + RAM_HEADROOM:
        profile = 1.0 if whole else 2.0
    elif free_ram >= transformer + RAM_HEADROOM:
        profile = 3.0 if whole else 4.0
    else:
        profile = 3.5 if whole else 5.0
    why = (f"{free_vram / GIB:.1f} GB VRAM and {free_ram / GIB:.1f} GB RAM free; the models take "
           f"{everything / GIB:.1f} GB, the largest {largest / GIB:.1f} GB")
    return profile, why


def auto_profile(pipe: Mapping[str, Any]) -> tuple[float, str]:
    """`choose_profile` for a handler's pipe dict from the free memory now (CUDA only)."""
    import psutil

    modules, _ = split_pipe(pipe)
    sizes = {name: module_bytes(m) for name, m in modules.items() if isinstance(m, nn.Module)}
    return choose_profile(sizes, torch.cuda.mem_get_info()[0], psutil.virtual_memory().available)


def compile_towers(module: nn.Module) -> list[str]:
    """torch.compile each block of every block list in `module`, as mmgp's `compile` does: blocks that
    set `_compile_me = False` are left alone. Returns the compiled blocks' names."""
    compiled = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList):
            for index, block in enumerate(child):
                if getattr(block, "_compile_me", None) is not False:
                    block.forward = torch.compile(block.forward)
                    compiled.append(f"{name}.{index}")
    return compiled


def offload_pipe(pipe: Mapping[str, Any], profile: float, dtype: torch.dtype, *, offload: bool = True,
                 compile: bool = False) -> Any:
    """mmgp's offload object for a handler's pipe dict with CUDA; None without it (the modules stay on
    the CPU) or with `offload=False`, which places every module on the GPU instead (big cards, benchmarks).

    `profile` is mmgp's profile number (1 = most VRAM and RAM ... 5 = least); `dtype` is the dtype leftover
    fp32 weights are converted to (modules with a `_model_dtype` attribute keep theirs). `compile`:
    torch.compile the transformer's block towers (mmgp's `compile`, or `compile_towers` without mmgp)."""
    if not torch.cuda.is_available():
        return None
    modules, extra = split_pipe(pipe)
    if not offload:
        device = torch.device("cuda", torch.cuda.current_device())
        for module in modules.values():
            module.to(device)
        if compile and "transformer" in modules:
            compile_towers(modules["transformer"])
        return None
    from mmgp import offload as mmgp_offload

    options = {**_HALF_PROFILE_OPTIONS.get(profile, {}), **extra}
    return mmgp_offload.profile(modules, profile_no=int(profile), quantizeTransformer=False,
                                convertWeightsFloatTo=dtype, compile="transformer" if compile else False,
                                **options)
