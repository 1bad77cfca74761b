"""HDF5 artifacts: schemas declared once, validated on write and on read, written atomically.

Layout shared by every kind:

* root attributes ``avatar_kind``, ``avatar_schema_version``, ``avatar_version``,
  ``avatar_git_commit``, ``created_utc``, ``config_json`` (the resolved stage config);
* ``/provenance/parent_path`` and ``/provenance/parent_sha256``: the inputs with content hashes
  (datasets rather than an attribute so that 100k parents fit);
* root datasets of the kind (indexes, tables);
* optionally one group per unit (for clips: ``/clips/<clip_id>``) whose datasets share the
  unit-scoped symbolic dimensions (``T`` = frames of that clip).

Shapes are symbolic: an int is a fixed size, a string names a dimension that must agree
everywhere it appears in its scope (unit symbols are re-bound per unit, global ones are shared).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import numpy as np
from isal import isal_zlib

from avatarcli.errors import ArtifactError
from avatarcli.provenance import base_attrs
# The schema types live with the built-in kinds (one module, no import circle); re-exported here.
from avatarcli.schemas import (  # noqa: F401
    COMMON_ROOT_ATTRS, PROVENANCE_DATASETS, STR, ArtifactSchema, DatasetSpec, get_schema, register_schema,
)

STR_DTYPE = h5py.string_dtype("utf-8")


# --------------------------------------------------------------------------------------------
# validation


def _dtype_matches(dataset: h5py.Dataset, expected: str) -> bool:
    if expected == STR:
        return h5py.check_string_dtype(dataset.dtype) is not None
    if expected == "bool":
        return dataset.dtype == np.bool_ or dataset.dtype == np.uint8
    return dataset.dtype == np.dtype(expected)


def _check_dataset(
    where: str, dataset: h5py.Dataset, spec: DatasetSpec, bindings: dict[str, int]
) -> None:
    if not _dtype_matches(dataset, spec.dtype):
        raise ArtifactError(f"{where}: dtype {dataset.dtype} does not match schema dtype {spec.dtype}")
    shape = dataset.shape
    if len(shape) != len(spec.shape):
        raise ArtifactError(
            f"{where}: shape {list(shape)} does not match schema shape {list(spec.shape)} (rank differs)"
        )
    for axis, (actual, expected) in enumerate(zip(shape, spec.shape)):
        if isinstance(expected, int):
            if actual != expected:
                raise ArtifactError(
                    f"{where}: shape {list(shape)} does not match schema shape {list(spec.shape)} "
                    f"(axis {axis} is {actual}, expected {expected})"
                )
        elif expected in bindings:
            if actual != bindings[expected]:
                raise ArtifactError(
                    f"{where}: shape {list(shape)} does not match schema shape {list(spec.shape)} "
                    f"({expected}={actual} here but {expected}={bindings[expected]} elsewhere)"
                )
        else:
            bindings[expected] = actual


def validate(handle: h5py.File, schema: ArtifactSchema, *, deep: bool = True, name: str = "") -> None:
    """Raise ``ArtifactError`` unless ``handle`` is a valid artifact of ``schema``.

    ``deep=False`` checks the root, the tables and the first unit only (opening a 100k-clip
    artifact stays fast); readers validate each unit when they load it.
    """
    label = name or handle.filename
    kind = handle.attrs.get("avatar_kind")
    if kind is None:
        raise ArtifactError(f"{label}: not an avatar artifact (no avatar_kind attribute)")
    kind = str(kind)
    if kind != schema.kind:
        raise ArtifactError(f"{label}: wrong artifact kind {kind!r}, expected {schema.kind!r}")
    version = int(handle.attrs.get("avatar_schema_version", -1))
    if version > schema.version:
        raise ArtifactError(
            f"{label}: {kind} schema version {version} is newer than this avatar supports "
            f"({schema.version}); upgrade avatar"
        )
    if version < 1:
        raise ArtifactError(f"{label}: invalid schema version {version}")
    for attr in (*COMMON_ROOT_ATTRS, *schema.root_attrs):
        if attr not in handle.attrs:
            raise ArtifactError(f"{label}: missing root attribute {attr!r}")
    bindings: dict[str, int] = {}
    for spec in (*PROVENANCE_DATASETS, *schema.datasets):
        if spec.path not in handle:
            if spec.optional:
                continue
            raise ArtifactError(f"{label}: missing dataset /{spec.path}")
        _check_dataset(f"{label}:/{spec.path}", handle[spec.path], spec, bindings)
    if schema.unit_group is None:
        return
    if schema.unit_group not in handle:
        raise ArtifactError(f"{label}: missing group /{schema.unit_group}")
    units = handle[schema.unit_group]
    if schema.unit_count_symbol and bindings.get(schema.unit_count_symbol, len(units)) != len(units):
        raise ArtifactError(
            f"{label}: index lists {bindings[schema.unit_count_symbol]} units but "
            f"/{schema.unit_group} holds {len(units)}"
        )
    names: Iterable[str] = units.keys() if deep else list(units.keys())[:1]
    for unit_name in names:
        validate_unit(units[unit_name], schema, bindings, label=label)


def validate_unit(
    group: h5py.Group, schema: ArtifactSchema, bindings: dict[str, int] | None = None, *, label: str = ""
) -> None:
    shared = bindings if bindings is not None else {}
    local = {k: v for k, v in shared.items() if k in schema.global_symbols}
    where = f"{label}:{group.name}"
    for attr in schema.unit_attrs:
        if attr not in group.attrs:
            raise ArtifactError(f"{where}: missing attribute {attr!r}")
    for spec in schema.unit_datasets:
        if spec.path not in group:
            if spec.optional:
                continue
            raise ArtifactError(f"{where}: missing dataset {spec.path}")
        _check_dataset(f"{where}/{spec.path}", group[spec.path], spec, local)
    for symbol in schema.global_symbols:
        if symbol in local:
            shared[symbol] = local[symbol]


# --------------------------------------------------------------------------------------------
# reading


def read_kind(path: str | os.PathLike) -> str:
    """The kind of the artifact at ``path`` (raises a one-line error if it is not one)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as handle:
            kind = handle.attrs.get("avatar_kind")
    except OSError as exc:
        raise ArtifactError(f"{path}: not an HDF5 file ({exc.__class__.__name__})") from None
    if kind is None:
        raise ArtifactError(f"{path}: not an avatar artifact (no avatar_kind attribute)")
    return str(kind)


def open_artifact(path: str | os.PathLike, kind: str | None = None, *, deep: bool = False,
                  hashes: bool | None = None) -> h5py.File:
    """Open an artifact read-only and validate it against its schema (``kind`` if given).

    The files a virtual artifact reads (``avatar merge --virtual``) must be where it says and of
    their recorded size; ``hashes`` (default: ``deep``) compares their sha256 too (reads them whole).
    """
    path = Path(path)
    actual = read_kind(path)
    schema = get_schema(kind or actual)
    handle = h5py.File(path, "r")
    try:
        validate(handle, schema, deep=deep, name=str(path))
        check_virtual_sources(handle, schema, hashes=deep if hashes is None else hashes, name=str(path))
    except BaseException:
        handle.close()
        raise
    return handle


# Group of a virtual artifact listing the files it reads: path (relative to the artifact's folder
# where possible, as its virtual datasets name them), size_bytes and sha256 at merge time.
VIRTUAL_SOURCES = "virtual_sources"


def _resolve_source(handle: h5py.File, file_name: str) -> Path:
    """A virtual dataset's source file as HDF5 finds it first: relative names against the artifact's folder."""
    return Path(handle.filename).absolute().parent / file_name


def read_virtual_sources(handle: h5py.File) -> list[tuple[Path, int, str]]:
    """(path, size in bytes, sha256) of each file a virtual artifact reads; [] for one that holds its data."""
    if VIRTUAL_SOURCES not in handle:
        return []
    group = handle[VIRTUAL_SOURCES]
    return [(_resolve_source(handle, name), int(size), sha) for name, size, sha in
            zip(read_strings(group["path"]), group["size_bytes"][()], read_strings(group["sha256"]))]


def check_virtual_sources(handle: h5py.File, schema: ArtifactSchema, *, hashes: bool = False, name: str = "") -> None:
    """Raise ``ArtifactError`` naming a source file of a virtual artifact that is missing, is the
    artifact itself, or has changed since the merge: HDF5 would read zeros (or recurse and crash).

    Checks the recorded sources, and the sources of the first unit's virtual datasets (so that a
    virtual artifact without the record, from an older avatar, is checked too).
    """
    label = name or handle.filename
    recorded = {path: (size, sha) for path, size, sha in read_virtual_sources(handle)}
    sources = dict.fromkeys(recorded)
    if schema.unit_group and len(handle.get(schema.unit_group, ())):
        group = handle[schema.unit_group]
        first = group[next(iter(group))]
        datasets: list[h5py.Dataset] = []
        first.visititems(lambda _, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        for dataset in datasets:
            if dataset.is_virtual:
                sources.update(dict.fromkeys(_resolve_source(handle, vds.file_name)
                                             for vds in dataset.virtual_sources() if vds.file_name != "."))
    for path in sources:
        if not path.is_file():
            raise ArtifactError(f"{label}: virtual source {path} is missing (moved or deleted since the merge); "
                                "put it back or merge again")
        if os.path.samefile(path, handle.filename):
            raise ArtifactError(f"{label}: virtual source {path} is the artifact itself (a broken merge); merge again")
        if path not in recorded:
            continue
        size, sha = recorded[path]
        if path.stat().st_size != size:
            raise ArtifactError(f"{label}: virtual source {path} has changed since the merge "
                                f"({path.stat().st_size} bytes, {size} recorded); merge again")
        if hashes:
            from avatarcli.provenance import sha256_file

            if sha256_file(path) != sha:
                raise ArtifactError(f"{label}: virtual source {path} has changed since the merge (sha256 differs); "
                                    "merge again")


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in dataset[()]]


def read_config(handle: h5py.File) -> dict[str, Any]:
    return json.loads(handle.attrs["config_json"])


# --------------------------------------------------------------------------------------------
# writing


def write_strings(group: h5py.Group, name: str, values: list[str]) -> h5py.Dataset:
    if name in group:
        del group[name]
    return group.create_dataset(name, data=np.array(values, dtype=object), dtype=STR_DTYPE)


def isal_level(level: int) -> int:
    """A deflate level 1-9 as an ISA-L level (0-3: ISA-L's fastest to strongest)."""
    return 0 if level <= 0 else 1 if level <= 3 else 2 if level <= 6 else 3


def default_threads() -> int:
    """Threads for GIL-free per-frame work (deflate, inflate, pread): one per core, at most 32."""
    return max(1, min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class FrameWriter:
    """Writes ``[T,H,W,C]`` uint8 frames one frame per chunk, deflate-compressed in threads.

    h5py serialises every HDF5 call behind one lock, so compression inside HDF5 runs on one
    core; compressing each chunk in a thread pool (the GIL is released) and writing it raw keeps
    the file a standard gzip-filtered dataset that any HDF5 reader understands. The deflate
    streams come from ISA-L (``isal``): ~5x faster than zlib at level 1 for ~10% larger chunks,
    which made compression the slowest step of preprocessing.
    """

    def __init__(self, level: int = 1, threads: int | None = None):
        self.level = level
        self.pool = ThreadPoolExecutor(max_workers=threads or default_threads())

    def write(self, group: h5py.Group, name: str, frames: np.ndarray) -> h5py.Dataset:
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        chunk = (1, *frames.shape[1:])
        dataset = group.create_dataset(
            name, shape=frames.shape, dtype=np.uint8, chunks=chunk,
            compression="gzip" if self.level > 0 else None,
            compression_opts=self.level if self.level > 0 else None,
        )
        if self.level <= 0:
            dataset[...] = frames
            return dataset
        level = isal_level(self.level)
        blobs = self.pool.map(lambda f: isal_zlib.compress(f, level), frames)
        zeros = (0,) * (frames.ndim - 1)
        for index, blob in enumerate(blobs):
            dataset.id.write_direct_chunk((index, *zeros), blob)
        return dataset

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class FrameReader:
    """Reads frame ranges of one-frame-per-chunk ``uint8`` datasets, inflating chunks in threads.

    The reading twin of :class:`FrameWriter`. For a deflate-only dataset in a plain file the
    chunks' file offsets are listed once (one HDF5 call per dataset); each frame is then read with
    ``os.pread`` and inflated by ISA-L (3-4x faster than zlib) in a thread pool. Both release the
    GIL, so the threads run in parallel; fetching chunks through HDF5 instead serialises on its
    lock and was the bottleneck of the eval stage on a GPU. Datasets with any other layout or
    filter are read through h5py.
    """

    def __init__(self, threads: int | None = None):
        self.pool = ThreadPoolExecutor(max_workers=threads or default_threads())
        self._tables: dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | None] = {}
        self._files: dict[str, int] = {}

    @staticmethod
    def _deflate_only(dataset: h5py.Dataset) -> bool:
        if dataset.chunks is None or dataset.chunks[0] != 1 or tuple(dataset.chunks[1:]) != dataset.shape[1:]:
            return False
        if dataset.dtype != np.uint8 or dataset.compression != "gzip":
            return False
        return not (dataset.shuffle or dataset.fletcher32 or dataset.scaleoffset)

    def _chunk_table(self, dataset: h5py.Dataset) -> tuple[np.ndarray, np.ndarray] | None:
        """(file offset, byte size) of every frame's chunk, or None when they cannot be read directly."""
        key = (dataset.file.filename, dataset.name)
        if key not in self._tables:
            table = None
            if dataset.file.driver == "sec2" and dataset.shape[0] > 0:  # callers checked _deflate_only
                offsets = np.full(dataset.shape[0], -1, np.int64)
                sizes = np.zeros(dataset.shape[0], np.int64)
                plain = [True]

                def visit(info) -> None:
                    if info.filter_mask:  # a chunk stored unfiltered: leave it to HDF5
                        plain[0] = False
                    offsets[info.chunk_offset[0]] = info.byte_offset
                    sizes[info.chunk_offset[0]] = info.size

                dataset.id.chunk_iter(visit)
                if plain[0] and (offsets >= 0).all():
                    table = (offsets, sizes)  # absolute file offsets (a userblock included)
            self._tables[key] = table
        return self._tables[key]

    def _descriptor(self, filename: str) -> int:
        if filename not in self._files:
            self._files[filename] = os.open(filename, os.O_RDONLY)
        return self._files[filename]

    def read(self, dataset: h5py.Dataset, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frames ``start:stop`` (clipped to the dataset) as uint8 [n, ...]; into ``out[:n]`` when given
        (e.g. page-locked memory for an asynchronous upload)."""
        stop = min(stop, dataset.shape[0])
        count = max(stop - start, 0)
        out = np.empty((count, *dataset.shape[1:]), np.uint8) if out is None else out[:count]
        if count == 0:
            return out
        if not self._deflate_only(dataset):
            dataset.read_direct(out, np.s_[start:stop])
            return out
        table = self._chunk_table(dataset)
        frame_bytes = out[0].nbytes
        if table is not None:
            fd = self._descriptor(dataset.file.filename)
            offsets, sizes = table

            def fetch(k: int) -> bytes:
                return os.pread(fd, int(sizes[start + k]), int(offsets[start + k]))
        else:
            zeros = (0,) * (dataset.ndim - 1)
            blobs = [dataset.id.read_direct_chunk((index, *zeros))[1] for index in range(start, stop)]
            fetch = blobs.__getitem__

        def inflate(k: int) -> None:
            raw = isal_zlib.decompress(fetch(k))
            if len(raw) != frame_bytes:
                raise ArtifactError(f"{dataset.name}: chunk {start + k} inflates to {len(raw)} bytes, not {frame_bytes}")
            out[k] = np.frombuffer(raw, np.uint8).reshape(out.shape[1:])

        list(self.pool.map(inflate, range(count)))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def create_h5(path: str | os.PathLike) -> h5py.File:
    # libver='latest' gives indexed link storage, so a group of 100k clips stays fast.
    return h5py.File(path, "w", libver="latest")


@dataclass
class ArtifactWriter:
    """Write an artifact atomically: a temp file beside the target, validated, then renamed.

    Use as a context manager; ``handle`` is the open temp file. A crash or exception leaves
    no file at ``path`` (an existing one is replaced only by a complete, valid artifact).
    """

    path: Path
    schema: ArtifactSchema
    config: dict[str, Any]
    parents: list[tuple[str, str]] = field(default_factory=list)
    extra_attrs: dict[str, Any] = field(default_factory=dict)
    handle: h5py.File | None = None
    _tmp: Path | None = None

    def __enter__(self) -> "ArtifactWriter":
        from avatarcli.stage.files import atomic_path

        self.path = Path(self.path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self.handle = create_h5(self._tmp)
        return self

    def _write_root(self) -> None:
        assert self.handle is not None
        attrs = self.handle.attrs
        attrs["avatar_kind"] = self.schema.kind
        attrs["avatar_schema_version"] = self.schema.version
        for key, value in base_attrs().items():
            attrs[key] = value
        attrs["config_json"] = json.dumps(self.config, sort_keys=True, default=str)
        for key, value in self.extra_attrs.items():
            attrs[key] = value
        prov = self.handle.require_group("provenance")
        write_strings(prov, "parent_path", [p for p, _ in self.parents])
        write_strings(prov, "parent_sha256", [h for _, h in self.parents])

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.handle is not None and self._tmp is not None
        try:
            if exc_type is None:
                self._write_root()
                self.handle.close()
                with h5py.File(self._tmp, "r") as check:
                    validate(check, self.schema, deep=True, name=str(self.path))
        except BaseException as failure:
            exc_type, exc, tb = type(failure), failure, failure.__traceback__
            raise
        finally:
            if self.handle.id.valid:
                self.handle.close()
            # renames the validated temp file onto the path, or removes it after a failure
            self._atomic.__exit__(exc_type, exc, tb)


def iter_units(handle: h5py.File, schema: ArtifactSchema) -> Iterator[tuple[str, h5py.Group]]:
    assert schema.unit_group is not None
    group = handle[schema.unit_group]
    for name in group:
        yield name, group[name]
