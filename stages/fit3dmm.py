"""Stage ``fit-3dmm``: clips -> per-frame 3D morphable model parameters (coeffs artifact).

check inputs -> prepare (face model, batches of whole clips) -> compute (coarse to fine, all frames
of a batch at once: rigid pose on landmarks, then identity and expression on landmarks, then
photometric refinement with lighting and albedo) -> write (a part file per batch, then an atomic
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
from contextlib import nullcontext
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


@dataclass
class Fit3dmmConfig:
    """Settings of ``avatar fit-3dmm``. All but the last group change the result."""

    face_model: str = "ict"
    """Face model: 'ict' (ICT-FaceKit, default), 'bfm' (user-supplied BFM_model_front.mat) or a file path."""
    focal: float = 1160.0
    """Focal length in pixels for a 256² crop (scaled with the crop size); ~12.6° field of view."""
    rigid_iters: int = 60
    """Iterations of the first stage: rotation and translation on landmarks."""
    iters: int = 150
    """Iterations of the second stage: + identity and expression on landmarks."""
    photo_iters: int = 100
    """Iterations of the photometric stage (0 or --landmarks-only skips it)."""
    landmarks_only: bool = False
    """Fit landmarks only: no rendering, lighting or albedo (albedo is the model's mean)."""
    photo_size: int = 128
    """Side of the renders compared with the (downsampled) frames in the photometric stage."""
    raster_every: int = 5
    """Photometric stage: re-rasterize (visibility) every N iterations; between them the visible
    triangles are kept and only barycentrics, shading and colours are recomputed (differentiably)."""
    lr: float = 1.0
    """Scale of every learning rate (Adam)."""
    w_landmarks: float = 1.0
    """Weight of the robust landmark term (per point, in px at 256²)."""
    w_photo: float = 500.0
    """Weight of the robust photometric term (colour in 0..1)."""
    w_identity: float = 0.005
    """Weight of the identity prior (squared coefficients over their std)."""
    w_expression: float = 0.005
    """Weight of the expression prior (L1 for blendshape weights, squared for PCA coefficients)."""
    w_smooth: float = 2.0
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

    def result_fields(self) -> dict:
        skip = {"models_dir", "device", "preview", "preview_frames", "overwrite", "keep_parts"}
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
    """Parameters and losses of one batch of whole clips (frames of all clips concatenated)."""

    def __init__(self, model, clips: list[ClipInput], crop_size: int, config: Fit3dmmConfig, device):

        from avatarcli.camera import intrinsics_matrix

        self.model, self.config, self.device, self.size = model, config, device, crop_size
        self.clips = clips
        counts = [len(c.lmk68) for c in clips]
        self.clip_of_frame = torch.repeat_interleave(torch.arange(len(clips), device=device),
                                                     torch.tensor(counts, device=device))
        # frame pairs (t, t+1) inside the same clip, for smoothness
        same = (self.clip_of_frame[1:] == self.clip_of_frame[:-1])
        self.pairs = torch.nonzero(same).squeeze(1)
        frames = sum(counts)
        f32 = dict(device=device, dtype=torch.float32)
        self.target = torch.as_tensor(np.concatenate([c.lmk68 for c in clips]), **f32)  # [T,68,2]
        self.frame_weight = torch.as_tensor(np.concatenate([c.weights for c in clips]), **f32)
        point_weight = torch.ones(68, **f32)
        point_weight[list(JAW)] = 0.3
        self.point_weight = point_weight
        self.px_scale = 256.0 / crop_size  # losses in px at 256² whatever the crop size
        focal = config.focal * crop_size / 256.0
        self.K = intrinsics_matrix(focal, crop_size / 2.0, crop_size / 2.0).to(**f32)[0]
        # landmark-only geometry: the 68 rows of the bases
        lmk = model.lmk68.to(device)
        self.lmk_mean = model.mean[lmk].to(**f32)
        self.lmk_id = model.id_basis[:, lmk].to(**f32)
        self.lmk_exp = model.exp_basis[:, lmk].to(**f32)
        self.unit_exp = model.exp_range == "unit"
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

    def landmarks_2d(self):
        """[T,68,2] projected model landmarks."""
        from avatarcli.camera import project, world_to_camera

        idf = self.identity_per_frame()
        pts = self.lmk_mean + torch.einsum("tk,kvc->tvc", idf, self.lmk_id) + torch.einsum("tk,kvc->tvc", self.exp, self.lmk_exp)
        R, t = self.rt()
        return project(world_to_camera(pts, R, t), self.K)

    def landmark_residual_px(self):
        """[T,68] Euclidean landmark error in crop pixels."""
        return (self.landmarks_2d() - self.target).norm(dim=-1)

    # -- losses
    def landmark_loss(self):
        err = (self.landmarks_2d() - self.target) * self.px_scale
        per_point = _robust(err.norm(dim=-1), 2.0) * self.point_weight
        return (per_point.mean(1) * self.frame_weight).sum() / self.frame_weight.sum().clamp(min=1e-6)

    def prior_loss(self):
        config = self.config
        loss = config.w_identity * ((self.id / self.model.id_std.to(self.id)) ** 2).sum(1).mean()
        if self.unit_exp:
            loss = loss + config.w_expression * self.exp.abs().sum(1).mean()
        else:
            std = self.model.exp_std.to(self.exp) if self.model.exp_std is not None else 1.0
            loss = loss + config.w_expression * ((self.exp / std) ** 2).sum(1).mean()
        return loss

    def smooth_loss(self, with_light: bool = False):
        if len(self.pairs) == 0:
            return self.exp.sum() * 0
        p = self.pairs
        d_exp = (self.exp[p + 1] - self.exp[p]).pow(2).sum(1).mean()
        d_rot = (self.rot[p + 1] - self.rot[p]).pow(2).sum(1).mean() * 100.0  # ~0.1 rad ~ 1 unit
        d_trans = (self.trans[p + 1] - self.trans[p]).pow(2).sum(1).mean() / 100.0  # 10 mm ~ 1 unit
        loss = d_exp + d_rot + d_trans
        if with_light:
            loss = loss + (self.light[p + 1] - self.light[p]).pow(2).sum((1, 2)).mean()
        return self.config.w_smooth * loss

    def project_constraints(self):

        with torch.no_grad():
            if self.unit_exp:
                self.exp.clamp_(0.0, 1.0)
            self.trans[:, 2].clamp_(min=50.0)

    # -- full mesh
    def vertices(self, frames=None):
        idf = self.identity_per_frame()
        exp = self.exp
        if frames is not None:
            idf, exp = idf[frames], exp[frames]
        return self.model.vertices(idf, exp)

    def albedo(self, frames=None):
        """[T,V,3] per-vertex albedo of each frame's clip."""
        clip = self.clip_of_frame if frames is None else self.clip_of_frame[frames]
        if self.albedo_coeffs is not None:
            base = self.model.albedo(self.albedo_coeffs, self.albedo_coeffs.shape[0])  # [C,V,3]
        else:
            base = self.model.albedo_mean.to(self.id)[None].expand(len(self.clips), -1, -1)
        return (base * self.albedo_gain[:, None, :])[clip]


def _adam(params_lrs, scale):

    return torch.optim.Adam([{"params": [p], "lr": lr * scale} for p, lr in params_lrs])


def fit_batch(fit: BatchFit, config: Fit3dmmConfig, timer=None, progress=None) -> None:
    """Coarse to fine, in place on ``fit``'s parameters."""

    step = timer.step if timer is not None else None

    def run_stage(name, iters, params_lrs, loss_fn):
        if iters <= 0:
            return
        opt = _adam(params_lrs, config.lr)
        # decay to 5% of the initial rates: large steps find the basin, small ones settle in it
        decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.05 ** (1.0 / max(1, iters)))
        ctx = step(name, iters * len(fit.target)) if step else nullcontext()
        with ctx:
            for i in range(iters):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(i)
                loss.backward()
                opt.step()
                decay.step()
                fit.project_constraints()
                if progress is not None:
                    progress(name, i + 1, iters)

    run_stage("rigid", config.rigid_iters, [(fit.rot, 0.02), (fit.trans, 5.0)],
              lambda i: fit.landmark_loss() + fit.smooth_loss())
    run_stage("landmarks", config.iters, [(fit.rot, 0.01), (fit.trans, 2.0), (fit.id, 0.05), (fit.exp, 0.02)],
              lambda i: fit.landmark_loss() + fit.prior_loss() + fit.smooth_loss())
    if config.landmarks_only or config.photo_iters <= 0:
        return
    photo = PhotometricTerm(fit, config)
    params = [(fit.rot, 0.01), (fit.trans, 1.5), (fit.id, 0.06), (fit.exp, 0.03), (fit.light, 0.05),
              (fit.albedo_gain, 0.03)]
    if fit.albedo_coeffs is not None:
        params.append((fit.albedo_coeffs, 0.05))
    run_stage("photometric", config.photo_iters, params,
              lambda i: config.w_photo * photo.loss(i) + fit.landmark_loss() + fit.prior_loss()
              + fit.smooth_loss(with_light=True))


class PhotometricTerm:
    """Robust colour difference between renders and frames over the model's face region."""

    def __init__(self, fit: BatchFit, config: Fit3dmmConfig):

        self.fit, self.config = fit, config
        model = fit.model
        region = torch.zeros(model.num_vertices, dtype=torch.bool, device=fit.device)
        region[model.face_region.to(fit.device)] = True
        faces = model.faces.to(fit.device)
        self.faces = faces[region[faces].all(1)]  # only face-region triangles are rendered
        size = config.photo_size
        frames = np.concatenate([c.frames for c in fit.clips])
        images = torch.as_tensor(frames, device=fit.device).permute(0, 3, 1, 2).float() / 255.0
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="area" if images.shape[-1] > size else "bilinear")
        self.images = images.permute(0, 2, 3, 1).contiguous()  # [T,size,size,3]
        self.K = fit.K.clone()
        self.K[:2] *= size / fit.size
        self.raster = None

    def loss(self, iteration: int):

        from avatarcli.camera import clip_from_camera, world_to_camera
        from avatarcli.render.mesh import shade_vertices
        from avatarcli.render.rasterize import interpolate, rasterize

        fit, size = self.fit, self.config.photo_size
        verts = fit.vertices()
        R, t = fit.rt()
        cam = world_to_camera(verts, R, t)
        clip = clip_from_camera(cam, self.K, size, 10.0, 1e5)
        if self.raster is None or iteration % max(1, self.config.raster_every) == 0:
            self.raster = rasterize(clip.detach(), self.faces, size, size, cull_backfaces=True)
        colour = shade_vertices(cam, fit.model.faces.to(fit.device), fit.albedo(), fit.light)
        rgb = interpolate(colour, self.raster, self.faces, clip_pos=clip)
        mask = self.raster.mask
        diff = (rgb - self.images).norm(dim=-1)[mask]
        if diff.numel() == 0:
            return verts.sum() * 0
        return _robust(diff, 0.1).mean()


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


def read_clip_inputs(handle: h5py.File, names: list[str], with_frames: bool) -> tuple[list[ClipInput], list[tuple[str, str]]]:
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
        frames = group["frames"][()] if with_frames else None
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

    from avatarcli.facemodel import load_face_model
    from avatarcli.timing import StepTimer

    started = time.perf_counter()
    clips_path, output = Path(clips_path), Path(output)
    if min(config.rigid_iters, config.iters, config.photo_iters) < 0 or config.batch_frames < 1 or config.photo_size < 16:
        raise AvatarError("iterations must be >= 0, --batch-frames >= 1 and --photo-size >= 16")
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
    with open_artifact(clips_path, CLIPS.kind) as handle:
        for batch in map(tuple, batches):
            if batch in finished:
                continue
            with timer.step("read", sync=False):
                inputs, skipped = read_clip_inputs(handle, list(batch), with_frames=not config.landmarks_only or bool(config.preview))
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
                    for k, clip in enumerate(fit.clips):
                        write_preview(Path(config.preview) / f"{clip.name}.png", fit, k, config.preview_frames)
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
    meshes in model space (identity + expression, pose removed), over all frames. Expression:
    mean absolute error per channel. Pose: mean absolute rotation error (degrees).
    """

    from avatarcli.facemodel import load_face_model

    model = load_face_model(face_model, models_dir).to("cpu", torch.float32)
    region = model.face_region
    vertex_errors, exp_abs, rot_abs, frames = [], [], [], 0
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
            exp_abs.append((exp_fit - exp_true).abs())
            rot_abs.append((torch.as_tensor(fit["rotation"][()]) - torch.as_tensor(truth["pose6"][()][:, :3])).abs())
            frames += len(exp_true)
    vertex = torch.cat(vertex_errors)
    exp = torch.cat(exp_abs)
    rot = torch.cat(rot_abs)
    names = model.exp_names or [f"exp{i}" for i in range(exp.shape[1])]
    return {
        "frames": frames,
        "vertex_error_mm": {"mean": float(vertex.mean()), "median": float(vertex.median()), "max": float(vertex.max())},
        "expression_mae_per_channel": {n: float(v) for n, v in zip(names, exp.mean(0))},
        "expression_mae_mean": float(exp.mean()),
        "rotation_error_deg": {k: float(v) for k, v in zip(("pitch", "yaw", "roll"), torch.rad2deg(rot.mean(0)))},
    }
