"""The local engine's worker process: loads the model once and runs slides, telling the parent
(:mod:`pipeline.batch.runner`) each slide's stage, so the parent can enforce the per-slide time
limit and replace a worker that is stuck (a read that never returns) or died (a decoder crash).

Parent side: :class:`WorkerProcess` (start, run a round of slides, record a failure, stop, kill).
Child side: :func:`worker_main`. They talk over one :func:`multiprocessing.Pipe`; every message is
a tuple whose first item names it:

* child → parent: ``("ready", RunFacts)``, ``("error", exception)`` (the context could not be
  built: bad bundle, bad clinical file; raised again in the parent), ``("stage", slide_id, stage)``,
  ``("result", slide_id, n_tiles, description)``, ``("round",)``, ``("recorded", slide_id)``,
  ``("write_error", OutputWriteError)`` (the output folder cannot be written: the round ends);
* parent → child: ``("run", jobs, overlap)``, ``("fail", job, reason)``, ``("stop",)``.

The child dies with the parent (``PR_SET_PDEATHSIG``), so ``kill -9`` of ``infer.py`` leaves
nothing running that could write into the output folder behind the next run's back.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from pipeline.batch.discovery import SlideJob
from pipeline.batch.options import BatchOptions, RunFacts
from pipeline.batch.stages import DONE, SlideClock
from pipeline.core.errors import PipelineError
from pipeline.core.io import OutputWriteError

log = logging.getLogger(__name__)

#: Seconds a fresh worker may take to import, load the model and say it is ready.
WORKER_START_TIMEOUT_S = 600.0
#: Seconds between checks of the slides' clocks while no message arrives.
POLL_S = 0.5


class WorkerGone(PipelineError):
    """The worker process ended (crash, kill, out of memory) outside a slide's time limit."""


# ----------------------------------------------------------------------------- child side


class PipeTracker:
    """:class:`~pipeline.batch.stages.StageTracker` sending each stage to the parent (thread-safe)."""

    def __init__(self, conn: Connection, lock: threading.Lock) -> None:
        self.conn, self.lock = conn, lock

    def enter(self, slide_id: str, stage: str) -> None:
        with self.lock:
            self.conn.send(("stage", slide_id, stage))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - send its words instead
        return PipelineError(" ".join(f"{type(exc).__name__}: {exc}".split()))


def worker_main(conn: Connection, opts: BatchOptions, jobs: list[SlideJob], parent_pid: int) -> None:
    """Child process body: build the context, then serve ``run``/``fail`` requests until ``stop``."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    from pipeline.batch.context import build_context
    from pipeline.batch.process import failed_result, process_slides
    from pipeline.core.cli import setup_logging

    setup_logging(quiet=opts.quiet)
    lock = threading.Lock()

    def send(*msg: Any) -> None:
        with lock:
            conn.send(msg)

    try:
        ctx = build_context(opts, jobs)
    except BaseException as exc:  # noqa: BLE001 - the parent raises it again, as if built there
        send("error", _picklable(exc))
        return
    ctx.tracker = PipeTracker(conn, lock)
    send("ready", RunFacts.of(ctx))
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg[0] == "run":
                try:
                    for r in process_slides(msg[1], ctx, overlap=msg[2]):
                        send("result", r.slide_id, r.n_tiles, r.describe())
                except OutputWriteError as exc:
                    send("write_error", exc)
                    continue
                send("round")
            elif msg[0] == "fail":
                job, reason = msg[1], msg[2]
                try:
                    failed_result(job, ctx, reason)
                except OutputWriteError as exc:
                    send("write_error", exc)
                    continue
                send("recorded", job.slide_id)
            else:
                return
    finally:
        ctx.stages.close()


# ----------------------------------------------------------------------------- parent side


@dataclass
class RoundEnd:
    """How a round of slides ended: ``done`` (every slide written), ``timeout`` (``slide`` passed the
    limit at ``stage``), ``died`` (the worker ended: ``detail`` says how) or ``write_error`` (the
    output folder cannot be written: ``error``). ``in_flight``: slides started but not finished."""

    kind: str
    slide: SlideJob | None = None
    stage: str = ""
    detail: str = ""
    in_flight: list[str] = field(default_factory=list)
    error: OutputWriteError | None = None


def _exit_words(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {
            "SIGKILL": " (killed: out of memory?)",
            "SIGSEGV": " (crashed in native code)",
            "SIGABRT": " (aborted in native code)",
        }
        return f"killed by {name}{hint.get(name, '')}"
    return f"exit code {code}"


class WorkerProcess:
    """One worker process seen from the parent."""

    def __init__(self, opts: BatchOptions, jobs: list[SlideJob]) -> None:
        ctx = mp.get_context("spawn")  # never fork a process holding torch threads
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=worker_main, args=(child, opts, jobs, os.getpid()), name="nme-slide-worker", daemon=False
        )
        t = time.perf_counter()
        self.proc.start()
        child.close()
        self.facts = self._wait_ready()
        log.debug("slide worker pid %s ready in %.1f s", self.proc.pid, time.perf_counter() - t)

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def _recv(self, timeout: float) -> tuple | None:
        """The next message, None when none came within ``timeout`` s; raises WorkerGone when the pipe closed."""
        try:
            if not self.conn.poll(timeout):
                return None
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise WorkerGone(f"worker process {self.proc.pid} {_exit_words(self.proc.exitcode)}") from None

    def _wait_ready(self) -> RunFacts:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                msg = self._recv(min(POLL_S, deadline - time.monotonic()))
                if msg is None:
                    if not self.proc.is_alive():
                        raise WorkerGone(
                            f"worker process {self.proc.pid} {_exit_words(self.proc.exitcode)} while loading the model"
                        )
                    continue
                if msg[0] == "ready":
                    return msg[1]
                if msg[0] == "error":
                    raise msg[1]
            raise WorkerGone(f"worker process did not load the model within {WORKER_START_TIMEOUT_S:g} s")
        except BaseException:
            self.kill()
            raise

    def run(
        self, jobs: list[SlideJob], overlap: bool, limit_s: float, on_result: Callable[[str, int, str], None]
    ) -> RoundEnd:
        """Process ``jobs``; ``on_result(slide_id, n_tiles, description)`` as each is written.

        Returns when the round is done, a slide passes ``limit_s`` seconds (0: no limit; the
        worker is then still running: :meth:`kill` it) or the worker ends.
        """
        by_id = {j.slide_id: j for j in jobs}
        clocks: dict[str, SlideClock] = {}
        self.conn.send(("run", jobs, overlap))
        while True:
            now = time.monotonic()
            if limit_s > 0:
                for sid, clock in clocks.items():
                    if clock.elapsed(now) > limit_s:
                        return RoundEnd("timeout", by_id[sid], clock.stage, in_flight=list(clocks))
            try:
                msg = self._recv(POLL_S)
            except WorkerGone as exc:
                return RoundEnd("died", detail=str(exc), in_flight=list(clocks))
            if msg is None:
                if not self.proc.is_alive():
                    self.proc.join(1)
                    detail = f"worker process {self.proc.pid} {_exit_words(self.proc.exitcode)}"
                    return RoundEnd("died", detail=detail, in_flight=list(clocks))
                continue
            kind = msg[0]
            if kind == "stage":
                sid, stage = msg[1], msg[2]
                if stage == DONE:
                    clocks.pop(sid, None)
                elif sid in clocks:
                    clocks[sid].enter(stage)
                else:
                    clocks[sid] = SlideClock(stage)
            elif kind == "result":
                clocks.pop(msg[1], None)
                on_result(msg[1], msg[2], msg[3])
            elif kind == "round":
                return RoundEnd("done")
            elif kind == "write_error":
                return RoundEnd("write_error", detail=str(msg[1]), in_flight=list(clocks), error=msg[1])

    def record_failure(self, job: SlideJob, reason: str) -> None:
        """Have this (fresh) worker write ``job``'s failed result.json and report."""
        self.conn.send(("fail", job, reason))
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            msg = self._recv(POLL_S)
            if msg is not None and msg[0] == "recorded" and msg[1] == job.slide_id:
                return
            if msg is not None and msg[0] == "write_error":
                raise msg[1]
            if msg is None and not self.proc.is_alive():
                raise WorkerGone(f"worker process {self.proc.pid} {_exit_words(self.proc.exitcode)}")
        raise WorkerGone(f"worker process did not record the failure of {job.slide_id} in time")

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the worker to finish and wait for it; kill it if it does not."""
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout)
        self.kill()

    def kill(self) -> None:
        """End the worker now (SIGKILL) and reap it."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.conn.close()
