"""The Ray batch engine: slides spread over Ray actors, each running exactly the local engine's
:func:`~pipeline.batch.process.process_slide` into the same output layout.

What it assumes and promises
----------------------------
* **A shared filesystem.** Every worker reads the slides and the model bundle, and writes
  ``OUT/<slide_id>/``, at the same paths as the driver (the process running ``infer.py``).
  This is checked before any slide is scheduled: the driver writes a probe file into OUT and
  every actor must read it back (the same folder, not a namesake on its own disk), write a file
  beside it, and see the model bundle, the clinical file and the slides the driver sees.
  Otherwise the run stops with a one-line error and leaves nothing behind.
* **One model load per actor.** Each actor builds its :class:`InferenceContext` once and then
  processes slides one at a time; the driver never loads the model.
* **The local engine's guarantees hold**: files are written atomically by ``process_slide``,
  finished slides are skipped (``--force`` redoes them), a bad slide fails alone, and the driver
  writes ``summary.csv``, ``index.html`` and ``run.json`` (engine, address, workers, GPUs per
  worker, retries).
* **A worker that dies mid-slide** (killed, out of memory, crashed in native code, its node
  lost) does not lose the batch: the slide is retried by the next free actor, at most
  :data:`MAX_ATTEMPTS` attempts in all (then recorded as failed with ``worker died: ...``), and a
  replacement actor is sought in the background: the surviving actors never wait for it. When
  Ray cannot place it within :data:`WORKER_START_TIMEOUT_S`, the run goes on with fewer workers
  and says so (log, ``run.json`` ``engine.replacements``). ``engine.worker_list`` names every
  actor (slot, host, Ray node id, pid); each ``result.json`` ``produced_by`` its node and pid.
* **An output folder that fails** (full, read-only, deleted) stops the batch with one line, as
  in the local engine.

Test-only hook: with ``NME_TEST_RAY_CRASH=SLIDE_ID`` (every attempt) or ``SLIDE_ID@N`` (attempt N
only) in the driver's environment, the actor processing that slide exits with ``os._exit(1)``
before touching it: a real process death, used by the tests of the retry logic.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.batch.context import InferenceContext, build_context, ray_node_id
from pipeline.batch.discovery import Skipped, SlideJob
from pipeline.batch.options import BatchOptions, RunFacts, check_inputs, write_summary
from pipeline.batch.process import failed_result, process_slide
from pipeline.batch.stages import FileTracker, clear_stage_file, read_stage_file, timeout_message
from pipeline.batch.state import OutputLock, batch_stopped, check_output_folder, is_done, summary_write
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.io import OutputWriteError, ensure_dir, write_error
from pipeline.result import ProducedBy, ResultMPP, SlideResult, parse_result, read_result_or_none

log = logging.getLogger(__name__)

#: Seconds between checks of the slides' time limit while no slide finishes.
TIMEOUT_POLL_S = 0.5
#: Attempts per slide when its worker dies (the first one included).
MAX_ATTEMPTS = 2
#: Seconds to wait for a TCP connection to the Ray head given with ``--address HOST:PORT``.
CONNECT_TIMEOUT_S = 10.0
#: Seconds to wait for the actors to be placed, probe the files and load the model.
WORKER_START_TIMEOUT_S = 300.0
#: Object store of a local Ray instance: only small result dicts travel through it.
LOCAL_OBJECT_STORE_BYTES = 100 * 1024 * 1024
CRASH_HOOK_ENV = "NME_TEST_RAY_CRASH"
INSTALL_HINT = "pip install '.[ray]'"
PROBE_PREFIX = ".ray-probe-"
SHARED_FS_NOTE = (
    "assumed: slides, model bundle and output folder are at the same paths on every worker; "
    "checked at start with a probe file written by the driver and read back by every actor"
)


class ClusterError(PipelineError):
    """The Ray cluster cannot run this batch: unreachable, too small, or its workers cannot see the files."""


def import_ray():
    """The ``ray`` module, or a one-line error naming the install command."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"--engine ray needs Ray, which is not installed: {INSTALL_HINT} (or pip install 'ray>=2.30')"
        ) from None
    return ray


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- connecting


def parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``; None for ``auto``. Raises ConfigError otherwise."""
    if address == "auto":
        return None
    rest = address[len("ray://") :] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    return host, int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast (``timeout`` seconds) when nothing answers at the head's address.

    Ray itself keeps retrying an unreachable head for a minute or more, logging from C++.
    """
    hp = parse_address(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise ClusterError(f"--address {address}: no Ray head reachable there within {timeout:g} s ({why})") from None


@dataclass
class Connection:
    """This process's link to Ray and what to undo at the end."""

    ray: Any
    label: str  # what run.json records as the address
    started_local: bool
    owned: bool  # True: this run initialised Ray and shuts it down

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()


def _machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextmanager
def _local_instance_env() -> Iterator[None]:
    """Environment of a local Ray instance's processes (inherited from this one while it starts).

    * ``PYTHONPATH`` gets this checkout, so workers import it even when it is not pip-installed;
    * ``RAY_worker_niceness=0`` (unless set): Ray runs workers at niceness 15 by default, which on a
      shared machine makes ``--engine ray`` yield the CPU to everything else and run slower than
      the local engine at the same priority.
    """
    from pipeline.core.paths import REPO_ROOT

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_worker_niceness")}
    parts = [p for p in (saved["PYTHONPATH"] or "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *parts])
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _native_stderr_captured(seen: list[str]) -> Iterator[None]:
    """Send file descriptor 2 to a scratch file while Ray's C++ core tries to connect; its text
    is appended to ``seen`` at the end (Ray's own reason for a failure is only there).

    When something that is not a Ray head answers at ``--address``, Ray's core logs a line a
    second for ~20 s before giving up; the user gets our one-line error instead.
    """
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                scratch.seek(0)
                seen.append(scratch.read(1 << 20).decode("utf-8", "replace"))
    finally:
        os.close(saved)


#: Ray's native log lines: ``[2026-12-02 16:29:15,249 W 21542 21542] gcs_client.cc:210: <message>``.
_NATIVE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
_AUTH_WORDS = ("unauthenticated", "authtoken", "auth token", "authentication")
AUTH_HINT = (
    "the cluster uses token authentication: give this process its token with RAY_AUTH_TOKEN, "
    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
)


def native_reason(text: str) -> str | None:
    """Ray's own reason for failing to join, from its native log: an authentication error first,
    else the last warning or error line; None when there is none."""
    lines = [_NATIVE_PREFIX.sub("", ln).strip() for ln in text.splitlines() if ln.startswith("[")]
    lines = [ln for ln in lines if ln]
    for ln in lines:
        if any(w in ln.lower() for w in _AUTH_WORDS):
            return f"{_one_line(ln, 200)}; {AUTH_HINT}"
    return _one_line(lines[-1], 200) if lines else None


def connect(ray, address: str | None) -> Connection:
    """Join the cluster at ``address``, or start a quiet local Ray instance sized to this machine.

    A program that already initialised Ray keeps its connection (and its shutdown).
    """
    if address is not None:
        check_reachable(address)
    if ray.is_initialized():
        label = address or _gcs_address(ray) or "existing Ray connection"
        log.info("using this process's existing Ray connection (%s)", label)
        return Connection(ray, label, started_local=False, owned=False)
    if address is None:
        n = _machine_cpus()
        t = time.perf_counter()
        try:
            with _local_instance_env():
                ray.init(
                    num_cpus=n,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                )
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; the user needs one line
            raise ClusterError(f"could not start a local Ray instance: {_one_line(exc)}") from None
        log.info("started a local Ray instance with %d CPU(s) in %.1f s", n, time.perf_counter() - t)
        return Connection(ray, f"local ({_gcs_address(ray) or 'started by this run'})", started_local=True, owned=True)
    seen: list[str] = []
    try:
        with _native_stderr_captured(seen):
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001
        why = native_reason("".join(seen))
        raise ClusterError(
            f"--address {address}: cannot join the Ray cluster ({_one_line(exc)})" + (f": {why}" if why else "")
        ) from None
    return Connection(ray, address, started_local=False, owned=True)


def _gcs_address(ray) -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - informational only
        return None


# ----------------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class ClusterShape:
    """Alive nodes' CPUs and GPUs when the run starts."""

    node_cpus: tuple[float, ...]
    node_gpus: tuple[float, ...]

    @property
    def cpus(self) -> float:
        return float(sum(self.node_cpus))

    @property
    def gpus(self) -> float:
        return float(sum(self.node_gpus))

    def describe(self) -> str:
        return f"{len(self.node_cpus)} node(s), {self.cpus:g} CPU(s), {self.gpus:g} GPU(s)"


def cluster_shape(ray) -> ClusterShape:
    nodes = [n for n in ray.nodes() if n.get("Alive", n.get("alive", False))]
    res = [n.get("Resources", {}) for n in nodes]
    return ClusterShape(tuple(float(r.get("CPU", 0)) for r in res), tuple(float(r.get("GPU", 0)) for r in res))


@dataclass(frozen=True)
class WorkerPlan:
    """How many actors, and what each reserves."""

    workers: int
    cpus: float
    gpus: float
    threads: int  # torch intra-op threads per actor


def _fits(capacity: tuple[float, ...], each: float) -> int:
    return sum(int(c / each + 1e-9) for c in capacity) if each > 0 else 10**9


def _ray_quantity(x: float) -> float:
    """Ray accepts fractions below 1 only (e.g. 0.5 CPU), whole numbers above."""
    return float(math.floor(x)) if x >= 1 else math.floor(x * 10_000) / 10_000


def plan_workers(opts: BatchOptions, shape: ClusterShape) -> WorkerPlan:
    """Number of actors and their CPU/GPU reservations; a one-line error when the cluster cannot hold them."""
    if not shape.node_cpus:
        raise ClusterError("the Ray cluster has no alive node")
    g = float(opts.gpus_per_worker or 0.0)
    if g > 0:
        gpu_fit = _fits(shape.node_gpus, g)
        if gpu_fit == 0:
            raise ClusterError(
                f"--gpus-per-worker {g:g}: no node of the Ray cluster has that many GPUs ({shape.describe()})"
            )
        workers = opts.workers or gpu_fit
        if workers > gpu_fit:
            raise ClusterError(
                f"--workers {workers} with --gpus-per-worker {g:g}: the Ray cluster holds only {gpu_fit} "
                f"such worker(s) ({shape.describe()})"
            )
        cpus = float(opts.cpus_per_worker) if opts.cpus_per_worker else float(max(1, opts.reader_threads))
    else:
        workers = opts.workers or max(1, int(shape.cpus // 2))
        if opts.cpus_per_worker:
            cpus = float(opts.cpus_per_worker)
        else:
            # the largest reservation (at most one node's CPUs) that still places every actor
            candidates = sorted(
                {_ray_quantity(c / k) for c in shape.node_cpus if c > 0 for k in range(1, workers + 1)}, reverse=True
            )
            fitting = [c for c in candidates if c > 0 and _fits(shape.node_cpus, c) >= workers]
            cpus = fitting[0] if fitting else _ray_quantity(shape.cpus / workers)
    cpus = _ray_quantity(cpus)
    if cpus <= 0:
        raise ClusterError(f"--workers {workers}: too many workers for the Ray cluster ({shape.describe()})")
    if _fits(shape.node_cpus, cpus) < workers:
        raise ClusterError(
            f"--workers {workers} with {cpus:g} CPU(s) each do not fit on the Ray cluster ({shape.describe()}); "
            "lower --workers or --cpus-per-worker"
        )
    return WorkerPlan(workers=workers, cpus=cpus, gpus=g, threads=max(1, int(cpus)))


# ----------------------------------------------------------------------------- the actor


def crash_requested(hook: str | None, slide_id: str, attempt: int) -> bool:
    """Test-only hook (:data:`CRASH_HOOK_ENV`): ``SLIDE_ID`` crashes every attempt, ``SLIDE_ID@N`` attempt N."""
    if not hook:
        return False
    for item in hook.split(","):
        sid, _, at = item.strip().partition("@")
        if sid == slide_id and (not at or (at.isdigit() and int(at) == attempt)):
            return True
    return False


def write_failed_result(job: SlideJob, ctx, error: str) -> dict[str, Any]:
    """Leave for ``job`` what :func:`process_slide` leaves for a failed slide: report.html + result.json (status failed)."""
    return failed_result(job, ctx, error).to_json_dict()


def _driver_failed_result(job: SlideJob, out_dir: Path, error: str) -> None:
    """Minimal failed result.json when no worker is left to write the full one."""
    slide_dir = ensure_dir(out_dir / job.slide_id, parents=False)
    SlideResult(
        slide_id=job.slide_id,
        slide_path=str(job.path),
        patient_id=job.patient_id,
        status="failed",
        error=" ".join(error.split()),
        mpp=ResultMPP(slide=job.mpp),
        produced_by=ProducedBy(engine="ray", host=socket.gethostname(), pid=os.getpid()),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    ).write(slide_dir)


class SlideWorker:
    """Body of one Ray actor: builds the :class:`InferenceContext` once, then processes slides one at a time."""

    def __init__(self, opts: BatchOptions, jobs: list[SlideJob], threads: int, crash_hook: str | None = None) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.opts, self.jobs, self.crash_hook = opts, jobs, crash_hook
        self.ctx: InferenceContext | None = None

    def identity(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "node_id": ray_node_id()}

    def probe(self, token_file: str, token: str, driver_missing: list[str]) -> dict[str, Any]:
        """Can this worker see and write the driver's output folder, and see the model, clinical file and slides?"""
        problems: list[str] = []
        out = Path(self.opts.out_dir)
        try:
            seen = Path(token_file).read_text(encoding="utf-8")
        except OSError:
            seen = None
        if seen != token:
            problems.append(
                f"cannot see the output folder {out} (the probe file the driver wrote there is "
                f"{'missing' if seen is None else 'different'}): it must be on storage shared by all workers"
            )
        else:
            mine = out / f"{Path(token_file).name}-{socket.gethostname()}-{os.getpid()}"
            try:
                mine.write_text(token, encoding="utf-8")
                mine.unlink()
            except OSError as exc:
                problems.append(f"cannot write to the output folder {out} ({exc.strerror or exc})")
        if not (Path(self.opts.model) / "bundle.json").is_file():
            problems.append(f"cannot see the model bundle {self.opts.model} (no bundle.json there)")
        if self.opts.clinical is not None and not Path(self.opts.clinical).is_file():
            problems.append(f"cannot see the clinical file {self.opts.clinical}")
        known_missing = set(driver_missing)
        missing = [str(j.path) for j in self.jobs if str(j.path) not in known_missing and not Path(j.path).exists()]
        if missing:
            problems.append(
                f"cannot see {len(missing)} of the {len(self.jobs)} slide(s) the driver sees (e.g. {missing[0]})"
            )
        return {**self.identity(), "problems": problems}

    def load(self) -> RunFacts:
        """Build the InferenceContext (loads the bundle once per actor)."""
        self.ctx = build_context(self.opts, self.jobs, engine="ray")
        self.ctx.tracker = FileTracker(self.ctx.out_dir)  # the driver reads it when this actor is stuck
        return RunFacts.of(self.ctx)

    def process(self, job: SlideJob, attempt: int) -> dict[str, Any]:
        """``process_slide`` on this worker (never raises for a bad slide); the result's JSON form."""
        if self.ctx is None:
            raise RuntimeError("worker asked to process a slide before load()")
        if crash_requested(self.crash_hook, job.slide_id, attempt):
            log.warning("%s: test hook %s: this worker exits now (attempt %d)", job.slide_id, CRASH_HOOK_ENV, attempt)
            os._exit(1)
        return process_slide(job, self.ctx).to_json_dict()

    def record_failure(self, job: SlideJob, error: str) -> dict[str, Any]:
        if self.ctx is None:
            raise RuntimeError("worker asked to record a failure before load()")
        return write_failed_result(job, self.ctx, error)


# ----------------------------------------------------------------------------- the pool


@dataclass
class _Slot:
    actor: Any
    identity: dict[str, Any]


@dataclass
class _Starting:
    """A replacement actor on its way: ``probe`` (placed? sees the files?) then ``load`` (the model)."""

    actor: Any
    ref: Any
    phase: str
    since: float
    why: str
    report: dict[str, Any] | None = None


class WorkerPool:
    """The actors of one run: started (probed + loaded) together; a dead one is replaced in the
    background (:meth:`begin_replace`, then :meth:`advance` as its steps finish), so the other
    actors keep taking slides meanwhile, and a replacement that cannot be placed within
    :data:`WORKER_START_TIMEOUT_S` closes its slot (the run goes on with fewer workers)."""

    def __init__(
        self, ray, opts: BatchOptions, jobs: list[SlideJob], plan: WorkerPlan, token_file: Path, token: str
    ) -> None:
        self.ray, self.opts, self.jobs, self.plan = ray, opts, jobs, plan
        self.token_file, self.token = token_file, token
        self.driver_missing = [str(j.path) for j in jobs if not Path(j.path).exists()]
        self.crash_hook = os.environ.get(CRASH_HOOK_ENV) or None
        self.remote_cls = ray.remote(SlideWorker)
        self.slots: list[_Slot | None] = []
        self.starting: dict[int, _Starting] = {}
        self.facts: RunFacts | None = None
        self.hosts: set[str] = set()
        self.roster: list[dict[str, Any]] = []  # every actor that ran: run.json engine.worker_list
        self.replacements: list[dict[str, Any]] = []  # run.json engine.replacements

    def _new_actor(self):
        p = self.plan
        return self.remote_cls.options(num_cpus=p.cpus, num_gpus=p.gpus, max_restarts=0, max_task_retries=0).remote(
            self.opts, self.jobs, p.threads, self.crash_hook
        )

    def _probe(self, actor):
        return actor.probe.remote(str(self.token_file), self.token, self.driver_missing)

    def _get(self, refs, what: str):
        ray = self.ray
        try:
            return ray.get(refs, timeout=WORKER_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"Ray did not {what} within {WORKER_START_TIMEOUT_S:g} s "
                f"({self.plan.cpus:g} CPU + {self.plan.gpus:g} GPU each; cluster: "
                f"{cluster_shape(ray).describe()})"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, PipelineError):  # e.g. a bad clinical file: the local engine's message
                try:
                    err: PipelineError = type(cause)(str(cause))
                except TypeError:
                    err = ClusterError(str(cause))
                raise err from None
            raise ClusterError(f"a Ray worker failed to {what}: {_one_line(cause or exc)}") from None
        except ray.exceptions.RayActorError as exc:
            raise ClusterError(
                f"a Ray worker died while trying to {what} (is this package installed on every node? "
                f"{INSTALL_HINT}): {_one_line(exc)}"
            ) from None

    @staticmethod
    def _problem(report: dict[str, Any]) -> str | None:
        problems = report["problems"]
        if not problems:
            return None
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        return f"Ray worker on {report['host']} (pid {report['pid']}) {problems[0]}{more}"

    def _enrol(self, i: int, actor, report: dict[str, Any]) -> _Slot:
        slot = _Slot(actor, {k: report.get(k) for k in ("host", "pid", "node_id")})
        self.slots[i] = slot
        self.hosts.add(slot.identity["host"])
        self.roster.append({"slot": i, **slot.identity, "ended": None})
        return slot

    def start(self, n: int) -> None:
        """Start ``n`` actors; each checks the shared files and loads the model once (all or nothing)."""
        actors = [self._new_actor() for _ in range(n)]
        try:
            reports = self._get([self._probe(a) for a in actors], f"start {n} worker(s)")
            for r in reports:
                problem = self._problem(r)
                if problem:
                    raise ClusterError(problem)
            facts = self._get([a.load.remote() for a in actors], "load the model")
        except BaseException:
            for a in actors:
                self._kill(a)
            raise
        self.facts = self.facts or facts[0]
        self.slots = [None] * n
        for i, (a, r) in enumerate(zip(actors, reports)):
            self._enrol(i, a, r)

    def _retire(self, i: int, why: str) -> None:
        old = self.slots[i]
        if old is not None:
            self._kill(old.actor)
            for entry in self.roster:
                if entry["slot"] == i and entry["ended"] is None:
                    entry["ended"] = why
        self.slots[i] = None

    def begin_replace(self, i: int, why: str) -> None:
        """Kill slot ``i``'s actor and ask Ray for a fresh one; returns at once (see :meth:`advance`)."""
        self._retire(i, why)
        actor = self._new_actor()
        self.starting[i] = _Starting(actor, self._probe(actor), "probe", time.monotonic(), why)
        log.info(
            "replacing the Ray worker of slot %d in the background (%s); %d worker(s) go on meanwhile",
            i,
            why,
            len(self.alive()),
        )

    def slot_starting(self, ref) -> int | None:
        """The slot whose replacement ``ref`` (a probe or load call) belongs to."""
        for i, st in self.starting.items():
            if st.ref == ref:
                return i
        return None

    def advance(self, i: int) -> bool:
        """Slot ``i``'s replacement finished a step (its ref is ready); True when the slot is ready for slides."""
        st = self.starting[i]
        try:
            out = self.ray.get(st.ref, timeout=0)
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; one line in the log and run.json
            self._give_up_start(
                i, f"failed to {'start' if st.phase == 'probe' else 'load the model'}: {_one_line(exc)}"
            )
            return False
        if st.phase == "probe":
            problem = self._problem(out)
            if problem:
                self._give_up_start(i, problem)
                return False
            st.report, st.phase, st.ref = out, "load", st.actor.load.remote()
            return False
        assert st.report is not None
        del self.starting[i]
        slot = self._enrol(i, st.actor, st.report)
        seconds = time.monotonic() - st.since
        self.replacements.append({"slot": i, "why": st.why, "outcome": "ready", "seconds": round(seconds, 1)})
        log.info(
            "replacement Ray worker of slot %d ready (pid %s on %s) in %.1f s",
            i,
            slot.identity["pid"],
            slot.identity["host"],
            seconds,
        )
        return True

    def expire(self, now: float) -> None:
        """Give up replacements that Ray could not place (and load) within :data:`WORKER_START_TIMEOUT_S`."""
        for i, st in list(self.starting.items()):
            if now - st.since > WORKER_START_TIMEOUT_S:
                self._give_up_start(
                    i,
                    f"could not be placed within {WORKER_START_TIMEOUT_S:g} s ({self.plan.cpus:g} CPU + "
                    f"{self.plan.gpus:g} GPU; cluster now: {cluster_shape(self.ray).describe()})",
                )

    def _give_up_start(self, i: int, why: str) -> None:
        st = self.starting.pop(i)
        self._kill(st.actor)
        self.replacements.append(
            {
                "slot": i,
                "why": st.why,
                "outcome": "failed",
                "detail": why,
                "seconds": round(time.monotonic() - st.since, 1),
            }
        )
        log.warning(
            "no replacement for the Ray worker of slot %d (%s): the batch goes on with %d worker(s)",
            i,
            why,
            len(self.alive()),
        )

    def alive(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def shutdown(self) -> None:
        """Kill every actor, those still starting included (recorded as not placed before the end)."""
        for i, st in list(self.starting.items()):
            self._kill(st.actor)
            self.replacements.append(
                {
                    "slot": i,
                    "why": st.why,
                    "outcome": "still starting when the batch ended",
                    "seconds": round(time.monotonic() - st.since, 1),
                }
            )
            log.warning(
                "the replacement for the Ray worker of slot %d was not ready before the batch ended "
                "(the batch ran on with %d worker(s))",
                i,
                len(self.alive()),
            )
        self.starting = {}
        for slot in self.slots:
            if slot is not None:
                self._kill(slot.actor)
        self.slots = []


# ----------------------------------------------------------------------------- the run


def _absolute(opts: BatchOptions) -> BatchOptions:
    """Paths as every worker must see them (workers do not share the driver's working directory)."""

    def a(p: Path | None) -> Path | None:
        return None if p is None else Path(p).expanduser().resolve()

    def req(p: Path) -> Path:
        return Path(p).expanduser().resolve()

    return dataclasses.replace(
        opts,
        slides_dir=a(opts.slides_dir),
        out_dir=req(opts.out_dir),
        model=req(opts.model),
        clinical=a(opts.clinical),
        slides_table=a(opts.slides_table),
    )


def _worker_options(opts: BatchOptions) -> BatchOptions:
    """Device for the actors: the GPU Ray assigned, or the CPU (never an unreserved GPU)."""
    dev = opts.device
    if opts.gpus_per_worker > 0:
        if dev not in ("auto", "cuda"):
            raise ConfigError(
                f"--device {dev} with --gpus-per-worker: use auto or cuda (Ray assigns each worker its GPU)"
            )
        return dataclasses.replace(opts, device="cuda")
    if dev.startswith("cuda"):
        raise ConfigError(f"--device {dev} with --engine ray needs --gpus-per-worker (e.g. 1)")
    return dataclasses.replace(opts, device="cpu")


def run_batch_ray(opts: BatchOptions) -> dict[str, Any]:
    """Process every slide on Ray actors; returns the run record (also written to run.json)."""
    ray = import_ray()
    skipped_inputs: list[Skipped] = []
    jobs = [
        dataclasses.replace(j, path=Path(j.path).expanduser().absolute()) for j in check_inputs(opts, skipped_inputs)
    ]
    wopts = _worker_options(_absolute(opts))
    conn = connect(ray, opts.address)
    try:
        shape = cluster_shape(ray)
        plan = plan_workers(opts, shape)
        return _run(ray, conn, opts, wopts, jobs, plan, shape, skipped_inputs)
    finally:
        conn.close()


def _run(
    ray,
    conn: Connection,
    opts: BatchOptions,
    wopts: BatchOptions,
    jobs: list[SlideJob],
    plan: WorkerPlan,
    shape: ClusterShape,
    skipped_inputs: list[Skipped] | None = None,
) -> dict[str, Any]:
    out = wopts.out_dir
    created = not out.exists()
    ensure_dir(out)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    token = secrets.token_hex(8)
    token_file = out / f"{PROBE_PREFIX}{token}"
    lock = OutputLock(out)
    pool: WorkerPool | None = None
    ready = False
    try:
        lock.acquire()
        todo = [j for j in jobs if wopts.force or not is_done(out / j.slide_id)]
        skipped = len(jobs) - len(todo)
        if skipped:
            log.info("%d slide(s) already done, skipped (use --force to redo)", skipped)
        n_actors = max(1, min(plan.workers, len(todo)))
        for stale in out.glob(f"{PROBE_PREFIX}*"):  # left by a killed run (we hold the lock now)
            stale.unlink(missing_ok=True)
        try:
            token_file.write_text(token, encoding="utf-8")  # kept until the end: replacement workers probe it too
        except OSError as exc:
            raise write_error(token_file, exc) or exc from None
        pool = WorkerPool(ray, wopts, jobs, plan, token_file, token)
        pool.start(n_actors)
        ready = True
        setup_s = time.perf_counter() - t0
        log.info(
            "%d Ray worker(s) ready on %s in %.1f s (%g CPU, %g GPU each)",
            n_actors,
            ", ".join(sorted(pool.hosts)),
            setup_s,
            plan.cpus,
            plan.gpus,
        )
        retries, n_tiles, lost, timeouts = _schedule(ray, pool, todo, wopts)
        pool.shutdown()  # before run.json: replacements still starting are recorded as such
        elapsed = time.perf_counter() - t0
        results = [r for r in (read_result_or_none(out / j.slide_id) for j in jobs) if r is not None]
        engine = {
            "name": "ray",
            "address": conn.label,
            "ray_version": getattr(ray, "__version__", None),
            "workers": n_actors,
            "workers_planned": plan.workers,
            "cpus_per_worker": plan.cpus,
            "gpus_per_worker": plan.gpus,
            "torch_threads_per_worker": plan.threads,
            "reader_threads": wopts.reader_threads,
            "cluster": {"nodes": len(shape.node_cpus), "cpus": shape.cpus, "gpus": shape.gpus},
            "worker_hosts": sorted(pool.hosts),
            "worker_list": pool.roster,
            "replacements": pool.replacements,
            "shared_filesystem": SHARED_FS_NOTE,
            "max_attempts": MAX_ATTEMPTS,
            "retries": retries,
            "slide_timeout_s": wopts.slide_timeout,
            "timeouts": timeouts,
            "setup_seconds": round(setup_s, 3),
        }
        assert pool.facts is not None
        with summary_write(len(todo) - len(lost)):
            record = write_summary(
                opts,
                pool.facts,
                results,
                started,
                elapsed,
                processed=len(todo) - len(lost),
                skipped=skipped,
                n_tiles=n_tiles,
                engine=engine,
                skipped_inputs=skipped_inputs,
            )
        if lost:
            raise ClusterError(
                f"every Ray worker is gone; {len(lost)} slide(s) not processed (e.g. {lost[0].slide_id}); "
                "finished slides are kept: run again to continue"
            )
        return record
    finally:
        if pool is not None:
            pool.shutdown()
        try:
            token_file.unlink(missing_ok=True)
        except OSError:  # a read-only or vanished output folder
            pass
        lock.release()
        if not ready and created:
            try:
                out.rmdir()  # only when empty: nothing half-written is left behind
            except OSError:
                pass


@dataclass
class _Task:
    """A call in flight on slot ``slot``: a slide (``reason`` empty) or the recording of its failure."""

    slot: int
    job: SlideJob
    attempt: int
    since: float
    reason: str = ""


def _schedule(
    ray, pool: WorkerPool, todo: list[SlideJob], opts: BatchOptions
) -> tuple[list[dict[str, Any]], int, list[SlideJob], list[dict[str, Any]]]:
    """Keep every actor busy with one slide; retry slides whose actor died; abandon slides past
    ``opts.slide_timeout``. A dead or abandoned actor is replaced in the background: nothing here
    waits for a replacement while another actor could take a slide. Failures are recorded by the
    next free actor (report.html + result.json), or by the driver when none is left. Returns
    (retries, tiles, slides lost, timeouts); raises :class:`OutputWriteError` when the output
    folder fails (full, read-only, deleted)."""
    queue: deque[tuple[SlideJob, int]] = deque((j, 1) for j in todo)
    to_record: deque[tuple[SlideJob, str]] = deque()  # failed slides whose result a worker should write
    pending: dict[Any, _Task] = {}
    limit = float(opts.slide_timeout or 0)
    timeouts: list[dict[str, Any]] = []
    idle = deque(pool.alive())
    retries: list[dict[str, Any]] = []
    n_tiles = 0
    finished = 0
    bar = tqdm(total=len(todo), desc="slides", unit="slide", disable=opts.quiet or None)

    def dispatch() -> None:
        while idle and (to_record or queue):
            i = idle.popleft()
            slot = pool.slots[i]
            if slot is None:
                continue
            if to_record:
                job, reason = to_record.popleft()
                pending[slot.actor.record_failure.remote(job, reason)] = _Task(i, job, 0, time.monotonic(), reason)
            else:
                job, attempt = queue.popleft()
                pending[slot.actor.process.remote(job, attempt)] = _Task(i, job, attempt, time.monotonic())

    def one_done(job: SlideJob, description: str) -> None:
        nonlocal finished
        finished += 1
        log.info("%s: %s", job.slide_id, description)
        bar.set_postfix_str(job.slide_id[:30])
        bar.update(1)
        check_output_folder(opts.out_dir)

    try:
        try:
            while queue or pending or to_record:
                dispatch()
                if not pending and not pool.starting:
                    break  # slides left but no worker alive, and none coming
                wait_for = list(pending) + [st.ref for st in pool.starting.values()]
                poll = limit > 0 or bool(pool.starting)
                done, _ = ray.wait(wait_for, num_returns=1, timeout=TIMEOUT_POLL_S if poll else None)
                now = time.monotonic()
                pool.expire(now)
                if limit > 0:
                    for ref in [r for r, t in pending.items() if not t.reason and now - t.since > limit]:
                        task = pending.pop(ref)
                        timeouts.append(_abandon(pool, task.slot, task.job, limit, opts.out_dir))
                        to_record.append((task.job, timeouts[-1]["error"]))
                if not done:
                    continue
                ref = done[0]
                starting = pool.slot_starting(ref)
                if starting is not None:
                    if pool.advance(starting):
                        idle.append(starting)
                    continue
                if ref not in pending:
                    continue  # a slide abandoned at its time limit
                task = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, OutputWriteError):  # the output folder failed: stop, as the local engine
                        raise OutputWriteError(str(cause), cause.errno, cause.filename) from None
                    _worker_lost(pool, task, exc, ray, queue, to_record, retries)
                    if task.reason:  # the worker recording a failure died: the driver writes the minimal record
                        _driver_failed_result(task.job, opts.out_dir, task.reason)
                        one_done(task.job, f"failed: {task.reason}")
                    continue
                idle.append(task.slot)
                if task.reason:
                    one_done(task.job, f"failed: {task.reason}")
                    continue
                result = parse_result(value, source=f"{task.job.slide_id}: worker result")
                n_tiles += result.n_tiles
                one_done(task.job, result.describe())
            while to_record:  # no worker left to write the full record
                job, reason = to_record.popleft()
                _driver_failed_result(job, opts.out_dir, reason)
                one_done(job, f"failed: {reason}")
        except OutputWriteError as exc:
            raise batch_stopped(exc, finished, len(todo)) from None
    finally:
        bar.close()
    lost = [j for j, _ in queue]
    return retries, n_tiles, lost, timeouts


def _worker_lost(
    pool: WorkerPool,
    task: _Task,
    exc: Exception,
    ray,
    queue: deque[tuple[SlideJob, int]],
    to_record: deque[tuple[SlideJob, str]],
    retries: list[dict[str, Any]],
) -> None:
    """``task``'s actor died or erred: replace it in the background; retry the slide or record it failed."""
    slot = pool.slots[task.slot]
    who = _who(slot.identity) if slot is not None else "unknown worker"
    died = isinstance(exc, ray.exceptions.RayActorError)
    what = "worker died" if died else "worker error"
    pool.begin_replace(task.slot, f"{what} ({who})")  # an erroring actor is not trusted either
    if task.reason:
        return
    job, attempt = task.job, task.attempt
    reason = f"{what} while processing this slide (attempt {attempt}/{MAX_ATTEMPTS}, {who}): {_one_line(exc, 200)}"
    log.warning("%s: %s", job.slide_id, reason)
    retries.append(
        {
            "slide_id": job.slide_id,
            "attempt": attempt,
            "worker": who,
            "reason": _one_line(exc, 200),
            "retried": attempt < MAX_ATTEMPTS,
        }
    )
    if attempt < MAX_ATTEMPTS:
        queue.appendleft((job, attempt + 1))  # the next free worker takes it, this slot's replacement or another
    else:
        to_record.append((job, f"{what}: gave up after {MAX_ATTEMPTS} attempts ({who}): {_one_line(exc, 200)}"))


def _who(identity: dict[str, Any]) -> str:
    node = identity.get("node_id")
    return f"pid {identity['pid']} on {identity['host']}" + (f", node {str(node)[:12]}" if node else "")


def _abandon(pool: WorkerPool, i: int, job: SlideJob, limit: float, out_dir: Path) -> dict[str, Any]:
    """``job`` passed the time limit on slot ``i``: kill that actor, replace it in the background; the timeout's record."""
    slot = pool.slots[i]
    stage = read_stage_file(out_dir, job.slide_id) or "an unknown stage"
    error = f"{job.path}: {timeout_message(limit, stage)}"
    log.warning("%s: %s", job.slide_id, error)
    record: dict[str, Any] = {"slide_id": job.slide_id, "stage": stage, "error": error}
    if slot is not None:
        record.update(worker_pid=slot.identity["pid"], worker_host=slot.identity["host"])
        record["worker_node_id"] = slot.identity.get("node_id")
    pool.begin_replace(i, f"{job.slide_id} timed out")
    clear_stage_file(out_dir, job.slide_id)
    return record
