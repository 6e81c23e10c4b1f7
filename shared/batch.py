"""Command-line generation: `--prompt`, `--prompts-file` and `--process` become a list of tasks that are
all validated before anything loads, then run one after the other on one loaded model."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from shared.cli_args import generation_overrides
from shared.images import IMAGE_FORMATS, read_image_settings
from shared.prompts_file import read_prompts_file
from shared.runtime import Runtime, StepInfo
from shared.settings import ModelRegistry, load_tasks_file, resolve_task

_IMAGE_SUFFIXES = set(IMAGE_FORMATS.values()) | {".jpeg"}


def _raw_tasks(args: argparse.Namespace, registry: ModelRegistry, model_type: str) -> list[tuple[str, Any]]:
    """(where, task) pairs; `where` names the task in messages."""
    if args.process:
        path = Path(args.process)
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            return [(str(path), read_image_settings(path))]
        tasks = load_tasks_file(path)
        return [(f"{path} task {i}" if len(tasks) > 1 else str(path), t) for i, t in enumerate(tasks, 1)]
    if args.prompts_file:
        base = registry.factory_settings(model_type) | generation_overrides(args)
        return [(f"{args.prompts_file} line {line.line_no}", line.task(base))
                for line in read_prompts_file(args.prompts_file)]
    return [("", {"prompt": args.prompt})]


def resolve_tasks(args: argparse.Namespace, registry: ModelRegistry, *, err: TextIO | None = None) -> list[dict[str, Any]]:
    """Every task of the command line, complete and validated (warnings go to `err`, default stderr)."""
    err = err or sys.stderr
    if not registry.model_types:
        raise ValueError("No model is available: defaults/ holds no definition a family handler supports.")
    model_type = args.model or registry.model_types[0]
    registry.entry(model_type)  # a clear error for an unknown --model before reading any file
    resolved = []
    for where, task in _raw_tasks(args, registry, model_type):
        settings, warnings = resolve_task(registry, task, defaults=generation_overrides(args),
                                          model_type=model_type, where=where)
        for warning in warnings:
            print(f"warning: {warning}", file=err)
        resolved.append(settings)
    return resolved


def _describe(settings: dict[str, Any]) -> str:
    seed = "random seed" if settings["seed"] == -1 else f"seed {settings['seed']}"
    prompt = settings["prompt"] if len(settings["prompt"]) <= 60 else settings["prompt"][:57] + "..."
    return (f"{settings['model_type']}, {settings['resolution']}, {settings['num_inference_steps']} steps, "
            f"CFG {settings['guidance_scale']:g}, {settings['sample_solver']}, {seed}, "
            f"batch {settings['batch_size']}: {prompt!r}")


def run_batch(args: argparse.Namespace, registry: ModelRegistry, runtime: Runtime, *,
              out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run (or with --dry-run, only check) every task; prints each saved file's path on `out` (stdout)."""
    out, err = out or sys.stdout, err or sys.stderr
    tasks = resolve_tasks(args, registry, err=err)
    if args.dry_run:
        for i, settings in enumerate(tasks, 1):
            print(f"task {i}/{len(tasks)} OK: {_describe(settings)}", file=out)
        return 0
    for i, settings in enumerate(tasks, 1):
        print(f"[{i}/{len(tasks)}] {_describe(settings)}", file=err)
        # stdout carries only the saved paths (scripts read them): messages from loading go to stderr
        with contextlib.redirect_stdout(err):
            runtime.load(settings["model_type"])  # before the bar, so loading messages stay readable
            with tqdm(total=settings["num_inference_steps"], unit="step", file=err, leave=False,
                      desc=f"[{i}/{len(tasks)}]") as bar:
                def advance(info: StepInfo) -> None:
                    bar.total = info.total
                    bar.update(info.step - bar.n)

                saved = runtime.generate(settings, on_step=advance)
        if saved is None:
            raise KeyboardInterrupt
        for image in saved:
            print(image.path, file=out)
    return 0
