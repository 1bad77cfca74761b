"""Tests of avatarcli.render: coverage, fill rule, z-buffer, culling, perspective-correct
interpolation, gradients, SH shading. Small images; all deterministic."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from avatarcli.render import (
    SH_A,
    SH_C,
    barycentrics_from_clip,
    interpolate,
    lambertian_sh,
    rasterize,
    sh_basis,
    vertex_normals,
)
from avatarcli.render.rasterize import _EMPTY_KEY, _fragment_chunks

from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.float64]


def clip_from_pixels(xy, height, width, z=0.0, w=1.0):
    """[...,2] pixel coordinates (integers = pixel centres) -> [...,4] clip positions with NDC depth z
    and homogeneous w (scalars or [...] arrays)."""
    xy = np.asarray(xy, dtype=np.float64)
    ndc_x = (xy[..., 0] + 0.5) * 2 / width - 1
    ndc_y = (xy[..., 1] + 0.5) * 2 / height - 1
    z = np.broadcast_to(np.asarray(z, dtype=np.float64), ndc_x.shape)
    w = np.broadcast_to(np.asarray(w, dtype=np.float64), ndc_x.shape)
    return np.stack([ndc_x * w, ndc_y * w, z * w, w], -1)


def camera_to_clip(points, fx, fy, cx, cy, height, width, near=0.1, far=1000.0):
    """Pinhole projection of [B,V,3] OpenCV camera points (x right, y down, z forward) to clip space;
    pixel (row i, col j) centre at continuous (u, v) = (j + 0.5, i + 0.5), u = fx x / z + cx (the
    convention of avatarcli.camera.clip_from_camera)."""
    x, y, z = points.unbind(-1)
    clip_x = (2.0 / width) * (fx * x + cx * z) - z
    clip_y = (2.0 / height) * (fy * y + cy * z) - z
    clip_z = ((far + near) * z - 2.0 * far * near) / (far - near)
    return torch.stack([clip_x, clip_y, clip_z, z], -1)


def as_tensor(array, dtype, device):
    return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)


def inside_triangle(tri_xy, height, width, margin=1e-6):
    """Analytic coverage of pixel centres by one triangle (float64) -> ([H,W] bool, min |edge distance|)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    edges = []
    for i in range(3):
        a, b = tri_xy[i], tri_xy[(i + 1) % 3]
        cross = (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])
        edges.append(cross / math.hypot(b[0] - a[0], b[1] - a[1]))
    edges = np.stack(edges)
    inside = (edges > 0).all(0) | (edges < 0).all(0)
    return inside, np.abs(edges).min()


def inside_polygon(poly_xy, height, width):
    """Analytic coverage of pixel centres by a convex polygon -> ([H,W] bool, min |edge distance|)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    edges = []
    for i in range(len(poly_xy)):
        a, b = poly_xy[i], poly_xy[(i + 1) % len(poly_xy)]
        cross = (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])
        edges.append(cross / math.hypot(b[0] - a[0], b[1] - a[1]))
    edges = np.stack(edges)
    return (edges > 0).all(0) | (edges < 0).all(0), np.abs(edges).min()


def coverage_count(clip_pos, faces, height, width, cull_backfaces=False):
    """Number of triangles covering each pixel centre (before the z-test), [B,H,W] int64."""
    batch = clip_pos.shape[0]
    count = torch.zeros(batch * height * width, dtype=torch.int64, device=clip_pos.device)
    faces = faces.to(clip_pos.device)
    for pixel, key in _fragment_chunks(clip_pos, faces, height, width, cull_backfaces, 1 << 20):
        count += torch.bincount(pixel[key != _EMPTY_KEY], minlength=count.numel())
    return count.view(batch, height, width)


def grid_mesh(n, lo, hi, jitter=0.0, seed=0):
    """n x n vertex grid over [lo, hi]^2 in pixel coordinates, 2 (n-1)^2 triangles with diagonals in
    random directions; returns (xy [n*n,2] float64, faces [F,3] int64 counter-clockwise on screen)."""
    rng = np.random.default_rng(seed)
    coords = np.linspace(lo, hi, n)
    xs, ys = np.meshgrid(coords, coords)
    xy = np.stack([xs, ys], -1).reshape(-1, 2)
    if jitter:
        xy = xy + rng.uniform(-jitter, jitter, xy.shape) * (coords[1] - coords[0])
    idx = np.arange(n * n).reshape(n, n)
    tl, tr, bl, br = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    flip = rng.random(tl.shape) < 0.5
    # Counter-clockwise on screen (y down): top-left -> bottom-left -> bottom-right, etc.
    a = np.where(flip[:, None], np.stack([tl, bl, tr], 1), np.stack([tl, bl, br], 1))
    b = np.where(flip[:, None], np.stack([tr, bl, br], 1), np.stack([tl, br, tr], 1))
    return xy, np.concatenate([a, b]).astype(np.int64)


# ----------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("winding", ["ccw", "cw"])
def test_single_triangle_coverage_and_barycentrics(device, dtype, winding):
    height, width = 20, 28
    tri = np.array([[3.37, 2.21], [24.6, 7.43], [9.12, 17.8]])
    if winding == "cw":
        tri = tri[::-1].copy()
    expected, margin = inside_triangle(tri, height, width)
    assert margin > 1e-3  # no pixel centre on an edge: the analytic answer is unambiguous

    w = np.array([1.0, 1.7, 0.6])
    clip = as_tensor(clip_from_pixels(tri, height, width, z=0.1, w=w)[None], dtype, device)
    faces = torch.tensor([[0, 1, 2]], device=device)
    raster = rasterize(clip, faces, height, width)

    assert raster.face_index.dtype == torch.int64 and raster.mask.dtype == torch.bool
    assert raster.bary.dtype == dtype and raster.depth.dtype == dtype
    np.testing.assert_array_equal(raster.mask[0].cpu().numpy(), expected)
    assert (raster.face_index[0][raster.mask[0]] == 0).all()
    assert (raster.face_index[0][~raster.mask[0]] == -1).all()
    assert torch.isinf(raster.depth[0][~raster.mask[0]]).all()
    assert (raster.bary[0][~raster.mask[0]] == 0).all()

    tol = 1e-5 if dtype == torch.float32 else 1e-11
    bary = raster.bary[0][raster.mask[0]]
    torch.testing.assert_close(bary.sum(-1), torch.ones_like(bary[:, 0]), atol=tol, rtol=0)
    assert (bary > -tol).all()
    np.testing.assert_allclose(raster.depth[0][raster.mask[0]].cpu().numpy(), 0.1, atol=tol)

    # Perspective-correct bary interpolate clip positions; their x/w, y/w is the pixel centre.
    interp = interpolate(clip[0], raster, faces)[0]
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ndc_x = 2 * (xs.to(dtype) + 0.5) / width - 1
    ndc_y = 2 * (ys.to(dtype) + 0.5) / height - 1
    m = raster.mask[0]
    torch.testing.assert_close(interp[..., 0][m] / interp[..., 3][m], ndc_x[m], atol=10 * tol, rtol=0)
    torch.testing.assert_close(interp[..., 1][m] / interp[..., 3][m], ndc_y[m], atol=10 * tol, rtol=0)

    # With w = 1 everywhere the barycentrics are screen-space ones: they rebuild the pixel centre.
    clip_affine = as_tensor(clip_from_pixels(tri, height, width, z=0.1)[None], dtype, device)
    raster = rasterize(clip_affine, faces, height, width)
    np.testing.assert_array_equal(raster.mask[0].cpu().numpy(), expected)
    pix = interpolate(as_tensor(tri, dtype, device), raster, faces)[0]
    torch.testing.assert_close(pix[..., 0][m], xs[m].to(dtype), atol=100 * tol, rtol=0)
    torch.testing.assert_close(pix[..., 1][m], ys[m].to(dtype), atol=100 * tol, rtol=0)


def test_quad_split_in_two_covers_each_pixel_once(device, dtype):
    height = width = 32
    quad = np.array([[2.3, 1.7], [3.4, 27.9], [29.2, 26.8], [27.6, 3.1]])  # counter-clockwise on screen
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]], device=device)
    clip = as_tensor(clip_from_pixels(quad, height, width, z=0.3, w=[1.0, 2.0, 0.5, 1.5])[None], dtype, device)
    in0, _ = inside_triangle(quad[[0, 1, 2]], height, width)
    in1, _ = inside_triangle(quad[[0, 2, 3]], height, width)
    inside_quad, margin = inside_polygon(quad, height, width)
    assert margin > 1e-3
    count = coverage_count(clip, faces, height, width)[0].cpu().numpy()
    np.testing.assert_array_equal(count, inside_quad.astype(np.int64))  # no hole, no double cover
    assert (count[in0] == 1).all() and (count[in1] == 1).all()
    raster = rasterize(clip, faces, height, width)
    np.testing.assert_array_equal(raster.mask[0].cpu().numpy(), count == 1)
    depth = raster.depth[0][raster.mask[0]]
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(depth, torch.full_like(depth, 0.3), atol=atol, rtol=0)


def test_diagonal_through_pixel_centres_has_no_gap_or_overlap(device, dtype):
    # The square is the whole image; its diagonal passes exactly through the centres (i, i).
    size = 16
    corners = np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5], [size - 0.5, -0.5]])
    clip = as_tensor(clip_from_pixels(corners, size, size, z=-0.25)[None], dtype, device)
    for faces in ([[0, 1, 2], [0, 2, 3]], [[0, 2, 3], [0, 1, 2]], [[2, 0, 1], [3, 0, 2]]):
        faces = torch.tensor(faces, device=device)
        count = coverage_count(clip, faces, size, size)
        assert (count == 1).all()
        raster = rasterize(clip, faces, size, size)
        assert raster.mask.all()
        torch.testing.assert_close(raster.depth, torch.full_like(raster.depth, -0.25))


def test_vertices_on_pixel_centres_tile_exactly(device, dtype):
    # Grid vertices sit exactly on pixel centres: every tie (edges and shared vertices) goes to
    # exactly one triangle.
    size = 32
    xy, faces = grid_mesh(10, 2, 29)  # spacing 3 pixels, integer coordinates
    clip = as_tensor(clip_from_pixels(xy, size, size, z=0.5)[None], dtype, device)
    count = coverage_count(clip, torch.from_numpy(faces), size, size)[0].cpu().numpy()
    # Exactly the centres that a nudge down and (infinitely less) right moves into [2, 29]^2:
    # top and left borders in, bottom and right borders out.
    expected = np.zeros((size, size), dtype=np.int64)
    expected[2:29, 2:29] = 1
    np.testing.assert_array_equal(count, expected)


def test_fan_around_a_pixel_centre(device, dtype):
    size = 16
    angles = np.linspace(0, 2 * np.pi, 7)[:-1] + 0.3
    ring = np.stack([8 + 5 * np.cos(angles), 8 - 5 * np.sin(angles)], -1)  # counter-clockwise on screen
    xy = np.concatenate([[[8.0, 8.0]], ring])
    faces = torch.tensor([[0, 1 + i, 1 + (i + 1) % 6] for i in range(6)], device=device)
    clip = as_tensor(clip_from_pixels(xy, size, size)[None], dtype, device)
    count = coverage_count(clip, faces, size, size)[0]
    assert count[8, 8] == 1
    assert count.max() == 1


def test_jittered_grid_22k_triangles_batch_2(device, monkeypatch):
    # Realistic size: 11,236 vertices, 22,050 triangles at 256x256, different geometry per element.
    size, n = 256, 106
    xy0, faces = grid_mesh(n, 10.3, 245.6, jitter=0.3, seed=1)
    xy1, _ = grid_mesh(n, 10.3, 245.6, jitter=0.3, seed=2)
    w = np.linspace(0.8, 1.3, n * n)
    clip = np.stack(
        [clip_from_pixels(xy0, size, size, z=0.2, w=w), clip_from_pixels(xy1, size, size, z=0.7, w=w[::-1])]
    )
    clip = as_tensor(clip, torch.float32, device)
    faces = torch.from_numpy(faces).to(device)
    count = coverage_count(clip, faces, size, size)
    assert count.max() == 1  # a fold-free mesh never covers a pixel twice
    assert (count[:, 14:242, 14:242] == 1).all()
    raster = rasterize(clip, faces, size, size)
    assert torch.equal(raster.mask, count == 1)
    single = rasterize(clip[1:], faces, size, size)
    assert torch.equal(single.face_index[0], raster.face_index[1])
    assert not torch.equal(raster.face_index[0], raster.face_index[1])
    small_chunks = rasterize(clip, faces, size, size, max_candidates=5000)
    assert torch.equal(small_chunks.face_index, raster.face_index)
    # Merging box-size buckets into larger candidate grids (the CUDA setting) changes nothing.
    render_module = sys.modules["avatarcli.render.rasterize"]
    for overhead in (0.0, 2.0**30):
        monkeypatch.setattr(render_module, "_CHUNK_OVERHEAD_CPU", overhead)
        monkeypatch.setattr(render_module, "_CHUNK_OVERHEAD_CUDA", overhead)
        merged = rasterize(clip, faces, size, size)
        assert torch.equal(merged.face_index, raster.face_index)
        torch.testing.assert_close(merged.bary, raster.bary)


# -------------------------------------------------------------------------------------- visibility


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_triangle_wins(device, dtype, near_first):
    size = 24
    near = np.array([[2.2, 3.1], [4.3, 21.7], [20.9, 12.2]])
    far = np.array([[21.4, 2.7], [3.6, 11.9], [20.8, 22.3]])
    xy = np.concatenate([near, far])
    z = np.array([-0.2, -0.2, -0.2, 0.4, 0.4, 0.4])
    clip = as_tensor(clip_from_pixels(xy, size, size, z=z, w=[1, 2, 1, 1.5, 1, 0.7])[None], dtype, device)
    faces = [[0, 1, 2], [3, 4, 5]] if near_first else [[3, 4, 5], [0, 1, 2]]
    near_id = 0 if near_first else 1
    raster = rasterize(clip, torch.tensor(faces, device=device), size, size)
    in_near, _ = inside_triangle(near, size, size)
    in_far, _ = inside_triangle(far, size, size)
    assert (in_near & in_far).sum() > 20
    face = raster.face_index[0].cpu().numpy()
    assert (face[in_near] == near_id).all()
    assert (face[in_far & ~in_near] == 1 - near_id).all()
    np.testing.assert_allclose(raster.depth[0].cpu().numpy()[in_near], -0.2, atol=1e-5)


def test_equal_depth_resolves_to_smaller_face_index(device, dtype):
    size = 16
    tri = np.array([[1.3, 1.2], [2.1, 14.6], [14.7, 8.2]])
    clip = as_tensor(clip_from_pixels(np.concatenate([tri, tri]), size, size, z=0.1)[None], dtype, device)
    for faces in ([[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]]):
        raster = rasterize(clip, torch.tensor(faces, device=device), size, size)
        assert raster.mask.any() and (raster.face_index[raster.mask] == 0).all()


def test_backface_culling(device, dtype):
    size = 16
    ccw = np.array([[2.2, 1.6], [3.1, 13.4], [13.8, 7.7]])  # counter-clockwise as displayed (y down)
    clip = as_tensor(clip_from_pixels(ccw, size, size)[None], dtype, device)
    front = torch.tensor([[0, 1, 2]], device=device)
    back = torch.tensor([[0, 2, 1]], device=device)
    n_inside = inside_triangle(ccw, size, size)[0].sum()
    assert rasterize(clip, front, size, size, cull_backfaces=True).mask.sum() == n_inside
    assert rasterize(clip, back, size, size, cull_backfaces=True).mask.sum() == 0
    assert rasterize(clip, back, size, size).mask.sum() == n_inside
    assert rasterize(clip, front, size, size).mask.sum() == n_inside


def test_outward_faces_of_a_camera_facing_mesh_are_front_facing(device, dtype):
    # Right-handed triangle whose (v1-v0)x(v2-v0) normal points at an OpenCV camera (-z): front.
    points = torch.tensor([[[0.0, 0.0, 5.0], [0.0, 1.0, 5.0], [1.0, 0.0, 5.0]]], dtype=dtype, device=device)
    shifted = points - torch.tensor([0.3, 0.3, 0.0], dtype=dtype, device=device)
    clip = camera_to_clip(shifted, 20.0, 20.0, 8.0, 8.0, 16, 16)
    faces = torch.tensor([[0, 1, 2]], device=device)
    normal = vertex_normals(points, faces)[0, 0]
    assert normal[2] < 0  # towards the camera
    assert rasterize(clip, faces, 16, 16, cull_backfaces=True).mask.sum() > 3


def test_behind_camera_and_depth_clipping(device, dtype):
    size = 16
    tri = np.array([[1.2, 1.3], [1.4, 14.6], [14.6, 7.9]])
    faces = torch.tensor([[0, 1, 2]], device=device)
    behind = as_tensor(clip_from_pixels(tri, size, size, w=[1.0, -1.0, 1.0])[None], dtype, device)
    assert not rasterize(behind, faces, size, size).mask.any()
    # Depth runs from -0.5 (left) to 1.5 (right vertex): fragments beyond the far plane are discarded.
    clip = as_tensor(clip_from_pixels(tri, size, size, z=[-0.5, -0.5, 1.5])[None], dtype, device)
    raster = rasterize(clip, faces, size, size)
    inside = torch.as_tensor(inside_triangle(tri, size, size)[0], device=device)
    xs = torch.arange(size, device=device, dtype=torch.float64).expand(size, size)
    z_expected = -0.5 + 2.0 * (xs - 1.3) / (14.6 - 1.3)  # approximately; only used away from z = 1
    assert raster.mask[0][inside & (z_expected < 0.9)].all()
    assert not raster.mask[0][z_expected > 1.1].any()
    assert (raster.depth[0][raster.mask[0]] <= 1).all()


def test_large_triangle_and_batch_with_different_geometry(device, dtype):
    height, width = 24, 40
    big = np.array([[-300.0, -200.0], [-250.0, 500.0], [700.0, 10.0]])  # covers the whole image
    small = np.array([[5.3, 3.2], [9.1, 20.4], [33.7, 11.6]])
    clip = np.stack([clip_from_pixels(big, height, width, z=0.5, w=[1.0, 3.0, 2.0]),
                     clip_from_pixels(small, height, width, z=-0.5)])
    clip = as_tensor(clip, dtype, device)
    faces = torch.tensor([[0, 1, 2]], device=device)
    raster = rasterize(clip, faces, height, width)
    assert raster.face_index.shape == (2, height, width)
    assert raster.mask[0].all()
    torch.testing.assert_close(raster.bary[0].sum(-1), torch.ones(height, width, dtype=dtype, device=device))
    np.testing.assert_array_equal(raster.mask[1].cpu().numpy(), inside_triangle(small, height, width)[0])
    for b in range(2):
        alone = rasterize(clip[b : b + 1], faces, height, width)
        assert torch.equal(alone.face_index[0], raster.face_index[b])
        torch.testing.assert_close(alone.bary[0], raster.bary[b])
    tiny_chunks = rasterize(clip, faces, height, width, max_candidates=1)
    assert torch.equal(tiny_chunks.face_index, raster.face_index)


def test_empty_inputs(device):
    clip = torch.zeros(2, 3, 4, device=device)
    raster = rasterize(clip, torch.zeros(0, 3, dtype=torch.int64, device=device), 4, 5)
    assert raster.face_index.shape == (2, 4, 5) and not raster.mask.any()


# ----------------------------------------------------------------------------------- interpolation


def test_perspective_correct_interpolation_of_a_slanted_plane(device, dtype):
    height, width = 24, 32
    fx = fy = 30.0
    cx, cy = 16.0, 12.0  # image centre
    # A plane slanted in depth (z from 2 to 6 across the image), two triangles covering the view.
    corners = torch.tensor(
        [[-4.0, -3.0, 2.0], [-4.0, 3.0, 2.0], [12.0, 9.0, 6.0], [12.0, -9.0, 6.0]], dtype=torch.float64
    )
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]], device=device)
    clip = camera_to_clip(corners[None], fx, fy, cx, cy, height, width, near=0.5, far=20.0).to(device, dtype)
    raster = rasterize(clip, faces, height, width)
    z = interpolate(corners[:, 2:].to(device, dtype), raster, faces)[0, ..., 0]
    m = raster.mask[0]
    assert m.float().mean() > 0.5

    # Exact: the ray through pixel centre (j, i) meets the plane z = 2 + (x + 4) / 4.
    xs = torch.arange(width, dtype=torch.float64).expand(height, width)
    ray_x = (xs + 0.5 - cx) / fx
    z_true = (2 + 1.0) / (1 - ray_x / 4)  # z = 2 + (z ray_x + 4) / 4
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(z[m].double().cpu(), z_true[m.cpu()], atol=tol * 6, rtol=0)
    # Screen-linear (non-perspective) interpolation would be far off.
    raster_affine = rasterize(clip / clip[..., 3:], faces, height, width)
    z_affine = interpolate(corners[:, 2:].to(device, dtype), raster_affine, faces)[0, ..., 0]
    assert (z_affine[m].double().cpu() - z_true[m.cpu()]).abs().max() > 0.1
    # Depth output is the NDC depth of that camera-space z.
    n, f = 0.5, 20.0
    ndc = (f + n) / (f - n) - 2 * f * n / ((f - n) * z_true)
    torch.testing.assert_close(raster.depth[0][m].double().cpu(), ndc[m.cpu()], atol=tol * 10, rtol=0)


def test_interpolate_batched_attributes_and_background(device, dtype):
    size = 12
    tri = np.array([[1.2, 1.7], [2.3, 10.6], [10.4, 5.2]])
    clip = as_tensor(np.stack([clip_from_pixels(tri, size, size)] * 2), dtype, device)
    faces = torch.tensor([[0, 1, 2]], device=device)
    raster = rasterize(clip, faces, size, size)
    attr = torch.arange(18, dtype=dtype, device=device).view(2, 3, 3)
    out = interpolate(attr, raster, faces)
    assert out.shape == (2, size, size, 3)
    assert (out[~raster.mask] == 0).all()
    torch.testing.assert_close(out[1] - out[0], 9 * raster.mask[0, ..., None].to(dtype).expand(-1, -1, 3))
    shared = interpolate(attr[0], raster, faces)
    torch.testing.assert_close(shared[1], out[0])
    recomputed = barycentrics_from_clip(clip, faces, raster)
    torch.testing.assert_close(recomputed, raster.bary)


def test_gradcheck_attributes_and_positions(device):
    dtype = torch.float64
    size = 8
    xy = np.array([[0.6, 0.8], [1.2, 6.7], [6.6, 3.4], [6.9, 0.3]])
    clip = clip_from_pixels(xy, size, size, z=[0.1, 0.3, -0.2, 0.4], w=[1.0, 1.4, 0.8, 1.1])
    clip = as_tensor(clip[None], dtype, device)
    clip = torch.cat([clip, clip * torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=dtype, device=device)])
    clip[1, :, 0] += 0.05  # different geometry in the second batch element
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]], device=device)
    raster = rasterize(clip, faces, size, size)
    assert raster.mask.sum() > 30
    attr = torch.rand(2, 4, 2, dtype=dtype, device=device, generator=None).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: interpolate(a, raster, faces), (attr,))
    attr_shared = attr[0].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: interpolate(a, raster, faces), (attr_shared,))
    positions = clip.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: interpolate(attr.detach(), raster, faces, clip_pos=c), (positions,))
    # Gradients reach the positions and stay finite; background pixels contribute nothing.
    out = interpolate(attr.detach(), raster, faces, clip_pos=positions)
    (grad,) = torch.autograd.grad(out.sum(), positions)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- shading


def test_sh_ambient_only_is_constant_times_albedo(device, dtype):
    gen = torch.Generator().manual_seed(0)
    normals = torch.nn.functional.normalize(torch.randn(2, 50, 3, generator=gen, dtype=dtype), dim=-1).to(device)
    albedo = torch.rand(2, 50, 3, generator=gen, dtype=dtype).to(device)
    sh = torch.zeros(2, 9, 3, dtype=dtype, device=device)
    sh[:, 0, :] = 1
    shaded = lambertian_sh(albedo, normals, sh)
    constant = SH_A[0] * SH_C[0]
    assert math.isclose(constant, math.sqrt(math.pi) / 2)
    torch.testing.assert_close(shaded, albedo * constant)


def test_sh_basis_closed_form_and_orthogonality(dtype):
    basis = sh_basis(torch.tensor([0.0, 0.0, 1.0], dtype=dtype))
    k0, k1, k2 = (a * c for a, c in zip(SH_A, SH_C))
    expected = torch.tensor([k0, 0, k1, 0, 0, 0, k2 / math.sqrt(3), 0, 0], dtype=dtype)
    torch.testing.assert_close(basis, expected)
    basis = sh_basis(torch.tensor([1.0, 0.0, 0.0], dtype=dtype))
    expected = torch.tensor([k0, 0, 0, -k1, 0, 0, -k2 / (2 * math.sqrt(3)), 0, k2 / 2], dtype=dtype)
    torch.testing.assert_close(basis, expected)

    # Gauss-Legendre in cos(theta) x uniform phi integrates degree-4 polynomials on the sphere exactly.
    nodes, weights = np.polynomial.legendre.leggauss(6)
    phi = np.arange(12) * 2 * np.pi / 12
    ct, ph = np.meshgrid(nodes, phi, indexing="ij")
    st = np.sqrt(1 - ct**2)
    normals = torch.tensor(np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1).reshape(-1, 3), dtype=dtype)
    quad_w = torch.tensor((weights[:, None] * np.full_like(ph, 2 * np.pi / 12)).reshape(-1), dtype=dtype)
    b = sh_basis(normals)
    gram = b.T @ (b * quad_w[:, None])
    a_sq = torch.tensor([SH_A[0] ** 2] + [SH_A[1] ** 2] * 3 + [SH_A[2] ** 2] * 5, dtype=dtype)
    torch.testing.assert_close(gram, torch.diag(a_sq), atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=1e-5)


def test_sh_lighting_from_above(dtype):
    # Linear term along +z brightens normals facing +z and darkens those facing -z.
    normals = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]], dtype=dtype)
    sh = torch.zeros(1, 9, 3, dtype=dtype)
    sh[:, 0] = 1
    sh[:, 2] = 0.5
    shaded = lambertian_sh(torch.ones(1, 2, 3, dtype=dtype), normals, sh)
    assert (shaded[0, 0] > shaded[0, 1]).all()
    shared = lambertian_sh(torch.ones(1, 2, 3, dtype=dtype), normals, sh[0])
    torch.testing.assert_close(shared, shaded)


def test_vertex_normals_plane_and_sphere(device, dtype):
    xy, faces = grid_mesh(5, 0.0, 1.0)
    # grid_mesh faces are counter-clockwise with y down, i.e. clockwise in a y-up frame: normal -z.
    verts = torch.tensor(np.concatenate([xy, np.zeros((25, 1))], 1), dtype=dtype, device=device)
    normals = vertex_normals(verts[None], torch.from_numpy(faces).to(device))
    down = torch.tensor([0.0, 0.0, -1.0], dtype=dtype, device=device)
    torch.testing.assert_close(normals[0], down.expand(25, 3))
    # Octahedron with outward counter-clockwise faces: vertex normals are the radial directions.
    verts = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=dtype)
    faces = [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]]
    verts, faces = verts.to(device), torch.tensor(faces, device=device)
    normals = vertex_normals(verts, faces)
    torch.testing.assert_close(normals, verts)


# ------------------------------------------------------------------------------------- CPU vs CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_is_deterministic():
    size, n = 128, 60
    xy, faces = grid_mesh(n, 5.3, 122.4, jitter=0.45, seed=3)
    rng = np.random.default_rng(0)
    z = rng.uniform(-0.9, 0.9, n * n)  # jitter folds + random depth: real occlusion
    clip = torch.tensor(np.stack([clip_from_pixels(xy, size, size, z=z, w=rng.uniform(0.7, 1.3, n * n))] * 3))
    faces = torch.from_numpy(faces)
    for dtype in DTYPES:
        cpu = rasterize(clip.to(dtype), faces, size, size)
        gpu = rasterize(clip.to("cuda", dtype), faces.cuda(), size, size)
        again = rasterize(clip.to("cuda", dtype), faces.cuda(), size, size)
        assert torch.equal(gpu.face_index, again.face_index) and torch.equal(gpu.bary, again.bary)
        same = (gpu.face_index.cpu() == cpu.face_index).float().mean()
        assert same > 0.999  # float rounding may differ on the device in near-ties only
        agree = gpu.face_index.cpu() == cpu.face_index
        torch.testing.assert_close(gpu.bary.cpu()[agree], cpu.bary[agree], atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_interpolate_at_sampled_pixels_equals_dense_interpolation(device):
    """interpolate_at (sparse, per sample) = interpolate with clip_pos at the sampled pixels, values
    and gradients; samples are distinct covered pixels, padded where coverage is short."""
    from avatarcli.render.samples import interpolate_at, sample_visible_pixels

    gen = torch.Generator().manual_seed(3)
    batch, verts = 3, 40
    clip = torch.randn(batch, verts, 4, generator=gen, dtype=torch.float64) * 0.6
    clip[..., 3] = 1.5 + torch.rand(batch, verts, generator=gen, dtype=torch.float64)
    clip[..., 2] *= 0.1
    clip = clip.to(device)
    faces = torch.randint(0, verts, (60, 3), generator=gen).to(device)
    raster = rasterize(clip, faces, 24, 24)
    covered = raster.mask.flatten(1).sum(1)
    count = int(covered.min()) + 5  # one more than the smallest coverage: padding appears
    samples = sample_visible_pixels(raster, count, torch.Generator(device=device).manual_seed(0))
    assert torch.equal(samples.valid.sum(1), covered.clamp(max=count))
    for row in range(batch):
        picked = samples.within[row][samples.valid[row]]
        assert len(picked.unique()) == len(picked)
        assert raster.mask.flatten(1)[row, picked].all()
    attr = torch.randn(batch, verts, 5, dtype=torch.float64, device=device, requires_grad=True)
    pos = clip.clone().requires_grad_(True)
    sparse = interpolate_at(attr, samples, faces, pos)
    dense = interpolate(attr, raster, faces, clip_pos=pos).flatten(1, 2)
    dense = dense.gather(1, samples.within[..., None].expand(-1, -1, 5))
    valid = samples.valid[..., None]
    torch.testing.assert_close(sparse * valid, dense * valid, atol=1e-12, rtol=0)
    weight = torch.randn_like(sparse)
    grads_sparse = torch.autograd.grad((sparse * valid * weight).sum(), (attr, pos))
    grads_dense = torch.autograd.grad((dense * valid * weight).sum(), (attr, pos))
    for a, b in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_flat_sample_shading_equals_gouraud_on_a_planar_patch():
    """shade_samples (face normals, per sample) = shade_vertices + interpolate where every vertex
    normal is the face normal: a tilted planar grid under non-trivial SH light and varying albedo."""
    from avatarcli.camera import clip_from_camera, intrinsics_matrix
    from avatarcli.render.mesh import shade_samples, shade_vertices
    from avatarcli.render.samples import barycentrics_at, gather_corners, sample_visible_pixels

    n = 6
    ys, xs = torch.meshgrid(torch.linspace(-20, 20, n, dtype=torch.float64),
                            torch.linspace(-20, 20, n, dtype=torch.float64), indexing="ij")
    verts = torch.stack([xs, ys, 300 + 0.4 * xs + 0.2 * ys], -1).reshape(1, -1, 3)  # OpenCV camera space
    quads = [(i * n + j, i * n + j + 1, (i + 1) * n + j) for i in range(n - 1) for j in range(n - 1)]
    quads += [(i * n + j + 1, (i + 1) * n + j + 1, (i + 1) * n + j) for i in range(n - 1) for j in range(n - 1)]
    faces = torch.tensor(quads)
    K = intrinsics_matrix(400.0, 32.0, 32.0).to(torch.float64)
    clip = clip_from_camera(verts, K, 64, 10.0, 1e4)
    raster = rasterize(clip, faces, 64, 64)
    gen = torch.Generator().manual_seed(0)
    albedo = torch.rand(1, verts.shape[1], 3, generator=gen, dtype=torch.float64)
    sh = 0.3 * torch.randn(1, 9, 3, generator=gen, dtype=torch.float64)
    dense = interpolate(shade_vertices(verts, faces, albedo, sh), raster, faces, clip_pos=clip).flatten(1, 2)
    samples = sample_visible_pixels(raster, 200, gen)
    assert samples.valid.all()
    bary, vertex = barycentrics_at(samples, faces, clip)
    sparse = shade_samples(gather_corners(verts, vertex), bary, gather_corners(albedo, vertex), sh)
    expected = dense.gather(1, samples.within[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(sparse, expected, atol=1e-10, rtol=0)
