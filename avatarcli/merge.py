"""Combine shard artifacts of one kind (``avatar merge``): copy, or HDF5 virtual datasets."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from avatarcli.artifact import (
    VIRTUAL_SOURCES, ArtifactWriter, get_schema, open_artifact, read_config, read_strings, read_virtual_sources,
    write_strings,
)
from avatarcli.clips import write_clip_tables
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file


def _link_virtual(src: h5py.Group, dst: h5py.Group, source_file: str) -> None:
    """Recreate ``src``'s datasets (subgroups too) in ``dst`` as virtual datasets that read from ``source_file``."""
    for name, dataset in src.items():
        if isinstance(dataset, h5py.Group):  # e.g. the truth/ of synthetic clips
            _link_virtual(dataset, dst.create_group(name), source_file)
            continue
        layout = h5py.VirtualLayout(shape=dataset.shape, dtype=dataset.dtype)
        layout[...] = h5py.VirtualSource(source_file, dataset.name, shape=dataset.shape)
        dst.create_virtual_dataset(name, layout)
    dst.attrs.update(dict(src.attrs))


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (also through links; a missing path is no file)."""
    if a.absolute().resolve() == b.absolute().resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _source_name(source: Path, output: Path) -> str:
    """How the merged file names ``source``: relative to its folder (HDF5 resolves relative virtual
    source names against the virtual file's folder first), so the two can move together."""
    try:
        return os.path.relpath(source.absolute().resolve(), output.absolute().parent.resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        return str(source.absolute().resolve())


def check_output(inputs: list[Path], output: Path, overwrite: bool) -> None:
    """Refuse an output that is one of the inputs (always) or an existing file (unless ``overwrite``)."""
    for path in inputs:
        if _same_file(output, path):
            raise AvatarError(f"output {output} is also an input ({path}); avatar merge never replaces its inputs, "
                              "even with --overwrite: choose another output")
    if output.exists() and not overwrite:
        raise AvatarError(f"{output} already exists; use --overwrite to replace it or choose another output")


def merge_clips(inputs: list[Path], output: Path, virtual: bool = False, overwrite: bool = False) -> dict:
    """Merge clips artifacts (e.g. ``--shard K/N`` outputs) into one; identities are re-indexed.

    With ``virtual`` the merged file reads the inputs (named relative to its folder) and records
    each file it reads, with its size and sha256, under ``/virtual_sources``: opening it checks them.
    """
    inputs, output = [Path(p) for p in inputs], Path(output)
    check_output(inputs, output, overwrite)
    schema = get_schema("clips")
    handles = [open_artifact(p, "clips") for p in inputs]
    try:
        # inputs that are virtual merges themselves read their shards: replacing one would break them
        sources = {path: read_virtual_sources(handle) for path, handle in zip(inputs, handles)}
        for path, rows in sources.items():
            for source, _, _ in rows:
                if _same_file(output, source):
                    raise AvatarError(f"output {output} is a file that input {path} reads (a virtual merge); "
                                      "choose another output")
        if sum(handle["index/clip_id"].shape[0] for handle in handles) == 0:
            raise AvatarError(f"nothing to merge: the {len(inputs)} input(s) hold 0 clips")
        configs = [read_config(h) for h in handles]
        hashes = {c.get("result_hash") for c in configs}
        if len(hashes) > 1:
            raise AvatarError("cannot merge clips artifacts made with different settings (result_hash differs)")
        sizes = {int(h.attrs["crop_size"]) for h in handles}
        if len(sizes) > 1:
            raise AvatarError(f"cannot merge clips of different crop sizes {sorted(sizes)}")
        names: list[str] = []
        for handle in handles:
            names.extend(read_strings(handle["identities/name"]))
        identities = sorted(set(names))
        ids = {name: i for i, name in enumerate(identities)}
        clip_ids, identity_col, frames_col, source_col = [], [], [], []
        src_path, src_sha, src_status, src_reason, src_clips = [], [], [], [], []
        seen_clips: set[str] = set()
        config = {**configs[0], "merged_from": [str(p) for p in inputs], "shard": ""}
        parents = [(str(p), sha256_file(p)) for p in inputs]
        # every file the merged one reads, the inputs' own shards too: (name, size, sha256)
        reads: dict[str, tuple[int, str]] = {}
        for (path, sha), rows in zip(parents, sources.values()):
            reads[_source_name(Path(path), output)] = (Path(path).stat().st_size, sha)
            reads.update({_source_name(source, output): (size, digest) for source, size, digest in rows})
        with ArtifactWriter(output, schema, config, parents,
                            extra_attrs={"crop_size": handles[0].attrs["crop_size"], "fps": handles[0].attrs["fps"]}) as writer:
            out = writer.handle
            clips = out.create_group("clips", track_order=True)
            for path, handle in zip(inputs, handles):
                source_name = _source_name(path, output)
                offset = len(src_path)
                src_path += read_strings(handle["sources/path"])
                src_sha += read_strings(handle["sources/sha256"])
                src_status += read_strings(handle["sources/status"])
                src_reason += read_strings(handle["sources/reason"])
                src_clips += handle["sources/num_clips"][()].tolist()
                local_names = read_strings(handle["identities/name"])
                for clip_id, identity, frames, source in zip(
                    read_strings(handle["index/clip_id"]), handle["index/identity_id"][()],
                    handle["index/num_frames"][()], handle["index/source_id"][()],
                ):
                    if clip_id in seen_clips:
                        raise AvatarError(f"clip {clip_id} appears in more than one input (overlapping shards?)")
                    seen_clips.add(clip_id)
                    if virtual:
                        _link_virtual(handle["clips"][clip_id], clips.create_group(clip_id), source_name)
                    else:
                        handle.copy(handle["clips"][clip_id], clips, name=clip_id)
                    new_id = ids[local_names[identity]]
                    clips[clip_id].attrs["identity_id"] = new_id
                    clip_ids.append(clip_id)
                    identity_col.append(new_id)
                    frames_col.append(int(frames))
                    source_col.append(int(source) + offset)
            write_clip_tables(out, clip_ids, identity_col, frames_col, source_col, identities,
                              src_path, src_sha, src_status, src_reason, src_clips)
            if virtual:
                record = out.create_group(VIRTUAL_SOURCES)
                write_strings(record, "path", list(reads))
                record.create_dataset("size_bytes", data=np.asarray([s for s, _ in reads.values()], np.int64))
                write_strings(record, "sha256", [h for _, h in reads.values()])
    finally:
        for handle in handles:
            handle.close()
    return {"clips": len(clip_ids), "identities": len(identities), "sources": len(src_path)}
