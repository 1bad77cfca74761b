"""Hooks into a training step, and the engine state they see.

Order within a step: for each phase, ``after_backward`` (gradients of all micro-batches summed,
before clipping; a Gaussian model densifies and prunes here), then ``before_optimizer_step`` and
``after_optimizer_step`` around the step of the phase's optimizers (skipped, with them, when the
loss or gradients were not finite); after the last phase ``after_step`` (``state.step`` then counts
the finished steps). Hooks must be deterministic functions of the state for resume to stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from avatarcli.errors import AvatarError
from avatarcli.train.params import Carry, append_rows, keep_rows, replace_parameter

if TYPE_CHECKING:
    from avatarcli.train.distributed import DistInfo
    from avatarcli.train.ema import ModelEma
    from avatarcli.train.task import Phase


@dataclass
class EngineState:
    config: Any
    """The ``EngineConfig``."""
    models: dict[str, nn.Module]
    """The task's models, unwrapped."""
    forward: dict[str, nn.Module]
    """What phase losses call: trained models wrapped (DDP, ``torch.compile``), the others and the
    EMA copies as they are."""
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    emas: dict[str, "ModelEma"]
    device: torch.device
    dist: "DistInfo"
    step: int = 0
    """Steps finished before this one (in ``after_step``: including it)."""
    ddp_models: frozenset[str] = frozenset()

    def all_models(self) -> dict[str, nn.Module]:
        """The task's models and the EMA copies, unwrapped."""
        return {**self.models, **{name: ema.module for name, ema in self.emas.items()}}

    def _model_for_surgery(self, model: str) -> nn.Module:
        if model in self.ddp_models:
            raise AvatarError(f"parameters of {model!r} cannot change size under DDP (its gradient buckets are fixed)")
        return self.models[model]

    def replace_parameter(self, model: str, name: str, value: torch.Tensor, carry: Carry) -> nn.Parameter:
        """``params.replace_parameter`` on model ``model``, over every optimizer."""
        return replace_parameter(self._model_for_surgery(model), name, value, self.optimizers.values(), carry)

    def keep_rows(self, model: str, name: str, rows: torch.Tensor) -> nn.Parameter:
        """Prune or reorder: keep ``rows`` of parameter ``name`` and of its optimizer state."""
        return keep_rows(self._model_for_surgery(model), name, rows, self.optimizers.values())

    def append_rows(self, model: str, name: str, rows: torch.Tensor) -> nn.Parameter:
        """Grow: append ``rows`` to parameter ``name``; their optimizer state starts at zero."""
        return append_rows(self._model_for_surgery(model), name, rows, self.optimizers.values())


class TrainHook:
    """Subclass and override what you need; every method does nothing by default."""

    def after_backward(self, state: EngineState, phase: "Phase") -> None:
        pass

    def before_optimizer_step(self, state: EngineState, phase: "Phase") -> None:
        pass

    def after_optimizer_step(self, state: EngineState, phase: "Phase") -> None:
        pass

    def after_step(self, state: EngineState) -> None:
        pass
