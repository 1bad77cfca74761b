"""Shared CLI pieces: global state, consoles, option aliases, '-' from stdin, progress, tables."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from avatarcli.cli.progress import ProgressLines, TrainProgressLines, remaining_seconds, stage_line
from avatarcli.errors import AvatarError
from avatarcli.registry import MODELS_OPTION_HELP

# Everything but the output path goes to stderr, so stages chain through pipes. Every user string
# (a path, a skip reason, an error) printed through it is escaped: '[/x]' in a file name is no markup.
err = Console(stderr=True, highlight=False)


@dataclass
class GlobalState:
    verbose: int = 0
    quiet: bool = False
    debug: bool = False
    device: str = "auto"
    seed: int = 0


STATE = GlobalState()

# Shared option aliases (one spelling everywhere, like the hf CLI).
ModelsOpt = Annotated[
    Optional[str],
    typer.Option("--models", help=MODELS_OPTION_HELP,
                 envvar=None, show_default=False),
]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output artifact path (.h5).")]


def stdin_path(value: str) -> str:
    """'-' means: read the path from stdin (the previous stage's stdout)."""
    if value != "-":
        return value
    if sys.stdin is None or sys.stdin.isatty():
        raise AvatarError("'-' reads the input path from stdin, but nothing was piped in")
    lines = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if not lines:
        raise AvatarError("'-' reads the input path from stdin, but stdin was empty (did the previous stage fail?)")
    return lines[-1]


def stdin_paths(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        if value == "-":
            if sys.stdin is None or sys.stdin.isatty():
                raise AvatarError("'-' reads input paths from stdin, but nothing was piped in")
            out.extend(line.strip() for line in sys.stdin.read().splitlines() if line.strip())
        else:
            out.append(value)
    if not out:
        raise AvatarError("no inputs given")
    return out


def emit_output(path) -> None:
    """The one line a stage prints on stdout: its output artifact path."""
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


class StageProgress:
    """Progress of unit/frames loops (sources or clips, frames/s) on stderr: a rich bar on a
    terminal, else a plain line every few seconds and a final one (``avatarcli.cli.progress``);
    nothing with ``-q``. ``unit``: the plural shown (videos, clips)."""

    def __init__(self, description: str, unit: str = "videos"):
        self.unit = unit
        self.description = description
        self.frames = 0
        self.t0 = time.perf_counter()
        self.task = None
        self.progress = None
        self.lines: ProgressLines | None = None
        self.total = self.done = self.done_before = 0
        self.last = ""
        if STATE.quiet:
            return
        if not err.is_terminal:
            self.lines = ProgressLines(err)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(escape(unit)),
            TextColumn("{task.fields[fps]:>7.1f} frames/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[last]}"), console=err, transient=False,
        )

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        elif self.lines is not None and self.task is not None and exc[0] is None:
            self.lines.write(self.line())  # the final line; a failed run ends with its error line only

    def start(self, total_units: int, done_units: int = 0) -> None:
        self.total, self.done, self.done_before = total_units, done_units, done_units
        self.t0 = time.perf_counter()
        self.task = True
        if self.lines is not None:
            self.lines.restart()
        if self.progress is not None:
            self.task = self.progress.add_task(escape(self.description), total=total_units, completed=done_units,
                                               fps=0.0, last="")

    def frames_per_second(self) -> float:
        return self.frames / max(time.perf_counter() - self.t0, 1e-6)

    def line(self) -> str:
        """The plain progress line: units done, frames, frames/s, ETA from the units done by this run."""
        eta = remaining_seconds(self.done - self.done_before, self.total - self.done, time.perf_counter() - self.t0)
        return stage_line(self.description, self.done, self.total, self.unit, self.frames, self.frames_per_second(),
                          eta, self.last)

    def _tick(self) -> None:
        if self.lines is not None and self.task is not None and self.lines.due():
            self.lines.write(self.line())

    def advance_frames(self, count: int) -> None:
        self.frames += count
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, fps=self.frames_per_second())
        self._tick()

    def unit_done(self, name: str, status: str, reason: str) -> None:
        self.done += 1
        self.last = name if status == "ok" else f"skipped {name}"
        if self.progress is not None and self.task is not None:
            shown = escape(name)
            self.progress.update(self.task, advance=1, last=shown if status == "ok" else f"[yellow]skipped {shown}")
        if STATE.verbose and status != "ok":
            err.print(f"[yellow]skipped[/] {escape(name)}: {escape(reason)}", soft_wrap=True)
        self._tick()


class TrainProgressDisplay:
    """A trainer stage's CLI progress (``StageSpec.progress``): the training steps, on rank 0 only, as
    a rich bar on a terminal or plain lines otherwise (none with ``-q``); a context manager with the
    engine's ``TrainProgress`` methods (the stage ``Progress`` ones do nothing: no units)."""

    def __init__(self, spec):
        main_rank = int(os.environ.get("RANK", "0")) == 0
        self.bar = None
        if not main_rank or STATE.quiet:
            return
        if err.is_terminal:
            from avatarcli.train.progress import RichTrainProgress

            self.bar = RichTrainProgress(spec.name, err)
        else:
            self.bar = TrainProgressLines(spec.name, err)

    def __enter__(self) -> "TrainProgressDisplay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, total: int, done: int = 0) -> None:
        if self.bar is not None:
            self.bar.start(total, done)

    def update(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step, loss, metrics)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def advance_frames(self, count: int) -> None:
        pass

    def unit_done(self, name: str, status: str, reason: str) -> None:
        pass


def print_table(title: str, columns: dict[str, object], style: str = "bold") -> None:
    """One row of named figures on stderr that is never cut: across when it fits the console (long
    headers wrapped at spaces), else one ``name | value`` row per figure (a log or a pipe is 80 wide)."""
    err.print(fitted_table(title, columns, err.width, style))


def fitted_table(title: str, columns: dict[str, object], width: int, style: str = "bold"):
    """The rich table ``print_table`` prints at ``width`` columns (user strings escaped). The column
    widths are chosen here: rich squeezes columns below their longest word when space is short."""
    from rich.cells import cell_len
    from rich.table import Table

    names, values = list(columns), [str(v) for v in columns.values()]
    # per column: the narrowest width that breaks no word, and the width of one header line
    least = [max([cell_len(values[i]), *(cell_len(word) for word in names[i].split())]) for i in range(len(names))]
    full = [max(cell_len(values[i]), cell_len(names[i])) for i in range(len(names))]
    spare = width - (sum(least) + 3 * len(names) + 1)  # '│ x ' per column and the closing '│'
    if spare >= 0:
        widths = list(least)
        for i in sorted(range(len(names)), key=lambda i: full[i] - least[i]):  # unwrap the cheapest headers
            if full[i] - least[i] <= spare:
                spare -= full[i] - least[i]
                widths[i] = full[i]
        across = Table(title=escape(title), header_style=style)
        for name, column_width in zip(names, widths):
            across.add_column(escape(name), justify="right", width=column_width, overflow="fold")
        across.add_row(*(escape(v) for v in values))
        return across
    down = Table(title=escape(title), show_header=False)
    down.add_column(style=style, overflow="fold")
    down.add_column(justify="right", overflow="fold")
    for name, value in zip(names, values):
        down.add_row(escape(name), escape(value))
    return down


def print_run_details(timings: dict, skipped: list[tuple[str, str]], unit: str) -> None:
    """After a stage's summary table: step seconds (with -v) and the table of skipped units."""
    from rich.table import Table

    if STATE.verbose:
        err.print("step seconds: " + ", ".join(f"{escape(k)} {v['seconds']:.2f}" for k, v in timings.items()),
                  soft_wrap=True)
    if skipped:
        table = Table(title=escape(f"skipped {unit}s"), header_style="bold yellow")
        table.add_column(escape(unit), overflow="fold")
        table.add_column("reason", overflow="fold")
        for name, reason in skipped:
            table.add_row(escape(name), escape(reason))
        err.print(table)
