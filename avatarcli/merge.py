"""Combine shard artifacts of one kind (``avatar merge``): copy, or HDF5 virtual datasets."""

from __future__ import annotations

from pathlib import Path

import h5py

from avatarcli.artifact import ArtifactWriter, get_schema, open_artifact, read_config, read_strings
from avatarcli.clips import write_clip_tables
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file


def _link_virtual(src: h5py.Group, dst: h5py.Group, source_file: str) -> None:
    """Recreate ``src``'s datasets in ``dst`` as virtual datasets that read from ``source_file``."""
    for name, dataset in src.items():
        layout = h5py.VirtualLayout(shape=dataset.shape, dtype=dataset.dtype)
        layout[...] = h5py.VirtualSource(source_file, dataset.name, shape=dataset.shape)
        dst.create_virtual_dataset(name, layout)
    dst.attrs.update(dict(src.attrs))


def merge_clips(inputs: list[Path], output: Path, virtual: bool = False) -> dict:
    """Merge clips artifacts (e.g. ``--shard K/N`` outputs) into one; identities are re-indexed."""
    schema = get_schema("clips")
    handles = [open_artifact(p, "clips") for p in inputs]
    try:
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
        with ArtifactWriter(output, schema, config, parents,
                            extra_attrs={"crop_size": handles[0].attrs["crop_size"], "fps": handles[0].attrs["fps"]}) as writer:
            out = writer.handle
            clips = out.create_group("clips", track_order=True)
            for path, handle in zip(inputs, handles):
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
                        _link_virtual(handle["clips"][clip_id], clips.create_group(clip_id), str(Path(path).absolute()))
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
    finally:
        for handle in handles:
            handle.close()
    return {"clips": len(clip_ids), "identities": len(identities), "sources": len(src_path)}
