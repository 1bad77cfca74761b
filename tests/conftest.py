"""Shared fixtures. Real models and videos come from ../shared/assets (or $AVATAR_ASSETS).

When AVATAR_REQUIRE_ASSETS=1 (CI), a missing assets folder fails the tests that need it instead
of skipping them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("AVATAR_ASSETS", REPO.parent / "shared" / "assets"))
# Tests pin the CPU thread count (CLI subprocesses inherit it): the load-aware default would change
# with what else runs, and with it the float rounding that resume/equality tests compare exactly.
os.environ.setdefault("AVATAR_THREADS", str(min(2, os.cpu_count() or 1)))

warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")


def _need_assets() -> Path:
    if not (ASSETS / "MANIFEST.md").exists():
        message = f"shared assets not found at {ASSETS} (set AVATAR_ASSETS)"
        if os.environ.get("AVATAR_REQUIRE_ASSETS", "") in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return ASSETS


@pytest.fixture(scope="session")
def assets() -> Path:
    return _need_assets()


@pytest.fixture(scope="session")
def models_dir(assets) -> Path:
    return assets / "models"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Never touch the user's cache or the network from tests.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("AVATAR_OFFLINE", "1")


def _torch():
    import torch

    return torch


# Device x dtype parametrisation shared by every numeric test (kornia style): `device` and `dtype`
# fixtures, CUDA cases marked `gpu` and skipped without a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif("not __import__('torch').cuda.is_available()",
                                                                     reason="needs CUDA")]),
]
DTYPE_NAMES = ["float32", "float64"]


@pytest.fixture(params=DEVICES)
def device(request):
    return _torch().device(request.param)


@pytest.fixture(params=DTYPE_NAMES, ids=["f32", "f64"])
def dtype(request):
    return getattr(_torch(), request.param)


@pytest.fixture(scope="session")
def cpu_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
