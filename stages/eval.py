"""Stage ``eval``: generated vs reference artifacts -> protocol-stamped metrics (eval artifact).

check inputs (kinds, metrics, models, clip pairs, frame counts) -> prepare (models) -> compute
(per clip pair, batches of frame pairs on the device: image metrics, face analysis (detector ->
5 points and 68 landmarks), identity embeddings; then landmark-only face-model fits of all
analysed clips, batched, for AED/APD and the face region) -> write (a part file per clip pair,
then an atomic eval artifact with per-frame values, per-clip and overall means, and the protocol).

Metrics (values per frame pair; a frame where a metric cannot be computed is *excluded* with a
reason, never scored 0):

* ``psnr``, ``ssim`` (:mod:`avatarcli.metrics.image`), on the frame or on the face region (the
  reference fit's face-region triangles rasterized at the evaluated resolution);
* ``lpips`` (AlexNet, v0.1; :mod:`avatarcli.metrics.lpips`);
* ``csim``: cosine of ArcFace-family embeddings of 5-point aligned 112² crops; same-id: generated
  frame t vs reference frame t; cross-id: generated frame t vs the source clip's frame ``source_frame``;
* ``akd``: mean Euclidean distance of the 68 landmarks (px at the evaluated resolution);
* ``aed``: mean absolute difference of the expression coefficients;
* ``apd``: mean absolute difference of the pose: (pitch, yaw, roll) in radians, and with
  ``angles+translation`` also (tx, ty, tz) in decimetres (Deep3DFaceRecon's unit), over 3 or 6 values.

Inputs may be clips artifacts (frames) or coeffs artifacts (fits: only aed/apd). Frames are
paired by clip (same clip id, or ``--pairs``) and index; a reference of another size is resized
to the generated size (antialiased bilinear) and the protocol says so.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from avatarcli.artifact import ArtifactWriter, open_artifact, read_kind, read_strings, write_strings
from avatarcli.devices import resolve_device
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file
from avatarcli.schemas import CLIPS, COEFFS, EVAL
from stages.fit3dmm import Fit3dmmConfig

READS = (CLIPS.kind, COEFFS.kind)
WRITES = EVAL.kind
PART_VERSION = 1

METRICS = ("psnr", "ssim", "lpips", "csim", "akd", "aed", "apd")
IMAGE_METRICS = ("psnr", "ssim", "lpips")
FACE_METRICS = ("csim", "akd")
COEFF_METRICS = ("aed", "apd")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "csim": True, "akd": False, "aed": False, "apd": False}

# Exclusion reasons (row 0 = included). Stored as a table in the artifact.
REASONS = (
    "",
    "no face detected in the generated frame",
    "no face detected in the reference frame",
    "no face detected in the source frame",
    "the face region of the reference fit is empty in this frame",
    "no coefficients for this frame (clip could not be fitted)",
)
(INCLUDED, NO_FACE_GEN, NO_FACE_REF, NO_FACE_SRC, EMPTY_REGION, NO_FIT) = range(len(REASONS))
DECIMETRE_MM = 100.0


@dataclass
class EvalConfig:
    """Settings of ``avatar eval``. All but the last group change the result."""

    metrics: tuple[str, ...] = ()
    """Metrics to compute; empty = every metric the inputs and the local models allow."""
    mode: str = "same-id"
    """'same-id' (CSIM against the reference frame) or 'cross-id' (against the source clip)."""
    region: str = "frame"
    """'frame' or 'face' (PSNR/SSIM/LPIPS inside the reference fit's face region; LPIPS masks outside pixels to black)."""
    apd: str = "angles+translation"
    """APD convention: 'angles' or 'angles+translation'."""
    csim_model: str = "auto"
    """Face-recognition model for CSIM: a registry name, or 'auto' (arcface_r50 when present, else the
    mobilefacenet_arcface stand-in)."""
    detector: str = "scrfd_2.5g"
    """Face detector (registry name) giving the 5 points and boxes on evaluated frames."""
    landmark_model: str = "pfld68"
    """68-point landmark model (registry name) for AKD and the landmark fits."""
    det_size: int = 320
    """Detector input side; frames are padded by ``det_pad`` of their side first."""
    det_pad: float = 0.25
    """Border added around each frame before detection (tight crops are otherwise missed)."""
    det_threshold: float = 0.5
    """Detector score threshold."""
    source_frame: int = 0
    """Cross-id: frame of the source clip whose embedding CSIM compares with."""
    face_model: str = "ict"
    """Face model of the landmark fits (AED/APD of clips inputs, --region face)."""
    fit_rigid_iters: int = Fit3dmmConfig.rigid_iters
    """Gauss-Newton steps of the rigid stage of the landmark fits (fit-3dmm's default)."""
    fit_iters: int = Fit3dmmConfig.iters
    """Gauss-Newton steps of the identity + expression stage of the landmark fits (fit-3dmm's default)."""
    fit_identity_weight: float = 0.03
    """Identity prior weight of the landmark fits. Stronger than fit-3dmm's default: with the
    weak prior, 0.01 px of landmark noise moved the fitted depth by ~15 mm (depth and face size
    trade off on 2-D landmarks), which made APD depend on the device's rounding."""
    strict: bool = False
    """Error out (instead of warning) on clips without a partner and on mismatched frame counts."""
    # -- not part of the result
    batch: int = 64
    """Frame pairs per device batch."""
    fit_batch_frames: int = 16384
    """Frames per landmark-fit batch (whole clips)."""
    models_dir: str | None = None
    """Folder searched first for model files."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    overwrite: bool = False
    """Replace an output (or parts) made with other settings."""

    def result_fields(self) -> dict:
        skip = {"batch", "fit_batch_frames", "models_dir", "device", "overwrite"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class Side:
    """One input artifact: its kind, clips and their frame counts (and, once read, its content hash)."""

    path: Path
    kind: str
    clips: dict[str, int]
    size: int | None
    face_model: str | None = None
    face_model_sha256: str = ""
    sha256: str = ""


@dataclass
class PairPlan:
    generated: str
    reference: str
    source: str
    frames: int


@dataclass
class EvalSummary:
    output: Path
    summary: dict
    seconds: float
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# check inputs


def _open_side(path: str | Path, role: str) -> Side:
    path = Path(path)
    if not path.exists():
        raise AvatarError(f"{role} artifact not found: {path}")
    kind = read_kind(path)
    if kind not in READS:
        raise AvatarError(f"{path}: a {kind!r} artifact cannot be evaluated; give a clips or coeffs artifact")
    with open_artifact(path, kind) as handle:
        names = read_strings(handle["index/clip_id"])
        counts = [int(n) for n in handle["index/num_frames"][()]]
        size = int(handle.attrs["crop_size"]) if kind == CLIPS.kind else None
        face_model = str(handle.attrs["face_model"]) if kind == COEFFS.kind else None
        face_sha = str(handle.attrs.get("face_model_sha256", "")) if kind == COEFFS.kind else ""
    return Side(path, kind, dict(zip(names, counts)), size, face_model, face_sha)


def read_pairs_file(path: str | Path) -> list[tuple[str, str, str]]:
    """CSV rows ``generated,reference[,source]`` (a header row naming those columns is skipped)."""
    path = Path(path)
    if not path.exists():
        raise AvatarError(f"--pairs file not found: {path}")
    rows = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if number == 1 and row[0].lower() == "generated":
                continue
            if len(row) not in (2, 3) or not row[0] or not row[1]:
                raise AvatarError(f"{path}:{number}: expected 'generated,reference[,source]', got {','.join(row)!r}")
            rows.append((row[0], row[1], row[2] if len(row) == 3 else ""))
    if not rows:
        raise AvatarError(f"{path}: no pairs")
    return rows


def plan_pairs(config: EvalConfig, gen: Side, ref: Side, source: Side | None,
               pairs: list[tuple[str, str, str]] | None, warnings: list[str]) -> list[PairPlan]:
    def problem(message: str) -> None:
        if config.strict:
            raise AvatarError(message + " (--strict)")
        warnings.append(message)

    if pairs is None:
        common = [name for name in gen.clips if name in ref.clips]
        missing = [name for name in gen.clips if name not in ref.clips]
        if not common:
            raise AvatarError(f"no clip of {gen.path} is in {ref.path} (clips are paired by id; use --pairs FILE)")
        if missing:
            problem(f"{len(missing)} generated clip(s) have no reference clip of the same id, e.g. {missing[0]!r}")
        pairs = [(name, name, name if config.mode == "cross-id" else "") for name in common]
    plans = []
    for g, r, s in pairs:
        for name, side, role in ((g, gen, "generated"), (r, ref, "reference")):
            if name not in side.clips:
                raise AvatarError(f"{role} clip {name!r} is not in {side.path}")
        if config.mode == "cross-id":
            if source is None:
                raise AvatarError("--mode cross-id needs --source ARTIFACT (the source clips CSIM compares with)")
            s = s or g
            if s not in source.clips:
                raise AvatarError(f"source clip {s!r} is not in {source.path}")
            if config.source_frame >= source.clips[s]:
                raise AvatarError(f"--source-frame {config.source_frame}: source clip {s!r} has {source.clips[s]} frames")
        else:
            s = ""
        tg, tr = gen.clips[g], ref.clips[r]
        if tg != tr:
            problem(f"{g} has {tg} frames and its reference {r} has {tr}: aligned by index, first {min(tg, tr)} used")
        if min(tg, tr) == 0:
            problem(f"{g}: no frames to compare")
            continue
        plans.append(PairPlan(g, r, s, min(tg, tr)))
    if not plans:
        raise AvatarError("no clip pair with frames to evaluate")
    return plans


def choose_metrics(config: EvalConfig, gen: Side, ref: Side, warnings: list[str]) -> tuple[list[str], dict[str, str]]:
    """The metrics to compute, and the reason each available-by-name metric was left out."""
    from avatarcli.registry import ModelNotFoundError, resolve

    requested = list(dict.fromkeys(config.metrics))
    unknown = [m for m in requested if m not in METRICS]
    if unknown:
        raise AvatarError(f"unknown metric {unknown[0]!r}; available: {', '.join(METRICS)}")
    frames_both = gen.kind == CLIPS.kind and ref.kind == CLIPS.kind
    left_out: dict[str, str] = {}
    if requested:
        if not frames_both:
            needs_frames = [m for m in requested if m not in COEFF_METRICS]
            if needs_frames:
                raise AvatarError(f"{needs_frames[0]} needs frames on both sides; a coeffs artifact allows only aed, apd")
        return requested, left_out
    chosen = []
    for metric in METRICS:
        if metric not in COEFF_METRICS and not frames_both:
            left_out[metric] = "needs frames on both sides (an input is a coeffs artifact)"
            continue
        if metric == "lpips":
            try:
                for name in ("alexnet_imagenet", "lpips_alex_lin"):
                    resolve(name, config.models_dir, allow_download=False)
            except ModelNotFoundError as exc:
                left_out[metric] = f"weights not found ({exc.__class__.__name__}): run `avatar models` for where to put them"
                continue
        chosen.append(metric)
    for reason in dict.fromkeys(left_out.values()):
        names = [m for m, r in left_out.items() if r == reason]
        warnings.append(f"{', '.join(names)} left out: {reason}")
    return chosen, left_out


def resolve_csim_model(config: EvalConfig) -> str:
    from avatarcli.registry import ModelNotFoundError, resolve

    if config.csim_model != "auto":
        return config.csim_model
    for name in ("arcface_r50", "mobilefacenet_arcface"):
        try:
            resolve(name, config.models_dir, allow_download=False)
            return name
        except ModelNotFoundError:
            continue
    return "arcface_r50"  # resolving it later downloads it, or says where to put it


# ------------------------------------------------------------------------------------------------
# models


class FaceAnalyzer:
    """Detector + 68 landmarks (+ identity embeddings) on batches of uint8 frames on one device."""

    def __init__(self, config: EvalConfig, device: str, need_embeddings: bool, csim_model: str):
        from avatarcli.face.landmarks import PFLD68
        from avatarcli.face.scrfd import SCRFD
        from avatarcli.metrics.identity import FaceEmbedder
        from avatarcli.registry import resolve

        self.config = config
        self.detector_path = resolve(config.detector, config.models_dir)
        self.landmark_path = resolve(config.landmark_model, config.models_dir)
        self.detector = SCRFD(self.detector_path, device)
        self.landmarks = PFLD68(self.landmark_path, device)
        self.embedder = FaceEmbedder.from_registry(csim_model, device, config.models_dir) if need_embeddings else None

    def analyse(self, frames: torch.Tensor, with_embeddings: bool, timer=None) -> dict:
        """frames [B,H,W,3] uint8 on the device -> on the device: found [B] bool, kps5 [B,5,2] and
        lmk68 [B,68,2] float32 (frame pixels; meaningless where no face), embeddings [B,D] (zeros
        where no face) or None.

        The highest-scoring face of each frame is analysed. Every frame goes through every network
        (frames without a face too, their outputs masked) and nothing is read back to the host, so
        on a GPU the next batch is queued while this one runs.
        """
        from avatarcli.face.scrfd import detect_best
        from avatarcli.metrics.identity import align_faces

        step = timer.step if timer is not None else (lambda name, items=0: nullcontext())
        count = len(frames)
        with step("detect", count):
            best = detect_best(self.detector, frames, det_size=self.config.det_size, pad=self.config.det_pad,
                               threshold=self.config.det_threshold)
        # the detector sees the frame with a border of det_pad: no sane box is longer than that
        longest_box = (1 + 2 * self.config.det_pad) * max(frames.shape[1:3])
        with step("lmk68", count):
            lmk = self.landmarks.on_device(frames, best.boxes, longest_box)
        embeddings = None
        if with_embeddings and self.embedder is not None:
            with step("embed", count):
                embeddings = self.embedder(align_faces(frames, best.kps)) * best.found[:, None].to(self.embedder.device)
        return {"found": best.found, "kps5": best.kps, "lmk68": lmk, "embeddings": embeddings}


# ------------------------------------------------------------------------------------------------
# compute


def _frames(handle: h5py.File, clip: str, start: int, stop: int) -> np.ndarray:
    return handle["clips"][clip]["frames"][start:stop]


def _to_size(frames: torch.Tensor, size: int) -> torch.Tensor:
    """[B,H,W,3] uint8 -> [B,size,size,3] uint8 (antialiased bilinear), unchanged when already that size."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _fill_missing(points: np.ndarray, found: np.ndarray) -> np.ndarray:
    """[T,P,2] with nan rows where not found -> every row filled from the nearest found frames."""
    t = np.arange(len(points))
    flat = points.reshape(len(points), -1).copy()
    for column in range(flat.shape[1]):
        flat[:, column] = np.interp(t, t[found], flat[found, column])
    return flat.reshape(points.shape)


def fit_landmark_clips(clips: list[tuple[str, np.ndarray, np.ndarray]], size: int, config: EvalConfig,
                       device: str, timer) -> tuple[dict[str, dict], object]:
    """Landmark-only fits (the fit-3dmm stage's model and losses) of analysed clips, batched.

    ``clips``: (name, lmk68 [T,68,2] crop px with nan where no face, found [T]). Returns per name the
    fit-3dmm unit arrays (expression, rotation, translation, identity, intrinsics, ...), and the face model.
    """
    from stages.fit3dmm import BatchFit, ClipInput, batch_results, fit_batch, plan_batches

    from avatarcli.facemodel import load_face_model

    fit_config = Fit3dmmConfig(face_model=config.face_model, landmarks_only=True, rigid_iters=config.fit_rigid_iters,
                               iters=config.fit_iters, w_identity=config.fit_identity_weight,
                               models_dir=config.models_dir, device=device)
    model = load_face_model(config.face_model, config.models_dir).to(device, torch.float32)
    usable = [(n, l, f) for n, l, f in clips if f.any()]
    inputs = {n: ClipInput(n, _fill_missing(l, f).astype(np.float32), f.astype(np.float32), 25.0) for n, l, f in usable}
    results: dict[str, dict] = {}
    names = list(inputs)
    for batch in plan_batches(names, [len(inputs[n].lmk68) for n in names], config.fit_batch_frames):
        fit = BatchFit(model, [inputs[n] for n in batch], size, fit_config, torch.device(device))
        fit_batch(fit, fit_config, timer)
        for result in batch_results(fit, fit_config):
            results[result["name"]] = result
    return results, model


def face_region_masks(model, faces: torch.Tensor, fit: dict, frames: np.ndarray, size: int, device: str) -> torch.Tensor:
    """[len(frames),size,size] bool: ``faces`` (the model's face-region triangles, on ``device``) of a
    fit, rasterized at ``size``."""
    from avatarcli.camera import clip_from_camera, pose6_to_rt, world_to_camera
    from avatarcli.render.rasterize import rasterize

    identity = torch.as_tensor(fit["identity"][frames], device=device)
    expression = torch.as_tensor(fit["expression"][frames], device=device)
    verts = model.vertices(identity, expression)
    R, t = pose6_to_rt(torch.as_tensor(fit["pose6"][frames], device=device))
    K = torch.as_tensor(fit["intrinsics"][frames], device=device)
    cam = world_to_camera(verts, R, t)
    clip = clip_from_camera(cam, K, size, 10.0, 1e5)
    return rasterize(clip, faces, size, size, cull_backfaces=True).mask


def coefficient_distances(gen: dict, ref: dict, apd: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame AED and APD of two coefficient sets (arrays [T,...], same T).

    AED: mean |Δ expression| over the coefficients. APD: mean |Δ (pitch, yaw, roll)| in radians, and
    with 'angles+translation' also |Δ translation| in decimetres, over the 3 or 6 values.
    """
    aed = np.abs(gen["expression"].astype(np.float64) - ref["expression"].astype(np.float64)).mean(1)
    d_angles = np.abs(gen["rotation"].astype(np.float64) - ref["rotation"].astype(np.float64))
    if apd == "angles":
        return aed, d_angles.mean(1)
    d_trans = np.abs(gen["translation"].astype(np.float64) - ref["translation"].astype(np.float64)) / DECIMETRE_MM
    return aed, np.concatenate([d_angles, d_trans], 1).mean(1)


def _read_coeffs(path: Path, clip: str, frames: int) -> dict:
    with open_artifact(path, COEFFS.kind) as handle:
        group = handle["coeffs"][clip]
        return {k: group[k][:frames] for k in ("expression", "rotation", "translation", "identity", "pose6", "intrinsics")}


# ------------------------------------------------------------------------------------------------
# orchestration


def run(config: EvalConfig, generated: str | Path, reference: str | Path, output: str | Path,
        source: str | Path | None = None, pairs_file: str | Path | None = None, progress=None) -> EvalSummary:
    """Evaluate ``generated`` against ``reference``; write an eval artifact to ``output``."""
    from avatarcli.timing import StepTimer

    started = time.perf_counter()
    output = Path(output)
    warnings: list[str] = []
    if config.mode not in ("same-id", "cross-id"):
        raise AvatarError(f"--mode must be same-id or cross-id, not {config.mode!r}")
    if config.region not in ("frame", "face"):
        raise AvatarError(f"--region must be frame or face, not {config.region!r}")
    if config.apd not in ("angles", "angles+translation"):
        raise AvatarError(f"--apd must be angles or angles+translation, not {config.apd!r}")
    if config.batch < 1 or config.det_size < 32 or config.det_size % 32:
        raise AvatarError("--batch must be >= 1 and --det-size a multiple of 32")
    gen = _open_side(generated, "generated")
    ref = _open_side(reference, "reference")
    src = _open_side(source, "source") if source is not None else None
    if src is not None and src.kind != CLIPS.kind:
        raise AvatarError(f"--source must be a clips artifact, {src.path} is a {src.kind!r} artifact")
    metrics, left_out = choose_metrics(config, gen, ref, warnings)
    pairs = plan_pairs(config, gen, ref, src, read_pairs_file(pairs_file) if pairs_file else None, warnings)
    if any(m in COEFF_METRICS for m in metrics):
        if gen.kind == COEFFS.kind and ref.kind == COEFFS.kind and gen.face_model != ref.face_model:
            raise AvatarError(f"AED/APD compare coefficients of one face model: {gen.path} has {gen.face_model!r}, "
                              f"{ref.path} has {ref.face_model!r}")
        coeffs_side = gen if gen.kind == COEFFS.kind else ref if ref.kind == COEFFS.kind else None
        if coeffs_side is not None and gen.kind != ref.kind and coeffs_side.face_model != config.face_model:
            raise AvatarError(f"AED/APD: {coeffs_side.path} holds {coeffs_side.face_model!r} coefficients; fit the "
                              f"other side with the same model (--face-model) or give two coeffs artifacts")
    if config.region == "face" and ref.kind != CLIPS.kind:
        raise AvatarError("--region face needs the reference frames (a clips artifact)")
    device = resolve_device(config.device)
    size = gen.size if gen.kind == CLIPS.kind else None
    sync = (lambda: torch.cuda.current_stream().synchronize()) if device.startswith("cuda") else None
    timer = StepTimer(sync, cuda_events=device.startswith("cuda"))

    sides = [side for side in (gen, ref, src) if side is not None]
    paths = list(dict.fromkeys(side.path.resolve() for side in sides))
    with ThreadPoolExecutor(len(paths)) as hasher:
        # the inputs' content hashes (hundreds of MB of frames) are read while the models load
        hashes = dict(zip(paths, hasher.map(sha256_file, paths)))
        with timer.step("load_models", sync=False):
            need_faces = any(m in FACE_METRICS for m in metrics) or (
                any(m in COEFF_METRICS for m in metrics) and CLIPS.kind in (gen.kind, ref.kind)) or config.region == "face"
            csim_model = resolve_csim_model(config) if "csim" in metrics else ""
            analyzer = FaceAnalyzer(config, device, "csim" in metrics, csim_model) if need_faces else None
            lpips_net = None
            if "lpips" in metrics:
                from avatarcli.metrics.lpips import LPIPS

                lpips_net = LPIPS.from_registry(device, config.models_dir)
        with timer.step("hash_inputs", sync=False):
            for side in sides:
                side.sha256 = hashes[side.path.resolve()]

    stamp = hashlib.sha256(json.dumps({"config": config.result_fields(), "metrics": metrics,
                                       "pairs": [asdict(p) for p in pairs], "inputs": [gen.sha256, ref.sha256,
                                       src.sha256 if src else ""]}, sort_keys=True).encode()).hexdigest()[:16]
    parts_dir = _prepare_parts(output, stamp, config.overwrite)

    todo = [p for p in pairs if not (parts_dir / _part_name(p)).exists()]
    if progress is not None:
        progress.start(total_units=len(pairs), done_units=len(pairs) - len(todo))
    # pass 1: per clip pair, frame metrics that need no fit; landmarks for the fits
    analysed: dict[str, dict] = {}
    for plan in todo:
        first_pass = [m for m in metrics if not (config.region == "face" and m in IMAGE_METRICS)]
        analysed[_part_name(plan)] = _evaluate_frames(plan, config, first_pass, gen, ref, src, size, analyzer,
                                                      lpips_net, device, timer, masks=None)
        for m in metrics:  # filled in pass 2
            analysed[_part_name(plan)]["values"].setdefault(m, np.full(plan.frames, np.nan))
            analysed[_part_name(plan)]["excluded"].setdefault(m, np.zeros(plan.frames, np.uint8))
        if progress is not None and not (any(m in COEFF_METRICS for m in metrics) or config.region == "face"):
            progress.advance_frames(plan.frames)
            progress.unit_done(plan.generated, "ok", "")
    # pass 2: fits (clips sides), AED/APD, face-region image metrics
    fit_model = region_faces = None
    if todo and (any(m in COEFF_METRICS for m in metrics) or config.region == "face"):
        fits: dict[str, dict] = {}
        to_fit = []
        for plan in todo:
            res = analysed[_part_name(plan)]
            if gen.kind == CLIPS.kind and any(m in COEFF_METRICS for m in metrics):
                to_fit.append(("g:" + _part_name(plan), res["gen_lmk"], res["gen_found"]))
            if ref.kind == CLIPS.kind:
                to_fit.append(("r:" + _part_name(plan), res["ref_lmk"], res["ref_found"]))
        if to_fit:
            with timer.step("fit", sum(len(f) for _, _, f in to_fit)):
                fits, fit_model = fit_landmark_clips(to_fit, size, config, device, timer)
            region_faces = fit_model.face_region_faces().to(device)
        for plan in todo:
            key = _part_name(plan)
            res = analysed[key]
            frames = np.arange(plan.frames)
            ref_fit = fits.get("r:" + key) if ref.kind == CLIPS.kind else _read_coeffs(ref.path, plan.reference, plan.frames)
            gen_fit = fits.get("g:" + key) if gen.kind == CLIPS.kind else _read_coeffs(gen.path, plan.generated, plan.frames)
            if any(m in COEFF_METRICS for m in metrics):
                with timer.step("aed_apd", plan.frames, sync=False):
                    _coefficient_metrics(res, metrics, config, gen, ref, gen_fit, ref_fit, frames)
            if config.region == "face":
                masks = None if ref_fit is None else (fit_model, region_faces, ref_fit)
                again = _evaluate_frames(plan, config, [m for m in metrics if m in IMAGE_METRICS], gen, ref, src, size,
                                         None, lpips_net, device, timer, masks=masks)
                for m in IMAGE_METRICS:
                    if m in metrics:
                        res["values"][m], res["excluded"][m] = again["values"][m], again["excluded"][m]
            if progress is not None:
                progress.advance_frames(plan.frames)
                progress.unit_done(plan.generated, "ok", "")
    for plan in todo:
        _write_part(parts_dir / _part_name(plan), analysed[_part_name(plan)], metrics)

    with timer.step("write", sync=False):
        protocol = build_protocol(config, metrics, gen, ref, src, size, analyzer, csim_model, lpips_net is not None)
        summary = _assemble(output, parts_dir, pairs, metrics, protocol, left_out, warnings, config, gen, ref, src)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return EvalSummary(output, summary, time.perf_counter() - started, timer.as_dict(), warnings)


def _part_name(plan: PairPlan) -> str:
    key = f"{plan.generated}\n{plan.reference}\n{plan.source}"
    return hashlib.sha1(key.encode()).hexdigest()[:16] + ".npz"


def _prepare_parts(output: Path, stamp: str, overwrite: bool) -> Path:
    parts_dir = output.with_name(output.name + ".parts")
    stamp_file = parts_dir / "stamp.txt"
    if parts_dir.exists() and (not stamp_file.exists() or stamp_file.read_text() != stamp):
        if not overwrite:
            raise AvatarError(f"{parts_dir} holds a run with other settings or inputs; use --overwrite or delete it")
        shutil.rmtree(parts_dir)
    if output.exists() and not overwrite:
        try:
            with open_artifact(output, EVAL.kind) as old:
                same = json.loads(old.attrs["config_json"]).get("stamp") == stamp
        except AvatarError:
            same = False
        if not same:
            raise AvatarError(f"{output} exists and was made with other settings; use --overwrite or choose another output")
    parts_dir.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(stamp)
    return parts_dir


def _write_part(path: Path, result: dict, metrics: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, values=np.stack([result["values"][m] for m in metrics], 1),
                 excluded=np.stack([result["excluded"][m] for m in metrics], 1).astype(np.uint8))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _evaluate_frames(plan: PairPlan, config: EvalConfig, metrics: list[str], gen: Side, ref: Side, src: Side | None,
                     size: int | None, analyzer: FaceAnalyzer | None, lpips_net, device: str, timer, masks) -> dict:
    """Image and face metrics of one clip pair, in device batches; landmarks kept for the fits."""
    from avatarcli.artifact import FrameReader

    n = plan.frames
    values = {m: np.full(n, np.nan) for m in metrics}
    excluded = {m: np.zeros(n, np.uint8) for m in metrics}
    result = {"values": values, "excluded": excluded,
              "gen_found": np.zeros(n, bool), "ref_found": np.zeros(n, bool),
              "gen_lmk": np.full((n, 68, 2), np.nan, np.float32), "ref_lmk": np.full((n, 68, 2), np.nan, np.float32)}
    if gen.kind != CLIPS.kind or ref.kind != CLIPS.kind:
        return result  # coefficient metrics only
    reader = FrameReader()
    prefetch = ThreadPoolExecutor(max_workers=1)  # reads batch k+1 while the device works on batch k
    try:
        return _evaluate_batches(plan, config, metrics, gen, ref, src, size, analyzer, lpips_net, device, timer, masks,
                                 result, reader, prefetch)
    finally:
        prefetch.shutdown(wait=True)
        reader.close()


def _evaluate_batches(plan, config, metrics, gen, ref, src, size, analyzer, lpips_net, device, timer, masks, result,
                      reader, prefetch) -> dict:
    from avatarcli.metrics.image import psnr, ssim
    from avatarcli.metrics.lpips import to_lpips_input

    n = plan.frames
    values, excluded = result["values"], result["excluded"]
    wants_faces = analyzer is not None and masks is None
    image_metrics = [m for m in metrics if m in IMAGE_METRICS]
    source_embedding = None
    # Per-batch results stay on the device and come back once per clip: a read-back per batch
    # would make the host wait for the GPU each time instead of queueing the next batch.
    on_device: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        on_device.setdefault(name, []).append(tensor)

    pinned = device.startswith("cuda")
    with h5py.File(gen.path, "r") as gh, h5py.File(ref.path, "r") as rh:
        gen_frames, ref_frames = gh["clips"][plan.generated]["frames"], rh["clips"][plan.reference]["frames"]

        def read(start: int):
            stop = min(n, start + config.batch)
            pair = []
            for frames in (gen_frames, ref_frames):
                # page-locked, so the upload is queued like a kernel instead of blocking the host
                buffer = torch.empty((stop - start, *frames.shape[1:]), dtype=torch.uint8, pin_memory=pinned)
                reader.read(frames, start, stop, out=buffer.numpy())
                pair.append(buffer)
            return pair

        starts = list(range(0, n, config.batch))
        pending = prefetch.submit(read, starts[0])
        if wants_faces and "csim" in metrics and config.mode == "cross-id":
            with h5py.File(src.path, "r") as sh:
                source_frame = torch.as_tensor(_frames(sh, plan.source, config.source_frame, config.source_frame + 1),
                                               device=device)
                found = analyzer.analyse(_to_size(source_frame, size), with_embeddings=True, timer=timer)
                source_embedding = found["embeddings"] if bool(found["found"][0]) else None
        for k, start in enumerate(starts):
            stop = min(n, start + config.batch)
            with timer.step("read_wait", stop - start, sync=False):
                g_host, r_host = pending.result()
            if k + 1 < len(starts):
                pending = prefetch.submit(read, starts[k + 1])
            with timer.step("upload", stop - start):
                g = g_host.to(device, non_blocking=True)
                r = _to_size(r_host.to(device, non_blocking=True), size)
            mask = None
            if masks is not None:
                model, region_faces, ref_fit = masks
                with timer.step("face_mask", stop - start):
                    mask = face_region_masks(model, region_faces, ref_fit, np.arange(start, stop), size, device)
                keep("empty", ~mask.flatten(1).any(1))
            if image_metrics:
                with timer.step("image_metrics", stop - start):
                    if "psnr" in metrics:
                        keep("psnr", psnr(g, r, mask))
                    if "ssim" in metrics:
                        keep("ssim", ssim(g, r, mask))
                    if "lpips" in metrics:
                        gi, ri = to_lpips_input(g), to_lpips_input(r)
                        if mask is not None:
                            gi, ri = gi * mask[:, None], ri * mask[:, None]
                        keep("lpips", lpips_net(gi, ri))
            if wants_faces:
                both = analyzer.analyse(torch.cat([g, r]), with_embeddings="csim" in metrics, timer=timer)
                count = stop - start
                keep("gen_found", both["found"][:count])
                keep("ref_found", both["found"][count:])
                keep("gen_lmk", both["lmk68"][:count])
                keep("ref_lmk", both["lmk68"][count:])
                if "csim" in metrics:
                    emb = both["embeddings"]
                    if config.mode == "same-id":
                        keep("csim", (emb[:count] * emb[count:]).sum(1))
                    elif source_embedding is not None:
                        keep("csim", (emb[:count] * source_embedding).sum(1))
    with timer.step("read_back", n, sync=False):
        host = {name: torch.cat(parts).double().cpu().numpy() if parts[0].is_floating_point()
                else torch.cat(parts).cpu().numpy() for name, parts in on_device.items()}
    for m in image_metrics:
        values[m][:] = host[m]
        if masks is not None:
            values[m][host["empty"]] = np.nan
            excluded[m][host["empty"]] = EMPTY_REGION
    if not wants_faces:
        return result
    gf, rf = host["gen_found"], host["ref_found"]
    result["gen_found"][:], result["ref_found"][:] = gf, rf
    result["gen_lmk"][:] = np.where(gf[:, None, None], host["gen_lmk"], np.nan)
    result["ref_lmk"][:] = np.where(rf[:, None, None], host["ref_lmk"], np.nan)
    reason = np.where(~gf, NO_FACE_GEN, np.where(~rf, NO_FACE_REF, INCLUDED)).astype(np.uint8)
    if "akd" in metrics:
        d = np.linalg.norm(result["gen_lmk"].astype(np.float64) - result["ref_lmk"], axis=-1).mean(1)
        values["akd"][:] = np.where(gf & rf, d, np.nan)
        excluded["akd"][:] = reason
    if "csim" in metrics:
        if config.mode == "same-id":
            values["csim"][:] = np.where(gf & rf, host["csim"], np.nan)
            excluded["csim"][:] = reason
        elif source_embedding is None:
            excluded["csim"][:] = NO_FACE_SRC
        else:
            values["csim"][:] = np.where(gf, host["csim"], np.nan)
            excluded["csim"][:] = np.where(~gf, NO_FACE_GEN, INCLUDED)
    return result


def _coefficient_metrics(res: dict, metrics: list[str], config: EvalConfig, gen: Side, ref: Side,
                         gen_fit: dict | None, ref_fit: dict | None, frames: np.ndarray) -> None:
    values, excluded = res["values"], res["excluded"]
    if gen_fit is None or ref_fit is None:  # a side without any detected face could not be fitted
        for m in COEFF_METRICS:
            if m in metrics:
                excluded[m][:] = NO_FIT
        return
    aed, apd = coefficient_distances(gen_fit, ref_fit, config.apd)
    reason = np.zeros(len(frames), np.uint8)
    if gen.kind == CLIPS.kind:
        reason = np.where(~res["gen_found"], NO_FACE_GEN, reason)
    if ref.kind == CLIPS.kind:
        reason = np.where((reason == INCLUDED) & ~res["ref_found"], NO_FACE_REF, reason)
    valid = reason == INCLUDED
    for m, v in (("aed", aed), ("apd", apd)):
        if m in metrics:
            values[m] = np.where(valid, v, np.nan)
            excluded[m] = reason.astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# protocol and summary


def _model_entry(name: str, path) -> dict:
    from avatarcli.registry import file_sha256, get_spec

    spec = get_spec(name)
    return {"name": name, "file": Path(path).name, "sha256": file_sha256(Path(path)), "source": spec.source}


def build_protocol(config: EvalConfig, metrics: list[str], gen: Side, ref: Side, src: Side | None, size: int | None,
                   analyzer: FaceAnalyzer | None, csim_model: str, with_lpips: bool) -> dict:
    """What each number means: models with hashes, crops, resolution, region, distance."""
    from avatarcli.metrics.image import SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_TRUNCATE
    from avatarcli.registry import resolve

    resized = bool(size and ref.size and ref.size != size)
    resolution = f"{size}x{size}" if size else None
    region = ("frame" if config.region == "frame" else
              f"face: face-region triangles of the reference's landmark fit ({config.face_model}), rasterized")
    common = {"resolution": resolution, "region": region,
              "reference_resized": f"{ref.size}->{size}, antialiased bilinear" if resized else "no"}
    detector = None
    if analyzer is not None:
        detector = {**_model_entry(config.detector, analyzer.detector_path), "input_side": config.det_size,
                    "padding": config.det_pad, "threshold": config.det_threshold, "face": "highest score"}
    fitter = None
    if any(m in COEFF_METRICS for m in metrics):
        from avatarcli.facemodel import resolve_face_model
        from avatarcli.registry import file_sha256

        if CLIPS.kind in (gen.kind, ref.kind):
            _, fm_path = resolve_face_model(config.face_model, config.models_dir)
            fitter = {"extractor": "avatar fit-3dmm, landmarks only, on the evaluated frames' 68 landmarks",
                      "face_model": config.face_model, "face_model_sha256": file_sha256(fm_path),
                      "rigid_iters": config.fit_rigid_iters, "iters": config.fit_iters,
                      "identity_weight": config.fit_identity_weight,
                      "landmarks": _model_entry(config.landmark_model, analyzer.landmark_path) if analyzer else None,
                      "detector": detector}
        else:
            fitter = {"extractor": "coefficients as given (no re-fitting)", "face_model": gen.face_model,
                      "face_model_sha256": gen.face_model_sha256}
    protocol: dict[str, dict] = {}
    for metric in metrics:
        if metric == "psnr":
            protocol[metric] = {**common, "definition": "10*log10(255^2 / MSE), MSE over pixels and RGB channels",
                                "data_range": 255, "identical": "inf"}
        elif metric == "ssim":
            protocol[metric] = {**common, "definition": "Wang et al. 2004, per RGB channel then averaged",
                                "window": f"gaussian sigma={SSIM_SIGMA}, truncate={SSIM_TRUNCATE} (11x11)",
                                "K1": SSIM_K1, "K2": SSIM_K2, "covariance": "population",
                                "border": "5 px dropped (window interior)", "data_range": 255,
                                "equals": "skimage structural_similarity(gaussian_weights=True, sigma=1.5, "
                                          "use_sample_covariance=False, data_range=255, channel_axis=-1)"}
        elif metric == "lpips":
            protocol[metric] = {**common, "network": "alex", "version": "0.1", "input": "RGB in [-1,1]",
                                "models": [_model_entry(n, resolve(n, config.models_dir))
                                           for n in ("alexnet_imagenet", "lpips_alex_lin")],
                                "masking": "pixels outside the region set to 0 on both sides" if config.region == "face" else "none"}
        elif metric == "csim":
            protocol[metric] = {"model": _model_entry(csim_model, analyzer.embedder.path),
                                "alignment": "ArcFace 5-point template, least-squares similarity, 112x112, bilinear, black border",
                                "keypoints": detector, "distance": "cosine of L2-normalised embeddings",
                                "pairs": ("generated frame t vs reference frame t" if config.mode == "same-id" else
                                          f"generated frame t vs frame {config.source_frame} of the source clip"),
                                "resolution": resolution, "comparable_to_published": csim_model == "arcface_r50"}
        elif metric == "akd":
            protocol[metric] = {"landmarks": _model_entry(config.landmark_model, analyzer.landmark_path),
                                "detector": detector, "points": 68,
                                "distance": "mean Euclidean distance over the 68 points, px", "resolution": resolution}
        elif metric == "aed":
            protocol[metric] = {**fitter, "distance": "L1: mean |delta| over the expression coefficients"}
        elif metric == "apd":
            protocol[metric] = {**fitter, "convention": config.apd,
                                "distance": "L1: mean |delta| over (pitch, yaw, roll) radians"
                                + (" and (tx, ty, tz) decimetres" if config.apd == "angles+translation" else "")}
    return protocol


def _stat(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return None
    return float(values.mean())


def json_number(value):
    """JSON has no inf/nan: inf -> "inf", nan -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _assemble(output: Path, parts_dir: Path, pairs: list[PairPlan], metrics: list[str], protocol: dict,
              left_out: dict, warnings: list[str], config: EvalConfig, gen: Side, ref: Side, src: Side | None) -> dict:
    per_clip = []
    all_values = {m: [] for m in metrics}
    all_excluded = {m: [] for m in metrics}
    parents = [(str(gen.path.resolve()), gen.sha256), (str(ref.path.resolve()), ref.sha256)]
    if src is not None:
        parents.append((str(src.path.resolve()), src.sha256))
    config_json = {**asdict(config), "stamp": (parts_dir / "stamp.txt").read_text(), "kind": EVAL.kind,
                   "metrics": metrics}
    with ArtifactWriter(output, EVAL, config_json, parents) as writer:
        units = writer.handle.create_group("eval", track_order=True)
        clip_mean = np.full((len(pairs), len(metrics)), np.nan)
        clip_included = np.zeros((len(pairs), len(metrics)), np.int32)
        used_names: set[str] = set()
        for row, plan in enumerate(pairs):
            with np.load(parts_dir / _part_name(plan)) as part:
                values, excluded = part["values"], part["excluded"]
            name = plan.generated if plan.generated not in used_names else f"{plan.generated}@{plan.reference}"
            used_names.add(name)
            group = units.create_group(name)
            group.create_dataset("generated_frame", data=np.arange(plan.frames, dtype=np.int32))
            group.create_dataset("reference_frame", data=np.arange(plan.frames, dtype=np.int32))
            group.create_dataset("values", data=values.astype(np.float64))
            group.create_dataset("excluded", data=excluded.astype(np.uint8))
            group.attrs.update({"clip_id": plan.generated, "reference_clip": plan.reference, "source_clip": plan.source})
            for col, metric in enumerate(metrics):
                included = excluded[:, col] == INCLUDED
                clip_included[row, col] = int(included.sum())
                if included.any():
                    clip_mean[row, col] = float(values[included, col].mean())
                all_values[metric].append(values[:, col])
                all_excluded[metric].append(excluded[:, col])
            per_clip.append({"generated": plan.generated, "reference": plan.reference, "frames": plan.frames,
                             **{m: json_number(float(clip_mean[row, c])) for c, m in enumerate(metrics)}})
        index = writer.handle.create_group("index")
        write_strings(index, "clip_id", [p.generated for p in pairs])
        write_strings(index, "reference_clip", [p.reference for p in pairs])
        write_strings(index, "source_clip", [p.source for p in pairs])
        index.create_dataset("num_frames", data=np.asarray([p.frames for p in pairs], np.int32))
        index.create_dataset("clip_mean", data=clip_mean)
        index.create_dataset("clip_included", data=clip_included)
        write_strings(writer.handle.create_group("metrics"), "name", metrics)
        write_strings(writer.handle.create_group("reasons"), "text", list(REASONS))
        overall = {}
        for metric in metrics:
            values = np.concatenate(all_values[metric])
            excluded = np.concatenate(all_excluded[metric])
            included = excluded == INCLUDED
            reasons = {REASONS[code]: int((excluded == code).sum()) for code in np.unique(excluded) if code != INCLUDED}
            mean = float(values[included].mean()) if included.any() else None
            overall[metric] = {"mean": json_number(mean), "frames": int(included.sum()),
                               "excluded": int((~included).sum()), "excluded_reasons": reasons,
                               "higher_is_better": HIGHER_IS_BETTER[metric], "protocol": protocol[metric]}
        summary = {"generated": str(gen.path), "reference": str(ref.path), "source": str(src.path) if src else None,
                   "mode": config.mode, "pairs": len(pairs), "frames": int(sum(p.frames for p in pairs)),
                   "metrics": overall, "left_out": left_out, "warnings": warnings, "clips": per_clip}
        writer.extra_attrs = {"protocol_json": json.dumps(protocol, sort_keys=True),
                              "summary_json": json.dumps(summary, sort_keys=True)}
    return summary
