"""What a trainer tells the engine: its models, optimizers, schedulers, the phases of a step, the
batch of a step, and optionally EMA copies, hooks, TensorBoard images and validation.

A step is one or more ``Phase`` s, each ``loss over some models -> backward -> step some
optimizers``: a GAN declares a discriminator phase, a generator phase and a lazily run R1 phase
(``every=4``); a single-model trainer declares one phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

PhaseLoss = Callable[[Mapping[str, nn.Module], Any, int], "tuple[torch.Tensor, dict[str, Any]]"]


@dataclass
class Phase:
    """One ``loss -> backward -> optimizer step`` of a training step.

    ``loss(models, batch, step)`` returns (scalar loss, extra scalar metrics); ``models`` maps every
    name to the module to call (wrapped for DDP / ``torch.compile`` where trained; EMA copies under
    their names). During the phase only the parameters of ``optimizers`` require gradients, and
    under DDP only the models they belong to synchronise gradients. DDP also needs every trainable
    parameter of a model a phase trains to be in the phase's optimizers and to get a gradient from its
    loss (a regulariser that misses some, like R1 the last bias, adds ``0 * output.mean()``).
    """

    name: str
    optimizers: tuple[str, ...]
    loss: PhaseLoss
    every: int = 1
    """Run on the steps divisible by this (lazy regularisation: R1 every 4 or 16 steps; the loss
    scales itself by ``every`` to keep its weight per step)."""
    grad_clip: float | None = None
    """Gradient-norm clip of this phase's parameters (None: ``EngineConfig.grad_clip``; 0: none)."""


@dataclass
class EmaSpec:
    """An EMA copy of model ``source`` (updated after every step whose phases were all finite)."""

    source: str
    decay: float


@dataclass
class Validation:
    """What ``TrainTask.validate`` returns."""

    metrics: dict[str, float] = field(default_factory=dict)
    """Scalars, recorded in the history as ``validation/<name>`` and in TensorBoard."""
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    """Name -> [N,3,H,W] in 0..1: one grid each, stacked into ``validation/step_XXXXXXX.png``."""


class TrainTask(Protocol):
    """What a trainer supplies to ``engine.train``.

    Optional methods, used when defined: ``ema_models() -> dict[str, EmaSpec]`` (default: with
    ``EngineConfig.ema_decay > 0`` an EMA ``<name>_ema`` of every trained model), ``hooks() ->
    list[TrainHook]``, ``images(models, batch) -> dict[str, Tensor]`` (TensorBoard grids every
    ``image_every`` steps), ``validate(models, step) -> Validation`` (every ``validate_every`` steps;
    ``models`` unwrapped, in eval mode, under ``no_grad``).
    """

    def fingerprint(self) -> dict:
        """Everything that changes the result (model, data, loss settings): a checkpoint made with a
        different fingerprint is not resumed."""

    def build_models(self) -> dict[str, nn.Module]:
        """Every module the checkpoint must hold (frozen loss networks stay in the task)."""

    def build_optimizers(self, models: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """Param groups carry their own learning rates."""

    def build_schedulers(self, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
        """Stepped once per training step, whether its phases ran or were skipped."""

    def phases(self) -> list[Phase]: ...

    def batch(self, step: int, shard: int, shards: int, device: torch.device) -> Any:
        """Shard ``shard`` of ``shards`` of the batch of ``step``: a pure function of (seed, step,
        shard, shards). ``shards`` = processes × ``accumulate``; shard = rank × accumulate +
        micro-batch, so the shards of one step together are the whole batch."""


class TrainProgress(Protocol):
    def start(self, total: int, done: int) -> None: ...

    def update(self, step: int, loss: float, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...
