"""Finished sources of a preprocess run: one part file per source (in a
:class:`avatarcli.stage.PartsStore`, keyed by ``unit_key(path)``), or the units of an existing
output made with the same settings.

A part holds the source's clip groups exactly as they go into the artifact (``/clips/<name>``,
see :data:`avatarcli.schemas.CLIPS`) and the source's status, reason and sha256 as attributes; the
store's stamp says what settings made it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from avatarcli.artifact import FrameWriter, create_h5, read_strings, validate_unit
from avatarcli.identity import identity_of
from avatarcli.preprocess.source import ClipResult, SourceResult
from avatarcli.schemas import CLIPS
from avatarcli.stage import PartsStore, unit_key

CLIP_ARRAYS = ("boxes", "kps5", "lmk68", "det_score", "detected", "landmarked", "timestamps", "source_frame")


def clip_name(path: str, segment: int) -> str:
    """The artifact name of clip ``segment`` of the source at ``path``: stem, path hash, segment."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem)[:60]
    return f"{stem}-{unit_key(path)[:8]}-{segment}"


@dataclass
class UnitRecord:
    """A finished source: where its clip groups live (a part file or an earlier output)."""

    path: str
    status: str
    reason: str
    sha256: str
    file: Path | None
    clip_names: list[str]
    frames: int = 0
    stat: tuple[int, int] | None = None  # (size, mtime_ns) of the source when it was hashed


def source_unchanged(record: UnitRecord) -> bool:
    """Whether the file at ``record.path`` still has the content the record was made from: the
    sha256 decides; it is computed only when the size or mtime differ from the recorded ones
    (so a rerun over unchanged sources reads no video). A missing file counts as changed."""
    try:
        stat = os.stat(record.path)
        if record.stat is not None and (stat.st_size, stat.st_mtime_ns) == tuple(record.stat):
            return True
        from avatarcli.provenance import sha256_file

        return bool(record.sha256) and sha256_file(record.path) == record.sha256
    except OSError:
        return False


def write_clip_group(group: h5py.Group, clip: ClipResult, result: SourceResult, config,
                     frame_writer: FrameWriter) -> None:
    frame_writer.write(group, "frames", clip.frames)
    for name in CLIP_ARRAYS:
        group.create_dataset(name, data=getattr(clip, name))
    group.attrs.update({
        "source_path": result.path, "source_fps": result.source_fps, "fps": config.fps,
        "segment": clip.segment, "source_width": result.width, "source_height": result.height,
        "identity": identity_of(result.path, config.identity_from), "identity_id": -1,
    })


def write_part(store: PartsStore, result: SourceResult, config, frame_writer: FrameWriter) -> UnitRecord:
    """``result`` as the part of its source (written atomically); the record of the finished unit."""
    target = store.path(unit_key(result.path))
    with store.writing(unit_key(result.path)) as tmp:
        with create_h5(tmp) as handle:
            handle.attrs.update({
                "source_path": result.path, "status": result.status, "reason": result.reason,
                "sha256": result.sha256, "frames_in": result.frames_in,
            })
            if result.stat is not None:
                handle.attrs.update({"source_size": result.stat[0], "source_mtime_ns": result.stat[1]})
            clips = handle.create_group("clips")
            for clip in result.clips:
                write_clip_group(clips.create_group(clip_name(result.path, clip.segment)), clip, result, config,
                                 frame_writer)
    return UnitRecord(result.path, result.status, result.reason, result.sha256, target,
                      sorted(clip_name(result.path, c.segment) for c in result.clips),
                      sum(len(c.frames) for c in result.clips), result.stat)


def read_part(part: Path) -> UnitRecord | None:
    """The record of a finished part, or None if it cannot be read as one (the source is redone)."""
    try:
        with h5py.File(part, "r") as handle:
            names = list(handle["clips"].keys())
            for name in names:
                validate_unit(handle["clips"][name], CLIPS, label=str(part))
            frames = sum(int(handle["clips"][n]["frames"].shape[0]) for n in names)
            stat = None
            if "source_size" in handle.attrs:
                stat = (int(handle.attrs["source_size"]), int(handle.attrs["source_mtime_ns"]))
            return UnitRecord(str(handle.attrs["source_path"]), str(handle.attrs["status"]), str(handle.attrs["reason"]),
                              str(handle.attrs["sha256"]), part, names, frames, stat)
    except Exception:  # noqa: BLE001 - any unreadable part is redone, not fatal
        return None


def units_from_output(output: Path) -> dict[str, UnitRecord]:
    """Sources finished in an existing clips artifact (the caller checked its settings match)."""
    from avatarcli.artifact import open_artifact

    with open_artifact(output, CLIPS.kind) as handle:
        paths = read_strings(handle["sources/path"])
        status = read_strings(handle["sources/status"])
        reasons = read_strings(handle["sources/reason"])
        hashes = read_strings(handle["sources/sha256"])
        clip_ids = read_strings(handle["index/clip_id"])
        source_ids = handle["index/source_id"][()]
        frames = handle["index/num_frames"][()]
        stats = [None] * len(paths)  # written by ClipsAssembler; outputs of merge or older runs lack them
        table = handle["sources"].attrs
        if "source_size" in table and len(table["source_size"]) == len(paths):
            stats = [(int(a), int(b)) for a, b in zip(table["source_size"], table["source_mtime_ns"])]
    units = {}
    for row, path in enumerate(paths):
        mine = [clip_ids[i] for i in np.flatnonzero(source_ids == row)]
        units[path] = UnitRecord(path, status[row], reasons[row], hashes[row], output, mine,
                                 int(frames[source_ids == row].sum()), stats[row])
    return units
