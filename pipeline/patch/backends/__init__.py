"""Inference backends for the patch model, chosen by flag/config (never by environment at import).

* ``torch-fp32``: eager fp32, contiguous memory: the reference every other backend is checked against.
* ``torch-bf16``: channels_last + bf16 autocast (CPUs with native bf16, CUDA; fp16 on CUDA GPUs
  without bf16).
* ``torch-bf16-compile``: that model compiled by ``torch.compile`` (TorchInductor, frozen weights)
  once per process; never chosen by ``auto`` (seconds to compile, needs a C++ compiler or Triton).
* ``onnx-fp32``: the model exported to ONNX, run by ONNX Runtime (CPU, or CUDA when onnxruntime has it).
* ``onnx-int8``: that export statically quantised to int8 (QDQ, per-channel), calibrated on tiles.
* ``auto``: the fastest backend shown to agree with ``torch-fp32`` for this bundle here: by the
  bundle's agreement record, or else by a check in this environment (:mod:`.verify`, cached);
  otherwise ``torch-fp32`` with the reason (:func:`resolve_backend`).

Every runner takes uint8 tiles ``(B, H, W, 3)`` (numpy) and returns ``(probs (B, C) float32,
embeddings (B, D) float32)``, normalising with the bundle contract's mean/std, and has a
``device`` attribute. Modules: :mod:`.torch_runner`, :mod:`.onnx_runner`, :mod:`.int8`,
:mod:`.record` (the agreement record), :mod:`.verify` (the check per environment), :mod:`.cache`;
the record's CLI is :mod:`pipeline.evaluation.agreement`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.core.errors import ConfigError
from pipeline.patch.backends.record import has_entries_for, record_for, runtime_versions, verdict

if TYPE_CHECKING:
    import numpy as np
    import torch

    from pipeline.patch.backends.verify import SlideScorer

log = logging.getLogger(__name__)

REFERENCE = "torch-fp32"
CONCRETE_BACKENDS = ("torch-fp32", "torch-bf16", "torch-bf16-compile", "onnx-fp32", "onnx-int8")
BACKENDS = ("auto", *CONCRETE_BACKENDS)
BACKEND_HELP = (
    "auto (fastest backend that passed the bundle's agreement check, or a check in this environment "
    "on first use (cached); else torch-fp32) | torch-fp32 (reference) | torch-bf16 "
    "(channels_last + bf16 autocast) | torch-bf16-compile (torch-bf16 compiled by torch.compile at start-up, "
    "for long runs; never chosen by auto) | onnx-fp32 (ONNX Runtime) | onnx-int8 (ONNX Runtime, static int8)"
)

#: ``auto`` tries these in order (fastest first) and takes the first the agreement record allows.
PREFERENCE = {"cpu": ("onnx-int8", "torch-bf16", "onnx-fp32"), "cuda": ("torch-bf16", "onnx-fp32")}


#: Tiles per model batch when none is given, by device type. On the 2-core CPU, batches of 64
#: made the peak RSS of a slide 4x larger in area 8-19 % above that of a small slide (the heap
#: that the model's larger activations are freed into fragments with the number of batches),
#: 32 kept it at 4-8 % for ~10 % less throughput with torch-bf16 (ONNX Runtime: the same speed).
#: GPUs keep the earlier default (not measured here: no GPU was lent).
DEFAULT_BATCH_SIZE = {"cpu": 32, "cuda": 64}


def default_batch_size(device) -> int:
    """:data:`DEFAULT_BATCH_SIZE` for ``device`` (a ``torch.device``); 32 for other device types."""
    return DEFAULT_BATCH_SIZE.get(getattr(device, "type", "cpu"), 32)


class Runner(Protocol):
    """What the pipeline needs from a backend."""

    device: torch.device

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Resolution:
    """The backend a request resolved to, and why.

    ``basis``: ``requested`` | ``agreement record`` | ``verified here`` | ``fallback``.
    """

    backend: str
    reason: str
    basis: str = "requested"


def check_backend_name(backend: str) -> None:
    """One-line ConfigError for a name that is not in :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run here (one line), or None when it can."""
    from pipeline.patch.backends.onnx_runner import onnxruntime_available
    from pipeline.patch.backends.torch_runner import (
        BF16_UNAVAILABLE,
        COMPILED,
        bf16_available,
        compile_unavailable_reason,
    )

    if backend == "torch-bf16" and not bf16_available(device):
        return BF16_UNAVAILABLE
    if backend == COMPILED:
        return compile_unavailable_reason(device)
    if backend.startswith("onnx") and not onnxruntime_available():
        return (
            f"backend {backend} needs onnxruntime and onnx: pip install -e '.[onnx]' "
            "(or choose --backend torch-fp32 / torch-bf16)"
        )
    return None


def resolve_backend(
    bundle,
    device: torch.device,
    backend: str = "auto",
    precision: str = "auto",
    scorer: SlideScorer | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> Resolution:
    """Turn a requested backend (maybe ``auto``) into a concrete one for ``bundle`` on ``device``.

    ``auto``, among the backends of :data:`PREFERENCE` that can run here:

    1. those the bundle's agreement record passed for this device type and these runtime
       versions: the fastest measured on this machine, else the first in preference order;
    2. else (no record for these weights, or its entries are for other runtime versions) those
       verified for this environment (:mod:`.verify`: the record's rule on fixed synthetic slides,
       with ``scorer``, the bundle's slide model; cached per environment), the fastest measured
       here, when it is faster than ``torch-fp32``;
    3. else ``torch-fp32``, with the reason; a WARNING naming the fix where the hardware has
       bf16 (a fast backend was possible), INFO elsewhere.

    A backend the record failed with the same runtime is never re-checked. ``precision="fp32"``
    forces ``torch-fp32``. An explicit backend is always used if it can run here (a warning when
    the record says it failed). Raises ConfigError (one line) for an unknown name or a backend
    that cannot run here.
    """
    check_backend_name(backend)
    record = record_for(Path(bundle.path), bundle.weights_sha256)
    dtype = device.type if device.type in PREFERENCE else "cpu"
    if backend != "auto":
        why = unavailable_reason(backend, device)
        if why:
            raise ConfigError(why)
        if backend != REFERENCE:
            v = verdict(record, backend, dtype)
            if v.passed is False:
                log.warning("using %s as requested, although %s", backend, v.detail)
            elif v.passed is None:
                log.info("%s: not verified against torch-fp32 for this bundle (%s)", backend, v.detail)
        return Resolution(backend, "chosen with --backend", "requested")
    if precision == "fp32":
        return Resolution(REFERENCE, "precision fp32 requested", "requested")
    allowed: list[tuple[str, str]] = []
    unverified: list[str] = []
    for cand in PREFERENCE[dtype]:
        if unavailable_reason(cand, device):
            continue
        v = verdict(record, cand, dtype)
        if v.passed:
            allowed.append((cand, v.detail))
        elif v.passed is False:
            log.info("auto: not %s (%s)", cand, v.detail)
        else:
            unverified.append(cand)
    if allowed:
        speeds = measured_speeds(record, device)
        if speeds:  # the record was measured on this machine: fastest measured first
            allowed.sort(key=lambda cv: -speeds.get(cv[0], 0.0))
        cand, detail = allowed[0]
        return Resolution(
            cand,
            detail + (f"; fastest here ({speeds.get(cand, 0):.0f} tiles/s measured)" if speeds else ""),
            "agreement record",
        )
    why_record = _record_gap(record, dtype, unverified)
    if not unverified:
        reason = f"no faster backend can run here or passed the agreement check ({why_record})"
    elif scorer is None:
        reason = f"{why_record}; not verified here (no slide model given to check {', '.join(unverified)} with)"
    else:
        from pipeline.patch.backends.verify import verify_backends

        entries, cached = verify_backends(bundle, device, unverified, scorer, cache_dir, batch_size)
        picked = _fastest_verified(entries, unverified)
        if picked is not None:
            e = entries[picked]
            return Resolution(
                picked,
                f"{why_record}; {picked} verified for this environment {'earlier (cached)' if cached else 'now'}: "
                f"band agreement {e['band_agreement']}, AUROC diff {e['auroc_diff']}, max |tile p diff| "
                f"{e['tile_prob_abs_diff_max']} on {e['n_slides']} synthetic slides; "
                f"{e['model_tiles_per_s']:.0f} tiles/s vs torch-fp32 {entries[REFERENCE]['model_tiles_per_s']:.0f}",
                "verified here",
            )
        failed = [f"{c}: {'; '.join(entries[c].get('reasons') or ['slower than torch-fp32'])}" for c in unverified]
        reason = f"{why_record}; verification here: {' | '.join(failed)}"
    return _fallback(device, reason)


def _record_gap(record: dict | None, dtype: str, unverified: list[str]) -> str:
    """Why the agreement record did not decide (one clause)."""
    if record is None:
        return "no agreement record for these weights"
    if not unverified:
        return f"agreement record on {dtype}"
    if not has_entries_for(record, dtype):
        return f"agreement record has no entries for {dtype}"
    runtimes = {k: v for k, v in (record.get("versions") or {}).items() if v}
    here = {k: v for k, v in runtime_versions().items() if v}
    return f"agreement record is for {runtimes or 'other runtimes'}, this environment has {here}"


def _fastest_verified(entries: dict[str, dict], candidates: list[str]) -> str | None:
    """The passing candidate with the most tiles/s, if it beats the reference's measured speed."""
    ref = float(entries.get(REFERENCE, {}).get("model_tiles_per_s") or 0.0)
    ok = [
        (float(entries[c].get("model_tiles_per_s") or 0.0), c) for c in candidates if entries.get(c, {}).get("passed")
    ]
    ok = [(s, c) for s, c in ok if s > ref]
    return max(ok)[1] if ok else None


def _fallback(device: torch.device, reason: str) -> Resolution:
    """``torch-fp32`` with ``reason``: a WARNING with the fix where a bf16 backend could have run, else INFO."""
    if unavailable_reason("torch-bf16", device) is None:
        log.warning(
            "backend auto -> torch-fp32, the slow reference, on hardware with bf16: %s. Fix: install the "
            "locked runtime (make install), or check the backends for this bundle "
            "(python -m pipeline.evaluation.agreement --write), or choose --backend torch-bf16 explicitly",
            reason,
        )
    else:
        log.info("backend auto -> torch-fp32: %s", reason)
    return Resolution(REFERENCE, reason, "fallback")


def measured_speeds(record: dict | None, device: torch.device) -> dict[str, float]:
    """Model tiles/s per backend from ``record`` when it was measured on this machine (same CPU/GPU), else {}."""
    from pipeline.patch.backends.record import machine_id

    if not record:
        return {}
    here = machine_id(device)
    return {
        name: float(e["model_tiles_per_s"])
        for name, e in record["backends"].items()
        if isinstance(e, dict) and e.get("machine_id") == here and isinstance(e.get("model_tiles_per_s"), (int, float))
    }


def build_runner(
    bundle,
    device: torch.device,
    name: str,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> Runner:
    """A runner of the concrete backend ``name`` (no resolution, no checks; see :func:`make_runner`)."""
    if name in ("torch-fp32", "torch-bf16", "torch-bf16-compile"):
        from pipeline.patch.backends.torch_runner import make_torch_runner

        if batch_size is None:
            batch_size = default_batch_size(device)
        return make_torch_runner(bundle, device, name, precision, batch_size)
    if name == "onnx-fp32":
        from pipeline.patch.backends.onnx_runner import OnnxRunner, ensure_fp32_onnx

        return OnnxRunner(ensure_fp32_onnx(bundle, cache_dir), device)
    from pipeline.patch.backends.int8 import ensure_int8_onnx
    from pipeline.patch.backends.onnx_runner import OnnxRunner

    return OnnxRunner(ensure_int8_onnx(bundle, cache_dir), device)


def make_backend(
    bundle,
    device: torch.device,
    precision: str = "auto",
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    scorer: SlideScorer | None = None,
) -> tuple[Runner, Resolution]:
    """A runner for ``bundle``'s patch model and the :class:`Resolution` (backend, why) behind it.

    Args:
        bundle: a :class:`models.bundle.LoadedBundle` (its model is copied, never modified).
        device: where to run (``torch.device``).
        precision: ``auto`` or an explicit autocast precision for ``torch-bf16``.
        backend: a name of :data:`BACKENDS`.
        cache_dir: where ONNX exports, int8 models and verdicts are cached (default
            :func:`pipeline.patch.backends.cache.default_cache_dir`).
        batch_size: tiles per call the caller will use (``torch-bf16-compile`` compiles for it;
            default: :func:`default_batch_size` of ``device``).
        scorer: the bundle's slide model; lets ``auto`` verify fast backends for this environment
            when the agreement record does not cover it (:func:`resolve_backend`).
    Raises:
        ConfigError: unknown backend, onnxruntime missing, bf16 requested on a CPU without bf16,
            ``torch-bf16-compile`` without its compiler or failing to compile.
    """
    res = resolve_backend(bundle, device, backend, precision, scorer, cache_dir, batch_size)
    runner = build_runner(bundle, device, res.backend, precision, cache_dir, batch_size)
    log.info("patch model backend: %s on %s (%s)", res.backend, runner.device, res.reason)
    return runner, res


def make_runner(
    bundle,
    device: torch.device,
    precision: str = "auto",
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    scorer: SlideScorer | None = None,
) -> tuple[Runner, str]:
    """:func:`make_backend` returning (runner, resolved backend name)."""
    runner, res = make_backend(bundle, device, precision, backend, cache_dir, batch_size, scorer)
    return runner, res.backend


__all__ = [
    "BACKENDS",
    "BACKEND_HELP",
    "CONCRETE_BACKENDS",
    "PREFERENCE",
    "REFERENCE",
    "Resolution",
    "Runner",
    "build_runner",
    "check_backend_name",
    "make_backend",
    "make_runner",
    "resolve_backend",
    "unavailable_reason",
]
