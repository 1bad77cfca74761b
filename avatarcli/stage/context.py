"""What a stage's phases share while it runs: the device, a step timer, progress and the clock."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class Progress(Protocol):
    """Progress reporting (``avatarcli.cli.common.StageProgress`` on the command line)."""

    def start(self, total_units: int, done_units: int = 0) -> None: ...

    def advance_frames(self, count: int) -> None: ...

    def unit_done(self, name: str, status: str, reason: str) -> None: ...


class NullProgress:
    """Progress that reports nothing (library use, tests)."""

    def start(self, total_units: int, done_units: int = 0) -> None:
        pass

    def advance_frames(self, count: int) -> None:
        pass

    def unit_done(self, name: str, status: str, reason: str) -> None:
        pass


@dataclass
class RunContext:
    """``device`` is a ``torch.device``; ``timer`` a :class:`avatarcli.timing.StepTimer` (CUDA steps
    timed with events when ``cuda_events``, else with a sync of the current stream)."""

    device: Any
    timer: Any
    progress: Progress
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, device_name: str, progress: Progress | None = None, *, cuda_events: bool = False) -> "RunContext":
        from avatarcli.devices import resolve_device
        from avatarcli.timing import StepTimer

        name = resolve_device(device_name)  # first: sets up CPU threads before torch loads OpenMP
        import torch

        device = torch.device(name)
        if device.type == "cuda":
            if device.index is not None:
                torch.cuda.set_device(device)
            timer = StepTimer(lambda: torch.cuda.current_stream().synchronize(), cuda_events=cuda_events)
        else:
            timer = StepTimer()
        return cls(device, timer, progress if progress is not None else NullProgress())

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def device_name(self) -> str:
        """'cpu', 'cuda' or 'cuda:N' as the user wrote it (for summaries and JSON)."""
        return str(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
