"""The weight change each kind of LoRA adapter encodes, and how it is scaled and merged.

Kinds: LoRA (up @ down), LoHa (Hadamard product of two low-rank pairs), LoKr (Kronecker product, factors
stored whole, as a @ b, or as a Tucker core), full diffs; DoRA rescales the merged weight's norms. Scaling
follows the trainers (and ComfyUI): LoRA and LoHa use alpha / rank (1 when there is no alpha); LoKr uses
alpha / rank only when one factor is itself low-rank, else 1; diffs are added as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Adapter:
    """One LoRA's change to one module's weight (and bias)."""

    kind: str | None  # "lora", "loha", "lokr", "diff", or None when only the bias changes
    tensors: dict[str, Tensor]
    alpha: float | None = None
    dora_scale: Tensor | None = None
    bias_diff: Tensor | None = None

    def scale(self) -> float:
        t = self.tensors
        if self.kind == "lora":
            rank = t["down"].shape[0]
        elif self.kind == "loha":
            rank = t["hada_w1_b"].shape[0]
        elif self.kind == "lokr" and ("lokr_w2_b" in t or "lokr_w1_b" in t):
            rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0]
        else:
            return 1.0
        return 1.0 if self.alpha is None else self.alpha / rank

    def raw_delta(self, device: torch.device | str) -> Tensor:
        """The unscaled weight change in fp32 on `device`, in the adapter's own shape."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            return t["up"].flatten(1) @ t["down"].flatten(1)
        if self.kind == "loha":
            return factor(t, "hada_w1") * factor(t, "hada_w2")
        if self.kind == "lokr":
            return _kron(factor(t, "lokr_w1"), factor(t, "lokr_w2"))
        return t["diff"]

    def raw_delta_shape(self) -> torch.Size:
        """The shape `raw_delta` will have, without computing it."""
        t = {k: v.shape for k, v in self.tensors.items()}
        if self.kind == "lora":
            return torch.Size((t["up"][0], t["down"][1:].numel()))
        if self.kind == "loha":
            return _factor_shape(t, "hada_w1")
        if self.kind == "lokr":
            w1, w2 = _factor_shape(t, "lokr_w1"), _factor_shape(t, "lokr_w2")
            return torch.Size((w1[0] * w2[0], w1[1] * w2[1], *w2[2:]))
        return t["diff"]

    def misfit(self, module: nn.Module) -> str | None:
        """Why this adapter cannot change `module` (None when it fits)."""
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        if self.kind is not None and weight is None:
            return "it has no weight"
        if self.kind is not None:
            change = self.raw_delta_shape()
            if change.numel() != weight.numel() or change[0] != weight.shape[0]:
                return f"its weight is {list(weight.shape)} but the LoRA changes {list(change)}"
            if self.dora_scale is not None and self.dora_scale.numel() not in weight.shape[:2]:
                return f"its weight is {list(weight.shape)} but the DoRA scale is {list(self.dora_scale.shape)}"
        if self.bias_diff is not None and bias is None:
            return "the LoRA changes a bias it does not have"
        if self.bias_diff is not None and self.bias_diff.numel() != bias.numel():
            return f"its bias is {list(bias.shape)} but the LoRA changes {list(self.bias_diff.shape)}"
        return None

    def add_to(self, merged: Tensor, strength: float, original: Tensor) -> None:
        """Add this adapter's change, times `strength`, to the fp32 `merged` weight in place. `original`
        is the unpatched weight (fp32), which DoRA's norms are taken from."""
        if self.kind == "lora" and self.dora_scale is None:
            up, down = (self.tensors[k].to(merged.device, torch.float32).flatten(1) for k in ("up", "down"))
            merged.view(merged.shape[0], -1).addmm_(up, down, alpha=strength * self.scale())
        else:
            merged.add_(self.weight_delta(original), alpha=strength)

    def weight_delta(self, weight: Tensor) -> Tensor:
        """Change to `weight` (fp32) at strength 1; DoRA rescales the merged weight's norms."""
        delta = self.raw_delta(weight.device).reshape(weight.shape) * self.scale()
        if self.dora_scale is None:
            return delta
        merged = weight + delta
        magnitude = self.dora_scale.to(device=weight.device, dtype=torch.float32)
        if magnitude.shape[0] == weight.shape[0] and magnitude.numel() == weight.shape[0]:
            norm = merged.flatten(1).norm(dim=1).reshape(-1, *([1] * (weight.dim() - 1)))  # per output row
        else:
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *([1] * (weight.dim() - 2)))
        magnitude = magnitude.reshape(norm.shape)
        return merged * (magnitude / (norm + torch.finfo(torch.float32).eps)) - weight


def _kron(w1: Tensor, w2: Tensor) -> Tensor:
    """Kronecker product of a 2-D w1 [a, b] with w2 [p, r, *k] -> [a*p, b*r, *k] (torch.kron fails on
    some 4-D shapes)."""
    (a, b), (p, r) = w1.shape, w2.shape[:2]
    product = torch.einsum("ij,xyz->ixjyz", w1, w2.reshape(p, r, -1))  # [a, p, b, r, prod(k)]
    return product.reshape(a * p, b * r, *w2.shape[2:])


def _tucker_name(name: str) -> str:
    return name[:-2] + "t" + name[-1]  # "lokr_w2" -> "lokr_t2"


def factor(t: Mapping[str, Tensor], name: str) -> Tensor:
    """Factor `name` ("hada_w1", "lokr_w2", ...): stored whole, as a @ b, or as a Tucker core t x b x a."""
    if name in t:
        return t[name]
    a, b, tucker = t[name + "_a"], t[name + "_b"], t.get(_tucker_name(name))
    return a @ b if tucker is None else torch.einsum("ijkl,jr,ip->prkl", tucker, b, a)


def _factor_shape(shapes: Mapping[str, torch.Size], name: str) -> torch.Size:
    if name in shapes:
        return shapes[name]
    a, b, tucker = shapes[name + "_a"], shapes[name + "_b"], shapes.get(_tucker_name(name))
    return torch.Size((a[0], b[1])) if tucker is None else torch.Size((a[1], b[1], *tucker[2:]))


# The roles each kind of adapter is made of.
KIND_ROLES = {
    "lora": {"up", "down"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "diff": {"diff"},
}


def adapter_kind(roles: Mapping[str, Tensor]) -> str | None:
    if "up" in roles and "down" in roles:
        return "lora"
    if all(f"hada_w{i}_{ab}" in roles for i in "12" for ab in "ab"):
        return "loha"
    if all(f"lokr_w{i}" in roles or (f"lokr_w{i}_a" in roles and f"lokr_w{i}_b" in roles) for i in "12"):
        return "lokr"
    if "diff" in roles:
        return "diff"
    return None

