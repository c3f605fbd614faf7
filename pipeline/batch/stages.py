"""Where each slide is in its processing, told to whoever enforces the per-slide time limit.

:func:`pipeline.batch.process.process_slides` calls :meth:`StageTracker.enter` as a slide moves
from one stage to the next. The engine supervising the worker keeps each slide's clock from
these calls (:class:`SlideClock`): time spent waiting for the model (:data:`WAITING`) does not
count, everything else does. When a slide's clock passes ``--slide-timeout`` the worker is
killed and replaced and the slide fails with "timed out after N s at <stage>".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

#: The stages, as the timeout message names them.
READING = "opening the slide and finding tissue"
WAITING = "waiting for the model"  # prepared ahead of time; not counted against the slide's time limit
MODEL = "reading tiles and running the patch model"
RULES = "quality gate, aggregation and rules"
OUTPUTS = "writing heatmaps, reports and result.json"
DONE = "done"

#: Default per-slide time limit, seconds (``--slide-timeout``): generous, about 10x the slowest
#: slide measured on the 2-core development CPU. 0 turns the limit off.
DEFAULT_SLIDE_TIMEOUT_S = 3600.0

STAGE_FILE = ".stage"


class StageTracker(Protocol):
    """Told when a slide enters a stage; must be cheap and thread-safe (stages overlap)."""

    def enter(self, slide_id: str, stage: str) -> None: ...


class NoTracker:
    """Tracks nothing (no time limit enforced around this process)."""

    def enter(self, slide_id: str, stage: str) -> None:
        return None


class FileTracker:
    """Writes the stage into ``OUT/<slide_id>/.stage`` (read by a supervisor that cannot ask the
    worker: a Ray driver whose actor is stuck); the file goes when the slide is done."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)

    def enter(self, slide_id: str, stage: str) -> None:
        path = self.out_dir / slide_id / STAGE_FILE
        try:
            if stage == DONE:
                path.unlink(missing_ok=True)
            else:
                path.parent.mkdir(exist_ok=True)  # never recreates a deleted output folder
                path.write_text(stage, encoding="utf-8")
        except OSError as exc:  # the stage is a courtesy for the timeout message; never fail a slide for it
            log.debug("%s: cannot record stage %r (%s)", slide_id, stage, exc)


def read_stage_file(out_dir: Path, slide_id: str) -> str | None:
    """The stage :class:`FileTracker` last recorded for ``slide_id`` (None if none)."""
    try:
        return (Path(out_dir) / slide_id / STAGE_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def clear_stage_file(out_dir: Path, slide_id: str) -> None:
    """Remove a stage file left by a worker that was killed."""
    try:
        (Path(out_dir) / slide_id / STAGE_FILE).unlink(missing_ok=True)
    except OSError as exc:  # a read-only or vanished output folder: nothing to clear
        log.debug("%s: cannot clear the stage file (%s)", slide_id, exc)


@dataclass
class SlideClock:
    """One slide's time against the limit, seconds (monotonic clock of the supervisor)."""

    stage: str
    since: float = field(default_factory=time.monotonic)
    spent: float = 0.0

    def enter(self, stage: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.stage != WAITING:
            self.spent += now - self.since
        self.stage, self.since = stage, now

    def elapsed(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return self.spent + (0.0 if self.stage == WAITING else now - self.since)


def timeout_message(limit_s: float, stage: str) -> str:
    """The one-line error of a slide abandoned at ``stage``."""
    return (
        f"timed out after {limit_s:g} s at {stage}: abandoned and its worker replaced "
        "(raise --slide-timeout if slides this large are expected)"
    )
