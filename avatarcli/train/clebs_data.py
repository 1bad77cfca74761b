"""Expression training data: frames with their per-frame expression vector β, per clip.

Three ways in (each also gives the head rotation of every frame, from the same fit as β):

* a clips artifact (``avatar preprocess``) with its coeffs artifact (``avatar fit-3dmm``):
  β = ``coeffs/<clip>/expression``;
* a clips artifact with Deep3DFaceRecon ``.mat`` files (``coeff`` [N,257], expression =
  ``coeff[:, 80:144]``), matched to clips by the stem of the clip's ``source_path``: the β of output
  frame t is ``coeff[source_frame[t]]``, and frames past the end of the coefficients are dropped (a
  coefficient file can be a couple of frames shorter than its video);
* Deep3DFaceRecon ``.mat`` files with their videos (``<dir>/../video/<stem>.*`` or beside the
  ``.mat``), decoded at their own frame rate: the videos must already be square face crops, as
  Deep3DFaceRecon's inputs are (e.g. StyleTalk's 256² clips); no landmarks on this path.

``ClipBank`` holds the frames of every clip (downscaled to the training size) and draws the
training groups: a group is ``negatives + 1`` distinct frames of one clip, either any frames
(Export3D) or an anchor and the frames nearest to it in head pose. Pose-matched groups exist because
fitted expression coefficients correlate with head pose (Deep3DFaceRecon's on StyleTalk: R² ≈ 0.5
for pitch and yaw within a clip), and pose is what changes most in the images of one clip, so with
random frames InfoNCE first learns to match pose through that leak instead of the expression.
The groups of a step are a pure function of (seed, step, group index), so resumed and DDP runs see
the same data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatarcli.deep3d import deep3d_part, expand_mat_inputs, find_video_for, read_deep3d
from avatarcli.errors import AvatarError
from avatarcli.identity import check_identity_rule, identity_of
from avatarcli.provenance import sha256_file
from avatarcli.train.data import decode_square_video, resize_frames


@dataclass
class ExpressionClip:
    clip_id: str
    identity: str
    beta: np.ndarray
    """[T,K] float32 expression vectors."""
    frames: np.ndarray | None
    """[T,s,s,3] uint8 frames at the training size (None when loaded without frames)."""
    lmk68: np.ndarray | None = None
    """[T,68,2] landmarks in crop pixels (clips artifacts only)."""
    source: str = ""
    pose: np.ndarray | None = None
    """[T,3] head rotation (pitch, yaw, roll), radians, from the same fit as β."""


@dataclass
class ExpressionData:
    clips: list[ExpressionClip]
    input_kind: str
    """'coeffs', 'clips+deep3d' or 'deep3d-video'."""
    parents: list[tuple[str, str]] = field(default_factory=list)
    """(path, sha256) of every input file."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(clip or file, reason)."""

    @property
    def expr_dim(self) -> int:
        return int(self.clips[0].beta.shape[1])

    @property
    def num_frames(self) -> int:
        return sum(len(c.beta) for c in self.clips)


def read_expression_and_pose(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(expression [N,64], head rotation angles [N,3]) of a Deep3DFaceRecon coefficient file."""
    try:
        coeff = read_deep3d(path)
    except ValueError as exc:
        raise AvatarError(f"{path}: not a Deep3DFaceRecon coefficient file: {exc}") from None
    return deep3d_part(coeff, "expression"), deep3d_part(coeff, "angles")


def check_finite(path: str | Path, clip: str, beta: np.ndarray, pose: np.ndarray) -> None:
    """An ``AvatarError`` naming the clip and its first frame with a NaN or inf in β [T,K] or the
    head rotation [T,3]: training on them gives NaN losses and an untrained encoder. (Deep3DFaceRecon
    files with NaN are rejected when read.)"""
    for what, values in (("expression coefficients (β)", beta), ("head rotation", pose)):
        bad = np.flatnonzero(~np.isfinite(values).all(1))
        if len(bad):
            raise AvatarError(f"{path}: clip {clip!r} has NaN or inf {what} at frame {int(bad[0])} "
                              f"({len(bad)} of {len(values)} frames); refit the clip or leave it out")


def _match_mat(source_path: str, mats_by_stem: dict[str, list[Path]]) -> tuple[Path | None, str]:
    stem = Path(source_path).stem
    candidates = mats_by_stem.get(stem, [])
    if len(candidates) > 1:  # StyleTalk layout: <set>/video/<stem>.mp4 pairs with <set>/3dmm/<stem>.mat
        candidates = [m for m in candidates if m.parent.parent == Path(source_path).absolute().parent.parent]
    if not candidates:
        return None, f"no Deep3DFaceRecon coefficients named {stem}.mat"
    if len(candidates) > 1:
        return None, f"ambiguous: {len(candidates)} coefficient files named {stem}.mat"
    return candidates[0], ""


def load_from_clips(clips_path: str, coeffs: list[str], image_size: int, with_frames: bool = True,
                    progress=None) -> ExpressionData:
    """A clips artifact with a coeffs artifact, or with Deep3DFaceRecon .mat files/folders."""
    from avatarcli.artifact import open_artifact, read_kind, read_strings, validate_unit
    from avatarcli.schemas import CLIPS, COEFFS

    if not coeffs:
        raise AvatarError("a clips artifact needs its expression coefficients: --coeffs COEFFS.h5 "
                          "(avatar fit-3dmm) or --coeffs FOLDER of Deep3DFaceRecon .mat files")
    coeffs_artifact = None
    mats_by_stem: dict[str, list[Path]] = {}
    parents = [(str(Path(clips_path).absolute()), sha256_file(clips_path))]
    if len(coeffs) == 1 and Path(coeffs[0]).suffix.lower() in (".h5", ".hdf5"):
        kind = read_kind(coeffs[0])
        if kind != "coeffs":
            raise AvatarError(f"{coeffs[0]}: a {kind} artifact; --coeffs takes a coeffs artifact (avatar fit-3dmm) "
                              f"or Deep3DFaceRecon .mat files/folders")
        coeffs_artifact = coeffs[0]
        parents.append((str(Path(coeffs_artifact).absolute()), sha256_file(coeffs_artifact)))
        input_kind = "coeffs"
    else:
        for mat in expand_mat_inputs(coeffs):
            mats_by_stem.setdefault(mat.stem, []).append(mat)
        input_kind = "clips+deep3d"

    clips: list[ExpressionClip] = []
    skipped: list[tuple[str, str]] = []
    used_mats: dict[Path, str] = {}
    with open_artifact(clips_path, CLIPS.kind) as handle, (
            open_artifact(coeffs_artifact, COEFFS.kind) if coeffs_artifact else _null()) as coeff_handle:
        names = read_strings(handle["index/clip_id"])
        if progress is not None:
            progress.start(len(names))
        for name in names:
            group = handle["clips"][name]
            validate_unit(group, CLIPS, label=str(clips_path))
            identity = str(group.attrs["identity"])
            source_path = str(group.attrs["source_path"])
            num = group["frames"].shape[0]
            if coeff_handle is not None:
                if name not in coeff_handle["coeffs"]:
                    skipped.append((name, "not in the coeffs artifact (not fitted)"))
                    _tick(progress, name, False)
                    continue
                beta = np.asarray(coeff_handle["coeffs"][name]["expression"][()], np.float32)
                pose = np.asarray(coeff_handle["coeffs"][name]["rotation"][()], np.float32)
                if len(beta) != num:
                    skipped.append((name, f"coeffs have {len(beta)} frames, the clip {num}"))
                    _tick(progress, name, False)
                    continue
                check_finite(coeffs_artifact, name, beta, pose)
                keep = num
            else:
                mat, reason = _match_mat(source_path, mats_by_stem)
                if mat is None:
                    skipped.append((name, reason))
                    _tick(progress, name, False)
                    continue
                expression, angles = read_expression_and_pose(mat)
                used_mats[mat] = ""
                source_frame = group["source_frame"][()]
                # source frames increase along a clip: keep the prefix that has coefficients
                keep = int(np.searchsorted(source_frame, len(expression)))
                if keep == 0:
                    skipped.append((name, f"{mat.name} has {len(expression)} rows, the clip starts at source frame "
                                          f"{int(source_frame[0])}"))
                    _tick(progress, name, False)
                    continue
                beta = expression[source_frame[:keep]]
                pose = angles[source_frame[:keep]]
            frames = resize_frames(group["frames"][:keep], image_size) if with_frames else None
            lmk = np.asarray(group["lmk68"][:keep], np.float32) * (image_size / group["frames"].shape[1])
            clips.append(ExpressionClip(name, identity, beta, frames, lmk, source_path, pose))
            _tick(progress, name, True)
    for mat in used_mats:
        parents.append((str(mat), sha256_file(mat)))
    return ExpressionData(clips, input_kind, parents, skipped)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _tick(progress, name: str, ok: bool) -> None:
    if progress is not None:
        progress.unit_done(name, "ok" if ok else "skipped", "")


def load_from_deep3d_videos(inputs: list[str], image_size: int, identity_from: str = "stem",
                            with_frames: bool = True, progress=None) -> ExpressionData:
    """Deep3DFaceRecon .mat files (or folders) with their face-crop videos."""
    check_identity_rule(identity_from)
    mats = expand_mat_inputs(inputs)
    clips: list[ExpressionClip] = []
    skipped: list[tuple[str, str]] = []
    parents: list[tuple[str, str]] = []
    if progress is not None:
        progress.start(len(mats))
    for mat in mats:
        video = find_video_for(mat)
        if video is None:
            skipped.append((str(mat), f"no video {mat.stem}.mp4 in {mat.parent.parent / 'video'} or beside it"))
            _tick(progress, mat.stem, False)
            continue
        expression, angles = read_expression_and_pose(mat)
        frames = None
        count = len(expression)
        if with_frames:
            frames, reason = decode_square_video(video, count)
            if frames is None:
                skipped.append((str(mat), reason))
                _tick(progress, mat.stem, False)
                continue
            count = min(count, len(frames))
            frames = resize_frames(frames[:count], image_size)
        clip_id = f"{mat.stem}-{hashlib.sha1(str(mat).encode()).hexdigest()[:8]}"
        clips.append(ExpressionClip(clip_id, identity_of(str(video), identity_from), expression[:count], frames,
                                    None, str(video), angles[:count]))
        parents += [(str(mat), sha256_file(mat)), (str(video.absolute()), sha256_file(video))]
        _tick(progress, mat.stem, True)
    return ExpressionData(clips, "deep3d-video", parents, skipped)


def load_expression_data(inputs: list[str], coeffs: list[str], image_size: int, identity_from: str = "stem",
                         with_frames: bool = True, progress=None) -> ExpressionData:
    """Dispatch on the inputs: one clips artifact (+ --coeffs), or Deep3DFaceRecon .mat files/folders."""
    from avatarcli.artifact import read_kind

    if not inputs:
        raise AvatarError("no inputs given")
    first = Path(inputs[0])
    if first.is_file() and first.suffix.lower() in (".h5", ".hdf5"):
        kind = read_kind(first)
        if kind != "clips":
            raise AvatarError(f"{first}: a {kind} artifact; expected a clips artifact (avatar preprocess) "
                              f"or Deep3DFaceRecon .mat files")
        if len(inputs) > 1:
            raise AvatarError("give one clips artifact (merge several with avatar merge)")
        data = load_from_clips(str(first), coeffs, image_size, with_frames, progress)
    else:
        if coeffs:
            raise AvatarError("--coeffs goes with a clips artifact; .mat inputs carry their own coefficients")
        data = load_from_deep3d_videos(inputs, image_size, identity_from, with_frames, progress)
    if not data.clips:
        reasons = "; ".join(f"{n}: {r}" for n, r in data.skipped[:3])
        raise AvatarError(f"no usable clips in the inputs ({len(data.skipped)} skipped{': ' + reasons if reasons else ''})")
    dims = {c.beta.shape[1] for c in data.clips}
    if len(dims) > 1:
        raise AvatarError(f"the clips' expression vectors differ in size ({sorted(dims)})")
    return data


class ClipBank:
    """Every frame of the usable clips in one uint8 tensor, and the deterministic group sampler."""

    def __init__(self, data: ExpressionData, group_size: int, device: torch.device | str = "cpu",
                 negatives_from: str = "pose"):
        if negatives_from not in ("pose", "random"):
            raise AvatarError(f"negatives must come from 'pose' or 'random', not {negatives_from!r}")
        if negatives_from == "pose" and any(c.pose is None for c in data.clips):
            raise AvatarError("pose-matched negatives need the head pose of every frame; use --negatives-from random")
        self.negatives_from = negatives_from
        usable = [c for c in data.clips if len(c.beta) >= group_size and c.frames is not None]
        self.too_short = [(c.clip_id, f"{len(c.beta)} frames < group of {group_size}") for c in data.clips
                          if len(c.beta) < group_size]
        if not usable:
            raise AvatarError(f"no clip has the {group_size} frames a group needs (1 + negatives); "
                              f"lower --negatives")
        self.group_size = group_size
        self.clip_ids = [c.clip_id for c in usable]
        self.lengths = np.array([len(c.beta) for c in usable], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        # each frame equally likely as an anchor: clips drawn in proportion to their length
        self.weights = self.lengths / self.lengths.sum()
        frames = np.concatenate([c.frames for c in usable])
        self.frames = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous().to(device)  # [F,3,s,s] uint8
        self.beta = torch.from_numpy(np.concatenate([c.beta for c in usable])).to(device)
        self.pose = [c.pose for c in usable] if negatives_from == "pose" else None

    def group_indices(self, seed: int, step: int, group: int) -> np.ndarray:
        """Frames of one group: ``random``, any distinct frames of a clip; ``pose``, a random anchor and
        the frames of its clip nearest to it in head pose (the anchor first)."""
        rng = np.random.default_rng([seed, step, group])
        clip = rng.choice(len(self.lengths), p=self.weights)
        if self.pose is None:
            return self.offsets[clip] + rng.choice(self.lengths[clip], self.group_size, replace=False)
        pose = self.pose[clip]
        anchor = rng.integers(len(pose))
        distance = np.linalg.norm(pose - pose[anchor], axis=1)
        distance[anchor] = -1.0
        return self.offsets[clip] + np.argsort(distance, kind="stable")[: self.group_size]

    def batch(self, seed: int, step: int, groups: range) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B,G,3,s,s] in -1..1, beta [B,G,K]) for the given global group indices."""
        index = np.stack([self.group_indices(seed, step, g) for g in groups])
        flat = torch.from_numpy(index.reshape(-1)).to(self.frames.device)
        images = self.frames[flat].float().div_(127.5).sub_(1.0)
        images = images.unflatten(0, index.shape)
        beta = self.beta[flat].unflatten(0, index.shape)
        return images, beta

