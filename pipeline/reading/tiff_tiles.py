"""Regions of JPEG-tiled TIFF pyramid levels decoded straight from the file (a fast path under OpenSlide).

OpenSlide paints every region through its own compositor: on the 2-core CPU that costs about
14 ns per output pixel, five times libjpeg-turbo's decode of the same JPEG tiles (2.8 ns/px).
For the TIFF-based formats where an OpenSlide level *is* a tiled TIFF page (``generic-tiff``,
``aperio``), :class:`TiffLevelSource` reads the page's compressed tiles with tifffile, decodes
them with imagecodecs (tifffile's own per-page decoder, which handles JPEG tables and the RGB or
YCbCr colour space) and keeps recently decoded tiles in one byte-bounded cache shared by all
reader threads.

It is only a speed-up, never a second opinion: :class:`pipeline.reading.slide.OpenSlideReader` uses a
level's source only after a region read both ways came out pixel-identical on that slide, and
only for regions whose level-0 origin falls on that level's pixel grid; everything else goes
through OpenSlide.

**Scaled decoding** (:meth:`TiffLevelSource.read` with ``shrink`` 2, 4 or 8): when the pipeline
reads a level coarser than the stored one (a 40x scan at 0.25 µm/px read at 0.5 µm/px from a
pyramid whose next level is 4x down, as in Aperio SVS), libjpeg-turbo decodes each JPEG tile at
1/2, 1/4 or 1/8 of its size in the DCT domain (through Pillow's ``Image.draft``) instead of
decoding every pixel and shrinking afterwards: about a third of the decoding work at 1/2. The
pixels differ from a full decode followed by an area-average resize by a few grey levels (the
reduced IDCT is not a box filter); ``docs/benchmarks.md`` records the effect on the model's
outputs. A source offers it only after Pillow's full-size decode of one tile came out identical
to imagecodecs' (same colour handling, see :meth:`TiffLevelSource.scaled_decode_ok`).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tifffile

log = logging.getLogger(__name__)

#: OpenSlide vendors whose pyramid levels are plain tiled TIFF pages.
TIFF_LEVEL_VENDORS = frozenset({"generic-tiff", "aperio"})
#: Decoded tiles kept by the process, bytes (OpenSlide's own default cache is 32 MiB per handle).
DEFAULT_CACHE_BYTES = 32 << 20

_JPEG = 7
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6


class TileDecodeError(Exception):
    """A compressed tile could not be read or decoded (corrupt data)."""


class TileCache:
    """Least-recently-used decoded tiles, bounded in bytes; safe to share between threads.

    Keys are ``(file identity, page, tile)``, so the reader threads of one slide (each with its
    own file handle) share their decoded tiles instead of decoding the same ones twice, and the
    memory it holds is the same whatever the slide's size.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            tile = self._items.get(key)
            if tile is not None:
                self._items.move_to_end(key)
            return tile

    def put(self, key: tuple, tile: np.ndarray) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._items[key] = tile
            self.bytes += tile.nbytes
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= dropped.nbytes


#: The process's decoded-tile cache (all slides, all reader threads).
SHARED_CACHE = TileCache()

_VERDICTS: dict[tuple, bool] = {}
_MAX_VERDICTS = 4096


def known_verdict(key: tuple) -> bool | None:
    """Whether the level behind ``key`` (:attr:`TiffLevelSource.verdict_key`) was found identical to OpenSlide, if checked."""
    return _VERDICTS.get(key)


def remember_verdict(key: tuple, identical: bool) -> None:
    """Record a check for every later handle of the same file version in this process (each
    slide is opened by the tissue stage and by every reader thread: one check, not three)."""
    if len(_VERDICTS) >= _MAX_VERDICTS:
        _VERDICTS.clear()
    _VERDICTS[key] = bool(identical)


class TiffLevelSource:
    """RGB regions of one tiled TIFF page (a pyramid level), in that level's pixel coordinates.

    Args:
        tiff: an open ``tifffile.TiffFile`` (owned by the caller; one per thread).
        page_index: index of the level's page in ``tiff.pages``.
        file_key: identity of the file (path, size, modification time) in cache keys.
        cache: decoded tiles (default: the process's :data:`SHARED_CACHE`).
    """

    def __init__(self, tiff, page_index: int, file_key: tuple, cache: TileCache | None = None) -> None:
        page = tiff.pages[page_index]
        self._tiff, self._page, self._index = tiff, page, page_index
        self._file_key = file_key
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self._cols = -(-self.width // self.tile_w)
        self._cache = cache if cache is not None else SHARED_CACHE
        self._scaled_ok: bool | None = None

    @property
    def verdict_key(self) -> tuple:
        """(file identity, page): what a check against OpenSlide is remembered under (:func:`remember_verdict`)."""
        return (self._file_key, self._index)

    @staticmethod
    def eligible(page) -> bool:
        """True for a tiled, 8-bit, 3-sample, interleaved JPEG page in RGB or YCbCr."""
        return bool(
            page.is_tiled
            and int(page.compression) == _JPEG
            and int(page.photometric) in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
            and page.samplesperpixel == 3
            and page.bitspersample == 8
            and int(page.planarconfig) == 1
            and getattr(page, "imagedepth", 1) == 1
        )

    def _tile_bytes(self, index: int) -> bytes:
        """The compressed bytes of tile ``index`` (raises :class:`TileDecodeError` when short)."""
        page = self._page
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        fh = self._tiff.filehandle
        fh.seek(offset)
        data = fh.read(count)
        if count == 0 or len(data) != count:
            raise TileDecodeError(f"tile {index} of page {self._index}: {len(data)} of {count} bytes")
        return data

    def _decode_error(self, index: int, exc: BaseException) -> TileDecodeError:
        detail = " ".join(str(exc).split())[:200] or "no detail"
        return TileDecodeError(f"tile {index} of page {self._index} does not decode ({detail})")

    def _pil_decode(self, data: bytes, shrink: int) -> np.ndarray:
        """RGB uint8 (tile_h // shrink, tile_w // shrink, 3) of one JPEG tile, decoded at 1/``shrink`` in the DCT domain."""
        from PIL import Image

        tables = self._page.jpegtables
        if tables:  # abbreviated stream: the tables' segments (without their EOI) go before the tile's SOI-less data
            data = bytes(tables[:-2]) + data[2:]
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (self.tile_w // shrink, self.tile_h // shrink))
            im.load()
            if im.size != (self.tile_w // shrink, self.tile_h // shrink) or im.mode != "RGB":
                raise TileDecodeError(f"scaled decode gave {im.mode} {im.size}, not RGB at 1/{shrink}")
            return np.asarray(im)

    def _tile(self, col: int, row: int, shrink: int = 1) -> np.ndarray:
        """Decoded tile (tile_h, tile_w, 3) uint8 at grid (col, row), from the cache when there;
        with ``shrink`` > 1 decoded at 1/shrink of its size, (tile_h / shrink, tile_w / shrink, 3)."""
        index = row * self._cols + col
        key = (self._file_key, self._index, index) if shrink == 1 else (self._file_key, self._index, index, shrink)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        page = self._page
        try:
            data = self._tile_bytes(index)
            if shrink == 1:
                decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
                tile = np.ascontiguousarray(np.asarray(decoded).reshape(self.tile_h, self.tile_w, -1)[:, :, :3])
            else:
                tile = self._pil_decode(data, shrink)
        except TileDecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is corrupt data
            raise self._decode_error(index, exc) from None
        self._cache.put(key, tile)
        return tile

    def scaled_decode_ok(self, shrink: int) -> bool:
        """Whether regions may be read at 1/``shrink`` (2, 4 or 8) by scaled JPEG decoding.

        True when the tile size divides by ``shrink`` and Pillow's full-size decode of the
        level's middle tile is identical to the one the level's ordinary reads use (checked once
        per source; any failure means no scaled reads).
        """
        if shrink not in (2, 4, 8) or self.tile_w % shrink or self.tile_h % shrink:
            return False
        if self._scaled_ok is None:
            index = (self.height // self.tile_h // 2) * self._cols + self.width // self.tile_w // 2
            try:
                data = self._tile_bytes(index)
                mine = self._pil_decode(data, 1)
                theirs, _, _ = self._page.decode(data, index, jpegtables=self._page.jpegtables)
                ref = np.asarray(theirs).reshape(self.tile_h, self.tile_w, -1)[:, :, :3]
                self._scaled_ok = bool(np.array_equal(mine, ref))
            except Exception as exc:  # noqa: BLE001 - no scaled reads, the ordinary path reads everything
                log.debug("page %d: no scaled JPEG decoding (%s)", self._index, exc)
                self._scaled_ok = False
            if not self._scaled_ok:
                log.info("page %d: scaled JPEG decoding not used (Pillow's decode differs)", self._index)
        return self._scaled_ok

    def read(self, x: int, y: int, width: int, height: int, shrink: int = 1) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the level region at level pixel (x, y); white outside the image.

        With ``shrink`` > 1 (check :meth:`scaled_decode_ok` first) the level is read at
        1/``shrink`` of its resolution: (x, y, width, height) are then pixels of that reduced
        grid (level pixel = ``shrink`` x reduced pixel), and the tiles are decoded at that size.
        """
        tw, th = self.tile_w // shrink, self.tile_h // shrink
        iw, ih = -(-self.width // shrink), -(-self.height // shrink)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, iw), min(y + height, ih)
        inside = x0 == x and y0 == y and x1 == x + width and y1 == y + height
        # every pixel of a region inside the image is written below: no white fill needed
        out = np.empty((height, width, 3), np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        for row in range(y0 // th, (y1 - 1) // th + 1):
            ty = row * th
            ya, yb = max(y0, ty), min(y1, ty + th)
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                tx = col * tw
                xa, xb = max(x0, tx), min(x1, tx + tw)
                out[ya - y : yb - y, xa - x : xb - x] = self._tile(col, row, shrink)[
                    ya - ty : yb - ty, xa - tx : xb - tx
                ]
        return out


def level_sources(
    path: Path, vendor: str | None, level_dimensions: list[tuple[int, int]], cache: TileCache | None = None
) -> tuple[tifffile.TiffFile | None, dict[int, TiffLevelSource]]:
    """(open TiffFile or None, {OpenSlide level: source}) for the levels that are eligible tiled TIFF pages.

    A level qualifies when the slide's OpenSlide vendor is one of :data:`TIFF_LEVEL_VENDORS` and
    exactly one eligible page has the level's (width, height). The caller closes the TiffFile.
    Anything unexpected (not a TIFF, tifffile missing) gives no sources.
    """
    if vendor not in TIFF_LEVEL_VENDORS:
        return None, {}
    try:
        import tifffile

        tiff = tifffile.TiffFile(str(path))
    except Exception as exc:  # noqa: BLE001 - no fast path, OpenSlide reads everything
        log.debug("%s: no direct TIFF tile reads (%s)", path, exc)
        return None, {}
    try:
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, page in enumerate(tiff.pages):
            # tiff.pages yields TiffPage objects (useframes is off); the check narrows the type
            if isinstance(page, tifffile.TiffPage) and TiffLevelSource.eligible(page):
                by_size.setdefault((int(page.imagewidth), int(page.imagelength)), []).append(i)
        st = os.stat(path)
        file_key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        sources = {}
        for level, dims in enumerate(level_dimensions):
            pages = by_size.get((int(dims[0]), int(dims[1])), [])
            if len(pages) == 1:
                sources[level] = TiffLevelSource(tiff, pages[0], file_key, cache)
    except Exception as exc:  # noqa: BLE001
        log.debug("%s: no direct TIFF tile reads (%s)", path, exc)
        tiff.close()
        return None, {}
    if not sources:
        tiff.close()
        return None, {}
    return tiff, sources
