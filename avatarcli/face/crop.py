"""Square crops with zero padding outside the frame, resized with antialiased bilinear filtering.

Boxes are whole source pixels (x0, y0, side): the stored crop box then describes the crop
exactly. On the CPU a crop is a slice plus one uint8 resize, which is cheaper than converting
whole frames to float. On CUDA the same filter is written as two weight matrices per frame
(rows, columns), so a whole batch of crops of different sizes is two batched matmuls instead
of a handful of kernel launches per frame.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def integer_boxes(boxes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """[n,4] float (x0, y0, x1, y1) squares -> [n,3] (x0, y0, side), rounded to whole pixels: int64
    for a numpy array; float32 on the same device for a tensor (no host round trip)."""
    on_host = not isinstance(boxes, torch.Tensor)
    b = torch.as_tensor(np.asarray(boxes)) if on_host else boxes
    side = torch.round(b[:, 2] - b[:, 0]).clamp(min=1)
    center = (b[:, :2] + b[:, 2:]) / 2
    origin = torch.round(center - side[:, None] / 2)
    out = torch.cat([origin, side[:, None]], 1)
    return out.numpy().astype(np.int64) if on_host else out.float()


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


def resize_weights(origin: torch.Tensor, side: torch.Tensor, size: int, length: int,
                   max_side: int | None = None) -> torch.Tensor:
    """Weights of torch's bilinear resize (antialiased when shrinking) along one axis, as a matrix.

    origin, side: [n] float, the crop's first source pixel and its side (whole pixels).
    Returns [n, size, length]: output sample i of crop k is ``sum_j w[k, i, j] * src[j]`` over
    source positions ``0 <= j < length``. Taps outside the source are zero padding: they count in
    the normalisation but contribute nothing, as when resizing a zero-padded patch.
    Mirrors ``_compute_indices_weights_aa`` (triangle filter widened by the shrink factor,
    normalised over the taps inside the patch); for enlargement it reduces to plain bilinear.
    ``max_side`` bounds ``side`` without reading it back from the device (no host sync).
    """
    device = origin.device
    scale = side / size
    inv = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))[:, None, None]
    center = scale[:, None] * (torch.arange(size, device=device, dtype=scale.dtype) + 0.5)  # [n,size]
    longest = int(side.max().item()) if max_side is None else max_side
    patch = torch.arange(longest, device=device, dtype=scale.dtype)
    taps = (1 - ((patch + 0.5 - center[..., None]) * inv).abs()).clamp_(min=0)
    taps = taps * (patch < side[:, None])[:, None, :]
    total = taps.sum(-1, keepdim=True)
    pos = torch.arange(length, device=device, dtype=scale.dtype)[None, :] - origin[:, None]  # patch coordinate
    weights = (1 - ((pos[:, None, :] + 0.5 - center[..., None]) * inv).abs()).clamp_(min=0)
    weights = weights * ((pos >= 0) & (pos < side[:, None]))[:, None, :]
    return weights / total


def crop_batch_matmul(frames: torch.Tensor, boxes: np.ndarray | torch.Tensor, size: int,
                      max_side: int | None = None) -> torch.Tensor:
    """``crop_batch`` as two batched matmuls (rows, then columns); for GPUs.

    frames uint8 [n,H,W,3]; boxes int [n,3] (x0, y0, side) -> uint8 [n,size,size,3].
    Host boxes: only the union of the boxes' rows and columns is converted to float. Device
    boxes (a tensor of whole-pixel floats, sides at most ``max_side``): the whole frame is, and
    nothing is read back to the host, so the call queues without waiting for the GPU.
    """
    n, height, width, _ = frames.shape
    if n == 0:
        return torch.empty((0, size, size, 3), dtype=torch.uint8, device=frames.device)
    if isinstance(boxes, torch.Tensor):
        if max_side is None:
            raise ValueError("device boxes need max_side")
        region = frames.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        b = boxes.to(frames.device, torch.float32)
        side = b[:, 2].clamp(max=max_side)
        rows = resize_weights(b[:, 1], side, size, height, max_side)
        cols = resize_weights(b[:, 0], side, size, width, max_side)
        return _apply_resize(region, rows, cols)
    boxes = np.asarray(boxes, np.int64)
    x_lo, y_lo = max(int(boxes[:, 0].min()), 0), max(int(boxes[:, 1].min()), 0)
    x_hi = min(int((boxes[:, 0] + boxes[:, 2]).max()), width)
    y_hi = min(int((boxes[:, 1] + boxes[:, 2]).max()), height)
    if x_hi <= x_lo or y_hi <= y_lo:
        return torch.zeros((n, size, size, 3), dtype=torch.uint8, device=frames.device)
    # channels first, so both products are plain GEMMs batched over (frame, channel)
    region = frames[:, y_lo:y_hi, x_lo:x_hi].permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    h, w = region.shape[2:]
    b = torch.as_tensor(boxes, dtype=torch.float32, device=frames.device)
    longest = int(boxes[:, 2].max())  # known on the host: no read-back from the device
    rows = resize_weights(b[:, 1] - y_lo, b[:, 2], size, h, longest)  # [n,size,h]
    cols = resize_weights(b[:, 0] - x_lo, b[:, 2], size, w, longest)  # [n,size,w]
    return _apply_resize(region, rows, cols)


def _apply_resize(region: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """float [n,3,h,w], weights [n,size,h] and [n,size,w] -> uint8 [n,size,size,3]."""
    out = torch.matmul(torch.matmul(rows[:, None], region), cols.transpose(1, 2)[:, None])  # [n,3,size,size]
    out = out.permute(0, 2, 3, 1)
    return out.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def crop_batch(frames: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """uint8 frames [n,H,W,3], int boxes [n,3] -> uint8 crops [n,size,size,3] on the frames' device."""
    if frames.device.type != "cpu":
        return crop_batch_matmul(frames, boxes, size)
    out = torch.empty((len(boxes), size, size, 3), dtype=torch.uint8, device=frames.device)
    for i, box in enumerate(boxes):
        out[i] = crop_square(frames[i], box, size)
    return out
