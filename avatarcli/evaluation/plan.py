"""What ``avatar eval`` compares: metric names, exclusion reasons, the input sides and the clip pairs.

Torch-free (the stage module imports it at its top level). ``config`` arguments are an
``EvalConfig`` (fields ``metrics``, ``mode``, ``strict``, ``source_frame``, ``models_dir``,
``csim_model``, ``face_model``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from avatarcli.artifact import open_artifact, read_kind, read_strings
from avatarcli.errors import AvatarError
from avatarcli.schemas import CLIPS, COEFFS
from avatarcli.stage.config import result_hash

READS = (CLIPS.kind, COEFFS.kind)

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
    "non-finite coefficients (NaN or inf) in this frame",
)
"""New reasons are appended: the codes of eval artifacts already written stay valid."""
(INCLUDED, NO_FACE_GEN, NO_FACE_REF, NO_FACE_SRC, EMPTY_REGION, NO_FIT, NON_FINITE) = range(len(REASONS))


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

    @property
    def has_frames(self) -> bool:
        return self.kind == CLIPS.kind


@dataclass
class PairPlan:
    """One unit of eval: ``frames`` frame pairs of the generated clip and its reference (and, for
    cross-id, the source clip; '' otherwise). ``reference_frames``: the reference frame of each
    generated frame (a rendered clip's ``driving_frame``); None: frame t with frame t."""

    generated: str
    reference: str
    source: str
    frames: int
    reference_frames: tuple[int, ...] | None = None

    def stamp(self) -> dict:
        """What identifies the pair in the parts' stamp (pairs aligned by index: as before this field)."""
        fields = {"generated": self.generated, "reference": self.reference, "source": self.source,
                  "frames": self.frames}
        if self.reference_frames is not None:
            fields["reference_frames"] = result_hash(list(self.reference_frames))
        return fields


@dataclass
class Driven:
    """A rendered clip (``avatar render``): the driving clip and frames it renders, and its source clip."""

    driving_clip: str
    source_clip: str
    frames: np.ndarray


def read_driven(side: Side, names: list[str]) -> dict[str, Driven]:
    """The clips of ``names`` in a clips artifact that hold a ``driving_frame`` dataset."""
    driven = {}
    with h5py.File(side.path, "r") as handle:
        for name in names:
            group = handle["clips"][name]
            if "driving_frame" in group:
                attrs = group.attrs
                driven[name] = Driven(str(attrs.get("driving_clip", name)), str(attrs.get("source_clip", name)),
                                      group["driving_frame"][()].astype(np.int64))
    return driven


def open_side(path: str | Path, role: str) -> Side:
    """The clips and frame counts of an input artifact (clips or coeffs); ``role`` names it in errors."""
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
    return read_clip_rows(path, ("generated", "reference", "source"), 2)


def read_clip_rows(path: str | Path, columns: tuple[str, ...], required: int) -> list[tuple[str, ...]]:
    """CSV rows of clip ids: the first ``required`` of ``columns`` must be given, the others may be
    left out ('' then). Blank rows, '#' comments and a header row (first cell = ``columns[0]``) are
    skipped."""
    path = Path(path)
    if not path.exists():
        raise AvatarError(f"--pairs file not found: {path}")
    layout = ",".join(columns[:required]) + "".join(f"[,{c}]" for c in columns[required:])
    rows = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if number == 1 and row[0].lower() == columns[0]:
                continue
            if not required <= len(row) <= len(columns) or not all(row[:required]):
                raise AvatarError(f"{path}:{number}: expected '{layout}', got {','.join(row)!r}")
            rows.append(tuple(row) + ("",) * (len(columns) - len(row)))
    if not rows:
        raise AvatarError(f"{path}: no pairs")
    return rows


def plan_pairs(config, gen: Side, ref: Side, source: Side | None,
               pairs: list[tuple[str, str, str]] | None, warnings: list[str]) -> list[PairPlan]:
    """The clip pairs, by id (``pairs`` None) or as listed; frames aligned by index. Unpaired clips
    and frame-count mismatches are warnings (appended to ``warnings``), errors with ``config.strict``."""
    def problem(message: str) -> None:
        if config.strict:
            raise AvatarError(message + " (--strict)")
        warnings.append(message)

    listed = list(gen.clips) if pairs is None else [g for g, _, _ in pairs if g in gen.clips]
    driven = read_driven(gen, listed) if gen.has_frames else {}
    if pairs is None:
        def reference_of(name: str) -> str | None:  # a rendered clip pairs with its driving clip
            if name in ref.clips:
                return name
            return driven[name].driving_clip if name in driven and driven[name].driving_clip in ref.clips else None

        common = [name for name in gen.clips if reference_of(name) is not None]
        missing = [name for name in gen.clips if reference_of(name) is None]
        if not common:
            raise AvatarError(f"no clip of {gen.path} is in {ref.path} (clips are paired by id; use --pairs FILE)")
        if missing:
            problem(f"{len(missing)} generated clip(s) have no reference clip of the same id, e.g. {missing[0]!r}")
        pairs = [(name, reference_of(name), (driven[name].source_clip if name in driven else name)
                  if config.mode == "cross-id" else "") for name in common]
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
        if g in driven:  # generated frame t renders reference frame driving_frame[t]
            index = driven[g].frames
            if tg == 0:
                problem(f"{g}: no frames to compare")
                continue
            if len(index) != tg:
                raise AvatarError(f"{gen.path}: clip {g!r} has {tg} frames but {len(index)} driving_frame entries")
            if index.min() < 0 or index.max() >= tr:
                raise AvatarError(f"{g} renders frame {int(index.max() if index.max() >= tr else index.min())} of its "
                                  f"reference {r!r} (driving_frame), which has {tr} frames")
            plans.append(PairPlan(g, r, s, tg, tuple(int(i) for i in index)))
            continue
        if tg != tr:
            problem(f"{g} has {tg} frames and its reference {r} has {tr}: aligned by index, first {min(tg, tr)} used")
        if min(tg, tr) == 0:
            problem(f"{g}: no frames to compare")
            continue
        plans.append(PairPlan(g, r, s, min(tg, tr)))
    if not plans:
        raise AvatarError("no clip pair with frames to evaluate")
    return plans


def choose_metrics(config, gen: Side, ref: Side, warnings: list[str]) -> tuple[list[str], dict[str, str]]:
    """The metrics to compute, and the reason each available-by-name metric was left out."""
    from avatarcli.registry import ModelNotFoundError, resolve

    requested = list(dict.fromkeys(config.metrics))
    unknown = [m for m in requested if m not in METRICS]
    if unknown:
        raise AvatarError(f"unknown metric {unknown[0]!r}; available: {', '.join(METRICS)}")
    frames_both = gen.has_frames and ref.has_frames
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


def check_coefficient_models(config, metrics: list[str], gen: Side, ref: Side) -> None:
    """AED/APD compare coefficients of one face model: two coeffs inputs must share it, and a
    coeffs input beside a clips input must hold ``config.face_model``'s coefficients."""
    if not any(m in COEFF_METRICS for m in metrics):
        return
    if gen.kind == COEFFS.kind and ref.kind == COEFFS.kind and gen.face_model != ref.face_model:
        raise AvatarError(f"AED/APD compare coefficients of one face model: {gen.path} has {gen.face_model!r}, "
                          f"{ref.path} has {ref.face_model!r}")
    if gen.kind != ref.kind and COEFFS.kind in (gen.kind, ref.kind):
        # the clips side would need its own landmark analysis and fits first: refused rather than
        # returning every frame excluded
        clips_side = gen if gen.kind != COEFFS.kind else ref
        raise AvatarError(f"AED/APD between a coeffs artifact and a clips artifact: fit {clips_side.path} first "
                          f"(avatar fit-3dmm) and compare the two coeffs artifacts, or compare two clips artifacts")


def resolve_csim_model(config) -> str:
    """``config.csim_model``, or for 'auto' arcface_r50 when present, else the mobilefacenet_arcface stand-in."""
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
