"""Differentiable training losses, as functions and ``nn.Module`` pairs (kornia style).

Images are [B,3,H,W] RGB in [0,1]; every loss reduces per-image values with ``reduction``
(``mean`` | ``sum`` | ``none`` for [B]). Pixel and structure losses in :mod:`.pixel` (L1, L2,
1 - SSIM, 1 - MS-SSIM, reusing the metric SSIM); network losses through the model registry, frozen
(:class:`IdentityLoss`: ArcFace-family cosine; :class:`PerceptualLoss`: VGG16/AlexNet LPIPS);
:class:`LossSet` sums weighted terms and describes them for a run's fingerprint.
"""

from avatarcli.losses.base import FrozenNetLoss, reduce
from avatarcli.losses.combine import LOSSES, LossSet
from avatarcli.losses.identity import DEFAULT_CROP, IdentityLoss
from avatarcli.losses.perceptual import PerceptualLoss
from avatarcli.losses.pixel import (
    MS_SSIM_WEIGHTS,
    L1Loss,
    L2Loss,
    MSSSIMLoss,
    SSIMLoss,
    l1_loss,
    l2_loss,
    ms_ssim,
    ms_ssim_loss,
    ssim_loss,
)

__all__ = [
    "FrozenNetLoss", "reduce", "LOSSES", "LossSet", "DEFAULT_CROP", "IdentityLoss", "PerceptualLoss",
    "MS_SSIM_WEIGHTS", "L1Loss", "L2Loss", "MSSSIMLoss", "SSIMLoss", "l1_loss", "l2_loss", "ms_ssim",
    "ms_ssim_loss", "ssim_loss",
]
