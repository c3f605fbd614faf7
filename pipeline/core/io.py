"""Atomic file writes: a file is either complete or absent, never truncated.

Every artefact the product writes goes through these helpers: the content is written to a
temporary file in the same folder, flushed and fsync'ed, then renamed over the target
(``os.replace`` is atomic on POSIX filesystems).

A write that fails because of the output folder (full disk, quota, read-only, deleted, no
permission) raises :class:`OutputWriteError`: one line, "cannot write <file>: <cause>", and the
temporary file is removed, so nothing half-written is ever left under the target's name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError

#: Causes that say the output folder itself is unusable (the batch stops rather than fail every slide).
FOLDER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOENT, errno.EACCES, errno.EPERM, errno.EIO})
_HINTS = {errno.ENOENT: " (was the output folder deleted or moved?)"}
_EMBEDDED_ERRNO = re.compile(r"errno\s*=\s*(\d+)")  # HDF5 reports the OS error inside its message


class OutputWriteError(PipelineError, OSError):
    """A file of the output could not be written: "cannot write <file>: <cause>" (also an ``OSError``)."""

    def __init__(self, message: str, errno_: int | None = None, path: str | None = None) -> None:
        PipelineError.__init__(self, message)
        self.errno = errno_
        self.filename = path

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (worker pipe, Ray) intact
        return (type(self), (self.args[0], self.errno, self.filename))

    @property
    def folder_unusable(self) -> bool:
        """True when the cause is the folder (full, read-only, gone, not ours), not this one file."""
        return self.errno in FOLDER_ERRNOS


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``: its ``errno``, or one quoted in its message (HDF5), else None."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, (OSError, RuntimeError)):
        m = _EMBEDDED_ERRNO.search(str(exc))
        if m:
            return int(m.group(1))
    return None


def write_error(target: str | Path, exc: BaseException) -> OutputWriteError | None:
    """``exc`` as an :class:`OutputWriteError` naming ``target`` when an OS error caused it, else None."""
    if isinstance(exc, OutputWriteError):
        return exc
    code = os_errno(exc)
    if code is None or code == 0:
        return None
    words = os.strerror(code)
    words = words[:1].lower() + words[1:]
    return OutputWriteError(f"cannot write {target}: {words}{_HINTS.get(code, '')}", code, str(target))


def ensure_dir(path: str | Path, parents: bool = True) -> Path:
    """``mkdir -p`` (or one level without ``parents``); a failure is an :class:`OutputWriteError`."""
    path = Path(path)
    try:
        path.mkdir(parents=parents, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) or exc from None
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds.

    Use for writers that want a file name (h5py, PIL, tifffile). ``suffix`` defaults to the
    target's own suffix so that format-sniffing writers behave.
    """
    target = Path(target)
    ensure_dir(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.",
            suffix=(suffix if suffix is not None else target.suffix) + ".tmp",
            dir=target.parent,
        )
    except OSError as exc:
        raise write_error(target, exc) or exc from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, target)
    except BaseException as exc:
        _discard(tmp_path)
        if isinstance(exc, Exception):
            err = write_error(target, exc)
            if err is not None and err is not exc:
                raise err from exc
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically; returns the target path.

    Same steps as :func:`atomic_path` on one file descriptor (written, fsync'ed, given normal
    permissions, renamed), without reopening the file: a slide writes about ten of these.
    """
    target = Path(target)
    ensure_dir(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix + ".tmp", dir=target.parent)
    except OSError as exc:
        raise write_error(target, exc) or exc from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as exc:
        _discard(Path(tmp))
        err = write_error(target, exc) if isinstance(exc, OSError) else None
        if err is not None and err is not exc:
            raise err from None
        raise
    return target


def _discard(tmp: Path) -> None:
    """Remove a temporary file; quietly, since the folder may be read-only or gone by now."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, NaN refused) to ``target`` atomically."""
    return atomic_write_text(target, json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False) + "\n")


def atomic_write_with(target: str | Path, writer: Callable[[Path], None], suffix: str | None = None) -> Path:
    """Call ``writer(tmp_path)`` then move the result onto ``target`` atomically."""
    with atomic_path(target, suffix=suffix) as tmp:
        writer(tmp)
    return Path(target)
