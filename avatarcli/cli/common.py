"""Shared CLI pieces: global state, consoles, option aliases, '-' from stdin, progress."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from avatarcli.errors import AvatarError

# Everything but the output path goes to stderr, so stages chain through pipes. Every user string
# (a path, a skip reason, an error) printed through it is escaped: '[/x]' in a file name is no markup.
err = Console(stderr=True, highlight=False)


@dataclass
class GlobalState:
    verbose: int = 0
    debug: bool = False
    device: str = "auto"
    seed: int = 0


STATE = GlobalState()

# Shared option aliases (one spelling everywhere, like the hf CLI).
ModelsOpt = Annotated[
    Optional[str],
    typer.Option("--models", help="Folder searched first for model files (then $AVATAR_MODELS, the cache).",
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
    """A rich progress bar on stderr for unit/frames loops (sources or clips, frames/s)."""

    def __init__(self, description: str, unit: str = "videos"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.unit = unit
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(escape(unit)),
            TextColumn("{task.fields[fps]:>7.1f} frames/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[last]}"), console=err, transient=False,
            disable=not err.is_terminal and STATE.verbose == 0,
        )
        self.description = description
        self.frames = 0
        self.t0 = time.perf_counter()
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def start(self, total_units: int, done_units: int = 0) -> None:
        self.task = self.progress.add_task(escape(self.description), total=total_units, completed=done_units,
                                           fps=0.0, last="")

    def advance_frames(self, count: int) -> None:
        self.frames += count
        if self.task is not None:
            rate = self.frames / max(time.perf_counter() - self.t0, 1e-6)
            self.progress.update(self.task, fps=rate)

    def unit_done(self, name: str, status: str, reason: str) -> None:
        if self.task is not None:
            shown = escape(name)
            self.progress.update(self.task, advance=1, last=shown if status == "ok" else f"[yellow]skipped {shown}")
        if STATE.verbose and status != "ok":
            err.print(f"[yellow]skipped[/] {escape(name)}: {escape(reason)}", soft_wrap=True)


def print_run_details(timings: dict, skipped: list[tuple[str, str]], unit: str) -> None:
    """After a stage's summary table: step seconds (with -v) and the table of skipped units."""
    from rich.table import Table

    if STATE.verbose:
        err.print("step seconds: " + ", ".join(f"{escape(k)} {v['seconds']:.2f}" for k, v in timings.items()))
    if skipped:
        table = Table(title=escape(f"skipped {unit}s"), header_style="bold yellow")
        table.add_column(escape(unit), overflow="fold")
        table.add_column("reason", overflow="fold")
        for name, reason in skipped:
            table.add_row(escape(name), escape(reason))
        err.print(table)
