"""Training checkpoints: atomic files of plain tensors, the RNG states they carry, and the fingerprint
that decides whether a checkpoint belongs to a run.

A checkpoint (format 2) is a dict loadable with ``weights_only=True``::

    format, step, fingerprint, config,
    models      {name: state_dict}        every model of the task (EMA copies under 'ema')
    optimizers  {name: state_dict}
    schedulers  {name: state_dict}
    ema         {name: state_dict}
    rng         [per-rank RNG states]     python, numpy, torch, CUDA (``capture_rng``)
    sampler     {seed, step, world_size}
    guard       {skipped, bad_in_a_row}
    history     {key: float64 tensor}
    last_logged {key: float}              the last values of lazily run phases (logged until they run again)

Format 1 (one model, one optimizer, before named models) is read as the single model and optimizer
of a task that has exactly one of each (``upgrade_checkpoint``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from avatarcli.errors import AvatarError
from avatarcli.stage.files import atomic_path, remove_stale_temps

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
_CHECKPOINT_RE = re.compile(r"^step_(\d{8,})\.pt$")


# ------------------------------------------------------------------------------------------------
# RNG states (as tensors and primitives, so checkpoints load with weights_only=True)


def capture_rng() -> dict:
    version, state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python_version": int(version),
        "python": torch.tensor(state, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached),
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# files


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise AvatarError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise AvatarError(f"{path}: not an avatar training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int) -> Path:
    """Write ``step_<step>.pt`` atomically (temp file in the same folder, fsync, rename), then prune."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    with atomic_path(final) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(folder)
    for _, old in list_checkpoints(run_dir)[: -max(keep, 1)]:
        with contextlib.suppress(OSError):
            old.unlink()
    return final


def remove_stale_temp_files(run_dir: str | os.PathLike) -> None:
    """Remove the temp files of checkpoint saves that a crash interrupted (call before any save)."""
    remove_stale_temps(checkpoint_dir(run_dir))


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def upgrade_checkpoint(state: dict, models: list[str], optimizers: list[str], schedulers: list[str],
                       emas: list[str], path: str | os.PathLike) -> dict:
    """A format-1 checkpoint (one model, optimizer, scheduler, EMA) as format 2 for a task with exactly
    one of each, so runs begun before named models resume; a format-2 one is returned as is."""
    if state["format"] == CHECKPOINT_FORMAT:
        return state
    if len(models) != 1 or len(optimizers) != 1 or len(schedulers) > 1 or len(emas) > 1:
        raise AvatarError(f"{path}: a single-model checkpoint (format 1); this task has models {models} and "
                          f"optimizers {optimizers}; use another run directory, or --no-resume to start over")

    def named(names: list[str], value):
        return {names[0]: value} if names and value is not None else {}

    upgraded = {key: value for key, value in state.items() if key not in ("model", "optimizer", "scheduler", "ema")}
    upgraded.update(format=CHECKPOINT_FORMAT, models=named(models, state["model"]),
                    optimizers=named(optimizers, state["optimizer"]), schedulers=named(schedulers, state.get("scheduler")),
                    ema=named(emas, state.get("ema")))
    return upgraded
