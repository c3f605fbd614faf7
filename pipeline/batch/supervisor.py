"""The local engine's supervisor: feeds slides to one :class:`~pipeline.batch.worker.WorkerProcess`,
enforces the per-slide time limit and replaces the worker when it is stuck or dead.

* A slide that passes ``--slide-timeout`` seconds (its own stages; waiting for the model while
  the previous slide runs does not count) is abandoned: the worker is killed, a fresh one writes
  the slide's ``failed`` result ("timed out after N s at <stage>") and takes the remaining slides.
  Slides that were in flight beside it are redone, not blamed.
* A worker that dies (a decoder crash, out of memory) takes up to three slides in flight with it;
  each of them is retried alone on a fresh worker, and a slide in flight at
  :data:`MAX_ATTEMPTS` deaths fails with the way the worker ended.
* The output folder failing (full disk, read-only, deleted: the worker's
  :class:`~pipeline.core.io.OutputWriteError`, or the run's lock file gone from the folder) stops
  the batch with one line: what could not be written, how many slides were finished and kept, and
  that a re-run finishes the rest.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.batch.discovery import SlideJob
from pipeline.batch.options import BatchOptions, RunFacts
from pipeline.batch.stages import timeout_message
from pipeline.batch.state import batch_stopped, check_output_folder
from pipeline.batch.worker import WorkerGone, WorkerProcess
from pipeline.core.io import OutputWriteError

log = logging.getLogger(__name__)

#: Worker deaths a slide may be in flight for (the first one included) before it fails.
MAX_ATTEMPTS = 2
#: Worker deaths in a row with no slide finished before the run stops.
MAX_FRUITLESS_DEATHS = 3


class Supervisor:
    """Runs ``todo`` through worker processes; ``facts``, ``n_tiles`` and ``restarts`` for run.json."""

    def __init__(self, opts: BatchOptions, jobs: list[SlideJob], bar: Any = None) -> None:
        self.opts, self.jobs, self.bar = opts, jobs, bar
        self.facts: RunFacts | None = None
        self.n_tiles = 0
        self.restarts: list[dict[str, Any]] = []
        self._worker: WorkerProcess | None = None
        self._finished: set[str] = set()

    def _ensure_worker(self) -> WorkerProcess:
        if self._worker is None:
            self._worker = WorkerProcess(self.opts, self.jobs)
            self.facts = self.facts or self._worker.facts
        return self._worker

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None

    def _on_result(self, slide_id: str, n_tiles: int, description: str) -> None:
        self._finished.add(slide_id)
        self.n_tiles += n_tiles
        log.info("%s: %s", slide_id, description)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(slide_id[:30])
        check_output_folder(self.opts.out_dir)

    def run(self, todo: list[SlideJob]) -> None:
        """Process ``todo`` (every slide ends with a result.json); worker processes are gone on return.

        Raises :class:`OutputWriteError` (one line) when the output folder fails mid-run.
        """
        try:
            try:
                self._run(todo)
            except OutputWriteError as exc:
                raise batch_stopped(exc, len(self._finished), len(todo)) from None
            if self._worker is not None:
                self._worker.stop()
                self._worker = None
        finally:
            self._drop_worker()

    def _run(self, todo: list[SlideJob]) -> None:
        limit = float(self.opts.slide_timeout or 0)
        queue = list(todo)
        suspects: list[SlideJob] = []  # in flight when a worker died: retried one at a time
        failures: list[tuple[SlideJob, str]] = []  # to be recorded by a fresh worker
        attempts: dict[str, int] = {}
        fruitless = 0
        self._ensure_worker()
        while queue or suspects or failures:
            worker = self._ensure_worker()
            while failures:
                job, reason = failures.pop(0)
                worker.record_failure(job, reason)
                self._on_result(job.slide_id, 0, f"failed: {reason}")
            if not (queue or suspects):
                break
            solo = bool(suspects)
            batch = suspects[:1] if solo else list(queue)
            n_before = len(self._finished)
            end = worker.run(batch, overlap=not solo, limit_s=limit, on_result=self._on_result)
            queue = [j for j in queue if j.slide_id not in self._finished]
            suspects = [j for j in suspects if j.slide_id not in self._finished]
            if end.kind == "done":
                continue
            if end.kind == "write_error":
                assert end.error is not None
                raise end.error
            pid = worker.pid
            self._drop_worker()
            by_id = {j.slide_id: j for j in batch}
            if end.kind == "timeout":
                assert end.slide is not None
                job = end.slide
                reason = f"{job.path}: {timeout_message(limit, end.stage)}"
                log.warning("%s: %s", job.slide_id, reason)
                self.restarts.append(
                    {"slide_id": job.slide_id, "why": "timeout", "stage": end.stage, "worker_pid": pid}
                )
                queue = [j for j in queue if j.slide_id != job.slide_id]
                suspects = [j for j in suspects if j.slide_id != job.slide_id]
                failures.append((job, reason))
                fruitless = 0
                continue
            # the worker died: every slide in flight is a suspect
            self.restarts.append(
                {"slide_id": None, "why": "died", "detail": end.detail, "in_flight": end.in_flight, "worker_pid": pid}
            )
            log.warning("%s; in flight: %s", end.detail, ", ".join(end.in_flight) or "none")
            fruitless = 0 if len(self._finished) > n_before or end.in_flight else fruitless + 1
            if fruitless >= MAX_FRUITLESS_DEATHS:
                raise WorkerGone(f"the slide worker keeps dying ({end.detail}); finished slides are kept")
            for sid in end.in_flight:
                job = by_id[sid]
                attempts[sid] = attempts.get(sid, 0) + 1
                queue = [j for j in queue if j.slide_id != sid]
                suspects = [j for j in suspects if j.slide_id != sid]
                if attempts[sid] >= MAX_ATTEMPTS:
                    failures.append(
                        (
                            job,
                            f"{job.path}: the worker process died while processing this slide, "
                            f"{attempts[sid]} times ({end.detail}); the file is probably damaged",
                        )
                    )
                else:
                    suspects.append(job)
