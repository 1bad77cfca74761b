"""Sparse, per-sample rendering on a raster: a fixed number of covered pixels per image, their
barycentrics and interpolated attributes (differentiable; the dense twins are in
:mod:`avatarcli.render.rasterize`, whose conventions hold here too).

A loss over :func:`sample_visible_pixels` estimates the loss over every covered pixel without bias,
at a cost that does not grow with the image size (fit-3dmm's photometric stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from avatarcli.render.rasterize import RasterOutput, _check_inputs

__all__ = [
    "PixelSamples",
    "sample_visible_pixels",
    "interpolate_at",
    "barycentrics_at",
    "barycentrics_from_corners",
    "gather_corners",
]


@dataclass
class PixelSamples:
    """A fixed number of covered pixels per image of a raster (see :func:`sample_visible_pixels`).

    Attributes:
        within: [B,K] int64 pixel index ``row * W + column`` in its image.
        face: [B,K] int64 visible triangle there (0 where not ``valid``).
        valid: [B,K] bool, False for padding samples of images with fewer than K covered pixels.
        height, width: the raster's size.
    """

    within: Tensor
    face: Tensor
    valid: Tensor
    height: int
    width: int


def sample_visible_pixels(raster: RasterOutput, count: int, generator: torch.Generator | None = None) -> PixelSamples:
    """``count`` distinct covered pixels per image, uniformly at random, as fixed-shape tensors.

    A loss averaged over them estimates the loss averaged over all covered pixels without bias, at a
    cost that no longer grows with the image size; shapes do not depend on the coverage, so there is
    no host synchronisation (images with fewer covered pixels get ``valid == False`` padding).

    Args:
        raster: output of :func:`rasterize`, [B,H,W].
        count: K, samples per image (at most H*W).
        generator: random generator on the raster's device (for reproducible samples).

    Returns:
        :class:`PixelSamples` with [B,K] tensors.
    """
    batch, height, width = raster.face_index.shape
    if not 1 <= count <= height * width:
        raise ValueError(f"count must be in [1, {height * width}], got {count}")
    covered = raster.mask.reshape(batch, -1)
    noise = torch.rand(covered.shape, generator=generator, device=covered.device)
    # covered pixels score in [1, 2), the rest in [0, 1): the top K are K random covered pixels
    within = (noise + covered).topk(count, dim=1, sorted=False).indices
    valid = covered.gather(1, within)
    face = raster.face_index.reshape(batch, -1).gather(1, within).clamp(min=0)
    return PixelSamples(within=within, face=face, valid=valid, height=height, width=width)


def barycentrics_at(samples: PixelSamples, faces: Tensor, clip_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Perspective-correct barycentrics of each sample's triangle at its pixel centre, recomputed
    from ``clip_pos`` (differentiable; same formulas as :func:`barycentrics_from_clip`).

    Args:
        samples: :class:`PixelSamples` [B,K] of a raster made with ``faces``.
        faces: [F,3] int64.
        clip_pos: [B,V,4] float clip-space positions.

    Returns:
        ``bary`` [B,K,3] (finite also for padding samples) and ``vertex`` [B,K,3] int64, the
        triangle's vertex indices.
    """
    _check_inputs(clip_pos, faces)
    vertex = faces.to(device=clip_pos.device, dtype=torch.int64)[samples.face]  # [B,K,3]
    return barycentrics_from_corners(gather_corners(clip_pos, vertex), samples), vertex


def barycentrics_from_corners(corner_clip: Tensor, samples: PixelSamples) -> Tensor:
    """:func:`barycentrics_at` from the clip positions of each sample's corners [B,K,3,4] (for
    callers that transform only the corners); returns [B,K,3]."""
    w = corner_clip[..., 3]
    safe_w = torch.where(w != 0, w, torch.ones_like(w))
    px = (corner_clip[..., 0] / safe_w + 1) * (samples.width / 2) - 0.5
    py = (corner_clip[..., 1] / safe_w + 1) * (samples.height / 2) - 0.5
    dx1, dy1 = px[..., 1] - px[..., 0], py[..., 1] - py[..., 0]
    dx2, dy2 = px[..., 2] - px[..., 0], py[..., 2] - py[..., 0]
    area2 = dx1 * dy2 - dx2 * dy1
    area2 = torch.where(area2 != 0, area2, torch.ones_like(area2))
    rel_x = (samples.within % samples.width).to(px.dtype) - px[..., 0]
    rel_y = (samples.within // samples.width).to(px.dtype) - py[..., 0]
    screen1 = (dy2 * rel_x - dx2 * rel_y) / area2
    screen2 = (dx1 * rel_y - dy1 * rel_x) / area2
    screen0 = 1 - screen1 - screen2
    # screen-linear weights divided by w and renormalised = clip-space-linear (perspective-correct)
    persp = torch.stack([screen0, screen1, screen2], -1) / safe_w
    denom = persp.sum(-1, keepdim=True)
    return persp / torch.where(denom != 0, denom, torch.ones_like(denom))


def gather_corners(attr: Tensor, vertex: Tensor) -> Tensor:
    """Per-vertex attributes [B,V,C] at triangle corners ``vertex`` [B,K,3] -> [B,K,3,C]."""
    batch, channels = attr.shape[0], attr.shape[-1]
    index = vertex.reshape(batch, -1, 1).expand(-1, -1, channels)
    return attr.gather(1, index).reshape(*vertex.shape, channels)


def interpolate_at(attr: Tensor, samples: PixelSamples, faces: Tensor, clip_pos: Tensor) -> Tensor:
    """Perspective-correct interpolation of per-vertex attributes at sampled pixels.

    The sparse counterpart of :func:`interpolate` with ``clip_pos`` (:func:`barycentrics_at`), so the
    result is differentiable with respect to ``attr`` and the vertex positions; the cost is per sample.

    Args:
        attr: [B,V,C] float per-vertex attributes.
        samples: :class:`PixelSamples` of a raster of the same batch, made with ``faces``.
        faces: [F,3] int64.
        clip_pos: [B,V,4] float clip-space positions.

    Returns:
        [B,K,C]; equals ``interpolate(attr, raster, faces, clip_pos)`` at the sampled pixels (where
        ``samples.valid``; padding samples hold finite values to be masked out).
    """
    bary, vertex = barycentrics_at(samples, faces, clip_pos)
    return (bary[..., None] * gather_corners(attr, vertex)).sum(-2)
