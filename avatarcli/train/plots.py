"""A PNG of 2-D embeddings (PCA) of β and β′, one colour per identity (drawn with Pillow)."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np


def pca_2d(x: np.ndarray) -> np.ndarray:
    centred = x.astype(np.float64) - x.mean(0)
    scale = centred.std(0)
    centred = centred / np.where(scale > 1e-8, scale, 1.0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def _palette(count: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(count, 1), 0.75, 0.9)) for i in range(count)]


def embedding_plot(path: str | Path, panels: list[tuple[str, np.ndarray]], labels: np.ndarray, names: list[str],
                   panel_size: int = 480, max_points: int = 4000, seed: int = 0) -> Path:
    """One panel per (title, [F,D] features): PCA to 2-D, points coloured by ``labels`` (index into
    ``names``), a legend below."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    rows = np.arange(len(labels)) if len(labels) <= max_points else np.sort(rng.choice(len(labels), max_points, replace=False))
    colours = _palette(len(names))
    legend_rows = (len(names) + 3) // 4
    image = Image.new("RGB", (panel_size * len(panels), panel_size + 24 + 16 * legend_rows), "white")
    draw = ImageDraw.Draw(image)
    margin = 24
    for p, (title, features) in enumerate(panels):
        xy = pca_2d(features)[rows]
        lo, hi = np.percentile(xy, 0.5, axis=0), np.percentile(xy, 99.5, axis=0)
        span = np.where(hi - lo > 1e-9, hi - lo, 1.0)
        uv = (xy - lo) / span * (panel_size - 2 * margin) + margin
        uv[:, 1] = panel_size - uv[:, 1]
        x0 = p * panel_size
        draw.rectangle([x0 + 2, 2, x0 + panel_size - 3, panel_size - 3], outline=(180, 180, 180))
        draw.text((x0 + 8, 6), f"{title} (PCA)", fill=(0, 0, 0))
        for (u, v), label in zip(uv, labels[rows]):
            if 0 <= u <= panel_size and 0 <= v <= panel_size:
                draw.ellipse([x0 + u - 1.5, v - 1.5, x0 + u + 1.5, v + 1.5], fill=colours[label])
    for i, name in enumerate(names):
        x = 8 + (i % 4) * (image.width // 4)
        y = panel_size + 8 + 16 * (i // 4)
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=colours[i])
        draw.text((x + 14, y), name[:40], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
