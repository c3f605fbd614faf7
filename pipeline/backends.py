"""Inference backends for the patch model, chosen by flag/config (never by environment at import).

* ``torch-fp32``: eager fp32, the reference.
* ``torch-bf16``: channels_last + bf16 autocast (default on CPUs with native bf16 and on CUDA).
* ``auto``: ``torch-bf16`` where the hardware supports bf16, else ``torch-fp32``.

On CUDA the batch is copied as uint8 (pinned memory) and normalised on the GPU.
"""

from __future__ import annotations

import logging

from pipeline.errors import ConfigError
from pipeline.features import PatchRunner
from pipeline.runtime import resolve_precision

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch-fp32", "torch-bf16")


def make_runner(bundle, device, precision: str = "auto", backend: str = "auto") -> tuple[PatchRunner, str]:
    """A runner for ``bundle``'s patch model; returns (runner, resolved backend name)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    norm = bundle.contract.input.normalisation
    if backend == "auto":
        backend = "torch-bf16" if resolve_precision(device, precision) in ("bf16", "fp16") else "torch-fp32"
    if backend == "torch-fp32":
        runner = PatchRunner(bundle.model, norm.mean, norm.std, device, "fp32", channels_last=False)
    else:
        prec = resolve_precision(device, "auto" if precision == "auto" else precision)
        if prec == "fp32":
            prec = "bf16"
        runner = PatchRunner(bundle.model, norm.mean, norm.std, device, prec, channels_last=True)
    log.info("patch model backend: %s on %s", backend, device)
    return runner, backend
