"""LoRAs made for the 28-block Anima 2B, renumbered for the community 40-block "Anima 2.9B".

Anima-2.9B (Gazingstars123, checkpoints.md §1.3) grew the DiT LLaMA-Pro style: twelve new blocks were
interleaved at indices 2, 5, 8, 11, 14, 17, 21, 24, 27, 30, 33, 36 (its `expand_manifest.json`), and old
block i became the i-th of the remaining indices. A 28-block LoRA therefore applies to a 40-block DiT once
each `blocks.<i>` in its keys (any spelling: `diffusion_model.blocks.3.`, diffusers'
`transformer_blocks.3.`, kohya's `lora_unet_blocks_3_`) becomes `blocks.<kept[i]>`; the LLM adapter's own
`llm_adapter.blocks.<i>` are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor

BASE_BLOCKS = 28
ANIMA_2B9_INSERTED_BLOCKS = (2, 5, 8, 11, 14, 17, 21, 24, 27, 30, 33, 36)
ANIMA_2B9_BLOCKS = BASE_BLOCKS + len(ANIMA_2B9_INSERTED_BLOCKS)
# Where each block of Anima 2B sits in the 40-block DiT.
ANIMA_2B9_BASE_BLOCK_INDICES = tuple(i for i in range(ANIMA_2B9_BLOCKS) if i not in ANIMA_2B9_INSERTED_BLOCKS)

_BLOCK = re.compile(r"(?<![A-Za-z0-9])blocks([._])(\d+)(?=[._])")
_ADAPTER_ENDINGS = ("llm_adapter.", "llm_adapter_")
_DIT_BLOCK_MODULE = re.compile(r"blocks\.(\d+)\.")


def _dit_block_matches(key: str) -> list[re.Match]:
    return [m for m in _BLOCK.finditer(key) if not key[:m.start()].endswith(_ADAPTER_ENDINGS)]


def dit_block_count(module_names: Iterable[str]) -> int:
    """Number of DiT blocks among a DiT's module names (`blocks.<i>.…`)."""
    indices = [int(m.group(1)) for name in module_names if (m := _DIT_BLOCK_MODULE.match(name))]
    return 1 + max(indices) if indices else 0


def fit_lora_to_dit_depth(lora: Mapping[str, Tensor], dit_blocks: int) -> Mapping[str, Tensor]:
    """`lora` with its DiT block indices moved to Anima 2.9B's places when the DiT has 40 blocks and the
    LoRA only names blocks 0-27 (a LoRA for Anima 2B); otherwise `lora` itself."""
    if dit_blocks != ANIMA_2B9_BLOCKS:
        return lora
    indices = [int(m.group(2)) for key in lora for m in _dit_block_matches(key)]
    if not indices or max(indices) >= BASE_BLOCKS:
        return lora
    return {_renumber(key): tensor for key, tensor in lora.items()}


def _renumber(key: str) -> str:
    for m in reversed(_dit_block_matches(key)):
        new_index = ANIMA_2B9_BASE_BLOCK_INDICES[int(m.group(2))]
        key = f"{key[:m.start()]}blocks{m.group(1)}{new_index}{key[m.end():]}"
    return key
