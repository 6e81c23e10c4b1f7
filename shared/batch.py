"""Command-line generation: `--prompt`, `--prompts-file` and `--process` become a list of tasks that are
all checked (settings, LoRA files, output folder, weights) before anything is generated; then the good
ones run one after the other on one loaded model. A task that fails is reported and the others still run;
the exit code is 1 when any task failed."""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from shared.cli_args import generation_overrides
from shared.files import check_ckpts_dir
from shared.images import IMAGE_FORMATS, check_output_dir, read_image_settings
from shared.licenses import LicenseNotAccepted
from shared.prompts_file import read_prompts_file
from shared.runtime import USER_ERRORS, Runtime, SavedImage, StepInfo
from shared.settings import ModelRegistry, SettingsError, Task, load_tasks_file, resolve_task

_IMAGE_SUFFIXES = set(IMAGE_FORMATS.values()) | {".jpeg"}


@dataclass(frozen=True)
class _Checked:
    where: str  # names the task in messages ("" for --prompt)
    number: int  # 1-based position in the batch
    task: Task | None = None
    error: str | None = None  # why it cannot run


def _raw_tasks(args: argparse.Namespace, registry: ModelRegistry, model_type: str,
               err: TextIO) -> list[tuple[str, Any]]:
    """(where, task) pairs; `where` names the task in messages."""
    if args.process:
        path = Path(args.process)
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            settings, warnings = read_image_settings(path, registry.schema)
            for warning in warnings:
                print(f"warning: {path}: {warning}", file=err)
            return [(str(path), settings)]
        tasks = load_tasks_file(path)
        return [(f"{path} task {i}" if len(tasks) > 1 else str(path), t) for i, t in enumerate(tasks, 1)]
    if args.prompts_file:
        base = registry.factory_settings(model_type) | generation_overrides(args, registry.schema)
        return [(f"{args.prompts_file} line {line.line_no}", line.task(base))
                for line in read_prompts_file(args.prompts_file, registry.schema)]
    return [("", {"prompt": args.prompt})]


def check_tasks(args: argparse.Namespace, registry: ModelRegistry, runtime: Runtime, *,
                err: TextIO | None = None) -> list[_Checked]:
    """Every task of the command line, validated and checked for what it needs (warnings go to `err`)."""
    err = err or sys.stderr
    if not registry.model_types:
        raise ValueError("No model is available: defaults/ holds no definition a family handler supports.")
    model_type = args.model or registry.default_model_type
    registry.entry(model_type)  # a clear error for an unknown --model before reading any file
    checked = []
    for number, (where, raw) in enumerate(_raw_tasks(args, registry, model_type, err), 1):
        try:
            task, warnings = resolve_task(registry, raw, defaults=generation_overrides(args, registry.schema),
                                          model_type=model_type, where=where)
            for warning in warnings:
                print(f"warning: {warning}", file=err)
            runtime.loras(task)
            for notice in runtime.image_inputs(task).notices:
                print(f"note: {where + ': ' if where else ''}{notice}", file=err)
        except (SettingsError, ValueError) as e:
            message = str(e) if not where or str(e).startswith(where) else f"{where}: {e}"
            checked.append(_Checked(where, number, error=message))
            continue
        checked.append(_Checked(where, number, task))
    return checked


def _describe(task: Task) -> str:
    seed = "random seed" if task["seed"] == -1 else f"seed {task['seed']}"
    prompt = task["prompt"] if len(task["prompt"]) <= 60 else task["prompt"][:57] + "..."
    return (f"{task.model_type}, {task['resolution']}, {task['num_inference_steps']} steps, "
            f"CFG {task['guidance_scale']:g}, {task['sample_solver']}, {seed}, "
            f"batch {task['batch_size']}: {prompt!r}")


def _name(item: _Checked, total: int) -> str:
    return item.where or (f"task {item.number}" if total > 1 else "the task")


def run_batch(args: argparse.Namespace, registry: ModelRegistry, runtime: Runtime, *,
              out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run (or with --dry-run, only check) every task; prints each saved file's path on `out` (stdout) as
    soon as it is written. Returns the exit code: 0 when every task succeeded, else 1."""
    out, err = out or sys.stdout, err or sys.stderr
    checked = check_tasks(args, registry, runtime, err=err)
    check_output_dir(runtime.options.output_dir)
    check_ckpts_dir(runtime.options.ckpts_dir)
    failed = [item for item in checked if item.error]
    for item in failed:
        print(f"error: {item.error}", file=err)
    good = [item for item in checked if item.task is not None]
    total = len(checked)
    if args.dry_run:
        for item in good:
            print(f"task {item.number}/{total} OK: {_describe(item.task)}", file=out)
        for model_type in dict.fromkeys(item.task.model_type for item in good):
            missing = runtime.missing_files(model_type)
            if missing:
                names = ", ".join(Path(m).name for m in missing)
                print(f"note: {model_type} will first download {names} into {runtime.options.ckpts_dir}", file=out)
            license = runtime.license_to_accept(model_type)
            if license is not None:
                print(f"note: its licence ({license.name}) will be shown and must be accepted first "
                      "(or pass --accept-license)", file=out)
        return _summary(failed, total, err, ran=False)
    with contextlib.redirect_stdout(err):  # stdout carries only the saved paths (scripts read them)
        for model_type in dict.fromkeys(item.task.model_type for item in good):
            fetch_with_license(runtime, model_type, err)  # every missing weight file at once, before the first step
    for item in good:
        try:
            _run_one(item, total, runtime, out, err)
        except USER_ERRORS as e:
            print(f"error: {_name(item, total)}: {e}" if total > 1 else f"error: {e}", file=err)
            failed.append(item)
    return _summary(failed, total, err)


def fetch_with_license(runtime: Runtime, model_type: str, err: TextIO) -> None:
    """`runtime.model_files`, showing the model's licence first when its weights are to be downloaded and it
    was not accepted yet: on a terminal the user is asked, elsewhere the run stops (LicenseNotAccepted) until
    it is accepted with --accept-license."""
    try:
        runtime.model_files(model_type)
        return
    except LicenseNotAccepted as e:
        print(e.license.text(), file=err)
        if not sys.stdin.isatty():
            raise
        answer = input("Do you accept this licence? Type yes to download the weights: ")
        if answer.strip().lower() not in ("y", "yes"):
            raise
        runtime.accept_license(e.license)
    runtime.model_files(model_type)


def save_quantized(args: argparse.Namespace, registry: ModelRegistry, runtime: Runtime, *,
                   err: TextIO | None = None) -> int:
    """--save-quantized without a prompt: load the model's DiT quantized, write it, exit."""
    err = err or sys.stderr
    model_type = args.model or registry.default_model_type
    registry.entry(model_type)
    with contextlib.redirect_stdout(err):
        fetch_with_license(runtime, model_type, err)
        runtime.load(model_type)
    return 0


def _summary(failed: list[_Checked], total: int, err: TextIO, ran: bool = True) -> int:
    if failed and total > 1:
        names = ", ".join(_name(item, total) for item in sorted(failed, key=lambda i: i.number))
        others = "; the others ran" if ran and len(failed) < total else ""
        print(f"error: {len(failed)} of {total} tasks failed ({names}){others}.", file=err)
    return 1 if failed else 0


class _AboveTheBar:
    """A text stream whose lines go above a progress bar (tqdm.write) instead of through it."""

    def __init__(self, bar: tqdm, err: TextIO):
        self.bar, self.err, self.pending = bar, err, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.bar.write(line, file=self.err)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.bar.write(self.pending, file=self.err)
            self.pending = ""


@contextlib.contextmanager
def _lines_above(bar: tqdm, runtime: Runtime, err: TextIO):
    """While the bar is shown, printed text and the runtime's messages (a hires warning, the step cache's
    summary) go above it, each on its own line."""
    stream, log = _AboveTheBar(bar, err), runtime.log
    runtime.log = lambda message: print(message, file=stream)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.flush()
        runtime.log = log


def _run_one(item: _Checked, total: int, runtime: Runtime, out: TextIO, err: TextIO) -> None:
    task = item.task
    print(f"[{item.number}/{total}] {_describe(task)}", file=err)

    def saved(image: SavedImage) -> None:
        print(image.path, file=out, flush=True)

    with contextlib.redirect_stdout(err):
        runtime.load(task.model_type)  # before the bar, so loading messages stay readable
        # mininterval=0: a step takes long enough that every one may redraw the bar, and its report shows
        with tqdm(total=task["num_inference_steps"], unit="step", file=err, leave=False, mininterval=0,
                  desc=f"[{item.number}/{total}]") as bar, _lines_above(bar, runtime, err):
            def advance(info: StepInfo) -> None:
                bar.total = info.total
                if info.detail:
                    bar.set_postfix_str(info.detail, refresh=False)
                bar.update(info.step - bar.n)

            images = runtime.generate(task, on_step=advance, on_saved=saved)
    if images is None:
        raise KeyboardInterrupt
