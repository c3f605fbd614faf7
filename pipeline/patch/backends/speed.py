"""How fast a patch-model runner is on its own: tiles/s on fixed uint8 batches.

The same measurement serves the agreement record (which ``auto`` reads to pick the fastest
verified backend) and ``benchmarks/throughput.py`` (model-only figure): one batch shape, warm-up
calls not counted (first calls build kernels/primitives), and runners compared in interleaved
rounds so that a slower spell of a shared machine does not fall on one backend only.
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from pipeline.patch.backends import Runner


def random_tiles(batch_size: int, tile_px: int, seed: int = 0) -> np.ndarray:
    """uint8 ``(batch_size, tile_px, tile_px, 3)`` noise tiles (the runners' cost does not depend on content)."""
    return np.random.default_rng(seed).integers(0, 256, (batch_size, tile_px, tile_px, 3), dtype=np.uint8)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads, s."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def time_runner(runner: Runner, batch: np.ndarray, n_batches: int, warmup: int = 1) -> tuple[float, float]:
    """(tiles/s, CPU ms per tile of the whole process) of ``runner`` on ``n_batches`` calls with ``batch``."""
    for _ in range(max(0, warmup)):
        runner(batch)
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    for _ in range(max(1, n_batches)):
        runner(batch)
    n = max(1, n_batches) * len(batch)
    return n / (time.perf_counter() - t0), 1000.0 * (cpu_seconds() - cpu0) / n


def model_speeds(
    runners: dict[str, Runner], batch: np.ndarray, rounds: int = 3, n_batches: int = 4
) -> dict[str, float]:
    """Median tiles/s of each runner over ``rounds`` interleaved rounds of ``n_batches`` calls on ``batch``."""
    runs: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():  # warm-up of every runner before any is timed
        runner(batch)
    for _ in range(max(1, rounds)):
        for name, runner in runners.items():
            runs[name].append(time_runner(runner, batch, n_batches, warmup=0)[0])
    return {name: statistics.median(v) for name, v in runs.items()}
