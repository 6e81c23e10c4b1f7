"""The `wgp.py` command line (Wan2GP's flags where they exist, sd-scripts' for prompt files)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from shared.attention import ATTENTION_MODES, check_attention_mode
from shared.images import IMAGE_FORMATS

DTYPES = ("auto", "fp32", "bf16", "fp16")
PROFILES = (1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0)
DEFAULT_PORT = 7860

# CLI flag -> settings key, for the one-off generation flags (they also act as defaults for batches)
GENERATION_FLAGS = {
    "model": "model_type",
    "negative_prompt": "negative_prompt",
    "seed": "seed",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "shift": "flow_shift",
    "resolution": "resolution",
    "batch_size": "batch_size",
    "sampler": "sample_solver",
}


class UsageError(ValueError):
    """A command-line mistake; `main` prints it on one line and exits with 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block and exit 2
        raise UsageError(f"{message} (see --help)")


def _profile(text: str) -> float:
    value = float(text)
    if value != -1 and value not in PROFILES:
        raise argparse.ArgumentTypeError(f"choose -1 (automatic) or one of {', '.join(f'{p:g}' for p in PROFILES)}")
    return value


def _attention(text: str) -> str:
    try:
        return check_attention_mode(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="wgp.py",
        description="Anima text-to-image: a web UI (default) or command-line batch generation.",
        epilog="Exit codes: 0 success, 1 error, 130 interrupted (Ctrl-C).",
    )
    mode = p.add_argument_group("what to run (default: the web UI)").add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="generate images for this prompt, then exit")
    mode.add_argument("--prompts-file", metavar="FILE",
                      help="one prompt a line, '#' comments, inline --w --h --d --s --l --n overrides")
    mode.add_argument("--process", metavar="FILE",
                      help="run a settings JSON (one task or a list), or re-make an image from its metadata")
    p.add_argument("--dry-run", action="store_true", help="with --process/--prompt/--prompts-file: only validate")

    gen = p.add_argument_group(
        "generation settings",
        "Defaults come from the model definition (defaults/<model>.json). For --process and --prompts-file "
        "these flags fill in what a task or line does not set.")
    gen.add_argument("--model", metavar="MODEL_TYPE", help="model type, e.g. anima_preview (default: the first)")
    gen.add_argument("--negative-prompt", metavar="TEXT")
    gen.add_argument("--seed", type=int, metavar="N", help="-1 for a random seed; image i of a batch uses N+i")
    gen.add_argument("--steps", type=int, metavar="N", help="sampling steps")
    gen.add_argument("--guidance", type=float, metavar="CFG", help="CFG scale")
    gen.add_argument("--shift", type=float, metavar="S", help="flow shift of the sigma schedule")
    gen.add_argument("--resolution", metavar="WxH", help="multiples of 16, e.g. 832x1216")
    gen.add_argument("--batch-size", type=int, metavar="N", help="images per prompt")
    gen.add_argument("--sampler", metavar="NAME", help="e.g. er_sde, euler, euler_a, dpmpp_2m_sde")
    gen.add_argument("--image-format", choices=tuple(IMAGE_FORMATS), default="png",
                     help="output format; every format carries the settings (default: png)")

    files = p.add_argument_group("folders")
    files.add_argument("--ckpts-dir", default="ckpts", metavar="DIR",
                       help="weights folder; a file already there is used, missing ones are downloaded")
    files.add_argument("--output-dir", default="outputs", metavar="DIR", help="where images go (default: outputs)")
    files.add_argument("--lora-dir", metavar="DIR", help="LoRA folder (default: loras/<family>)")
    files.add_argument("--settings", default="settings", metavar="DIR", help="where the UI keeps last-used settings")

    perf = p.add_argument_group("performance")
    perf.add_argument("--attention", type=_attention, default="auto", metavar="MODE",
                      help=f"one of {', '.join(ATTENTION_MODES)}")
    perf.add_argument("--profile", type=_profile, default=-1.0, metavar="N",
                      help="mmgp offload profile on a GPU (1 = most VRAM and RAM ... 5 = least; 3.5 and 4.5 "
                           "too); -1: chosen from the free VRAM and RAM when the model loads (the log says which)")
    perf.add_argument("--no-offload", action="store_true",
                      help="on a GPU, place every model on it without mmgp (big cards, benchmarks)")
    perf.add_argument("--compile", action="store_true",
                      help="on a GPU, torch.compile the transformer's blocks (slow first image, faster after)")
    perf.add_argument("--dtype", choices=DTYPES, default="auto",
                      help="model dtype; auto: the model's policy (fp32 on the CPU, bf16 on a GPU that has it, "
                           "else fp16)")

    server = p.add_argument_group("web UI")
    server.add_argument("--listen", action="store_true", help="serve on all interfaces (default 127.0.0.1 only)")
    server.add_argument("--server-port", type=int, default=0, metavar="N",
                        help=f"port (default $SERVER_PORT or {DEFAULT_PORT})")
    server.add_argument("--open-browser", action="store_true", help="open the UI in the default browser")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.dry_run and not (args.process or args.prompt is not None or args.prompts_file):
        raise UsageError("--dry-run needs --process, --prompt or --prompts-file (see --help)")
    return args


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given by the one-off generation flags (only those on the command line)."""
    return {key: getattr(args, flag) for flag, key in GENERATION_FLAGS.items() if getattr(args, flag) is not None}
