"""Lambertian shading under second-order spherical-harmonics lighting, and vertex normals.

The SH model is the one of Deep3DFaceRecon / BFM fitting: 9 real SH functions per colour channel,
each pre-multiplied by its Lambertian (clamped-cosine) convolution factor, so that
``irradiance = sh_basis(n) @ sh_coeffs`` and ``colour = albedo * irradiance``.

Normalisation, exactly (``n = (x, y, z)`` a unit normal, ``a_l`` and ``c_l`` as in that code)::

    a0 = pi,             a1 = 2 pi / sqrt(3),      a2 = 2 pi / sqrt(8)
    c0 = 1 / sqrt(4 pi), c1 = sqrt(3) / sqrt(4 pi), c2 = 3 sqrt(5) / sqrt(12 pi)

    basis = [ a0 c0,
             -a1 c1 y,   a1 c1 z,  -a1 c1 x,
              a2 c2 x y,  -a2 c2 y z,  a2 c2 (3 z^2 - 1) / (2 sqrt(3)),
             -a2 c2 x z,   a2 c2 (x^2 - y^2) / 2 ]

``c_l`` times the polynomials are the orthonormal real SH functions Y_lm on the unit sphere (with
Deep3DFaceRecon's signs), so ``integral basis_i basis_j dOmega = a_l(i)^2 delta_ij``. The constant term
is ``a0 c0 = sqrt(pi) / 2 ~ 0.8862``: with ``sh_coeffs[:, 0] = 1`` and all others 0 (ambient light)
the shaded colour is ``0.8862 * albedo``. Deep3DFaceRecon also adds 0.8 to the first coefficient
before shading (its "init_lit"); that offset is the caller's business here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SH_A", "SH_C", "sh_basis", "lambertian_sh", "vertex_normals", "face_normals"]

SH_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
SH_C = (
    1 / math.sqrt(4 * math.pi),
    math.sqrt(3.0) / math.sqrt(4 * math.pi),
    3 * math.sqrt(5.0) / math.sqrt(12 * math.pi),
)


def sh_basis(normals: Tensor) -> Tensor:
    """Second-order SH irradiance basis (see the module docstring for the exact constants).

    Args:
        normals: [...,3] float unit normals (x, y, z) in the frame the SH coefficients live in.
            They are used as given: normalise interpolated normals first.

    Returns:
        [...,9] same dtype/device.
    """
    x, y, z = normals.unbind(-1)
    k0 = SH_A[0] * SH_C[0]
    k1 = SH_A[1] * SH_C[1]
    k2 = SH_A[2] * SH_C[2]
    return torch.stack(
        [
            torch.full_like(x, k0),
            -k1 * y,
            k1 * z,
            -k1 * x,
            k2 * x * y,
            -k2 * y * z,
            (k2 / (2 * math.sqrt(3.0))) * (3 * z * z - 1),
            -k2 * x * z,
            (k2 / 2) * (x * x - y * y),
        ],
        -1,
    )


def lambertian_sh(albedo: Tensor, normals: Tensor, sh_coeffs: Tensor) -> Tensor:
    """Diffuse colour ``albedo * (sh_basis(normals) @ sh_coeffs)``, per colour channel.

    Args:
        albedo: [B,...,3] float (e.g. [B,V,3] per vertex or [B,H,W,3] per pixel), or anything
            broadcastable to the irradiance [B,...,3].
        normals: [B,...,3] float unit normals.
        sh_coeffs: [B,9,3] float, coefficient k of colour channel c at ``[:, k, c]``; [9,3] is
            shared by the batch.

    Returns:
        [B,...,3] shaded colour (no clamping).
    """
    basis = sh_basis(normals)  # [B,...,9]
    if sh_coeffs.dim() == 2:
        irradiance = basis @ sh_coeffs
    else:
        batch = basis.shape[0]
        if sh_coeffs.shape[0] != batch:
            raise ValueError(f"sh_coeffs batch {sh_coeffs.shape[0]} does not match normals batch {batch}")
        irradiance = (basis.reshape(batch, -1, 9) @ sh_coeffs).reshape(*basis.shape[:-1], sh_coeffs.shape[-1])
    return albedo * irradiance


def face_normals(verts: Tensor, faces: Tensor, normalize: bool = True) -> Tensor:
    """Triangle normals ``(v1 - v0) x (v2 - v0)`` (right-handed: counter-clockwise faces point at the
    viewer). [B,V,3] or [V,3] float, [F,3] int64 -> [B,F,3] (or [F,3]); unnormalised length is twice
    the triangle's area."""
    tri = verts[..., faces, :]  # [...,F,3,3]
    normal = torch.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)
    return F.normalize(normal, dim=-1, eps=1e-20) if normalize else normal


def vertex_normals(verts: Tensor, faces: Tensor, eps: float = 1e-20) -> Tensor:
    """Area-weighted, normalised vertex normals.

    Args:
        verts: [B,V,3] (or [V,3]) float vertex positions.
        faces: [F,3] int64, counter-clockwise seen from outside for outward normals.
        eps: lower bound of the norm when normalising (isolated vertices get a zero normal).

    Returns:
        [B,V,3] (or [V,3]) unit normals, same dtype/device as ``verts``.
    """
    squeeze = verts.dim() == 2
    if squeeze:
        verts = verts[None]
    faces = faces.to(device=verts.device, dtype=torch.int64)
    area_normal = face_normals(verts, faces, normalize=False)  # [B,F,3], |n| = 2 area
    summed = torch.zeros_like(verts)
    for corner in range(3):
        summed = summed.index_add(1, faces[:, corner], area_normal)
    normals = F.normalize(summed, dim=-1, eps=eps)
    return normals[0] if squeeze else normals
