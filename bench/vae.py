"""VAE decode benchmark: our image VAE against diffusers' AutoencoderKLQwenImage, fp32 on the CPU.

Real width (base 96) with random weights written in the real file format. Every case runs in its own
fresh subprocess. Memory: the weights are the RSS growth from loading them, the activations the growth
of the peak RSS (the kernel's VmHWM, reset after loading) during the decode, and the total is both.
(getrusage's ru_maxrss would include the forked parent's RSS, and loading maps the file, whose pages
count in RSS until the mapping is dropped.) Time is the wall clock and the process CPU time of the one
decode call; the CPU time is the steadier number on a shared machine.

    python bench/vae.py                 # 1024x1024 ours vs diffusers, 2048x2048 tiled (ours)
    python bench/vae.py --latent 64     # smaller, for quick checks
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def worker(impl: str, weights: str, latent: int, tile_size: int | None, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from models.anima.vae import LATENT_MEAN, LATENT_STD, load_vae

    if impl == "diffusers":
        from diffusers import AutoencoderKLQwenImage
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
        from safetensors.torch import load_file
    rss_imported = _status_mb("VmRSS:")
    z = torch.randn(1, 16, latent, latent, generator=torch.Generator().manual_seed(0))
    if impl == "ours":
        vae = load_vae(weights, dtype=torch.float32)
        decode = lambda: vae.decode(z, tile_size=tile_size)  # noqa: E731
    else:
        with torch.device("meta"):
            ref = AutoencoderKLQwenImage(base_dim=96)
        converted = {k: v.float() for k, v in convert_wan_vae_to_diffusers(load_file(weights)).items()}
        ref.load_state_dict(converted, assign=True)
        del converted
        ref.eval().requires_grad_(False)
        mean = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)
        std = torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
        decode = lambda: ref.decode(z[:, :, None] * std + mean).sample[:, :, 0]  # noqa: E731
    rss_loaded = _status_mb("VmRSS:")
    _reset_peak_rss()
    with torch.inference_mode():
        start, start_cpu = time.perf_counter(), time.process_time()
        image = decode()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = _status_mb("VmHWM:")
    torch.save(image, out)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "weights_mb": rss_loaded - rss_imported,
                      "activations_mb": peak - rss_loaded, "total_mb": peak - rss_imported}))


def run_case(impl: str, weights: Path, latent: int, tile_size: int | None, out: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--weights", str(weights), "--latent", str(latent),
           "--out", str(out), "--threads", str(threads)]
    if tile_size:
        cmd += ["--worker-tile-size", str(tile_size)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _describe(name: str, r: dict) -> str:
    return (f"  {name:10s} {r['seconds']:7.1f} s wall {r['cpu_seconds']:7.1f} s CPU   memory: weights "
            f"{r['weights_mb']:5.0f} MB + activations {r['activations_mb']:5.0f} MB = {r['total_mb']:5.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=128, help="latent edge of the ours-vs-diffusers case")
    parser.add_argument("--tiled-latent", type=int, default=256, help="latent edge of the tiled case (0: skip)")
    parser.add_argument("--tile-size", type=int, default=512, help="tile edge in pixels for the tiled case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-tile-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.weights, args.latent, args.worker_tile_size, args.out, args.threads)
        return

    import torch

    from tests.tiny_vae import write_vae_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = write_vae_file(tmp / "qwen_image_vae.safetensors", base_dim=96)
        size = args.latent * 8
        ours = run_case("ours", weights, args.latent, None, tmp / "ours.pt", args.threads)
        ref = run_case("diffusers", weights, args.latent, None, tmp / "ref.pt", args.threads)
        a, b = torch.load(tmp / "ours.pt"), torch.load(tmp / "ref.pt")
        print(f"decode {size}x{size}, base width 96, fp32, {args.threads} threads")
        print(_describe("ours", ours))
        print(_describe("diffusers", ref))
        print(f"  time ratio ours/diffusers          {ours['seconds'] / ref['seconds']:.3f} wall, "
              f"{ours['cpu_seconds'] / ref['cpu_seconds']:.3f} CPU  (goal <= 0.6)")
        print(f"  peak memory ratio ours/diffusers   {ours['total_mb'] / ref['total_mb']:.3f} total, "
              f"{ours['activations_mb'] / ref['activations_mb']:.3f} activations  (goal <= 0.5)")
        print(f"  relative error ours vs diffusers   {((a - b).norm() / b.norm()).item():.2e}")
        if args.tiled_latent:
            size = args.tiled_latent * 8
            tiled = run_case("ours", weights, args.tiled_latent, args.tile_size, tmp / "tiled.pt", args.threads)
            print(f"tiled decode {size}x{size}, tile_size {args.tile_size}")
            print(_describe("ours", tiled))


if __name__ == "__main__":
    main()
