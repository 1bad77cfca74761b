"""68-point landmarks (PFLD, iBUG order) from square crops around detector boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avatarcli.face.crop import crop_batch, crop_batch_matmul, integer_boxes
from avatarcli.onnx_torch import OnnxNet

INPUT_SIZE = 112
BOX_SCALE = 1.1


def square_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """[n,4] boxes -> [n,4] squares of side ``scale * max(w, h)`` about the same centre."""
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True) * scale / 2
    return torch.cat([center - half, center + half], 1)


class PFLD68:
    def __init__(self, onnx_path: str | Path, device: torch.device | str = "cpu", half: bool = False):
        self.net = OnnxNet(onnx_path, torch.device(device), half=half)
        self.device = self.net.device

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        """uint8 RGB frames [n,H,W,3]; detector boxes [n,4] -> landmarks [n,68,2] in source pixels.

        The model sees a square of side 1.1·max(w, h) about the box centre, zero-padded, at 112².
        """
        squares = integer_boxes(square_boxes(torch.as_tensor(np.asarray(boxes, np.float64)), BOX_SCALE).numpy())
        crops = crop_batch(frames, squares, INPUT_SIZE).permute(0, 3, 1, 2).to(self.net.dtype) / 255.0
        out = self.net(crops)[0].float().view(-1, 68, 2).cpu().numpy()
        return out * squares[:, None, 2:3] + squares[:, None, :2]

    @torch.no_grad()
    def on_device(self, frames: torch.Tensor, boxes: torch.Tensor, max_box_side: float) -> torch.Tensor:
        """``__call__`` with boxes [n,4] and landmarks [n,68,2] (float32) as tensors on the frames'
        device, queued without a host sync on CUDA. Squares are capped at ``max_box_side`` · 1.1 (a
        bound on the boxes the caller's detector can give)."""
        max_side = int(np.ceil(max_box_side * BOX_SCALE)) + 1
        squares = integer_boxes(square_boxes(boxes.double(), BOX_SCALE))
        squares[:, 2].clamp_(max=max_side)
        if frames.device.type == "cuda":
            crops = crop_batch_matmul(frames, squares, INPUT_SIZE, max_side)
        else:
            crops = crop_batch(frames, squares.cpu().numpy().astype(np.int64), INPUT_SIZE)
        out = self.net(crops.permute(0, 3, 1, 2).to(self.net.dtype) / 255.0)[0].float().view(-1, 68, 2)
        out = out.to(frames.device)
        return out * squares[:, None, 2:3] + squares[:, None, :2]
