"""Photometric term of the fit: robust colour difference between renders of the fit and the frames."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avatarcli.fit.config import FitConfig
from avatarcli.fit.problem import BatchFit, robust

PHOTO_DELTA = 0.1
"""Scale of the robust photometric loss (colour distance, 0..1 units)."""


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N,C,H,W] float images at size² (area when shrinking)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area" if images.shape[-1] > size else "bilinear")


class PhotometricTerm:
    """Robust colour difference between renders and frames over the model's face region.

    Renders only the face-region submesh (its own compact bases), at ``size``², and averages the
    robust per-pixel error per frame (over ``photo_samples`` random covered pixels, or all of them)
    and then over each clip's frames (a sum over clips, like the other losses). ``images``: [T,H,W,3]
    float 0..1 frames (default: the clips' uint8 frames).
    """

    def __init__(self, fit: BatchFit, config: FitConfig, size: int | None = None, images=None):

        self.fit, self.config = fit, config
        self.size = size = size or config.photo_size
        model, device = fit.model, fit.device
        region = model.face_region.to(device).sort().values
        new_index = torch.full((model.num_vertices,), -1, dtype=torch.int64, device=device)
        new_index[region] = torch.arange(len(region), device=device)
        self.faces = new_index[model.face_region_faces().to(device)]  # face-region triangles, compact indices
        f32 = dict(device=device, dtype=torch.float32)
        self.mean = model.mean[region].to(**f32).reshape(1, -1)
        self.id_basis = model.id_basis[:, region].to(**f32).reshape(model.num_id, -1)
        self.exp_basis = model.exp_basis[:, region].to(**f32).reshape(model.num_exp, -1)
        self.num_vertices = len(region)
        self.region = region
        if images is None:
            # clip by clip and in chunks: no host-side concatenation, no full-size float copy
            self.images = torch.empty(len(fit.target), size, size, 3, device=device)
            offset = 0
            for clip in fit.clips:
                frames = torch.from_numpy(clip.frames).to(device)
                for start in range(0, len(frames), 256):
                    chunk = _resized(frames[start:start + 256].permute(0, 3, 1, 2).float() / 255.0, size)
                    self.images[offset + start:offset + start + len(chunk)] = chunk.permute(0, 2, 3, 1)
                offset += len(frames)
        else:
            self.images = _resized(images.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).contiguous()  # [T,size,size,3]
        self.K = fit.K.clone()
        self.K[:2] *= size / fit.size
        self.raster = self.samples = self.sample_rgb = None
        self.generator = torch.Generator(device=device).manual_seed(0)

    def vertices(self):
        """[T,Vr,3] face-region vertices of every frame."""
        fit = self.fit
        flat = torch.addmm(self.mean, fit.identity_per_frame(), self.id_basis)
        flat = torch.addmm(flat, fit.exp, self.exp_basis)
        return flat.reshape(len(fit.exp), self.num_vertices, 3)

    def resample(self, rasterize: bool = True) -> None:
        """Rasterize the current fit (visibility; ``rasterize=False`` keeps the last raster) and,
        with ``photo_samples``, draw new pixels into the same tensors (a captured loss reads them in
        place)."""
        from avatarcli.camera import clip_from_camera, world_to_camera
        from avatarcli.render.rasterize import rasterize as rasterize_mesh
        from avatarcli.render.samples import sample_visible_pixels

        fit, size, count = self.fit, self.size, self.config.photo_samples
        with torch.no_grad():
            if rasterize or self.raster is None:
                R, t = fit.rt()
                clip = clip_from_camera(world_to_camera(self.vertices(), R, t), self.K, size, 10.0, 1e5)
                self.raster = rasterize_mesh(clip, self.faces, size, size, cull_backfaces=True)
            if count <= 0:
                return
            samples = sample_visible_pixels(self.raster, min(count, size * size), self.generator)
            rgb = self.images.reshape(len(self.images), -1, 3).gather(1, samples.within[..., None].expand(-1, -1, 3))
            if self.samples is None:
                self.samples, self.sample_rgb = samples, rgb
            else:
                for name in ("within", "face", "valid"):
                    getattr(self.samples, name).copy_(getattr(samples, name))
                self.sample_rgb.copy_(rgb)

    def loss(self, per_clip: bool = False):
        """The photometric term at the current parameters, with the visibility (and samples) of the
        last :meth:`resample`: a scalar, or [C] with ``per_clip``."""
        from avatarcli.camera import clip_from_camera, world_to_camera
        from avatarcli.render.mesh import shade_samples, shade_vertices
        from avatarcli.render.rasterize import interpolate
        from avatarcli.render.samples import barycentrics_from_corners, gather_corners

        fit, size = self.fit, self.size
        if self.raster is None:
            self.resample()
        R, t = fit.rt()
        if self.config.photo_samples > 0:
            # only the sampled triangles' corners are posed, projected and shaded (flat normals)
            T, K = self.samples.face.shape
            vertex = self.faces[self.samples.face]  # [T,K,3]
            # one [T, K*3, 3] x [T, 3, 3] product, not T*K tiny 3x3 products (cuBLAS is slow at those)
            cam = world_to_camera(gather_corners(self.vertices(), vertex).reshape(T, -1, 3), R, t)
            clip = clip_from_camera(cam, self.K, size, 10.0, 1e5).reshape(T, K, 3, 4)
            cam = cam.reshape(T, K, 3, 3)
            bary = barycentrics_from_corners(clip, self.samples)
            albedo = fit.clip_albedo()[:, self.region].flatten(0, 1)  # [C*Vr,3]
            corner_index = vertex + (fit.clip_of_frame * self.num_vertices)[:, None, None]
            albedo_corners = albedo.index_select(0, corner_index.flatten()).reshape(T, K, 3, 3)
            rgb = shade_samples(cam, bary, albedo_corners, fit.light)  # [T,K,3]
            target, mask = self.sample_rgb, self.samples.valid.to(rgb.dtype)
        else:
            cam = world_to_camera(self.vertices(), R, t)
            clip = clip_from_camera(cam, self.K, size, 10.0, 1e5)
            colour = shade_vertices(cam, self.faces, fit.albedo()[:, self.region], fit.light)
            rgb, target = interpolate(colour, self.raster, self.faces, clip_pos=clip), self.images
            mask = self.raster.mask.to(rgb.dtype).flatten(1)
            rgb, target = rgb.flatten(1, 2), target.flatten(1, 2)
        diff = torch.sqrt(((rgb - target) ** 2).sum(-1) + 1e-8)
        per_frame = (robust(diff, PHOTO_DELTA) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        per_frame = per_frame * fit.frame_share
        return fit.clip_sum(per_frame) if per_clip else per_frame.sum()
