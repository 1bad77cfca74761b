"""Generic loading for trainers: frames downscaled to a training size, square face-crop videos decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """[T,H,W,3] uint8 -> [T,size,size,3] uint8 (area interpolation; returned as is when already that size)."""
    import cv2

    if frames.shape[1] == size and frames.shape[2] == size:
        return np.ascontiguousarray(frames)
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return out


def decode_square_video(video: Path, max_frames: int) -> tuple[np.ndarray | None, str]:
    """(the first ``max_frames`` frames [T,s,s,3] uint8, '') of a square face-crop video, or
    (None, why not) when it cannot be read or is not square."""
    from avatarcli.video import SkipInput, open_video

    try:
        reader, info = open_video(str(video))
    except SkipInput as exc:
        return None, f"{video.name}: {exc}"
    if info.width != info.height:
        return None, (f"{video.name} is {info.width}x{info.height}, not a square face crop; run avatar preprocess "
                      f"on it and pass the clips artifact with --coeffs")
    count = min(info.num_frames, max_frames)
    frames = reader.get_batch(list(range(count))).asnumpy()
    return frames, ""
