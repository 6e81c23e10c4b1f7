"""The `wgp.py` command line (Wan2GP's flags where they exist, sd-scripts' for prompt files).

The generation flags come from the settings schema (shared/settings_schema.py); the run, folder,
performance and server flags are declared here. Building the parser imports neither torch nor gradio; only
`--help` loads the model families (not gradio), to list their models, samplers and schedulers.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.images import IMAGE_FORMATS
from shared.settings_schema import SETTINGS, Schema, add_cli_flags

ATTENTION_HELP = "auto (the best one installed), sdpa, flash, sage or sage2"  # checked by shared.attention
DTYPES = ("auto", "fp32", "bf16", "fp16")
PROFILES = (1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0)
DEFAULT_PORT = 7860
QUANTIZE_CHOICES = ("int8", "int8_convrot", "fp8")  # the family's `quant.QUANTIZE_CHOICES` (a test checks)


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


PORT_RANGE = "a port number from 1 to 65535"


def _parse_port(text: str) -> int | None:
    try:
        port = int(text)
    except ValueError:
        return None
    return port if 1 <= port <= 65535 else None


def _port(text: str) -> int:
    port = _parse_port(text)
    if port is None:
        raise argparse.ArgumentTypeError(f"must be {PORT_RANGE}, got {text!r}")
    return port


def prompt_file_options(schema: Schema = SETTINGS) -> str:
    """'--w --h --d --s --l --g --fs --n': the inline overrides a prompts file accepts."""
    return " ".join(f"--{o}" for s in schema for o in s.prompt_options)


def build_parser(app_dir: Path, schema: Schema = SETTINGS, offered: Mapping[str, Sequence[str]] | None = None
                 ) -> argparse.ArgumentParser:
    """`app_dir` holds the default folders (ckpts/, outputs/, loras/, settings/), wherever the app starts.
    `offered` lists what the models offer, for the help: "model_type" and setting keys -> values."""
    offered = offered or {}
    p = _Parser(
        prog="wgp.py",
        description="Anima text-to-image: a web UI (default) or command-line batch generation.",
        epilog="Exit codes: 0 success, 1 error (or some tasks of a batch failed), 130 interrupted (Ctrl-C, SIGTERM).",
    )
    runs = p.add_argument_group("what to run (default: the web UI)")
    mode = runs.add_mutually_exclusive_group()
    add_cli_flags(mode, [s for s in schema if s.key == "prompt"], offered)
    mode.add_argument("--prompts-file", metavar="FILE",
                      help=f"one prompt a line, '#' comments, inline {prompt_file_options(schema)} overrides")
    mode.add_argument("--process", metavar="FILE",
                      help="run a settings JSON (one task or a list), or re-make an image from its metadata")
    runs.add_argument("--dry-run", action="store_true",
                      help="with --process/--prompt/--prompts-file: check every task, generate nothing")

    gen = p.add_argument_group(
        "generation settings",
        "Defaults come from the model definition (defaults/<model>.json). For --process and --prompts-file "
        "these flags fill in what a task or line does not set.")
    model_types = offered.get("model_type")
    gen.add_argument("--model", metavar="MODEL_TYPE", help="model type (default: the first): " + (
        ", ".join(model_types) if model_types else "see --help"))
    add_cli_flags(gen, [s for s in schema if s.key != "prompt"], offered)
    gen.add_argument("--image-format", choices=tuple(IMAGE_FORMATS), default="png",
                     help="output format; every format carries the settings (default: png)")

    weights = p.add_argument_group("weights")
    weights.add_argument("--dit", metavar="PATH",
                         help="generate with this Anima DiT (a .safetensors or .gguf file, or a diffusers-format "
                              "folder) instead of the model's own; the model's other defaults apply (--model, "
                              "default: the base model). finetunes/*.json keeps one for good")
    weights.add_argument("--quantize", choices=QUANTIZE_CHOICES, metavar="{" + ",".join(QUANTIZE_CHOICES) + "}",
                         help="use such weights: a quantized file the model lists (downloaded instead of bf16), "
                              "else the bf16 DiT quantized while it loads (less memory, nearly the same images)")
    weights.add_argument("--save-quantized", metavar="FILE",
                         help="write the DiT, quantized (--quantize, default int8), to FILE (.safetensors, "
                              "ComfyUI's layout: loads in ComfyUI, Forge, and here with --dit); without a prompt, "
                              "only that")
    weights.add_argument("--accept-license", action="store_true",
                         help="accept the models' licence (shown before their weights are first downloaded; "
                              "remembered in the settings folder)")

    files = p.add_argument_group("folders (relative paths are taken from the current folder)")
    files.add_argument("--ckpts-dir", default=str(app_dir / "ckpts"), metavar="DIR",
                       help="weights folder; a file already there is used, missing ones are downloaded "
                            "(default: %(default)s)")
    files.add_argument("--output-dir", default=str(app_dir / "outputs"), metavar="DIR",
                       help="where images go (default: %(default)s)")
    files.add_argument("--lora-dir", metavar="DIR", help=f"LoRA folder (default: {app_dir / 'loras'}/<family>)")
    files.add_argument("--settings", default=str(app_dir / "settings"), metavar="DIR",
                       help="where the UI keeps last-used settings (default: %(default)s)")

    perf = p.add_argument_group("performance")
    perf.add_argument("--attention", default="auto", metavar="MODE", help=ATTENTION_HELP)
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
    perf.add_argument("--low-memory", action="store_true",
                      help="free the text encoder after each prompt is encoded (on the CPU; on a GPU mmgp "
                           "already moves it out)")

    server = p.add_argument_group("web UI")
    server.add_argument("--listen", action="store_true", help="serve on all interfaces (default 127.0.0.1 only)")
    server.add_argument("--server-port", type=_port, default=None, metavar="N",
                        help=f"port (default $SERVER_PORT or {DEFAULT_PORT})")
    server.add_argument("--open-browser", action="store_true", help="open the UI in the default browser")
    return p


def parse_args(argv: Sequence[str] | None, app_dir: Path,
               offered: Callable[[], Mapping[str, Sequence[str]]] | None = None) -> argparse.Namespace:
    """The parsed command line; `offered()` (what the models offer, see `build_parser`) is called for --help
    only."""
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") or "--help".startswith(a) and len(a) > 2 for a in argv)
    args = build_parser(app_dir, offered=offered() if offered and wants_help else None).parse_args(argv)
    if args.dry_run and not (args.process or args.prompt is not None or args.prompts_file):
        raise UsageError("--dry-run needs --process, --prompt or --prompts-file (see --help)")
    if args.save_quantized:
        _check_new_file(args.save_quantized, "--save-quantized")
    return args


def _check_new_file(path: str, flag: str) -> None:
    """A file the app will write: a .safetensors name, in an existing folder, not there yet (never overwritten)."""
    target = Path(path).expanduser()
    if target.suffix.lower() != ".safetensors":
        raise UsageError(f"{flag} {path}: the file name must end in .safetensors")
    if target.exists():
        raise UsageError(f"{flag} {path}: the file exists already (nothing is overwritten): choose another name")
    if not target.absolute().parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {target.absolute().parent} does not exist")


def server_port(args: argparse.Namespace) -> int:
    """--server-port, else $SERVER_PORT, else DEFAULT_PORT."""
    if args.server_port:
        return args.server_port
    text = os.environ.get("SERVER_PORT", "").strip()
    if not text:
        return DEFAULT_PORT
    port = _parse_port(text)
    if port is None:
        raise UsageError(f"The environment variable SERVER_PORT must be {PORT_RANGE}, got {text!r} "
                         "(or pass --server-port).")
    return port


def port_in_use_message(port: int) -> str:
    return f"Port {port} is in use (is AnimaGP already running?): choose another with --server-port N."


def check_port_free(port: int, listen: bool) -> None:
    """A UsageError when a server already listens on `port`, before anything slow has started."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections closing there do not count
        try:
            probe.bind(("0.0.0.0" if listen else "127.0.0.1", port))
        except OSError:
            raise UsageError(port_in_use_message(port)) from None


def generation_overrides(args: argparse.Namespace, schema: Schema = SETTINGS) -> dict[str, Any]:
    """Settings given by the generation flags (only those on the command line); not the prompt, which
    is a task of its own."""
    return {s.key: getattr(args, s.key) for s in schema
            if s.cli and s.key != "prompt" and getattr(args, s.key, None) is not None}
