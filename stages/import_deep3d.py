"""Stage ``import-deep3d``: Deep3DFaceRecon coefficient files (``.mat``, 257-d per frame) -> coeffs artifact.

Many users already have Deep3DFaceRecon fits; importing them lets ``avatar eval`` compute AED/APD
with the Deep3D protocol without re-fitting. Layout of a file's ``coeff`` [T,257]: identity
[0:80], expression [80:144], texture [144:224], angles [224:227] (pitch, yaw, roll, radians),
SH lighting [227:254] (3 channels × 9), translation [254:257] (decimetres).

Stored (see :data:`avatarcli.schemas.COEFFS`): ``identity`` and ``expression`` verbatim;
``rotation`` = the angles verbatim (Deep3DFaceRecon's Euler convention is ours,
:func:`avatarcli.camera.euler_to_matrix`); ``translation`` and ``pose6`` converted to our OpenCV
camera in mm with :func:`avatarcli.camera.deep3d_pose_to_rt` (so ``|Δt| = 100·|Δtrans|`` per axis,
which ``avatar eval`` undoes: its APD translation unit is the decimetre); ``lighting`` [T,9,3];
the 25-d camera and ``intrinsics`` of Deep3DFaceRecon's 224² crop (focal 1015, centre 112). No
per-vertex albedo (the BFM texture basis is not distributed with the coefficients) and no
landmark error (``nan``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from avatarcli.artifact import ArtifactWriter, write_strings
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file
from avatarcli.schemas import COEFFS

READS = "deep3d-mat"
WRITES = COEFFS.kind

DEEP3D_FOCAL, DEEP3D_CENTER, DEEP3D_SIZE = 1015.0, 112.0, 224
DEEP3D_SLICES = {"identity": (0, 80), "expression": (80, 144), "texture": (144, 224), "angles": (224, 227),
                 "lighting": (227, 254), "translation": (254, 257)}
FACE_MODEL = "bfm_deep3d"


@dataclass
class ImportDeep3dConfig:
    """Settings of ``avatar import-deep3d``."""

    fps: float = 30.0
    """Frame rate of the videos the coefficients were fitted on (not stored in the .mat files)."""


@dataclass
class ImportSummary:
    output: Path
    clips: int
    frames: int
    skipped: list[tuple[str, str]]
    seconds: float


def find_mat_files(inputs: list[str]) -> list[Path]:
    """Files and folders (searched recursively for ``*.mat``), sorted, without duplicates."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(path.rglob("*.mat")))
        elif path.exists():
            found.append(path)
        else:
            raise AvatarError(f"input not found: {path}")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise AvatarError("no .mat files among the inputs")
    return unique


def read_deep3d(path: Path) -> np.ndarray:
    """``coeff`` [T,257] float32 of one Deep3DFaceRecon result file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several types for non-.mat input
        raise ValueError(f"not a MATLAB file ({exc.__class__.__name__})") from None
    if "coeff" not in mat:
        raise ValueError("no 'coeff' array (not a Deep3DFaceRecon result)")
    coeff = np.asarray(mat["coeff"], np.float32)
    if coeff.ndim == 1:
        coeff = coeff[None]
    if coeff.ndim != 2 or coeff.shape[1] != 257:
        raise ValueError(f"'coeff' has shape {coeff.shape}, expected [frames, 257]")
    if len(coeff) == 0:
        raise ValueError("'coeff' has no frames")
    if not np.isfinite(coeff).all():
        raise ValueError("'coeff' contains NaN or infinite values")
    return coeff


def coeffs_unit(coeff: np.ndarray) -> dict[str, np.ndarray]:
    """The COEFFS unit arrays of one clip's Deep3DFaceRecon coefficients [T,257]."""
    import torch

    from avatarcli.camera import deep3d_pose_to_rt, eg3d_camera, intrinsics_matrix

    def part(name):
        a, b = DEEP3D_SLICES[name]
        return coeff[:, a:b]

    angles = torch.as_tensor(part("angles"), dtype=torch.float64)
    R, t = deep3d_pose_to_rt(angles, torch.as_tensor(part("translation"), dtype=torch.float64))
    K = intrinsics_matrix(DEEP3D_FOCAL, DEEP3D_CENTER, DEEP3D_CENTER).to(torch.float64)[0]
    frames = len(coeff)
    camera25 = eg3d_camera(R, t, K, DEEP3D_SIZE)
    return {
        "identity": part("identity").copy(),
        "expression": part("expression").copy(),
        "rotation": part("angles").copy(),
        "translation": t.numpy().astype(np.float32),
        "lighting": part("lighting").reshape(frames, 3, 9).transpose(0, 2, 1).copy(),
        "camera25": camera25.numpy().astype(np.float32),
        "pose6": np.concatenate([part("angles"), t.numpy().astype(np.float32)], 1),
        "intrinsics": np.broadcast_to(K.numpy().astype(np.float32), (frames, 3, 3)).copy(),
        "lmk_error": np.full(frames, np.nan, np.float32),
        "flagged": np.zeros(frames, bool),
    }


def run(config: ImportDeep3dConfig, inputs: list[str], output: str | Path, progress=None) -> ImportSummary:
    """Import every ``.mat`` among ``inputs`` (files or folders) as one clip named by its file stem."""
    started = time.perf_counter()
    if config.fps <= 0:
        raise AvatarError("--fps must be positive")
    files = find_mat_files(inputs)
    stems = [p.stem for p in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise AvatarError(f"two input files share the clip name {duplicates[0]!r}; import them separately")
    if progress is not None:
        progress.start(total_units=len(files))
    names, frames, skipped, parents = [], [], [], []
    config_json = {**asdict(config), "kind": COEFFS.kind, "importer": "deep3d", "slices": DEEP3D_SLICES}
    with ArtifactWriter(Path(output), COEFFS, config_json, [],
                        extra_attrs={"face_model": FACE_MODEL, "face_model_sha256": "",
                                     "crop_size": DEEP3D_SIZE}) as writer:
        units = writer.handle.create_group("coeffs", track_order=True)
        for path in files:
            try:
                coeff = read_deep3d(path)
            except ValueError as exc:
                skipped.append((path.stem, f"{path}: {exc}"))
                if progress is not None:
                    progress.unit_done(path.stem, "skipped", str(exc))
                continue
            group = units.create_group(path.stem)
            for key, value in coeffs_unit(coeff).items():
                group.create_dataset(key, data=value)
            group.attrs.update({"clip_id": path.stem, "fps": float(config.fps), "crop_size": DEEP3D_SIZE,
                                "source_path": str(path)})
            names.append(path.stem)
            frames.append(len(coeff))
            parents.append((str(path), sha256_file(path)))
            if progress is not None:
                progress.advance_frames(len(coeff))
                progress.unit_done(path.stem, "ok", "")
        if not names:
            raise AvatarError("none of the inputs is a readable Deep3DFaceRecon coefficient file: "
                              + "; ".join(reason for _, reason in skipped[:3]))
        writer.parents = parents
        index = writer.handle.create_group("index")
        write_strings(index, "clip_id", names)
        index.create_dataset("num_frames", data=np.asarray(frames, np.int32))
        index.create_dataset("lmk_error", data=np.full(len(names), np.nan, np.float32))
        skip = writer.handle.create_group("skipped")
        write_strings(skip, "clip_id", [n for n, _ in skipped])
        write_strings(skip, "reason", [r for _, r in skipped])
    return ImportSummary(Path(output), len(names), int(sum(frames)), skipped, time.perf_counter() - started)
