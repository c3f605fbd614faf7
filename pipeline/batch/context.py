"""What every slide of a batch needs, built once per process (local engine) or Ray actor.

:class:`InferenceContext` holds the loaded bundle, the :class:`~pipeline.analysis.SlideAnalyser`
that runs the per-slide steps, the rules and clinical context, and the output options;
:class:`StageThreads` the two background threads of overlapped slide stages.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.bundle import LoadedBundle, load_bundle
from pipeline.analysis import SlideAnalyser
from pipeline.batch.discovery import SlideJob
from pipeline.batch.options import HEATMAP_FORMAT, HEATMAP_MPP, BatchOptions
from pipeline.batch.stages import NoTracker, StageTracker
from pipeline.clinical.rules import load_clinical, load_ruleset
from pipeline.core.runtime import HeapReserve, keep_freed_memory, resolve_device
from pipeline.patch.backends import Runner, default_batch_size, make_backend
from pipeline.patch.reader import lower_thread_priority
from pipeline.result import ProducedBy, ResultModel
from pipeline.slide_model.aggregation import SlidePredictor

log = logging.getLogger(__name__)


class StageThreads:
    """The two background threads of overlapped slide stages (:func:`pipeline.batch.process.process_slides`):
    one prepares the next slide, one writes the previous slide's outputs. Kept for the life of the
    context, so what a thread pays once (OpenCV's first text call in a thread: ~22 ms of CPU)
    is paid once per process, not once per batch. At the lowest CPU priority when the model
    runs on the CPU (they fill the gaps the model leaves instead of pre-empting it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._low_priority = False

    def pools(self, low_priority: bool) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        """(prepare, outputs) single-thread executors, made on first use."""
        with self._lock:
            if self._pools is not None and self._low_priority != low_priority:
                self._shutdown()
            if self._pools is None:
                init = lower_thread_priority if low_priority else None
                self._pools = (
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="nme-prepare", initializer=init),
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="nme-outputs", initializer=init),
                )
                self._low_priority = low_priority
            return self._pools

    def close(self) -> None:
        """Stop the threads (after their current task); they are made again if needed."""
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._pools is not None:
            for pool in self._pools:
                pool.shutdown(wait=True, cancel_futures=True)
            self._pools = None


@dataclass
class InferenceContext:
    """What every slide needs: model, analyser, rules, options. Built once per process/actor."""

    bundle: LoadedBundle
    analyser: SlideAnalyser
    ruleset: Any
    clinical: Any | None
    out_dir: Path
    backend: str = "torch"
    backend_choice: dict[str, str] = field(default_factory=dict)  # name, basis, reason (auto's choice; run.json)
    heatmap_mpp: float = HEATMAP_MPP  # µm/px of heatmaps and report thumbnail (never finer than the tissue thumbnail)
    heatmap_format: str = HEATMAP_FORMAT  # jpeg | png (files heatmap_<name>.jpg | .png)
    engine: str = "local"  # which engine's process this is (recorded in each result)
    heap: HeapReserve = field(default_factory=HeapReserve)  # when freed memory goes back to the OS
    stages: StageThreads = field(default_factory=StageThreads, repr=False, compare=False)  # overlapped stages' threads
    tracker: StageTracker = field(default_factory=NoTracker, repr=False, compare=False)  # told each slide's stage

    @property
    def runner(self) -> Runner:
        return self.analyser.runner

    @property
    def predictor(self) -> SlidePredictor:
        assert self.analyser.predictor is not None
        return self.analyser.predictor

    @property
    def batch_size(self) -> int:
        return self.analyser.batch_size

    @property
    def reader_threads(self) -> int:
        return self.analyser.reader_threads

    def model_info(self) -> ResultModel:
        """The model and backend as each result records them."""
        c = self.bundle.contract
        return ResultModel(
            name=c.name,
            version=c.version,
            sha256=self.bundle.sha256,
            label=c.label,
            backbone=c.architecture.backbone,
            aggregator=c.aggregator.type if c.aggregator else None,
            backend=self.backend,
            batch_size=self.batch_size,
        )

    def produced_by(self) -> ProducedBy:
        """Engine, host, process and (Ray) node that write this context's results."""
        if self.engine != "ray":
            return ProducedBy(engine="local", host=socket.gethostname(), pid=os.getpid())
        return ProducedBy(engine="ray", host=socket.gethostname(), pid=os.getpid(), node_id=ray_node_id())


def ray_node_id() -> str | None:
    """The Ray node id of this process (a Ray worker), None outside Ray."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - informational only
        return None


def build_context(opts: BatchOptions, jobs: list[SlideJob], engine: str = "local") -> InferenceContext:
    """Load model bundle, aggregator, rules and clinical context (errors before any slide)."""
    device = resolve_device(opts.device)
    keep_freed_memory()  # no page faults per batch; memory goes back per slide (pipeline.core.runtime)
    bundle = load_bundle(opts.model, device="cpu")
    predictor = SlidePredictor.from_bundle(bundle.contract, bundle.extra)
    ruleset = load_ruleset()
    clinical = None
    if opts.clinical is not None:
        clinical = load_clinical(opts.clinical, slide_ids={j.slide_id for j in jobs})
    runner, choice = make_backend(
        bundle, device, opts.precision, opts.backend, batch_size=opts.batch_size, scorer=predictor
    )
    analyser = SlideAnalyser.for_bundle(
        bundle.contract,
        runner,
        predictor,
        model_sha256=bundle.sha256,
        batch_size=opts.batch_size or default_batch_size(runner.device),
        reader_threads=max(1, opts.reader_threads),
        cache_dir=opts.out_dir / ".cache",
    )
    return InferenceContext(
        bundle=bundle,
        analyser=analyser,
        ruleset=ruleset,
        clinical=clinical,
        out_dir=opts.out_dir,
        backend=choice.backend,
        backend_choice={"name": choice.backend, "basis": choice.basis, "reason": choice.reason},
        heatmap_mpp=opts.heatmap_mpp,
        heatmap_format=opts.heatmap_format,
        engine=engine,
    )
