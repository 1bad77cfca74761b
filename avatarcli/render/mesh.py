"""Render a posed, lit face mesh: camera -> clip space -> rasterize -> Gouraud SH shading.

Shared by ``avatar synth`` (making frames) and ``avatar fit-3dmm`` (analysis by synthesis), so the
two agree on every convention (see :mod:`avatarcli.camera` and :mod:`avatarcli.render.rasterize`).

Lighting frame: spherical-harmonics lighting is attached to the camera, as in Deep3DFaceRecon: normals
are shaded in camera axes with y up and z towards the viewer (``CV_FROM_GL @ n_cam``), so the same
SH coefficients light a turning head from the same side of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from avatarcli.camera import CV_FROM_GL, clip_from_camera, cv_from_gl, world_to_camera
from avatarcli.render.rasterize import RasterOutput, interpolate, rasterize
from avatarcli.render.shading import lambertian_sh, vertex_normals

AMBIENT = 0.8
"""Added to the first SH coefficient (Deep3DFaceRecon's ``init_lit``): zero coefficients give an
evenly lit face of ``0.8862 * 0.8 ~ 0.71 * albedo``, a sensible start for fitting."""


@dataclass
class MeshRender:
    """Images of one batch, all ``[B,H,W,...]``."""

    rgb: Tensor
    """[B,H,W,3] shaded colour (not clamped), 0 on background."""
    mask: Tensor
    """[B,H,W] bool, pixels covered by the mesh."""
    raster: RasterOutput
    clip_pos: Tensor
    """[B,V,4] clip-space vertices (for further :func:`interpolate` calls)."""


def shade_vertices(verts_cam: Tensor, faces: Tensor, albedo: Tensor, sh: Tensor) -> Tensor:
    """Per-vertex colour ``albedo * irradiance`` under camera-attached SH light.

    verts_cam: [B,V,3] OpenCV camera-space vertices; faces: [F,3]; albedo: [B,V,3] or [V,3] in 0..1;
    sh: [B,9,3] coefficients (``AMBIENT`` is added to coefficient 0 here). Returns [B,V,3].
    """
    normals = vertex_normals(verts_cam, faces) @ CV_FROM_GL.to(verts_cam)  # to y-up, z-to-viewer axes
    sh = sh.clone()
    sh[:, 0, :] = sh[:, 0, :] + AMBIENT
    return lambertian_sh(albedo, normals, sh)


def shade_samples(corners_cam: Tensor, bary: Tensor, albedo_corners: Tensor, sh: Tensor) -> Tensor:
    """Colour at sampled pixels with flat (per-triangle) normals: the sparse counterpart of
    :func:`shade_vertices` + interpolation, costing per sample instead of per vertex and triangle.
    Equal to it where the triangle's vertex normals equal its face normal (a planar patch); on a
    dense mesh the difference is a small shading facet.

    corners_cam: [B,K,3,3] OpenCV camera-space corners (counter-clockwise seen from outside);
    bary: [B,K,3] barycentrics; albedo_corners: [B,K,3,3] per-corner albedo; sh: [B,9,3]
    (``AMBIENT`` is added to coefficient 0 here). Returns [B,K,3].
    """
    edge1, edge2 = corners_cam[..., 1, :] - corners_cam[..., 0, :], corners_cam[..., 2, :] - corners_cam[..., 0, :]
    normal = torch.nn.functional.normalize(torch.cross(edge1, edge2, dim=-1), dim=-1, eps=1e-20)
    normal = normal @ cv_from_gl(normal)  # to y-up, z-to-viewer axes (cached: capturable in a CUDA graph)
    sh = sh.clone()
    sh[:, 0, :] = sh[:, 0, :] + AMBIENT
    albedo = (bary[..., None] * albedo_corners).sum(-2)
    return lambertian_sh(albedo, normal, sh)


def render_mesh(
    verts: Tensor,
    faces: Tensor,
    R: Tensor,
    t: Tensor,
    K: Tensor,
    size: int,
    albedo: Tensor,
    sh: Tensor,
    *,
    near: float = 10.0,
    far: float = 1e5,
) -> MeshRender:
    """Render model-space meshes with a pinhole camera.

    Args:
        verts: [B,V,3] model-space vertices (mm, y up, z to the front of the face).
        faces: [F,3] int64, counter-clockwise seen from outside (back faces are culled).
        R, t: [B,3,3], [B,3] world -> OpenCV camera.
        K: [B,3,3] or [3,3] intrinsics in pixels of the ``size`` x ``size`` image.
        albedo: [B,V,3] or [V,3] in 0..1. sh: [B,9,3].
        near, far: clip planes in mm.

    Returns:
        :class:`MeshRender`; ``rgb`` is differentiable w.r.t. vertices, pose, albedo and light.
    """
    verts_cam = world_to_camera(verts, R, t)
    clip = clip_from_camera(verts_cam, K, size, near, far)
    raster = rasterize(clip, faces, size, size, cull_backfaces=True)
    colour = shade_vertices(verts_cam, faces, albedo, sh)
    rgb = interpolate(colour, raster, faces, clip_pos=clip)
    return MeshRender(rgb=rgb, mask=raster.mask, raster=raster, clip_pos=clip)
