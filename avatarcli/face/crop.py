"""Square crops with zero padding outside the frame, resized with antialiased bilinear filtering.

Boxes are whole source pixels (x0, y0, side): the stored crop box then describes the crop
exactly, and the crop is a slice plus one resize, which is cheap on the CPU where converting
whole frames to float would cost more than the models. CPU and CUDA run the same filter.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def integer_boxes(boxes: np.ndarray) -> np.ndarray:
    """[n,4] float (x0, y0, x1, y1) squares -> [n,3] int (x0, y0, side), rounded to whole pixels."""
    side = np.maximum(np.round(boxes[:, 2] - boxes[:, 0]), 1)
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    origin = np.round(center - side[:, None] / 2)
    return np.concatenate([origin, side[:, None]], 1).astype(np.int64)


def boxes_xyxy(int_boxes: np.ndarray) -> np.ndarray:
    """[n,3] (x0, y0, side) -> [n,4] float32 (x0, y0, x1, y1)."""
    x0, y0, side = int_boxes[:, 0], int_boxes[:, 1], int_boxes[:, 2]
    return np.stack([x0, y0, x0 + side, y0 + side], 1).astype(np.float32)


def crop_square(frame: torch.Tensor, box: tuple[int, int, int], size: int) -> torch.Tensor:
    """uint8 [H,W,3] frame, (x0, y0, side) -> uint8 [size,size,3] (zeros outside the frame)."""
    height, width = frame.shape[:2]
    x0, y0, side = (int(v) for v in box)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, width), min(y0 + side, height)
    if sx0 == x0 and sy0 == y0 and sx1 == x0 + side and sy1 == y0 + side:
        patch = frame[y0 : y0 + side, x0 : x0 + side]
    else:
        patch = torch.zeros((side, side, 3), dtype=frame.dtype, device=frame.device)
        if sx1 > sx0 and sy1 > sy0:
            patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = frame[sy0:sy1, sx0:sx1]
    if side == size:
        return patch.contiguous()
    image = patch.permute(2, 0, 1)[None]
    if image.device.type != "cpu":  # antialiased uint8 resize is CPU-only in torch
        image = image.float()
    out = F.interpolate(image, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)
    if out.dtype != torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out[0].permute(1, 2, 0)


def crop_batch(frames: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """uint8 frames [n,H,W,3], int boxes [n,3] -> uint8 crops [n,size,size,3] on the frames' device."""
    out = torch.empty((len(boxes), size, size, 3), dtype=torch.uint8, device=frames.device)
    for i, box in enumerate(boxes):
        out[i] = crop_square(frames[i], box, size)
    return out
