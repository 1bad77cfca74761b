"""The one resume scheme: ``<output>.parts/`` holds a stamp and one atomically written file per unit.

A unit (a source video, a batch of clips, a clip pair) is finished exactly when its part file
exists: parts are written to a temp file and renamed (:func:`avatarcli.stage.files.atomic_path`).
``stamp.json`` records what the parts were made with (stage, part format, result hash, input hashes);
a store made with another stamp is refused, or cleared with ``overwrite``. The folder is locked
(``flock``) while a run uses it, so a second run on the same output stops at once instead of
racing the first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from avatarcli.errors import AvatarError
from avatarcli.stage.files import atomic_path, remove_stale_temps


def unit_key(*names: str) -> str:
    """A file-name-safe key for a unit named by one or more strings."""
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


def parts_folder(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


class PartsStore:
    """Finished units of ``output``'s run. Use as a context manager (holds the lock)."""

    STAMP = "stamp.json"
    LOCK = ".lock"

    def __init__(self, output: str | os.PathLike, stamp: dict, *, suffix: str = ".h5", overwrite: bool = False):
        self.output = Path(output)
        self.folder = parts_folder(self.output)
        self.stamp = json.loads(json.dumps(stamp, sort_keys=True, default=str))
        self.suffix = suffix
        self.overwrite = overwrite
        self._lock_fd: int | None = None
        self._created = False

    def __enter__(self) -> "PartsStore":
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock()
        remove_stale_temps(self.folder)  # debris of killed runs is no reason to refuse the folder
        stamp_file = self.folder / self.STAMP
        old = None
        if stamp_file.exists():
            try:
                old = json.loads(stamp_file.read_text())
            except (OSError, ValueError):
                old = None
        elif any(p.name != self.LOCK and not p.name.endswith(".tmp") for p in self.folder.iterdir()):
            old = {}  # files without a stamp: from an older layout or another program
        if old is not None and old != self.stamp:
            if not self.overwrite:
                self._unlock()
                raise AvatarError(f"{self.folder} holds a run with other settings or inputs; use --overwrite "
                                  "or delete it")
            for path in self.folder.iterdir():
                if path.name != self.LOCK:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        remove_stale_temps(self.output.parent, self.output.name)
        with atomic_path(stamp_file) as tmp:
            tmp.write_text(json.dumps(self.stamp, sort_keys=True))
        return self

    def __exit__(self, exc_type=None, *exc) -> None:
        # a run that failed before finishing any unit leaves no folder it made (only stamp and lock)
        if exc_type is not None and self._created and self._lock_fd is not None and not any(
                p.name not in (self.STAMP, self.LOCK) for p in self.folder.iterdir()):
            shutil.rmtree(self.folder, ignore_errors=True)
        self._unlock()

    def _lock(self) -> None:
        fd = os.open(self.folder / self.LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AvatarError(f"{self.output} is being written by another run (pid {holder}); wait for it to "
                              "finish or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{self.suffix}"

    def done(self, key: str) -> bool:
        return self.path(key).exists()

    def finished(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self.done(k)]

    @contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        """A temp path to write the part of ``key`` to; it becomes the part only if the block succeeds."""
        with atomic_path(self.path(key)) as tmp:
            yield tmp

    def in_order(self, keys: Iterable[str]) -> Iterator[Path]:
        """The parts of ``keys`` in that order (assembly); a missing one is an error."""
        for key in keys:
            path = self.path(key)
            if not path.exists():
                raise AvatarError(f"part {path.name} of {self.output} is missing; rerun the same command to resume")
            yield path

    def remove(self) -> None:
        """After a successful assembly: the parts are no longer needed."""
        self._unlock()
        shutil.rmtree(self.folder, ignore_errors=True)


def existing_output_matches(output: str | os.PathLike, kind: str, stamp_value: str, overwrite: bool,
                            key: str = "result_hash") -> bool:
    """Whether ``output`` exists and was made with the same settings (``config_json[key]``).

    An existing output made otherwise, or not an artifact of ``kind``, is an error unless
    ``overwrite`` (nothing a user has is replaced unasked).
    """
    from avatarcli.artifact import open_artifact, read_config

    output = Path(output)
    if not output.exists():
        return False
    try:
        with open_artifact(output, kind) as handle:
            same = read_config(handle).get(key) == stamp_value
    except AvatarError:
        same = False
    if not same and not overwrite:
        raise AvatarError(f"{output} exists and was made with other settings (or is not a {kind} artifact); "
                          "use --overwrite or choose another output")
    return same
