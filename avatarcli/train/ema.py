"""EMA copies of trained models ("generator_ema"): the moving average of a model's floating-point
state (parameters and buffers; integer buffers are copied), kept in a frozen copy of the model so
that validation and the result can call it like the model itself."""

from __future__ import annotations

import copy

import torch
from torch import nn

from avatarcli.train.params import match_state_shapes, set_state_tensor


class ModelEma:
    def __init__(self, source: nn.Module, decay: float, source_name: str = ""):
        self.decay = decay
        self.source_name = source_name
        """Name of the model this is the average of."""
        self.module = copy.deepcopy(source).requires_grad_(False).eval()
        self._shadow = self.module.state_dict()  # aliases of the copy's tensors, updated in place

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        """shadow ← shadow + (1 − decay)·(value − shadow). A tensor the source resized (densify,
        prune) restarts from the source's value."""
        for key, value in source.state_dict().items():
            shadow = self._shadow[key]
            if shadow.shape != value.shape:
                set_state_tensor(self.module, key, value.detach().clone())
                self._shadow = self.module.state_dict()
            elif shadow.is_floating_point():
                shadow.lerp_(value.detach(), 1.0 - self.decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        match_state_shapes(self.module, state)
        self.module.load_state_dict(state)
        self._shadow = self.module.state_dict()
