"""SCRFD face detector (insightface) run natively in torch, batched over frames.

The ONNX graph is cut before its batch-1 reshape heads (see ``avatarcli.onnx_torch``); decoding
follows insightface's ``SCRFD.detect``: 2 anchors per cell at strides 8/16/32, boxes as distances
from the anchor centre, keypoints as offsets, scaled by the stride.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from avatarcli.onnx_torch import OnnxNet, _load_onnx, head_inputs_before

STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2


@dataclass
class Detections:
    """Faces found in one image, in that image's pixel coordinates."""

    boxes: torch.Tensor
    """[n, 4] (x0, y0, x1, y1)."""
    kps: torch.Tensor
    """[n, 5, 2] left eye, right eye, nose, left mouth corner, right mouth corner (image left/right)."""
    scores: torch.Tensor
    """[n]."""


class SCRFD:
    """SCRFD with 5 keypoints; ``__call__`` maps a normalised batch to decoded per-anchor outputs."""

    def __init__(self, onnx_path: str | Path, device: torch.device | str = "cpu", half: bool = False):
        heads = head_inputs_before(_load_onnx(str(onnx_path)))
        self.net = OnnxNet(onnx_path, torch.device(device), outputs=heads, half=half)
        self.device = self.net.device
        self._grid_cache: dict[tuple, torch.Tensor] = {}

    def _centers(self, h: int, w: int, stride: int, device: torch.device) -> torch.Tensor:
        key = (h, w, stride, device)
        if key not in self._grid_cache:
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            centers = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float() * stride
            self._grid_cache[key] = centers.expand(-1, ANCHORS_PER_CELL, 2).reshape(-1, 2)
        return self._grid_cache[key]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] RGB normalised (x-127.5)/128, H and W multiples of 32.

        Returns scores [B,K], boxes [B,K,4] and keypoints [B,K,5,2] in input pixels, K = all anchors.
        """
        outs = self.net(images)
        batch = images.shape[0]
        scores, boxes, kps = [], [], []
        for level, stride in enumerate(STRIDES):
            score_map, box_map, kps_map = outs[level], outs[level + 3], outs[level + 6]
            h, w = score_map.shape[-2:]
            centers = self._centers(h, w, stride, score_map.device)
            score = torch.sigmoid(score_map.float().permute(0, 2, 3, 1).reshape(batch, -1))
            dist = box_map.permute(0, 2, 3, 1).reshape(batch, -1, 4).float() * stride
            off = kps_map.permute(0, 2, 3, 1).reshape(batch, -1, 5, 2).float() * stride
            scores.append(score)
            boxes.append(torch.cat([centers - dist[..., :2], centers + dist[..., 2:]], -1))
            kps.append(centers[:, None, :] + off)
        return torch.cat(scores, 1), torch.cat(boxes, 1), torch.cat(kps, 1)


def prepare_batch(frames: torch.Tensor, det_size: int, pad: float) -> tuple[torch.Tensor, float, float]:
    """Pad and letterbox uint8 frames [B,H,W,3] (RGB) into a normalised [B,3,det,det] batch.

    The border of ``pad * max(H, W)`` on every side lets faces that fill the frame be found.
    Returns the batch, the scale from padded-frame to network pixels, and the border in pixels.
    """
    batch, height, width, _ = frames.shape
    border = int(round(pad * max(height, width)))
    side = max(height, width) + 2 * border
    scale = det_size / side
    new_h, new_w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    x = frames.permute(0, 3, 1, 2)
    if x.device.type != "cpu":  # uint8 antialiased resize exists on the CPU only; floats are cheap on GPU
        x = x.float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
    x = (x.float() - 127.5) / 128.0
    offset = int(round(border * scale))
    # Zero after normalisation is mid-grey; pad with the normalised value of black like insightface.
    canvas = torch.full((batch, 3, det_size, det_size), -127.5 / 128.0, device=frames.device, dtype=x.dtype)
    canvas[:, :, offset : offset + new_h, offset : offset + new_w] = x[:, :, : det_size - offset, : det_size - offset]
    # Map network pixels back: src = (net - offset) / scale_xy, with per-axis scale from rounding.
    return canvas, (new_w / width, new_h / height), offset


@dataclass
class BestFaces:
    """The highest-scoring face of each image of a batch, on the detector's device."""

    found: torch.Tensor
    """[B] bool: the best score reaches the threshold (the other fields are meaningless where not)."""
    boxes: torch.Tensor
    """[B, 4] (x0, y0, x1, y1) in frame pixels."""
    kps: torch.Tensor
    """[B, 5, 2] keypoints in frame pixels (``Detections.kps`` order)."""
    scores: torch.Tensor
    """[B]."""


@torch.no_grad()
def detect_best(model: SCRFD, frames: torch.Tensor, det_size: int = 640, pad: float = 0.25,
                threshold: float = 0.5) -> BestFaces:
    """The best face per uint8 RGB frame [B,H,W,3], without leaving the device.

    Equals the first face ``detect`` returns (non-maximum suppression never removes the
    highest-scoring box), but needs no host round trip, so callers can queue more GPU work.
    """
    batch_in, (sx, sy), offset = prepare_batch(frames, det_size, pad)
    scores, boxes, kps = model(batch_in)
    best = scores.argmax(1, keepdim=True)
    score = scores.gather(1, best)[:, 0]
    box = boxes.gather(1, best[:, :, None].expand(-1, -1, 4))[:, 0]
    points = kps.gather(1, best[:, :, None, None].expand(-1, -1, 5, 2))[:, 0]
    scale = torch.tensor([sx, sy], device=box.device)
    box = ((box.view(-1, 2, 2) - offset) / scale).view(-1, 4)
    return BestFaces(score >= threshold, box, (points - offset) / scale, score)


@torch.no_grad()
def detect(
    model: SCRFD,
    frames: torch.Tensor,
    det_size: int = 640,
    pad: float = 0.25,
    threshold: float = 0.5,
    nms_iou: float = 0.4,
    max_faces: int = 16,
) -> list[Detections]:
    """Detect faces in uint8 RGB frames [B,H,W,3] on the model's device.

    Returns one ``Detections`` per frame, as CPU tensors: everything found in the batch is
    copied back in one transfer, since one small copy per frame would stall the GPU each time.
    """
    batch_in, (sx, sy), offset = prepare_batch(frames, det_size, pad)
    scores, boxes, kps = model(batch_in)
    keep_mask = scores >= threshold
    image_ids, anchor_ids = keep_mask.nonzero(as_tuple=True)
    sel_scores = scores[image_ids, anchor_ids]
    sel_boxes = boxes[image_ids, anchor_ids]
    sel_kps = kps[image_ids, anchor_ids]
    keep = batched_nms(sel_boxes, sel_scores, image_ids, nms_iou)  # score-sorted
    scale = torch.tensor([sx, sy], device=frames.device)
    packed = torch.cat([
        image_ids[keep, None].float(),
        sel_scores[keep, None],
        ((sel_boxes[keep].view(-1, 2, 2) - offset) / scale).view(-1, 4),
        ((sel_kps[keep] - offset) / scale).view(-1, 10),
    ], 1).cpu()
    image_ids, packed = packed[:, 0].long(), packed[:, 1:]
    # A stable sort by image keeps each image's faces in score order.
    order = torch.sort(image_ids, stable=True).indices
    image_ids, packed = image_ids[order], packed[order]
    counts = torch.bincount(image_ids, minlength=frames.shape[0]).tolist()
    results = []
    for part in torch.split(packed, counts):
        part = part[:max_faces]
        results.append(Detections(part[:, 1:5].contiguous(), part[:, 5:].reshape(-1, 5, 2), part[:, 0].contiguous()))
    return results
