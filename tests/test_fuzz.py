"""The fuzzing benchmark's fixed-seed CI subset (40 damaged or hostile files from small bases) through
the real batch: every file handled cleanly, none over the time limit, nothing left running,
peak RSS under 2 GB (benchmarks/fuzz_slides.py; the >= 300-file run is in the README)."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from fuzz_slides import DEFAULT_SEED, run_fuzz, table  # noqa: E402

pytestmark = pytest.mark.slow


def test_fuzz_ci_subset(tmp_path, shared_slides):
    report = run_fuzz(40, DEFAULT_SEED, tmp_path, limit_s=60, small_only=True)
    print(table(report))
    assert report["files"] == 40
    assert report["handled_pct"] == 100, report["not_handled"]
    assert report["over_time_limit"] == 0 and not report["traceback"]
    assert report["left_running"] == []
    assert report["peak_rss_mb"] < 2048
    assert report["exit_status"] in (0, 1)
    kinds = {i["mutation"].split(":")[0] for i in report["items"]}
    assert {"truncate", "random_bytes", "zero_length", "non_regular", "bomb"} <= kinds, kinds
