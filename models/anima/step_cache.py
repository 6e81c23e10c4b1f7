"""Step-skipping caches for the Anima DiT: TeaCache and First-Block Cache (Wan2GP's `skip_steps_cache_type`
"tea" and "first_block").

Both decide, for every DiT evaluation of one image and one CFG branch (a *key*: `(image, "cond")` or
`(image, "uncond")`), whether to run the block stack or to reuse what it added the last time it ran:
  * TeaCache (checkpoints.md §4): the signature is block 0's modulated self-attention input,
    `layer_norm(x) * (1 + scale) + shift`. Its relative L1 change from the previous evaluation, rescaled by
    the published Anima polynomial, accumulates; while the sum stays under the threshold the whole block
    stack is skipped (x + the stack's last residual), otherwise the stack runs and the sum restarts at 0.
  * First-Block Cache: block 0 always runs; the signature is its residual. When that residual changed by less
    than the threshold (relative mean absolute change against the last *full* evaluation), blocks 1.. are
    skipped (block 0's output + their last residual).
Whatever the rule says, an evaluation runs in full in the first steps (`skip_steps_start_step_perc` of the
steps, at least the first step), in the last step, when its key has nothing cached yet, and after
`MAX_CONSECUTIVE_SKIPS` skips in a row. A sampler that calls the model several times per step (heun, the
UniPC corrector) gets a decision per call; the step index comes from the sampler's step callbacks.

The DiT's forward runs the block stack through `CachedRows.run_blocks` only when a cache is on: with it
off the forward is untouched (bit-identical, and it still traces as one graph). The per-evaluation
decisions are Python between block calls, outside the (compiled) block forwards.

`registry.STEP_CACHES` is the one registry: names, labels, and speed multiplier -> threshold maps.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .registry import DEFAULT_MULTIPLIER, STEP_CACHES, TEACACHE_COEFFICIENTS

MAX_CONSECUTIVE_SKIPS = 3

Key = Hashable  # (image index, "cond" | "uncond")


@dataclass(frozen=True)
class StepCacheSettings:
    kind: str  # a key of STEP_CACHES
    threshold: float
    start_step_perc: float = 0.0  # no skipping in this first percentage of the steps
    coefficients: tuple[float, ...] = TEACACHE_COEFFICIENTS  # TeaCache's rescaling polynomial
    max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS
    multiplier: float | None = None  # the speed multiplier the threshold came from (for reports)

    @property
    def label(self) -> str:
        return STEP_CACHES[self.kind].label


def cache_settings(cache_type: str | None, multiplier: float | None = None,
                   start_step_perc: float | None = None) -> StepCacheSettings | None:
    """Settings from Wan2GP's three keys; None when `cache_type` is empty (the cache is off)."""
    if not cache_type:
        return None
    kind = STEP_CACHES.get(cache_type)
    if kind is None:
        raise ValueError(f"Unknown step cache '{cache_type}': choose one of {', '.join(STEP_CACHES)} "
                         f"(or leave it empty for none).")
    multiplier = DEFAULT_MULTIPLIER if multiplier is None else float(multiplier)
    return StepCacheSettings(cache_type, kind.threshold(multiplier), float(start_step_perc or 0), multiplier=multiplier)


def host_cache_settings(host_cache: Any) -> StepCacheSettings | None:
    """Settings from upstream Wan2GP's `transformer.cache` object (built by wgp and the handler's
    `set_cache_parameters`), or None when it is absent or of a kind this family does not have."""
    kind = getattr(host_cache, "cache_type", None) if host_cache is not None else None
    if kind not in STEP_CACHES:
        return None
    multiplier = getattr(host_cache, "multiplier", None)
    threshold = getattr(host_cache, "threshold", None)
    if threshold is None:
        threshold = STEP_CACHES[kind].threshold(DEFAULT_MULTIPLIER if multiplier is None else multiplier)
    coefficients = getattr(host_cache, "coefficients", None) or TEACACHE_COEFFICIENTS
    return StepCacheSettings(kind, float(threshold), float(getattr(host_cache, "start_step_perc", 0) or 0),
                             tuple(float(c) for c in coefficients),
                             multiplier=None if multiplier is None else float(multiplier))


# ----------------------------------------------------------------------------------------- the rules


@dataclass
class BranchState:
    """What one key remembers between its evaluations."""

    reference: Tensor | None = None  # the signature compared against
    residual: Tensor | None = None  # what the skippable blocks added at the last full evaluation
    accumulated: float = 0.0  # TeaCache's rescaled distance since the last full evaluation
    skips_in_a_row: int = 0


def relative_change(signature: Tensor, reference: Tensor) -> float:
    """mean |signature - reference| / mean |reference| (float32)."""
    signature, reference = signature.float(), reference.float()
    return float((signature - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12))


def polynomial(coefficients: Sequence[float], value: float) -> float:
    """coefficients[0] * value^(n-1) + ... + coefficients[-1] (numpy's poly1d order)."""
    result = 0.0
    for c in coefficients:
        result = result * value + c
    return result


def teacache_skips(state: BranchState, change: float, settings: StepCacheSettings) -> bool:
    """TeaCache's rule for one evaluation that may skip: accumulate the rescaled change; skip while the sum
    stays under the threshold (and the skip cap allows), else run in full and restart the sum."""
    state.accumulated += abs(polynomial(settings.coefficients, change))
    if state.accumulated < settings.threshold and state.skips_in_a_row < settings.max_consecutive_skips:
        return True
    state.accumulated = 0.0
    return False


def first_block_skips(state: BranchState, change: float, settings: StepCacheSettings) -> bool:
    """First-Block Cache's rule: skip while block 0's residual changed by less than the threshold since the
    last full evaluation (and the skip cap allows)."""
    return change < settings.threshold and state.skips_in_a_row < settings.max_consecutive_skips


SKIP_RULES: dict[str, Callable[[BranchState, float, StepCacheSettings], bool]] = {
    "tea": teacache_skips, "first_block": first_block_skips}


# ------------------------------------------------------------------------------------------ one run


@dataclass
class _StepCount:
    evaluations: int = 0
    skipped: int = 0


class StepCacheRun:
    """The cache state of one generation: one `BranchState` per key (so each image of a batch and each CFG
    branch has its own), the current step, and what was skipped. Make a new one for every generation."""

    def __init__(self, settings: StepCacheSettings):
        self.settings = settings
        self.kind = STEP_CACHES[settings.kind]
        self.rule = SKIP_RULES[settings.kind]
        self.states: dict[Key, BranchState] = {}
        self.num_steps = 0
        self.step = 0
        self.counts: list[_StepCount] = []

    def start(self, num_steps: int) -> None:
        """Before the first step of a schedule of `num_steps` steps."""
        self.num_steps, self.step = num_steps, 0
        self.states.clear()
        self.counts = [_StepCount() for _ in range(num_steps)]

    def begin_step(self, step: int) -> None:
        self.step = step

    @property
    def first_skippable_step(self) -> int:
        return max(1, int(self.settings.start_step_perc * self.num_steps / 100))

    def may_skip(self) -> bool:
        return self.first_skippable_step <= self.step < self.num_steps - 1

    def decide(self, key: Key, signature: Tensor) -> bool:
        """True when this evaluation of `key` may reuse the cache (skip), from its signature; updates the
        key's state as the rule says. The caller then runs the blocks (False) or applies the residual."""
        state = self.states.setdefault(key, BranchState())
        skip = False
        if state.reference is not None and state.residual is not None and self.may_skip():
            skip = self.rule(state, relative_change(signature, state.reference), self.settings)
        else:
            state.accumulated = 0.0  # a forced full evaluation restarts TeaCache's sum, as upstream's does
        state.skips_in_a_row = state.skips_in_a_row + 1 if skip else 0
        if self.kind.reference_every_call or not skip:
            state.reference = signature
        count = self.counts[min(self.step, len(self.counts) - 1)]
        count.evaluations += 1
        count.skipped += skip
        return skip

    def rows(self, keys: Sequence[Key]) -> CachedRows:
        """The cache for one DiT call whose batch rows are `keys`."""
        return CachedRows(self, tuple(keys))

    # ------------------------------------------------------------------------------- reports

    @property
    def skipped_steps(self) -> int:
        """Steps whose every DiT evaluation was skipped."""
        return sum(1 for c in self.counts if c.evaluations and c.skipped == c.evaluations)

    @property
    def evaluations(self) -> tuple[int, int]:
        """(skipped, all) DiT evaluations (one per image, CFG branch and model call)."""
        return sum(c.skipped for c in self.counts), sum(c.evaluations for c in self.counts)

    def step_report(self, step: int) -> str:
        """What step `step` did, for the progress bar: 'TeaCache: skipped (3/7 skipped)'."""
        count = self.counts[step]
        if count.evaluations and count.skipped == count.evaluations:
            what = "skipped"
        elif count.skipped:
            what = f"{count.skipped}/{count.evaluations} passes skipped"
        else:
            what = "full"
        return f"{self.settings.label}: {what} ({self.skipped_steps}/{step + 1} skipped)"

    def summary(self) -> str:
        skipped, total = self.evaluations
        return (f"{self.settings.label} skipped {self.skipped_steps} of {self.num_steps} steps "
                f"({skipped} of {total} DiT passes)")


@dataclass(frozen=True)
class CachedRows:
    """A `StepCacheRun` bound to the rows of one DiT call (what the DiT's forward receives)."""

    run: StepCacheRun
    keys: tuple[Key, ...]

    def run_blocks(self, blocks: nn.ModuleList, x: Tensor, emb: Tensor, context: Tensor, rope: Any,
                   adaln_lora: Tensor) -> Tensor:
        """The block stack on x [B, L, D] (B = len(keys)), each row computed or taken from its cache.

        Rows that run do so as one batch: with no row skipped this is exactly the uncached stack."""
        if x.shape[0] != len(self.keys):
            raise ValueError(f"The step cache got {x.shape[0]} rows for {len(self.keys)} keys.")
        run, head = self.run, self.run.kind.head_blocks
        x_head = x
        for block in blocks[:head]:
            x_head = block(x_head, emb, context, rope, adaln_lora)
        if head:
            signatures = x_head - x  # [B, L, D] the first block's residual
        else:
            signatures = blocks[0].self_attn_input(x, emb, adaln_lora)[0]  # [B, L, D]
        skips = [run.decide(key, signatures[row]) for row, key in enumerate(self.keys)]
        computed = [row for row, skip in enumerate(skips) if not skip]
        out = x_head.clone() if any(skips) else x_head
        if computed:
            part = slice(None) if len(computed) == len(skips) else torch.tensor(computed, device=x.device)
            h = start = x_head[part]
            sub = [t[part] if t.shape[0] == len(skips) else t for t in (emb, context, adaln_lora)]
            for block in blocks[head:]:
                h = block(h, sub[0], sub[1], rope, sub[2])
            residual = h - start  # [b, L, D] in the residual stream's dtype, as the blocks add it
            for i, row in enumerate(computed):
                run.states[self.keys[row]].residual = residual[i]
            if len(computed) == len(skips):
                return h
            out[part] = h
        for row, skip in enumerate(skips):
            if skip:
                out[row] = x_head[row] + run.states[self.keys[row]].residual
        return out
