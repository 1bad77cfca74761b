"""A rich progress bar for training steps on a terminal: it/s, ETA, loss, skipped steps (elsewhere the
CLI prints lines instead: ``avatarcli.cli.progress.TrainProgressLines``)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class _Speed(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.2f} it/s" if speed else "   ... it/s")


class RichTrainProgress:
    """Implements ``avatarcli.train.task.TrainProgress``."""

    def __init__(self, description: str, console: Console):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            _Speed(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  skipped {task.fields[skipped]}"),
            console=console, transient=False,
        )
        self.description = description
        self.task = None

    def start(self, total: int, done: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=total, completed=done, loss=float("nan"), skipped=0)

    def update(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=step, loss=loss, skipped=int(metrics.get("skipped", 0)))

    def close(self) -> None:
        self.progress.stop()
