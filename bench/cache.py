"""Step caches on the full-width DiT: DiT time, full evaluations and final-latent change, each cache at each
speed multiplier against no cache, in the same run.

Full width (2048 channels, 16 heads, a 1024-wide context of 512 tokens), a few blocks with random weights, a
1024x1024 image (latent 128x128 -> 4096 tokens), 30 er_sde steps at CFG 4, the app's own denoiser and
sampling loop (`model_factory._denoiser` / `_sample`, joint CFG pass). For each run it prints the time spent
in the DiT (the cache's own work included), the speed-up over the uncached run, the DiT evaluations that
ran in full out of all (one per CFG branch and model call), the skipped steps, and the final latents'
relative L1 difference from the uncached run.

Random weights do not show image quality: their metric sequences, and so the skip counts, differ from a
trained model's, and a latent difference says nothing of how the image looks. Calibrating the multiplier ->
threshold maps (models/anima/step_cache.py) needs the real weights. With few blocks the work a cache
cannot skip (patch embedding, final layer, block 0 for First-Block Cache, the signature) weighs more than
in the 28-block model, so the speed-ups here understate the real ones for First-Block Cache.

    python bench/cache.py [--blocks 4] [--latent 128] [--steps 30] [--device cuda] [--dtype bf16]
    (on a 2-core CPU: python bench/cache.py --latent 32 --blocks 2 --multipliers 1.5 2.5)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.anima import registry, schedulers, step_cache  # noqa: E402
from models.anima.anima_main import model_factory  # noqa: E402
from models.anima.anima_model import load_anima_model  # noqa: E402
from tests.tiny_dit import make_dit_state_dict  # noqa: E402

WIDTH, HEADS, TEXT_DIM, LORA_DIM, CONTEXT_TOKENS = 2048, 16, 1024, 256, 512
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLER, CFG, SHIFT, SEED = "er_sde", 4.0, 3.0, 42


class BenchPipe(model_factory):
    """`model_factory`'s sampling loop around a DiT alone (no text encoder, no VAE)."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device):
        # not model_factory.__init__, which loads the three files
        self.transformer, self.device, self._interrupt = transformer, device, False


class DiTClock:
    """Seconds spent in the DiT's forward: wall time synchronised on CUDA; on the CPU the process' CPU
    time, the fairer measure when other jobs share the cores."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.seconds, self.device, self._start = 0.0, device, 0.0
        self._now = time.perf_counter if device.type == "cuda" else time.process_time
        module.register_forward_pre_hook(lambda *_: self._tick())
        module.register_forward_hook(lambda *_: self._tock())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _tick(self) -> None:
        self._sync()
        self._start = self._now()

    def _tock(self) -> None:
        self._sync()
        self.seconds += self._now() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--latent", type=int, default=128, help="latent side (image side / 8)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--start", type=float, default=0, help="skip_steps_start_step_perc")
    parser.add_argument("--multipliers", type=float, nargs="+", default=list(registry.SPEED_MULTIPLIERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    sd = make_dit_state_dict(dtype=torch.float32, model_channels=WIDTH, num_blocks=args.blocks, num_heads=HEADS,
                             text_dim=TEXT_DIM, adapter_layers=1, adapter_heads=HEADS, adaln_lora_dim=LORA_DIM)
    dit = load_anima_model(sd, dtype=dtype, device=device)
    del sd
    pipe, clock = BenchPipe(dit, device), DiTClock(dit, device)
    g = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(1, CONTEXT_TOKENS, TEXT_DIM, generator=g).to(device, dtype) for _ in range(2))
    side = args.latent * 8
    print(f"torch {torch.__version__} on {device} ({dtype}), {torch.get_num_threads()} CPU threads; {args.blocks} "
          f"blocks x {WIDTH} wide, random weights; {side}x{side} ({(args.latent // 2) ** 2} tokens), {args.steps} "
          f"{SAMPLER} steps, CFG {CFG:g}, start {args.start:g}%")

    def sample(cache_type: str, multiplier: float | None,
               steps: int) -> tuple[torch.Tensor, float, step_cache.StepCacheRun | None]:
        cache_run = pipe._step_cache_run(cache_type, multiplier, args.start)
        denoise = pipe._denoiser(cond, uncond, CFG, True, None, cache_run)
        sigmas = schedulers.compute_sigmas("simple", steps, SHIFT, SAMPLER).to(device)
        clock.seconds = 0.0
        with torch.no_grad():
            latents = pipe._sample(SAMPLER, denoise, sigmas, [SEED], side, side, SHIFT, None, None, cache_run)
        return latents.float().cpu(), clock.seconds, cache_run

    sample("tea", 2.5, 4)  # warm-up: kernels, allocator, the cached path
    base, base_seconds, _ = sample("", None, args.steps)
    evaluations = 2 * args.steps
    rows = [("no cache", "", base_seconds, 1.0, f"{evaluations}/{evaluations}", "0", 0.0)]
    for kind in registry.STEP_CACHES.values():
        for multiplier in args.multipliers:
            latents, seconds, cache_run = sample(kind.name, multiplier, args.steps)
            skipped, total = cache_run.evaluations
            difference = float((latents - base).abs().mean() / base.abs().mean())
            rows.append((f"{kind.label} x{multiplier:g}", f"{kind.threshold(multiplier):g}", seconds,
                         base_seconds / seconds, f"{total - skipped}/{total}", str(cache_run.skipped_steps),
                         difference))
    base_seconds = min(base_seconds, sample("", None, args.steps)[1])  # the uncached run again: drift
    rows[0] = (*rows[0][:2], base_seconds, 1.0, *rows[0][4:])
    rows[1:] = [(*r[:3], base_seconds / r[2], *r[4:]) for r in rows[1:]]
    clock_name = "DiT s" if device.type == "cuda" else "DiT CPU s"
    print(f"\n{'cache':<26} {'threshold':>9} {clock_name:>9} {'speed-up':>8} {'full evals':>10} {'skipped steps':>13} "
          f"{'latent diff':>11}")
    for name, threshold, seconds, speedup, full, skipped_steps, difference in rows:
        print(f"{name:<26} {threshold:>9} {seconds:9.2f} {speedup:7.2f}x {full:>10} {skipped_steps:>13} "
              f"{difference:11.4f}")
    print("\nlatent diff: mean |cached - uncached| / mean |uncached| of the final latents.\n"
          "Random weights do not show image quality: these skip counts and differences are not what the trained "
          "model gives.\nCalibrate the multiplier -> threshold maps (step_cache.py) on real weights.")


if __name__ == "__main__":
    main()
