"""A weighted sum of named losses, and what a training run records about it.

    losses = LossSet({"l1": 1.0, "ms_ssim": 0.2, "lpips_vgg": 0.8, "identity": 0.1}, required=False)
    losses.to(device)
    total, terms = losses(generated, target, keypoints=kps)  # terms: {name: detached scalar}
    run_fingerprint["losses"] = losses.describe()              # which were active, weights, sha256s
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from avatarcli.errors import AvatarError
from avatarcli.losses.identity import IdentityLoss
from avatarcli.losses.perceptual import PerceptualLoss
from avatarcli.losses.pixel import L1Loss, L2Loss, MSSSIMLoss, SSIMLoss

LOSSES = {
    "l1": lambda models_dir, required: L1Loss(),
    "l2": lambda models_dir, required: L2Loss(),
    "ssim": lambda models_dir, required: SSIMLoss(),
    "ms_ssim": lambda models_dir, required: MSSSIMLoss(),
    "identity": lambda models_dir, required: IdentityLoss(models_dir=models_dir, required=required),
    "lpips_vgg": lambda models_dir, required: PerceptualLoss("vgg", models_dir, required),
    "lpips_alex": lambda models_dir, required: PerceptualLoss("alex", models_dir, required),
}
"""Loss names a weights dict may use -> builder ``(models_dir, required) -> module`` (mean reduction)."""


def _inputs_of(module: nn.Module) -> tuple[str, ...]:
    """Keyword inputs ``module.forward`` takes after (generated, target)."""
    names = list(inspect.signature(module.forward).parameters)
    return tuple(names[2:])


class LossSet(nn.Module):
    """``forward(generated, target, **inputs) -> (total, {name: value})``: Σ weight · loss.

    Args:
        weights: {loss name: weight}; names from :data:`LOSSES` or from ``modules``. Zero weights
            leave a term out (it is not even built).
        models_dir: extra models folder for the network losses.
        required: passed to the network losses: missing weights raise (True) or disable the term
            (False: it warns once, is left out of the total, and ``describe`` says why).
        modules: prebuilt loss modules by name (custom terms, or configured versions of the defaults),
            each ``forward(generated, target, ...) -> scalar``.

    ``inputs`` (``mask``, ``keypoints``, ``target_keypoints``, ...) go to the terms whose ``forward``
    takes them. The returned values are the unweighted terms, detached (for logging); only ``total``
    carries gradients.
    """

    def __init__(self, weights: dict[str, float], models_dir=None, required: bool = True,
                 modules: dict[str, nn.Module] | None = None):
        super().__init__()
        modules = dict(modules or {})
        unknown = [name for name in weights if name not in LOSSES and name not in modules]
        if unknown:
            raise AvatarError(f"unknown loss {', '.join(map(repr, unknown))} (known: {', '.join(LOSSES)})")
        self.weights: dict[str, float] = {}
        for name, weight in weights.items():
            weight = float(weight)
            if not math.isfinite(weight):
                raise AvatarError(f"loss {name!r} has weight {weight}")
            if weight != 0.0:
                self.weights[name] = weight
        self.terms = nn.ModuleDict({
            name: modules[name] if name in modules else LOSSES[name](models_dir, required) for name in self.weights
        })
        self._inputs = {name: _inputs_of(module) for name, module in self.terms.items()}

    def active(self) -> list[str]:
        """Names of the terms that contribute (weight ≠ 0 and their networks loaded)."""
        return [name for name, module in self.terms.items() if getattr(module, "active", True)]

    def forward(self, generated: torch.Tensor, target: torch.Tensor, **inputs) -> tuple[torch.Tensor, dict]:
        accepted = {name for names in self._inputs.values() for name in names}
        stray = sorted(set(inputs) - accepted)
        if stray:
            raise AvatarError(f"no loss in this set takes {', '.join(stray)} (they take: {', '.join(sorted(accepted))})")
        total = generated.new_zeros(())
        values: dict[str, torch.Tensor] = {}
        for name in self.active():
            kwargs = {key: value for key, value in inputs.items() if key in self._inputs[name]}
            value = self.terms[name](generated, target, **kwargs)
            total = total + self.weights[name] * value
            values[name] = value.detach()
        return total, values

    def describe(self) -> dict:
        """{name: {"weight", "active", "reason", "models": {registry name: sha256}}}, by name, for a
        run's fingerprint (config hash or checkpoint): a run without a term says so."""
        out = {}
        for name in sorted(self.terms):
            module = self.terms[name]
            entry = {"weight": self.weights[name], "active": bool(getattr(module, "active", True)),
                     "reason": getattr(module, "reason", None), "models": dict(getattr(module, "models", {}))}
            out[name] = entry
        return out
