"""AnimaGP: the web UI (default) or command-line batch generation for the registered model families.

    python wgp.py                                   # web UI on http://127.0.0.1:7860
    python wgp.py --prompt "1girl, smile" --seed 42 # one generation, then exit
    python wgp.py --prompts-file prompts.txt        # one prompt a line, inline --w --h --d --s --l --n
    python wgp.py --process settings.json           # Wan2GP settings: one task or a list (or an image)
    python wgp.py --quantize int8 --save-quantized anima-int8.safetensors   # write a quantized DiT, then exit

Exit codes: 0 success, 1 error (one line on stderr; or some tasks of a batch failed), 130 interrupted
(Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import importlib
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
DEFAULTS_DIR = APP_DIR / "defaults"
FINETUNES_DIR = APP_DIR / "finetunes"  # the user's own definitions, merged over defaults/ (Wan2GP's convention)

# Model families, as in Wan2GP: module paths whose `family_handler` class implements the handler contract.
family_handlers = ["models.anima.anima_handler"]


def parse_args(argv: Sequence[str] | None = None):
    from shared.cli_args import parse_args as parse

    return parse(argv, APP_DIR, offered=lambda: load_registry().offered())


def load_registry(handler_paths: Sequence[str] = tuple(family_handlers)):
    from shared.settings import ModelRegistry

    handlers = [importlib.import_module(path).family_handler for path in handler_paths]
    return ModelRegistry(handlers, [DEFAULTS_DIR], finetunes_dirs=[FINETUNES_DIR])


def make_runtime(args, registry):
    from shared.runtime import Runtime, RuntimeOptions

    options = RuntimeOptions(
        ckpts_dir=Path(args.ckpts_dir), output_dir=Path(args.output_dir),
        lora_dir=Path(args.lora_dir) if args.lora_dir else None, lora_root=APP_DIR / "loras", dtype=args.dtype,
        profile=args.profile, image_format=args.image_format, low_memory=args.low_memory,
        local_lora_paths=frozenset(args.activated_loras or ()), offload=not args.no_offload, compile=args.compile,
        quantize=args.quantize, save_quantized=Path(args.save_quantized) if args.save_quantized else None,
        settings_dir=Path(args.settings), accept_license=args.accept_license,
    )
    return Runtime(registry, options, log=lambda message: print(message, file=sys.stderr))


def _terminated(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so no half-written file stays behind


def _run(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    batch = bool(args.process or args.prompt is not None or args.prompts_file)
    if not batch:  # a bad or busy port is reported before anything heavy loads
        from shared.cli_args import check_port_free, server_port

        check_port_free(server_port(args), args.listen)
    from shared.attention import set_attention_mode

    set_attention_mode(args.attention)
    registry = load_registry()
    for warning in registry.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dit:
        registry.use_dit(args.model or registry.architecture_model_type() or registry.default_model_type, args.dit)
    runtime = make_runtime(args, registry)
    if batch or args.save_quantized:
        from shared.batch import run_batch, save_quantized

        return run_batch(args, registry, runtime) if batch else save_quantized(args, registry, runtime)
    from shared.ui import launch

    launch(args, registry, runtime)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as e:
        runtime = sys.modules.get("shared.runtime")  # only it adds error types (and importing it costs torch)
        USER_ERRORS = runtime.USER_ERRORS if runtime else (ValueError, OSError)  # noqa: N806
        if not isinstance(e, USER_ERRORS):  # a bug: keep the traceback for the report
            traceback.print_exc()
        print(f"error: {e}" if isinstance(e, USER_ERRORS) else f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
