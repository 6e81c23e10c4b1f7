"""Where img2img and the hires fix spend their time, next to text-to-image of the same size and steps.

The model is bench/pipeline.py's full-width Anima with few layers (DiT 2048 wide with `--blocks` blocks,
the full LLM adapter, a Qwen3 1024 wide with `--te-layers` layers, the full Wan 2.1 VAE), random weights in
the real file formats, fp32 on the CPU. Three runs of `--steps` steps, CFG 4, Euler + simple:

* txt2img at `--size`^2;
* img2img at `--size`^2, denoise `--denoise` (a random source image): ComfyUI's denoise runs all `--steps`
  steps over the tail of a longer schedule, so it costs txt2img plus one VAE encode;
* txt2img at `--size`^2 plus a hires-fix pass: Lanczos to `--hires-scale` times the size, encode, then
  `--hires-steps` steps at `--hires-denoise`; the pass's own cost is this run minus the txt2img run.

Phases: text = Qwen3 + LLM adapter, encode / decode = the VAE's, steps = the DiT's forwards, other = the rest
(sampler, noise, Lanczos, pixels). Each run comes after a 256^2 warm-up; with `--repeats` the runs alternate
and each phase's best time is kept (other jobs share this CPU). The weights are a few GB in RAM at the default
sizes: run it under the big-memory lock, `flock /tmp/bigmem.lock python bench/img2img.py`.

    python bench/img2img.py [--blocks 2] [--te-layers 4] [--steps 2] [--size 1024] [--denoise 0.6]
                            [--hires-scale 1.5] [--hires-steps 2] [--hires-denoise 0.5] [--repeats 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import NEGATIVE, PROMPT, REAL, PhaseTimer, Sizes, write_checkpoints  # noqa: E402
from models.anima.anima_main import model_factory  # noqa: E402

PHASES = ("text", "encode", "steps", "decode", "other", "total")


def runner(files):
    """run(**generate kwargs) -> phase seconds, for one loaded model."""
    model = model_factory(*files, device="cpu")
    timer = PhaseTimer()
    timer.module("text", model.text_encoder)
    timer.module("text", model.transformer.llm_adapter)
    timer.module("steps", model.transformer)
    timer.method("encode", model.vae, "encode")
    timer.method("decode", model.vae, "decode")

    def run(**kwargs) -> dict[str, float]:
        model._prompt_cache.clear()  # each run encodes its prompts
        timer.seconds.clear()
        start = time.perf_counter()
        model.generate(input_prompt=PROMPT, n_prompt=NEGATIVE, guide_scale=4.0, sample_solver="euler",
                       scheduler="simple", seed=0, joint_pass=True, **kwargs)
        total = time.perf_counter() - start
        parts = {p: timer.seconds[p] for p in PHASES[:4]}
        return parts | {"other": total - sum(parts.values()), "total": total}

    run(width=256, height=256, sampling_steps=1)  # warm-up
    return run


def source_image(size: int) -> torch.Tensor:
    """A random 8-bit picture as Wan2GP passes it: [3, 1, H, W] in [-1, 1]."""
    pixels = torch.randint(0, 256, (3, 1, size, size), generator=torch.Generator().manual_seed(1))
    return pixels.float() / 255.0 * 2.0 - 1.0


def table(rows: dict[str, dict[str, float]], steps: dict[str, int]) -> str:
    head = f"{'run':<34}" + "".join(f"{p:>9}" for p in PHASES) + f"{'s/step':>9}"
    lines = [head, "-" * len(head)]
    for name, parts in rows.items():
        per_step = parts["steps"] / steps[name] if steps[name] else 0.0
        lines.append(f"{name:<34}" + "".join(f"{parts[p]:>9.2f}" for p in PHASES) + f"{per_step:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--te-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--denoise", type=float, default=0.6)
    p.add_argument("--hires-scale", type=float, default=1.5)
    p.add_argument("--hires-steps", type=int, default=2)
    p.add_argument("--hires-denoise", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sizes = Sizes(**{**REAL.__dict__, "blocks": args.blocks, "te_layers": args.te_layers})
    side, hires_side = args.size, round(args.size * args.hires_scale / 16) * 16
    runs = {
        f"txt2img {side}^2": dict(width=side, height=side, sampling_steps=args.steps),
        f"img2img {side}^2 d={args.denoise:g}": dict(
            width=side, height=side, sampling_steps=args.steps, input_frames=source_image(side),
            denoising_strength=args.denoise),
        f"txt2img {side}^2 + hires {hires_side}^2": dict(
            width=side, height=side, sampling_steps=args.steps, hires_scale=args.hires_scale,
            hires_steps=args.hires_steps, hires_denoise=args.hires_denoise),
    }
    steps = dict(zip(runs, (args.steps, args.steps, args.steps + args.hires_steps)))
    with tempfile.TemporaryDirectory() as tmp:
        files = write_checkpoints(Path(tmp), sizes)
        run = runner(files)
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeats):
            for name, kwargs in runs.items():
                parts = run(**kwargs)
                best[name] = {k: min(v, best.get(name, parts)[k]) for k, v in parts.items()}
    txt2img, img2img, hires = (best[name] for name in runs)
    alone = {p: hires[p] - txt2img[p] for p in PHASES[1:-1]} | {"text": 0.0}  # the prompts are encoded once
    best[f"hires pass alone ({side}->{hires_side})"] = alone | {"total": sum(alone.values())}
    steps[f"hires pass alone ({side}->{hires_side})"] = args.hires_steps
    print(f"Anima, DiT {sizes.width} wide x {sizes.blocks} blocks, Qwen3 x {sizes.te_layers} layers, full VAE; fp32, "
          f"CPU, {torch.get_num_threads()} threads; {args.steps} steps, CFG 4, euler/simple; best of {args.repeats}")
    print(table(best, steps))
    pass_alone = best[f"hires pass alone ({side}->{hires_side})"]
    print(f"img2img / txt2img total: {img2img['total'] / txt2img['total']:.2f}x (encode "
          f"{img2img['encode']:.2f} s; same step count)")
    print(f"hires pass / txt2img total: {pass_alone['total'] / txt2img['total']:.2f}x; per step "
          f"{pass_alone['steps'] / max(args.hires_steps, 1) / (txt2img['steps'] / args.steps):.2f}x the "
          f"{side}^2 step")


if __name__ == "__main__":
    main()
