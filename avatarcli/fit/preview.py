"""Previews of a fitted clip: a PNG grid (input | landmarks | shaded render | overlay) of a few
frames under a header that names the columns and the landmark colours, and an mp4 of every frame
(input | overlay). Renders include eyeballs when the face model has open eye sockets
(:mod:`avatarcli.facemodel.eyes`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avatarcli.fit.problem import BatchFit

VIDEO_BATCH = 32
"""Frames rendered at once for the preview video (memory stays bounded whatever the clip length)."""
COLUMNS = ("input", "landmarks", "fit", "overlay")
DETECTED, FITTED = (0, 255, 0), (255, 0, 0)
"""Landmark dot colours: the detector's (the fit's target) and the fitted model's."""
HEADER_PX = 30
"""Height of the grid's header: column names, then the legend of the landmark colours."""


def _clip_start(fit: BatchFit, clip_index: int) -> int:
    return sum(len(c.lmk68) for c in fit.clips[:clip_index])


def render_frames(fit: BatchFit, frames: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Shaded renders of the batch frames ``frames`` [n] (indices into the batch) at the crop size,
    with the fitted pose ``R`` [T,3,3], ``t`` [T,3] of every batch frame. Returns uint8 RGB
    [n,S,S,3] and the face mask [n,S,S] bool. Call under ``torch.no_grad()``."""
    from avatarcli.render.mesh import render_mesh

    from avatarcli.facemodel.eyes import eye_rig

    light = fit.light[frames].clone()
    if not light.any():  # landmark-only fits have no light: a fixed key light shows the shape
        light[:, 1], light[:, 2], light[:, 3] = 0.15, 0.2, -0.1
    verts, faces, albedo = fit.vertices(frames), fit.model.faces.to(fit.device), fit.albedo(frames)
    rig = _eye_rig(fit.model, eye_rig)
    if rig is not None:  # eyeballs in the open sockets, placed on the identity mesh, turned by gaze
        rest = fit.model.vertices(fit.identity_per_frame()[frames])
        verts, faces, albedo = rig.attach(verts, faces, albedo, rest, fit.exp[frames])
    render = render_mesh(verts, faces, R[frames], t[frames], fit.K, fit.size, albedo, light)
    shaded = (render.rgb.clamp(0, 1) * 255).round().byte().cpu().numpy()
    return shaded, render.mask.cpu().numpy()


_RIGS: dict[int, object] = {}


def _eye_rig(model, build):
    """The model's eye rig, built once per model object (finding the socket rims walks every edge)."""
    key = id(model)
    if key not in _RIGS or _RIGS[key][0] is not model:
        _RIGS[key] = (model, build(model))
    return _RIGS[key][1]


def draw_header(width: int, size: int):
    """[HEADER_PX, width] PIL image: the column names over each ``size``-wide column and the
    legend of the landmark dots."""
    from PIL import Image, ImageDraw

    header = Image.new("RGB", (width, HEADER_PX), (32, 32, 32))
    draw = ImageDraw.Draw(header)
    for col, name in enumerate(COLUMNS):
        draw.text((col * size + 4, 2), name, fill=(255, 255, 255))
    x = 4
    for colour, label in ((DETECTED, "detected landmarks"), (FITTED, "fitted model landmarks")):
        draw.ellipse([x, 19, x + 6, 25], fill=colour)
        draw.text((x + 10, 16), label, fill=(220, 220, 220))
        x += 16 + int(draw.textlength(label))
    return header


def overlay(image: np.ndarray, shaded: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` [S,S,3] uint8 with the render ``shaded`` blended in half where ``mask`` [S,S]."""
    out = image.copy()
    out[mask] = (0.5 * image[mask] + 0.5 * shaded[mask]).astype(np.uint8)
    return out


def _input_frame(fit: BatchFit, clip_index: int, local: int) -> np.ndarray:
    clip = fit.clips[clip_index]
    return clip.frames[local] if clip.frames is not None else np.zeros((fit.size, fit.size, 3), np.uint8)


def write_preview(path: Path, fit: BatchFit, clip_index: int, rows: int) -> None:
    """PNG grid of ``rows`` evenly spread frames of clip ``clip_index`` of ``fit``: input | landmarks
    (green: detected, the fit's target; red: the fitted model's) | shaded render | overlay, under a
    header naming the columns and the colours (:func:`draw_header`)."""
    from PIL import Image, ImageDraw

    clip = fit.clips[clip_index]
    start = _clip_start(fit, clip_index)
    count = len(clip.lmk68)
    picks = np.unique(np.linspace(0, count - 1, min(rows, count)).round().astype(int))
    frames = torch.as_tensor(picks + start, device=fit.device)
    with torch.no_grad():
        R, t = fit.rt()
        shaded, mask = render_frames(fit, frames, R, t)
        fitted = fit.landmarks_2d()[frames].cpu().numpy()
    size = fit.size
    grid = Image.new("RGB", (len(COLUMNS) * size, HEADER_PX + len(picks) * size))
    grid.paste(draw_header(grid.width, size), (0, 0))
    for row, local in enumerate(picks):
        image = _input_frame(fit, clip_index, local)
        marks = Image.fromarray(image)
        draw = ImageDraw.Draw(marks)
        for (x, y), colour in [(p, DETECTED) for p in clip.lmk68[local]] + [(p, FITTED) for p in fitted[row]]:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
        tiles = [image, marks, shaded[row], overlay(image, shaded[row], mask[row])]
        for col, tile in enumerate(tiles):
            grid.paste(tile if isinstance(tile, Image.Image) else Image.fromarray(tile), (col * size, HEADER_PX + row * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def write_preview_video(path: Path, fit: BatchFit, clip_index: int, batch: int = VIDEO_BATCH) -> int:
    """mp4 of every frame of clip ``clip_index`` of ``fit`` at the clip's fps: input | overlay of the
    fitted render, side by side ([T,S,2S,3]); rendered ``batch`` frames at a time. Returns the frames
    written."""
    from avatarcli.video import VideoWriter

    clip = fit.clips[clip_index]
    start = _clip_start(fit, clip_index)
    count = len(clip.lmk68)
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, clip.fps) as writer, torch.no_grad():
        R, t = fit.rt()
        for first in range(0, count, batch):
            locals_ = np.arange(first, min(count, first + batch))
            shaded, mask = render_frames(fit, torch.as_tensor(locals_ + start, device=fit.device), R, t)
            images = [_input_frame(fit, clip_index, local) for local in locals_]
            writer.write(np.stack([np.concatenate([image, overlay(image, shaded[i], mask[i])], axis=1)
                                   for i, image in enumerate(images)]))
    return writer.frames_written
