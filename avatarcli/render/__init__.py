"""Differentiable mesh rendering in plain PyTorch: rasterization, interpolation and SH shading.

See the docstring of ``avatarcli/render/rasterize.py`` for the clip-space, pixel, depth, winding and
fill-rule conventions (``import avatarcli.render.rasterize`` gives the function of that name, which
this package re-exports; the module is ``sys.modules["avatarcli.render.rasterize"]``).
"""

from avatarcli.render.rasterize import (
    DEFAULT_MAX_CANDIDATES,
    RasterOutput,
    barycentrics_from_clip,
    interpolate,
    rasterize,
)
from avatarcli.render.shading import SH_A, SH_C, face_normals, lambertian_sh, sh_basis, vertex_normals

__all__ = [
    "DEFAULT_MAX_CANDIDATES",
    "RasterOutput",
    "barycentrics_from_clip",
    "interpolate",
    "rasterize",
    "SH_A",
    "SH_C",
    "face_normals",
    "lambertian_sh",
    "sh_basis",
    "vertex_normals",
]
