"""Perceptual loss: LPIPS v0.1 (Zhang et al. 2018) with a VGG16 or AlexNet backbone.

The network is the metric's (:class:`avatarcli.metrics.lpips.LPIPS`): ImageNet feature weights and
the LPIPS linear heads, both through the model registry (``vgg16_imagenet`` + ``lpips_vgg_lin``,
``alexnet_imagenet`` + ``lpips_alex_lin``), downloaded on first use where the machine is online.
Frozen: gradients flow to the images only. VGG-LPIPS is the usual training loss (EG3D, GFPGAN);
AlexNet-LPIPS the usual metric.

Without the weights the loss never falls back to a random backbone: it raises, or, built with
``required=False``, it is disabled (one warning, zeros, ``active`` False and ``reason``), so a
trainer can record in its fingerprint that it ran without it.
"""

from __future__ import annotations

import torch

from avatarcli.errors import AvatarError
from avatarcli.losses.base import FrozenNetLoss, check_images, reduce
from avatarcli.metrics.lpips import LPIPS, LPIPS_NETS


class PerceptualLoss(FrozenNetLoss):
    """``forward(generated, target)``: [B,3,H,W] RGB in [0,1] -> LPIPS distance (scalar, or [B]).

    Args:
        net: ``"vgg"`` (VGG16) or ``"alex"`` (AlexNet).
        models_dir: extra models folder searched first (see :mod:`avatarcli.registry`).
        required: missing weights raise an ``AvatarError``; with False the loss is disabled instead.
        reduction: ``mean`` | ``sum`` | ``none`` ([B]).
        lpips: an already built :class:`LPIPS` network to use instead of loading one (its
            ``models`` fingerprint is then empty: the caller knows where its weights came from).

    Images of at least 32×32 (AlexNet) or 16×16 (VGG16) pixels give every tap a feature map.
    """

    label = "perceptual loss"

    def __init__(self, net: str = "vgg", models_dir=None, required: bool = True, reduction: str = "mean",
                 lpips: LPIPS | None = None):
        super().__init__()
        if net not in LPIPS_NETS:
            raise AvatarError(f"unknown perceptual-loss network {net!r} (use one of {', '.join(LPIPS_NETS)})")
        reduce(torch.zeros(1), reduction)
        self.net_name, self.reduction = net, reduction
        self.label = f"perceptual loss (LPIPS {net})"
        self.lpips = None
        self._load_or_disable(lambda: self._load(models_dir, lpips), required)

    def _load(self, models_dir, lpips: LPIPS | None) -> None:
        if lpips is not None:
            self.lpips = lpips
            return
        from avatarcli.registry import file_sha256, resolve

        _, _, _, backbone_name, lin_name = LPIPS_NETS[self.net_name]
        paths = {name: resolve(name, models_dir) for name in (backbone_name, lin_name)}  # both, before loading
        self.lpips = LPIPS.from_registry("cpu", models_dir, self.net_name)
        self.models = {name: file_sha256(path) for name, path in paths.items()}

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_images(generated, target, channels=3)
        if not self.active:
            return self._disabled(generated, self.reduction)
        # LPIPS takes [-1,1]; its weights set the compute dtype (float64 inputs run in float64 only
        # when the module was converted with .double()).
        dtype = self.lpips.shift.dtype
        distance = self.lpips(generated.to(dtype) * 2 - 1, target.to(dtype) * 2 - 1)
        return reduce(distance.to(generated.dtype), self.reduction)
