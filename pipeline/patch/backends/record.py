"""The agreement record ``<bundle>/agreement.json``: which backends match torch-fp32 for this bundle.

Written by ``python -m pipeline.evaluation.agreement --write`` and shipped with the bundle. A
record applies to a bundle when its ``bundle.weights_sha256`` equals the bundle's (retrained
weights make it stale). Per backend it holds the measured agreement and ``passed``:

* band agreement (fraction of slides in the same LOW/INDETERMINATE/HIGH band as torch-fp32)
  >= :data:`MIN_BAND_AGREEMENT`, and
* ``|slide AUROC - torch-fp32 slide AUROC| <=`` :data:`MAX_AUROC_DIFF`.

A backend's entry counts for a run only on the same device type (``cpu``/``cuda``) and the same
runtime version it was measured with (onnxruntime version for ONNX backends, torch major.minor
for torch backends): a new runtime is a new, unverified backend.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_write_json

log = logging.getLogger(__name__)

AGREEMENT_FILE = "agreement.json"
RECORD_FORMAT = 1
MIN_BAND_AGREEMENT = 0.99
MAX_AUROC_DIFF = 0.01


def runtime_versions() -> dict[str, str | None]:
    """Installed torch and onnxruntime versions (``None`` for a missing onnxruntime)."""
    import torch

    try:
        import onnxruntime

        ort = str(onnxruntime.__version__)
    except ImportError:
        ort = None
    return {"torch": str(torch.__version__), "onnxruntime": ort}


def runtime_of(backend: str, versions: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """The runtime versions a backend's numbers depend on (what an agreement entry must match)."""
    v = versions or runtime_versions()
    if backend.startswith("onnx"):
        return {"onnxruntime": v.get("onnxruntime")}
    torch_v = v.get("torch") or ""
    return {"torch": ".".join(torch_v.split("+")[0].split(".")[:2])}


def machine_id(device) -> str:
    """What the measured speeds of a record depend on: CPU model and cores, torch threads, GPU name."""
    import torch

    from pipeline.core.runtime import cpu_description

    gpu = torch.cuda.get_device_name(device) if getattr(device, "type", "cpu") == "cuda" else "no GPU"
    return f"{cpu_description()}; {torch.get_num_threads()} torch threads; {gpu}"


def judge(band_agreement: float, auroc: float | None, reference_auroc: float | None) -> tuple[bool, list[str]]:
    """(passed, reasons it failed) for one backend under the rule in the module docstring."""
    reasons = []
    if band_agreement < MIN_BAND_AGREEMENT:
        reasons.append(f"band agreement {band_agreement:.3f} < {MIN_BAND_AGREEMENT}")
    if auroc is None or reference_auroc is None:
        reasons.append("slide AUROC undefined (labels need both NME and non-NME slides)")
    elif abs(auroc - reference_auroc) > MAX_AUROC_DIFF + 1e-12:
        reasons.append(f"|slide AUROC {auroc:.4f} - fp32 {reference_auroc:.4f}| > {MAX_AUROC_DIFF}")
    return not reasons, reasons


@dataclass(frozen=True)
class Verdict:
    """What a record says about one backend here: ``passed`` True/False, or None (no applicable entry)."""

    passed: bool | None
    detail: str


def read_record(bundle_dir: Path) -> dict[str, Any] | None:
    """The parsed ``agreement.json`` of a bundle, or None when absent or unreadable (logged)."""
    path = Path(bundle_dir) / AGREEMENT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable agreement record (%s); treating the bundle as unverified", path, exc)
        return None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(data.get("backends"), dict):
        log.warning("%s: not an agreement record of format %d; treating the bundle as unverified", path, RECORD_FORMAT)
        return None
    return data


def record_for(bundle_dir: Path, weights_sha256: str) -> dict[str, Any] | None:
    """The bundle's record if it was made for these weights; None otherwise (a stale record is logged)."""
    data = read_record(bundle_dir)
    if data is None:
        return None
    have = (data.get("bundle") or {}).get("weights_sha256")
    if have != weights_sha256:
        log.warning(
            "%s: agreement record is for other weights (%s..., bundle has %s...); ignoring it",
            Path(bundle_dir) / AGREEMENT_FILE,
            str(have)[:12],
            weights_sha256[:12],
        )
        return None
    return data


def verdict(
    record: dict[str, Any] | None, backend: str, device_type: str, versions: dict[str, str | None] | None = None
) -> Verdict:
    """Whether ``record`` lets ``backend`` be the default on ``device_type`` with these runtime versions."""
    if record is None:
        return Verdict(None, "no agreement record for this bundle")
    entry = record["backends"].get(backend)
    if not isinstance(entry, dict):
        return Verdict(None, f"{backend} not in the agreement record")
    if entry.get("device_type") != device_type:
        return Verdict(None, f"{backend} was checked on {entry.get('device_type')}, not {device_type}")
    want = runtime_of(backend, versions)
    if entry.get("runtime") != want:
        return Verdict(None, f"{backend} was checked with {entry.get('runtime')}, this is {want}")
    if entry.get("passed") is True:
        return Verdict(
            True,
            f"{backend} passed the agreement check (band agreement {entry.get('band_agreement')}, "
            f"AUROC diff {entry.get('auroc_diff')})",
        )
    return Verdict(False, f"{backend} failed the agreement check: {'; '.join(entry.get('reasons') or ['failed'])}")


def has_entries_for(record: dict[str, Any] | None, device_type: str) -> bool:
    """True when ``record`` holds at least one backend measured on ``device_type``."""
    return record is not None and any(
        isinstance(e, dict) and e.get("device_type") == device_type for e in record["backends"].values()
    )


def write_record(bundle_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``<bundle_dir>/agreement.json`` atomically; returns the path."""
    return atomic_write_json(Path(bundle_dir) / AGREEMENT_FILE, record)
