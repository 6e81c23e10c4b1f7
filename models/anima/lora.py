"""LoRAs for Anima merged into the weights in place, and exactly undone.

The key formats are in lora_keys.py, the adapter math in lora_adapters.py, prompt tags and the file lookup
in lora_tags.py.

Merging: `LoraPatcher.set_loras` computes W = cast(W0 + sum_i s_i * delta_i) in fp32 from the original
weight W0 of every touched parameter, so switching LoRAs or strengths never accumulates rounding. Before a
parameter is first touched its original is copied to CPU memory; restoring copies it back bit for bit.
Only touched parameters are copied (for rank-32 LoRAs on every attention and MLP projection of the 28
blocks that is 3.3 GiB; the model itself is never copied). Parameters are written in place (`copy_`
into their existing storage) on whatever device they are.

mmgp (Wan2GP's offloader): `offload.profile` records each parameter's CPU tensor (pinned when the
profile pins) and, per block, swaps in a temporary GPU copy made from it, then swaps the CPU tensor back.
A write into the CPU tensor's storage is therefore what every later transfer uses; call `set_loras` while
mmgp has the models unloaded, i.e. between generations (wgp calls `offloadobj.unload_all()` after each),
so at the start of `generate()` before the text encoder runs. A patch written into a GPU copy mmgp holds
would be dropped at its next unload. `set_loras` refuses (ValueError, not a crash) weights it cannot write:
mmgp-quantized ones (int8/fp8 tensor subclasses) and read-only file maps (mmgp's `writable_tensors=False`
when the profile does not pin). mmgp's runtime LoRAs (`offload.load_loras_into_model`) are the other
route: no RAM for backups, quantized weights and Wan2GP's per-step multiplier schedules work, at a cost on
every denoising step, and they reach only the DiT. Upstream wgp uses that route for its `activated_loras`
when the DiT has `preprocess_loras(model_type, sd)`; `to_mmgp_lora_state_dict(sd, dit)` is its body.
Never apply one LoRA to the DiT through both routes.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .lora_adapters import Adapter, factor
from .lora_keys import (
    DIT, TEXT_ENCODER, LoraFile, ModuleTable, dit_aliases, parse_lora, text_encoder_aliases, unused_warning,
)
from .weights import open_state_dict

logger = logging.getLogger(__name__)


_ParamKey = tuple[str, str, str]  # (target, module name, "weight" | "bias")


class LoraPatcher:
    """Merges LoRAs into a DiT (and optionally the Qwen3 text encoder) and takes them out again exactly."""

    def __init__(self, dit: nn.Module | None, text_encoder: nn.Module | None = None):
        self._tables = []
        if dit is not None:
            self._tables.append(ModuleTable(dit, DIT, dit_aliases))
        if text_encoder is not None:
            self._tables.append(ModuleTable(text_encoder, TEXT_ENCODER, text_encoder_aliases))
        self._modules = {(t.target, n): m for t in self._tables for n, m in t.modules.items()}
        self._backups: dict[_ParamKey, Tensor] = {}
        self._active: list[tuple[str, float]] = []
        self._files: dict[str, tuple[tuple[int, int], LoraFile]] = {}

    @property
    def active(self) -> list[tuple[str, float]]:
        return list(self._active)

    @property
    def active_text_encoder(self) -> list[tuple[str, float]]:
        """The active LoRAs that change the text encoder (with a non-zero strength): part of any cache key
        for prompt encodings."""
        return [(path, s) for path, s in self._active
                if s != 0 and TEXT_ENCODER in self._files[path][1].targets]

    def set_loras(self, loras: Sequence[tuple[str | os.PathLike, float]]) -> list[str]:
        """Make exactly `loras` [(file, strength)] active, replacing whatever was merged before.

        Every file is read and checked before any weight changes, so a bad file or target leaves the
        previous state intact (a failure while writing, such as running out of memory, leaves the base
        weights). Returns warnings for the caller to show (keys that match no module). Raises ValueError
        for a file with no usable key, one made for another model, or target weights that cannot be
        written (quantized, or a read-only memory map)."""
        wanted = [(str(path), float(strength)) for path, strength in loras]
        if wanted == self._active:
            return []
        files = {path: self._load(path) for path, _ in wanted}
        plan: dict[_ParamKey, list[tuple[float, Adapter]]] = {}
        for path, strength in wanted:
            for (target, module_name), adapter in files[path].adapters.items():
                if strength != 0 and adapter.kind is not None:
                    plan.setdefault((target, module_name, "weight"), []).append((strength, adapter))
                if strength != 0 and adapter.bias_diff is not None:
                    plan.setdefault((target, module_name, "bias"), []).append((strength, adapter))
        self._check_writable(plan)
        # One fp32 work buffer per device, reused for every parameter: no allocation (and page faults)
        # per parameter, and nothing left behind in the allocator's free lists.
        largest = max((self._param(key).numel() for key in plan), default=0)
        scratch: dict[torch.device, Tensor] = {}
        try:
            for key in [k for k in self._backups if k not in plan]:
                self._write(key, self._backups.pop(key))
            for key, contributions in plan.items():
                device = self._param(key).device
                if device not in scratch:
                    scratch[device] = torch.empty(largest, dtype=torch.float32, device=device)
                self._merge(key, contributions, scratch[device])
        except BaseException:
            self._restore_all()  # e.g. out of memory half-way: back to the base weights, never a mix
            raise
        self._active = wanted
        self._files = {path: self._files[path] for path in files}
        return [unused_warning(files[path]) for path in files if files[path].unused_keys]

    def _restore_all(self) -> None:
        for key in list(self._backups):
            self._write(key, self._backups.pop(key))
        self._active = []

    def _load(self, path: str) -> LoraFile:
        stat = os.stat(path) if os.path.isfile(path) else None
        stamp = (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)
        cached = self._files.get(path)
        if cached is None or cached[0] != stamp:
            sd = open_state_dict(path, what="LoRA")
            cached = (stamp, parse_lora(sd, self._tables, name=Path(path).name))
            self._files[path] = cached
        return cached[1]

    def _param(self, key: _ParamKey) -> nn.Parameter:
        target, module_name, param_name = key
        return self._modules[(target, module_name)]._parameters[param_name]

    def _check_writable(self, plan: Mapping[_ParamKey, object]) -> None:
        read_only = _read_only_memory()
        for key in plan:
            param = self._param(key)
            if not param.dtype.is_floating_point or param.element_size() < 2 or type(param.data) is not torch.Tensor:
                raise ValueError(f"Cannot merge a LoRA into {key[0]} module '{key[1]}': its weights are quantized "
                                 f"({param.dtype}). Use unquantized (bf16) weights, or mmgp's runtime LoRAs.")
            if param.device.type == "cpu" and read_only.contains(param.data_ptr()):
                raise ValueError(f"Cannot merge a LoRA into {key[0]} module '{key[1]}': its weights are a read-only "
                                 "memory map of the checkpoint (mmgp's writable_tensors=False without pinning). "
                                 "Load them writable, or use mmgp's runtime LoRAs.")

    def _merge(self, key: _ParamKey, contributions: Sequence[tuple[float, Adapter]], scratch: Tensor) -> None:
        param = self._param(key)
        if key not in self._backups:
            self._backups[key] = param.detach().to("cpu", copy=True)
        backup = self._backups[key]
        merged = scratch[: param.numel()].view(param.shape).copy_(backup)
        original = backup.to(device=param.device, dtype=torch.float32) if any(
            a.dora_scale is not None for _, a in contributions) else merged
        for strength, adapter in contributions:
            if key[2] == "bias":
                merged.add_(adapter.bias_diff.to(merged).reshape(merged.shape), alpha=strength)
            else:
                adapter.add_to(merged, strength, original)
        self._write(key, merged)

    def _write(self, key: _ParamKey, value: Tensor) -> None:
        param = self._param(key)
        with torch.inference_mode(param.is_inference()), torch.no_grad():
            param.data.copy_(value)


class _AddressRanges:
    def __init__(self, ranges: Iterable[tuple[int, int]]):
        self._ranges = sorted(ranges)
        self._starts = [start for start, _ in self._ranges]

    def contains(self, address: int) -> bool:
        i = bisect.bisect_right(self._starts, address) - 1
        return i >= 0 and address < self._ranges[i][1]


def _read_only_memory() -> _AddressRanges:
    """The address ranges this process may read but not write (Linux; empty elsewhere). Writing into
    one (a checkpoint mapped read-only) would crash the process instead of raising."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return _AddressRanges(())
    ranges = []
    for line in lines:
        addresses, permissions = line.split()[:2]
        if "r" in permissions and "w" not in permissions:
            start, end = addresses.split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return _AddressRanges(ranges)


def to_mmgp_lora_state_dict(sd: Mapping[str, Tensor], dit: nn.Module) -> dict[str, Tensor]:
    """Rewrite a LoRA in any supported format into the keys `mmgp.offload.load_loras_into_model` reads
    for `dit`: '<module>.lora_A.weight' / '.lora_B.weight' / '.alpha', '<module>.lokr_w1' / '.lokr_w2',
    '<module>.diff' and '<module>.diff_b', with module names of `dit`.

    mmgp knows plain LoKr factors but not factorised ones, LoHa or DoRA, and scales only LoRA by alpha;
    those are turned into LoKr factors or a full '.diff' with the scale folded in. Text-encoder and
    unmatched keys are dropped with one logged warning (mmgp loads into the DiT only)."""
    lora = parse_lora(sd, [ModuleTable(dit, DIT, dit_aliases)], name="LoRA")
    modules = dict(dit.named_modules())
    out = {}
    for (_, module_name), adapter in lora.adapters.items():
        t, scale = adapter.tensors, adapter.scale()
        if adapter.kind == "lora" and adapter.dora_scale is None:
            out[f"{module_name}.lora_A.weight"] = t["down"].flatten(1)
            out[f"{module_name}.lora_B.weight"] = t["up"].flatten(1)
            if adapter.alpha is not None:
                # beside the LoRA's tensors, whatever the default device (mmgp leaves it on CUDA)
                out[f"{module_name}.alpha"] = torch.tensor(adapter.alpha, device=t["down"].device)
        elif adapter.kind == "lokr" and adapter.dora_scale is None and "lokr_t2" not in t:
            factors = {k: v.float() for k, v in t.items()}
            w1, w2 = factor(factors, "lokr_w1") * scale, factor(factors, "lokr_w2")
            out[f"{module_name}.lokr_w1"], out[f"{module_name}.lokr_w2"] = w1, w2
        elif adapter.kind is not None:
            weight = modules[module_name].weight.detach()
            out[f"{module_name}.diff"] = adapter.weight_delta(weight.float()).to(weight.dtype)
        if adapter.bias_diff is not None:
            out[f"{module_name}.diff_b"] = adapter.bias_diff
    if lora.unused_keys:
        logger.warning(unused_warning(lora).replace("were ignored", "are not loaded by mmgp"))
    return out