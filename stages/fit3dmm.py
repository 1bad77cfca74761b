"""Stage ``fit-3dmm``: clips -> per-frame 3D morphable model parameters (coeffs artifact).

check inputs -> prepare (face model, batches of whole clips) -> compute (coarse to fine, all frames
of a batch at once: rigid pose on landmarks, then identity and expression on landmarks, both by
batched Gauss-Newton with the clip's shared identity eliminated through a Schur complement, then
photometric refinement with lighting and albedo by Adam) -> write (a part file per batch, then an atomic
assembly). A rerun with the same settings reuses finished batches.

Model (see ``avatarcli.camera`` for every convention): a clip has one identity vector and one
albedo; each frame has expression, head rotation (pitch, yaw, roll), translation (mm, OpenCV camera)
and SH lighting. The camera is a fixed pinhole with focal ``focal * crop_size / 256`` px and a
centred principal point, as the crops of ``avatar preprocess`` are nose-centred at a fixed scale.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import closing, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from avatarcli.artifact import ArtifactWriter, create_h5, open_artifact, read_strings, validate_unit, write_strings
from avatarcli.devices import resolve_device
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file
from avatarcli.schemas import CLIPS, COEFFS

READS = CLIPS.kind
WRITES = COEFFS.kind
PART_VERSION = 1

# Landmark weights (iBUG-68 order): the jaw contour is a silhouette on real faces, not fixed vertices.
JAW, BROWS, NOSE, EYES, MOUTH = range(0, 17), range(17, 27), range(27, 36), range(36, 48), range(48, 68)
LANDMARK_DELTA_PX = 2.0
"""Scale of the robust landmark loss (px at 256²): quadratic below, linear above."""
PHOTO_DELTA = 0.1
"""Scale of the robust photometric loss (colour distance, 0..1 units)."""
SMOOTH_ROT, SMOOTH_TRANS = 100.0, 0.01
"""Smoothness units: 0.1 rad and 10 mm of frame-to-frame change weigh like 1 of expression."""


@dataclass
class Fit3dmmConfig:
    """Settings of ``avatar fit-3dmm``. All but the last group change the result."""

    face_model: str = "ict"
    """Face model: 'ict' (ICT-FaceKit, default), 'bfm' (user-supplied BFM_model_front.mat) or a file path."""
    focal: float = 1160.0
    """Focal length in pixels for a 256² crop (scaled with the crop size); ~12.6° field of view."""
    rigid_iters: int = 5
    """Gauss-Newton iterations of the first stage: rotation and translation on landmarks."""
    iters: int = 60
    """Gauss-Newton iterations of the second stage: + identity and expression on landmarks."""
    damping: float = 1e-4
    """Levenberg-Marquardt damping of the Gauss-Newton stages (relative to the diagonal)."""
    cg_iters: int = 12
    """Conjugate-gradient iterations per Gauss-Newton step (they resolve the coupling of
    neighbouring frames by smoothness and the weakly determined shape directions)."""
    adapt_noise: bool = True
    """Re-estimate each clip's landmark noise from its residuals three times during the shape stage
    (after each quarter; noise = 1 px before the first) and weigh the landmarks by its inverse (MAP
    with an estimated noise level: exact synthetic landmarks end at the floor, real detections near
    their error). Only a few times: re-estimating every iteration lets the shape chase detector
    noise. Off: noise = 1 px throughout."""
    landmark_noise_floor_px: float = 0.05
    """Lower bound of that estimate (px at 256²): the strongest the landmarks can weigh against
    the priors (exact synthetic landmarks reach it; real detections stay near 1 px)."""
    photo_iters: int = 50
    """Iterations of the photometric stage (0 or --landmarks-only skips it)."""
    landmarks_only: bool = False
    """Fit landmarks only: no rendering, lighting or albedo (albedo is the model's mean)."""
    photo_size: int = 128
    """Side of the renders compared with the (downsampled) frames in the photometric stage."""
    photo_samples: int = 512
    """Photometric stage: covered pixels per frame compared per iteration, drawn at random anew
    every ``sample_every`` iterations (an unbiased estimate of the mean over the face region at a
    cost that does not grow with ``photo_size``); 0 compares every covered pixel."""
    raster_every: int = 25
    """Photometric stage: re-rasterize (visibility) every N iterations; between them the visible
    triangles are kept and only barycentrics, shading and colours are recomputed (differentiably).
    After the landmark stages the geometry moves little, so visibility changes slowly."""
    sample_every: int = 5
    """Photometric stage: draw new pixel samples from the last raster every N iterations."""
    lr: float = 1.0
    """Scale of every learning rate (Adam)."""
    w_landmarks: float = 1.0
    """Weight of the robust landmark term (per point, in px at 256²)."""
    w_photo: float = 500.0
    """Weight of the robust photometric term (colour in 0..1)."""
    w_identity: float = 1e-3
    """Weight of the identity prior (squared coefficients over their std), per clip, against the
    landmark term at 1 px noise (see ``adapt_noise``)."""
    w_expression: float = 0.005
    """Weight of the expression prior (L1 for blendshape weights, squared for PCA coefficients)."""
    w_smooth: float = 1.0
    """Weight of temporal smoothness (squared frame-to-frame change of pose and expression)."""
    flag_px: float = 6.0
    """Frames whose mean landmark error (px at the crop size) exceeds this are flagged."""
    batch_frames: int = 512
    """Frames fitted together (whole clips are packed up to this; a longer clip is its own batch)."""
    # -- not part of the result
    models_dir: str | None = None
    """Folder searched first for the face model."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    preview: str | None = None
    """Folder for PNG grids per clip: input | landmarks | shaded render | overlay."""
    preview_frames: int = 6
    """Frames (rows) per preview grid."""
    overwrite: bool = False
    """Replace an output or parts made with other settings."""
    keep_parts: bool = False
    """Keep ``<output>.parts/`` after a successful run."""
    cuda_graphs: bool = True
    """On CUDA, replay the Gauss-Newton steps and the (sampled) photometric iterations as CUDA graphs
    (the same computation up to rounding, without a kernel launch from Python per operation)."""

    def result_fields(self) -> dict:
        skip = {"models_dir", "device", "preview", "preview_frames", "overwrite", "keep_parts", "cuda_graphs"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def result_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.result_fields(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ClipInput:
    name: str
    lmk68: np.ndarray
    """[T,68,2] crop pixels."""
    weights: np.ndarray
    """[T] landmark weight per frame (1 where the landmark model ran, lower where interpolated)."""
    fps: float
    frames: np.ndarray | None = None
    """[T,S,S,3] uint8, loaded for the photometric stage and previews."""


@dataclass
class FitSummary:
    output: Path
    clips: int
    frames: int
    skipped: list[tuple[str, str]]
    flagged: int
    lmk_error: float
    seconds: float
    frames_now: int
    reused: int
    timings: dict = field(default_factory=dict)
    device: str = "cpu"


# ------------------------------------------------------------------------------------------------
# the fit


def _robust(x, delta: float):
    """Pseudo-Huber: quadratic below ``delta``, linear above (outlier landmarks, hair, glasses)."""

    return delta * delta * (torch.sqrt(1 + (x / delta) ** 2) - 1)


class BatchFit:
    """Parameters and losses of one batch of whole clips (frames of all clips concatenated).

    Every loss is a sum over clips of per-clip terms (frame terms averaged over the clip's frames),
    so a clip's fit does not depend on which other clips share its batch.
    """

    def __init__(self, model, clips: list[ClipInput], crop_size: int, config: Fit3dmmConfig, device):

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
        point_weight[list(JAW)] = 0.3
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
        from avatarcli.camera import pose6_to_rt

        return pose6_to_rt(torch.cat([self.rot, self.trans], -1))

    def identity_per_frame(self):
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

    # -- losses (each a sum over clips; ``per_clip=True`` gives the [C] terms)
    def _clip_sum(self, per_frame: torch.Tensor, clip_index: torch.Tensor | None = None) -> torch.Tensor:
        index = self.clip_of_frame if clip_index is None else clip_index
        return per_frame.new_zeros(len(self.clips)).index_add(0, index, per_frame)

    def landmark_loss(self, per_clip: bool = False):
        err = (self.landmarks_2d() - self.target) * self.px_scale
        per_point = _robust(err.norm(dim=-1), LANDMARK_DELTA_PX) * self.point_weight
        per_frame = per_point.mean(1) * self.data_weight()
        return self._clip_sum(per_frame) if per_clip else per_frame.sum()

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
            variance = self._clip_sum(per_frame * self.frame_norm)
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
            return identity + self._clip_sum(per_frame)
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
        return self._clip_sum(per_pair, self.clip_of_frame[p]) if per_clip else per_pair.sum()

    def project_constraints(self):

        with torch.no_grad():
            if self.unit_exp:
                self.exp.clamp_(0.0, 1.0)
            self.trans[:, 2].clamp_(min=50.0)

    # -- Gauss-Newton on the landmark objective
    def landmark_objective(self, shape: bool, per_clip: bool = False):
        """The objective the landmark stages minimise: robust landmarks, smoothness (and the priors
        when ``shape``)."""
        loss = self.landmark_loss(per_clip) + self.smooth_loss(per_clip=per_clip)
        return loss + self.prior_loss(per_clip) if shape else loss

    def _landmark_jacobians(self, shape: bool):
        """Residuals and Jacobians of the landmarks (px at 256²) and their IRLS weights.

        Returns ``c`` [T,136] (the robust loss ≈ Σ c e² near the current residuals), ``jx``
        [T,136,P] (rotation, translation, then expression when ``shape``) and ``j_id`` [T,136,I]
        (None unless ``shape``)."""
        from avatarcli.camera import cv_from_gl

        T = len(self.target)
        pts = self.landmarks_3d()  # [T,68,3]
        R, dR = _euler_with_derivatives(self.rot, cv_from_gl(pts))
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

    def gauss_newton_step(self, shape: bool, damping: float, cg_iters: int = 4) -> None:
        """One damped, projected Gauss-Newton step on :meth:`landmark_objective`, in place.

        Unknowns: per frame rotation, translation (and expression when ``shape``), per clip identity
        (when ``shape``). The gradient is the exact one (autograd); the Hessian is 2 JᵀCJ of the
        landmark residuals with the IRLS weights of the robust loss, plus the priors and the exact
        smoothness coupling of neighbouring frames. The step solves that system by preconditioned
        conjugate gradients; the preconditioner solves it without the coupling, eliminating the
        frames through the Schur complement of the identity that a clip's frames share (so all frames
        of a clip, with their different poses, constrain the shape together). Expression weights at
        a bound whose gradient points outwards are held (projected Newton), and each clip takes the
        best of a few step lengths (monotone). No host synchronisation.

        Three phases (:meth:`gn_system`, :meth:`gn_factor`, :meth:`gn_solve`), so that the first and
        the last can be replayed as CUDA graphs around the factorisations (:class:`GaussNewtonStep`).
        """
        system = self.gn_system(shape, damping)
        self.gn_solve(system, self.gn_factor(system), shape, cg_iters)

    def gn_system(self, shape: bool, damping: float) -> dict:
        """Phase 1: gradient, Hessian blocks and preconditioner blocks (tensors only, no host sync)."""
        params = [self.rot, self.trans] + ([self.exp, self.id] if shape else [])
        grads = torch.autograd.grad(self.landmark_objective(shape), params)
        with torch.no_grad():
            c, jx, j_id = self._landmark_jacobians(shape)
            T, P = jx.shape[0], jx.shape[2]
            cjx = c[..., None] * jx
            A = 2.0 * jx.transpose(1, 2) @ cjx  # [T,P,P]
            g = torch.cat(grads[:3], -1) if shape else torch.cat(grads, -1)  # [T,P]
            # smoothness: per pair weight of each unknown (its Hessian is a chain Laplacian)
            pair_w = (2.0 * self.config.w_smooth * self.pair_share)[:, None] * self.smooth_scale[:P]  # [pairs,P]
            p0, p1 = self.pairs, self.pairs + 1
            smooth_diag = g.new_zeros(T, P).index_add_(0, p0, pair_w).index_add_(0, p1, pair_w)
            prior_diag = g.new_zeros(T, P)
            free = torch.ones_like(g, dtype=torch.bool)
            if shape:
                if self.unit_exp:  # L1 prior on [0, 1]: no curvature, bounds
                    g_exp, exp = grads[2], self.exp
                    free[:, 6:] = ~(((exp <= 0) & (g_exp > 0)) | ((exp >= 1) & (g_exp < 0)))
                else:
                    prior_diag[:, 6:] = 2.0 * self.config.w_expression * self.frame_share[:, None] / self.exp_std ** 2
            A_diag = A.diagonal(dim1=1, dim2=2)
            damp_x = damping * (A_diag + smooth_diag + prior_diag)
            mask = free.to(g.dtype)
            # preconditioner blocks: per frame, the smoothness Laplacian replaced by its diagonal
            pre_x = A + torch.diag_embed(smooth_diag + prior_diag + damp_x)
            pre_x = pre_x * (mask[:, :, None] * mask[:, None, :]) + torch.diag_embed(1.0 - mask)
            system = {"A": A, "g": g * mask, "mask": mask, "pair_w": pair_w, "diag": prior_diag + damp_x,
                      "pre_x": pre_x}
            if shape:
                system["Bm"] = 2.0 * cjx.transpose(1, 2) @ j_id * mask[..., None]  # [T,P,I]
                h_id = self._clip_sum_matrix(2.0 * j_id.transpose(1, 2) @ (c[..., None] * j_id))  # [C,I,I]
                h_id_diag = h_id.diagonal(dim1=1, dim2=2)
                id_diag = 2.0 * self.config.w_identity / self.id_std ** 2 + damping * h_id_diag
                system["h_id"] = h_id + torch.diag_embed(id_diag.expand_as(h_id_diag))
                system["g_id"] = grads[3]
        return system

    def gn_factor(self, system: dict) -> dict:
        """Phase 2: inverses of the preconditioner's SPD blocks (frames, then the identity's Schur
        complement). Explicit inverses make every later solve one batched matmul; cuSOLVER/MAGMA
        factorisations cannot be captured in a CUDA graph, so this phase always runs eagerly."""
        with torch.no_grad():
            factors = {"x_inv": _spd_inverse(system["pre_x"])}
            if "Bm" in system:
                Bm = system["Bm"]
                a_inv_b = factors["x_inv"] @ Bm  # [T,P,I]
                schur = system["h_id"] - self._clip_sum_matrix(Bm.transpose(1, 2) @ a_inv_b)
                factors["a_inv_b"] = a_inv_b
                factors["id_inv"] = _spd_inverse(schur)
        return factors

    def gn_solve(self, system: dict, factors: dict, shape: bool, cg_iters: int) -> None:
        """Phase 3: preconditioned conjugate gradients and the per-clip line search (no host sync)."""
        with torch.no_grad():
            A, g, mask, pair_w, diag = system["A"], system["g"], system["mask"], system["pair_w"], system["diag"]
            p0, p1 = self.pairs, self.pairs + 1
            x_inv = factors["x_inv"]

            def apply_x(v):  # (data + prior + damping) part of the per-frame blocks, masked
                return (A @ v[..., None])[..., 0] + diag * v

            def apply_smooth(v):
                diff = (v[p1] - v[p0]) * pair_w
                return v.new_zeros(v.shape).index_add_(0, p0, -diff).index_add_(0, p1, diff)

            if shape:
                Bm, h_id, a_inv_b, id_inv = system["Bm"], system["h_id"], factors["a_inv_b"], factors["id_inv"]
                frame_clip = self.clip_of_frame

                def precondition(rx, ri):
                    y = x_inv @ rx[..., None]
                    zi = id_inv @ (ri - self._clip_sum_rows(Bm.transpose(1, 2) @ y)[..., 0])[..., None]
                    zx = (y - a_inv_b @ zi[frame_clip])[..., 0]
                    return zx * mask, zi[..., 0]

                def apply(vx, vi):
                    hx = apply_x(vx) + (Bm @ vi[frame_clip][..., None])[..., 0] + apply_smooth(vx)
                    hi = self._clip_sum_rows((Bm.transpose(1, 2) @ vx[..., None]))[..., 0] + (h_id @ vi[..., None])[..., 0]
                    return hx * mask, hi

                def dot(ax, ai, bx, bi):
                    return self._clip_sum((ax * bx).sum(1)) + (ai * bi).sum(1)

                rhs = (-g, -system["g_id"])
            else:
                def precondition(rx, ri):
                    return (x_inv @ rx[..., None])[..., 0] * mask, ri

                def apply(vx, vi):
                    return (apply_x(vx) + apply_smooth(vx)) * mask, vi

                def dot(ax, ai, bx, bi):
                    return self._clip_sum((ax * bx).sum(1))

                rhs = (-g, g.new_zeros(len(self.clips), 0))
            step_x, step_id = _pcg(apply, precondition, dot, rhs, cg_iters, self.clip_of_frame)
            params = [self.rot, self.trans] + ([self.exp, self.id] if shape else [])
            self._line_search(shape, params, [step_x[:, :3], step_x[:, 3:6]]
                              + ([step_x[:, 6:], step_id] if shape else []))

    def _clip_sum_matrix(self, per_frame: torch.Tensor) -> torch.Tensor:
        """[T,...] -> [C,...] summed over each clip's frames."""
        out = per_frame.new_zeros(len(self.clips), *per_frame.shape[1:])
        return out.index_add_(0, self.clip_of_frame, per_frame)

    _clip_sum_rows = _clip_sum_matrix

    def _line_search(self, shape: bool, params: list[torch.Tensor], steps: list[torch.Tensor],
                     lengths=(1.0, 0.5, 0.25, 0.1)) -> None:
        """Per clip, move ``params`` by the step length (or none) that lowers the objective most."""
        start = [p.detach().clone() for p in params]
        per_frame = [True, True] + ([True, False] if shape else [])  # identity is per clip

        def move(length_per_clip):
            for p, s0, d, frame in zip(params, start, steps, per_frame):
                scale = length_per_clip[self.clip_of_frame] if frame else length_per_clip
                p.copy_(s0 + scale[:, None] * d)
            self.project_constraints()

        best = self.landmark_objective(shape, per_clip=True)
        best_length = torch.zeros_like(best)
        for length in lengths:
            trial = torch.full_like(best, length)
            move(trial)
            value = self.landmark_objective(shape, per_clip=True)
            better = value < best
            best = torch.where(better, value, best)
            best_length = torch.where(better, trial, best_length)
        move(best_length)

    # -- full mesh
    def vertices(self, frames=None):
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


def _like(x: torch.Tensor) -> dict:
    return {"device": x.device, "dtype": x.dtype}


def _spd_inverse(A: torch.Tensor) -> torch.Tensor:
    """Inverses of the batched symmetric positive definite matrices ``A`` [B,N,N], by Cholesky after
    Jacobi scaling (so float32 copes with unknowns of very different units: radians, mm, blendshape
    weights). No host synchronisation (``cholesky_ex``)."""
    d = A.diagonal(dim1=1, dim2=2)
    inv_sqrt = torch.rsqrt(d.clamp(min=1e-12))  # [B,N]
    scaled = A * inv_sqrt[:, :, None] * inv_sqrt[:, None, :]
    # a touch of ridge keeps Cholesky of a (numerically) semi-definite block from failing
    chol, _ = torch.linalg.cholesky_ex(scaled + 1e-6 * torch.eye(A.shape[-1], **_like(A)))
    return torch.cholesky_inverse(chol) * inv_sqrt[:, :, None] * inv_sqrt[:, None, :]


def _pcg(apply, precondition, dot, rhs, iters: int, clip_of_frame):
    """Preconditioned conjugate gradients for the per-clip systems ``apply(x) = rhs`` (all clips at
    once; the unknowns are a pair (per-frame [T,P], per-clip [C,I]); ``dot`` gives per-clip inner
    products [C]). A fixed number of iterations, so no host synchronisation."""
    bx, bi = rhs
    x_x, x_i = torch.zeros_like(bx), torch.zeros_like(bi)
    r_x, r_i = bx, bi
    z_x, z_i = precondition(r_x, r_i)
    p_x, p_i = z_x, z_i
    rz = dot(r_x, r_i, z_x, z_i)
    for _ in range(iters):
        q_x, q_i = apply(p_x, p_i)
        alpha = rz / dot(p_x, p_i, q_x, q_i).clamp(min=1e-30)
        x_x = x_x + alpha[clip_of_frame, None] * p_x
        x_i = x_i + alpha[:, None] * p_i
        r_x = r_x - alpha[clip_of_frame, None] * q_x
        r_i = r_i - alpha[:, None] * q_i
        z_x, z_i = precondition(r_x, r_i)
        rz_new = dot(r_x, r_i, z_x, z_i)
        beta = rz_new / rz.clamp(min=1e-30)
        p_x = z_x + beta[clip_of_frame, None] * p_x
        p_i = z_i + beta[:, None] * p_i
        rz = rz_new
    return x_x, x_i


def _euler_with_derivatives(angles: torch.Tensor, cv_from_gl: torch.Tensor):
    """``R = CV_FROM_GL @ Rz(roll) Ry(yaw) Rx(pitch)`` [T,3,3] (as :func:`avatarcli.camera.pose6_to_rt`)
    and its derivatives with respect to (pitch, yaw, roll), [T,3,3,3] (derivative index first)."""
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


def _on_side_stream(fn):
    """``fn()`` run eagerly on a side stream: the warm-up before a CUDA graph capture (cuBLAS and
    the caching allocator must not initialise during capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def _capture(fn, pool=None) -> torch.cuda.CUDAGraph:
    """Records ``fn()`` into a new CUDA graph (run nothing); only this thread's work is captured."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        fn()
    return graph


class GaussNewtonStep:
    """``fit.gauss_newton_step(shape, ...)`` as a callable; on CUDA (``graphs=True``) its first and
    last phases are replayed as CUDA graphs around the eager factorisations: a step is ~1000 small
    kernels, and launching them one by one from Python costs more than running them.

    The first call runs eagerly on a side stream (the warm-up), then records the graphs; later calls
    replay them. Replays compute what eager calls compute (up to rounding: cuBLAS may pick other
    kernels under capture). If capture fails, it warns and stays eager.
    """

    def __init__(self, fit: "BatchFit", shape: bool, damping: float, cg_iters: int, graphs: bool):
        self.fit, self.shape, self.damping, self.cg_iters = fit, shape, damping, cg_iters
        self.graphs = graphs and fit.device.type == "cuda"
        self.system_graph = self.solve_graph = None
        self.system = self.factors = None

    def __call__(self) -> None:
        fit = self.fit
        if not self.graphs:
            fit.gauss_newton_step(self.shape, self.damping, self.cg_iters)
            return
        if self.solve_graph is not None:
            self.system_graph.replay()
            for name, value in fit.gn_factor(self.system).items():
                self.factors[name].copy_(value)
            self.solve_graph.replay()
            return

        def first_step():  # the real first step, and the warm-up
            system = fit.gn_system(self.shape, self.damping)
            factors = fit.gn_factor(system)
            fit.gn_solve(system, factors, self.shape, self.cg_iters)
            return factors

        factors = _on_side_stream(first_step)
        try:
            def record_system():
                self.system = fit.gn_system(self.shape, self.damping)

            system_graph = _capture(record_system)
            self.factors = {name: torch.empty_like(value) for name, value in factors.items()}
            solve_graph = _capture(lambda: fit.gn_solve(self.system, self.factors, self.shape, self.cg_iters),
                                   pool=system_graph.pool())
            self.system_graph, self.solve_graph = system_graph, solve_graph
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
            warnings.warn(f"CUDA graph capture of the Gauss-Newton step failed ({exc}); running eagerly",
                          stacklevel=2)
            self.graphs, self.system, self.factors = False, None, None


def fit_batch(fit: BatchFit, config: Fit3dmmConfig, timer=None, progress=None) -> None:
    """Coarse to fine, in place on ``fit``'s parameters."""

    step = timer.step if timer is not None else None

    def run_gauss_newton(name, iters, shape):
        if iters <= 0:
            return
        gn_step = GaussNewtonStep(fit, shape, config.damping, config.cg_iters, config.cuda_graphs and iters > 2)
        with step(name, iters * len(fit.target)) if step else nullcontext():
            for i in range(iters):
                if shape and config.adapt_noise and i > 0 and i % max(1, iters // 4) == 0:
                    fit.update_landmark_noise()
                gn_step()
                if progress is not None:
                    progress(name, i + 1, iters)

    run_gauss_newton("rigid", config.rigid_iters, shape=False)
    run_gauss_newton("landmarks", config.iters, shape=True)
    if config.landmarks_only or config.photo_iters <= 0:
        return
    photo = PhotometricTerm(fit, config)
    params = [(fit.rot, 0.01), (fit.trans, 1.5), (fit.id, 0.06), (fit.exp, 0.03), (fit.light, 0.05),
              (fit.albedo_gain, 0.03)]
    if fit.albedo_coeffs is not None:
        params.append((fit.albedo_coeffs, 0.05))
    iters = config.photo_iters
    # decay to 5% of the initial rates: large steps find the basin, small ones settle in it
    adam = DeviceAdam(params, config.lr, gamma=0.05 ** (1.0 / max(1, iters)))

    def iteration():
        loss = (config.w_photo * photo.loss() + fit.landmark_loss() + fit.prior_loss()
                + fit.smooth_loss(with_light=True))
        adam.step(torch.autograd.grad(loss, adam.params))
        fit.project_constraints()

    # sampled pixels have fixed shapes, so the iterations between re-rasterizations replay as a graph
    graphs = config.cuda_graphs and fit.device.type == "cuda" and config.photo_samples > 0 and iters > 2
    iterate = CapturedCall(iteration) if graphs else iteration
    with step("photometric", iters * len(fit.target)) if step else nullcontext():
        for i in range(iters):
            if i % max(1, config.raster_every) == 0:
                photo.resample()
            elif config.photo_samples > 0 and i % max(1, config.sample_every) == 0:
                photo.resample(rasterize=False)
            iterate()
            if progress is not None:
                progress("photometric", i + 1, iters)


class DeviceAdam:
    """Adam (as ``torch.optim.Adam``) with an exponentially decaying learning rate, whose step count
    and rates live on the device: nothing on the host changes between steps, so a step can be part of
    a CUDA graph (``torch.optim.Adam`` with a scheduler changes host-side rates every step)."""

    def __init__(self, params_lrs, scale: float, gamma: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p, _ in params_lrs]
        device = self.params[0].device
        self.lrs = torch.tensor([lr * scale for _, lr in params_lrs], dtype=torch.float32, device=device)
        self.gamma, self.betas, self.eps = gamma, betas, eps
        self.count = torch.zeros((), dtype=torch.float32, device=device)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads) -> None:
        b1, b2 = self.betas
        self.count += 1
        correction1 = 1 - torch.pow(b1, self.count)
        root_correction2 = torch.sqrt(1 - torch.pow(b2, self.count))
        for k, (p, g, m, v) in enumerate(zip(self.params, grads, self.m, self.v)):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_((self.lrs[k] / correction1) * m / (v.sqrt() / root_correction2 + self.eps))
        self.lrs.mul_(self.gamma)


class CapturedCall:
    """Calls ``fn()`` (in-place updates of static tensors, fixed shapes, no host synchronisation)
    as a replayed CUDA graph. The first call runs eagerly on a side stream (the real first call, and
    the warm-up) and then records; later calls replay. If capture fails, it warns and stays eager."""

    def __init__(self, fn):
        self.fn, self.graph, self.eager = fn, None, False

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.eager:
            self.fn()
            return
        _on_side_stream(self.fn)
        try:
            self.graph = _capture(self.fn)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager calls
            warnings.warn(f"CUDA graph capture failed ({exc}); running eagerly", stacklevel=2)
            self.eager = True


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N,C,H,W] float images at size² (area when shrinking)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area" if images.shape[-1] > size else "bilinear")


class PhotometricTerm:
    """Robust colour difference between renders and frames over the model's face region.

    Renders only the face-region submesh (its own compact bases), at ``size``², and averages the
    robust per-pixel error per frame (over ``photo_samples`` random covered pixels, or all of them)
    and then over each clip's frames (a sum over clips, like the other losses).
    """

    def __init__(self, fit: BatchFit, config: Fit3dmmConfig, size: int | None = None, images=None):

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
        from avatarcli.render.rasterize import sample_visible_pixels

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
        last :meth:`resample`."""
        from avatarcli.camera import clip_from_camera, world_to_camera
        from avatarcli.render.mesh import shade_samples, shade_vertices
        from avatarcli.render.rasterize import barycentrics_from_corners, gather_corners, interpolate

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
        per_frame = (_robust(diff, PHOTO_DELTA) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        per_frame = per_frame * fit.frame_share
        return fit._clip_sum(per_frame) if per_clip else per_frame.sum()


# ------------------------------------------------------------------------------------------------
# outputs of a fitted batch


def batch_results(fit: BatchFit, config: Fit3dmmConfig) -> list[dict]:
    """Per clip: the arrays of a coeffs unit."""

    from avatarcli.camera import eg3d_camera

    with torch.no_grad():
        R, t = fit.rt()
        cam25 = eg3d_camera(R, t, fit.K[None].expand(len(R), 3, 3), fit.size)
        error = fit.landmark_residual_px().mean(1)
        idf = fit.identity_per_frame()
        albedo_all = fit.albedo()
        out = []
        start = 0
        for k, clip in enumerate(fit.clips):
            sl = slice(start, start + len(clip.lmk68))
            start = sl.stop
            err = error[sl].cpu().numpy().astype(np.float32)
            out.append({
                "name": clip.name, "fps": clip.fps,
                "identity": idf[sl].cpu().numpy().astype(np.float32),
                "expression": fit.exp[sl].cpu().numpy().astype(np.float32),
                "rotation": fit.rot[sl].cpu().numpy().astype(np.float32),
                "translation": fit.trans[sl].cpu().numpy().astype(np.float32),
                "lighting": fit.light[sl].cpu().numpy().astype(np.float32),
                "camera25": cam25[sl].cpu().numpy().astype(np.float32),
                "pose6": torch.cat([fit.rot[sl], fit.trans[sl]], -1).cpu().numpy().astype(np.float32),
                "intrinsics": fit.K[None].expand(sl.stop - sl.start, 3, 3).cpu().numpy().astype(np.float32),
                "lmk_error": err,
                "flagged": err > config.flag_px * fit.size / 256.0,
                "albedo": albedo_all[sl.start].cpu().numpy().astype(np.float32),
            })
    return out


UNIT_ARRAYS = ("identity", "expression", "rotation", "translation", "lighting", "camera25", "pose6", "intrinsics",
               "lmk_error", "flagged", "albedo")


def write_unit(group: h5py.Group, result: dict, crop_size: int) -> None:
    for name in UNIT_ARRAYS:
        group.create_dataset(name, data=result[name])
    group.attrs.update({"clip_id": result["name"], "fps": result["fps"], "crop_size": crop_size})


# ------------------------------------------------------------------------------------------------
# previews


def write_preview(path: Path, fit: BatchFit, clip_index: int, rows: int) -> None:
    """PNG grid: input | landmarks (green: target, red: fit) | shaded render | overlay."""
    from PIL import Image, ImageDraw

    from avatarcli.render.mesh import render_mesh

    clip = fit.clips[clip_index]
    start = sum(len(c.lmk68) for c in fit.clips[:clip_index])
    count = len(clip.lmk68)
    picks = np.unique(np.linspace(0, count - 1, min(rows, count)).round().astype(int))
    frames = torch.as_tensor(picks + start, device=fit.device)
    with torch.no_grad():
        R, t = fit.rt()
        light = fit.light[frames].clone()
        if not light.any():  # landmark-only fits have no light: a fixed key light shows the shape
            light[:, 1], light[:, 2], light[:, 3] = 0.15, 0.2, -0.1
        render = render_mesh(fit.vertices(frames), fit.model.faces.to(fit.device), R[frames], t[frames], fit.K,
                             fit.size, fit.albedo(frames), light)
        shaded = (render.rgb.clamp(0, 1) * 255).round().byte().cpu().numpy()
        mask = render.mask.cpu().numpy()
        fitted = fit.landmarks_2d()[frames].cpu().numpy()
    size = fit.size
    grid = Image.new("RGB", (4 * size, len(picks) * size))
    for row, local in enumerate(picks):
        image = clip.frames[local] if clip.frames is not None else np.zeros((size, size, 3), np.uint8)
        marks = Image.fromarray(image)
        draw = ImageDraw.Draw(marks)
        for (x, y), colour in [(p, (0, 255, 0)) for p in clip.lmk68[local]] + [(p, (255, 0, 0)) for p in fitted[row]]:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
        overlay = image.copy()
        overlay[mask[row]] = (0.5 * image[mask[row]] + 0.5 * shaded[row][mask[row]]).astype(np.uint8)
        for col, tile in enumerate([Image.fromarray(image), marks, Image.fromarray(shaded[row]), Image.fromarray(overlay)]):
            grid.paste(tile, (col * size, row * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ------------------------------------------------------------------------------------------------
# orchestration


def read_clip_inputs(handle: h5py.File, names: list[str], with_frames: bool,
                     reader=None) -> tuple[list[ClipInput], list[tuple[str, str]]]:
    """Landmarks (and frames, inflated in threads by ``reader``, a :class:`FrameReader`) of clips."""
    from avatarcli.artifact import FrameReader

    if with_frames and reader is None:
        with closing(FrameReader()) as own:
            return read_clip_inputs(handle, names, with_frames, own)
    clips, skipped = [], []
    for name in names:
        group = handle["clips"][name]
        validate_unit(group, CLIPS, label=handle.filename)
        lmk = group["lmk68"][()].astype(np.float32)
        landmarked = group["landmarked"][()]
        if len(lmk) == 0 or not landmarked.any():
            skipped.append((name, "no landmarks (the landmark model never ran on this clip)"))
            continue
        if not np.isfinite(lmk).all():
            skipped.append((name, "landmarks contain NaN or infinite values"))
            continue
        weights = np.where(landmarked, 1.0, 0.5).astype(np.float32)  # interpolated landmarks count less
        frames = reader.read(group["frames"], 0, len(group["frames"])) if with_frames else None
        clips.append(ClipInput(name, lmk, weights, float(group.attrs["fps"]), frames))
    return clips, skipped


def plan_batches(names: list[str], lengths: list[int], batch_frames: int) -> list[list[str]]:
    batches, current, size = [], [], 0
    for name, length in zip(names, lengths):
        if current and size + length > batch_frames:
            batches.append(current)
            current, size = [], 0
        current.append(name)
        size += length
    if current:
        batches.append(current)
    return batches


def batch_key(names: list[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


def run(config: Fit3dmmConfig, clips_path: str | Path, output: str | Path, progress=None) -> FitSummary:
    """Fit every clip of ``clips_path``; write a coeffs artifact to ``output``.

    ``progress``: optional object with ``start(total_units, done_units)``, ``advance_frames(n)`` and
    ``unit_done(name, status, reason)`` (``avatarcli.cli.common.StageProgress``).
    """

    from concurrent.futures import ThreadPoolExecutor

    from avatarcli.artifact import FrameReader
    from avatarcli.facemodel import load_face_model
    from avatarcli.timing import StepTimer

    started = time.perf_counter()
    clips_path, output = Path(clips_path), Path(output)
    if (min(config.rigid_iters, config.iters, config.photo_iters, config.photo_samples) < 0
            or config.batch_frames < 1 or config.photo_size < 16):
        raise AvatarError("iterations and --photo-samples must be >= 0, --batch-frames >= 1 and --photo-size >= 16")
    if not clips_path.exists():
        raise AvatarError(f"input not found: {clips_path}")
    device = resolve_device(config.device)
    model = load_face_model(config.face_model, config.models_dir).to(device, torch.float32)
    input_sha = sha256_file(clips_path)
    with open_artifact(clips_path, CLIPS.kind) as handle:
        crop_size = int(handle.attrs["crop_size"])
        names = read_strings(handle["index/clip_id"])
        lengths = [int(n) for n in handle["index/num_frames"][()]]
    batches = plan_batches(names, lengths, config.batch_frames)

    parts_dir = output.with_name(output.name + ".parts")
    stamp = {"result_hash": config.result_hash(), "input_sha256": input_sha, "face_model_sha256": model.sha256}
    if parts_dir.exists():
        old = json.loads((parts_dir / "config.json").read_text()) if (parts_dir / "config.json").exists() else {}
        if old != stamp:
            if not config.overwrite:
                raise AvatarError(f"{parts_dir} holds a run with other settings or input; use --overwrite or delete it")
            shutil.rmtree(parts_dir)
    if output.exists() and not config.overwrite:
        try:
            with open_artifact(output, COEFFS.kind) as old_out:
                same = json.loads(old_out.attrs["config_json"]).get("result_hash") == config.result_hash()
        except AvatarError:
            same = False
        if not same:
            raise AvatarError(f"{output} exists and was made with other settings; use --overwrite or choose another output")
    parts_dir.mkdir(parents=True, exist_ok=True)
    (parts_dir / "config.json").write_text(json.dumps(stamp))

    sync = (lambda: torch.cuda.current_stream().synchronize()) if device.startswith("cuda") else None
    timer = StepTimer(sync)
    done = {b: parts_dir / f"{batch_key(b)}.h5" for b in map(tuple, batches)}
    finished = {b for b, part in done.items() if _part_ok(part)}
    if progress is not None:
        progress.start(total_units=len(names), done_units=sum(len(b) for b in finished))
    frames_now = 0
    todo = [b for b in map(tuple, batches) if b not in finished]
    with_frames = not config.landmarks_only or bool(config.preview)
    reader, prefetch = FrameReader(), ThreadPoolExecutor(max_workers=1)
    with open_artifact(clips_path, CLIPS.kind) as handle, closing(reader), prefetch:

        def load(batch):  # in the prefetch thread: batch k+1 is read while batch k is fitted
            with timer.step("read", sync=False):
                return read_clip_inputs(handle, list(batch), with_frames, reader)

        pending = prefetch.submit(load, todo[0]) if todo else None
        for k, batch in enumerate(todo):
            inputs, skipped = pending.result()
            if k + 1 < len(todo):
                pending = prefetch.submit(load, todo[k + 1])
            results = []
            fit = None
            if inputs:
                fit = BatchFit(model, inputs, crop_size, config, torch.device(device))
                fit_batch(fit, config, timer)
                results = batch_results(fit, config)
                frames_now += sum(len(c.lmk68) for c in inputs)
            _write_part(done[batch], results, skipped, crop_size)
            if config.preview and fit is not None:
                with timer.step("preview"):
                    for index, clip in enumerate(fit.clips):
                        write_preview(Path(config.preview) / f"{clip.name}.png", fit, index, config.preview_frames)
            if progress is not None:
                progress.advance_frames(sum(len(c.lmk68) for c in inputs))
                for r in results:
                    progress.unit_done(r["name"], "ok", f"{float(r['lmk_error'].mean()):.2f} px")
                for name, reason in skipped:
                    progress.unit_done(name, "skipped", reason)

    with timer.step("assemble", sync=False):
        summary = _assemble(output, [done[b] for b in map(tuple, batches)], config, model, clips_path, input_sha, crop_size)
    if not config.keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return FitSummary(output=output, frames_now=frames_now, seconds=time.perf_counter() - started,
                      reused=sum(len(b) for b in finished), timings=timer.as_dict(), device=device, **summary)


def _part_ok(part: Path) -> bool:
    try:
        with h5py.File(part, "r") as handle:
            return int(handle.attrs.get("part_version", 0)) == PART_VERSION and "done" in handle.attrs
    except Exception:
        return False


def _write_part(path: Path, results: list[dict], skipped: list[tuple[str, str]], crop_size: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with create_h5(tmp) as handle:
            units = handle.create_group("coeffs")
            for result in results:
                write_unit(units.create_group(result["name"]), result, crop_size)
            write_strings(handle, "skipped_clip_id", [n for n, _ in skipped])
            write_strings(handle, "skipped_reason", [r for _, r in skipped])
            handle.attrs["part_version"] = PART_VERSION
            handle.attrs["done"] = True
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _assemble(output: Path, parts: list[Path], config: Fit3dmmConfig, model, clips_path: Path, input_sha: str,
              crop_size: int) -> dict:
    config_json = {**asdict(config), "result_hash": config.result_hash(), "kind": COEFFS.kind,
                   "face_model_description": model.describe() if hasattr(model, "describe") else model.name}
    names, frames, errors, skipped = [], [], [], []
    flagged = 0
    with ArtifactWriter(output, COEFFS, config_json, [(str(clips_path.resolve()), input_sha)],
                        extra_attrs={"face_model": model.name, "face_model_sha256": model.sha256 or "",
                                     "crop_size": crop_size}) as writer:
        units = writer.handle.create_group("coeffs", track_order=True)
        for part in parts:
            with h5py.File(part, "r") as src:
                for name in src["coeffs"]:
                    src.copy(src["coeffs"][name], units, name=name)
                    err = src["coeffs"][name]["lmk_error"][()]
                    names.append(name)
                    frames.append(len(err))
                    errors.append(float(err.mean()))
                    flagged += int(src["coeffs"][name]["flagged"][()].sum())
                skipped += list(zip(read_strings(src["skipped_clip_id"]), read_strings(src["skipped_reason"])))
        index = writer.handle.create_group("index")
        write_strings(index, "clip_id", names)
        index.create_dataset("num_frames", data=np.asarray(frames, np.int32).reshape(-1))
        index.create_dataset("lmk_error", data=np.asarray(errors, np.float32).reshape(-1))
        skip = writer.handle.create_group("skipped")
        write_strings(skip, "clip_id", [n for n, _ in skipped])
        write_strings(skip, "reason", [r for _, r in skipped])
    total = int(sum(frames))
    mean_err = float(np.average(errors, weights=frames)) if frames else float("nan")
    return {"clips": len(names), "frames": total, "skipped": skipped, "flagged": flagged, "lmk_error": mean_err}


# ------------------------------------------------------------------------------------------------
# evaluation against synthetic ground truth


def synthetic_errors(clips_path: str | Path, coeffs_path: str | Path, face_model: str = "ict",
                     models_dir: str | None = None) -> dict:
    """Errors of a fit against the ``truth/*`` of a synthetic clips artifact (``avatar synth``).

    Vertex error: mean Euclidean distance (mm) over the face region between the fitted and true
    meshes in model space (identity + expression, pose removed), over all frames; no alignment (the
    headline number). ``vertex_error_mm_similarity_aligned``: the same after a per-frame similarity
    (scale, rotation, translation) alignment of the fitted to the true face region, which forgives
    the depth-versus-size ambiguity of a single calibrated camera (for comparison with NoW-style
    numbers only). Expression:
    mean absolute error per channel. Pose: mean absolute rotation error (degrees).
    """

    from avatarcli.facemodel import load_face_model

    model = load_face_model(face_model, models_dir).to("cpu", torch.float32)
    region = model.face_region
    vertex_errors, aligned_errors, exp_abs, rot_abs, frames = [], [], [], [], 0
    with open_artifact(clips_path, CLIPS.kind) as clips, open_artifact(coeffs_path, COEFFS.kind) as coeffs:
        for name in read_strings(coeffs["index/clip_id"]):
            truth = clips["clips"][name]["truth"]
            fit = coeffs["coeffs"][name]
            id_true = torch.as_tensor(truth["identity"][()])[None]
            exp_true = torch.as_tensor(truth["expression"][()])
            id_fit = torch.as_tensor(fit["identity"][()])
            exp_fit = torch.as_tensor(fit["expression"][()])
            v_true = model.vertices(id_true.expand(len(exp_true), -1), exp_true)[:, region]
            v_fit = model.vertices(id_fit, exp_fit)[:, region]
            vertex_errors.append((v_fit - v_true).norm(dim=-1).mean(1))
            aligned_errors.append((_similarity_align(v_fit, v_true) - v_true).norm(dim=-1).mean(1))
            exp_abs.append((exp_fit - exp_true).abs())
            rot_abs.append((torch.as_tensor(fit["rotation"][()]) - torch.as_tensor(truth["pose6"][()][:, :3])).abs())
            frames += len(exp_true)
    vertex = torch.cat(vertex_errors)
    aligned = torch.cat(aligned_errors)
    exp = torch.cat(exp_abs)
    rot = torch.cat(rot_abs)
    names = model.exp_names or [f"exp{i}" for i in range(exp.shape[1])]
    return {
        "frames": frames,
        "vertex_error_mm": {"mean": float(vertex.mean()), "median": float(vertex.median()), "max": float(vertex.max())},
        # secondary number, as NoW-style benchmarks report it: after a per-frame similarity alignment
        "vertex_error_mm_similarity_aligned": {"mean": float(aligned.mean()), "median": float(aligned.median()),
                                               "max": float(aligned.max())},
        "expression_mae_per_channel": {n: float(v) for n, v in zip(names, exp.mean(0))},
        "expression_mae_mean": float(exp.mean()),
        "rotation_error_deg": {k: float(v) for k, v in zip(("pitch", "yaw", "roll"), torch.rad2deg(rot.mean(0)))},
    }


def _similarity_align(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``source`` [B,N,3] moved by the per-batch similarity (Umeyama) that best fits ``target``."""
    mu_s, mu_t = source.mean(1, keepdim=True), target.mean(1, keepdim=True)
    xs, xt = (source - mu_s).double(), (target - mu_t).double()
    u, sigma, vh = torch.linalg.svd(xt.transpose(1, 2) @ xs)
    sign = torch.ones_like(sigma)
    sign[:, -1] = torch.sign(torch.linalg.det(u @ vh))
    rotation = u @ torch.diag_embed(sign) @ vh
    scale = (sigma * sign).sum(1) / xs.pow(2).sum((1, 2))
    moved = scale[:, None, None] * xs @ rotation.transpose(1, 2)
    return (moved + mu_t.double()).to(source.dtype)
