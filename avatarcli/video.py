"""Video decoding with decord: probing, timestamp-based resampling to a fixed fps, rotation."""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".flv", ".mpg", ".mpeg", ".wmv", ".ts", ".3gp"}


class SkipInput(Exception):
    """An input that cannot be used; the message is the reason recorded in the artifact."""


@dataclass
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    rotation: int
    """Clockwise degrees to rotate decoded frames for display (0, 90, 180, 270)."""
    starts: np.ndarray
    """[n] presentation start time of each decoded frame, seconds."""
    ends: np.ndarray


def _mp4_boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def mp4_rotation(path: str) -> int:
    """Display rotation of the video track of an MP4/MOV (clockwise degrees), from tkhd's matrix.

    decord returns frames as stored; phones store portrait video landscape with a rotation
    matrix, which players (and ffmpeg's autorotate) honour.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return 0
    for kind, start, end in _mp4_boxes(data, 0, len(data)):
        if kind != b"moov":
            continue
        for tkind, tstart, tend in _mp4_boxes(data, start, end):
            if tkind != b"trak":
                continue
            for hkind, hstart, hend in _mp4_boxes(data, tstart, tend):
                if hkind != b"tkhd":
                    continue
                version = data[hstart]
                matrix_at = hstart + (52 if version == 1 else 40)
                if matrix_at + 44 > hend:
                    continue
                a, b = struct.unpack(">ii", data[matrix_at : matrix_at + 8])
                width, height = struct.unpack(">II", data[matrix_at + 36 : matrix_at + 44])
                if width == 0 or height == 0:  # audio track
                    continue
                theta = math.degrees(math.atan2(b / 65536.0, a / 65536.0))
                return int(round(theta / 90.0)) % 4 * 90
    return 0


def open_video(path: str, num_threads: int = 0):
    """Open ``path`` with decord and return (reader, info); bad input raises ``SkipInput``."""
    import decord

    if not os.path.exists(path):
        raise SkipInput("file not found")
    size = os.path.getsize(path)
    if size == 0:
        raise SkipInput("empty file (0 bytes)")
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as exc:  # decord raises DECORDError or RuntimeError for unreadable containers
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
        raise SkipInput(f"not a readable video ({first})") from None
    count = len(reader)
    if count == 0:
        raise SkipInput("zero-length video (no frames)")
    stamps = np.asarray(reader.get_frame_timestamp(range(count)), dtype=np.float64).reshape(count, 2)
    first = reader[0].shape
    fps = float(reader.get_avg_fps() or 0.0)
    info = VideoInfo(
        path=path, num_frames=count, fps=fps, width=int(first[1]), height=int(first[0]),
        rotation=mp4_rotation(path) if Path(path).suffix.lower() in {".mp4", ".mov", ".m4v", ".3gp"} else 0,
        starts=stamps[:, 0], ends=stamps[:, 1],
    )
    reader.seek(0)
    return reader, info


def resample_indices(starts: np.ndarray, ends: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Source frame shown at each output time ``t0 + k/fps`` (variable frame rate safe).

    Returns (source indices [T], output times [T] in seconds of the source).
    """
    order = np.argsort(starts, kind="stable")
    starts_sorted = starts[order]
    t0 = float(starts_sorted[0])
    t_end = float(max(ends.max(), starts_sorted[-1]))
    count = int(math.floor((t_end - t0) * fps + 1e-6))
    count = max(count, 1)
    times = t0 + np.arange(count, dtype=np.float64) / fps
    shown = np.searchsorted(starts_sorted, times + 1e-9, side="right") - 1
    shown = np.clip(shown, 0, len(starts_sorted) - 1)
    return order[shown].astype(np.int64), times


def rotate_frames(frames: np.ndarray, rotation: int) -> np.ndarray:
    if rotation == 0:
        return frames
    return np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=(1, 2)))


def decode(reader, info: VideoInfo, indices: np.ndarray, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (offset, frames [b,H,W,3] uint8 RGB) for ``indices`` in batches.

    A decode error mid-stream (a truncated file) ends the stream at the last good frame; the
    caller sees fewer frames than asked for.
    """
    # Duplicate indices (upsampling) are decoded once per batch.
    for offset in range(0, len(indices), batch):
        wanted = indices[offset : offset + batch]
        unique, inverse = np.unique(wanted, return_inverse=True)
        try:
            frames = reader.get_batch(unique.tolist()).asnumpy()
        except Exception:
            good = []
            for index in unique.tolist():
                try:
                    good.append(reader[index].asnumpy())
                except Exception:
                    break
            if not good:
                return
            frames = np.stack(good)
            keep = inverse < len(good)
            # only the leading run of decodable frames is kept
            stop = int(np.argmin(keep)) if not keep.all() else len(keep)
            if stop:
                yield offset, rotate_frames(frames[inverse[:stop]], info.rotation)
            return
        # Without duplicates the frames are already in order: skip the copy (100 MB per 512² batch,
        # made holding the GIL, which starved the GPU thread of preprocess).
        yield offset, rotate_frames(frames if len(unique) == len(wanted) else frames[inverse], info.rotation)
