"""Say in plain words what is wrong with a file that should be a slide, without decoding any pixels.

:func:`check_file` looks at what the file is (regular file, size, the magic bytes at its start)
and, for TIFF-based formats (SVS, generic/OME TIFF, NDPI, BIF, SCN), walks the image
directories: every directory and every tile or strip must lie inside the file, and the
tiles recorded must cover the dimensions the directory claims. It reads at most
:data:`MAX_TABLE_BYTES` of tables per directory and allocates nothing sized by the claimed
dimensions, so a file claiming 200000×200000 px costs no more than a small one.

The returned reason is one line naming what is wrong ("truncated: tile 12 of image 0 lies beyond
the end of the file"); the caller puts the file name in front.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

#: Largest tile/strip table read per image directory, bytes (a 200k x 200k px level in 256 px tiles: 4.9 MB).
MAX_TABLE_BYTES = 64 << 20
#: Image directories followed at most (a loop in the chain must not hang the check).
MAX_IFDS = 512
#: Largest ratio of claimed pixel bytes to the distinct tile data that holds them, for images above
#: :data:`BOMB_MIN_PIXELS`. Real JPEG/deflate slides, blank glass included, stay below ~100:1.
MAX_EXPANSION = 2000
BOMB_MIN_PIXELS = 100_000_000
#: Largest side accepted, pixels (about 26 cm at 0.1 µm/px: no glass slide is longer).
MAX_SIDE_PX = 2_600_000

_TAG_WIDTH, _TAG_LENGTH = 256, 257
_TAG_STRIP_OFFSETS, _TAG_ROWS_PER_STRIP, _TAG_STRIP_COUNTS = 273, 278, 279
_TAG_TILE_WIDTH, _TAG_TILE_LENGTH, _TAG_TILE_OFFSETS, _TAG_TILE_COUNTS = 322, 323, 324, 325
_TAG_SAMPLES, _TAG_PLANAR = 277, 284
#: TIFF field type → (struct code, bytes)
_TYPES = {1: ("B", 1), 2: ("B", 1), 3: ("H", 2), 4: ("I", 4), 6: ("b", 1), 7: ("B", 1), 8: ("h", 2)}
_TYPES.update({9: ("i", 4), 11: ("f", 4), 12: ("d", 8), 13: ("I", 4), 16: ("Q", 8), 17: ("q", 8), 18: ("Q", 8)})


def file_kind(path: Path) -> str:
    """``regular``, or what else the path is (``folder``, ``FIFO``, ``socket``, ``device``, ``missing``,
    ``broken link``, ``symbolic link loop``)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken link" if os.path.islink(path) else "missing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"unreadable ({exc.strerror or exc})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "regular"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def sniff(head: bytes) -> str:
    """The container the first bytes announce: tiff, bigtiff, dicom, jpeg, png, bmp or unknown."""
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return "bigtiff"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"BM":
        return "bmp"
    return "unknown"


def check_file(path: Path) -> str | None:
    """What is wrong with ``path`` as a slide file, in words; None when nothing structural is found.

    None does not mean the pixels decode: only the container is checked.
    """
    kind = file_kind(path)
    if kind != "regular":
        return f"not a regular file ({kind})" if kind not in ("missing", "folder") else None
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as fh:
            head = fh.read(132)
            what = sniff(head)
            if what == "unknown":
                return (
                    "not a slide: no TIFF, DICOM, JPEG or PNG header (it starts with bytes "
                    f"{head[:8].hex(' ')}); the file is damaged or is not an image"
                )
            if what in ("tiff", "bigtiff"):
                return _check_tiff(fh, size, bigtiff=what == "bigtiff", little=head[:2] == b"II")
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


class _Bad(Exception):
    """A structural problem found while walking a TIFF (its message is the reason)."""


def _check_tiff(fh, size: int, bigtiff: bool, little: bool) -> str | None:
    end = "<" if little else ">"
    fh.seek(0)
    header = fh.read(16)
    if bigtiff:
        if len(header) < 16:
            return "truncated: the file ends inside its TIFF header"
        (first,) = struct.unpack(end + "Q", header[8:16])
    else:
        if len(header) < 8:
            return "truncated: the file ends inside its TIFF header"
        (first,) = struct.unpack(end + "I", header[4:8])
    offset, index, seen = first, 0, set()
    try:
        while offset:
            if index >= MAX_IFDS or offset in seen:
                return f"damaged: the chain of image directories loops (at image {index})"
            seen.add(offset)
            if offset >= size:
                where = "the first image directory" if index == 0 else f"the directory of image {index}"
                return f"truncated: {where} lies beyond the end of the file (byte {offset:,} of {size:,})"
            offset = _check_ifd(fh, size, offset, index, end, bigtiff)
            index += 1
    except _Bad as exc:
        return str(exc)
    if index == 0:
        return "damaged: the TIFF holds no image (its first directory offset is 0)"
    return None


def _check_ifd(fh, size: int, offset: int, index: int, end: str, bigtiff: bool) -> int:
    """Check one image directory; returns the next directory's offset (0 at the end)."""
    count_fmt, entry_size, value_size = ("Q", 20, 8) if bigtiff else ("H", 12, 4)
    fh.seek(offset)
    raw = fh.read(8 if bigtiff else 2)
    if len(raw) < (8 if bigtiff else 2):
        raise _Bad(f"truncated: the directory of image {index} is cut off by the end of the file")
    (n,) = struct.unpack(end + count_fmt, raw)
    if n == 0 or n > 4096:
        raise _Bad(f"damaged: the directory of image {index} claims {n} entries")
    body = fh.read(n * entry_size + value_size)
    if len(body) < n * entry_size + value_size:
        raise _Bad(f"truncated: the directory of image {index} is cut off by the end of the file")
    tags: dict[int, list[int | float]] = {}
    for k in range(n):
        e = body[k * entry_size : (k + 1) * entry_size]
        if bigtiff:
            tag, typ, cnt = struct.unpack(end + "HHQ", e[:12])
            val = e[12:20]
        else:
            tag, typ, cnt = struct.unpack(end + "HHI", e[:8])
            val = e[8:12]
        if tag not in (
            _TAG_WIDTH,
            _TAG_LENGTH,
            _TAG_STRIP_OFFSETS,
            _TAG_ROWS_PER_STRIP,
            _TAG_STRIP_COUNTS,
            _TAG_TILE_WIDTH,
            _TAG_TILE_LENGTH,
            _TAG_TILE_OFFSETS,
            _TAG_TILE_COUNTS,
            _TAG_SAMPLES,
            _TAG_PLANAR,
        ):
            continue
        if typ not in _TYPES:
            raise _Bad(f"damaged: tag {tag} of image {index} has an unknown field type {typ}")
        code, width = _TYPES[typ]
        nbytes = cnt * width
        if nbytes > MAX_TABLE_BYTES:
            raise _Bad(f"damaged: tag {tag} of image {index} claims {cnt:,} values ({nbytes:,} bytes)")
        if nbytes <= value_size:
            data = val[:nbytes]
        else:
            (where,) = struct.unpack(end + ("Q" if bigtiff else "I"), val)
            if where + nbytes > size:
                what = "tile table" if tag in (_TAG_TILE_OFFSETS, _TAG_TILE_COUNTS) else f"tag {tag}"
                if tag in (_TAG_STRIP_OFFSETS, _TAG_STRIP_COUNTS):
                    what = "strip table"
                raise _Bad(f"truncated: the {what} of image {index} lies beyond the end of the file")
            fh.seek(where)
            data = fh.read(nbytes)
        tags[tag] = list(struct.unpack(f"{end}{cnt}{code}", data))
    (nxt,) = struct.unpack(end + ("Q" if bigtiff else "I"), body[n * entry_size : n * entry_size + value_size])
    _check_layout(tags, size, index)
    return int(nxt)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_layout(tags: dict[int, list], size: int, index: int) -> None:
    """Dimensions against the tile/strip tables; every tile/strip inside the file."""
    w = int(tags.get(_TAG_WIDTH, [0])[0])
    h = int(tags.get(_TAG_LENGTH, [0])[0])
    if w <= 0 or h <= 0:
        raise _Bad(f"damaged: image {index} claims {w}×{h} px (no pixels)")
    if w > MAX_SIDE_PX or h > MAX_SIDE_PX:
        raise _Bad(f"damaged: image {index} claims {w:,}×{h:,} px, larger than any glass slide")
    planes = int(tags.get(_TAG_SAMPLES, [1])[0]) if int(tags.get(_TAG_PLANAR, [1])[0]) == 2 else 1
    if _TAG_TILE_OFFSETS in tags:
        tw, th = int(tags.get(_TAG_TILE_WIDTH, [0])[0]), int(tags.get(_TAG_TILE_LENGTH, [0])[0])
        if tw <= 0 or th <= 0 or tw > 65536 or th > 65536:
            raise _Bad(f"damaged: image {index} claims tiles of {tw}×{th} px")
        need = _ceil_div(w, tw) * _ceil_div(h, th) * planes
        offsets, counts, unit = tags[_TAG_TILE_OFFSETS], tags.get(_TAG_TILE_COUNTS, []), "tile"
    elif _TAG_STRIP_OFFSETS in tags:
        rows = int(tags.get(_TAG_ROWS_PER_STRIP, [h])[0]) or h
        need = _ceil_div(h, min(rows, h)) * planes
        offsets, counts, unit = tags[_TAG_STRIP_OFFSETS], tags.get(_TAG_STRIP_COUNTS, []), "strip"
    else:
        raise _Bad(f"damaged: image {index} has no tile or strip table")
    if len(offsets) < need or len(counts) < need:
        have = min(len(offsets), len(counts))
        raise _Bad(
            f"damaged: dimensions {w:,}×{h:,} px of image {index} do not match the {unit} data "
            f"({have:,} {unit}(s) recorded, {need:,} needed)"
        )
    for k, (o, c) in enumerate(zip(offsets[:need], counts[:need])):
        if c and o + c > size:
            raise _Bad(
                f"truncated: {unit} {k} of image {index} lies beyond the end of the file "
                f"(ends at byte {int(o) + int(c):,} of {size:,})"
            )
    if w * h >= BOMB_MIN_PIXELS:
        stored = sum(int(c) for _, c in set(zip(offsets[:need], counts[:need])))
        if stored * MAX_EXPANSION < w * h * 3:
            raise _Bad(
                f"decompression bomb: image {index} claims {w:,}×{h:,} px ({w * h * 3 / 1e9:.1f} GB of pixels) "
                f"from {stored:,} bytes of {unit} data"
            )
