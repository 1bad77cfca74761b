"""Pixel and structure losses: L1, L2, 1 - SSIM and 1 - MS-SSIM, as functions and modules.

Images are [B,C,H,W] in [0,1], any float dtype and device; gradients flow to both inputs.
SSIM is the project's metric (:mod:`avatarcli.metrics.image`: Gaussian σ = 1.5 window of 11 taps,
'valid' filtering, K1 = 0.01, K2 = 0.03), so ``1 - ssim_loss`` equals what ``avatar eval`` reports.

MS-SSIM (Wang, Simoncelli, Bovik 2003): at scales 1..M-1 the mean contrast-structure term cs, at
the coarsest scale M the mean SSIM (l·cs), combined as ``Π cs_j^w_j · ssim_M^w_M`` with the
standard weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); between scales a 2×2 average pool
(odd sizes drop their last row or column). As in the common implementations (pytorch-msssim) the
per-channel means are clipped at 0 (relu; here at a tiny positive value, so the fractional powers
keep finite gradients) and the product is averaged over channels. Five scales need a smaller side of
at least 11·2⁴ = 176 pixels; smaller images use as many scales as fit (a side ≥ 11 at the
coarsest), with the weights of those scales renormalised to sum to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avatarcli.errors import AvatarError
from avatarcli.losses.base import as_nhwc, check_images, reduce
from avatarcli.metrics.image import SSIM_K1, SSIM_K2, gaussian_window, ssim, ssim_stats

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_POSITIVE = 1e-8
"""Floor of the MS-SSIM terms before their fractional powers (relu with a finite gradient)."""


def _mask_nchw(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B,H,W], [B,1,H,W] or [B,C,H,W] mask (bool or float weights) -> like's dtype, broadcast to [B,C,H,W]."""
    m = mask.to(device=like.device, dtype=like.dtype)
    if m.dim() == 3:
        m = m[:, None]
    try:
        return m.expand_as(like)
    except RuntimeError:
        raise AvatarError(f"mask {tuple(mask.shape)} does not fit images {tuple(like.shape)}") from None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B,C,H,W] -> [B] mean over all elements, or over the mask's weight (an empty mask gives 0)."""
    if mask is None:
        return values.flatten(1).mean(1)
    m = _mask_nchw(mask, values)
    return (values * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-12)


def l1_loss(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """Mean absolute difference per image.

    Args:
        generated, target: [B,C,H,W] float images.
        mask: optional [B,H,W], [B,1,H,W] or [B,C,H,W] (bool, or float weights): the mean runs over
            the masked pixels (weighted); an empty mask gives 0.
        reduction: ``mean`` | ``sum`` over the batch, or ``none`` for the [B] values.
    """
    check_images(generated, target)
    return reduce(_masked_mean((generated - target).abs(), mask), reduction)


def l2_loss(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """Mean squared difference per image (the MSE; arguments as :func:`l1_loss`)."""
    check_images(generated, target)
    return reduce(_masked_mean((generated - target).pow(2), mask), reduction)


def _min_side(images: torch.Tensor) -> int:
    return min(images.shape[2], images.shape[3])


def _no_autocast(images: torch.Tensor):
    """SSIM's statistics (E[x²] − E[x]² over a window) cancel catastrophically in bf16: under a bf16
    autocast the window convolutions would run in bf16 and give negative variances, ±inf ratios and
    NaN gradients (a bf16 train-recon run with an SSIM term skipped 365 of 4105 steps and collapsed).
    They run in the inputs' own precision instead."""
    return torch.autocast(images.device.type, enabled=False)


def ssim_loss(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
              reduction: str = "mean") -> torch.Tensor:
    """1 - SSIM per image, SSIM as :func:`avatarcli.metrics.image.ssim` with data range 1.

    Args:
        generated, target: [B,C,H,W] float images in [0,1], H, W ≥ 11.
        mask: optional [B,H,W] or [B,1,H,W]: SSIM averaged over the masked pixels of the window interior.
    Returns:
        scalar, or [B] with ``reduction="none"``; in the images' dtype.
    """
    check_images(generated, target)
    window = gaussian_window().numel()
    if _min_side(generated) < window:
        raise AvatarError(f"SSIM needs images of at least {window}×{window} pixels, got {tuple(generated.shape[2:])}")
    if mask is not None and mask.dim() == 4:
        mask = mask[:, 0]
    with _no_autocast(generated):
        values = ssim(as_nhwc(generated), as_nhwc(target), mask, data_range=1.0, dtype=generated.dtype)
    return reduce(1 - values.to(generated.dtype), reduction)


def ms_ssim_scales(height: int, width: int, scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many MS-SSIM scales fit: the coarsest must keep a side of at least the window (11)."""
    window = gaussian_window().numel()
    fit = 0
    side = min(height, width)
    while fit < scales and side >= window:
        fit += 1
        side //= 2
    if fit == 0:
        raise AvatarError(f"MS-SSIM needs images of at least {window}×{window} pixels, got {height}×{width}")
    return fit


def ms_ssim(generated: torch.Tensor, target: torch.Tensor, weights: tuple[float, ...] = MS_SSIM_WEIGHTS) -> torch.Tensor:
    """MS-SSIM per image (see the module docstring).

    Args:
        generated, target: [B,C,H,W] float images in [0,1].
        weights: per-scale exponents, finest first; fewer are used when the images are small.
    Returns:
        [B] MS-SSIM in the images' dtype.
    """
    check_images(generated, target)
    with _no_autocast(generated):
        return _ms_ssim(generated, target, weights)


def _ms_ssim(generated: torch.Tensor, target: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    count = ms_ssim_scales(generated.shape[2], generated.shape[3], len(weights))
    w = torch.tensor(weights[:count], dtype=generated.dtype, device=generated.device)
    w = w / w.sum()
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    a, b = generated, target
    result = None
    for scale in range(count):
        if scale:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        mu_a, mu_b, var_a, var_b, cov = ssim_stats(as_nhwc(a), as_nhwc(b), data_range=1.0, dtype=a.dtype)
        term = (2 * cov + c2) / (var_a + var_b + c2)  # contrast-structure
        if scale == count - 1:
            term = term * (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)  # full SSIM at the coarsest
        factor = term.mean((2, 3)).clamp_min(_POSITIVE) ** w[scale]  # [B,C]
        result = factor if result is None else result * factor
    return result.mean(1)


def ms_ssim_loss(generated: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """1 - MS-SSIM per image ([B,C,H,W] float images in [0,1]); scalar, or [B] with ``none``."""
    return reduce(1 - ms_ssim(generated, target), reduction)


class _ReducedLoss(nn.Module):
    def __init__(self, reduction: str = "mean"):
        super().__init__()
        reduce(torch.zeros(1), reduction)  # an unknown reduction fails here, not at the first step
        self.reduction = reduction


class L1Loss(_ReducedLoss):
    """Module form of :func:`l1_loss`: ``forward(generated, target, mask=None)``."""

    def forward(self, generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return l1_loss(generated, target, mask, self.reduction)


class L2Loss(_ReducedLoss):
    """Module form of :func:`l2_loss`: ``forward(generated, target, mask=None)``."""

    def forward(self, generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return l2_loss(generated, target, mask, self.reduction)


class SSIMLoss(_ReducedLoss):
    """Module form of :func:`ssim_loss`: ``forward(generated, target, mask=None)``."""

    def forward(self, generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return ssim_loss(generated, target, mask, self.reduction)


class MSSSIMLoss(_ReducedLoss):
    """Module form of :func:`ms_ssim_loss`: ``forward(generated, target)``."""

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ms_ssim_loss(generated, target, self.reduction)
