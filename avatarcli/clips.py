"""Helpers for the ``clips`` artifact's tables, shared by preprocess and merge."""

from __future__ import annotations

import h5py
import numpy as np

from avatarcli.artifact import write_strings


def write_clip_tables(
    out: h5py.File,
    clip_ids: list[str], identity_ids: list[int], num_frames: list[int], source_ids: list[int],
    identities: list[str],
    source_paths: list[str], source_sha256: list[str], source_status: list[str], source_reason: list[str],
    source_num_clips: list[int],
) -> None:
    """Write /index, /identities and /sources (see ``avatarcli.schemas.CLIPS``)."""
    index = out.create_group("index")
    write_strings(index, "clip_id", clip_ids)
    for name, values in (("identity_id", identity_ids), ("num_frames", num_frames), ("source_id", source_ids)):
        index.create_dataset(name, data=np.asarray(values, np.int32).reshape(-1))
    write_strings(out.create_group("identities"), "name", identities)
    sources = out.create_group("sources")
    for name, values in (("path", source_paths), ("sha256", source_sha256), ("status", source_status),
                         ("reason", source_reason)):
        write_strings(sources, name, values)
    sources.create_dataset("num_clips", data=np.asarray(source_num_clips, np.int32).reshape(-1))
