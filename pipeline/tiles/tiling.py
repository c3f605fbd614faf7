"""Tile grid over the tissue, in level-0 coordinates, with provenance.

One place decides tile geometry for the product. A tile is ``tile_px`` × ``tile_px`` pixels
read at the slide's *effective* MPP (see :meth:`pipeline.reading.slide.Slide.plan`); its level-0
footprint is ``tile_px * effective_mpp / slide_mpp`` pixels (may be fractional; coordinates are
rounded to integer level-0 pixels). The grid starts at the slide bounds' top-left and keeps
tiles that lie fully inside the bounds and whose tissue fraction (from the thumbnail mask)
is at least ``min_tissue``.

On-disk format (readable by CLAM/TRIDENT-style tools), per slide in the output folder:

* ``<slide_id>.h5``: dataset ``/coords`` (N, 2) int64 level-0 top-left (x, y), attributes
  ``patch_size`` (px at the read level), ``patch_level`` (0: coordinates are level 0),
  ``patch_size_level0``, ``patch_spacing_um_px`` (effective MPP), ``target_mpp``,
  ``read_level``, ``slide_mpp``; dataset ``/tissue_fraction`` (N,) float32.
* ``<slide_id>.tiles.json``: provenance (slide path, fingerprint, reader, MPP requested vs
  effective, tile size, parameters, package versions, timings).
* ``<slide_id>_preview.png``: thumbnail + tissue contour + tile grid, to check at a glance.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field, model_validator

from pipeline.core.config import StrictModel
from pipeline.core.errors import SlideError
from pipeline.core.io import atomic_path, atomic_write_json
from pipeline.reading.slide import DEFAULT_MPP_TOLERANCE, ReadPlan, Slide
from pipeline.tiles.tissue import TissueConfig, TissueMask, detect_tissue

log = logging.getLogger(__name__)

#: Grid positions looked at a time by :func:`make_grid` (whole rows of the grid).
GRID_BLOCK_TILES = 1 << 16


class TilingConfig(StrictModel):
    """Tile grid parameters."""

    target_mpp: float = Field(0.5, gt=0, description="Resolution tiles are read at, µm/px.")
    mpp_tolerance: float = Field(
        DEFAULT_MPP_TOLERANCE, ge=0, lt=1, description="Relative tolerance for using a pyramid level as is."
    )
    tile_px: int = Field(224, ge=16, le=4096, description="Tile width and height in pixels at the target MPP.")
    overlap: float = Field(0.0, ge=0, lt=1, description="Fractional overlap of neighbouring tiles (0 = abutting).")
    min_tissue: float = Field(0.1, ge=0, le=1, description="Minimum tissue fraction of a tile (0-1).")
    tissue: TissueConfig = Field(default_factory=TissueConfig, description="Tissue detector parameters.")

    @model_validator(mode="after")
    def _stride_positive(self) -> TilingConfig:
        if round(self.tile_px * (1 - self.overlap)) < 1:
            raise ValueError("overlap leaves a stride below one pixel")
        return self


@dataclass
class TileGrid:
    """Tiles of one slide.

    Attributes:
        coords: int64 (N, 2) level-0 top-left (x, y).
        tissue_fraction: float32 (N,) tissue fraction of each tile.
        tile_px: tile size at the read level, px.
        tile_size_l0: level-0 footprint of a tile, px (float).
        plan: how tiles are read (level, requested and effective MPP).
        slide_mpp: level-0 µm/px of the slide.
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    tile_px: int
    tile_size_l0: float
    stride_l0: float
    plan: ReadPlan
    slide_mpp: float
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _tissue_fraction_of_boxes(mask: TissueMask, boxes_l0: np.ndarray, slide_mpp: float) -> np.ndarray:
    """Mean of ``mask`` over level-0 boxes (N, 4: x0, y0, x1, y1), clipped to the mask.

    Boxes sharing their rows (a row of the grid) are summed together from the column sums of
    those mask rows: no integral image of the whole mask (8 bytes per mask pixel), the same
    whole-number sums.
    """
    m = mask.mask
    h, w = m.shape
    scale = slide_mpp / mask.mpp
    ox, oy = mask.origin
    x0 = np.clip(np.floor((boxes_l0[:, 0] - ox) * scale), 0, w).astype(np.int64)
    y0 = np.clip(np.floor((boxes_l0[:, 1] - oy) * scale), 0, h).astype(np.int64)
    x1 = np.clip(np.ceil((boxes_l0[:, 2] - ox) * scale), 0, w).astype(np.int64)
    y1 = np.clip(np.ceil((boxes_l0[:, 3] - oy) * scale), 0, h).astype(np.int64)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    s = np.zeros(len(boxes_l0), np.float64)
    rows = y0 * (h + 1) + y1
    order = np.argsort(rows, kind="stable")
    keys, starts = np.unique(rows[order], return_index=True)
    col = np.zeros(w + 1, np.int64)
    for key, idx in zip(keys.tolist(), np.split(order, starts[1:])):
        a, b = divmod(key, h + 1)
        if b <= a:
            continue
        np.cumsum(np.count_nonzero(m[a:b], axis=0), out=col[1:])
        s[idx] = col[x1[idx]] - col[x0[idx]]
    return (s / area).astype(np.float32)


def make_grid(slide: Slide, mask: TissueMask, config: TilingConfig) -> TileGrid:
    """Tile grid over ``slide``'s tissue. Raises SlideError if not even one tile fits the slide."""
    plan = slide.plan(config.target_mpp, config.mpp_tolerance)
    size_l0 = slide.level0_size(config.tile_px, plan)
    stride_l0 = slide.level0_size(max(1, int(round(config.tile_px * (1 - config.overlap)))), plan)
    bx, by, bw, bh = slide.bounds
    nx = int(math.floor((bw - size_l0) / stride_l0)) + 1 if bw >= size_l0 else 0
    ny = int(math.floor((bh - size_l0) / stride_l0)) + 1 if bh >= size_l0 else 0
    if nx <= 0 or ny <= 0:
        w_um, h_um = bw * slide.mpp, bh * slide.mpp
        raise SlideError(
            f"{slide.path}: slide smaller than one tile ({bw}x{bh} px = {w_um:.0f}x{h_um:.0f} µm; "
            f"a tile is {config.tile_px} px at {plan.effective_mpp:.3f} µm/px = {config.tile_px * plan.effective_mpp:.0f} µm)"
        )
    # rows of the grid a block at a time: memory follows the tiles kept (the tissue), not the slide's area
    rows = max(1, GRID_BLOCK_TILES // nx)
    kept_xy, kept_frac = [], []
    for j0 in range(0, ny, rows):
        gx, gy = np.meshgrid(np.arange(nx), np.arange(j0, min(ny, j0 + rows)))
        xs = np.round(bx + gx.ravel() * stride_l0).astype(np.int64)
        ys = np.round(by + gy.ravel() * stride_l0).astype(np.int64)
        boxes = np.stack([xs, ys, xs + size_l0, ys + size_l0], axis=1).astype(np.float64)
        frac = _tissue_fraction_of_boxes(mask, boxes, slide.mpp)
        keep = frac >= max(config.min_tissue, 1e-9)
        kept_xy.append(np.stack([xs[keep], ys[keep]], axis=1))
        kept_frac.append(frac[keep])
    return TileGrid(
        coords=np.concatenate(kept_xy),
        tissue_fraction=np.concatenate(kept_frac),
        tile_px=config.tile_px,
        tile_size_l0=float(size_l0),
        stride_l0=float(stride_l0),
        plan=plan,
        slide_mpp=slide.mpp,
        params=config.model_dump(mode="json"),
    )


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide pixels and numbers (for provenance)."""
    from importlib import metadata

    import pipeline

    out = {"nme-pathology": pipeline.__version__}
    for name in (
        "numpy",
        "opencv-python-headless",
        "openslide-python",
        "openslide-bin",
        "tifffile",
        "torch",
        "torchvision",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import openslide

        out["openslide-library"] = openslide.__library_version__
    except Exception:  # noqa: BLE001
        pass
    return out


def render_preview(thumbnail: np.ndarray, mask: TissueMask, grid: TileGrid) -> np.ndarray:
    """Thumbnail with the tissue contour (green) and kept tiles (blue boxes); RGB uint8."""
    vis = thumbnail.copy()
    scale = grid.slide_mpp / mask.mpp
    ox, oy = mask.origin
    overlay = vis.copy()
    for x, y in grid.coords:
        p0 = (int(round((x - ox) * scale)), int(round((y - oy) * scale)))
        p1 = (
            int(round((x - ox + grid.tile_size_l0) * scale)) - 1,
            int(round((y - oy + grid.tile_size_l0) * scale)) - 1,
        )
        cv2.rectangle(overlay, p0, p1, (40, 90, 230), 1)
    vis = cv2.addWeighted(overlay, 0.55, vis, 0.45, 0)
    contours, _ = cv2.findContours(mask.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(vis, contours, -1, (0, 170, 0), max(1, round(min(vis.shape[:2]) / 500)))
    return vis


def write_tiles(out_dir: Path, slide: Slide, grid: TileGrid, provenance: dict[str, Any]) -> dict[str, Path]:
    """Write ``<slide_id>.h5`` and ``<slide_id>.tiles.json`` atomically; returns their paths."""
    import h5py

    out_dir.mkdir(parents=True, exist_ok=True)
    h5_path = out_dir / f"{slide.slide_id}.h5"
    with atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as f:
        d = f.create_dataset("coords", data=grid.coords.astype(np.int64))
        d.attrs["patch_size"] = grid.tile_px
        d.attrs["patch_level"] = 0
        d.attrs["patch_size_level0"] = grid.tile_size_l0
        d.attrs["patch_spacing_um_px"] = grid.plan.effective_mpp
        d.attrs["target_mpp"] = grid.plan.requested_mpp
        d.attrs["read_level"] = grid.plan.level
        d.attrs["slide_mpp"] = grid.slide_mpp
        d.attrs["coordinate_space"] = "level-0 pixels, top-left (x, y)"
        f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
    json_path = atomic_write_json(out_dir / f"{slide.slide_id}.tiles.json", provenance)
    return {"coords": h5_path, "provenance": json_path}


def read_tiles(h5_path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read back ``/coords`` (N, 2) and its attributes."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        coords = f["coords"][:]
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f["coords"].attrs.items()}
    return coords, attrs


def tile_slide(slide: Slide, config: TilingConfig | None = None) -> tuple[TileGrid, TissueMask, np.ndarray, float]:
    """Tissue detection + grid. Returns (grid, mask, thumbnail, seconds spent)."""
    cfg = config or TilingConfig()
    t0 = time.perf_counter()
    mask, thumb = detect_tissue(slide, cfg.tissue)
    grid = make_grid(slide, mask, cfg)
    return grid, mask, thumb, time.perf_counter() - t0


def provenance_record(slide: Slide, grid: TileGrid, mask: TissueMask, seconds: float) -> dict[str, Any]:
    """Everything needed to reproduce or audit a tile set (hs2p-style)."""
    return {
        "slide_id": slide.slide_id,
        "slide_path": str(slide.path.resolve()),
        "fingerprint": slide.fingerprint(),
        "reader": slide.reader_name,
        "dimensions_level0": list(slide.dimensions),
        "bounds_level0": list(slide.bounds),
        "mpp": {
            "slide": slide.mpp,
            "slide_source": slide.mpp_source,
            "requested": grid.plan.requested_mpp,
            "effective": grid.plan.effective_mpp,
            "read_level": grid.plan.level,
            "read_level_mpp": grid.plan.level_mpp,
            "resized": grid.plan.resized,
        },
        "tile": {"size_px": grid.tile_px, "size_level0": grid.tile_size_l0, "stride_level0": grid.stride_l0},
        "n_tiles": len(grid),
        "tissue_fraction": round(mask.tissue_fraction, 6),
        "tissue_area_mm2": round(mask.tissue_area_mm2, 4),
        "tissue_flags": mask.flags,
        "parameters": grid.params,
        "coordinates": "level-0 pixels, top-left (x, y) of each tile",
        "versions": package_versions(),
        "seconds": round(seconds, 4),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.tiles.tiling SLIDE --out DIR [--mpp M] [--target-mpp 0.5] [--tile 224]``."""
    import argparse
    import json
    import sys

    from pipeline.core.cli import setup_logging
    from pipeline.core.io import atomic_write_bytes
    from pipeline.reading.slide import open_slide

    ap = argparse.ArgumentParser(prog="python -m pipeline.tiles.tiling", description=main.__doc__)
    ap.add_argument("slide", help="slide file or DICOM folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--mpp", type=float, default=None, help="override the slide's level-0 µm/px")
    ap.add_argument("--target-mpp", type=float, default=0.5, help="µm/px tiles are read at (default 0.5)")
    ap.add_argument("--tile", type=int, default=224, help="tile size in px at the target MPP (default 224)")
    ap.add_argument("--overlap", type=float, default=0.0, help="fractional overlap of tiles (default 0)")
    ap.add_argument("--min-tissue", type=float, default=0.1, help="minimum tissue fraction per tile (default 0.1)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(quiet=args.quiet)
    from pipeline.core.config import validate

    cfg = validate(
        TilingConfig,
        {"target_mpp": args.target_mpp, "tile_px": args.tile, "overlap": args.overlap, "min_tissue": args.min_tissue},
        "command line",
    )
    out = Path(args.out)
    with open_slide(args.slide, mpp=args.mpp) as slide:
        grid, mask, thumb, seconds = tile_slide(slide, cfg)
        record = provenance_record(slide, grid, mask, seconds)
        paths = write_tiles(out, slide, grid, record)
        preview = render_preview(thumb, mask, grid)
        ok, png = cv2.imencode(".png", cv2.cvtColor(preview, cv2.COLOR_RGB2BGR))
        paths["preview"] = atomic_write_bytes(out / f"{slide.slide_id}_preview.png", png.tobytes())
    line = {
        "slide_id": record["slide_id"],
        "n_tiles": record["n_tiles"],
        "tissue_fraction": record["tissue_fraction"],
        "mpp": record["mpp"]["slide"],
        "requested_mpp": record["mpp"]["requested"],
        "effective_mpp": record["mpp"]["effective"],
        "tile_size_level0": record["tile"]["size_level0"],
        "flags": record["tissue_flags"],
        "seconds": record["seconds"],
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    sys.stdout.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    from pipeline.core.cli import run_cli

    run_cli(main)
