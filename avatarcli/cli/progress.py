"""Progress as plain lines, for a stderr that is not a terminal (a pipe, a log file, CI).

rich draws no bar there, so a long run would print nothing until its summary. Instead one line at
most every ``AVATAR_PROGRESS_INTERVAL`` seconds (default 5) says units done, rate and ETA, and a
final line says where the run ended::

    preprocess: 3/6 videos, 512 frames, 180 frames/s, ETA 0:00:09, last b.mp4
    train-recon: step 400/2000, 6.1 steps/s, loss 0.0123, ETA 0:04:22

No import of ``avatarcli.cli.common`` here (it imports this module); the console is passed in.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

from avatarcli.errors import AvatarError

INTERVAL_ENV = "AVATAR_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 5.0


def progress_interval() -> float:
    """Seconds between two progress lines: ``$AVATAR_PROGRESS_INTERVAL`` or 5."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise AvatarError(f"{INTERVAL_ENV} must be a number of seconds >= 0, not {raw!r}")
    return value


def clock_text(seconds: float | None) -> str:
    """``H:MM:SS``; '?' while unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def rate_text(per_second: float) -> str:
    """A rate with about three significant figures (180, 6.1, 0.42)."""
    if per_second >= 100:
        return f"{per_second:.0f}"
    return f"{per_second:.1f}" if per_second >= 1 else f"{per_second:.2f}"


def remaining_seconds(done_now: float, left: float, elapsed: float) -> float | None:
    """Time for ``left`` more units at the pace of the ``done_now`` done in ``elapsed`` s; None before any."""
    if done_now <= 0 or elapsed <= 0:
        return None
    return max(left, 0) * elapsed / done_now


def stage_line(name: str, done: int, total: int, unit: str, frames: int, frames_per_second: float,
               eta: float | None, last: str = "") -> str:
    """``preprocess: 3/6 videos, 512 frames, 180 frames/s, ETA 0:00:09, last b.mp4``."""
    line = (f"{name}: {done}/{total} {unit}, {frames} frames, {rate_text(frames_per_second)} frames/s, "
            f"ETA {clock_text(eta)}")
    return f"{line}, last {last}" if last else line


def train_line(name: str, step: int, total: int, steps_per_second: float, loss: float, eta: float | None,
               skipped: int = 0) -> str:
    """``train-recon: step 400/2000, 6.1 steps/s, loss 0.0123, ETA 0:04:22`` (and skipped steps, if any)."""
    line = (f"{name}: step {step}/{total}, {rate_text(steps_per_second)} steps/s, loss {loss:.4g}, "
            f"ETA {clock_text(eta)}")
    return f"{line}, {skipped} skipped" if skipped else line


class ProgressLines:
    """Writes a line on ``console`` when asked, at most one per ``interval`` seconds (``due``)."""

    def __init__(self, console, interval: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.interval = progress_interval() if interval is None else interval
        self.clock = clock
        self.last = clock()

    def restart(self) -> None:
        """The next line is due one interval from now."""
        self.last = self.clock()

    def due(self) -> bool:
        return self.clock() - self.last >= self.interval

    def write(self, line: str) -> None:
        self.last = self.clock()
        # user text (file names): no markup, no emoji codes, never cut to the console width
        self.console.print(line, markup=False, emoji=False, highlight=False, soft_wrap=True)


class TrainProgressLines:
    """Training steps as lines; implements ``avatarcli.train.task.TrainProgress``. The final line is
    written by ``close`` when this run trained up to the last step (an interrupted or failed run says
    where it stopped in its error line)."""

    def __init__(self, description: str, console, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.description = description
        self.lines = ProgressLines(console, interval, clock)
        self.clock = clock
        self.total = self.first = self.step = self.skipped = 0
        self.loss = math.nan
        self.started: float | None = None

    def start(self, total: int, done: int) -> None:
        self.total, self.first, self.step = total, done, done
        self.started = self.clock()
        self.lines.restart()

    def update(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        self.step, self.loss, self.skipped = step, loss, int(metrics.get("skipped", 0))
        if self.lines.due():
            self.lines.write(self.line())

    def line(self) -> str:
        elapsed = self.clock() - (self.started if self.started is not None else self.clock())
        run = self.step - self.first
        rate = run / elapsed if elapsed > 0 else 0.0
        return train_line(self.description, self.step, self.total, rate, self.loss,
                          remaining_seconds(run, self.total - self.step, elapsed), self.skipped)

    def close(self) -> None:
        if self.started is not None and self.step >= self.total and self.step > self.first:
            self.lines.write(self.line())
        self.started = None  # close runs twice (the engine's finally, then the CLI's exit): one line
