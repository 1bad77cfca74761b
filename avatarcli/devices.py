"""Device names on the command line: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import re

from avatarcli.errors import AvatarError


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a clear error for unusable names."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise AvatarError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AvatarError(f"--device {name}: CUDA is not available on this machine")
    return name
