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
* **A worker that dies mid-slide** (killed, out of memory, crashed in native code) does not lose
  the batch: its actor is replaced by a fresh one, and the slide is retried on that fresh actor,
  at most :data:`MAX_ATTEMPTS` attempts in all; after that the slide is recorded as failed with
  ``worker died: ...`` and the batch goes on.

Test-only hook: with ``NME_TEST_RAY_CRASH=SLIDE_ID`` (every attempt) or ``SLIDE_ID@N`` (attempt N
only) in the driver's environment, the actor processing that slide exits with ``os._exit(1)``
before touching it: a real process death, used by the tests of the retry logic.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
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

from pipeline.batch.context import InferenceContext, build_context
from pipeline.batch.discovery import Skipped, SlideJob
from pipeline.batch.options import BatchOptions, RunFacts, check_inputs, write_summary
from pipeline.batch.process import failed_result, process_slide
from pipeline.batch.stages import FileTracker, clear_stage_file, read_stage_file, timeout_message
from pipeline.batch.state import OutputLock, is_done
from pipeline.core.errors import ConfigError, PipelineError
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


def _one_line(exc: BaseException, limit: int = 300) -> str:
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
def _native_stderr_captured() -> Iterator[None]:
    """Send file descriptor 2 to a scratch file while Ray's C++ core tries to connect.

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
    finally:
        os.close(saved)


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
    try:
        with _native_stderr_captured():
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001
        raise ClusterError(f"--address {address}: cannot join the Ray cluster ({_one_line(exc)})") from None
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
    slide_dir = out_dir / job.slide_id
    slide_dir.mkdir(parents=True, exist_ok=True)
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
        return {"host": socket.gethostname(), "pid": os.getpid()}

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


class WorkerPool:
    """The actors of one run: started (probed + loaded) together, replaced one by one when they die."""

    def __init__(
        self, ray, opts: BatchOptions, jobs: list[SlideJob], plan: WorkerPlan, token_file: Path, token: str
    ) -> None:
        self.ray, self.opts, self.jobs, self.plan = ray, opts, jobs, plan
        self.token_file, self.token = token_file, token
        self.driver_missing = [str(j.path) for j in jobs if not Path(j.path).exists()]
        self.crash_hook = os.environ.get(CRASH_HOOK_ENV) or None
        self.remote_cls = ray.remote(SlideWorker)
        self.slots: list[_Slot | None] = []
        self.facts: RunFacts | None = None
        self.hosts: set[str] = set()

    def _new_actor(self):
        p = self.plan
        return self.remote_cls.options(num_cpus=p.cpus, num_gpus=p.gpus, max_restarts=0, max_task_retries=0).remote(
            self.opts, self.jobs, p.threads, self.crash_hook
        )

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

    def _start(self, n: int) -> list[_Slot]:
        actors = [self._new_actor() for _ in range(n)]
        try:
            reports = self._get(
                [a.probe.remote(str(self.token_file), self.token, self.driver_missing) for a in actors],
                f"start {n} worker(s)",
            )
            for r in reports:
                if r["problems"]:
                    more = f" (and {len(r['problems']) - 1} more problem(s))" if len(r["problems"]) > 1 else ""
                    raise ClusterError(f"Ray worker on {r['host']} (pid {r['pid']}) {r['problems'][0]}{more}")
            facts = self._get([a.load.remote() for a in actors], "load the model")
        except BaseException:
            for a in actors:
                self._kill(a)
            raise
        self.facts = self.facts or facts[0]
        slots = [_Slot(a, {k: r[k] for k in ("host", "pid")}) for a, r in zip(actors, reports)]
        self.hosts.update(s.identity["host"] for s in slots)
        return slots

    def start(self, n: int) -> None:
        """Start ``n`` actors; each checks the shared files and loads the model once."""
        self.slots = list(self._start(n))

    def replace(self, i: int) -> bool:
        """Swap slot ``i``'s dead actor for a fresh one; False (slot closed) when that fails."""
        old = self.slots[i]
        if old is not None:
            self._kill(old.actor)
        try:
            self.slots[i] = self._start(1)[0]
            return True
        except PipelineError as exc:
            log.error("could not replace a dead Ray worker: %s", exc)
            self.slots[i] = None
            return False

    def alive(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def shutdown(self) -> None:
        for s in self.slots:
            if s is not None:
                self._kill(s.actor)
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
    out.mkdir(parents=True, exist_ok=True)
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
        token_file.write_text(token, encoding="utf-8")  # kept until the end: replacement workers probe it too
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
            "shared_filesystem": SHARED_FS_NOTE,
            "max_attempts": MAX_ATTEMPTS,
            "retries": retries,
            "slide_timeout_s": wopts.slide_timeout,
            "timeouts": timeouts,
            "setup_seconds": round(setup_s, 3),
        }
        assert pool.facts is not None
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
        token_file.unlink(missing_ok=True)
        lock.release()
        if not ready and created:
            try:
                out.rmdir()  # only when empty: nothing half-written is left behind
            except OSError:
                pass


def _schedule(
    ray, pool: WorkerPool, todo: list[SlideJob], opts: BatchOptions
) -> tuple[list[dict[str, Any]], int, list[SlideJob], list[dict[str, Any]]]:
    """Keep every actor busy with one slide; retry slides whose actor died; abandon slides past
    ``opts.slide_timeout`` (their actor is killed and replaced). Returns (retries, tiles, slides
    lost, timeouts)."""
    queue: deque[tuple[SlideJob, int]] = deque((j, 1) for j in todo)
    pending: dict[Any, tuple[int, SlideJob, int]] = {}
    started: dict[Any, float] = {}  # monotonic time each pending slide was handed to its actor
    limit = float(opts.slide_timeout or 0)
    timeouts: list[dict[str, Any]] = []
    idle = deque(pool.alive())
    retries: list[dict[str, Any]] = []
    n_tiles = 0
    bar = tqdm(total=len(todo), desc="slides", unit="slide", disable=opts.quiet or None)

    def submit(i: int, job: SlideJob, attempt: int) -> None:
        slot = pool.slots[i]
        assert slot is not None
        ref = slot.actor.process.remote(job, attempt)
        pending[ref] = (i, job, attempt)
        started[ref] = time.monotonic()

    def give_up(i: int | None, job: SlideJob, reason: str) -> None:
        slot = pool.slots[i] if i is not None else None
        if slot is not None:
            try:
                ray.get(slot.actor.record_failure.remote(job, reason), timeout=WORKER_START_TIMEOUT_S)
                return
            except Exception as exc:  # noqa: BLE001 - fall back to the driver's minimal record
                log.warning("%s: worker could not record the failure (%s)", job.slide_id, _one_line(exc))
        _driver_failed_result(job, opts.out_dir, reason)

    try:
        while queue or pending:
            while idle and queue:
                job, attempt = queue.popleft()
                submit(idle.popleft(), job, attempt)
            if not pending:
                break  # slides left but no worker alive
            done, _ = ray.wait(list(pending), num_returns=1, timeout=TIMEOUT_POLL_S if limit > 0 else None)
            if not done:
                now = time.monotonic()
                for ref in [r for r in pending if now - started[r] > limit]:
                    i, job, attempt = pending.pop(ref)
                    started.pop(ref)
                    timeouts.append(_abandon(pool, i, job, limit, opts.out_dir))
                    replaced = pool.slots[i] is not None
                    give_up(i if replaced else next(iter(pool.alive()), None), job, timeouts[-1]["error"])
                    bar.update(1)
                    if replaced:
                        idle.append(i)
                continue
            ref = done[0]
            started.pop(ref, None)
            i, job, attempt = pending.pop(ref)
            try:
                result = parse_result(ray.get(ref), source=f"{job.slide_id}: worker result")
            except ray.exceptions.RayError as exc:
                slot = pool.slots[i]
                who = f"pid {slot.identity['pid']} on {slot.identity['host']}" if slot is not None else "unknown worker"
                died = isinstance(exc, ray.exceptions.RayActorError)
                what = "worker died" if died else "worker error"
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
                # a fresh actor for this slot (the dead one is gone; an erroring one is not trusted)
                replaced = pool.replace(i)
                if attempt < MAX_ATTEMPTS and replaced:
                    submit(i, job, attempt + 1)  # the retry runs on the fresh actor
                    continue
                if attempt < MAX_ATTEMPTS:
                    queue.appendleft((job, attempt + 1))  # no fresh actor here: any remaining worker takes it
                else:
                    give_up(
                        i if replaced else next(iter(pool.alive()), None),
                        job,
                        f"{what}: gave up after {MAX_ATTEMPTS} attempts ({who}): {_one_line(exc, 200)}",
                    )
                    bar.update(1)
                if replaced:
                    idle.append(i)
                continue
            n_tiles += result.n_tiles
            log.info("%s: %s", job.slide_id, result.describe())
            bar.set_postfix_str(job.slide_id[:30])
            bar.update(1)
            idle.append(i)
    finally:
        bar.close()
    lost = [j for j, _ in queue]
    return retries, n_tiles, lost, timeouts


def _abandon(pool: WorkerPool, i: int, job: SlideJob, limit: float, out_dir: Path) -> dict[str, Any]:
    """``job`` passed the time limit on slot ``i``: kill that actor, start a fresh one; the timeout's record."""
    slot = pool.slots[i]
    stage = read_stage_file(out_dir, job.slide_id) or "an unknown stage"
    error = f"{job.path}: {timeout_message(limit, stage)}"
    log.warning("%s: %s", job.slide_id, error)
    record = {"slide_id": job.slide_id, "stage": stage, "error": error}
    if slot is not None:
        record.update(worker_pid=slot.identity["pid"], worker_host=slot.identity["host"])
    pool.replace(i)
    clear_stage_file(out_dir, job.slide_id)
    return record
