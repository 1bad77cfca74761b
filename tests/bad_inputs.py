"""A corpus of bad and unusual inputs, and what each must lead to (issue 16).

``make_video_corpus(root, face_video)`` writes videos with the project's writer
(:class:`avatarcli.video.VideoWriter`) and raw files; ``VIDEO_OUTCOMES`` says, per file, whether
``avatar preprocess`` keeps it (``ok``) or records a skip and with what reason (a substring).
``make_artifact_corpus(root, clips)`` writes broken or foreign HDF5 files; ``ARTIFACT_OUTCOMES``
gives the one-line error each must produce.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

# name -> ("ok", note substring or "") or ("skipped", reason substring)
VIDEO_OUTCOMES = {
    "zero.mp4": ("skipped", "empty file (0 bytes)"),
    "random.mp4": ("skipped", "not a readable video"),
    "text.mp4": ("skipped", "not a readable video"),
    "image.mp4": ("skipped", "not a readable video"),
    "truncated.mp4": ("ok", "truncated: decoded"),
    "noface.mp4": ("skipped", "no face detected"),
    "oneframe.mp4": ("skipped", "no usable face track"),
    "gray.mp4": ("ok", ""),
    "portrait.mp4": ("ok", ""),
    "big1440p.mp4": ("ok", ""),
    "fps15.mp4": ("ok", ""),
    "fps60.mp4": ("ok", ""),
    "twofaces.mp4": ("ok", ""),
    "vfr.mp4": ("ok", ""),
    "rotated.mp4": ("ok", ""),
}


def _faces(face_video: Path, count: int) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(face_video))
    return reader.get_batch(list(range(count))).asnumpy()  # [T,H,W,3] uint8


def _write(path: Path, frames: np.ndarray, fps=25, **kwargs) -> Path:
    from avatarcli.video import write_video

    write_video(path, frames, fps, crf=23, **kwargs)
    return path


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def make_video_corpus(root: Path, face_video: Path, frames: int = 40) -> dict[str, Path]:
    """Write every case of ``VIDEO_OUTCOMES`` into ``root`` (face clips are cut from ``face_video``)."""
    root.mkdir(parents=True, exist_ok=True)
    longer = _faces(face_video, 2 * frames)  # e.g. 512x512 talking head
    faces = longer[:frames]
    side = faces.shape[1]
    rng = np.random.default_rng(0)
    out = {}
    out["zero.mp4"] = root / "zero.mp4"
    out["zero.mp4"].write_bytes(b"")
    out["random.mp4"] = root / "random.mp4"
    out["random.mp4"].write_bytes(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    out["text.mp4"] = root / "text.mp4"
    out["text.mp4"].write_text("this is not a video\n" * 100)
    from PIL import Image

    out["image.mp4"] = root / "image.mp4"
    Image.fromarray(faces[0]).save(out["image.mp4"], format="PNG")
    whole = _write(root / "whole.tmpvideo.mp4", longer)  # long enough that 70% of it is a usable clip
    data = whole.read_bytes()
    whole.unlink()
    out["truncated.mp4"] = root / "truncated.mp4"  # the file cut at 70%: a decodable prefix
    out["truncated.mp4"].write_bytes(data[: int(len(data) * 0.7)])
    gradient = np.linspace(0, 255, side, dtype=np.float32)[None, :, None, None]
    noface = np.broadcast_to(gradient, (frames, side, side, 3)).astype(np.uint8)
    out["noface.mp4"] = _write(root / "noface.mp4", noface)
    out["oneframe.mp4"] = _write(root / "oneframe.mp4", faces[:1])
    gray = faces.mean(-1, keepdims=True).round().astype(np.uint8).repeat(3, -1)
    out["gray.mp4"] = _write(root / "gray.mp4", gray)
    portrait = np.zeros((frames, 1280, 720, 3), np.uint8)
    portrait[:, 384:384 + 720, :] = _resize(faces, 720, 720)
    out["portrait.mp4"] = _write(root / "portrait.mp4", portrait)
    big = np.zeros((frames, 1440, 2560, 3), np.uint8)
    big[:, 180:180 + 1080, 740:740 + 1080] = _resize(faces, 1080, 1080)
    out["big1440p.mp4"] = _write(root / "big1440p.mp4", big)
    out["fps15.mp4"] = _write(root / "fps15.mp4", faces, fps=15)
    out["fps60.mp4"] = _write(root / "fps60.mp4", longer, fps=60)  # 80 frames: 1.33 s, 33 at 25 fps
    two = np.zeros((frames, side, side * 2, 3), np.uint8)
    two[:, :, :side] = faces
    small = side // 2
    two[:, side // 4:side // 4 + small, side + small // 2:side + small // 2 + small] = _resize(faces[::-1], small, small)
    out["twofaces.mp4"] = _write(root / "twofaces.mp4", two)
    # variable frame rate: alternating 40 ms and 80 ms between frames (25 and 12.5 fps)
    steps = np.where(np.arange(frames) % 2 == 0, 0.04, 0.08)
    timestamps = np.concatenate([[0.0], np.cumsum(steps[:-1])])
    out["vfr.mp4"] = _write(root / "vfr.mp4", faces, timestamps=timestamps)
    # stored sideways (as phones do) with a rotation matrix that turns it upright for display
    sideways = np.ascontiguousarray(np.rot90(faces, k=1, axes=(1, 2)))  # 90° counter-clockwise
    out["rotated.mp4"] = _write(root / "rotated.mp4", sideways, rotation=90)
    return out


# name -> substring of the one-line error any stage reading it must give
ARTIFACT_OUTCOMES = {
    "truncated.h5": "not an HDF5 file",
    "random.h5": "not an HDF5 file",
    "wrong_kind.h5": "wrong artifact kind 'coeffs', expected 'clips'",
    "newer_version.h5": "schema version 99 is newer than this avatar supports",
    "not_avatar.h5": "not an avatar artifact",
}


def make_artifact_corpus(root: Path, clips: Path, coeffs: Path) -> dict[str, Path]:
    """Broken or foreign HDF5 files made from a good clips artifact and a coeffs artifact."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    data = clips.read_bytes()
    out["truncated.h5"] = root / "truncated.h5"
    out["truncated.h5"].write_bytes(data[: len(data) // 3])
    out["random.h5"] = root / "random.h5"
    out["random.h5"].write_bytes(np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    out["wrong_kind.h5"] = shutil.copy(coeffs, root / "wrong_kind.h5")
    out["newer_version.h5"] = shutil.copy(clips, root / "newer_version.h5")
    with h5py.File(out["newer_version.h5"], "r+") as handle:
        handle.attrs["avatar_schema_version"] = 99
    out["not_avatar.h5"] = root / "not_avatar.h5"
    with h5py.File(out["not_avatar.h5"], "w") as handle:
        handle["x"] = np.zeros(3)
    return {k: Path(v) for k, v in out.items()}
