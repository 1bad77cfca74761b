"""The fitting problem of one batch of whole clips: parameters, objectives and landmark Jacobians.

Model (see ``avatarcli.camera`` for every convention): a clip has one identity vector and one
albedo; each frame has expression, head rotation (pitch, yaw, roll), translation (mm, OpenCV camera)
and SH lighting. The camera is a fixed pinhole with focal ``focal * crop_size / 256`` px and a
centred principal point, as the crops of ``avatar preprocess`` are nose-centred at a fixed scale.
"""

from __future__ import annotations

import numpy as np
import torch

from avatarcli.fit.config import FitConfig
from avatarcli.fit.inputs import ClipInput

# Landmark weights (iBUG-68 order): the jaw contour is a silhouette on real faces, not fixed vertices.
JAW, BROWS, NOSE, EYES, MOUTH = range(0, 17), range(17, 27), range(27, 36), range(36, 48), range(48, 68)
LANDMARK_DELTA_PX = 2.0
"""Scale of the robust landmark loss (px at 256²): quadratic below, linear above."""
SMOOTH_ROT, SMOOTH_TRANS = 100.0, 0.01
"""Smoothness units: 0.1 rad and 10 mm of frame-to-frame change weigh like 1 of expression."""


def robust(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Pseudo-Huber: quadratic below ``delta``, linear above (outlier landmarks, hair, glasses)."""

    return delta * delta * (torch.sqrt(1 + (x / delta) ** 2) - 1)


class BatchFit:
    """Parameters and losses of one batch of whole clips (frames of all clips concatenated).

    Every loss is a sum over clips of per-clip terms (frame terms averaged over the clip's frames),
    so a clip's fit does not depend on which other clips share its batch. Parameters: ``id`` [C,I],
    ``exp`` [T,E], ``rot`` [T,3], ``trans`` [T,3], ``light`` [T,9,3], ``albedo_gain`` [C,3] and
    ``albedo_coeffs`` [C,A] (None without an albedo basis).
    """

    def __init__(self, model, clips: list[ClipInput], crop_size: int, config: FitConfig, device: torch.device):

        from avatarcli.camera import intrinsics_matrix

        self.model, self.config, self.device, self.size = model, config, device, crop_size
        self.clips = clips
        counts = [len(c.lmk68) for c in clips]
        f32 = dict(device=device, dtype=torch.float32)
        self.clip_of_frame = torch.repeat_interleave(torch.arange(len(clips), device=device),
                                                     torch.tensor(counts, device=device))
        # frame pairs (t, t+1) inside the same clip, for smoothness
        same = (self.clip_of_frame[1:] == self.clip_of_frame[:-1])
        self.pairs = torch.nonzero(same).squeeze(1)
        frames = sum(counts)
        self.target = torch.as_tensor(np.concatenate([c.lmk68 for c in clips]), **f32)  # [T,68,2]
        self.frame_weight = torch.as_tensor(np.concatenate([c.weights for c in clips]), **f32)
        # per-frame shares of its clip: landmark weights normalised per clip, 1/T_c, 1/pairs_c
        per_clip = torch.zeros(len(clips), **f32).index_add_(0, self.clip_of_frame, self.frame_weight)
        self.frame_norm = self.frame_weight / per_clip.clamp(min=1e-6)[self.clip_of_frame]
        self.frame_share = 1.0 / torch.tensor(counts, **f32)[self.clip_of_frame]
        # 1 / landmark noise variance per clip (px² at 256²), see update_landmark_noise
        self.landmark_precision = torch.ones(len(clips), **f32)
        pair_counts = torch.tensor([max(1, n - 1) for n in counts], **f32)
        self.pair_share = 1.0 / pair_counts[self.clip_of_frame[self.pairs]]
        point_weight = torch.ones(68, **f32)
        point_weight[list(JAW)] = config.w_contour
        self.point_weight = point_weight
        # per-unknown smoothness units of the Gauss-Newton unknowns (rotation, translation, expression)
        self.smooth_scale = torch.tensor([SMOOTH_ROT] * 3 + [SMOOTH_TRANS] * 3 + [1.0] * model.num_exp, **f32)
        self.px_scale = 256.0 / crop_size  # losses in px at 256² whatever the crop size
        focal = config.focal * crop_size / 256.0
        self.K = intrinsics_matrix(focal, crop_size / 2.0, crop_size / 2.0).to(**f32)[0]
        # landmark-only geometry: the 68 rows of the bases
        lmk = model.lmk68.to(device)
        self.lmk_mean = model.mean[lmk].to(**f32)
        self.lmk_id = model.id_basis[:, lmk].to(**f32)
        self.lmk_exp = model.exp_basis[:, lmk].to(**f32)
        self.unit_exp = model.exp_range == "unit"
        self.id_std = model.id_std.to(**f32) if model.id_std is not None else torch.ones(model.num_id, **f32)
        self.exp_std = (model.exp_std.to(**f32) if model.exp_std is not None and not self.unit_exp
                        else torch.ones(model.num_exp, **f32))
        self.id = torch.zeros(len(clips), model.num_id, **f32, requires_grad=True)
        self.exp = torch.zeros(frames, model.num_exp, **f32, requires_grad=True)
        self.rot = torch.zeros(frames, 3, **f32, requires_grad=True)
        self.trans = self._initial_translation().requires_grad_(True)
        self.light = torch.zeros(frames, 9, 3, **f32, requires_grad=True)
        if model.albedo_basis is not None and model.albedo_basis.shape[0] > 0:
            self.albedo_coeffs = torch.zeros(len(clips), model.albedo_basis.shape[0], **f32, requires_grad=True)
        else:
            self.albedo_coeffs = None
        self.albedo_gain = torch.ones(len(clips), 3, **f32, requires_grad=True)  # per-clip colour of the skin

    def _initial_translation(self):
        """Frontal head at the distance that matches the eye distance, nose on its landmark."""

        eye_l, eye_r = self.target[:, 36:42].mean(1), self.target[:, 42:48].mean(1)
        eye_px = (eye_r - eye_l).norm(dim=-1).clamp(min=1.0)
        model_eyes = (self.lmk_mean[42:48].mean(0) - self.lmk_mean[36:42].mean(0)).norm()
        nose = self.lmk_mean[30]
        depth = self.K[0, 0] * model_eyes / eye_px  # distance of the eyes' plane
        tz = depth + self.lmk_mean[36:48, 2].mean()  # camera z of the eyes = tz - z_model
        z_nose = tz - nose[2]
        u, v = self.target[:, 30, 0], self.target[:, 30, 1]
        tx = (u - self.K[0, 2]) * z_nose / self.K[0, 0] - nose[0]
        ty = (v - self.K[1, 2]) * z_nose / self.K[1, 1] + nose[1]
        return torch.stack([tx, ty, tz], -1)

    # -- geometry
    def rt(self):
        """Rotation [T,3,3] and translation [T,3] of every frame (OpenCV camera)."""
        from avatarcli.camera import pose6_to_rt

        return pose6_to_rt(torch.cat([self.rot, self.trans], -1))

    def identity_per_frame(self):
        """[T,I] each frame's clip identity."""
        return self.id[self.clip_of_frame]

    def landmarks_3d(self):
        """[T,68,3] model-space landmark vertices."""
        return (self.lmk_mean + torch.einsum("tk,kvc->tvc", self.identity_per_frame(), self.lmk_id)
                + torch.einsum("tk,kvc->tvc", self.exp, self.lmk_exp))

    def landmarks_2d(self):
        """[T,68,2] projected model landmarks."""
        from avatarcli.camera import project, world_to_camera

        R, t = self.rt()
        return project(world_to_camera(self.landmarks_3d(), R, t), self.K)

    def landmark_residual_px(self):
        """[T,68] Euclidean landmark error in crop pixels."""
        return (self.landmarks_2d() - self.target).norm(dim=-1)

    # -- sums over each clip's frames
    def clip_sum(self, per_frame: torch.Tensor, clip_index: torch.Tensor | None = None) -> torch.Tensor:
        """[N] -> [C]: summed per clip (``clip_index`` [N]: the clip of each entry; default the frames')."""
        index = self.clip_of_frame if clip_index is None else clip_index
        return per_frame.new_zeros(len(self.clips)).index_add(0, index, per_frame)

    def clip_sum_rows(self, per_frame: torch.Tensor) -> torch.Tensor:
        """[T,...] -> [C,...] summed over each clip's frames."""
        out = per_frame.new_zeros(len(self.clips), *per_frame.shape[1:])
        return out.index_add_(0, self.clip_of_frame, per_frame)

    # -- losses (each a sum over clips; ``per_clip=True`` gives the [C] terms)
    def landmark_loss(self, per_clip: bool = False):
        err = (self.landmarks_2d() - self.target) * self.px_scale
        per_point = robust(err.norm(dim=-1), LANDMARK_DELTA_PX) * self.point_weight
        per_frame = per_point.mean(1) * self.data_weight()
        return self.clip_sum(per_frame) if per_clip else per_frame.sum()

    def data_weight(self):
        """[T] weight of each frame's landmark term: its share of the clip over the clip's noise variance."""
        return self.frame_norm * self.landmark_precision[self.clip_of_frame]

    def update_landmark_noise(self) -> None:
        """Re-estimate each clip's landmark noise from its residuals (MAP with an estimated noise
        level: the priors weigh more against noisy detections than against exact ones). The
        variance is per coordinate, px² at 256², at least ``landmark_noise_floor_px``²."""
        with torch.no_grad():
            err = (self.landmarks_2d() - self.target) * self.px_scale
            per_frame = (err.pow(2).sum(-1) * self.point_weight).sum(1) / (2.0 * self.point_weight.sum())
            variance = self.clip_sum(per_frame * self.frame_norm)
            # in place: a captured Gauss-Newton step (CUDA graph) reads this tensor's memory
            self.landmark_precision.copy_(1.0 / variance.clamp(min=self.config.landmark_noise_floor_px ** 2))

    def prior_loss(self, per_clip: bool = False):
        config = self.config
        identity = config.w_identity * ((self.id / self.id_std) ** 2).sum(1)
        if self.unit_exp:
            per_frame = self.exp.abs().sum(1)
        else:
            per_frame = ((self.exp / self.exp_std) ** 2).sum(1)
        per_frame = config.w_expression * per_frame * self.frame_share
        if per_clip:
            return identity + self.clip_sum(per_frame)
        return identity.sum() + per_frame.sum()

    def smooth_loss(self, with_light: bool = False, per_clip: bool = False):
        if len(self.pairs) == 0:
            zero = self.exp.sum() * 0
            return zero.expand(len(self.clips)) if per_clip else zero
        p = self.pairs
        loss = (self.exp[p + 1] - self.exp[p]).pow(2).sum(1)
        loss = loss + (self.rot[p + 1] - self.rot[p]).pow(2).sum(1) * SMOOTH_ROT
        loss = loss + (self.trans[p + 1] - self.trans[p]).pow(2).sum(1) * SMOOTH_TRANS
        if with_light:
            loss = loss + (self.light[p + 1] - self.light[p]).pow(2).sum((1, 2))
        per_pair = self.config.w_smooth * loss * self.pair_share
        return self.clip_sum(per_pair, self.clip_of_frame[p]) if per_clip else per_pair.sum()

    def project_constraints(self):
        """Expression weights into [0, 1] (blendshape models) and the head in front of the camera."""
        with torch.no_grad():
            if self.unit_exp:
                self.exp.clamp_(0.0, 1.0)
            self.trans[:, 2].clamp_(min=50.0)

    def landmark_objective(self, shape: bool, per_clip: bool = False):
        """The objective the landmark (Gauss-Newton) stages minimise: robust landmarks, smoothness
        (and the priors when ``shape``)."""
        loss = self.landmark_loss(per_clip) + self.smooth_loss(per_clip=per_clip)
        return loss + self.prior_loss(per_clip) if shape else loss

    def landmark_jacobians(self, shape: bool):
        """Residuals and Jacobians of the landmarks (px at 256²) and their IRLS weights.

        Returns ``c`` [T,136] (the robust loss ≈ Σ c e² near the current residuals), ``jx``
        [T,136,P] (rotation, translation, then expression when ``shape``) and ``j_id`` [T,136,I]
        (None unless ``shape``)."""
        from avatarcli.camera import cv_from_gl

        T = len(self.target)
        pts = self.landmarks_3d()  # [T,68,3]
        R, dR = euler_with_derivatives(self.rot, cv_from_gl(pts))
        cam = pts @ R.transpose(1, 2) + self.trans[:, None]
        z = cam[..., 2].clamp(min=1e-3)
        fx, fy, cx, cy = self.K[0, 0], self.K[1, 1], self.K[0, 2], self.K[1, 2]
        uv = torch.stack([fx * cam[..., 0] / z + cx, fy * cam[..., 1] / z + cy], -1)
        r = ((uv - self.target) * self.px_scale).norm(dim=-1)
        psi = 1.0 / torch.sqrt(1.0 + (r / LANDMARK_DELTA_PX) ** 2)  # pseudo-Huber: ρ'(r) / r
        c = (0.5 / 68.0) * self.data_weight()[:, None] * self.point_weight * psi  # [T,68]
        c = c[:, :, None].expand(-1, -1, 2).reshape(T, -1)
        s, zero = self.px_scale, torch.zeros_like(z)
        dproj = torch.stack([torch.stack([s * fx / z, zero, -s * fx * cam[..., 0] / z ** 2], -1),
                             torch.stack([zero, s * fy / z, -s * fy * cam[..., 1] / z ** 2], -1)], -2)  # [T,68,2,3]
        # the tiny per-landmark contractions as broadcasts (cuBLAS is slow at T*68 3x3 products)
        d_cam = (dR[:, None] * pts[:, :, None, None, :]).sum(-1)  # [T,68,3(angle),3]: d(cam point)/d(angle)
        blocks = [(dproj[:, :, :, None, :] * d_cam[:, :, None]).sum(-1), dproj]
        j_id = None
        if shape:
            to_model = (dproj[..., None] * R[:, None, None]).sum(-2)  # d(px) / d(model point), [T,68,2,3]
            blocks.append(torch.einsum("tpik,epk->tpie", to_model, self.lmk_exp))
            j_id = torch.einsum("tpik,epk->tpie", to_model, self.lmk_id).reshape(T, 136, -1)
        return c, torch.cat(blocks, -1).reshape(T, 136, -1), j_id

    # -- full mesh
    def vertices(self, frames=None):
        """[T,V,3] model-space mesh of every frame (or of ``frames``)."""
        idf = self.identity_per_frame()
        exp = self.exp
        if frames is not None:
            idf, exp = idf[frames], exp[frames]
        return self.model.vertices(idf, exp)

    def clip_albedo(self):
        """[C,V,3] per-vertex albedo of each clip."""
        if self.albedo_coeffs is not None:
            base = self.model.albedo(self.albedo_coeffs, self.albedo_coeffs.shape[0])  # [C,V,3]
        else:
            base = self.model.albedo_mean.to(self.id)[None].expand(len(self.clips), -1, -1)
        return base * self.albedo_gain[:, None, :]

    def albedo(self, frames=None):
        """[T,V,3] per-vertex albedo of each frame's clip."""
        clip = self.clip_of_frame if frames is None else self.clip_of_frame[frames]
        return self.clip_albedo()[clip]


def euler_with_derivatives(angles: torch.Tensor, cv_from_gl: torch.Tensor):
    """``R = CV_FROM_GL @ Rz(roll) Ry(yaw) Rx(pitch)`` [T,3,3] (as :func:`avatarcli.camera.pose6_to_rt`)
    and its derivatives with respect to (pitch, yaw, roll), [T,3,3,3] (derivative index first).
    ``angles``: [T,3]."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(*entries):
        return torch.stack(entries, -1).reshape(-1, 3, 3)

    cx, sx, cy, sy, cz, sz = c[:, 0], s[:, 0], c[:, 1], s[:, 1], c[:, 2], s[:, 2]
    rx, drx = mat(one, zero, zero, zero, cx, -sx, zero, sx, cx), mat(zero, zero, zero, zero, -sx, -cx, zero, cx, -sx)
    ry, dry = mat(cy, zero, sy, zero, one, zero, -sy, zero, cy), mat(-sy, zero, cy, zero, zero, zero, -cy, zero, -sy)
    rz, drz = mat(cz, -sz, zero, sz, cz, zero, zero, zero, one), mat(-sz, -cz, zero, cz, -sz, zero, zero, zero, zero)
    left = cv_from_gl @ rz
    R = left @ ry @ rx
    dR = torch.stack([left @ ry @ drx, left @ dry @ rx, cv_from_gl @ drz @ ry @ rx], 1)
    return R, dR
