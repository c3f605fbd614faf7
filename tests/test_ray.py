"""Batch inference on Ray (``infer.py --engine ray``): same results as the local engine, resume,
a worker dying mid-batch, bad cluster input, and the worker sizing.

Real Ray throughout (a local instance on this machine, at most 2 CPUs): one test runs the CLI,
which starts its own instance; the others share one instance started by this module.
The model is the shipped demo bundle when present, else a tiny one trained here once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_results_match_schema
from ray_cluster import free_port, local_ray_instance

DEMO_BUNDLE = REPO / "models" / "demo_bundle"
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")

TINY_PIPELINE_CONFIG = """\
task: pipeline
name: ray-test
label: "synthetic test model, not for clinical use"
output_dir: {out}
data:
  root: {data}
  synthetic: {{n: 5, seed: 5, size_um: [1300, 1000], classes: [nme, normal, nme_late, normal, nme]}}
split: {{val_fraction: 0.25, k_folds: 2}}
model: {{backbone: mobilenet_v3_small}}
train: {{epochs: 1, tiles_per_epoch: 32, batch_size: 16, max_val_tiles: 50, num_workers: 0}}
aggregator: {{epochs: 2, bootstrap: 0}}
"""

#: result.json fields that legitimately differ between two runs (clock, where it ran).
VOLATILE = {"timings", "created_at", "slide_path", "produced_by"}


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """$NME_TEST_BUNDLE, the demo bundle, or a tiny pipeline bundle trained once (30-60 s on 2 cores)."""
    given = os.environ.get("NME_TEST_BUNDLE")
    if given:
        return Path(given)
    if (DEMO_BUNDLE / "bundle.json").is_file():
        return DEMO_BUNDLE
    from pipeline.core.config import load_config
    from pipeline.training.config import RunConfig
    from pipeline.training.run import run_training

    root = tmp_path_factory.mktemp("tiny_bundle")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(TINY_PIPELINE_CONFIG.format(out=root / "run", data=root / "data"))
    return run_training(load_config(RunConfig, cfg_path, []))


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Three small synthetic slides (a folder of .tiff files)."""
    from pipeline.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("ray_slides")
    generate_dataset(
        root, n=3, seed=41, mpp=0.5, classes=["nme", "normal", "nme"], size_um=(1600, 1200), overwrite=True
    )
    return root / "slides"


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for the in-process tests; the engine reuses this connection."""
    with local_ray_instance(num_cpus=2) as r:
        yield r


def _opts(slides: Path, out: Path, bundle: Path, **kw):
    from pipeline.batch.runner import BatchOptions

    return BatchOptions(slides_dir=slides, out_dir=out, model=bundle, quiet=True, **kw)


def _results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))}


def _numbers(obj, path=""):
    """Every leaf of a result (minus volatile fields) as {json path: value}."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k not in VOLATILE:
                out.update(_numbers(v, f"{path}/{k}"))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{path}[{i}]"))
        return out
    return {path: obj}


def _infer(*args, env=None, timeout=240):
    return subprocess.run(
        [sys.executable, str(REPO / "infer.py"), *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


# ----------------------------------------------------------------------------- same results, resume


@pytest.mark.slow
def test_ray_cli_matches_local_engine_bitwise(tmp_path, slides, bundle):
    from pipeline.batch.runner import run_batch

    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    record = run_batch(_opts(slides, local_out, bundle))
    assert record["engine"]["name"] == "local" and record["counts"]["failed"] == 0
    # the CLI starts its own local Ray instance; one worker with 2 CPUs = the local engine's 2 torch threads
    proc = _infer(slides, "--out", ray_out, "--model", bundle, "--engine", "ray", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NME-pattern batch: 3 slide(s)" in proc.stdout

    local, remote = _results(local_out), _results(ray_out)
    assert set(local) == set(remote) and len(local) == 3
    assert assert_results_match_schema(local_out) == local and assert_results_match_schema(ray_out) == remote
    assert {r["produced_by"]["engine"] for r in remote.values()} == {"ray"}
    assert {r["produced_by"]["engine"] for r in local.values()} == {"local"}
    for sid in local:
        a, b = _numbers(local[sid]), _numbers(remote[sid])
        assert a == b, (sid, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)})
        for name in local[sid]["files"]:  # the same files, and the per-tile model outputs identical
            assert (ray_out / sid / name).is_file(), (sid, name)
        assert json.loads((local_out / sid / "tiles.geojson").read_text()) == json.loads(
            (ray_out / sid / "tiles.geojson").read_text()
        )
    if bundle == DEMO_BUNDLE:
        assert any(r["status"] == "ok" and r["nme_probability"] is not None for r in remote.values())

    run = json.loads((ray_out / "run.json").read_text())
    eng = run["engine"]
    assert eng["name"] == "ray" and eng["address"].startswith("local") and eng["workers"] == 1
    assert eng["gpus_per_worker"] == 0 and eng["cpus_per_worker"] >= 1 and "same paths" in eng["shared_filesystem"]
    assert eng["retries"] == []
    assert run["counts"] == {
        "slides": 3,
        "ok": run["counts"]["ok"],
        "non_diagnostic": run["counts"]["non_diagnostic"],
        "failed": 0,
        "processed_this_run": 3,
        "skipped_done": 0,
    }
    assert run["model"]["sha256"] == record["model"]["sha256"]
    assert (ray_out / "summary.csv").read_text().count("\n") == 4 and (ray_out / "index.html").is_file()
    assert not list(ray_out.glob(".ray-probe-*")) and not (ray_out / ".nme-run.lock").exists()


@pytest.mark.slow
def test_two_workers_resume_and_force(tmp_path, slides, bundle, ray_instance):
    from pipeline.batch.runner import run_batch

    out = tmp_path / "out"
    rec = run_batch(_opts(slides, out, bundle, engine="ray", workers=2))
    assert rec["engine"]["workers"] == 2 and rec["engine"]["cpus_per_worker"] == 1
    assert rec["counts"]["processed_this_run"] == 3 and rec["counts"]["failed"] == 0
    first = _results(out)

    # resume: finished slides are skipped; a slide whose result.json is gone is redone
    victim = sorted(first)[0]
    (out / victim / "result.json").unlink()
    rec = run_batch(_opts(slides, out, bundle, engine="ray", workers=2))
    assert rec["counts"]["processed_this_run"] == 1 and rec["counts"]["skipped_done"] == 2
    assert rec["engine"]["workers"] == 1  # no more actors than slides to do
    again = _results(out)
    assert _numbers(again[victim]) == _numbers(first[victim])

    # --force redoes everything
    rec = run_batch(_opts(slides, out, bundle, engine="ray", workers=2, force=True))
    assert rec["counts"]["processed_this_run"] == 3 and rec["counts"]["skipped_done"] == 0


# ----------------------------------------------------------------------------- a worker dies


@pytest.mark.slow
def test_worker_death_is_retried_on_a_fresh_actor_or_marked_failed(tmp_path, slides, bundle, ray_instance, monkeypatch):
    from pipeline.batch.ray_engine import CRASH_HOOK_ENV, MAX_ATTEMPTS
    from pipeline.batch.runner import run_batch

    ids = sorted(p.stem for p in slides.glob("*.tiff"))
    once, always, fine = ids
    # the actor processing `once` exits (os._exit) on attempt 1 only; the one processing `always` on every attempt
    monkeypatch.setenv(CRASH_HOOK_ENV, f"{once}@1,{always}")
    out = tmp_path / "out"
    rec = run_batch(_opts(slides, out, bundle, engine="ray", workers=2))

    res = _results(out)
    assert set(res) == set(ids)  # the batch went on
    assert assert_results_match_schema(out) == res  # failed ones too, from the worker or the driver
    assert res[once]["status"] in ("ok", "non_diagnostic") and res[fine]["status"] in ("ok", "non_diagnostic")
    assert res[always]["status"] == "failed"
    assert res[always]["error"].startswith("worker died: gave up after 2 attempts") and "\n" not in res[always]["error"]
    assert res[always]["files"] == ["report.html"] and (out / always / "report.html").is_file()
    assert rec["counts"]["failed"] == 1 and rec["counts"]["slides"] == 3

    retries = rec["engine"]["retries"]
    assert [(r["slide_id"], r["attempt"], r["retried"]) for r in retries if r["slide_id"] == once] == [(once, 1, True)]
    assert [(r["slide_id"], r["attempt"], r["retried"]) for r in retries if r["slide_id"] == always] == [
        (always, a, a < MAX_ATTEMPTS) for a in range(1, MAX_ATTEMPTS + 1)
    ]
    assert json.loads((out / "run.json").read_text())["engine"]["retries"] == retries
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 4 and any(always in r and "worker died" in r for r in rows)


# ----------------------------------------------------------------------------- bad input


def test_ray_not_installed_is_one_line(tmp_path, slides):
    code = (
        "import sys, runpy; sys.modules['ray'] = None; "  # what an environment without Ray looks like
        f"sys.argv = ['infer.py', {str(slides)!r}, '--out', {str(tmp_path / 'out')!r}, '--engine', 'ray', '--quiet']; "
        f"runpy.run_path({str(REPO / 'infer.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: --engine ray needs Ray") and "pip install '.[ray]'" in lines[0]
    )
    assert not (tmp_path / "out").exists()


def test_unreachable_address_fails_fast(tmp_path, slides):
    import time

    from pipeline.batch.ray_engine import ClusterError
    from pipeline.batch.runner import run_batch

    out = tmp_path / "out"
    t = time.perf_counter()
    with pytest.raises(ClusterError, match=r"^--address 127\.0\.0\.1:\d+: no Ray head reachable there within"):
        run_batch(_opts(slides, out, tmp_path / "bundle", engine="ray", address=f"127.0.0.1:{free_port()}"))
    assert time.perf_counter() - t < 15
    assert not out.exists()
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="expected auto, HOST:PORT"):
        run_batch(_opts(slides, out, tmp_path / "bundle", engine="ray", address="head-node-without-port"))


def test_option_errors_are_one_line(tmp_path, slides):
    from pipeline.batch.runner import run_batch
    from pipeline.core.errors import ConfigError

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="local engine processes one slide at a time.*--reader-threads"):
        run_batch(_opts(slides, out, tmp_path / "bundle", workers=2))
    with pytest.raises(ConfigError, match="--address, --gpus-per-worker only apply to --engine ray"):
        run_batch(_opts(slides, out, tmp_path / "bundle", address="auto", gpus_per_worker=1))
    with pytest.raises(ConfigError, match="unknown engine 'spark'"):
        run_batch(_opts(slides, out, tmp_path / "bundle", engine="spark"))
    with pytest.raises(ConfigError, match="--device cuda with --engine ray needs --gpus-per-worker"):
        run_batch(_opts(slides, out, tmp_path / "bundle", engine="ray", device="cuda"))
    with pytest.raises(ConfigError, match="--device cpu with --gpus-per-worker"):
        run_batch(_opts(slides, out, tmp_path / "bundle", engine="ray", device="cpu", gpus_per_worker=1))
    assert not out.exists()


@pytest.mark.slow
def test_worker_without_the_bundle_stops_before_any_slide(tmp_path, slides, ray_instance):
    from pipeline.batch.ray_engine import ClusterError
    from pipeline.batch.runner import run_batch
    from pipeline.core.errors import PipelineError

    out = tmp_path / "out"
    with pytest.raises(
        ClusterError, match=r"^Ray worker on .* \(pid \d+\) cannot see the model bundle .*no-such-bundle"
    ):
        run_batch(_opts(slides, out, tmp_path / "no-such-bundle", engine="ray", workers=1))
    assert not out.exists()  # nothing half-written
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    with pytest.raises(ClusterError):
        run_batch(_opts(slides, out, tmp_path / "no-such-bundle", engine="ray", workers=1))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # no lock, no probe file left

    # a bundle the worker sees but cannot load: the worker's error is the local engine's, one line
    bad = tmp_path / "bad-bundle"
    bad.mkdir()
    (bad / "bundle.json").write_text("{}")
    with pytest.raises(PipelineError) as local_err:
        run_batch(_opts(slides, tmp_path / "out_local", bad))
    with pytest.raises(PipelineError) as ray_err:
        run_batch(_opts(slides, out, bad, engine="ray", workers=1))
    assert type(ray_err.value) is type(local_err.value) and str(ray_err.value) == str(local_err.value)
    assert "\n" not in str(ray_err.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_worker_probe_detects_files_it_cannot_see(tmp_path, slides, bundle, ray_instance):
    """What a worker on a node without the shared storage reports (checked by the engine before any slide)."""
    from pipeline.batch.discovery import SlideJob, discover
    from pipeline.batch.ray_engine import SlideWorker

    driver_out, worker_view = tmp_path / "driver_out", tmp_path / "elsewhere"
    driver_out.mkdir()
    worker_view.mkdir()  # a same-named folder on the worker's own disk looks like this: no probe file in it
    (driver_out / ".ray-probe-abc").write_text("token")
    ghost = tmp_path / "ghost.svs"  # a slide the driver sees but this worker does not
    jobs = [*discover(slides), SlideJob("ghost", ghost)]
    actor = ray.remote(SlideWorker).options(num_cpus=1).remote(_opts(slides, worker_view, bundle), jobs, 1)
    try:
        report = ray.get(actor.probe.remote(str(worker_view / ".ray-probe-abc"), "token", []), timeout=120)
        assert report["problems"][0].startswith(f"cannot see the output folder {worker_view}")
        assert "shared by all workers" in report["problems"][0]
        assert report["problems"][1] == f"cannot see 1 of the 4 slide(s) the driver sees (e.g. {ghost})"
        # the driver's folder is visible and writable; a slide the driver cannot see either is no storage
        # problem (process_slide fails it alone, as in the local engine)
        report = ray.get(actor.probe.remote(str(driver_out / ".ray-probe-abc"), "token", [str(ghost)]), timeout=120)
        assert report["problems"] == [] and report["pid"] > 0
    finally:
        ray.kill(actor)


# ----------------------------------------------------------------------------- sizing (no cluster needed)


def test_worker_plan():
    from pipeline.batch.ray_engine import ClusterError, ClusterShape, plan_workers
    from pipeline.batch.runner import BatchOptions

    def plan(shape, **kw):
        return plan_workers(
            BatchOptions(slides_dir=None, out_dir=Path("o"), model=Path("m"), engine="ray", **kw), shape
        )

    two = ClusterShape((2.0,), (0.0,))
    assert plan(two) == plan(two, workers=1)
    p = plan(two)
    assert (p.workers, p.cpus, p.threads) == (1, 2.0, 2)
    p = plan(two, workers=2)
    assert (p.workers, p.cpus, p.threads) == (2, 1.0, 1)
    p = plan(two, workers=3)
    assert (p.workers, p.cpus, p.threads) == (3, 0.6666, 1)  # Ray takes fractions below 1 CPU
    nodes = ClusterShape((8.0, 8.0, 4.0), (1.0, 1.0, 0.0))
    assert plan(nodes, workers=1).cpus == 8.0  # at most one node's CPUs
    p = plan(nodes, workers=3)
    assert p.cpus == 4.0  # 5 or more would leave the third actor unplaced (8 + 8 + 4 CPUs)
    p = plan(nodes, gpus_per_worker=1)
    assert (p.workers, p.gpus) == (2, 1.0)
    assert plan(nodes, gpus_per_worker=0.5).workers == 4
    with pytest.raises(ClusterError, match="holds only 2 such worker"):
        plan(nodes, gpus_per_worker=1, workers=3)
    with pytest.raises(ClusterError, match="no node of the Ray cluster has that many GPUs"):
        plan(two, gpus_per_worker=1)
    with pytest.raises(ClusterError, match="do not fit"):
        plan(two, workers=2, cpus_per_worker=2)


def test_help_explains_workers_and_reader_threads(capsys):
    sys.path.insert(0, str(REPO))
    import infer

    with pytest.raises(SystemExit):
        infer.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--engine", "--workers", "--reader-threads", "--address", "--gpus-per-worker", "docs/cluster.md"):
        assert flag in text
    assert "The local engine runs 1" in text
