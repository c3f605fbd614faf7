"""Shared fixtures: paths to the real slides in ../shared and small slides made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_SLIDES = (REPO.parent / "shared" / "data" / "slides").resolve()


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """../shared/data/slides, or skip with the reason when a plain clone has no ../shared."""
    if not (SHARED_SLIDES / "MANIFEST.md").is_file():
        pytest.skip(f"real slides not available: {SHARED_SLIDES} is absent (CI has it)")
    return SHARED_SLIDES


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 256) -> Path:
    """A JPEG-tiled pyramidal TIFF with resolution tags in cm (OpenSlide generic-tiff)."""
    import cv2
    import tifffile

    kwargs = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        img = rgb
        for lv in range(levels):
            if lv:
                img = cv2.resize(
                    img, (max(1, img.shape[1] // 2), max(1, img.shape[0] // 2)), interpolation=cv2.INTER_AREA
                )
            lk = dict(kwargs)
            if mpp is not None and lv:
                f = 2**lv
                lk["resolution"] = (1e4 / (mpp * f), 1e4 / (mpp * f))
            tw.write(
                img,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subfiletype=1 if lv else 0,
                **lk,
            )
    return path


def skin_like_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A crude section on glass: pink 'dermis' band, purple 'epidermis' strip, pale 'keratin' on top.

    Only for reader/tiling tests (the realistic generator is pipeline.synthetic).
    """
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), (244, 243, 241), np.uint8)
    top = height // 3
    img[top : top + height // 12] = (236, 222, 232)  # pale orthokeratin
    img[top + height // 12 : top + height // 4] = (150, 90, 160)  # epidermis
    img[top + height // 4 : height - height // 8] = (225, 150, 185)  # dermis
    noise = rng.integers(-6, 7, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def tiny_slide(tmp_path: Path) -> Path:
    """A 1600x1200 px pyramidal TIFF at 0.5 µm/px with a skin-like band."""
    return write_pyramid_tiff(tmp_path / "tiny.tiff", skin_like_image(1600, 1200), mpp=0.5)


def assert_results_match_schema(out_dir: Path) -> dict[str, dict]:
    """Every ``*/result.json`` under ``out_dir`` validates against the JSON Schema that
    ``python -m pipeline schema result`` prints (with the jsonschema library) and reads back as a
    :class:`pipeline.result.SlideResult`; returns {slide_id: result dict}."""
    import json

    import jsonschema

    from pipeline.result import parse_result, result_json_schema

    schema = result_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    out = {}
    for path in sorted(Path(out_dir).glob("*/result.json")):
        data = json.loads(path.read_text())
        errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
        assert not errors, f"{path}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        assert parse_result(data).to_json_dict() == data
        out[data["slide_id"]] = data
    assert out, f"no result.json under {out_dir}"
    return out


# --------------------------------------------------------------------------- real browser (Chromium)
#: Debian's Chromium (``make browser`` installs it); browser tests skip without it.
CHROMIUM = Path("/usr/bin/chromium")
#: Headless, and no background connections (this machine's network is closed).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
