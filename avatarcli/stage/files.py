"""Files that appear whole or not at all: the one temp-then-rename helper of every stage.

Temp files are named ``.<name>.<pid>-<random>.tmp`` beside their target, so the temp files of a
crashed run (its pid gone) are recognised and removed by a later run (:func:`remove_stale_temps`),
while those of a run still alive are left alone.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success rename it onto ``target``, on error remove it.

    The finished file gets the mode the umask gives a new file (not mkstemp's 0600).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temp files of dead processes in ``folder`` (only those of ``name`` when given)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    pattern = f".{name}.*.tmp" if name else ".*.tmp"
    for path in folder.glob(pattern):
        pid_part = path.name[:-len(".tmp")].rsplit(".", 1)[-1].split("-", 1)[0]
        if pid_part.isdigit() and not _pid_alive(int(pid_part)):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed
