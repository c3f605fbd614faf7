"""Data-parallel patch training: ``torchrun --nproc_per_node=2 train.py`` on CPU (gloo), tiny synthetic set.

The helpers of :mod:`pipeline.training.distributed` are checked directly (sharding, the
single-process no-op); the end-to-end test runs the real ``torch.distributed.run`` launcher with
two processes, then runs it again to check that both ranks resume from the same ``last.pt``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

TINY_PATCH_CONFIG = """\
task: patch
name: ddp-test
label: "synthetic DDP test model, not for clinical use"
seed: 3
output_dir: {out}
data:
  root: {data}
  synthetic: {{n: 4, seed: 21, size_um: [1400, 1000], classes: [nme, normal, nme_late, normal]}}
labels: {{positive_coverage: {{pallor: 0.05, necrolysis: 0.02, parakeratosis: 0.05, epidermis: 0.1}}}}  # every pattern in train and val
split: {{val_fraction: 0.25, k_folds: 2}}
model: {{backbone: mobilenet_v3_small}}
train: {{epochs: 1, tiles_per_epoch: 32, batch_size: 8, max_val_tiles: 50, num_workers: 0, checkpoint_every: 1,
         precision: fp32, device: cpu}}
"""


def test_shard_is_disjoint_equal_and_complete():
    from pipeline.training.distributed import shard

    items = np.stack([np.arange(10), np.arange(10) * 7], 1)  # (slide, tile) pairs
    parts = [shard(items, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]  # padded to a multiple of the world size
    positions = [set(range(r, 12, 3)) for r in range(3)]
    assert not (positions[0] & positions[1]) and not (positions[1] & positions[2])
    covered = {tuple(x) for p in parts for x in p}
    assert covered == {tuple(x) for x in items}  # every item of the sample is trained on
    assert shard(items, 0, 1) is items  # single process: untouched
    assert [len(shard(items[:1], r, 3)) for r in range(3)] == [1, 1, 1]


def test_single_process_is_a_no_op(monkeypatch):
    from pipeline.training import distributed

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = distributed.setup("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1
    assert distributed.run_on_main(lambda x: x + 1, 1) == 2
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    model = object()
    assert distributed.wrap_model(model) is model
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.setup("cpu").enabled
    distributed.shutdown()


def _torchrun(config: Path, timeout: int = 170) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
        "--config",
        str(config),
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_torchrun_two_processes_train_the_patch_model(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_PATCH_CONFIG.format(out=out, data=data))

    proc = _torchrun(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = proc.stderr
    # both ranks joined the gloo group and said so; only rank 0 wrote the bundle
    assert "[rank 0/2] joined: rank 0 of 2" in err and "[rank 1/2] joined: rank 1 of 2" in err, err[-3000:]
    assert "backend gloo" in err
    assert err.count("saved bundle") == 1, err[-3000:]
    assert "[rank 0/2] epoch 1: 2 ranks trained on 16 + 16 tiles" in err
    assert (out / "bundle" / "bundle.json").is_file() and (out / "bundle" / "model.safetensors").is_file()
    with open(out / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["train_loss"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo"}
    dist = summary["patch_metrics"]["distributed"]
    assert dist["tiles_per_rank_last_epoch"] == [16, 16] and dist["batch_size_per_rank"] == 8
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.safetensors").is_file()
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    weights = load_file(str(out / "bundle" / "model.safetensors"))

    # the same command again: every rank loads last.pt (epoch 1 of 1 done) and agrees on where to resume
    proc = _torchrun(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[rank 0/2] resuming from" in proc.stderr and "epoch 2 step 0" in proc.stderr
    assert "different points" not in proc.stderr
    assert proc.stderr.count("saved bundle") == 1
    again = load_file(str(out / "bundle" / "model.safetensors"))
    assert again.keys() == weights.keys() and all(
        torch.equal(again[k], weights[k]) for k in weights
    )  # nothing retrained
    with open(out / "log.csv", newline="") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1"]
