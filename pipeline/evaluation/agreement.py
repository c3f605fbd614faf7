"""Agreement of each backend with torch-fp32 on labelled slides, and the record ``auto`` relies on.

    python -m pipeline.evaluation.agreement --bundle models/demo_bundle --slides DIR
        [--backends torch-bf16,onnx-fp32,onnx-int8] [--write] [--device auto] [--batch-size N]

``DIR`` holds ``labels.csv`` (``slide_id``, ``nme_pattern`` columns) and ``slides/`` — e.g. a
synthetic set from ``python -m pipeline.synthetic --out DIR --n 20 --seed 909``. Each slide is
opened, tiled and read once, as :mod:`pipeline.evaluation.evaluate` does (same helpers); every tile batch
is fed to torch-fp32 and to each backend, and each backend's tile outputs go through the
bundle's aggregator and calibration. Per backend, against torch-fp32:

* max and mean |tile-probability difference| per class, max/mean |embedding difference|;
* max and mean |slide-probability difference|;
* band agreement: fraction of slides in the same LOW/INDETERMINATE/HIGH band;
* slide AUROC (NME vs not, ``nme_pattern``) of the backend and of torch-fp32;
* ``passed``: band agreement >= 0.99 and |AUROC - fp32 AUROC| <= 0.01
  (:mod:`pipeline.patch.backends.record`); model tiles/s on this machine (for information and for
  ``auto``'s choice among passing backends on the same machine), measured after the slides on
  fixed batches of ``--batch-size`` tiles with every runner warmed up and the runners
  interleaved (:func:`pipeline.patch.backends.speed.model_speeds`), in a process whose allocator is set
  as ``infer.py`` sets it (:func:`pipeline.core.runtime.keep_freed_memory`).

Prints the record as one JSON line; ``--write`` also stores it as ``<bundle>/agreement.json``
(atomically, keeping entries of backends not checked now when the weights match).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError, DataError
from pipeline.patch.backends import CONCRETE_BACKENDS, REFERENCE, Runner, check_backend_name, make_runner
from pipeline.patch.backends.record import (
    MAX_AUROC_DIFF,
    MIN_BAND_AGREEMENT,
    RECORD_FORMAT,
    judge,
    machine_id,
    read_record,
    runtime_of,
    runtime_versions,
    write_record,
)
from pipeline.patch.backends.speed import model_speeds, random_tiles

log = logging.getLogger(__name__)


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures (monotonic, so a mean never rounds above its max)."""
    return float(f"{float(x):.{digits}g}")


DEFAULT_BACKENDS = ("torch-bf16", "onnx-fp32", "onnx-int8")


class FanOutRunner:
    """Feeds every uint8 batch to several runners; returns the reference's outputs, keeps the others'.

    :meth:`take` returns and clears the outputs collected since the last call,
    ``{name: (probs (N, C), embeddings (N, D))}``.
    """

    def __init__(self, runners: dict[str, Runner], reference: str) -> None:
        self.runners, self.reference = runners, reference
        self.device = runners[reference].device
        self.tiles = 0
        self._out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in runners}

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        for name, runner in self.runners.items():
            self._out[name].append(runner(tiles))
        self.tiles += len(tiles)
        return self._out[self.reference][-1]

    def take(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        res = {}
        for name, parts in self._out.items():
            if parts:
                res[name] = (np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts]))
            self._out[name] = []
        return res


@dataclasses.dataclass
class _Tally:
    """Running |difference| statistics of one backend against the reference."""

    classes: list[str]
    tile_max: np.ndarray | None = None
    tile_sum: np.ndarray | None = None
    emb_max: float = 0.0
    emb_sum: float = 0.0
    emb_n: int = 0
    n_tiles: int = 0
    slide_p: list[float] = dataclasses.field(default_factory=list)
    bands: list[str] = dataclasses.field(default_factory=list)

    def add_tiles(self, probs: np.ndarray, ref: np.ndarray, emb: np.ndarray, ref_emb: np.ndarray) -> None:
        d = np.abs(probs.astype(np.float64) - ref.astype(np.float64))
        if self.tile_max is None:
            self.tile_max, self.tile_sum = np.zeros(d.shape[1]), np.zeros(d.shape[1])
        if len(d):
            self.tile_max = np.maximum(self.tile_max, d.max(axis=0))
            self.tile_sum += d.sum(axis=0)
            de = np.abs(emb.astype(np.float64) - ref_emb.astype(np.float64))
            self.emb_max = max(self.emb_max, float(de.max()))
            self.emb_sum += float(de.sum())
            self.emb_n += de.size
        self.n_tiles += len(d)

    def tile_summary(self) -> dict[str, dict[str, float]]:
        n = max(self.n_tiles, 1)
        zeros = np.zeros(len(self.classes))
        tmax = self.tile_max if self.tile_max is not None else zeros
        tsum = self.tile_sum if self.tile_sum is not None else zeros
        return {c: {"max": _sig(tmax[i]), "mean": _sig(float(tsum[i]) / n)} for i, c in enumerate(self.classes)}


def _auroc(p: list[float], y: list[int]) -> float | None:
    from pipeline.evaluation.metrics import auroc

    return auroc(np.asarray(p), np.asarray(y)) if 0 < sum(y) < len(y) else None


def check_agreement(
    bundle_dir: Path,
    slides_root: Path,
    backends: list[str],
    device: str = "auto",
    batch_size: int | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Measure each of ``backends`` against torch-fp32 on the labelled slides under ``slides_root``.

    Returns the agreement record (see the module docstring); writes nothing.
    Raises ConfigError/DataError (one line) for bad names, a missing slide table or no usable slides.
    """
    from models.bundle import load_bundle
    from pipeline.analysis import SlideAnalyser
    from pipeline.core.runtime import cpu_description, keep_freed_memory, resolve_device
    from pipeline.slide_model.aggregation import SlidePredictor
    from pipeline.training.config import DataConfig
    from pipeline.training.data import load_slide_table

    for b in backends:
        check_backend_name(b)
        if b == "auto":
            raise ConfigError("--backends: name concrete backends, not auto")
    backends = [b for b in dict.fromkeys(backends) if b != REFERENCE]
    if not (slides_root / "labels.csv").is_file():
        raise DataError(
            f"{slides_root}: no labels.csv; make a labelled synthetic set with "
            f"python -m pipeline.synthetic --out {slides_root} --n 20 --seed 909"
        )
    dev = resolve_device(device)
    keep_freed_memory()  # as infer.py runs: the speeds below are the ones a batch run gets
    if batch_size is None:
        from pipeline.patch.backends import default_batch_size

        batch_size = default_batch_size(dev)
    bundle = load_bundle(bundle_dir, device="cpu")
    predictor = SlidePredictor.from_bundle(bundle.contract, bundle.extra)
    classes = list(bundle.contract.architecture.classes)
    inp = bundle.contract.input
    runners: dict[str, Runner] = {REFERENCE: make_runner(bundle, dev, backend=REFERENCE, cache_dir=cache_dir)[0]}
    for b in backends:
        runners[b] = make_runner(bundle, dev, backend=b, cache_dir=cache_dir, batch_size=batch_size)[0]
    fan = FanOutRunner(runners, REFERENCE)
    analyser = SlideAnalyser.for_bundle(bundle.contract, fan, None, batch_size=batch_size)
    slides_root = Path(slides_root).resolve()  # relative to the working directory
    records = load_slide_table(DataConfig(root=slides_root), slides_root, require_annotations=False)
    tallies = {b: _Tally(classes) for b in backends}
    ref_p: list[float] = []
    ref_bands: list[str] = []
    labels: list[int] = []
    for r in records:
        feats = analyser.analyse(r.path, r.mpp, r.slide_id).features
        outs = fan.take()
        if not len(feats):
            log.warning("%s: no tissue tiles; left out", r.slide_id)
            continue
        ref = predictor.predict(feats)
        ref_p.append(ref.probability)
        ref_bands.append(ref.band)
        labels.append(int(r.flags.get("nme_pattern", 0)))
        for b in backends:
            probs, emb = outs[b]
            tallies[b].add_tiles(probs, feats.probs, emb, feats.embeddings)
            pred = predictor.predict(dataclasses.replace(feats, probs=probs, embeddings=emb))
            tallies[b].slide_p.append(pred.probability)
            tallies[b].bands.append(pred.band)
        log.info("%s: %d tiles, fp32 p=%.4f %s", r.slide_id, len(feats), ref.probability, ref.band)
    if not labels:
        raise DataError(f"{slides_root}: no slide with tissue tiles")
    ref_auroc = _auroc(ref_p, labels)
    speeds = model_speeds(runners, random_tiles(batch_size, inp.tile_size_px))
    versions = runtime_versions()
    mid = machine_id(dev)
    data = {
        "slides": str(slides_root),
        "n_slides": len(labels),
        "n_positive": int(sum(labels)),
        "n_tiles": fan.tiles,
        "label_column": "nme_pattern",
        "batch_size": batch_size,
    }
    dtype = dev.type
    entries: dict[str, Any] = {}
    for b in backends:
        t = tallies[b]
        dp = np.abs(np.asarray(t.slide_p) - np.asarray(ref_p))
        agree = float(np.mean([a == c for a, c in zip(t.bands, ref_bands)]))
        au = _auroc(t.slide_p, labels)
        passed, reasons = judge(agree, au, ref_auroc)
        entries[b] = {
            "passed": passed,
            "reasons": reasons,
            "device_type": dtype,
            "runtime": runtime_of(b, versions),
            "band_agreement": round(agree, 6),
            "slide_auroc": None if au is None else round(au, 6),
            "auroc_diff": None if au is None or ref_auroc is None else round(abs(au - ref_auroc), 6),
            "slide_prob_abs_diff": {"max": _sig(dp.max()), "mean": _sig(dp.mean())},
            "tile_prob_abs_diff": t.tile_summary(),
            "embedding_abs_diff": {"max": _sig(t.emb_max), "mean": _sig(t.emb_sum / max(t.emb_n, 1))},
            "model_tiles_per_s": round(speeds[b], 1),
            "machine_id": mid,
            "data": data,
        }
    return {
        "format": RECORD_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "bundle": {
            "path": str(bundle_dir),
            "name": bundle.contract.name,
            "version": bundle.contract.version,
            "weights_sha256": bundle.weights_sha256,
            "bundle_sha256": bundle.sha256,
        },
        "reference": REFERENCE,
        "rule": {"min_band_agreement": MIN_BAND_AGREEMENT, "max_auroc_diff": MAX_AUROC_DIFF},
        "data": data,
        "machine": {"cpu": cpu_description(), "device": str(dev), "machine_id": mid},
        "versions": versions,
        "reference_result": {
            "slide_auroc": None if ref_auroc is None else round(ref_auroc, 6),
            "model_tiles_per_s": round(speeds[REFERENCE], 1),
            "bands": {k: ref_bands.count(k) for k in ("LOW", "INDETERMINATE", "HIGH")},
        },
        "backends": entries,
    }


def merge_into_existing(bundle_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` plus the entries of an existing record for the same weights that were not re-checked."""
    old = read_record(bundle_dir)
    if not old or (old.get("bundle") or {}).get("weights_sha256") != record["bundle"]["weights_sha256"]:
        return record
    merged = dict(record)
    merged["backends"] = {
        **{k: v for k, v in old["backends"].items() if k not in record["backends"]},
        **record["backends"],
    }
    return merged


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.cli import setup_logging

    ap = argparse.ArgumentParser(
        prog="python -m pipeline.evaluation.agreement",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    ap.add_argument("--slides", type=Path, required=True, help="folder with labels.csv and slides/")
    ap.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"comma-separated, compared with {REFERENCE} (default {','.join(DEFAULT_BACKENDS)}; "
        f"choices {', '.join(b for b in CONCRETE_BACKENDS if b != REFERENCE)})",
    )
    ap.add_argument("--write", action="store_true", help="store the record as <bundle>/agreement.json")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per batch, also for the speeds (default: infer.py's for the device, CPU 32, GPU 64)",
    )
    ap.add_argument(
        "--cache-dir", type=Path, default=None, help="ONNX/int8 model cache (default ~/.cache/nme-pipeline)"
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(quiet=args.quiet)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not names:
        raise ConfigError("--backends: name at least one backend")
    record = check_agreement(
        args.bundle, args.slides, names, device=args.device, batch_size=args.batch_size, cache_dir=args.cache_dir
    )
    if args.write:
        path = write_record(args.bundle, merge_into_existing(args.bundle, record))
        log.info("wrote %s", path)
    for name, e in record["backends"].items():
        log.info(
            "%s: %s (band agreement %.3f, AUROC %s vs fp32 %s, max |slide p diff| %.4f)",
            name,
            "PASSED" if e["passed"] else "FAILED: " + "; ".join(e["reasons"]),
            e["band_agreement"],
            e["slide_auroc"],
            record["reference_result"]["slide_auroc"],
            e["slide_prob_abs_diff"]["max"],
        )
    sys.stdout.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    from pipeline.core.cli import run_cli

    run_cli(main)
