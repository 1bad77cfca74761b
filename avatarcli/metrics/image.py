"""PSNR and SSIM on batches of images, optionally restricted to a region mask.

Definitions are the common ones, and match scikit-image's to 1e-4 (tested):

* PSNR: ``10 log10(R² / MSE)`` with the MSE over every pixel and channel (or over the masked
  pixels), ``R`` the data range (255 for uint8). Identical images give ``inf``.
* SSIM (Wang et al. 2004): Gaussian window σ = 1.5 truncated at 3.5σ (11×11), ``K1 = 0.01``,
  ``K2 = 0.03``, population (not sample) covariances, computed per channel; the mean is over the
  pixels whose window lies inside the image (a 5-pixel border is dropped), then over channels.
  This is ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1)``. With a mask, the mean runs over
  the masked pixels of that same interior.
"""

from __future__ import annotations

import torch

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_float_nchw(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B,H,W,C] (uint8 or float) -> [B,C,H,W] of ``dtype``."""
    return images.permute(0, 3, 1, 2).to(dtype)


def psnr(generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None,
         data_range: float = 255.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image.

    Args:
        generated, reference: [B,H,W,C] images on the same device (uint8, or floats in ``data_range``).
        mask: optional [B,H,W] bool; the MSE is taken over the masked pixels (all channels).
        data_range: the value range of the images.

    Returns:
        [B] float64 PSNR in dB (``inf`` where the images agree; ``nan`` where the mask is empty).
    """
    diff = generated.to(torch.float64) - reference.to(torch.float64)
    squared = diff.pow(2).sum(-1)  # [B,H,W]
    channels = generated.shape[-1]
    if mask is None:
        mse = squared.flatten(1).mean(1) / channels
    else:
        m = mask.to(torch.float64)
        mse = (squared * m).flatten(1).sum(1) / (m.flatten(1).sum(1) * channels)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE, dtype=torch.float64,
                    device=None) -> torch.Tensor:
    """[K] normalised 1-D Gaussian with scipy's truncation (radius ``int(truncate·σ + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _band(size: int, window: torch.Tensor) -> torch.Tensor:
    """[size - k + 1, size] matrix whose rows are the window shifted by one: a 'valid' 1-D filter."""
    k = window.numel()
    rows = size - k + 1
    band = torch.zeros(rows, size, dtype=window.dtype, device=window.device)
    index = torch.arange(rows, device=window.device)[:, None] + torch.arange(k, device=window.device)[None]
    band.scatter_(1, index, window.expand(rows, k).contiguous())
    return band


def _blur_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of [B,C,H,W] (no padding: the border SSIM drops anyway).

    Two matmuls with banded matrices: GEMMs are several times faster than depthwise convolutions
    with 11-tap kernels, on the CPU and the GPU alike.
    """
    rows = _band(x.shape[2], window)  # [H-k+1, H]
    cols = _band(x.shape[3], window).T  # [W, W-k+1]
    return rows @ (x @ cols)


def ssim_stats(generated: torch.Tensor, reference: torch.Tensor, data_range: float = 255.0,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Gaussian-window statistics of SSIM (the parts MS-SSIM also needs), images scaled to [0,1].

    Returns:
        (mu_a, mu_b, var_a, var_b, cov), each [B,C,H-2r,W-2r]; see :func:`ssim_map` for the arguments.
    """
    dtype = dtype or torch.float32
    window = gaussian_window(dtype=dtype, device=generated.device)
    if min(generated.shape[1:3]) < window.numel():
        raise ValueError(f"SSIM needs images of at least {window.numel()}×{window.numel()} pixels")
    # Scale to [0,1] and centre: E[x²] - E[x]² then cancels far less in float32.
    a = _as_float_nchw(generated, dtype) / data_range - 0.5
    b = _as_float_nchw(reference, dtype) / data_range - 0.5
    stacked = torch.cat([a, b, a * a, b * b, a * b], 1)
    blurred = _blur_valid(stacked, window)
    mu_a, mu_b, aa, bb, ab = blurred.chunk(5, 1)
    var_a = aa - mu_a * mu_a
    var_b = bb - mu_b * mu_b
    cov = ab - mu_a * mu_b
    return mu_a + 0.5, mu_b + 0.5, var_a, var_b, cov  # back to the [0,1] means for the luminance term


def ssim_map(generated: torch.Tensor, reference: torch.Tensor, data_range: float = 255.0,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-pixel, per-channel SSIM over the window-interior of the images.

    Args:
        generated, reference: [B,H,W,C] images (uint8, or floats in ``data_range``), H, W ≥ 11.
        dtype: compute dtype, float32 by default: the statistics are taken about a fixed offset of
            half the range, which keeps float32 within 1e-5 of float64 (tested against
            scikit-image); float64 is ~3x slower on the CPU.

    Returns:
        [B,C,H-2r,W-2r] SSIM values, r = 5 the window radius.
    """
    mu_a, mu_b, var_a, var_b, cov = ssim_stats(generated, reference, data_range, dtype)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def ssim(generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None,
         data_range: float = 255.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean SSIM per image (see the module docstring for the definition).

    Args:
        generated, reference: [B,H,W,C] images.
        mask: optional [B,H,W] bool; the mean runs over masked pixels of the window interior.

    Returns:
        [B] float64 (``nan`` where the mask leaves no interior pixel).
    """
    values = ssim_map(generated, reference, data_range, dtype).to(torch.float64)  # [B,C,h,w]
    if mask is None:
        return values.mean((1, 2, 3))
    radius = (generated.shape[1] - values.shape[2]) // 2
    inner = mask[:, radius: mask.shape[1] - radius, radius: mask.shape[2] - radius].to(torch.float64)
    return (values * inner[:, None]).sum((1, 2, 3)) / (inner.sum((1, 2)) * values.shape[1])

