"""Deep3DFaceRecon coefficient files (``.mat``): the one reader every command uses.

A file's ``coeff`` is [T,257] per frame: identity [0:80], expression [80:144], texture [144:224],
angles [224:227] (pitch, yaw, roll, radians), SH lighting [227:254] (3 channels × 9), translation
[254:257] (decimetres).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEEP3D_SLICES = {"identity": (0, 80), "expression": (80, 144), "texture": (144, 224), "angles": (224, 227),
                 "lighting": (227, 254), "translation": (254, 257)}


def read_deep3d(path: str | Path) -> np.ndarray:
    """``coeff`` [T,257] float32 of one Deep3DFaceRecon result file.

    Raises ``ValueError`` with the reason (without the path) when the file is not one: callers
    either skip the file or turn the reason into an ``AvatarError`` naming it.
    """
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


def deep3d_part(coeff: np.ndarray, name: str) -> np.ndarray:
    """The columns of one part (a key of ``DEEP3D_SLICES``) of ``coeff`` [T,257]: a view [T,k]."""
    start, stop = DEEP3D_SLICES[name]
    return coeff[:, start:stop]


VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def expand_mat_inputs(inputs: list[str]) -> list[Path]:
    """.mat files and folders of them (recursive, sorted), duplicates dropped; anything else is an error."""
    from avatarcli.errors import AvatarError

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*.mat") if p.is_file()))
        elif path.suffix.lower() == ".mat" and path.is_file():
            paths.append(path)
        elif not path.exists():
            raise AvatarError(f"{item}: no such file or folder")
        else:
            raise AvatarError(f"{item}: expected a Deep3DFaceRecon .mat file or a folder of them")
    unique = list(dict.fromkeys(p.absolute() for p in paths))
    if not unique:
        raise AvatarError(f"no .mat files in {', '.join(inputs)}")
    return unique


def find_video_for(mat: Path) -> Path | None:
    """The face-crop video a coefficient file was fitted on: ``<dir>/../video/<stem>.*`` (StyleTalk's
    layout) or beside the ``.mat``; None if neither exists."""
    for folder in (mat.parent.parent / "video", mat.parent):
        for suffix in VIDEO_SUFFIXES:
            candidate = folder / f"{mat.stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None
