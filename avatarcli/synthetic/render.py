"""Rendering of synthetic face clips (``avatar synth``): geometry, render and composite (torch).

:class:`Synthesizer` turns a sampled clip (:func:`avatarcli.synthetic.sampling.sample_clip`) into
frames and landmarks on one device: model vertices and head pose -> 68 projected landmark
vertices -> rasterize + SH shading (:func:`avatarcli.render.mesh.render_mesh`, with the
rendering-only eye and mouth caps) -> composite over the background -> uint8. ``config`` is
``avatar synth``'s ``SynthConfig`` (any object with its fields). Torch is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from avatarcli.synthetic.sampling import ClipTruth, ModelArrays, sample_clip


@dataclass
class SynthClip:
    """One rendered clip: truth, frames and landmarks (numpy)."""

    name: str
    identity: str
    truth: ClipTruth
    frames: np.ndarray
    """[T, S, S, 3] uint8."""
    lmk68: np.ndarray
    """[T, 68, 2] float32, crop pixels."""
    kps5: np.ndarray
    """[T, 5, 2] float32, crop pixels (SCRFD order)."""
    mask_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """[T] fraction of pixels covered by the face model."""


def kps5_from_lmk68(lmk68: np.ndarray) -> np.ndarray:
    """``[..., 68, 2]`` -> ``[..., 5, 2]`` in SCRFD order: image-left eye (mean of 36-41), image-right
    eye (42-47), nose tip (30), image-left mouth corner (48), image-right mouth corner (54)."""
    return np.stack([lmk68[..., 36:42, :].mean(-2), lmk68[..., 42:48, :].mean(-2), lmk68[..., 30, :],
                     lmk68[..., 48, :], lmk68[..., 54, :]], -2).astype(np.float32)


def clip_names(config, index: int) -> tuple[str, str]:
    """``(clip_id, identity)`` of clip ``index``: both ``synth_s<seed>_<index:04d>`` (one identity per
    clip; the seed keeps clips of differently seeded artifacts apart when they are merged)."""
    name = f"synth_s{config.seed}_{index:04d}"
    return name, name


class Synthesizer:
    """Renders clips of one face model on one device (the library entry point).

    ``Synthesizer(config).clip(k)`` returns clip ``k`` as a :class:`SynthClip`, without writing
    anything; the ``synth`` stage writes them into a clips artifact.
    """

    def __init__(self, config, model=None, device=None, timer=None):
        """``model``: an already loaded face model (else ``config.face_model`` is loaded); ``device``:
        a ``torch.device`` or a name (default ``config.device``); ``timer``: a
        :class:`avatarcli.timing.StepTimer` that receives the per-step times."""
        import torch

        from avatarcli.devices import resolve_device
        from avatarcli.facemodel import load_face_model
        from avatarcli.timing import StepTimer

        config.check()
        self.config = config
        self.device = torch.device(resolve_device(str(device or config.device)))
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else None
        self.timer = timer or StepTimer(sync)
        with self.timer.step("load_model", sync=False):
            if model is None:
                model = load_face_model(config.face_model, config.models_dir)
            self.arrays = ModelArrays.from_model(model)
            self.model = model.to(device=self.device, dtype=torch.float32)
            self.faces = self.model.faces
            caps = self.arrays.caps if config.fill_holes else None
            self.cap_gather = self.cap_weights = None
            if caps is not None:
                self.cap_gather = torch.from_numpy(caps.gather).to(self.device)
                self.cap_weights = torch.from_numpy(caps.weights).to(self.device)
                self.faces = torch.cat([self.faces, torch.from_numpy(caps.faces).to(self.device)])

    def sample(self, index: int) -> ClipTruth:
        with self.timer.step("sample", items=self.config.frames, sync=False):
            return sample_clip(self.config, self.arrays, index)

    def geometry(self, truth: ClipTruth, start: int, stop: int):
        """Vertices [B,V,3], R [B,3,3], t [B,3], K [3,3] and lmk68 [B,68,2] of frames start:stop."""
        import torch

        from avatarcli.camera import pose6_to_rt, project, world_to_camera

        dev = self.device
        count = stop - start
        identity = torch.from_numpy(truth.identity).to(dev)[None].expand(count, -1)
        expression = torch.from_numpy(truth.expression[start:stop]).to(dev)
        verts = self.model.vertices(identity, expression)
        R, t = pose6_to_rt(torch.from_numpy(truth.pose6[start:stop]).to(dev))
        K = torch.from_numpy(truth.intrinsics).to(dev)
        lmk = project(world_to_camera(self.model.landmarks(verts), R, t), K)
        return verts, R, t, K, lmk

    def render(self, truth: ClipTruth, progress_frames=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames [T,S,S,3] uint8, lmk68 [T,68,2] float32 and mask fractions [T] of a sampled clip."""
        import torch
        import torch.nn.functional as F

        from avatarcli.render.mesh import render_mesh

        config, dev = self.config, self.device
        S, ss, T = config.size, config.supersample, config.frames
        frames = np.empty((T, S, S, 3), np.uint8)
        lmk68 = np.empty((T, 68, 2), np.float32)
        coverage = np.empty(T, np.float32)
        albedo = torch.from_numpy(np.concatenate([truth.albedo, truth.cap_albedo])).to(dev)
        background = torch.from_numpy(truth.background).to(dev)
        scale = torch.tensor([[ss, 0.0, 0.0], [0.0, ss, 0.0], [0.0, 0.0, 1.0]], device=dev)
        with torch.no_grad():
            for start in range(0, T, config.batch_frames):
                stop = min(T, start + config.batch_frames)
                count = stop - start
                with self.timer.step("geometry", items=count):
                    verts, R, t, K, lmk = self.geometry(truth, start, stop)
                    sh = torch.from_numpy(truth.lighting[start:stop]).to(dev)
                    if self.cap_weights is not None:
                        extra = torch.einsum("el,blc->bec", self.cap_weights, verts.index_select(1, self.cap_gather))
                        verts = torch.cat([verts, extra], 1)
                with self.timer.step("render", items=count):
                    out = render_mesh(verts, self.faces, R, t, scale @ K, S * ss, albedo, sh)
                with self.timer.step("composite", items=count):
                    rgb = out.rgb.clamp(0.0, 1.0)
                    mask = out.mask[..., None].to(rgb.dtype)
                    if ss > 1:  # average ss x ss blocks: pixel (i, j) covers sub-pixels ss*i.., as K is scaled
                        rgb = F.avg_pool2d((rgb * mask).permute(0, 3, 1, 2), ss).permute(0, 2, 3, 1)
                        mask = F.avg_pool2d(mask.permute(0, 3, 1, 2), ss).permute(0, 2, 3, 1)
                        image = rgb + background * (1.0 - mask)
                    else:
                        image = rgb * mask + background * (1.0 - mask)
                    image = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
                    frames[start:stop] = image.cpu().numpy()
                    lmk68[start:stop] = lmk.float().cpu().numpy()
                    coverage[start:stop] = mask.mean(dim=(1, 2, 3)).float().cpu().numpy()
                if progress_frames is not None:
                    progress_frames(count)
        return frames, lmk68, coverage

    def clip(self, index: int, progress_frames=None) -> SynthClip:
        """Sample and render clip ``index``."""
        truth = self.sample(index)
        frames, lmk68, coverage = self.render(truth, progress_frames)
        name, identity = clip_names(self.config, index)
        return SynthClip(name, identity, truth, frames, lmk68, kps5_from_lmk68(lmk68), coverage)
