"""AnimaGP: the web UI (default) or command-line batch generation for the registered model families.

    python wgp.py                                   # web UI on http://127.0.0.1:7860
    python wgp.py --prompt "1girl, smile" --seed 42 # one generation, then exit
    python wgp.py --prompts-file prompts.txt        # one prompt a line, inline --w --h --d --s --l --n
    python wgp.py --process settings.json           # Wan2GP settings: one task or a list (or an image)

Exit codes: 0 success, 1 error (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
DEFAULTS_DIR = APP_DIR / "defaults"

# Model families, as in Wan2GP: module paths whose `family_handler` class implements the handler contract.
family_handlers = ["models.anima.anima_handler"]


def parse_args(argv: Sequence[str] | None = None):
    from shared.cli_args import parse_args as parse

    return parse(argv)


def load_registry(handler_paths: Sequence[str] = tuple(family_handlers)):
    from shared.settings import ModelRegistry

    handlers = [importlib.import_module(path).family_handler for path in handler_paths]
    return ModelRegistry(handlers, [DEFAULTS_DIR])


def make_runtime(args, registry):
    from shared.runtime import Runtime, RuntimeOptions

    options = RuntimeOptions(
        ckpts_dir=Path(args.ckpts_dir), output_dir=Path(args.output_dir),
        lora_dir=Path(args.lora_dir) if args.lora_dir else None, dtype=args.dtype, profile=args.profile,
        image_format=args.image_format, offload=not args.no_offload, compile=args.compile,
    )
    return Runtime(registry, options, log=lambda message: print(message, file=sys.stderr))


def _run(argv: Sequence[str] | None) -> int:
    from shared.attention import set_attention_mode

    args = parse_args(argv)
    set_attention_mode(args.attention)
    registry = load_registry()
    runtime = make_runtime(args, registry)
    if args.process or args.prompt is not None or args.prompts_file:
        from shared.batch import run_batch

        return run_batch(args, registry, runtime)
    from shared.ui import launch

    launch(args, registry, runtime)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as e:
        from shared.runtime import USER_ERRORS

        if not isinstance(e, USER_ERRORS):  # a bug: keep the traceback for the report
            traceback.print_exc()
        print(f"error: {e}" if isinstance(e, USER_ERRORS) else f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
