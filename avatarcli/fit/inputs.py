"""What the solver fits: a clip's landmarks (and frames), read from a clips artifact; batches of clips."""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass

import numpy as np


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


def read_clip_inputs(handle, names: list[str], with_frames: bool,
                     reader=None) -> tuple[list[ClipInput], list[tuple[str, str]]]:
    """Landmarks (and frames, inflated in threads by ``reader``, a :class:`avatarcli.artifact.FrameReader`)
    of the clips ``names`` of an open clips artifact (``h5py.File``). Returns the clips and (name,
    reason) of those skipped."""
    from avatarcli.artifact import FrameReader, validate_unit
    from avatarcli.schemas import CLIPS

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
    """Whole clips, in order, packed into batches of at most ``batch_frames`` frames (a longer clip
    is a batch of its own)."""
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
