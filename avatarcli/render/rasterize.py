"""Batched triangle rasterization in plain PyTorch (CPU or CUDA, float32 or float64).

The split follows nvdiffrast: :func:`rasterize` finds, for every pixel, the nearest triangle and its
barycentrics (not differentiable); :func:`interpolate` turns per-vertex attributes into images and
is differentiable with respect to the attributes and, when given ``clip_pos``, the vertex positions.

Conventions
-----------
They are those of ``clip_from_camera`` in :mod:`avatarcli.camera`, which builds ``clip_pos`` from
OpenCV camera-space points and pixel intrinsics.

* Clip space is OpenGL's: a vertex is ``(x, y, z, w)`` and its normalised device coordinates (NDC)
  are ``(x, y, z) / w``. The visible volume is ``-1 <= x/w, y/w, z/w <= 1``.
* NDC x = -1 is the LEFT edge of the image and NDC y = -1 its TOP edge (image row 0): y points
  DOWN, as in image coordinates (this differs from OpenGL, whose y points up).
* Pixel (row i, column j) has its centre at NDC ``x = 2 (j + 0.5) / W - 1``,
  ``y = 2 (i + 0.5) / H - 1`` (continuous pixel position ``(j + 0.5, i + 0.5)``). A pixel is covered
  by a triangle when its centre is inside it. Internally (and in the formulas below) pixel
  coordinates are shifted by half a pixel, ``px = (x/w + 1) W / 2 - 0.5``,
  ``py = (y/w + 1) H / 2 - 0.5``, so that pixel centres are the integers ``(px, py) = (j, i)``.
* Depth is NDC ``z/w``; smaller is nearer; the nearest covered fragment wins (z-buffer). Fragments
  with ``z/w`` outside ``[-1, 1]`` are discarded (the near and far planes clip per pixel).
* Triangles with a vertex at ``w <= 0`` (at or behind the camera plane) or with a non-finite
  coordinate are dropped whole: there is no near-plane clipping that would split them. Keep meshes
  in front of the camera. Triangles with zero screen-space area are dropped as well.
* Winding: a triangle is FRONT-facing when its vertices ``(v0, v1, v2)`` run COUNTER-CLOCKWISE on
  screen, i.e. as the image is displayed with row 0 at the top. In pixel coordinates (y down) that
  is a negative signed area ``(px1-px0)(py2-py0) - (px2-px0)(py1-py0) < 0``. A mesh whose faces are
  counter-clockwise seen from outside (the usual OpenGL/OBJ convention, right-handed) is then
  front-facing under a pinhole projection with an OpenCV camera (x right, y down, z forward), or any
  upright projection that maps the world's up to the top of the image.
* Fill rule: a pixel centre exactly on an edge or a vertex belongs to the triangle that would contain
  it after an infinitesimal nudge down and (infinitely less) right. Edge functions of a shared edge
  are computed from the same canonical endpoint in both triangles, so they are exact negations of
  each other: meshes without T-junctions cover each pixel exactly once, with no gaps along edges.

Algorithm: every (batch element, triangle) pair gets its pixel bounding box; pairs are grouped by
box side (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, ...) into buckets; each bucket enumerates candidate pixels as
a dense ``[n, k, k]`` grid, in chunks of at most ``max_candidates``. Row and column terms of the edge
functions and of the depth plane are computed once per row / column, so the per-candidate work is a
few comparisons and one addition. Inside fragments become an int64 key
``quantised depth << face_bits | face`` and a ``scatter_reduce(amin)`` per chunk resolves visibility:
equal quantised depths go to the smaller face index, so results do not depend on the order of the
atomic operations and are deterministic on every device. Barycentrics and depth are recomputed for
the covered pixels only. Cost grows with the bucketed box areas: many large or long, thin triangles
are the expensive case. ``rasterize`` waits for the device twice (bucket sizes, covered pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

__all__ = [
    "RasterOutput",
    "rasterize",
    "interpolate",
    "barycentrics_from_clip",
    "DEFAULT_MAX_CANDIDATES",
]

DEFAULT_MAX_CANDIDATES = 1 << 23
_EMPTY_KEY = torch.iinfo(torch.int64).max

# Box sides of the candidate grids: ratio <= 1.5 keeps the wasted candidates of a bucket small.
_BASE_SIDES = (1, 2, 3, 4, 6, 8, 12, 16)  # then doubling: few triangles are larger
# Fixed cost of one candidate chunk (about 25 kernel launches) in units of one candidate's work.
_CHUNK_OVERHEAD_CPU = 2.0**12
_CHUNK_OVERHEAD_CUDA = 2.0**21

# Rows of the per-(batch, triangle) float table [22, B*F] read by the bucket loop.
_X0, _Y0, _BW, _BH = 0, 1, 2, 3
_EX, _EY, _AX, _AY, _TIE = 4, 7, 10, 13, 16  # three rows each (one per edge): slices [3,n]
_ZC, _ZGX, _ZGY = 19, 20, 21  # depth plane in quantisation units at the box origin
_N_ROWS = 22


@dataclass
class RasterOutput:
    """What :func:`rasterize` returns. All tensors are on the device of ``clip_pos``.

    Attributes:
        face_index: [B,H,W] int64, index into ``faces`` of the visible triangle, -1 on background.
        bary: [B,H,W,3] ``clip_pos.dtype``, perspective-correct barycentrics of the visible triangle
            (weights of ``faces[face_index, 0..2]``, they sum to 1); 0 on background; detached.
        depth: [B,H,W] ``clip_pos.dtype``, NDC depth ``z/w`` of the visible surface in [-1, 1];
            ``+inf`` on background (mask before arithmetic: ``inf * 0`` is NaN).
        mask: [B,H,W] bool, True where a triangle is visible.
    """

    face_index: Tensor
    bary: Tensor
    depth: Tensor
    mask: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, H, W)."""
        return tuple(self.face_index.shape)  # type: ignore[return-value]


def _check_inputs(clip_pos: Tensor, faces: Tensor) -> None:
    if clip_pos.dim() != 3 or clip_pos.shape[-1] != 4:
        raise ValueError(f"clip_pos must be [B,V,4], got {tuple(clip_pos.shape)}")
    if not clip_pos.is_floating_point():
        raise TypeError(f"clip_pos must be floating point, got {clip_pos.dtype}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be [F,3], got {tuple(faces.shape)}")
    if faces.dtype.is_floating_point or faces.dtype == torch.bool:
        raise TypeError(f"faces must be an integer tensor, got {faces.dtype}")


def _box_sides(longest: int) -> list[int]:
    sides = list(_BASE_SIDES)
    while sides[-1] < longest:
        sides.append(sides[-1] * 2)
    return sides


def _merge_buckets(
    counts: list[int], sides: list[int], height: int, width: int, overhead: float
) -> list[tuple[int, int, int, bool]]:
    """Group consecutive buckets (``counts`` per side, then per side again for depth-clipped
    triangles) to minimise sum(overhead + triangles * grid area); a group uses the grid of its
    largest side. Returns (start in the sorted order, count, grid side, depth_clip) per group."""
    n_sides = len(sides)
    groups = []
    offset = 0
    for depth_clip in (False, True):
        section = counts[n_sides * depth_clip : n_sides * (depth_clip + 1)]
        nonempty = [(offset + sum(section[:i]), c, sides[i]) for i, c in enumerate(section) if c]
        offset += sum(section)
        best = [0.0] + [math.inf] * len(nonempty)
        cut = [0] * (len(nonempty) + 1)
        for j in range(1, len(nonempty) + 1):
            area = min(nonempty[j - 1][2], height) * min(nonempty[j - 1][2], width)
            total = 0
            for i in range(j, 0, -1):
                total += nonempty[i - 1][1]
                cost = best[i - 1] + overhead + total * area
                if cost < best[j]:
                    best[j], cut[j] = cost, i - 1
        j = len(nonempty)
        while j > 0:
            i = cut[j]
            start = nonempty[i][0]
            groups.append((start, sum(c for _, c, _ in nonempty[i:j]), nonempty[j - 1][2], depth_clip))
            j = i
    return groups


def _project(clip_pos: Tensor, faces: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-corner pixel x, pixel y, NDC z and w, each [3,B,F] (corner-major: contiguous rows)."""
    w = clip_pos[..., 3:]
    # Dropped (w == 0) vertices must not make NaN/inf that would poison gradients of visible ones.
    safe_w = torch.where(w != 0, w, 1.0)
    scale = torch.tensor([width / 2, height / 2, 1.0], dtype=clip_pos.dtype).to(clip_pos.device)
    shift = torch.tensor([width / 2 - 0.5, height / 2 - 0.5, 0.0], dtype=clip_pos.dtype).to(clip_pos.device)
    projected = torch.cat([torch.addcmul(shift, clip_pos[..., :3] / safe_w, scale), w], -1)  # [B,V,4]
    corners = projected[:, faces.t()].permute(3, 1, 0, 2).contiguous()  # [4,3,B,F]
    return corners.unbind(0)  # type: ignore[return-value]


def _triangle_table(
    clip_pos: Tensor, faces: Tensor, height: int, width: int, cull_backfaces: bool, depth_scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per (batch, triangle) setup for coverage and depth.

    Returns (params [22,B*F] float, base_pixel [B*F] int64, valid [B*F] bool, needs_depth_clip [B*F]
    bool, box_side [B*F] float). ``params`` rows are indexed by the ``_X0``... constants; depth is in
    units of ``1 / depth_scale`` above NDC z = -1; ``base_pixel`` indexes the box origin in B*H*W."""
    tx, ty, tz, tw = _project(clip_pos, faces, height, width)
    x0, y0 = tx[0], ty[0]
    dx1, dy1 = tx[1] - x0, ty[1] - y0
    dx2, dy2 = tx[2] - x0, ty[2] - y0
    area2 = dx1 * dy2 - dx2 * dy1  # < 0: counter-clockwise on screen (front); not finite if any x, y is not
    valid = torch.isfinite(area2) & (area2 != 0) & (tw > 0).all(0)
    if cull_backfaces:
        valid &= area2 < 0

    zmin, zmax = tz.amin(0), tz.amax(0)
    valid &= (zmax >= -1) & (zmin <= 1)  # also False for NaN depth
    needs_depth_clip = (zmin < -1) | (zmax > 1)

    # Integer box of the pixel centres the triangle can contain, clipped to the image.
    bx0 = tx.amin(0).clamp(-1, width).ceil_().clamp_min_(0)
    bx1 = tx.amax(0).clamp(-1, width).floor_().clamp_max_(width - 1)
    by0 = ty.amin(0).clamp(-1, height).ceil_().clamp_min_(0)
    by1 = ty.amax(0).clamp(-1, height).floor_().clamp_max_(height - 1)
    box_w, box_h = bx1 - bx0 + 1, by1 - by0 + 1
    valid &= (box_w > 0) & (box_h > 0)

    # Edges (v0,v1), (v1,v2), (v2,v0), each evaluated from its lexicographically smaller endpoint so
    # that the two triangles sharing it get bit-exact negated edge functions (watertightness), even
    # when the mesh duplicates vertices along seams.
    end_x, end_y = tx.roll(-1, 0), ty.roll(-1, 0)
    swap = (tx > end_x) | ((tx == end_x) & (ty > end_y))
    ax, ay = torch.where(swap, end_x, tx), torch.where(swap, end_y, ty)
    # Orient so that the interior is where E(p) = edge_x (py - ay) - edge_y (px - ax) > 0: flip when
    # exactly one of "swapped" and "clockwise in pixel coordinates" (area2 < 0) holds.
    flip = swap ^ (area2 < 0)[None]
    edge_x = torch.where(swap, tx, end_x) - ax
    edge_y = torch.where(swap, ty, end_y) - ay
    edge_x = torch.where(flip, -edge_x, edge_x)
    edge_y = torch.where(flip, -edge_y, edge_y)
    # Ties E == 0 go to the triangle E grows into when p moves by (delta, 1), delta -> 0+. Ties are
    # lost on the other edges: there the loop tests E > 0 as row >= nextafter(col, col + inf).
    owns_zero = (edge_x > 0) | ((edge_x == 0) & (edge_y < 0))
    tie = torch.where(owns_zero, 0.0, math.inf).to(tx.dtype)

    # Depth plane z = z0 + zgx (x - x0) + zgy (y - y0), re-anchored at the box origin and quantised.
    dz1, dz2 = tz[1] - tz[0], tz[2] - tz[0]
    safe_area2 = torch.where(area2 != 0, area2, torch.ones((), dtype=area2.dtype, device=area2.device))
    zgx = (dz1 * dy2 - dz2 * dy1) * (depth_scale / safe_area2)
    zgy = (dz2 * dx1 - dz1 * dx2) * (depth_scale / safe_area2)
    z_corner = (tz[0] + 1) * depth_scale + zgx * (bx0 - x0) + zgy * (by0 - y0)

    params = torch.cat(
        [torch.stack([bx0, by0, box_w, box_h]), edge_x, edge_y, ax, ay, tie, torch.stack([z_corner, zgx, zgy])]
    ).reshape(_N_ROWS, -1)
    batch = clip_pos.shape[0]
    image = torch.arange(batch, device=clip_pos.device).view(batch, 1) * (height * width)
    base_pixel = image + torch.where(valid, by0 * width + bx0, 0).to(torch.int64)
    side = torch.maximum(box_w, box_h).reshape(-1)
    return params, base_pixel.reshape(-1), valid.reshape(-1), needs_depth_clip.reshape(-1), side


def _fragment_chunks(
    clip_pos: Tensor,
    faces: Tensor,
    height: int,
    width: int,
    cull_backfaces: bool,
    max_candidates: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (pixel [M] int64, key [M] int64) candidate chunks.

    ``key == _EMPTY_KEY`` marks candidates that are not fragments (their pixel index is arbitrary
    and may exceed B*H*W by up to H*W: scatter into a padded buffer); others are
    ``quantised_depth << face_bits | face`` at a pixel in [0, B*H*W). Visibility is the per-pixel
    minimum key.
    """
    n_faces = faces.shape[0]
    device, dtype = clip_pos.device, clip_pos.dtype
    face_bits = max(1, (n_faces - 1).bit_length())
    depth_bits = 61 - face_bits  # key < 2**62: quantised depth in [0, 2**depth_bits] plus rounding slack
    depth_scale = float(2 ** (depth_bits - 1))  # NDC z in [-1, 1] -> [0, 2**depth_bits]

    params, base_pixel, valid, needs_clip, side = _triangle_table(
        clip_pos, faces, height, width, cull_backfaces, depth_scale
    )
    sides = _box_sides(max(height, width))
    n_sides = len(sides)
    bucket = torch.bucketize(side, torch.tensor(sides, dtype=side.dtype, device=device))
    bucket += n_sides * needs_clip
    bucket.masked_fill_(~valid, 2 * n_sides)
    order = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=2 * n_sides + 1).tolist()  # the one host sync

    steps = torch.arange(max(height, width), device=device)
    float_steps = steps.to(dtype)
    # Launch overhead per chunk, in candidate evaluations: large on CUDA, where a candidate costs
    # next to nothing, so small buckets are merged into the next larger grid there.
    overhead = _CHUNK_OVERHEAD_CUDA if device.type == "cuda" else _CHUNK_OVERHEAD_CPU
    for start, count, k, depth_clip in _merge_buckets(counts, sides, height, width, overhead):
        k_rows, k_cols = min(k, height), min(k, width)
        per_chunk = max(1, max_candidates // (k_rows * k_cols))
        row_step, col_step = float_steps[:k_rows], float_steps[:k_cols]
        # Candidates past the box (grid padding) keep the empty key; their index stays within
        # H*W of the last image, so a padded buffer takes them without clamping.
        offset = torch.add(steps[:k_cols], steps[:k_rows, None], alpha=width)  # [k_rows,k_cols]
        for chunk_start in range(start, start + count, per_chunk):
            instance = order[chunk_start : min(chunk_start + per_chunk, start + count)]
            p = params.index_select(1, instance)[:, :, None]  # [P,n,1]
            rows = p[_Y0] + row_step  # [n,k_rows] pixel-centre y (exact integers)
            cols = p[_X0] + col_step  # [n,k_cols]

            # Edge function E = row_term - col_term for the three edges at once: [3,n,k].
            row_term = (rows - p[_AY : _AY + 3]) * p[_EX : _EX + 3]
            row_term.masked_fill_(row_step >= p[_BH], -math.inf)
            col_term = (cols - p[_AX : _AX + 3]) * p[_EY : _EY + 3]
            col_term = torch.nextafter(col_term, col_term + p[_TIE : _TIE + 3])  # E > 0 on non-owned edges
            col_term.masked_fill_(col_step >= p[_BW], math.inf)
            inside = (row_term[..., :, None] >= col_term[..., None, :]).all(0)  # [n,k_rows,k_cols]

            z_row = torch.addcmul(p[_ZC], p[_ZGY], row_step)
            z_quant = z_row[:, :, None] + (p[_ZGX] * col_step)[:, None, :]
            if depth_clip:
                inside &= (z_quant >= 0) & (z_quant <= 2 * depth_scale)
            face = (instance % n_faces).view(-1, 1, 1)
            # Truncation maps the tiny negative rounding of an in-range plane to 0.
            key = torch.add(face, z_quant.to(torch.int64), alpha=1 << face_bits)
            key = torch.where(inside, key, _EMPTY_KEY)
            pixel = base_pixel.index_select(0, instance).view(-1, 1, 1) + offset
            yield pixel.reshape(-1), key.reshape(-1)


def _pixel_zbuffer_size(batch: int, height: int, width: int) -> int:
    """Length of the z-buffer that takes every index ``_fragment_chunks`` yields (one spare image)."""
    return (batch + 1) * height * width


def _visible_pixels(face_index: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Covered pixels of a [B,H,W] raster as flat [N] int64 tensors: (pixel index into B*H*W,
    batch index, pixel index within its image, face index). Host-syncs once (nonzero)."""
    height, width = face_index.shape[1:]
    pixel = mask.reshape(-1).nonzero().squeeze(1)
    image, within = pixel // (height * width), pixel % (height * width)
    return pixel, image, within, face_index.reshape(-1).index_select(0, pixel)


def _compact_bary_and_depth(
    clip_pos: Tensor,
    faces: Tensor,
    height: int,
    width: int,
    image: Tensor,
    within: Tensor,
    face: Tensor,
    with_depth: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Perspective-correct barycentrics [N,3] and NDC depth [N] of triangles ``face`` of batch
    elements ``image`` at pixel centres ``within`` (flat y*W+x); differentiable w.r.t. ``clip_pos``."""
    batch = clip_pos.shape[0]
    n_faces = faces.shape[0]
    device, dtype = clip_pos.device, clip_pos.dtype
    # Screen-space barycentrics are affine in the pixel position: a per-face table of 12 numbers makes
    # the per-pixel work one gather and a few multiply-adds.
    tx, ty, tz, tw = _project(clip_pos, faces, height, width)  # [3,B,F]
    dx1, dy1 = tx[1] - tx[0], ty[1] - ty[0]
    dx2, dy2 = tx[2] - tx[0], ty[2] - ty[0]
    area2 = dx1 * dy2 - dx2 * dy1
    one = torch.ones((), dtype=dtype, device=device)
    area2 = torch.where(area2 != 0, area2, one)  # such faces are never visible; keep gradients finite
    inv_w = 1 / torch.where(tw != 0, tw, one)
    table = torch.cat(
        [
            torch.stack([tx[0], ty[0], dy2 / area2, -dx2 / area2, -dy1 / area2, dx1 / area2]),
            inv_w,
            torch.stack([tz[0], tz[1] - tz[0], tz[2] - tz[0]]),
        ]
    ).reshape(12, batch * n_faces)
    row = table.t().index_select(0, image * n_faces + face).t()  # [12,N]
    rel_x = (within % width).to(dtype) - row[0]
    rel_y = (within // width).to(dtype) - row[1]
    screen1 = row[2] * rel_x + row[3] * rel_y
    screen2 = row[4] * rel_x + row[5] * rel_y
    screen0 = 1 - screen1 - screen2
    # Screen-linear weights divided by w and renormalised = clip-space-linear (perspective-correct).
    persp = torch.stack([screen0 * row[6], screen1 * row[7], screen2 * row[8]], -1)
    bary = persp / persp.sum(-1, keepdim=True)
    if not with_depth:
        return bary, None
    depth = row[9] + screen1 * row[10] + screen2 * row[11]  # z/w is screen-linear
    return bary, depth


def _bary_and_depth(clip_pos: Tensor, faces: Tensor, face_index: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Dense [B,H,W,3] barycentrics (0 on background) and [B,H,W] depth (+inf on background)."""
    batch, height, width = face_index.shape
    device, dtype = clip_pos.device, clip_pos.dtype
    pixel, image, within, face = _visible_pixels(face_index, mask)
    bary, depth = _compact_bary_and_depth(clip_pos, faces, height, width, image, within, face)
    assert depth is not None
    n_pixels = batch * height * width
    bary_image = torch.zeros((n_pixels, 3), dtype=dtype, device=device).index_copy(0, pixel, bary)
    depth_image = torch.full((n_pixels,), math.inf, dtype=dtype, device=device).index_copy(0, pixel, depth)
    return bary_image.view(batch, height, width, 3), depth_image.view(batch, height, width)


def barycentrics_from_clip(clip_pos: Tensor, faces: Tensor, raster: RasterOutput) -> Tensor:
    """Differentiable perspective-correct barycentrics of ``raster``'s visible triangles.

    Recomputes, at every pixel centre, the barycentrics of the triangle ``raster.face_index`` from
    ``clip_pos``, so gradients flow to the vertex positions (visibility itself stays fixed: there is
    no gradient from triangles moving over pixels, i.e. no silhouette/antialiasing gradient).

    Args:
        clip_pos: [B,V,4] float clip-space positions (usually those ``raster`` was made from).
        faces: [F,3] int64 triangles.
        raster: output of :func:`rasterize` for the same batch size and faces.

    Returns:
        [B,H,W,3] ``clip_pos.dtype``; 0 on background. Equals ``raster.bary`` up to rounding when
        ``clip_pos`` is the rasterized one.
    """
    _check_inputs(clip_pos, faces)
    faces = faces.to(device=clip_pos.device, dtype=torch.int64)
    batch, height, width = raster.face_index.shape
    pixel, image, within, face = _visible_pixels(raster.face_index, raster.mask)
    bary, _ = _compact_bary_and_depth(clip_pos, faces, height, width, image, within, face, with_depth=False)
    out = torch.zeros((batch * height * width, 3), dtype=bary.dtype, device=bary.device)
    return out.index_copy(0, pixel, bary).view(batch, height, width, 3)


def rasterize(
    clip_pos: Tensor,
    faces: Tensor,
    height: int,
    width: int,
    *,
    cull_backfaces: bool = False,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> RasterOutput:
    """Z-buffered rasterization of a batch of triangle meshes sharing one face list.

    See the module docstring for the clip-space, pixel, depth, winding and fill-rule conventions.

    Args:
        clip_pos: [B,V,4] float32/float64 homogeneous clip-space vertex positions.
        faces: [F,3] int64 (any integer dtype) vertex indices, shared by the batch.
        height, width: output image size H, W.
        cull_backfaces: drop triangles that are clockwise on screen (see module docstring).
        max_candidates: upper bound on candidate pixels evaluated at once (~40 bytes of memory each);
            a chunk always holds at least one triangle.

    Returns:
        :class:`RasterOutput` with face_index [B,H,W] int64 (-1 background), bary [B,H,W,3],
        depth [B,H,W] (+inf background), mask [B,H,W] bool. Not differentiable (bary is detached);
        use :func:`interpolate` (with ``clip_pos``) for gradients.
    """
    _check_inputs(clip_pos, faces)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    batch = clip_pos.shape[0]
    device = clip_pos.device
    faces = faces.to(device=device, dtype=torch.int64)
    n_faces = faces.shape[0]
    face_bits = max(1, (n_faces - 1).bit_length())
    with torch.no_grad():
        clip_pos = clip_pos.detach()
        zbuffer_size = _pixel_zbuffer_size(batch, height, width)
        zbuffer = torch.full((zbuffer_size,), _EMPTY_KEY, dtype=torch.int64, device=device)
        if n_faces > 0 and batch > 0:
            for pixel, key in _fragment_chunks(clip_pos, faces, height, width, cull_backfaces, max_candidates):
                zbuffer.scatter_reduce_(0, pixel, key, reduce="amin")
        zbuffer = zbuffer[: batch * height * width].view(batch, height, width)
        mask = zbuffer != _EMPTY_KEY
        face_index = torch.where(mask, zbuffer & ((1 << face_bits) - 1), -1)
        bary, depth = _bary_and_depth(clip_pos, faces, face_index, mask)
    return RasterOutput(face_index=face_index, bary=bary, depth=depth, mask=mask)


def interpolate(attr: Tensor, raster: RasterOutput, faces: Tensor, clip_pos: Tensor | None = None) -> Tensor:
    """Interpolate per-vertex attributes over the visible triangles, perspective-correctly.

    Args:
        attr: [B,V,C] or [V,C] (shared by the batch) float per-vertex attributes.
        raster: output of :func:`rasterize`, batch B (``attr`` with a batch of 1 is broadcast).
        faces: [F,3] int64, the faces ``raster`` was made with.
        clip_pos: optional [B,V,4] clip positions. When given, barycentrics are recomputed from it
            (:func:`barycentrics_from_clip`) so the result is differentiable with respect to the
            vertex positions too (for fixed visibility, like nvdiffrast without antialiasing);
            otherwise ``raster.bary`` is used and gradients flow to ``attr`` only.

    Returns:
        [B,H,W,C] in the dtype of ``attr`` (promoted with the barycentrics'), 0 on background.
    """
    face_index, mask = raster.face_index, raster.mask
    batch, height, width = face_index.shape
    device = face_index.device
    faces = faces.to(device=device, dtype=torch.int64)
    if attr.dim() == 2:
        attr = attr[None]
    if attr.dim() != 3 or attr.shape[0] not in (1, batch):
        raise ValueError(f"attr must be [V,C] or [B,V,C] with B in (1, {batch}), got {tuple(attr.shape)}")
    n_verts, channels = attr.shape[1:]
    pixel, image, within, face = _visible_pixels(face_index, mask)
    if clip_pos is None:
        bary = raster.bary.reshape(-1, 3).index_select(0, pixel)
    else:
        _check_inputs(clip_pos, faces)
        bary, _ = _compact_bary_and_depth(clip_pos, faces, height, width, image, within, face, with_depth=False)
    vertex = faces.index_select(0, face)  # [N,3]
    if attr.shape[0] > 1:
        vertex = vertex + (image * n_verts)[:, None]
    flat = attr.reshape(-1, channels)
    values = None
    for i in range(3):
        term = bary[:, i : i + 1] * flat.index_select(0, vertex[:, i])
        values = term if values is None else values + term
    out = torch.zeros((batch * height * width, channels), dtype=values.dtype, device=device)
    return out.index_copy(0, pixel, values).view(batch, height, width, channels)
