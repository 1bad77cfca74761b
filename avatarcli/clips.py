"""The ``clips`` artifact: its tables (shared by preprocess and merge) and the in-order assembler of preprocess."""

from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np

from avatarcli.artifact import ArtifactWriter, write_strings
from avatarcli.identity import identity_of
from avatarcli.schemas import CLIPS


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


class ClipsAssembler:
    """Builds a clips artifact while a run goes on: finished units (``avatarcli.preprocess.parts.
    UnitRecord``: a source's clip groups in a part file or an earlier output) are copied into its
    temp file in source order as they arrive (``offer``, from any thread; one background thread
    copies), so at the end only the tables remain (the copies were a 0.45 s serial tail per 3200
    frames on the H100). Identity ids are known only when every source is done: set in ``finish``.
    Use as a context manager; leaving it with an exception removes the temp file. ``close()``
    after ``finish`` validates the artifact and renames it into place (leaving the context then
    does nothing more).

    ``config``: the preprocess settings (``identity_from``, ``crop_size``, ``fps``, ``to_json()``).
    """

    def __init__(self, output: Path, sources: list[str], config):
        self.sources, self.config = sources, config
        self.position = {p: i for i, p in enumerate(sources)}
        config_json = {**config.to_json(), "kind": CLIPS.kind}
        self.writer = ArtifactWriter(output, CLIPS, config_json, [],
                                     extra_attrs={"crop_size": config.crop_size, "fps": config.fps})
        self.ready: dict[int, object] = {}
        self.next = 0  # sources before this one are copied
        self.copied: list[tuple[int, str, int]] = []  # (source row, clip name, frames)
        self.lock = threading.Condition()
        self.failure: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.open_files: dict[Path, h5py.File] = {}
        self.closed = False

    def __enter__(self) -> "ClipsAssembler":
        self.writer.__enter__()
        self.clips = self.writer.handle.create_group("clips", track_order=True)
        self.thread = threading.Thread(target=self._copy_loop, daemon=True, name="assemble")
        self.thread.start()
        return self

    def offer(self, unit) -> None:
        with self.lock:
            self.ready[self.position[unit.path]] = unit
            self.lock.notify_all()

    def _copy_loop(self) -> None:
        try:
            while True:
                with self.lock:
                    while self.next not in self.ready and self.next < len(self.sources) and self.failure is None:
                        self.lock.wait()
                    if self.next >= len(self.sources) or self.failure is not None:
                        return
                    row, unit = self.next, self.ready[self.next]
                self._copy(row, unit)
                with self.lock:
                    self.next += 1
                    self.lock.notify_all()
        except BaseException as exc:  # re-raised by finish()
            with self.lock:
                self.failure = exc
                self.lock.notify_all()

    def _copy(self, row: int, unit) -> None:
        if not unit.clip_names:
            return
        if unit.file not in self.open_files:
            self.open_files[unit.file] = h5py.File(unit.file, "r")
        src = self.open_files[unit.file]["clips"]
        for name in unit.clip_names:
            src.copy(src[name], self.clips, name=name)  # H5Ocopy: compressed chunks copied as is
            self.clips[name].attrs["identity"] = identity_of(unit.path, self.config.identity_from)
            self.copied.append((row, name, int(self.clips[name]["frames"].shape[0])))
        if Path(unit.file) != Path(self.writer.path):
            self.open_files.pop(unit.file).close()  # a part file: done with it

    def finish(self, units: dict) -> dict:
        """Wait for the copies, write the tables; the artifact is validated and renamed on exit.
        ``units``: the record of every source, by path. Returns the counts of clips, frames and
        identities."""
        for unit in units.values():
            if self.position.get(unit.path, -1) not in self.ready:
                self.offer(unit)
        self.thread.join()
        if self.failure is not None:
            raise self.failure
        sources, config = self.sources, self.config
        identities = sorted({identity_of(p, config.identity_from) for p in sources
                             if units[p].status == "ok" and units[p].clip_names})
        identity_ids = {name: i for i, name in enumerate(identities)}
        clip_identity = []
        for row, name, _ in self.copied:
            identity_id = identity_ids[identity_of(sources[row], config.identity_from)]
            self.clips[name].attrs["identity_id"] = identity_id
            clip_identity.append(identity_id)
        self.writer.parents = [(p, units[p].sha256) for p in sources]
        write_clip_tables(
            self.writer.handle, [c[1] for c in self.copied], clip_identity, [c[2] for c in self.copied],
            [c[0] for c in self.copied], identities, sources,
            [units[p].sha256 for p in sources], [units[p].status for p in sources],
            [units[p].reason for p in sources], [len(units[p].clip_names) for p in sources],
        )
        if all(units[p].stat is not None for p in sources):  # lets a rerun skip hashing unchanged sources
            table = self.writer.handle["sources"].attrs
            table["source_size"] = np.asarray([units[p].stat[0] for p in sources], np.int64)
            table["source_mtime_ns"] = np.asarray([units[p].stat[1] for p in sources], np.int64)
        return {"clips": len(self.copied), "frames": int(sum(c[2] for c in self.copied)), "identities": len(identities)}

    def close(self) -> None:
        """After ``finish``: the artifact is validated and renamed into place."""
        self.__exit__(None, None, None)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.closed:
            return
        self.closed = True
        if self.thread is not None and self.thread.is_alive():
            with self.lock:
                self.failure = self.failure or RuntimeError("assembly stopped")
                self.lock.notify_all()
            self.thread.join()
        for handle in self.open_files.values():
            handle.close()
        self.open_files.clear()
        self.writer.__exit__(exc_type, exc, tb)
