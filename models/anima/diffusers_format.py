"""Anima DiT weights saved in diffusers' layout (`circlestone-labs/Anima-Base-v1.0-Diffusers`), read into
the original checkpoint's key names without importing diffusers.

Such a folder holds `transformer/` (a `CosmosTransformer3DModel`: the DiT under diffusers' names) and
`text_conditioner/` (an `AnimaTextConditioner`: the LLM adapter, under the checkpoint's names without
`llm_adapter.`), each as `diffusion_pytorch_model.safetensors` or as shards listed in
`diffusion_pytorch_model.safetensors.index.json`. The renames undo diffusers'
`convert_cosmos_transformer_checkpoint_to_diffusers` (anima_reference.md §7.1).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from .weights import WeightsError, open_state_dict

TRANSFORMER_FOLDER = "transformer"
TEXT_CONDITIONER_FOLDER = "text_conditioner"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
ADAPTER_PREFIX = "llm_adapter."

# diffusers name -> checkpoint name, for whole dotted segments.
_TOP_LEVEL = {
    "time_embed.t_embedder": "t_embedder.1",
    "time_embed.norm": "t_embedding_norm",
    "patch_embed.proj": "x_embedder.proj.1",
    "norm_out.linear_1": "final_layer.adaln_modulation.1",
    "norm_out.linear_2": "final_layer.adaln_modulation.2",
    "proj_out": "final_layer.linear",
}
_IN_BLOCK = {
    "norm1.linear_1": "adaln_modulation_self_attn.1",
    "norm1.linear_2": "adaln_modulation_self_attn.2",
    "norm2.linear_1": "adaln_modulation_cross_attn.1",
    "norm2.linear_2": "adaln_modulation_cross_attn.2",
    "norm3.linear_1": "adaln_modulation_mlp.1",
    "norm3.linear_2": "adaln_modulation_mlp.2",
    "ff.net.0.proj": "mlp.layer1",
    "ff.net.2": "mlp.layer2",
}
_IN_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "output_proj",
                 "norm_q": "q_norm", "norm_k": "k_norm"}
_BLOCK_KEY = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_ATTENTION_KEY = re.compile(r"(attn1|attn2)\.(.+)")


def _rename_module(path: str, table: Mapping[str, str]) -> str | None:
    """`path` with its leading module renamed by `table` (longest match on whole segments), else None."""
    for old in sorted(table, key=len, reverse=True):
        if path == old or path.startswith(old + "."):
            return table[old] + path[len(old):]
    return None


def checkpoint_dit_key(key: str) -> str:
    """The original checkpoint's name (without `net.`) of a diffusers `CosmosTransformer3DModel` key.
    Raises WeightsError for a key that is not part of an Anima DiT."""
    renamed = _rename_module(key, _TOP_LEVEL)
    if renamed is not None:
        return renamed
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        index, rest = block.groups()
        attention = _ATTENTION_KEY.fullmatch(rest)
        if attention:
            which, inner = attention.groups()
            inner = _rename_module(inner, _IN_ATTENTION)
            if inner is not None:
                return f"blocks.{index}.{'self_attn' if which == 'attn1' else 'cross_attn'}.{inner}"
        else:
            inner = _rename_module(rest, _IN_BLOCK)
            if inner is not None:
                return f"blocks.{index}.{inner}"
    raise WeightsError(f"The diffusers Anima transformer has an unexpected tensor '{key}'; the folder is not an "
                       "Anima DiT in diffusers format.")


def is_diffusers_folder(source: object) -> bool:
    """Whether `source` is a diffusers-format model folder or its `transformer/` subfolder."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return False
    folder = Path(source)
    return (folder / TRANSFORMER_FOLDER).is_dir() or _has_weights(folder)


def _has_weights(folder: Path) -> bool:
    return (folder / WEIGHTS_NAME).is_file() or (folder / f"{WEIGHTS_NAME}.index.json").is_file()


def _read_component(folder: Path, what: str) -> dict[str, Tensor]:
    """The tensors of one diffusers component folder, single file or shards."""
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"'{index}' is not a valid shard index; download the {what} again.") from None
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise WeightsError(f"The diffusers {what} folder '{folder}' holds no {WEIGHTS_NAME} (nor its shard index).")
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(open_state_dict(folder / name, what=what))
    return tensors


def read_diffusers_dit(source: str | os.PathLike) -> dict[str, Tensor]:
    """DiT + adapter tensors of a diffusers-format folder (the model folder, or its `transformer/`
    subfolder with `text_conditioner/` beside it), keyed as the original checkpoint without `net.`."""
    folder = Path(source)
    if not (folder / TRANSFORMER_FOLDER).is_dir() and _has_weights(folder):
        folder = folder.parent  # given the transformer folder itself
    transformer = _read_component(folder / TRANSFORMER_FOLDER, "Anima DiT (diffusers transformer)")
    conditioner_folder = folder / TEXT_CONDITIONER_FOLDER
    if not conditioner_folder.is_dir():
        raise WeightsError(f"The diffusers Anima folder '{folder}' has no '{TEXT_CONDITIONER_FOLDER}/' (the LLM "
                           "adapter); download the whole model folder.")
    conditioner = _read_component(conditioner_folder, "Anima text conditioner")
    sd = {checkpoint_dit_key(k): v for k, v in transformer.items()}
    sd.update({ADAPTER_PREFIX + k: v for k, v in conditioner.items()})
    return sd
