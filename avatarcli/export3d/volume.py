"""Tri-plane volume rendering (EG3D-style) and the super-resolution head, in plain PyTorch.

Conventions: cameras are generator-world 25-d EG3D cameras ``[B, 25]`` (:func:`avatarcli.camera.eg3d_camera`
layout: row-major cam2world 4x4 with OpenCV camera axes, then normalised intrinsics); the scene lives in the
box ``[-half_extent, half_extent]^3``. ``R = resolution**2`` rays per camera in row-major pixel order,
``S`` samples per ray, ``C`` feature channels. Every function is differentiable, dtype-generic (float64 for
gradcheck) and free of Python loops over rays or samples.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from avatarcli.errors import AvatarError

__all__ = [
    "camera_rays",
    "ray_box_intersect",
    "stratified_depths",
    "importance_depths",
    "sample_triplane",
    "TriplaneDecoder",
    "composite",
    "render_triplane",
    "SuperResolution",
]


def camera_rays(cameras: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through the pixel centres of square images.

    Args:
        cameras: ``[B, 25]`` EG3D cameras (cam2world 4x4, then normalised intrinsics).
        resolution: image side r; pixel (row i, col j) has its centre at ((j+0.5)/r, (i+0.5)/r) in
            normalised image coordinates, so the rays do not depend on r beyond sampling density.

    Returns:
        ``origins [B, R, 3]`` (the camera centre, repeated) and unit ``directions [B, R, 3]``, R = r².
    """
    if cameras.ndim != 2 or cameras.shape[-1] != 25:
        raise AvatarError(f"cameras must be [B, 25] EG3D cameras, got shape {tuple(cameras.shape)}")
    if int(resolution) < 1:
        raise AvatarError(f"resolution must be a positive int, got {resolution}")
    b, r = cameras.shape[0], int(resolution)
    c2w = cameras[:, :16].reshape(b, 4, 4)
    k = cameras[:, 16:].reshape(b, 3, 3)
    centres = (torch.arange(r, dtype=cameras.dtype, device=cameras.device) + 0.5) / r
    v, u = torch.meshgrid(centres, centres, indexing="ij")  # rows, cols
    u, v = u.reshape(1, -1), v.reshape(1, -1)  # [1, R]
    fx, skew, cx = k[:, 0, 0:1], k[:, 0, 1:2], k[:, 0, 2:3]
    fy, cy = k[:, 1, 1:2], k[:, 1, 2:3]
    y_cam = (v - cy) / fy  # [B, R]
    x_cam = (u - cx - skew * y_cam) / fx
    dirs_cam = torch.stack([x_cam, y_cam, torch.ones_like(x_cam)], dim=-1)  # [B, R, 3]
    directions = F.normalize(dirs_cam @ c2w[:, :3, :3].transpose(1, 2), dim=-1)
    origins = c2w[:, None, :3, 3].expand(b, r * r, 3)
    return origins, directions


def ray_box_intersect(
    origins: torch.Tensor, directions: torch.Tensor, half_extent: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab-method intersection of rays with the axis-aligned box ``[-h, h]^3``.

    Args:
        origins, directions: ``[..., 3]`` (directions need not be unit; depths are in their units).
        half_extent: h.

    Returns:
        ``near [..., 1]`` (clamped to >= 0: an origin inside the box starts at 0), ``far [..., 1]`` and
        ``hit [..., 1]`` bool. Missed rays get ``near = far = 0``.
    """
    # A zero direction component would divide by zero; a tiny same-signed value gives +-inf-like
    # slab bounds that min/max then ignore (origin inside the slab) or turn into a miss (outside).
    tiny = torch.finfo(directions.dtype).tiny ** 0.5
    safe = torch.where(directions.abs() < tiny, torch.full_like(directions, tiny), directions)
    t0 = (-half_extent - origins) / safe
    t1 = (half_extent - origins) / safe
    t_enter = torch.minimum(t0, t1).amax(dim=-1, keepdim=True)
    t_exit = torch.maximum(t0, t1).amin(dim=-1, keepdim=True)
    near = t_enter.clamp(min=0.0)
    hit = t_exit > near
    zero = torch.zeros_like(near)
    return torch.where(hit, near, zero), torch.where(hit, t_exit, zero), hit


Jitter = Union[bool, Sequence[int], torch.Tensor]
"""``perturb`` of the sampling functions: False or None (midpoints / stratified levels), True (uniform
jitter from the global generator), or one integer seed per batch item (ints, or an int64 tensor [B]): the jitter of item k is then
a function of its seed alone, so a batch split over DDP processes or accumulated micro-batches draws
the same numbers as the whole batch in one process."""


def _jittered(perturb) -> bool:
    return perturb is not False and perturb is not None


def uniform_jitter(shape: tuple[int, ...], like: torch.Tensor, perturb, stream: int) -> torch.Tensor:
    """U(0, 1) of ``shape`` ``[B, ...]`` (dtype/device of ``like``): from the global generator when
    ``perturb`` is True, else item k from a generator seeded with ``(perturb[k], stream)`` (``stream``
    keeps the coarse and fine draws of one item apart)."""
    if perturb is True:
        return torch.rand(shape, dtype=like.dtype, device=like.device)
    if torch.is_tensor(perturb):
        perturb = perturb.tolist()
    if len(perturb) != shape[0]:
        raise AvatarError(f"{len(perturb)} jitter seeds for a batch of {shape[0]}")
    draws = []
    for seed in perturb:
        generator = torch.Generator(like.device).manual_seed((int(seed) * 1000003 + stream) % (2**63))
        draws.append(torch.rand(shape[1:], generator=generator, dtype=like.dtype, device=like.device))
    return torch.stack(draws)


def stratified_depths(near: torch.Tensor, far: torch.Tensor, samples: int, perturb: Jitter) -> torch.Tensor:
    """One depth per equal bin of ``[near, far]``: the bin midpoint, or uniform in the bin if perturbed.

    Args:
        near, far: ``[B, R, 1]``.
        samples: S >= 1.
        perturb: jitter within bins (training) instead of midpoints (see :data:`Jitter`).

    Returns:
        ``[B, R, S, 1]`` increasing depths.
    """
    if samples < 1:
        raise AvatarError(f"need at least one stratified sample, got {samples}")
    shape = (*near.shape[:-1], samples, 1)
    offset = uniform_jitter(shape, near, perturb, 0) if _jittered(perturb) else 0.5
    bins = torch.arange(samples, dtype=near.dtype, device=near.device).reshape(samples, 1)
    frac = (bins + offset) / samples
    return near[..., None, :] + (far - near)[..., None, :] * frac


def _cell_edges(depths: torch.Tensor, near: torch.Tensor | None, far: torch.Tensor | None) -> torch.Tensor:
    """Interval edges ``[..., S+1]`` around sorted sample depths ``[..., S]``: midpoints between neighbours;
    the outer edges are ``near``/``far`` ``[..., 1]`` when given, else extrapolated by half a gap."""
    mids = 0.5 * (depths[..., 1:] + depths[..., :-1])
    if depths.shape[-1] > 1:
        first = depths[..., :1] - (mids[..., :1] - depths[..., :1])
        last = depths[..., -1:] + (depths[..., -1:] - mids[..., -1:])
    else:
        first = last = depths
    first = first if near is None else torch.minimum(near, depths[..., :1])
    last = last if far is None else torch.maximum(far, depths[..., -1:])
    return torch.cat([first, mids, last], dim=-1)


def importance_depths(
    depths: torch.Tensor,
    weights: torch.Tensor,
    samples: int,
    perturb: Jitter,
    near: torch.Tensor | None = None,
    far: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse-CDF samples from the piecewise-constant pdf given by per-sample weights (NeRF/EG3D).

    Each sample owns the interval between the midpoints to its neighbours (see :func:`composite`); the
    weights are detached and smoothed like EG3D's (max-pool 2, avg-pool 2, + 0.01) so empty rays still
    spread samples over the whole range.

    Args:
        depths: ``[B, R, S, 1]`` sorted coarse depths.
        weights: ``[B, R, S, 1]`` compositing weights of those samples.
        samples: S2 >= 1 new samples.
        perturb: uniform random CDF levels instead of the stratified levels (k + 0.5) / S2
            (see :data:`Jitter`).
        near, far: optional ``[B, R, 1]`` outer interval edges (default: extrapolated).

    Returns:
        ``[B, R, S2, 1]`` sorted depths (no gradient).
    """
    if samples < 1:
        raise AvatarError(f"need at least one importance sample, got {samples}")
    d = depths.detach()[..., 0]
    w = weights.detach()[..., 0]
    lead, s = d.shape[:-1], d.shape[-1]
    flat = w.reshape(-1, 1, s)
    w = F.avg_pool1d(F.max_pool1d(flat, 2, 1, padding=1), 2, 1).reshape(*lead, s) + 0.01
    edges = _cell_edges(d, None if near is None else near.detach(), None if far is None else far.detach())
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), pdf.cumsum(-1)], dim=-1).clamp(max=1.0)  # [..., S+1]
    if _jittered(perturb):
        levels = uniform_jitter((*lead, samples), d, perturb, 1)
    else:
        levels = (torch.arange(samples, dtype=d.dtype, device=d.device) + 0.5) / samples
        levels = levels.expand(*lead, samples)
    levels = levels.contiguous()
    upper = torch.searchsorted(cdf.contiguous(), levels, right=True).clamp(1, s)
    lower = upper - 1
    cdf_lo, cdf_hi = cdf.gather(-1, lower), cdf.gather(-1, upper)
    edge_lo, edge_hi = edges.gather(-1, lower), edges.gather(-1, upper)
    frac = ((levels - cdf_lo) / (cdf_hi - cdf_lo).clamp(min=1e-12)).clamp(0.0, 1.0)
    fine = edge_lo + frac * (edge_hi - edge_lo)
    return fine.sort(dim=-1).values[..., None]


def sample_triplane(planes: torch.Tensor, points: torch.Tensor, half_extent: float = 0.5) -> torch.Tensor:
    """Bilinear tri-plane features, averaged over the xy, xz and zy planes (EG3D order and axes).

    Args:
        planes: ``[B, 3, C, P, P]``; plane k's width axis is the first named coordinate and its height
            axis the second (xy: u = x, v = y); texel centres follow ``align_corners=False`` over the box.
        points: ``[B, N, 3]`` world coordinates.
        half_extent: the box half side; points outside the box get zero features.

    Returns:
        ``[B, N, C]``.
    """
    if planes.ndim != 5 or planes.shape[1] != 3:
        raise AvatarError(f"planes must be [B, 3, C, P, P], got shape {tuple(planes.shape)}")
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != planes.shape[0]:
        raise AvatarError(f"points must be [B, N, 3] with B = {planes.shape[0]}, got {tuple(points.shape)}")
    b, _, c, ph, pw = planes.shape
    n = points.shape[1]
    unit = points / half_extent
    x, y, z = unit.unbind(-1)
    grid = torch.stack(
        [torch.stack([x, y], -1), torch.stack([x, z], -1), torch.stack([z, y], -1)], dim=1
    )  # [B, 3, N, 2]
    sampled = F.grid_sample(
        planes.reshape(b * 3, c, ph, pw),
        grid.reshape(b * 3, n, 1, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [B*3, C, N, 1]
    features = sampled.reshape(b, 3, c, n).mean(dim=1).transpose(1, 2)
    inside = (unit.abs() <= 1.0).all(dim=-1, keepdim=True)
    return features * inside.to(features.dtype)


class TriplaneDecoder(nn.Module):
    """EG3D's light OSG decoder: a softplus MLP trunk with separate colour and density heads.

    ``forward(features [B, N, C_in]) -> (color_features [B, N, out], sigma [B, N, 1])``: colour features
    are ``sigmoid * (1 + 2e-3) - 1e-3`` (EG3D; the first 3 channels are RGB), sigma is raw density
    (:func:`composite` applies ``softplus(sigma - 1)``).
    """

    def __init__(self, in_features: int = 32, hidden: int = 64, out_features: int = 32):
        super().__init__()
        if out_features < 3:
            raise AvatarError(f"decoder needs >= 3 output features (RGB first), got {out_features}")
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.Softplus())
        self.color_head = nn.Linear(hidden, out_features)
        self.density_head = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.trunk(features)
        color = torch.sigmoid(self.color_head(hidden)) * (1 + 2e-3) - 1e-3
        return color, self.density_head(hidden)


def composite(
    colors: torch.Tensor,
    sigmas: torch.Tensor,
    depths: torch.Tensor,
    near: torch.Tensor | None = None,
    far: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Emission-absorption compositing by midpoint quadrature, no background.

    Sample k stands for the interval between the midpoints to its neighbours (the outer edges are
    ``near``/``far`` when given, else half a gap beyond the end samples), with density
    ``softplus(sigma_k - 1)`` (EG3D) and length delta_k; ``w_k = T_k (1 - exp(-density_k delta_k))`` with
    ``T_k = exp(-sum_{j<k} density_j delta_j)``.

    Args:
        colors: ``[B, R, S, C]``; sigmas: ``[B, R, S, 1]`` raw; depths: ``[B, R, S, 1]`` sorted.
        near, far: optional ``[B, R, 1]``.

    Returns:
        ``color [B, R, C]`` (sum w c), ``depth [B, R, 1]`` (sum w d / sum w, clamped to the sample range;
        EG3D's expected depth) and ``weights [B, R, S, 1]`` (their sum is the alpha).
    """
    d = depths[..., 0]
    edges = _cell_edges(d, near, far)
    deltas = (edges[..., 1:] - edges[..., :-1])[..., None]  # [B, R, S, 1]
    optical = F.softplus(sigmas - 1.0) * deltas
    # Exclusive cumulative sum: transmittance before each interval.
    before = torch.cumsum(optical, dim=-2) - optical
    weights = torch.exp(-before) * -torch.expm1(-optical)
    color = (weights * colors).sum(dim=-2)
    alpha = weights.sum(dim=-2)
    depth = (weights * depths).sum(dim=-2) / alpha.clamp(min=1e-10)
    depth = torch.minimum(torch.maximum(depth, depths[..., 0, :]), depths[..., -1, :])
    return color, depth, weights


def render_triplane(
    planes: torch.Tensor,
    decoder: nn.Module,
    cameras: torch.Tensor,
    resolution: int,
    coarse: int = 48,
    fine: int = 48,
    half_extent: float = 0.5,
    perturb: Jitter = False,
) -> dict[str, torch.Tensor]:
    """Volume-render tri-planes from cameras with EG3D's two passes (stratified, then importance).

    Coarse samples are stratified between each ray's box entry and exit; ``fine`` more are drawn from the
    coarse weights (detached), merged, sorted and composited with the coarse ones. Rays missing the box
    are background: zero features and alpha, depth ``|origin| + sqrt(3) * half_extent`` (the far side of
    the box's bounding sphere).

    Args:
        planes: ``[B, 3, C, P, P]``; decoder: ``features [B, N, C] -> (colors [B, N, C'], sigma [B, N, 1])``
            (:class:`TriplaneDecoder`); cameras: ``[B, 25]``; resolution: r.
        coarse: S >= 2 stratified samples; fine: importance samples (0 = coarse pass only).
        perturb: sample jitter (:data:`Jitter`).

    Returns:
        dict ``features [B, C', r, r]``, ``rgb [B, 3, r, r]`` (= features[:, :3]), ``depth [B, 1, r, r]``,
        ``alpha [B, 1, r, r]``.
    """
    if coarse < 2 or fine < 0:
        raise AvatarError(f"need coarse >= 2 and fine >= 0 samples, got coarse={coarse} fine={fine}")
    if cameras.ndim != 2 or planes.ndim != 5 or cameras.shape[0] != planes.shape[0]:
        raise AvatarError(
            f"planes [B, 3, C, P, P] and cameras [B, 25] must share B, got {tuple(planes.shape)} and "
            f"{tuple(cameras.shape)}"
        )
    b, r = planes.shape[0], int(resolution)
    origins, directions = camera_rays(cameras.to(planes.dtype), r)
    near, far, hit = ray_box_intersect(origins, directions, half_extent)

    def decode(depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = depths.shape[2]
        points = origins[:, :, None, :] + directions[:, :, None, :] * depths  # [B, R, S, 3]
        colors, sigmas = decoder(sample_triplane(planes, points.reshape(b, -1, 3), half_extent))
        return colors.reshape(b, r * r, s, -1), sigmas.reshape(b, r * r, s, 1)

    depths = stratified_depths(near, far, coarse, perturb)
    colors, sigmas = decode(depths)
    if fine > 0:
        _, _, weights = composite(colors, sigmas, depths, near, far)
        fine_depths = importance_depths(depths, weights, fine, perturb, near, far)
        fine_colors, fine_sigmas = decode(fine_depths)
        depths, order = torch.cat([depths, fine_depths], dim=2).sort(dim=2)
        colors = torch.cat([colors, fine_colors], dim=2).gather(2, order.expand(-1, -1, -1, colors.shape[-1]))
        sigmas = torch.cat([sigmas, fine_sigmas], dim=2).gather(2, order)
    color, depth, weights = composite(colors, sigmas, depths, near, far)

    mask = hit.to(planes.dtype)  # [B, R, 1]
    background = origins.norm(dim=-1, keepdim=True) + math.sqrt(3.0) * half_extent
    features = color * mask
    depth = torch.where(hit, depth, background)
    alpha = weights.sum(dim=2) * mask

    def image(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(b, x.shape[-1], r, r)

    features = image(features)
    return {"features": features, "rgb": features[:, :3], "depth": image(depth), "alpha": image(alpha)}


class _UpBlock(nn.Module):
    """Optional bilinear x2 upsampling, two conv3x3-LeakyReLU(0.2), and a 1x1 toRGB added to the rgb skip."""

    def __init__(self, in_channels: int, width: int, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.LeakyReLU(0.2),
        )
        self.to_rgb = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.convs(x)
        return x, rgb + self.to_rgb(x)


class SuperResolution(nn.Module):
    """EG3D's hybrid super-resolution without style modulation: one x2 block per octave.

    ``forward(rgb [B, 3, r, r], features [B, C, r, r]) -> image [B, 3, R, R]`` with r = in_resolution and
    R = out_resolution (a power-of-two multiple of r; equal sizes give one refinement block at r). The
    output is the upsampled raw rgb plus each block's toRGB residual, not clamped.
    """

    def __init__(self, channels: int = 32, in_resolution: int = 64, out_resolution: int = 256, width: int = 128):
        super().__init__()
        ratio = out_resolution // in_resolution if in_resolution > 0 else 0
        if ratio < 1 or ratio * in_resolution != out_resolution or ratio & (ratio - 1):
            raise AvatarError(
                f"super-resolution needs out_resolution = in_resolution * 2^k, got {in_resolution} -> "
                f"{out_resolution}"
            )
        self.channels, self.in_resolution, self.out_resolution = channels, in_resolution, out_resolution
        octaves = ratio.bit_length() - 1
        self.blocks = nn.ModuleList(
            _UpBlock(channels if k == 0 else width, width, upsample=octaves > 0) for k in range(max(octaves, 1))
        )

    def forward(self, rgb: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        r = self.in_resolution
        if rgb.shape[1:] != (3, r, r) or features.shape[1:] != (self.channels, r, r):
            raise AvatarError(
                f"super-resolution expects rgb [B, 3, {r}, {r}] and features [B, {self.channels}, {r}, {r}], "
                f"got {tuple(rgb.shape)} and {tuple(features.shape)}"
            )
        x = features
        for block in self.blocks:
            x, rgb = block(x, rgb)
        return rgb
