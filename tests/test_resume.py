"""Resume that reproduces: a real ``train.py`` killed with SIGKILL after a mid-epoch checkpoint, and
again around the end of an epoch, ends bit-identical (weights, thresholds, metrics, log) to the
same run uninterrupted. Tiny synthetic set, 2 epochs, a data-loader worker (its seeding counts)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def resume_set(tmp_path_factory) -> Path:
    from pipeline.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("resume_data")
    # seed 7: 2 NME and 2 other patients, every pattern with tiles in training and in validation
    generate_dataset(root, n=6, seed=7, mpp=0.5, classes=["nme", "normal"], size_um=(1600, 1200), overwrite=True)
    return root


def _config(tmp_path: Path, root: Path, run: Path) -> Path:
    cfg = {
        "task": "patch",
        "name": "resume",
        "seed": 3,
        "output_dir": str(run),
        "data": {"root": str(root)},
        "labels": {"positive_coverage": {"pallor": 0.05, "necrolysis": 0.05, "parakeratosis": 0.05, "epidermis": 0.1}},
        "split": {"val_fraction": 0.34, "k_folds": 2},
        "train": {
            "epochs": 2,
            "tiles_per_epoch": 48,
            "batch_size": 8,
            "max_val_tiles": 50,
            "num_workers": 1,
            "checkpoint_every": 2,
            "threads": 1,
            "precision": "fp32",
            "device": "cpu",
        },
    }
    path = tmp_path / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _kill_when(config: Path, ready: Callable[[], bool]) -> None:
    """Start train.py and SIGKILL it as soon as ``ready()`` holds."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, (
        f"train.py ended before it could be killed: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()


def _checkpoint_point(run: Path) -> tuple[int, int]:
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return int(state["epoch"]), int(state["step"])


def _log_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def _same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_sigkill_resume_is_bit_identical(tmp_path, resume_set):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _train(_config(tmp_path, resume_set, straight))
    assert done.returncode == 0, done.stderr[-3000:]

    cfg = _config(tmp_path, resume_set, killed)
    last = killed / "checkpoints" / "last.pt"
    _kill_when(cfg, last.exists)  # the first mid-epoch checkpoint (step 2 of 6)
    epoch, step = _checkpoint_point(killed)
    assert epoch == 0 and 0 < step < 6, (epoch, step)
    _kill_when(cfg, (killed / "log.csv").exists)  # resumed, then killed around the end of epoch 1
    assert _checkpoint_point(killed) > (epoch, step)
    resumed = _train(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "not bit-identical" not in resumed.stderr

    assert _same_tensors(straight / "bundle" / "model.safetensors", killed / "bundle" / "model.safetensors")
    assert _same_tensors(straight / "checkpoints" / "best.safetensors", killed / "checkpoints" / "best.safetensors")
    a, b = (json.loads((r / "bundle" / "bundle.json").read_text()) for r in (straight, killed))
    assert a["thresholds"] == b["thresholds"]
    assert json.loads((straight / "patch_metrics.json").read_text()) == json.loads(
        (killed / "patch_metrics.json").read_text()
    )
    assert _log_rows(straight) == _log_rows(killed) and len(_log_rows(killed)) == 2
