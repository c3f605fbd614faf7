"""Run state on disk: the output lock, the "is this slide done?" check, and the one-line errors of
an output folder that fails mid-run (full, read-only, deleted), shared by both engines.

A slide is done only when its ``result.json`` reads as a :class:`~pipeline.result.SlideResult`, has status ``ok`` or ``non_diagnostic``,
and every file it lists exists and parses. Failed slides are retried on the next run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.io import OutputWriteError, write_error
from pipeline.result import RESULT_FILE, ResultFormatError, read_result

log = logging.getLogger(__name__)

LOCK_NAME = ".nme-run.lock"


class LockError(PipelineError):
    """Another live run holds the output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Exclusive lock on an output folder (PID + host in a lock file; stale locks are taken over)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileNotFoundError as exc:
                raise write_error(self.path, exc) or exc from None
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError):
                    other = {}
                pid, host = int(other.get("pid", -1)), other.get("host")
                if host == socket.gethostname() and pid > 0 and not _pid_alive(pid):
                    log.warning("removing stale lock %s (pid %d is gone)", self.path, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                if host not in (None, socket.gethostname()):
                    raise LockError(
                        f"{self.path}: output folder locked by a run on host {host} (pid {pid}); "
                        "if that run is dead, delete the lock file"
                    ) from None
                raise LockError(f"{self.path}: another run (pid {pid}) is writing this output folder") from None
            except OSError as exc:  # read-only, full, no permission: one line, no traceback
                raise write_error(self.path, exc) or exc from None
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(me, fh)
            except OSError as exc:
                raise write_error(self.path, exc) or exc from None
            self.held = True
            return
        raise LockError(f"{self.path}: could not take the output lock")

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:  # a read-only or vanished output folder: the next run takes the stale lock over
                log.warning("%s: cannot remove the output lock (%s)", self.path, exc.strerror or exc)
            self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _file_ok(path: Path) -> bool:
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        suffix = path.suffix.lower()
        if suffix in (".json", ".geojson"):
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".png":
            with open(path, "rb") as fh:
                head = fh.read(8)
            size = path.stat().st_size
            with open(path, "rb") as fh:
                fh.seek(max(0, size - 12))
                tail = fh.read()
            return head == b"\x89PNG\r\n\x1a\n" and b"IEND" in tail
        elif suffix in (".jpg", ".jpeg"):
            with open(path, "rb") as fh:
                head = fh.read(3)
                fh.seek(max(0, path.stat().st_size - 2))
                tail = fh.read()
            return head == b"\xff\xd8\xff" and tail == b"\xff\xd9"  # start of image ... end of image
        elif suffix == ".html":
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 64))
                return b"</html>" in fh.read().lower()
        return True
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def is_done(slide_dir: Path) -> bool:
    """True when the slide's result is finished (``ok``/``non_diagnostic``) and every file it lists is complete.

    A ``result.json`` this version cannot read (damaged, or from another version) is not done:
    the slide is redone, and the reason is logged in one line.
    """
    if not (slide_dir / RESULT_FILE).exists():
        return False
    try:
        result = read_result(slide_dir)
    except ResultFormatError as exc:
        log.warning("%s", exc)
        return False
    return result.done and all(_file_ok(slide_dir / name) for name in result.files)


def check_output_folder(out_dir: Path) -> None:
    """Raise :class:`OutputWriteError` when the output folder was deleted or replaced (the run's lock file is gone)."""
    if not (Path(out_dir) / LOCK_NAME).exists():
        raise OutputWriteError(
            f"{out_dir}: the output folder was deleted or replaced during the run (its lock file is gone)",
            errno.ENOENT,
        )


def batch_stopped(exc: OutputWriteError, done: int, todo: int) -> OutputWriteError:
    """The one-line error that stops a batch because the output folder failed (``exc`` says what and why)."""
    return OutputWriteError(
        f"{exc}; the batch stopped after {done} of {todo} slide(s) (finished results are kept): "
        "free space or repair the output folder, then run again to finish the rest",
        exc.errno,
        exc.filename,
    )


@contextmanager
def summary_write(n_slides: int) -> Iterator[None]:
    """The run summary failing to write (every slide's result is already on disk) says so in one line."""
    try:
        yield
    except OutputWriteError as exc:
        raise OutputWriteError(
            f"{exc}; the {n_slides} slide(s) of this run were processed and their results written, only the run "
            "summary is missing: free space or repair the output folder, then run again to write it",
            exc.errno,
            exc.filename,
        ) from None
