"""PNG grid of a fitted clip: input | landmarks | shaded render | overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avatarcli.fit.problem import BatchFit


def write_preview(path: Path, fit: BatchFit, clip_index: int, rows: int) -> None:
    """PNG grid of ``rows`` evenly spread frames of clip ``clip_index`` of ``fit``: input | landmarks
    (green: target, red: fit) | shaded render | overlay."""
    from PIL import Image, ImageDraw

    from avatarcli.render.mesh import render_mesh

    clip = fit.clips[clip_index]
    start = sum(len(c.lmk68) for c in fit.clips[:clip_index])
    count = len(clip.lmk68)
    picks = np.unique(np.linspace(0, count - 1, min(rows, count)).round().astype(int))
    frames = torch.as_tensor(picks + start, device=fit.device)
    with torch.no_grad():
        R, t = fit.rt()
        light = fit.light[frames].clone()
        if not light.any():  # landmark-only fits have no light: a fixed key light shows the shape
            light[:, 1], light[:, 2], light[:, 3] = 0.15, 0.2, -0.1
        render = render_mesh(fit.vertices(frames), fit.model.faces.to(fit.device), R[frames], t[frames], fit.K,
                             fit.size, fit.albedo(frames), light)
        shaded = (render.rgb.clamp(0, 1) * 255).round().byte().cpu().numpy()
        mask = render.mask.cpu().numpy()
        fitted = fit.landmarks_2d()[frames].cpu().numpy()
    size = fit.size
    grid = Image.new("RGB", (4 * size, len(picks) * size))
    for row, local in enumerate(picks):
        image = clip.frames[local] if clip.frames is not None else np.zeros((size, size, 3), np.uint8)
        marks = Image.fromarray(image)
        draw = ImageDraw.Draw(marks)
        for (x, y), colour in [(p, (0, 255, 0)) for p in clip.lmk68[local]] + [(p, (255, 0, 0)) for p in fitted[row]]:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
        overlay = image.copy()
        overlay[mask[row]] = (0.5 * image[mask[row]] + 0.5 * shaded[row][mask[row]]).astype(np.uint8)
        for col, tile in enumerate([Image.fromarray(image), marks, Image.fromarray(shaded[row]), Image.fromarray(overlay)]):
            grid.paste(tile, (col * size, row * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
