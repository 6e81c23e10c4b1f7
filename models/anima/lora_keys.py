"""LoRA key formats: every spelling a trainer writes, resolved against the real module names of the DiT
and the text encoder (users.md §2.2), and the parse of a file into adapters per module.

- kohya sd-scripts: `lora_unet_blocks_0_self_attn_q_proj.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  text encoder `lora_te_layers_0_mlp_down_proj.*` (also `lora_te1_`). The underscores are matched against
  the module names with their dots replaced, never split by guesswork.
- ComfyUI / diffusion-pipe / DiffSynth: `diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight`,
  `diffusion_model.llm_adapter.blocks.*`, text encoder `text_encoder.qwen3.layers.*` (and the other
  text-encoder prefixes below); PEFT's `.lora_A.default.weight` spelling too.
- diffusers / PEFT / OneTrainer: `transformer.transformer_blocks.0.attn1.to_q.*` (the diffusers Cosmos
  names, mapped back through the rename map of anima_reference.md §7.1), `text_conditioner.*` for the adapter.
- LyCORIS: LoHa (`hada_w1_a` ...), LoKr (`lokr_w1`/`lokr_w2`, factorised `_a`/`_b`, `lokr_t2`), DoRA
  (`dora_scale`, PEFT's `lora_magnitude_vector`), full `.diff` / `.w_norm` weights (norms included) and
  `.diff_b` / `.b_norm` biases.
- `net.`-prefixed variants of all of these.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .lora_adapters import KIND_ROLES, Adapter, adapter_kind
from .lora_blocks import dit_block_count, fit_lora_to_dit_depth

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


def diffusers_module_name(name: str) -> str:
    """The diffusers Cosmos name of a DiT module ('blocks.0.self_attn.output_proj' ->
    'transformer_blocks.0.attn1.to_out.0'); adapter modules live in diffusers' `text_conditioner`."""
    if name.startswith(_ADAPTER):
        return _DIFFUSERS_ADAPTER + name[len(_ADAPTER):]
    for pattern, replacement in _DIFFUSERS_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


class ModuleTable:
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


def dit_aliases(name: str) -> Iterable[str]:
    return (diffusers_module_name(name),)


def text_encoder_aliases(name: str) -> Iterable[str]:
    # Qwen3Model names ('layers.0...'); Qwen3ForCausalLM and the checkpoint file add 'model.'.
    return (name[len("model."):],) if name.startswith("model.") else ("model." + name,)


def _split_key(key: str) -> tuple[str, str] | None:
    suffix = next((s for s in _SUFFIXES_LONGEST_FIRST if key.endswith(s)), None)
    return None if suffix is None else (key[: -len(suffix)], _SUFFIX_ROLES[suffix])


@dataclass
class LoraFile:
    """A LoRA's adapters keyed by (target, module name), plus the keys that could not be used."""

    name: str
    adapters: dict[tuple[str, str], Adapter]
    unused_keys: list[str]
    total_keys: int

    @property
    def targets(self) -> set[str]:
        return {target for target, _ in self.adapters}


def parse_lora(sd: Mapping[str, Tensor], tables: Sequence[ModuleTable], *, name: str) -> LoraFile:
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
        kind = adapter_kind(tensors)
        adapter = Adapter(kind, {r: v for r, v in tensors.items() if kind and r in KIND_ROLES[kind]})
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
    return LoraFile(name, adapters, unused, len(sd))


def _find_module(module_key: str, tables: Sequence[ModuleTable]) -> tuple[str, str] | None:
    for table in tables:
        dit = table.target == DIT
        found = (table.dotted(module_key, _DIT_PREFIXES if dit else _TE_PREFIXES)
                 or table.underscored(module_key, _KOHYA_DIT_PREFIXES if dit else _KOHYA_TE_PREFIXES))
        if found:
            return table.target, found
    return None



def unused_warning(lora: LoraFile) -> str:
    keys = lora.unused_keys
    shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    return (f"LoRA '{lora.name}': {len(keys)} of {lora.total_keys} keys match no module of Anima's DiT or text "
            f"encoder and were ignored: {shown}")
