"""The stage contract: a stage is a config, its inputs, and four phases.

check (settings and inputs exist; nothing heavy) -> prepare (resolve every model and input once,
open the parts store, so a missing file fails before any work) -> compute (the units not finished
yet, each written to the parts store as it finishes) -> write (assemble the artifact atomically,
return a :class:`~avatarcli.stage.summary.Summary`).

A stage module declares ``STAGE = StageSpec(...)``; the CLI finds it through the ``avatarcli.stages``
entry point group and generates the command from the spec and its config (so the library never
imports a stage). Stage modules import torch and their algorithms lazily, inside the phases.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from avatarcli.stage.context import Progress, RunContext
from avatarcli.stage.summary import Summary


@dataclass(frozen=True)
class InputSpec:
    """An input of a stage: a positional argument (``flag=None``) or an option naming a path.

    ``many``: a list of paths; ``stdin``: '-' reads the path(s) from stdin (the previous stage)."""

    name: str
    help: str
    flag: str | None = None
    short: str | None = None
    many: bool = False
    required: bool = True
    stdin: bool = False


@dataclass(frozen=True)
class StageSpec:
    """What the CLI needs to know of a stage. ``run(config, output=..., progress=..., **inputs)``."""

    name: str
    summary: str
    help: str
    config: type
    run: Callable[..., Summary]
    inputs: tuple[InputSpec, ...]
    unit: str = "units"
    epilog: str = ""
    output_default: str | None = None
    report: Callable[[Summary, Any], bool | None] | None = None
    """Prints stage-specific output after the summary table (given the summary and the config);
    returns True when it printed the stage's stdout itself (e.g. ``--json``)."""
    common: tuple[str, ...] = ("models_dir", "device", "overwrite")
    """The settings of :class:`~avatarcli.stage.config.StageConfig` this stage uses (others are not
    offered on its command line)."""
    order: int = 100
    """Position in ``avatar --help`` (pipeline order)."""
    progress: Callable[["StageSpec"], Any] | None = None
    """Makes the progress display (a context manager with the ``Progress`` methods); default: the
    CLI's unit/frames progress."""


class Stage:
    """Base of the stage classes: runs the phases in order on one :class:`RunContext`."""

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "unit"
    cuda_events: ClassVar[bool] = False
    """Time GPU steps with CUDA events (no host waits) instead of synchronising around them."""

    def __init__(self, config: Any, output: Any, progress: Progress | None = None):
        self.config = config
        self.output = output
        self.progress = progress

    def check(self) -> None:
        """Validate settings and that the inputs exist; no models, no heavy reads."""

    def prepare(self, ctx: RunContext) -> None:
        """Resolve every model and input once; open the parts store."""

    def compute(self, ctx: RunContext) -> None:
        """Process the units not finished yet, writing each to the parts store."""

    def write(self, ctx: RunContext) -> Summary:
        """Assemble the artifact (atomically) and report."""
        raise NotImplementedError

    def hold(self, resource):
        """Enter ``resource`` (a context manager, e.g. the :class:`PartsStore`) for the rest of the run:
        it is exited when the run ends, whether it succeeds or fails (the parts lock is released)."""
        return self._resources.enter_context(resource)

    def run(self) -> Summary:
        with ExitStack() as self._resources:
            self.check()
            ctx = RunContext.create(self.config.device, self.progress, cuda_events=self.cuda_events)
            self.prepare(ctx)
            self.compute(ctx)
            return self.write(ctx)
