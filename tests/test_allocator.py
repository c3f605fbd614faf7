"""The process allocator settings batch inference runs with (pipeline.core.runtime.keep_freed_memory).

Run in a fresh interpreter each: the settings are process-wide and would leak into other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, resource, sys
import numpy as np
from pipeline.core import runtime

keep = sys.argv[1] == "keep"
if keep and not runtime.keep_freed_memory():
    print(json.dumps({"applied": False})); sys.exit(0)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def batch_like():  # model-activation-sized blocks (48 MB, above glibc's largest mmap threshold), touched
    a = np.ones(48 << 20, np.uint8); b = np.ones(12 << 20, np.uint8)
    return int(a[::4096].sum() + b[::4096].sum())

batch_like()
f0 = faults()
for _ in range(5):
    batch_like()
per_round = (faults() - f0) / 5
big = np.ones(256 << 20, np.uint8); big[::4096] = 2; del big  # freed into the heap
trimmed = runtime.release_free_memory()
print(json.dumps({"applied": True, "faults_per_round": per_round, "trimmed": trimmed,
                  "free_after_trim": runtime.heap_free_bytes()}))
"""


def _child(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults_and_given_back_on_request():
    kept = _child("keep")
    if not kept["applied"]:
        pytest.skip("not glibc: allocator settings do not apply")
    default = _child("default")
    # glibc's defaults map blocks this large afresh every time and fault them in again (60 MB a
    # round: ~15 k faults with 4 KiB pages, fewer where transparent huge pages back them)
    if default["faults_per_round"] < 20:
        pytest.skip(f"this kernel/allocator does not fault freed blocks in again ({default})")
    assert kept["faults_per_round"] < default["faults_per_round"] / 10
    # what was kept is given back when the pipeline asks (after a slide's large temporaries)
    assert kept["trimmed"] is True
    assert kept["free_after_trim"] is None or kept["free_after_trim"] < (64 << 20)


def test_heap_reserve_grows_to_the_model_working_memory_within_bounds(monkeypatch):
    from pipeline.core import runtime

    free = {"bytes": 50 << 20}
    monkeypatch.setattr(runtime, "heap_free_bytes", lambda: free["bytes"])
    trims = []
    monkeypatch.setattr(runtime, "_malloc_trim", lambda: trims.append)
    heap = runtime.HeapReserve(floor=128 << 20, ceiling=1 << 30)
    heap.note_model_done()
    assert heap.reserve == 128 << 20  # never below the floor
    free["bytes"] = 400 << 20  # the model's activations and batches, free between slides
    heap.note_model_done()
    assert heap.reserve == 500 << 20
    assert heap.release() is False and not trims  # the next slide needs them again: kept
    free["bytes"] = 900 << 20  # a large slide's temporaries on top: given back
    assert heap.release() is True and trims == [0]
    free["bytes"] = 5 << 30
    heap.note_model_done()
    assert heap.reserve == 1 << 30  # bounded
