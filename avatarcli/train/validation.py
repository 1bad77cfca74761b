"""Validation and image grids during training: models in eval mode with the training RNG untouched,
grids as PNG files (``<run_dir>/validation/step_XXXXXXX.png``) and TensorBoard images."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

GRID_COLUMNS = 11


@contextlib.contextmanager
def evaluation(models: dict[str, nn.Module], device: torch.device) -> Iterator[None]:
    """Eval mode and no_grad; the RNG (CPU and this CUDA device) is forked so that how often images
    or validation run cannot change the training. Every model's mode is restored afterwards."""
    modes = {name: model.training for name, model in models.items()}
    devices = [device] if device.type == "cuda" else []
    try:
        for model in models.values():
            model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for name, model in models.items():
            model.train(modes[name])


def image_grid(images: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] in 0..1 -> one grid [3,H',W'] (up to 11 per row), on the CPU; [rows,columns,3,H,W]
    (e.g. source | driving | output per row) keeps its rows."""
    from torchvision.utils import make_grid

    if images.ndim == 5:
        return make_grid(images.flatten(0, 1).float().clamp(0, 1).cpu(), nrow=images.shape[1])
    return make_grid(images.float().clamp(0, 1).cpu(), nrow=min(len(images), GRID_COLUMNS))


def write_grids_png(path: Path, grids: list[torch.Tensor]) -> Path:
    """The grids [3,H,W] one below the other (narrower ones padded black on the right) as one PNG."""
    from PIL import Image

    from avatarcli.stage.files import atomic_path

    width = max(grid.shape[2] for grid in grids)
    rows = [torch.nn.functional.pad(grid, (0, width - grid.shape[2])) for grid in grids]
    pixels = (torch.cat(rows, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return path


def validation_png_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "validation" / f"step_{step:07d}.png"
