"""Forward time of our Anima DiT vs diffusers' CosmosTransformer3DModel, same weights, same run.

Full width (2048 channels, 16 heads, 1024-wide context of 512 tokens), a few blocks, a 1024x1024 image
(latent 128x128 -> 4096 tokens), fp32 on CPU. Prints each model's best wall time and best CPU time (the
process' CPU seconds: the fairer measure when other jobs share the cores), the ratios ours/diffusers
(goal <= 1.0), and the achieved GFLOP/s next to a plain fp32 matmul's on this machine (the model is
matmul-bound, so that is the ceiling).

    python bench/transformer.py [--blocks 2] [--latent 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.anima.anima_model import load_anima_model  # noqa: E402
from tests.reference import cosmos_transformer_class  # noqa: E402
from tests.tiny_dit import make_dit_state_dict  # noqa: E402

WIDTH, HEADS, TEXT_DIM, LORA_DIM, MLP_RATIO, CONTEXT_TOKENS = 2048, 16, 1024, 256, 4, 512


def forward_flops(blocks: int, tokens: int) -> float:
    """Multiply-adds x 2 of the matmuls and attention products (elementwise work is negligible)."""
    d, n, m = WIDTH, CONTEXT_TOKENS, MLP_RATIO * WIDTH
    per_block = (
        4 * 2 * tokens * d * d  # self-attention q, k, v, output projections
        + 2 * 2 * tokens * tokens * d  # self-attention scores and weighted sum
        + 2 * 2 * tokens * d * d + 2 * 2 * n * TEXT_DIM * d  # cross-attention q/out and k/v projections
        + 2 * 2 * tokens * n * d  # cross-attention scores and weighted sum
        + 2 * 2 * tokens * d * m  # MLP
    )
    return blocks * per_block + 2 * tokens * d * (68 + 64)  # plus patch embed and final projection


def timed(fn) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, CPU seconds of all this process' threads, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def matmul_gflops(tokens: int) -> tuple[float, float]:
    """A plain fp32 matmul of the projections' shape: (GFLOP per wall second, per CPU second)."""
    x, w = torch.randn(tokens, WIDTH), torch.randn(WIDTH, WIDTH)
    runs = [timed(lambda: F.linear(x, w))[:2] for _ in range(8)]
    flops = 2 * tokens * WIDTH * WIDTH
    return flops / min(w for w, _ in runs) / 1e9, flops / min(c for _, c in runs) / 1e9


def build_models(blocks: int):
    sd = make_dit_state_dict(dtype=torch.float32, model_channels=WIDTH, num_blocks=blocks, num_heads=HEADS,
                             text_dim=TEXT_DIM, adapter_layers=1, adapter_heads=HEADS, adaln_lora_dim=LORA_DIM)
    ours = load_anima_model(sd, dtype=torch.float32)

    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    dit_sd = {k: v for k, v in sd.items() if not k.startswith("net.llm_adapter.")}
    with torch.device("meta"):
        ref = cosmos_transformer_class()(
            in_channels=16, out_channels=16, num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS,
            num_layers=blocks, mlp_ratio=float(MLP_RATIO), text_embed_dim=TEXT_DIM, adaln_lora_dim=LORA_DIM,
            max_size=(128, 240, 240), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True,
            extra_pos_embed_type=None,
        )
    # assign=True shares the very tensors our model holds: both read the same weights, RAM counted once
    ref.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(dit_sd), strict=True, assign=True)
    return ours, ref.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--latent", type=int, default=128, help="latent side (image side / 8)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    tokens = (args.latent // 2) ** 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.blocks} blocks x {WIDTH} wide, "
          f"{tokens} image tokens, {CONTEXT_TOKENS} context tokens, fp32")
    ours, ref = build_models(args.blocks)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, args.latent, args.latent, generator=g)
    sigma = torch.tensor([0.75])
    context = torch.randn(1, CONTEXT_TOKENS, TEXT_DIM, generator=g)
    padding_mask = torch.zeros(1, 1, args.latent, args.latent)

    def run_ours():
        return ours(x, sigma, context)

    def run_ref():
        return ref(x, sigma, context, padding_mask=padding_mask, return_dict=False)[0]

    runs = {"ours": (run_ours, []), "diffusers": (run_ref, [])}
    outputs = {}
    with torch.no_grad():
        for i in range(args.repeats):  # interleaved, alternating order, so machine-load drift hits both alike
            for name in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                fn, times = runs[name]
                wall, cpu, out = timed(fn)
                times.append((wall, cpu))
                outputs[name] = out
    agreement = ((outputs["ours"] - outputs["diffusers"]).abs().max() / outputs["diffusers"].abs().max()).item()
    flops = forward_flops(args.blocks, tokens)
    print(f"outputs agree to {agreement:.1e} (max |ours - diffusers| / max |diffusers|)")
    best = {}
    for name, (_, times) in runs.items():
        best[name] = min(w for w, _ in times), min(c for _, c in times)
        wall, cpu = best[name]
        rounded = [(round(w, 1), round(c, 1)) for w, c in times]
        print(f"{name:9s} best wall {wall:6.2f} s ({flops / wall / 1e9:6.1f} GFLOP/s), best CPU {cpu:6.2f} s "
              f"({flops / cpu / 1e9:6.1f} GFLOP/CPU-s)   runs (wall, CPU): {rounded}")
    print(f"ratio ours / diffusers: wall {best['ours'][0] / best['diffusers'][0]:.3f}, "
          f"CPU time {best['ours'][1] / best['diffusers'][1]:.3f} (CPU time is the fairer one on a loaded machine)")
    per_wall, per_cpu = matmul_gflops(tokens)
    print(f"plain fp32 matmul [{tokens}x{WIDTH}] @ [{WIDTH}x{WIDTH}]: {per_wall:.1f} GFLOP/s, "
          f"{per_cpu:.1f} GFLOP/CPU-s")


if __name__ == "__main__":
    main()
