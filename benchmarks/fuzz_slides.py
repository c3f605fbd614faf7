"""Fuzzing benchmark: damaged and hostile slide files through the batch, and how cleanly it copes.

    python benchmarks/fuzz_slides.py [--n 320] [--seed 2121] [--subset ci] [--out DIR] [--slide-timeout 120] [--json]

Makes a corpus (fixed seed: the same arguments give the same files) from real slides
(``../shared/data/slides``: SVS, NDPI, OME-TIFF, DICOM folder and file, generic TIFF) and synthetic
ones (:mod:`pipeline.synthetic` TIFF, BigTIFF, PNG, JPEG) with these mutations: truncation at a
random offset, bit flips in the header and in the tile offset/byte-count tables, absurd
dimensions and tile counts, decompression bombs (small files claiming gigapixels of blank tiles;
a PNG over the plain-image limit), wrong or absurd MPP tags, zero-length files, random bytes under
slide suffixes, and non-regular entries (FIFOs, a socket, broken and looping symbolic links).
Then it runs ``infer.py`` over the corpus (local engine, in a subprocess) and reports, as a table
and with ``--json`` one JSON line:

* ``handled_pct``: files handled cleanly: a ``result.json`` that is ``ok``/``non_diagnostic``, or
  ``failed`` with a one-line error naming the file, with no internal exception name and no
  self-contradiction; or (non-regular entries) listed in ``run.json``'s ``skipped_inputs`` with a reason;
* seconds per file (wall of the whole run / files; median and max of the slides' own ``total``);
* ``over_time_limit``: slides that timed out; ``peak_rss_mb``: largest resident set of the run's
  processes (``ru_maxrss`` of the reaped process tree); ``left_running``: processes of the run
  still alive after it ended (found by an environment marker).

``--subset ci`` is a fixed 40-file subset of small bases (runs in tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "slides"
DEFAULT_SEED = 2121
#: Names of internal exception types that must never reach a user's error message.
INTERNAL = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback|unexpected error")


@dataclass
class Item:
    """One corpus entry: its path, the base it came from and the mutation applied."""

    name: str
    base: str
    mutation: str
    entry: str  # "slide" (expects a result.json) or "skip" (expects a skipped_inputs line)


# ----------------------------------------------------------------------------- crafted TIFFs


def tiff_bytes(
    width: int,
    height: int,
    tile: int = 256,
    n_tiles: int | None = None,
    mpp: float | None = 0.5,
    compression: int = 8,
    tile_data: bytes | None = None,
    resolution: tuple[int, int] | None = None,
) -> bytes:
    """A minimal little-endian RGB tiled TIFF, every tile pointing at the same ``tile_data`` blob.

    ``n_tiles`` overrides the tile count written (absurd tile counts); ``resolution`` the raw
    XResolution rational (pixels per cm). Sizes in pixels; ``mpp`` µm/px.
    """
    need = -(-width // tile) * -(-height // tile)
    count = need if n_tiles is None else n_tiles
    if tile_data is None:
        tile_data = zlib.compress(bytes([240]) * (tile * tile * 3), 9)
    num, den = resolution if resolution is not None else ((int(1e4 / mpp * 1000), 1000) if mpp else (0, 0))
    entries: list[tuple[int, int, int, bytes]] = []  # tag, type, count, value bytes
    header = 8
    data_at = header
    blob = bytearray()
    blob += tile_data
    bps_at = data_at + len(blob)
    blob += struct.pack("<3H", 8, 8, 8)
    res_at = data_at + len(blob)
    blob += struct.pack("<II", num, den)
    offs_at = data_at + len(blob)
    blob += struct.pack(f"<{count}I", *([data_at] * count))
    cnts_at = data_at + len(blob)
    blob += struct.pack(f"<{count}I", *([len(tile_data)] * count))
    entries = [
        (256, 4, 1, struct.pack("<I", width)),
        (257, 4, 1, struct.pack("<I", height)),
        (258, 3, 3, struct.pack("<I", bps_at)),
        (259, 3, 1, struct.pack("<HH", compression, 0)),
        (262, 3, 1, struct.pack("<HH", 2, 0)),
        (277, 3, 1, struct.pack("<HH", 3, 0)),
        (282, 5, 1, struct.pack("<I", res_at)),
        (283, 5, 1, struct.pack("<I", res_at)),
        (284, 3, 1, struct.pack("<HH", 1, 0)),
        (296, 3, 1, struct.pack("<HH", 3, 0)),
        (322, 3, 1, struct.pack("<HH", tile, 0)),
        (323, 3, 1, struct.pack("<HH", tile, 0)),
        (324, 4, count, struct.pack("<I", offs_at) if count > 1 else struct.pack("<I", data_at)),
        (325, 4, count, struct.pack("<I", cnts_at) if count > 1 else struct.pack("<I", len(tile_data))),
    ]
    ifd_at = data_at + len(blob)
    ifd = struct.pack("<H", len(entries))
    for tag, typ, cnt, val in entries:
        ifd += struct.pack("<HHI", tag, typ, cnt) + val.ljust(4, b"\0")
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_at) + bytes(blob) + ifd


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` white RGB pixels (a few hundred KB claiming ~100s of Mpx)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" + b"\xff" * (width * 3)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- TIFF tables


def tiff_tables(data: bytes) -> list[tuple[int, int, int]]:
    """(tag, file offset of its values, value count) of every dimension/tile/strip table entry in a
    classic little- or big-endian TIFF (empty for anything else)."""
    if data[:4] not in (b"II*\x00", b"MM\x00*") or len(data) < 8:
        return []
    e = "<" if data[:2] == b"II" else ">"
    out: list[tuple[int, int, int]] = []
    (off,) = struct.unpack(e + "I", data[4:8])
    seen: set[int] = set()
    while off and off + 2 <= len(data) and off not in seen and len(seen) < 64:
        seen.add(off)
        (n,) = struct.unpack(e + "H", data[off : off + 2])
        for k in range(n):
            p = off + 2 + 12 * k
            if p + 12 > len(data):
                return out
            tag, typ, cnt = struct.unpack(e + "HHI", data[p : p + 8])
            width = {3: 2, 4: 4, 16: 8}.get(typ, 0)
            if tag in (256, 257, 273, 279, 322, 323, 324, 325) and width:
                where = p + 8 if cnt * width <= 4 else struct.unpack(e + "I", data[p + 8 : p + 12])[0]
                out.append((tag, where, cnt * width))
        q = off + 2 + 12 * n
        off = struct.unpack(e + "I", data[q : q + 4])[0] if q + 4 <= len(data) else 0
    return out


# ----------------------------------------------------------------------------- bases


def make_bases(cache: Path) -> dict[str, Path]:
    """Real and synthetic starting files (synthetic ones made once into ``cache``)."""
    bases: dict[str, Path] = {}
    for key, rel in {
        "svs": "CMU-1-Small-Region.svs",
        "ndpi": "hamamatsu_test3-DAPI-2-387.ndpi",
        "ome": "OS-1-detail.ome.tif",
        "dcm_file": "pathml_small_dicom_TCGA-XK-AAJU_sparse.dcm",
        "dicom_dir": "CMU-1-Small-Region_DICOM",
        "boxes": "synthetic_openslide_fixtures/boxes.tiff",
        "small_svs": "synthetic_openslide_fixtures/small.svs",
    }.items():
        if (SHARED / rel).exists():
            bases[key] = SHARED / rel
    cache.mkdir(parents=True, exist_ok=True)
    synth = cache / "synthetic.tiff"
    if not synth.exists():
        from pipeline.synthetic import generate_dataset

        generate_dataset(cache / "gen", n=1, seed=5, mpp=0.5, classes=["nme"], size_um=(1100, 1000), overwrite=True)
        shutil.copy(next((cache / "gen" / "slides").glob("*.tiff")), synth)
    bases["synthetic"] = synth
    big = cache / "synthetic_big.tif"
    plain_png, plain_jpg = cache / "synthetic.png", cache / "synthetic.jpg"
    if not (big.exists() and plain_png.exists() and plain_jpg.exists()):
        import cv2
        import tifffile

        rgb = tifffile.imread(synth, level=0) if hasattr(tifffile, "imread") else None
        assert rgb is not None
        rgb = rgb[:700, :900]
        tifffile.imwrite(
            big, rgb, bigtiff=True, tile=(256, 256), photometric="rgb", compression="zlib",
            resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
        )  # fmt: skip
        cv2.imwrite(str(plain_png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(plain_jpg), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    bases.update(bigtiff=big, png=plain_png, jpg=plain_jpg)
    return bases


#: Bases small enough for the CI subset (fail at the pre-flight check or process in about a second).
SMALL_BASES = ("boxes", "small_svs", "synthetic", "bigtiff", "png", "jpg", "ome")

MUTATIONS = (
    "truncate",
    "flip_header",
    "flip_tables",
    "huge_table_value",
    "absurd_dimensions",
    "random_bytes",
    "zero_length",
    "crafted_huge_claim",
    "crafted_tile_count",
    "bomb",
    "bad_mpp",
    "non_regular",
)


def _suffix(base: Path) -> str:
    name = base.name.lower()
    return ".ome.tif" if name.endswith(".ome.tif") else (base.suffix or ".dcm")


def _flip(data: bytearray, rng: random.Random, lo: int, hi: int, bits: int) -> None:
    hi = max(lo + 1, min(hi, len(data)))
    for _ in range(bits):
        i = rng.randrange(lo, hi)
        data[i] ^= 1 << rng.randrange(8)


def _mutate_bytes(data: bytes, mutation: str, rng: random.Random) -> bytes | None:
    """``data`` mutated; None when the mutation does not apply to this base."""
    buf = bytearray(data)
    tables = tiff_tables(data)
    if mutation == "truncate":
        return bytes(buf[: rng.randrange(1, len(buf))])
    if mutation == "flip_header":
        _flip(buf, rng, 0, 4096, rng.randint(1, 8))
        return bytes(buf)
    if mutation == "flip_tables":
        tabs = [t for t in tables if t[0] in (273, 279, 324, 325)]
        if not tabs:
            return None
        for _ in range(rng.randint(1, 4)):
            _tag, where, nbytes = rng.choice(tabs)
            _flip(buf, rng, where, where + nbytes, 1)
        return bytes(buf)
    if mutation == "huge_table_value":
        tabs = [t for t in tables if t[0] in (273, 279, 324, 325) and t[2] >= 4]
        if not tabs:
            return None
        _tag, where, nbytes = rng.choice(tabs)
        k = where + 4 * rng.randrange(nbytes // 4)
        e = "<" if data[:2] == b"II" else ">"
        buf[k : k + 4] = struct.pack(e + "I", rng.choice([0xFFFFFFF0, 0x7FFFFFFF, len(data) - 2]))
        return bytes(buf)
    if mutation == "absurd_dimensions":
        dims = [t for t in tables if t[0] in (256, 257)]
        if not dims:
            return None
        tag, where, nbytes = rng.choice(dims)
        e = "<" if data[:2] == b"II" else ">"
        value = rng.choice([200_000, 2**31 - 1, 0, 1, 65_535])
        buf[where : where + nbytes] = struct.pack(
            e + ("H" if nbytes == 2 else "I"), min(value, 65_535) if nbytes == 2 else value
        )
        return bytes(buf)
    if mutation == "bad_mpp":
        m = re.search(rb"MPP = [0-9.]+", data[:200_000])
        if m is None:
            return None
        new = rng.choice([b"MPP = 0", b"MPP = 9e99", b"MPP = nan", b"MPP = -1", b"MPP = x", b"MPP = 35"])
        buf[m.start() : m.end()] = new.ljust(m.end() - m.start())[: m.end() - m.start()]
        return bytes(buf)
    return None


def make_corpus(out: Path, n: int, seed: int, cache: Path, small_only: bool = False) -> list[Item]:
    """Write ``n`` mutated entries into ``out`` (fresh); the same (n, seed, bases) give the same files."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    bases = make_bases(cache)
    names = sorted(k for k in bases if not small_only or k in SMALL_BASES)
    rng = random.Random(seed)
    items: list[Item] = []
    attempts = 0
    while len(items) < n and attempts < n * 20:
        attempts += 1
        mutation = rng.choice(MUTATIONS)
        key = rng.choice(names)
        base = bases[key]
        stem = f"f{len(items):03d}_{key}_{mutation}"
        if mutation in (
            "random_bytes",
            "zero_length",
            "non_regular",
            "bomb",
            "crafted_huge_claim",
            "crafted_tile_count",
        ):
            item = _special(out, stem, key, base, mutation, rng, small_only)
            if item is not None:
                items.append(item)
            continue
        if base.is_dir():  # a DICOM folder: mutate one of its files
            if mutation in ("flip_tables", "huge_table_value", "absurd_dimensions", "bad_mpp"):
                continue
            folder = out / stem
            shutil.copytree(base, folder)
            victim = rng.choice(sorted(folder.glob("*.dcm")))
            mutated = _mutate_bytes(victim.read_bytes(), mutation, rng)
            assert mutated is not None
            victim.write_bytes(mutated)
            items.append(Item(folder.name, key, mutation, "slide"))
            continue
        mutated = _mutate_bytes(base.read_bytes(), mutation, rng)
        if mutated is None:
            continue
        path = out / (stem + _suffix(base))
        path.write_bytes(mutated)
        items.append(Item(path.name, key, mutation, "slide"))
    return items


def _special(out: Path, stem: str, key: str, base: Path, mutation: str, rng: random.Random, small: bool) -> Item | None:
    suffix = rng.choice([".svs", ".tif", ".tiff", ".ndpi", ".dcm", ".png", ".jpg", ".scn", ".bif", ".mrxs"])
    if mutation == "random_bytes":
        path = out / (stem + suffix)
        path.write_bytes(rng.randbytes(rng.choice([1, 7, 100, 4096, 65_536, 300_000])))
    elif mutation == "zero_length":
        path = out / (stem + suffix)
        path.write_bytes(b"")
    elif mutation == "non_regular":
        kind = rng.choice(["fifo", "socket", "broken_link", "link_loop"])
        path = out / f"{stem}_{kind}{rng.choice(['.svs', '.tiff'])}"
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            try:
                s.bind(str(path))
            except OSError:  # path too long for a socket: a FIFO instead
                os.mkfifo(path)
            finally:
                s.close()
        elif kind == "broken_link":
            path.symlink_to(out / "no-such-file.svs")
        else:
            path.symlink_to(path)
        return Item(path.name, key, f"non_regular:{kind}", "skip")
    elif mutation == "bomb":
        path = out / (stem + (".png" if rng.random() < 0.3 else ".tiff"))
        if path.suffix == ".png":
            path.write_bytes(png_bomb(11_000, 10_000))
        else:
            side = rng.choice([20_000, 30_000] if small else [30_000, 50_000, 100_000])
            path.write_bytes(tiff_bytes(side, side, tile=512))
    elif mutation == "crafted_huge_claim":
        path = out / (stem + ".tiff")
        side = rng.choice([200_000, 1_000_000, 3_000_000])
        path.write_bytes(tiff_bytes(side, side, tile=256, n_tiles=1))
    else:  # crafted_tile_count
        path = out / (stem + ".tif")
        if rng.random() < 0.5:
            path.write_bytes(tiff_bytes(2048, 2048, tile=16, n_tiles=rng.choice([1, 100, 16_383])))
        else:
            path.write_bytes(tiff_bytes(1024, 1024, resolution=rng.choice([(0, 0), (1, 0), (10**9, 1), (1, 10**6)])))
    return Item(path.name, key if mutation != "random_bytes" else "none", mutation, "slide")


# ----------------------------------------------------------------------------- judging


def slide_id(name: str) -> str:
    for s in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return Path(name).stem if "." in name else name


def judge(item: Item, out: Path, skipped: dict[str, str], limit_s: float) -> tuple[bool, str, float | None]:
    """(handled cleanly?, why not / the outcome, the slide's own seconds)."""
    if item.entry == "skip":
        reason = next((r for p, r in skipped.items() if Path(p).name == item.name), None)
        return (reason is not None and not INTERNAL.search(reason)), f"skipped: {reason}", None
    path = out / slide_id(item.name) / "result.json"
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False, "no result.json", None
    seconds = (res.get("timings") or {}).get("total")
    status, err = res.get("status"), res.get("error") or ""
    if status in ("ok", "non_diagnostic"):
        return True, status, seconds
    problems = []
    if "\n" in err:
        problems.append("multi-line")
    if INTERNAL.search(err):
        problems.append("internal exception name")
    if slide_id(item.name) not in err:
        problems.append("file not named")
    m = re.search(r"unsupported (?:format|file type) '(\.[a-z]+)'", err)
    if m and m.group(1) in err.split("expected one of", 1)[-1]:
        problems.append("self-contradictory")
    if "timed out" in err:
        problems.append(f"over the {limit_s:g} s limit")
    return not problems, f"failed: {err}" + (f" [{', '.join(problems)}]" if problems else ""), seconds


#: Runs ``argv[2:]``, writes the largest resident set of its reaped children (kB) to ``argv[1]``.
_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


def _processes_with(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "environ").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def run_fuzz(
    n: int, seed: int, work: Path, limit_s: float, small_only: bool = False, model: Path | None = None
) -> dict:
    """Make the corpus, run the batch over it, judge every entry; the report (also ``work/fuzz.json``)."""
    corpus, out = work / "corpus", work / "out"
    items = make_corpus(corpus, n, seed, work / "bases", small_only)
    if out.exists():
        shutil.rmtree(out)
    marker = f"NME_FUZZ_RUN={os.getpid()}-{time.time_ns()}"
    env = dict(os.environ, **dict([marker.split("=", 1)]))
    cmd = [sys.executable, str(REPO / "infer.py"), str(corpus), "--out", str(out), "--quiet"]
    cmd += ["--slide-timeout", f"{limit_s:g}"] + (["--model", str(model)] if model else [])
    # A fresh launcher process runs the batch and reports the peak of its own children only: this
    # process's RUSAGE_CHILDREN would also count every earlier child (e.g. other tests' subprocesses).
    peak_file = work / "peak_rss_kb.txt"
    launch = [sys.executable, "-c", _LAUNCHER, str(peak_file)]
    t = time.perf_counter()
    proc = subprocess.run(launch + cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    try:
        peak_kb = int(peak_file.read_text())
    except (OSError, ValueError):
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    time.sleep(1.0)
    left = _processes_with(marker)
    try:
        run = json.loads((out / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        run = {}
    skipped = {s["path"]: s["reason"] for s in run.get("skipped_inputs", [])}
    verdicts = [(item, *judge(item, out, skipped, limit_s)) for item in items]
    secs = sorted(s for *_, s in verdicts if s is not None)
    bad = [{"file": i.name, "mutation": i.mutation, "outcome": why} for i, ok, why, _ in verdicts if not ok]
    by_mutation: dict[str, list[int]] = {}
    for i, ok, _, _ in verdicts:
        by_mutation.setdefault(i.mutation.split(":")[0], [0, 0])[0 if ok else 1] += 1
    report = {
        "files": len(items),
        "seed": seed,
        "handled_pct": round(100 * sum(ok for _, ok, _, _ in verdicts) / max(1, len(items)), 2),
        "exit_status": proc.returncode,
        "traceback": "Traceback" in proc.stderr,
        "wall_s": round(wall, 1),
        "s_per_file": round(wall / max(1, len(items)), 3),
        "slide_total_s_median": secs[len(secs) // 2] if secs else None,
        "slide_total_s_max": secs[-1] if secs else None,
        "over_time_limit": sum("timed out" in why for _, _, why, _ in verdicts),
        "slide_timeout_s": limit_s,
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "left_running": left,
        "statuses": run.get("counts", {}),
        "by_mutation": {k: {"handled": v[0], "not": v[1]} for k, v in sorted(by_mutation.items())},
        "not_handled": bad,
        "items": [asdict(i) | {"handled": ok, "outcome": why} for i, ok, why, _ in verdicts],
    }
    (work / "fuzz.json").write_text(json.dumps(report, indent=1))
    return report


def table(report: dict) -> str:
    lines = [
        f"fuzz corpus: {report['files']} files (seed {report['seed']}), exit status {report['exit_status']}",
        f"handled cleanly: {report['handled_pct']} %   over the {report['slide_timeout_s']:g} s limit: "
        f"{report['over_time_limit']}   peak RSS: {report['peak_rss_mb']} MB   left running: {len(report['left_running'])}",
        f"time: {report['wall_s']} s in all, {report['s_per_file']} s/file; slide's own total median "
        f"{report['slide_total_s_median']} s, max {report['slide_total_s_max']} s",
        "",
        f"{'mutation':<22}{'handled':>9}{'not':>6}",
    ]
    lines += [f"{k:<22}{v['handled']:>9}{v['not']:>6}" for k, v in report["by_mutation"].items()]
    lines += [f"NOT HANDLED {b['file']}: {b['outcome']}" for b in report["not_handled"][:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=320, help="corpus size (default 320)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--subset", choices=["all", "ci"], default="all", help="ci: 40 files of small bases")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "fuzz", help="work folder (corpus, out, fuzz.json)")
    ap.add_argument("--slide-timeout", type=float, default=120.0, help="--slide-timeout of the batch (s)")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = ap.parse_args(argv)
    small = args.subset == "ci"
    n = 40 if small else args.n
    report = run_fuzz(n, args.seed, args.out, args.slide_timeout, small_only=small, model=args.model)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "items"}))
    else:
        print(table(report))
    return 0 if report["handled_pct"] == 100 and not report["left_running"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
