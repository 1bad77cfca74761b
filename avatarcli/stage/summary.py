"""What a stage run reports: one type for every stage, printed by the CLI with one table helper."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Summary:
    """The outcome of a stage run.

    ``units``: units in the output (videos, clips, clip pairs...); ``units_now``/``reused``: done by
    this run / kept from an earlier one; ``frames_now`` over ``seconds`` is the speed a user saw.
    ``columns``: stage-specific figures for the summary table, in order. ``produced``: False when
    nothing usable was written (the CLI then exits nonzero).
    """

    stage: str
    output: Path
    unit: str
    units: int
    frames: int
    units_now: int = 0
    reused: int = 0
    frames_now: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    device: str = "cpu"
    columns: dict[str, object] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    produced: bool = True

    @property
    def frames_per_second(self) -> float:
        return self.frames_now / self.seconds if self.seconds > 0 else 0.0
