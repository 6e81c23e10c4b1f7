"""LoRAs for Anima: every key format they ship in, merged into the weights in place and exactly undone.

Formats (users.md §2.2), all resolved against the real module names of the DiT and the text encoder:
- kohya sd-scripts: `lora_unet_blocks_0_self_attn_q_proj.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  text encoder `lora_te_layers_0_mlp_down_proj.*` (also `lora_te1_`). The underscores are matched against
  the module names with their dots replaced, never split by guesswork.
- ComfyUI / diffusion-pipe / DiffSynth: `diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight`,
  `diffusion_model.llm_adapter.blocks.*`, text encoder `text_encoder.qwen3.layers.*` (and the other
  text-encoder prefixes below); PEFT's `.lora_A.default.weight` spelling too.
- diffusers / PEFT / OneTrainer: `transformer.transformer_blocks.0.attn1.to_q.*` (the diffusers Cosmos
  names, mapped back through the rename map of anima_reference.md §7.1), `text_conditioner.*` for the adapter.
- LyCORIS: LoHa (`hada_w1_a` ...), LoKr (`lokr_w1`/`lokr_w2`, factorised `_a`/`_b`, `lokr_t2`), DoRA
  (`dora_scale`, PEFT's `lora_magnitude_vector`), full `.diff` / `.w_norm` weights (norms included) and `.diff_b` / `.b_norm` biases.
- `net.`-prefixed variants of all of these.

Scaling follows the trainers (and ComfyUI): LoRA and LoHa use alpha / rank (1 when there is no alpha);
LoKr uses alpha / rank only when one factor is itself low-rank, else 1; diffs are added as they are.

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
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .lora_blocks import dit_block_count, fit_lora_to_dit_depth
from .weights import open_state_dict

logger = logging.getLogger(__name__)

DIT, TEXT_ENCODER = "DiT", "text encoder"

# Key suffix -> the tensor's role in its adapter. Several trainers spell the same role differently.
_SUFFIX_ROLES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".w_norm": "diff", ".b_norm": "diff_b",
    ".lora_magnitude_vector": "dora_scale", ".lora_magnitude_vector.weight": "dora_scale",  # PEFT's DoRA
    ".lora_magnitude_vector.default.weight": "dora_scale",
} | {f".{role}": role for role in (
    "alpha", "dora_scale", "diff", "diff_b", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
    "hada_t2", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
_SUFFIXES_LONGEST_FIRST = sorted(_SUFFIX_ROLES, key=len, reverse=True)

# Wrappers that trainers put in front of module names; stripped one at a time until a name matches.
_DIT_PREFIXES = ("model.", "diffusion_model.", "transformer.", "net.", "base_model.", "unet.", "dit.")
_TE_PREFIXES = ("text_encoders.", "text_encoder.", "qwen3_06b.", "qwen3.", "transformer.", "te.", "model.",
                "base_model.")
_KOHYA_DIT_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
_KOHYA_TE_PREFIXES = ("lora_te_", "lora_te1_")

# Original (checkpoint) -> diffusers `CosmosTransformer3DModel` module names, anima_reference.md §7.1.
_DIFFUSERS_RENAMES = (
    (r"^t_embedder\.1\.", "time_embed.t_embedder."),
    (r"^t_embedding_norm$", "time_embed.norm"),
    (r"^x_embedder\.proj\.1$", "patch_embed.proj"),
    (r"^final_layer\.adaln_modulation\.([12])$", r"norm_out.linear_\1"),
    (r"^final_layer\.linear$", "proj_out"),
    (r"^blocks\.", "transformer_blocks."),
    (r"\.adaln_modulation_self_attn\.([12])$", r".norm1.linear_\1"),
    (r"\.adaln_modulation_cross_attn\.([12])$", r".norm2.linear_\1"),
    (r"\.adaln_modulation_mlp\.([12])$", r".norm3.linear_\1"),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.([qkv])_proj$", r".to_\1"),
    (r"\.output_proj$", ".to_out.0"),
    (r"\.([qk])_norm$", r".norm_\1"),
    (r"\.mlp\.layer1$", ".ff.net.0.proj"),
    (r"\.mlp\.layer2$", ".ff.net.2"),
)
_ADAPTER = "llm_adapter."
_DIFFUSERS_ADAPTER = "text_conditioner."

_LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
_MARK = "\x00"


# ---------------------------------------------------------------------------------------------------
# Prompt tags and file lookup
# ---------------------------------------------------------------------------------------------------


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove A1111 `<lora:name:0.8>` / `<lora:name>` (strength 1.0) tags from `prompt`.

    Returns the prompt with the separators around each tag tidied ("a, <lora:x>, b" -> "a, b") and the
    [(name, strength)] found, in order. A prompt without tags comes back unchanged."""
    loras = []

    def take(match: re.Match) -> str:
        body = match.group(1).strip()
        name, sep, strength = body.rpartition(":")
        if not sep:
            name, strength = body, "1"
        try:
            value = float(strength)
        except ValueError:
            raise ValueError(f"LoRA tag '{match.group(0)}': the strength after the last ':' must be a number, "
                             "as in <lora:name:0.8>.") from None
        if not name.strip():
            raise ValueError(f"LoRA tag '{match.group(0)}' names no LoRA; write it as <lora:name:0.8>.")
        loras.append((name.strip(), value))
        return _MARK

    marked = _LORA_TAG.sub(take, prompt)
    if not loras:
        return prompt, []
    marked = re.sub(rf"\s*{_MARK}[\s{_MARK}]*", _MARK, marked)
    pieces = marked.split(_MARK)
    text = pieces[0]
    for right in pieces[1:]:
        text = _join_around_removed_tag(text, right)
    return text.strip(), loras


def _join_around_removed_tag(left: str, right: str) -> str:
    """Join the text on both sides of a removed tag, dropping the separator the tag leaves orphaned."""
    left_sep = left.endswith(",")
    if not left.strip():
        return right.lstrip(", \t\n")
    if not right.strip():
        return left.rstrip(", \t\n")
    if right.startswith(","):
        return left + right if not left_sep else left + right[1:]
    return left + " " + right


def resolve_lora_path(name_or_path: str | os.PathLike, lora_dir: str | os.PathLike | None) -> Path:
    """The LoRA file for a path or a name: the path itself when it exists, else `lora_dir/name` or
    `lora_dir/name.safetensors`, else the same file name in a subfolder of `lora_dir`."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    names = [given.name] if given.suffix == ".safetensors" else [given.name, given.name + ".safetensors"]
    if lora_dir is not None:
        root = Path(lora_dir).expanduser()
        for candidate in (root / given, root / given.with_name(given.name + ".safetensors")):
            if candidate.is_file():
                return candidate
        if root.is_dir():
            for name in names:
                found = sorted(p for p in root.rglob(name) if p.is_file())
                if found:
                    return found[0]
        raise ValueError(f"LoRA '{name_or_path}' not found: no such file, nor in '{root}' or its subfolders.")
    raise ValueError(f"LoRA '{name_or_path}' not found: no such file (and no LoRA folder was given).")


# ---------------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------------


def diffusers_module_name(name: str) -> str:
    """The diffusers Cosmos name of a DiT module ('blocks.0.self_attn.output_proj' ->
    'transformer_blocks.0.attn1.to_out.0'); adapter modules live in diffusers' `text_conditioner`."""
    if name.startswith(_ADAPTER):
        return _DIFFUSERS_ADAPTER + name[len(_ADAPTER):]
    for pattern, replacement in _DIFFUSERS_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


class _ModuleTable:
    """Every name a LoRA may use for a module of one model (dotted and kohya-underscored)."""

    def __init__(self, model: nn.Module, target: str, aliases: Callable[[str], Iterable[str]]):
        self.target = target
        self.modules: dict[str, nn.Module] = {}
        self._dotted: dict[str, str] = {}
        self._underscored: dict[str, str] = {}
        ambiguous = set()
        for name, module in model.named_modules():
            if not name or not any(p in module._parameters for p in ("weight", "bias")):
                continue
            self.modules[name] = module
            for alias in {name, *aliases(name)}:
                self._dotted[alias] = name
                flat = alias.replace(".", "_")
                if self._underscored.get(flat, name) != name:
                    ambiguous.add(flat)
                self._underscored[flat] = name
        for flat in ambiguous:
            del self._underscored[flat]

    def dotted(self, key: str, prefixes: Sequence[str]) -> str | None:
        while True:
            if key in self._dotted:
                return self._dotted[key]
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                return None
            key = key[len(prefix):]

    def underscored(self, key: str, prefixes: Sequence[str]) -> str | None:
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        return None if prefix is None else self._underscored.get(key[len(prefix):])


def _dit_aliases(name: str) -> Iterable[str]:
    return (diffusers_module_name(name),)


def _text_encoder_aliases(name: str) -> Iterable[str]:
    # Qwen3Model names ('layers.0...'); Qwen3ForCausalLM and the checkpoint file add 'model.'.
    return (name[len("model."):],) if name.startswith("model.") else ("model." + name,)


def _split_key(key: str) -> tuple[str, str] | None:
    suffix = next((s for s in _SUFFIXES_LONGEST_FIRST if key.endswith(s)), None)
    return None if suffix is None else (key[: -len(suffix)], _SUFFIX_ROLES[suffix])


# ---------------------------------------------------------------------------------------------------
# Adapters: the weight change each kind encodes
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Adapter:
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
            return _factor(t, "hada_w1") * _factor(t, "hada_w2")
        if self.kind == "lokr":
            return _kron(_factor(t, "lokr_w1"), _factor(t, "lokr_w2"))
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


def _factor(t: Mapping[str, Tensor], name: str) -> Tensor:
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
_KIND_ROLES = {
    "lora": {"up", "down"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "diff": {"diff"},
}


def _adapter_kind(roles: Mapping[str, Tensor]) -> str | None:
    if "up" in roles and "down" in roles:
        return "lora"
    if all(f"hada_w{i}_{ab}" in roles for i in "12" for ab in "ab"):
        return "loha"
    if all(f"lokr_w{i}" in roles or (f"lokr_w{i}_a" in roles and f"lokr_w{i}_b" in roles) for i in "12"):
        return "lokr"
    if "diff" in roles:
        return "diff"
    return None


# ---------------------------------------------------------------------------------------------------
# A parsed LoRA file
# ---------------------------------------------------------------------------------------------------


@dataclass
class _LoraFile:
    """A LoRA's adapters keyed by (target, module name), plus the keys that could not be used."""

    name: str
    adapters: dict[tuple[str, str], _Adapter]
    unused_keys: list[str]
    total_keys: int

    @property
    def targets(self) -> set[str]:
        return {target for target, _ in self.adapters}


def _parse_lora(sd: Mapping[str, Tensor], tables: Sequence[_ModuleTable], *, name: str) -> _LoraFile:
    """Map every key of a LoRA state dict onto a module of the given models and check the shapes.

    Raises ValueError when no key is usable or when an adapter does not fit its module (a LoRA made
    for a different model)."""
    sd = fit_lora_to_dit_depth(sd, dit_block_count(n for t in tables if t.target == DIT for n in t.modules))
    groups: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    unused = []
    for key, tensor in sd.items():
        split = _split_key(key)
        place = None if split is None else _find_module(split[0], tables)
        if place is None:
            unused.append(key)
            continue
        group = groups.setdefault(place, {})
        if split[1] in group:  # the same tensor under two spellings: use one, report the other
            unused.append(group[split[1]][0])
        group[split[1]] = (key, tensor)

    adapters = {}
    for place, roles in groups.items():
        tensors = {role: tensor for role, (_, tensor) in roles.items()}
        kind = _adapter_kind(tensors)
        adapter = _Adapter(kind, {r: v for r, v in tensors.items() if kind and r in _KIND_ROLES[kind]})
        used = set(adapter.tensors)
        if kind and "alpha" in tensors:
            adapter.alpha, used = float(tensors["alpha"].float().item()), used | {"alpha"}
        if kind and kind != "diff" and "dora_scale" in tensors:
            adapter.dora_scale, used = tensors["dora_scale"], used | {"dora_scale"}
        if "diff_b" in tensors:
            adapter.bias_diff, used = tensors["diff_b"], used | {"diff_b"}
        unused.extend(key for role, (key, _) in roles.items() if role not in used)
        if kind or adapter.bias_diff is not None:
            adapters[place] = adapter

    if not adapters:
        shown = ", ".join(list(sd)[:3]) or "none"
        raise ValueError(f"LoRA '{name}' has no key that fits Anima's DiT or text encoder (first keys: {shown}); "
                         "it is probably made for another model.")
    modules = {(table.target, n): m for table in tables for n, m in table.modules.items()}
    for (target, module_name), adapter in adapters.items():
        problem = adapter.misfit(modules[(target, module_name)])
        if problem:
            raise ValueError(f"LoRA '{name}' does not fit this model ({target} module '{module_name}': "
                             f"{problem}); it was probably made for another model or model size.")
    return _LoraFile(name, adapters, unused, len(sd))


def _find_module(module_key: str, tables: Sequence[_ModuleTable]) -> tuple[str, str] | None:
    for table in tables:
        dit = table.target == DIT
        found = (table.dotted(module_key, _DIT_PREFIXES if dit else _TE_PREFIXES)
                 or table.underscored(module_key, _KOHYA_DIT_PREFIXES if dit else _KOHYA_TE_PREFIXES))
        if found:
            return table.target, found
    return None


# ---------------------------------------------------------------------------------------------------
# Applying and removing
# ---------------------------------------------------------------------------------------------------


_ParamKey = tuple[str, str, str]  # (target, module name, "weight" | "bias")


class LoraPatcher:
    """Merges LoRAs into a DiT (and optionally the Qwen3 text encoder) and takes them out again exactly."""

    def __init__(self, dit: nn.Module | None, text_encoder: nn.Module | None = None):
        self._tables = []
        if dit is not None:
            self._tables.append(_ModuleTable(dit, DIT, _dit_aliases))
        if text_encoder is not None:
            self._tables.append(_ModuleTable(text_encoder, TEXT_ENCODER, _text_encoder_aliases))
        self._modules = {(t.target, n): m for t in self._tables for n, m in t.modules.items()}
        self._backups: dict[_ParamKey, Tensor] = {}
        self._active: list[tuple[str, float]] = []
        self._files: dict[str, tuple[tuple[int, int], _LoraFile]] = {}

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
        plan: dict[_ParamKey, list[tuple[float, _Adapter]]] = {}
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
        return [_unused_warning(files[path]) for path in files if files[path].unused_keys]

    def _restore_all(self) -> None:
        for key in list(self._backups):
            self._write(key, self._backups.pop(key))
        self._active = []

    def _load(self, path: str) -> _LoraFile:
        stat = os.stat(path) if os.path.isfile(path) else None
        stamp = (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)
        cached = self._files.get(path)
        if cached is None or cached[0] != stamp:
            sd = open_state_dict(path, what="LoRA")
            cached = (stamp, _parse_lora(sd, self._tables, name=Path(path).name))
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

    def _merge(self, key: _ParamKey, contributions: Sequence[tuple[float, _Adapter]], scratch: Tensor) -> None:
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


def _unused_warning(lora: _LoraFile) -> str:
    keys = lora.unused_keys
    shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    return (f"LoRA '{lora.name}': {len(keys)} of {lora.total_keys} keys match no module of Anima's DiT or text "
            f"encoder and were ignored: {shown}")


# ---------------------------------------------------------------------------------------------------
# mmgp runtime LoRAs
# ---------------------------------------------------------------------------------------------------


def to_mmgp_lora_state_dict(sd: Mapping[str, Tensor], dit: nn.Module) -> dict[str, Tensor]:
    """Rewrite a LoRA in any supported format into the keys `mmgp.offload.load_loras_into_model` reads
    for `dit`: '<module>.lora_A.weight' / '.lora_B.weight' / '.alpha', '<module>.lokr_w1' / '.lokr_w2',
    '<module>.diff' and '<module>.diff_b', with module names of `dit`.

    mmgp knows plain LoKr factors but not factorised ones, LoHa or DoRA, and scales only LoRA by alpha;
    those are turned into LoKr factors or a full '.diff' with the scale folded in. Text-encoder and
    unmatched keys are dropped with one logged warning (mmgp loads into the DiT only)."""
    lora = _parse_lora(sd, [_ModuleTable(dit, DIT, _dit_aliases)], name="LoRA")
    modules = dict(dit.named_modules())
    out = {}
    for (_, module_name), adapter in lora.adapters.items():
        t, scale = adapter.tensors, adapter.scale()
        if adapter.kind == "lora" and adapter.dora_scale is None:
            out[f"{module_name}.lora_A.weight"] = t["down"].flatten(1)
            out[f"{module_name}.lora_B.weight"] = t["up"].flatten(1)
            if adapter.alpha is not None:
                out[f"{module_name}.alpha"] = torch.tensor(adapter.alpha)
        elif adapter.kind == "lokr" and adapter.dora_scale is None and "lokr_t2" not in t:
            factors = {k: v.float() for k, v in t.items()}
            w1, w2 = _factor(factors, "lokr_w1") * scale, _factor(factors, "lokr_w2")
            out[f"{module_name}.lokr_w1"], out[f"{module_name}.lokr_w2"] = w1, w2
        elif adapter.kind is not None:
            weight = modules[module_name].weight.detach()
            out[f"{module_name}.diff"] = adapter.weight_delta(weight.float()).to(weight.dtype)
        if adapter.bias_diff is not None:
            out[f"{module_name}.diff_b"] = adapter.bias_diff
    if lora.unused_keys:
        logger.warning(_unused_warning(lora).replace("were ignored", "are not loaded by mmgp"))
    return out
