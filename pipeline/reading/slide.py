"""Open any supported whole-slide image and read regions in physical units.

One place decides resolution handling for the whole product:

* Resolution is always **microns per pixel (µm/px) at level 0**. It comes from OpenSlide
  properties (``openslide.mpp-x``), TIFF resolution tags or OME metadata, or an explicit
  per-slide override. A missing value is an error naming the slide and ``--mpp``; a value
  outside :data:`MPP_RANGE` is rejected, never used. Nothing is guessed.
* Coordinates are **level-0 pixels** of the full image, origin top-left (what
  ``OpenSlide.read_region`` takes). ``openslide.bounds-*`` (MRXS and others) only restricts
  where tissue is searched: see :attr:`Slide.bounds`.
* A region is read at a *target* MPP within a tolerance (default ±10 %): the coarsest pyramid
  level whose MPP is within tolerance is read as is (effective MPP = that level's MPP);
  otherwise the nearest finer level is read and resized (effective MPP = target).

Readers: OpenSlide for every format it detects (``openslide.OpenSlide``, never
``open_slide``, which silently falls back to PIL), tifffile for TIFF/OME-TIFF that OpenSlide
does not detect, PIL for plain PNG/JPEG (bounded by a pixel limit).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import sys
import warnings
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from pipeline.core.errors import MPPError, SlideError
from pipeline.reading.diagnose import check_file, file_kind, sniff

if TYPE_CHECKING:
    import tifffile

log = logging.getLogger(__name__)

#: Plausible resolutions for brightfield WSIs, µm/px (about 100x down to 5x).
MPP_RANGE: tuple[float, float] = (0.1, 2.0)
#: Default relative tolerance when matching a pyramid level to a requested MPP.
DEFAULT_MPP_TOLERANCE = 0.10
#: Largest plain image (PNG/JPEG) decoded whole, in pixels (PIL's own bomb limit is ~179 Mpx).
MAX_PLAIN_IMAGE_PIXELS = 100_000_000

PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
TIFF_SUFFIXES = {".tif", ".tiff", ".btf"}
#: File suffixes recognised as slides when scanning folders (DICOM folders are found separately).
SLIDE_SUFFIXES = {
    ".svs",
    ".ndpi",
    ".mrxs",
    ".vms",
    ".vmu",
    ".scn",
    ".svslide",
    ".bif",
    ".dcm",
    *TIFF_SUFFIXES,
    *PLAIN_IMAGE_SUFFIXES,
}


def _words(exc: BaseException, limit: int = 200) -> str:
    """A library exception's own words for a user's message (never its type name), on one line."""
    text = " ".join(str(exc).split())[:limit]
    return text or "no further detail"


def _check_mpp(value: float, slide: str, source: str) -> float:
    """Return ``value`` if it is a plausible level-0 MPP, else raise :class:`MPPError`."""
    lo, hi = MPP_RANGE
    if not (isinstance(value, (int, float)) and math.isfinite(value)) or not lo <= value <= hi:
        raise MPPError(
            f"{slide}: implausible resolution {value!r} µm/px from {source} "
            f"(expected {lo}-{hi}); pass the true value with --mpp (or an 'mpp' column in the slide table)"
        )
    return float(value)


def missing_mpp_error(slide: str | Path) -> MPPError:
    """The error for a slide whose metadata carries no resolution."""
    return MPPError(
        f"{slide}: no resolution (microns per pixel) in the slide metadata; "
        "pass it with --mpp M (or an 'mpp' column in the slide table), e.g. --mpp 0.25 for 40x or 0.5 for 20x"
    )


#: Read levels coarser than the stored one by scaled JPEG decoding where possible (see
#: :func:`scaled_decode_factor`); False reads every pixel and resizes (the pixels of earlier versions).
SCALED_JPEG_DECODE = True


def scaled_decode_factor(scale: float, slack: float = 0.02) -> int:
    """Largest of 8, 4, 2 that a read at ``scale`` level pixels per output pixel may decode at
    1/that size (JPEG DCT scaling), else 1.

    ``slack``: how far below ``scale`` the factor may be (0.02: a 0.2527 µm/px scan read at
    0.5 µm/px, scale 1.979, decodes at 1/2 and enlarges the rest by 1 %).
    """
    for k in (8, 4, 2):
        if scale >= k * (1 - slack):
            return k
    return 1


@dataclass(frozen=True)
class ReadPlan:
    """How a region at ``requested_mpp`` is read: which level, and the MPP really delivered."""

    level: int
    level_mpp: float
    requested_mpp: float
    effective_mpp: float

    @property
    def resized(self) -> bool:
        return not math.isclose(self.level_mpp, self.effective_mpp, rel_tol=1e-9)


class SlideReader(ABC):
    """Backend: pixel access to a pyramid. Coordinates are level-0 pixels."""

    name: str = "abstract"

    @property
    @abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) of every level, level 0 first."""

    @property
    def level_downsamples(self) -> list[float]:
        w0 = self.level_dimensions[0][0]
        return [w0 / w for w, _ in self.level_dimensions]

    @abstractmethod
    def native_mpp(self) -> tuple[float | None, str]:
        """(level-0 MPP or None, where it came from)."""

    def bounds(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the non-empty area in level-0 pixels."""
        w, h = self.level_dimensions[0]
        return 0, 0, w, h

    @abstractmethod
    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 array (height, width, 3) at ``level``; (x0, y0) in level-0 pixels.

        Pixels outside the image are white.
        """

    def properties(self) -> dict[str, str]:
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for readers that hold nothing  # pragma: no cover
        pass


# ----------------------------------------------------------------------------- OpenSlide


class OpenSlideReader(SlideReader):
    """Every format OpenSlide detects (SVS, NDPI, MRXS, generic tiled TIFF, DICOM, ...)."""

    name = "openslide"

    def __init__(self, path: Path, display: str) -> None:
        import openslide

        self._openslide = openslide
        self.path = path
        self.display = display
        self._handle = self._open()
        self._tiff: tifffile.TiffFile | None = (
            None  # direct JPEG tile reads (pipeline.reading.tiff_tiles), made on the first read
        )
        self._direct: dict[int, Any] | None = None
        self._direct_ok: dict[int, bool] = {}
        self._downsamples: list[float] = []

    @property
    def _h(self):
        """The OpenSlide handle, reopened if the last read broke it."""
        if self._handle is None:
            self._handle = self._open()
        return self._handle

    def _open(self):
        try:
            return self._openslide.OpenSlide(str(self.path))
        except self._openslide.OpenSlideError as exc:
            raise SlideError(f"{self.display}: OpenSlide cannot open it ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - any backend failure is the slide's failure
            raise SlideError(f"{self.display}: cannot be opened: damaged or unsupported ({_words(exc)})") from None

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(int(w), int(h)) for w, h in self._h.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._h.level_downsamples]

    def properties(self) -> dict[str, str]:
        return dict(self._h.properties)

    def native_mpp(self) -> tuple[float | None, str]:
        props = self._h.properties
        mx, my = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        if mx:
            try:
                vx = float(mx)
                vy = float(my) if my else vx
            except ValueError:
                raise MPPError(f"{self.display}: openslide.mpp-x is not a number ({mx!r}); pass --mpp") from None
            if vy and abs(vx - vy) / max(vx, vy) > 0.05:
                log.warning("%s: non-square pixels (mpp-x %.4f, mpp-y %.4f); using mpp-x", self.display, vx, vy)
            return vx, "openslide.mpp-x"
        unit = props.get("tiff.ResolutionUnit", "").lower()
        xres = props.get("tiff.XResolution")
        if xres and unit in ("centimeter", "inch"):
            try:
                per_unit = float(xres)
            except ValueError:
                return None, "none"
            if per_unit > 0:
                microns = 10_000.0 if unit == "centimeter" else 25_400.0
                return microns / per_unit, f"tiff.XResolution ({unit})"
        return None, "none"

    def bounds(self) -> tuple[int, int, int, int]:
        props = self._h.properties
        w0, h0 = self.level_dimensions[0]
        try:
            x = int(props.get("openslide.bounds-x", 0))
            y = int(props.get("openslide.bounds-y", 0))
            w = int(props.get("openslide.bounds-width", w0 - x))
            h = int(props.get("openslide.bounds-height", h0 - y))
        except ValueError:
            return 0, 0, w0, h0
        return x, y, w, h

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        from pipeline.reading.tiff_tiles import TileDecodeError

        x0, y0, level, width, height = int(x0), int(y0), int(level), int(width), int(height)
        try:
            direct = self._direct_source(level)
            if direct is not None:
                source, ds = direct
                if x0 % ds == 0 and y0 % ds == 0:
                    return source.read(x0 // ds, y0 // ds, width, height)
            return self._openslide_rgb(x0, y0, level, width, height)
        except self._openslide.OpenSlideError as exc:
            # A handle that hit a decode error stays broken: drop it, reopen on the next read.
            try:
                self._handle.close()
            except Exception:  # noqa: BLE001
                pass
            self._handle = None
            raise SlideError(f"{self.display}: corrupt image data at ({x0}, {y0}) level {level} ({exc})") from None
        except TileDecodeError as exc:
            raise SlideError(f"{self.display}: corrupt image data at ({x0}, {y0}) level {level} ({exc})") from None

    def read_scaled(self, x0: int, y0: int, level: int, shrink: int, width: int, height: int) -> np.ndarray | None:
        """RGB uint8 (height, width, 3) of ``level`` at 1/``shrink`` of its resolution by scaled JPEG
        decoding (:mod:`pipeline.reading.tiff_tiles`), or None where that is not possible (no
        verified direct source for the level, origin off the reduced grid): then use :meth:`read`.
        (x0, y0) in level-0 pixels; one output pixel covers ``shrink`` x ``shrink`` level pixels.
        """
        from pipeline.reading.tiff_tiles import TileDecodeError

        x0, y0, level, width, height = int(x0), int(y0), int(level), int(width), int(height)
        direct = self._direct_source(level)
        if direct is None:
            return None
        source, ds = direct
        step = ds * shrink
        if x0 % step or y0 % step or not source.scaled_decode_ok(shrink):
            return None
        try:
            return source.read(x0 // step, y0 // step, width, height, shrink=shrink)
        except TileDecodeError as exc:
            raise SlideError(f"{self.display}: corrupt image data at ({x0}, {y0}) level {level} ({exc})") from None

    def _openslide_rgb(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """The region as OpenSlide paints it, over white, RGB uint8 (raises ``OpenSlideError``)."""
        raw = self._read_raw(x0, y0, level, width, height)
        if raw is not None:
            return _premultiplied_bgra_over_white(raw)
        region = self._h.read_region((x0, y0), level, (width, height))
        return _rgba_over_white(np.asarray(region, dtype=np.uint8))

    def _direct_source(self, level: int):
        """(the level's :class:`pipeline.reading.tiff_tiles.TiffLevelSource`, its integer downsample) if it may be used, else None.

        Made on the first read; a level qualifies when it is a JPEG-tiled TIFF page
        (generic TIFF, Aperio SVS), its downsample is an integer, and two regions read from it
        (one in the middle, one across the bottom-right edge) are pixel-identical to OpenSlide's
        (checked once per file version and level in the process, whichever handle reads first).
        """
        from pipeline.reading.tiff_tiles import known_verdict, level_sources, remember_verdict

        if self._direct is None:
            vendor = self._h.properties.get("openslide.vendor")
            self._tiff, self._direct = level_sources(self.path, vendor, self.level_dimensions)
            self._downsamples = self.level_downsamples
        source = self._direct.get(level)
        if source is None:
            return None
        ds = self._downsamples[level]
        if level not in self._direct_ok:
            key = (*source.verdict_key, level, ds)
            ok = known_verdict(key)
            if ok is None:
                ok = abs(ds - round(ds)) < 1e-9 and self._matches_openslide(source, level, int(round(ds)))
                remember_verdict(key, ok)
            self._direct_ok[level] = ok
            if not ok:
                log.info(
                    "%s: level %d read through OpenSlide (direct JPEG tile decoding not identical or not possible)",
                    self.display,
                    level,
                )
        return (source, int(round(ds))) if self._direct_ok[level] else None

    def _matches_openslide(self, source, level: int, ds: int) -> bool:
        """True when ``source`` gives OpenSlide's pixels for a middle region and one across the bottom-right edge."""
        from pipeline.reading.tiff_tiles import TileDecodeError

        w, h = source.width, source.height
        for lx, ly, rw, rh in (
            (max(0, w // 2 - 128), max(0, h // 2 - 128), 256, 256),
            (max(0, w - 96), max(0, h - 64), 160, 112),
        ):
            try:
                mine = source.read(lx, ly, rw, rh)
            except TileDecodeError:
                return False
            if not np.array_equal(mine, self._openslide_rgb(lx * ds, ly * ds, level, rw, rh)):
                return False
        return True

    def _read_raw(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray | None:
        """OpenSlide's own output for the region: premultiplied ARGB words, (height, width, 4) uint8 in memory order.

        Calls ``openslide_read_region`` straight into a numpy buffer, skipping openslide-python's
        un-premultiply and PIL image (about a quarter of the read time for a 224 px tile). Uses
        openslide-python's ctypes binding of the C function (``lowlevel._read_region``, with its
        error check); None when that binding or the handle's pointer is not there (another
        openslide-python version): the caller then takes the public ``read_region``.
        """
        fn = getattr(self._openslide.lowlevel, "_read_region", None)
        osr = getattr(self._h, "_osr", None)
        if fn is None or osr is None or sys.byteorder != "little" or width <= 0 or height <= 0:
            return None
        buf = np.empty((height, width, 4), np.uint8)
        fn(osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x0, y0, level, width, height)
        return buf

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
        self._direct, self._direct_ok = None, {}


def _premultiplied_bgra_over_white(bgra: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied ARGB words (little-endian bytes B, G, R, A; (H, W, 4) uint8) over white → RGB uint8.

    Premultiplied colour over white is ``c + (255 - alpha)``: transparent areas (outside the
    scanned regions) become white, opaque pixels keep their colour.
    """
    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    if int(bgra.view(np.uint32).min()) >= 0xFF000000:  # every alpha is 255 (alpha is the top byte)
        return rgb
    fill = cv2.cvtColor(np.ascontiguousarray(255 - bgra[..., 3]), cv2.COLOR_GRAY2RGB)
    return cv2.add(rgb, fill)  # saturating uint8 add


def _rgba_over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite openslide-python's RGBA image (straight, not premultiplied alpha) over white; RGB uint8."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


# ----------------------------------------------------------------------------- tifffile


class TiffFileReader(SlideReader):
    """TIFF and OME-TIFF that OpenSlide does not detect, read with tifffile (+ zarr for regions)."""

    name = "tifffile"

    def __init__(self, path: Path, display: str) -> None:
        import tifffile

        self.path = path
        self.display = display
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"{display}: damaged or unsupported TIFF ({_words(exc)})") from None
        self._series = series
        self._levels = list(series.levels) if series.levels else [series]
        self._axes = series.axes.upper()
        if not (self._axes.endswith("YXS") or self._axes.endswith("CYX") or self._axes.endswith("YX")):
            raise SlideError(f"{display}: unsupported TIFF axes {series.axes!r} (need RGB brightfield)")
        self._dims = [self._level_wh(lv) for lv in self._levels]
        self._arrays: dict[int, object] = {}
        if series.dtype != np.uint8:
            raise SlideError(f"{display}: {series.dtype} pixels; only 8-bit RGB brightfield images are supported")
        samples = self._samples(self._levels[0])
        if samples not in (3, 4):
            raise SlideError(
                f"{display}: {samples}-channel image; only RGB brightfield is supported (fluorescence is out of scope)"
            )

    def _level_wh(self, level) -> tuple[int, int]:
        shape = dict(zip(self._axes, level.shape))
        return int(shape["X"]), int(shape["Y"])

    def _samples(self, level) -> int:
        shape = dict(zip(self._axes, level.shape))
        return int(shape.get("S", shape.get("C", 1)))

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return self._dims

    def native_mpp(self) -> tuple[float | None, str]:
        if self._tif.is_ome and self._tif.ome_metadata:
            try:
                root = ET.fromstring(self._tif.ome_metadata)
                for el in root.iter():
                    if el.tag.endswith("Pixels") and (size_x := el.get("PhysicalSizeX")):
                        value = float(size_x)
                        unit = el.get("PhysicalSizeXUnit", "µm")
                        factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
                        if factor is None:
                            raise MPPError(f"{self.display}: OME PhysicalSizeXUnit {unit!r} not understood; pass --mpp")
                        return value * factor, "ome:PhysicalSizeX"
            except ET.ParseError:
                log.warning("%s: OME-XML does not parse; looking at TIFF tags", self.display)
        import tifffile

        page = self._tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)  # the first page is always read as a TiffPage, never a TiffFrame
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            res_unit = int(tags["ResolutionUnit"].value)
            if num and den and res_unit in (2, 3):
                per_unit = num / den
                microns = 25_400.0 if res_unit == 2 else 10_000.0
                return microns / per_unit, "tiff:XResolution"
        return None, "none"

    def _array(self, level: int):
        arr = self._arrays.get(level)
        if arr is None:
            try:
                import zarr

                arr = zarr.open(self._levels[level].aszarr(), mode="r")
            except Exception:  # noqa: BLE001 - fall back to a bounded whole-level read
                w, h = self._dims[level]
                if w * h > MAX_PLAIN_IMAGE_PIXELS:
                    raise SlideError(f"{self.display}: level {level} too large to read without zarr") from None
                arr = self._levels[level].asarray()
            self._arrays[level] = arr
        return arr

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lx, ly = int(round(x0 / ds)), int(round(y0 / ds))
        lw, lh = self._dims[level]
        out = np.full((height, width, 3), 255, np.uint8)
        sx0, sy0 = max(lx, 0), max(ly, 0)
        sx1, sy1 = min(lx + width, lw), min(ly + height, lh)
        if sx1 <= sx0 or sy1 <= sy0:
            return out
        arr = self._array(level)
        try:
            if self._axes.endswith("CYX"):
                block = np.asarray(arr[..., :3, sy0:sy1, sx0:sx1])
                block = np.moveaxis(block.reshape(block.shape[-3:]), 0, -1)
            elif self._axes.endswith("YXS"):
                block = np.asarray(arr[..., sy0:sy1, sx0:sx1, :3])
                block = block.reshape(block.shape[-3:])
            else:
                block = np.asarray(arr[..., sy0:sy1, sx0:sx1])
                block = np.repeat(block.reshape(block.shape[-2:])[..., None], 3, axis=2)
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"{self.display}: corrupt image data at ({x0}, {y0}) level {level} ({exc})") from None
        out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = block
        return out

    def close(self) -> None:
        self._tif.close()


# ----------------------------------------------------------------------------- PIL


class PlainImageReader(SlideReader):
    """PNG/JPEG/BMP, decoded whole (single level), refused above :data:`MAX_PLAIN_IMAGE_PIXELS`."""

    name = "pil"

    def __init__(self, path: Path, display: str) -> None:
        from PIL import Image

        self.display = display
        try:
            with warnings.catch_warnings():  # PIL warns above ~89 Mpx; the limit below decides, in words
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
            with im:
                w, h = im.size
                if w * h > MAX_PLAIN_IMAGE_PIXELS:
                    raise SlideError(
                        f"{display}: plain image of {w}x{h} px exceeds the {MAX_PLAIN_IMAGE_PIXELS:,} px limit "
                        "for whole-image decoding; convert it to a pyramidal tiled TIFF"
                    )
                im.draft("RGB", (w, h))
                self._rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"{display}: damaged image ({_words(exc)})") from None

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        h, w = self._rgb.shape[:2]
        return [(w, h)]

    def native_mpp(self) -> tuple[float | None, str]:
        # PNG/JPEG DPI fields are display hints (72/96 dpi), never a scanner resolution.
        return None, "none"

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        h, w = self._rgb.shape[:2]
        out = np.full((height, width, 3), 255, np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + width, w), min(y0 + height, h)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = self._rgb[sy0:sy1, sx0:sx1]
        return out


# ----------------------------------------------------------------------------- Slide


class Slide:
    """An open slide with a validated level-0 resolution.

    Use :func:`open_slide` to make one. Not thread-safe: give each worker its own ``Slide``.
    """

    def __init__(self, path: Path, slide_id: str, reader: SlideReader, mpp: float, mpp_source: str) -> None:
        self.path = path
        self.slide_id = slide_id
        self.reader = reader
        self.mpp = mpp
        self.mpp_source = mpp_source

    # -- geometry ---------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at level 0, pixels."""
        return self.reader.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.reader.level_dimensions)

    @property
    def level_mpps(self) -> list[float]:
        """µm/px of every pyramid level."""
        return [self.mpp * d for d in self.reader.level_downsamples]

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the scanned area in level-0 pixels (whole image for most formats)."""
        return self.reader.bounds()

    @property
    def reader_name(self) -> str:
        return self.reader.name

    def properties(self) -> dict[str, str]:
        return self.reader.properties()

    # -- resolution -------------------------------------------------------------------
    def plan(self, target_mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE) -> ReadPlan:
        """Choose the pyramid level for reading at ``target_mpp`` (µm/px)."""
        if not target_mpp > 0:
            raise MPPError(f"{self.path}: requested resolution must be positive, got {target_mpp}")
        mpps = self.level_mpps
        usable = [i for i, m in enumerate(mpps) if m <= target_mpp * (1 + tolerance)]
        if not usable:
            raise MPPError(
                f"{self.path}: slide resolution {self.mpp:.3f} µm/px is coarser than the requested "
                f"{target_mpp:.3f} µm/px (tolerance {tolerance:.0%})"
            )
        level = max(usable, key=lambda i: mpps[i])
        lm = mpps[level]
        effective = lm if lm >= target_mpp * (1 - tolerance) else target_mpp
        return ReadPlan(level=level, level_mpp=lm, requested_mpp=target_mpp, effective_mpp=effective)

    def level0_size(self, size_px: int, plan: ReadPlan) -> float:
        """Level-0 pixels covered by ``size_px`` pixels read with ``plan`` (may be fractional)."""
        return size_px * plan.effective_mpp / self.mpp

    def read_region(
        self,
        location: tuple[int, int],
        size: tuple[int, int],
        plan: ReadPlan,
    ) -> np.ndarray:
        """Read ``size`` = (width, height) pixels at ``plan.effective_mpp`` from level-0 ``location``.

        Returns RGB uint8 of shape (height, width, 3).
        """
        w, h = size
        lvl = plan.level
        if not plan.resized:
            return self.reader.read(location[0], location[1], lvl, w, h)
        scale = plan.effective_mpp / plan.level_mpp  # level pixels per output pixel (>= 1 - tol)
        shrink = scaled_decode_factor(scale)
        if shrink > 1 and SCALED_JPEG_DECODE:
            # DCT-domain downscaling while decoding (tiff_tiles): 1/shrink of the level, then the rest
            read_scaled = getattr(self.reader, "read_scaled", None)
            rest = scale / shrink
            sw, sh = max(1, int(round(w * rest))), max(1, int(round(h * rest)))
            raw = None if read_scaled is None else read_scaled(location[0], location[1], lvl, shrink, sw, sh)
            if raw is not None:
                if (sw, sh) == (w, h):
                    return raw
                return cv2.resize(raw, (w, h), interpolation=cv2.INTER_AREA if rest > 1 else cv2.INTER_LINEAR)
        rw, rh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        raw = self.reader.read(location[0], location[1], lvl, rw, rh)
        interp = cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR
        return cv2.resize(raw, (w, h), interpolation=interp)

    def thumbnail(self, target_mpp: float, max_side: int = 8192, block: int = 4096) -> tuple[np.ndarray, float]:
        """Image of the :attr:`bounds` area at about ``target_mpp`` µm/px, read block by block.

        Returns (RGB uint8 (H, W, 3), actual µm/px of the thumbnail). The MPP is raised if the
        thumbnail would exceed ``max_side`` pixels. Reads the coarsest level at least as fine as
        that MPP, ``block`` x ``block`` level pixels at a time (a slide without a coarse enough
        level is read from level 0, block by block), so memory is the thumbnail plus one block's
        buffers (a few bytes per block pixel) for any slide size.
        """
        bx, by, bw, bh = self.bounds
        mpp = max(target_mpp, self.mpp)
        longest_um = max(bw, bh) * self.mpp
        mpp = max(mpp, longest_um / max_side)
        tw, th = max(1, int(round(bw * self.mpp / mpp))), max(1, int(round(bh * self.mpp / mpp)))
        mpps = self.level_mpps
        level = max((i for i, m in enumerate(mpps) if m <= mpp * 1.001), key=lambda i: mpps[i], default=0)
        ds = self.reader.level_downsamples[level]
        lw, lh = int(math.ceil(bw / ds)), int(math.ceil(bh / ds))
        out = np.empty((th, tw, 3), np.uint8)
        sx, sy = tw / lw, th / lh
        for y in range(0, lh, block):
            for x in range(0, lw, block):
                bw_, bh_ = min(block, lw - x), min(block, lh - y)
                raw = self.reader.read(bx + int(round(x * ds)), by + int(round(y * ds)), level, bw_, bh_)
                ox0, oy0 = int(round(x * sx)), int(round(y * sy))
                ox1, oy1 = int(round((x + bw_) * sx)), int(round((y + bh_) * sy))
                if (ox1 - ox0, oy1 - oy0) == (bw_, bh_):  # the level's own pixels (what resize would copy)
                    out[oy0:oy1, ox0:ox1] = raw
                elif ox1 > ox0 and oy1 > oy0:
                    out[oy0:oy1, ox0:ox1] = cv2.resize(raw, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
                del raw
        return out, bw * self.mpp / tw

    # -- identity ---------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Content fingerprint: sha256 over file sizes and up to 3 MiB of each file (head, middle, tail).

        Fast for multi-GB slides; changes whenever the file content changes in practice.
        """
        files = sorted(self.path.glob("*.dcm")) if self.path.is_dir() else [self.path]
        h = hashlib.sha256()
        chunk = 1 << 20
        for f in files:
            size = f.stat().st_size
            h.update(f.name.encode() + b"\0" + str(size).encode())
            with open(f, "rb") as fh:
                for off in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                    fh.seek(off)
                    h.update(fh.read(chunk))
        return h.hexdigest()

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.slide_id!r}, {w}x{h} px, {self.mpp:.4f} µm/px, reader={self.reader_name})"


def slide_id_for(path: str | Path) -> str:
    """``slide_id`` = file stem (``.ome.tif`` counts as one suffix); folder name for DICOM folders."""
    p = Path(path)
    if p.is_dir():
        return p.name
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def _dicom_file_in(folder: Path) -> Path:
    try:
        dcm = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() == ".dcm")
    except OSError as exc:
        raise SlideError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    if not dcm:
        raise SlideError(f"{folder}: directory holds no slide (no .dcm files of a DICOM WSI)")
    return dcm[0]


def open_reader(path: Path) -> SlideReader:
    """Pick the backend for ``path`` (file or DICOM folder); errors are one-line :class:`SlideError`.

    The container is checked first (:func:`pipeline.reading.diagnose.check_file`): a truncated,
    mis-sized or non-image file is refused with what is wrong before any decoder sees it.
    """
    import openslide

    display = str(path)
    kind = file_kind(path)
    if kind in ("missing", "broken link", "symbolic link loop"):
        raise SlideError(f"{display}: no such file or directory" + (f" ({kind})" if kind != "missing" else ""))
    if kind not in ("regular", "folder"):
        raise SlideError(f"{display}: not a regular file ({kind}); only slide files and DICOM folders are read")
    target = _dicom_file_in(path) if kind == "folder" else path
    if not os.access(target, os.R_OK):
        raise SlideError(f"{display}: permission denied")
    suffix = target.suffix.lower()
    if kind == "regular" and suffix not in SLIDE_SUFFIXES:
        raise SlideError(
            f"{display}: unsupported format {suffix or '(no suffix)'!r}; expected one of "
            + ", ".join(sorted(SLIDE_SUFFIXES))
            + " or a DICOM folder"
        )
    problem = check_file(target)
    if problem is not None:
        where = "" if target == path else f" ({target.name})"
        raise SlideError(f"{display}{where}: {problem}")
    try:
        vendor = openslide.OpenSlide.detect_format(str(target))
    except Exception:  # noqa: BLE001
        vendor = None
    if vendor is not None:
        return OpenSlideReader(target, display)
    if suffix in TIFF_SUFFIXES:
        return TiffFileReader(target, display)
    if suffix in PLAIN_IMAGE_SUFFIXES:
        return PlainImageReader(target, display)
    if suffix == ".dcm":
        raise SlideError(f"{display}: DICOM file that OpenSlide does not recognise as a whole-slide image")
    with open(target, "rb") as fh:
        container = sniff(fh.read(132))
    raise SlideError(
        f"{display}: OpenSlide does not recognise this {container.upper()} file as a {suffix} slide "
        "(damaged vendor metadata, or a variant OpenSlide cannot read)"
    )


def open_slide(path: str | Path, mpp: float | None = None, slide_id: str | None = None) -> Slide:
    """Open a slide and validate its level-0 resolution.

    Args:
        path: slide file, or a folder holding one DICOM WSI.
        mpp: override of the level-0 resolution, µm/px (``--mpp`` / slide table).
        slide_id: defaults to :func:`slide_id_for`.

    Raises:
        SlideError: unreadable input; MPPError: missing or implausible resolution.
    """
    p = Path(path)
    reader = open_reader(p)
    try:
        native, source = reader.native_mpp()
        if mpp is not None:
            value = _check_mpp(float(mpp), str(p), "the override")
            if native is not None and abs(native - value) / value > 0.1:
                log.warning("%s: --mpp %.4f overrides the slide's own %.4f (%s)", p, value, native, source)
            chosen, chosen_source = value, "override"
        elif native is None:
            raise missing_mpp_error(p)
        else:
            chosen, chosen_source = _check_mpp(native, str(p), source), source
        w, h = reader.level_dimensions[0]
        if w <= 0 or h <= 0:
            raise SlideError(f"{p}: image has no pixels ({w}x{h})")
    except Exception:
        reader.close()
        raise
    return Slide(p, slide_id or slide_id_for(p), reader, chosen, chosen_source)
