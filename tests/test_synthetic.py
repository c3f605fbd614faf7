"""The synthetic slide generator: files, determinism, resolution, annotations, labels, rendering, CLI.

All slides here are tiny (2000 x 1500 µm, 4000 x 3000 px at 0.5 µm/px) so the module runs in
well under a minute.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from pipeline.core.errors import ConfigError
from pipeline.reading.slide import open_slide
from pipeline.synthetic import DIAGNOSES, LABEL_COLUMNS, PATTERNS, generate_dataset, layout_for, plan_dataset
from pipeline.synthetic.__main__ import main as cli_main
from pipeline.synthetic.catalog import DIAGNOSIS_SPECS
from pipeline.synthetic.cells import STYLE, build_cells
from pipeline.synthetic.layout import build_layout
from pipeline.synthetic.profiles import DU, INTENSITY_ROWS, PATTERN_ROWS, R, build_profiles
from pipeline.synthetic.render import SlideRenderer
from pipeline.synthetic.stain import sample_batch_stain

REPO = Path(__file__).resolve().parent.parent
SIZE = (2000.0, 1500.0)
CLASSES = ["nme", "normal", "psoriasiform", "spongiotic"]
SEED = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    rows = generate_dataset(out, n=4, seed=SEED, mpp=0.5, classes=CLASSES, size_um=SIZE)
    return out, rows


def _features(path: Path) -> list[dict]:
    fc = json.loads(path.read_text())
    assert fc["type"] == "FeatureCollection"
    return fc["features"]


def _ring(feature: dict) -> np.ndarray:
    geom = feature["geometry"]
    assert geom["type"] == "Polygon"
    return np.asarray(geom["coordinates"][0], dtype=np.float64)


def _name(feature: dict) -> str:
    return feature["properties"]["classification"]["name"]


def _layouts():
    return {p.slide_id: (p, layout_for(p, SIZE)) for p in plan_dataset(4, SEED, 0.5, CLASSES)}


def _mask(shape: tuple[int, int], rings: list[np.ndarray], scale: float = 1.0) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for r in rings:
        cv2.fillPoly(m, [np.rint(r * scale * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return m.astype(bool)


def _band(sec, top_frac: float, bot_frac: float, exclude_patches: bool = True) -> list[np.ndarray]:
    """Slide-µm rings of the living-epidermis band S + top_frac*E0 .. S + bot_frac*E0 (outside patches)."""
    t = sec.prof.table
    n = sec.prof.n
    keep = np.ones(n, bool)
    keep[: int(150 / DU)] = False
    keep[-int(150 / DU) :] = False
    if exclude_patches:
        for _, i0, i1 in sec.prof.patches:
            keep[max(0, i0 - 40) : i1 + 40] = False
    rings = []
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return rings
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    for run in runs:
        if run.size < 40:
            continue
        u = run * DU
        top = t[R["S"], run] + top_frac * t[R["E0"], run]
        bot = t[R["S"], run] + bot_frac * t[R["E0"], run]
        x1, y1 = sec.frame.to_slide(u, top)
        x2, y2 = sec.frame.to_slide(u[::-1], bot[::-1])
        rings.append(np.concatenate([np.stack([x1, y1], 1), np.stack([x2, y2], 1)]))
    return rings


def _level0(path: Path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        w, h = s.level_dimensions[0]
        return np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))


# ----------------------------------------------------------------------------- files and formats


def test_files_and_labels(dataset):
    out, rows = dataset
    assert [r["diagnosis"] for r in rows] and {r["diagnosis"] for r in rows} == set(CLASSES)
    with open(out / "labels.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == LABEL_COLUMNS
        table = list(reader)
    assert len(table) == 4
    for row, rec in zip(table, rows):
        assert row == {k: str(v) for k, v in rec.items()}
        assert (out / "slides" / f"{row['slide_id']}.tiff").is_file()
        assert (out / "annotations" / f"{row['slide_id']}.geojson").is_file()
        assert row["site"] in {
            "intertriginous",
            "perioral",
            "perineal",
            "acral",
            "trunk",
            "extremity",
            "sun_exposed",
            "other",
        }
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("mpp", [0.5])
def test_openslide_reads_mpp_and_levels(dataset, mpp):
    out, rows = dataset
    for row in rows:
        path = out / "slides" / f"{row['slide_id']}.tiff"
        with openslide.OpenSlide(str(path)) as s:
            assert s.properties["openslide.vendor"] == "generic-tiff"
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp, abs=1e-9)
            assert float(s.properties["openslide.mpp-y"]) == pytest.approx(mpp, abs=1e-9)
            assert s.level_count >= 3
            assert s.level_dimensions[0] == (round(SIZE[0] / mpp), round(SIZE[1] / mpp))
            for k in range(1, s.level_count):
                assert s.level_downsamples[k] == pytest.approx(2**k, rel=0.01)
        slide = open_slide(path)
        try:
            assert slide.mpp == pytest.approx(mpp, abs=1e-9)
            assert slide.level_count >= 3
        finally:
            slide.reader.close()


def test_same_seed_same_bytes(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_dataset(again, n=4, seed=SEED, mpp=0.5, classes=CLASSES, size_um=SIZE)

    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    first, second = digest(out), digest(again)
    assert first == second
    other = tmp_path / "other"
    generate_dataset(other, n=1, seed=SEED + 1, mpp=0.5, classes=["nme"], size_um=SIZE)
    a = next((out / "slides").glob("*.tiff")).read_bytes()
    b = next((other / "slides").glob("*.tiff")).read_bytes()
    assert a != b


# ----------------------------------------------------------------------------- annotations


def test_annotations_are_qupath_features(dataset):
    out, rows = dataset
    ids = set()
    for row in rows:
        feats = _features(out / "annotations" / f"{row['slide_id']}.geojson")
        assert feats, "every slide has at least its epidermis"
        for f in feats:
            assert f["type"] == "Feature"
            ids.add(f["id"])
            props = f["properties"]
            assert props["objectType"] == "annotation"
            assert _name(f) in {"epidermis", *PATTERNS}
            assert len(props["classification"]["color"]) == 3
            ring = _ring(f)
            assert len(ring) >= 4 and np.allclose(ring[0], ring[-1])
            area = 0.5 * abs(np.dot(ring[:, 0], np.roll(ring[:, 1], -1)) - np.dot(ring[:, 1], np.roll(ring[:, 0], -1)))
            assert area > 100.0
    assert all(len(i) == 36 for i in ids) and len(ids) == sum(
        len(_features(out / "annotations" / f"{r['slide_id']}.geojson")) for r in rows
    )


def test_labels_agree_with_annotations(dataset):
    out, rows = dataset
    for row in rows:
        names = {_name(f) for f in _features(out / "annotations" / f"{row['slide_id']}.geojson")}
        for p in PATTERNS:
            assert row[p] == int(p in names), (row, names)
        assert row["nme_pattern"] == int(row["diagnosis"] == "nme" and all(row[p] for p in PATTERNS))
    by_dx = {r["diagnosis"]: r for r in rows}
    assert by_dx["nme"]["nme_pattern"] == 1
    assert by_dx["normal"]["pallor"] == by_dx["normal"]["necrolysis"] == by_dx["normal"]["parakeratosis"] == 0
    assert by_dx["psoriasiform"]["parakeratosis"] == 1
    assert by_dx["psoriasiform"]["pallor"] == by_dx["psoriasiform"]["necrolysis"] == 0
    assert by_dx["spongiotic"]["pallor"] == by_dx["spongiotic"]["necrolysis"] == 0


def test_patterns_lie_in_the_right_layer(dataset):
    """Pattern polygons are inside the tissue and the epidermis; pallor/necrolysis in the upper
    living epidermis, parakeratosis in the corneum (checked against the layout's profiles)."""
    out, rows = dataset
    layouts = _layouts()
    mpp = 0.5
    for row in rows:
        plan, lay = layouts[row["slide_id"]]
        feats = _features(out / "annotations" / f"{row['slide_id']}.geojson")
        epis = [_ring(f) for f in feats if _name(f) == "epidermis"]
        tissue = [s.outline / mpp for s in lay.sections]
        assert len(epis) == len(lay.sections)
        for f in feats:
            ring = _ring(f)
            for poly_set, what in ((tissue, "tissue"), (epis, "epidermis")):
                if what == "epidermis" and _name(f) == "epidermis":
                    continue
                inside = [
                    max(
                        cv2.pointPolygonTest(p.astype(np.float32).reshape(-1, 1, 2), (float(x), float(y)), True)
                        for p in poly_set
                    )
                    for x, y in ring[:-1]
                ]
                assert min(inside) > -1.0, f"{row['slide_id']} {_name(f)} leaves the {what} by {-min(inside):.1f} px"
            if _name(f) == "epidermis":
                continue
            # which layer: map vertices (and the centroid) back to section-local depth
            pts_um = np.vstack([ring[:-1], ring[:-1].mean(0, keepdims=True)]) * mpp
            best = None
            for sec in lay.sections:
                u, d = sec.frame.to_local(pts_um[:, 0].astype(np.float32), pts_um[:, 1].astype(np.float32))
                if np.all((u > -1) & (u < sec.prof.length + 1)):
                    i = np.clip(np.rint(u / DU).astype(int), 0, sec.prof.n - 1)
                    t = sec.prof.table
                    rel = (d - t[R["S"], i]) / t[R["E0"], i]
                    corneum_rel = (d - t[R["S"], i]) / t[R["TC"], i]
                    if best is None or np.abs(rel).max() < np.abs(best[0]).max():
                        best = (rel, corneum_rel)
            assert best is not None
            rel, corneum_rel = best
            if _name(f) in ("pallor", "necrolysis"):
                assert rel.min() > -0.05 and rel.max() < 0.92, (_name(f), rel.min(), rel.max())
            else:
                assert corneum_rel.min() > -1.05 and corneum_rel.max() < 0.05, (corneum_rel.min(), corneum_rel.max())


# ----------------------------------------------------------------------------- rendering


def test_patterns_are_rendered(dataset):
    """Pallor is paler than normal spinous layer, necrolysis more eosinophilic, parakeratosis has
    dark nuclei that the normal corneum lacks, and spongiotic lower epidermis has pale gaps."""
    out, rows = dataset
    layouts = _layouts()
    mpp = 0.5
    by_dx = {r["diagnosis"]: r for r in rows}

    nme = by_dx["nme"]
    _, lay = layouts[nme["slide_id"]]
    img = _level0(out / "slides" / f"{nme['slide_id']}.tiff").astype(np.float32)
    shape = img.shape[:2]
    gray = img.mean(2)
    feats = _features(out / "annotations" / f"{nme['slide_id']}.geojson")
    pallor = _mask(shape, [_ring(f) for f in feats if _name(f) == "pallor"])
    nec = _mask(shape, [_ring(f) for f in feats if _name(f) == "necrolysis"])
    para = _mask(shape, [_ring(f) for f in feats if _name(f) == "parakeratosis"])
    spinous = _mask(shape, [r for s in lay.sections for r in _band(s, 0.1, 0.6)], 1 / mpp)
    assert pallor.sum() > 500 and nec.sum() > 200 and para.sum() > 500 and spinous.sum() > 2000
    assert gray[pallor & ~nec].mean() > gray[spinous].mean() + 15
    red_green = img[..., 0] - img[..., 1]
    assert red_green[nec].mean() > red_green[spinous].mean() + 10
    assert gray[nec].mean() < gray[pallor & ~nec].mean()
    para_dark = (gray[para] < 100).mean()

    normal = by_dx["normal"]
    _, lay_n = layouts[normal["slide_id"]]
    img_n = _level0(out / "slides" / f"{normal['slide_id']}.tiff").astype(np.float32)
    corneum_n = _mask(img_n.shape[:2], [r for s in lay_n.sections for r in _band_corneum(s)], 1 / mpp)
    assert corneum_n.sum() > 1000
    normal_dark = (img_n.mean(2)[corneum_n] < 100).mean()
    assert para_dark > 0.01 and para_dark > 5 * normal_dark, (para_dark, normal_dark)

    spong = by_dx["spongiotic"]
    _, lay_s = layouts[spong["slide_id"]]
    img_s = _level0(out / "slides" / f"{spong['slide_id']}.tiff").astype(np.float32)
    lower_s = _mask(
        img_s.shape[:2], [r for s in lay_s.sections for r in _band(s, 0.45, 0.95, exclude_patches=False)], 1 / mpp
    )
    lower_n = _mask(
        img_n.shape[:2], [r for s in lay_n.sections for r in _band(s, 0.45, 0.95, exclude_patches=False)], 1 / mpp
    )
    pale_s = (img_s.mean(2)[lower_s] > 200).mean()
    pale_n = (img_n.mean(2)[lower_n] > 200).mean()
    assert pale_s > pale_n + 0.02, (pale_s, pale_n)


def _band_corneum(sec) -> list[np.ndarray]:
    """Rings of the stratum corneum (S - TC .. S), away from the section's ends."""
    t = sec.prof.table
    n = sec.prof.n
    run = np.arange(int(150 / DU), n - int(150 / DU))
    u = run * DU
    top = t[R["S"], run] - 0.9 * t[R["TC"], run]
    bot = t[R["S"], run] - 0.1 * t[R["TC"], run]
    x1, y1 = sec.frame.to_slide(u, top)
    x2, y2 = sec.frame.to_slide(u[::-1], bot[::-1])
    return [np.concatenate([np.stack([x1, y1], 1), np.stack([x2, y2], 1)])]


def _nme_section(intensity: float, seed: int = 3):
    """An NME section (profiles and cells, no pixels) with every pattern drawn at ``intensity``."""
    spec = DIAGNOSIS_SPECS["nme"]
    patterns = {p: dataclasses.replace(plan, intensity=(intensity, intensity)) for p, plan in spec.patterns.items()}
    spec = dataclasses.replace(spec, patterns=patterns)
    prof = build_profiles(np.random.default_rng(seed), spec, 2500.0, 1200.0, "punch", "trunk")
    cells, _ = build_cells(np.random.default_rng(seed + 1), prof, spec, 0.3, 1.2)
    return prof, {k: np.concatenate(v) for k, v in cells.cols.items()}


def test_pattern_intensity_sets_how_conspicuous():
    """Same patches, drawn subtle (0.1) or florid (1.0): the intensity rows hold the level inside the
    patches only; subtle pallor is less pale and less vacuolated, subtle necrolysis keeps more
    nuclei and is less eosinophilic, focal parakeratosis has far fewer retained nuclei."""
    stats = {}
    for level in (0.1, 1.0):
        prof, c = _nme_section(level)
        t = prof.table
        for pattern, row in INTENSITY_ROWS.items():
            inside = np.zeros(prof.n, bool)
            for p, i0, i1 in prof.patches:
                if p == pattern:
                    inside[i0 : i1 + 1] = True
            assert inside.any(), pattern
            assert np.all(t[R[row], ~inside] == 0.0)
            assert 0.6 * level <= np.median(t[R[row], inside]) <= 1.0
        i = np.clip(np.rint(c["x"] / DU).astype(int), 0, prof.n - 1)

        def band(pattern: str) -> np.ndarray:
            top, bot = PATTERN_ROWS[pattern]
            return (c["y"] >= t[R[top], i]) & (c["y"] < t[R[bot], i])

        para_len = sum(i1 - i0 for p, i0, i1 in prof.patches if p == "parakeratosis") * DU
        pallor = band("pallor") & (c["owner"] == 1)
        nec = band("necrolysis") & (c["owner"] == 1)
        lost = np.isin(c["style"][nec], [STYLE["none"], STYLE["pyknotic"], STYLE["karyorrhexis"]]).mean()
        stats[level] = {
            "para_nuclei_per_mm": (band("parakeratosis") & (c["style"] == STYLE["solid"])).sum() / para_len * 1000,
            "pallor_e": c["cyto_e"][pallor].mean(),
            "pallor_vac": c["vac"][pallor].mean(),
            "nec_lost": lost,
            "nec_e": c["cyto_e"][nec].mean(),
        }
    sub, flo = stats[0.1], stats[1.0]
    assert sub["para_nuclei_per_mm"] >= 15, sub  # focal, but every part of the patch shows some
    assert flo["para_nuclei_per_mm"] > 8 * sub["para_nuclei_per_mm"], (sub, flo)
    assert sub["pallor_e"] > flo["pallor_e"] + 0.2 and sub["pallor_vac"] < 0.5 * flo["pallor_vac"], (sub, flo)
    assert sub["nec_lost"] < 0.6 * flo["nec_lost"] and sub["nec_e"] < flo["nec_e"] - 0.15, (sub, flo)


def _corneum_pixels(site: str, seed: int) -> np.ndarray:
    """Grey values of the outer 70 % of the corneum of a normal section, away from the cut ends;
    for a basket-weave site only where the corneum is open (``CK`` < 0.3)."""
    batch = sample_batch_stain(np.random.default_rng(1))
    lay = build_layout("T", "normal", site, seed, batch, 1500.0, 1200.0)
    sec = lay.sections[0]
    t = sec.prof.table
    keep = t[R["CK"]] < 0.3 if site != "acral" else np.ones(sec.prof.n, bool)
    run = np.flatnonzero(keep)
    run = run[(run > 300) & (run < min(sec.prof.n - 300, 1300))]
    assert run.size > 100, "no open basket-weave corneum"
    u = run * DU
    x1, y1 = sec.frame.to_slide(u, t[R["S"], run] - 0.95 * t[R["TC"], run])
    x2, y2 = sec.frame.to_slide(u[::-1], (t[R["S"], run] - 0.3 * t[R["TC"], run])[::-1])
    mpp = 0.5
    ring = np.concatenate([np.stack([x1, y1], 1), np.stack([x2, y2], 1)]) / mpp
    x0, y0 = np.floor(ring.min(0)).astype(int) - 2
    w, h = np.ceil(ring.max(0)).astype(int) + 2 - (x0, y0)
    gray = SlideRenderer(lay, mpp).render(int(x0), int(y0), int(w), int(h)).astype(np.float32).mean(2)
    return gray[_mask(gray.shape, [ring - (x0, y0)])]


def test_corneum_basket_weave_and_compact():
    """Normal orthokeratin is open basket-weave: lamellae with clear gaps between them; acral
    orthokeratin is compact (no gaps). Neither has nuclei (checked in test_patterns_are_rendered)."""
    basket = _corneum_pixels("trunk", 1)
    assert (basket > 210).mean() > 0.15 and (basket < 190).mean() > 0.15, ((basket > 210).mean(), (basket < 190).mean())
    compact = _corneum_pixels("acral", 1)
    assert (compact > 210).mean() < 0.03 and (compact < 190).mean() > 0.8


def test_same_layout_at_quarter_micron(tmp_path):
    a = generate_dataset(tmp_path / "half", n=1, seed=9, mpp=0.5, classes=["nme"], size_um=SIZE)
    b = generate_dataset(tmp_path / "quarter", n=1, seed=9, mpp=0.25, classes=["nme"], size_um=SIZE)
    assert a == b
    sid = a[0]["slide_id"]
    fa = _features(tmp_path / "half" / "annotations" / f"{sid}.geojson")
    fb = _features(tmp_path / "quarter" / "annotations" / f"{sid}.geojson")
    assert [f["id"] for f in fa] == [f["id"] for f in fb]
    assert [_name(f) for f in fa] == [_name(f) for f in fb]
    for x, y in zip(fa, fb):
        np.testing.assert_allclose(_ring(y), 2.0 * _ring(x), atol=0.03)
    with openslide.OpenSlide(str(tmp_path / "quarter" / "slides" / f"{sid}.tiff")) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25, abs=1e-9)
        assert s.level_dimensions[0] == (8000, 6000) and s.level_count >= 3
        low = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB")).astype(np.float32)
    assert open_slide(tmp_path / "quarter" / "slides" / f"{sid}.tiff").mpp == pytest.approx(0.25)
    with openslide.OpenSlide(str(tmp_path / "half" / "slides" / f"{sid}.tiff")) as s:
        full = np.asarray(s.read_region((0, 0), 0, s.level_dimensions[0]).convert("RGB")).astype(np.float32)
    # the same tissue in the same place: 0.25 µm/px level 1 vs 0.5 µm/px level 0
    # compared at 8 µm/px, where texture differences average out
    small_a = cv2.resize(full.mean(2), (250, 188), interpolation=cv2.INTER_AREA)
    small_b = cv2.resize(low.mean(2), (250, 188), interpolation=cv2.INTER_AREA)
    tissue_a, tissue_b = small_a < 225, small_b < 225
    assert tissue_a.mean() > 0.1
    agree = (tissue_a == tissue_b).mean()
    assert agree > 0.98, agree
    coarse_a = cv2.resize(full.mean(2), (63, 47), interpolation=cv2.INTER_AREA)
    coarse_b = cv2.resize(low.mean(2), (63, 47), interpolation=cv2.INTER_AREA)
    both = (coarse_a < 225) & (coarse_b < 225)
    assert np.abs(coarse_a - coarse_b)[both].mean() < 10  # same tissue, textures drawn at their own MPP


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--n", "0", "--seed", "1"], "--n"),
        (["--n", "-2", "--seed", "1"], "--n"),
        (["--n", "1.5", "--seed", "1"], "--n"),
        (["--n", "1", "--seed", "-1"], "--seed"),
        (["--n", "1", "--seed", "x"], "--seed"),
        (["--n", "1", "--seed", "1", "--classes", "nme", "lupus"], "lupus"),
        (["--n", "1", "--seed", "1", "--mpp", "abc"], "--mpp"),
        (["--n", "1", "--seed", "1", "--mpp", "7"], "mpp"),
        (["--n", "1", "--seed", "1", "--size", "10x10"], "width"),
        (["--n", "1", "--seed", "1", "--size", "big"], "--size"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc_info:
        code = cli_main(["--out", str(out), *argv])
        raise SystemExit(code)
    assert exc_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists() or not any(out.rglob("*.tiff"))


def test_cli_refuses_non_empty_folder_then_overwrites(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cmd = [
        sys.executable,
        "-m",
        "pipeline.synthetic",
        "--out",
        str(out),
        "--n",
        "1",
        "--seed",
        "3",
        "--classes",
        "normal",
        "--size",
        "1200x1000",
        "-q",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--overwrite" in proc.stderr
    proc = subprocess.run([*cmd, "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "notes.txt").read_text() == "keep me"
    assert len(list((out / "slides").glob("*.tiff"))) == 1 and (out / "labels.csv").is_file()


def test_api_validates_arguments(tmp_path):
    with pytest.raises(ConfigError, match="n must be at least 1"):
        generate_dataset(tmp_path / "a", n=0, seed=1)
    with pytest.raises(ConfigError, match="integer"):
        generate_dataset(tmp_path / "a", n=2.5, seed=1)
    with pytest.raises(ConfigError, match="seed"):
        generate_dataset(tmp_path / "a", n=1, seed=-4)
    with pytest.raises(ConfigError, match="unknown class 'eczema'"):
        generate_dataset(tmp_path / "a", n=1, seed=1, classes=["eczema"])
    with pytest.raises(ConfigError, match="mpp"):
        generate_dataset(tmp_path / "a", n=1, seed=1, mpp=0.0)
    assert not (tmp_path / "a").exists()


def test_plan_mix_and_patients():
    plans = plan_dataset(40, 2)
    dx = [p.diagnosis for p in plans]
    assert set(dx) == set(DIAGNOSES)
    assert 8 <= dx.count("nme") <= 12
    patients: dict[str, set[str]] = {}
    for p in plans:
        patients.setdefault(p.patient_id, set()).add(p.diagnosis)
    assert len(patients) < len(plans), "some patients have several slides"
    assert all(len(v) == 1 for v in patients.values()), "a patient's slides share the diagnosis"
    assert plan_dataset(40, 2) == plans
