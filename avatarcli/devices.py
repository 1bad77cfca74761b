"""Device names on the command line: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import re

from avatarcli.errors import AvatarError


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a clear error for unusable names.

    The first call also sets up the process's CPU threads (:func:`avatarcli.runtime.configure_cpu_threads`:
    passive OpenMP waiting, threads from the free cores): every stage resolves its device before
    it first imports torch."""
    from avatarcli.runtime import configure_cpu_threads

    configure_cpu_threads()
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise AvatarError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AvatarError(f"--device {name}: CUDA is not available on this machine")
    return name
