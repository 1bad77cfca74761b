"""What every loss shares: input checks, the reduction, and the frozen-network base class.

Losses take images ``[B,C,H,W]`` with values in [0,1] (any float dtype, any device) and reduce
per-image values ``[B]`` with ``reduction``: ``"mean"`` (each image weighs the same), ``"sum"``,
or ``"none"`` (the ``[B]`` values).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from avatarcli.errors import AvatarError

REDUCTIONS = ("mean", "sum", "none")


def reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    """[B] per-image values -> a scalar (``mean``/``sum``) or the [B] values themselves (``none``)."""
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    if reduction == "none":
        return per_image
    raise AvatarError(f"unknown reduction {reduction!r} (use one of {', '.join(REDUCTIONS)})")


def check_images(generated: torch.Tensor, target: torch.Tensor, channels: int | None = None) -> None:
    """One clear error for inputs that are not two float [B,C,H,W] batches of the same shape."""
    for name, x in (("generated", generated), ("target", target)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise AvatarError(f"{name} images must be a float tensor [B,C,H,W] in [0,1], got {shape}")
        if channels is not None and x.shape[1] != channels:
            raise AvatarError(f"{name} images must have {channels} channels (RGB), got {x.shape[1]}")
    if generated.shape != target.shape:
        raise AvatarError(f"generated {tuple(generated.shape)} and target {tuple(target.shape)} differ in shape")


def as_nhwc(images: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,H,W,C] view: the layout of ``avatarcli.metrics.image``."""
    return images.permute(0, 2, 3, 1)


class FrozenNetLoss(nn.Module):
    """A loss through pretrained networks that stay frozen (gradients flow to the images only).

    ``active`` says whether the networks were loaded; ``reason`` why not (None when active);
    ``models`` maps each registry name used to its file's sha256 (for a run's fingerprint).
    Built with ``required=False``, a loss whose weights are missing is disabled: it warns once
    (``"<label> disabled: <why>"``) and returns zeros, instead of ever running a random network.
    The networks stay in eval mode whatever ``train()`` says (a trainer's ``model.train()`` must not
    switch on dropout or batch statistics inside a loss).
    """

    label = "loss"

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.reason: str | None = "not loaded"
        self.models: dict[str, str] = {}

    def _load_or_disable(self, load, required: bool) -> None:
        """Call ``load()`` (which builds the networks and fills ``models``); on a missing or bad
        model raise, or, when not ``required``, disable this loss with one warning."""
        try:
            load()
        except AvatarError as exc:
            if required:
                raise AvatarError(f"{self.label}: {exc}") from None
            self.active, self.reason, self.models = False, str(exc), {}
            warnings.warn(f"{self.label} disabled: {exc}", RuntimeWarning, stacklevel=3)
            return
        self.active, self.reason = True, None
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenNetLoss":
        super().train(False)
        return self

    def _disabled(self, generated: torch.Tensor, reduction: str) -> torch.Tensor:
        return reduce(generated.new_zeros(generated.shape[0]), reduction)

    def describe(self) -> dict:
        """``{"active", "reason", "models": {registry name: sha256}}``."""
        return {"active": self.active, "reason": self.reason, "models": dict(self.models)}
