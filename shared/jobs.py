"""The UI's generation queue: tasks run one at a time on a worker thread, in submission order.

Clicks while a task runs queue up; queued tasks can be removed; Abort stops the running one at its next
step. The UI polls `snapshot()` (a consistent copy) to draw progress, the preview, the queue and results.
"""

from __future__ import annotations

import itertools
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from shared.runtime import USER_ERRORS, Runtime, SavedImage, StepInfo
from shared.settings import Task

MAX_RESULTS = 200


@dataclass(frozen=True)
class Job:
    id: int
    settings: Task  # the validated task (read like a dict: settings["prompt"])
    status: str = "queued"  # queued | running | done | aborted | failed
    message: str = ""
    seed: int | None = None  # the seed used (first image), once done
    paths: tuple[str, ...] = ()  # the saved files, once done


@dataclass(frozen=True)
class Progress:
    job: Job
    phase: str  # "Loading model...", "Generating..."
    step: StepInfo | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything the UI draws, replaced as a whole on each change (so a read is always consistent)."""

    version: int = 0  # changes whenever anything below changes
    queue: tuple[Job, ...] = ()  # waiting, in run order
    progress: Progress | None = None  # the running job
    results: tuple[SavedImage, ...] = ()  # newest first
    last: Job | None = None  # the last finished job (its status says how it ended)
    preview: Image.Image | None = None  # the running job's latest latent preview
    queue_version: int = 0  # changes when `queue` does
    results_version: int = 0  # changes when `results` does


class JobQueue:
    """Owns the worker thread; `preview` turns a step's latents into an image (or None)."""

    def __init__(self, runtime: Runtime, preview: Callable[[str, Any], Image.Image | None] | None = None,
                 log: Callable[[str], None] = print):
        self.runtime, self._preview, self.log = runtime, preview, log
        self._ids = itertools.count(1)
        self._snap = Snapshot()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._preview_failed_job: int | None = None  # a job whose preview raised: no more previews for it

    def _update(self, **changes: Any) -> None:
        """Replace the snapshot (call with the lock held); wakes the worker."""
        s = self._snap
        self._snap = replace(s, version=s.version + 1, queue_version=s.queue_version + ("queue" in changes),
                             results_version=s.results_version + ("results" in changes), **changes)
        self._cond.notify_all()

    def snapshot(self) -> Snapshot:
        return self._snap

    def submit(self, task: Task) -> Job:
        job = Job(next(self._ids), task)
        with self._cond:
            self._update(queue=(*self._snap.queue, job))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="generation-queue", daemon=True)
                self._worker.start()
        return job

    def remove(self, job_id: int) -> bool:
        with self._cond:
            kept = tuple(j for j in self._snap.queue if j.id != job_id)
            if len(kept) == len(self._snap.queue):
                return False
            self._update(queue=kept)
        return True

    def clear(self) -> None:
        with self._cond:
            self._update(queue=())

    def abort(self) -> bool:
        """Stop the running job at its next step; False when nothing runs."""
        if self._snap.progress is None:
            return False
        self.runtime.abort()
        return True

    def stop(self, timeout: float) -> bool:
        """Empty the queue, abort the running job and wait up to `timeout` seconds for it to end; False when
        it is still running then (a long step)."""
        self.clear()
        self.abort()
        with self._cond:
            return self._cond.wait_for(lambda: self._snap.progress is None, timeout)

    # ------------------------------------------------------------------------------------- worker

    def _set_progress(self, job: Job, phase: str, step: StepInfo | None = None) -> None:
        preview = None
        wanted = self._preview is not None and self._preview_failed_job != job.id
        if step is not None and step.latent is not None and wanted:
            try:
                preview = self._preview(job.settings["model_type"], step.latent)
            except Exception:  # a preview is a nicety: it never stops the generation
                self._preview_failed_job = job.id
                self.log(f"Task #{job.id}: the live preview failed, the task goes on without it.\n"
                         f"{traceback.format_exc()}")
        with self._cond:
            self._update(progress=Progress(job, phase, step), preview=preview or self._snap.preview)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._snap.queue:
                    self._cond.wait()
                job = replace(self._snap.queue[0], status="running")
                self._update(queue=self._snap.queue[1:], progress=Progress(job, "Starting..."), preview=None)
            self._finish(*self._run(job))

    def _run(self, job: Job) -> tuple[Job, list[SavedImage]]:
        try:
            saved = self.runtime.generate(
                job.settings, on_step=lambda info: self._set_progress(job, "Generating...", info),
                on_status=lambda phase: self._set_progress(job, phase),
            )
        except Exception as e:  # shown in the UI; the queue keeps serving
            self.log(f"Task #{job.id} failed: {e}" if isinstance(e, USER_ERRORS) else traceback.format_exc())
            return replace(job, status="failed", message=str(e) or type(e).__name__), []
        if saved is None:
            return replace(job, status="aborted", message="Aborted."), []
        seeds = ", ".join(str(s.seed) for s in saved)
        summary = getattr(self.runtime, "last_summary", None)  # the step cache's, if it had one
        summary = f" · {summary}" if summary else ""
        return replace(job, status="done", message=f"seed {seeds}{summary}", seed=saved[0].seed,
                       paths=tuple(str(s.path) for s in saved)), saved

    def _finish(self, job: Job, saved: list[SavedImage]) -> None:
        with self._cond:
            changes: dict[str, Any] = {"progress": None, "last": job}
            if saved:
                changes["results"] = (*saved, *self._snap.results)[:MAX_RESULTS]
            self._update(**changes)
