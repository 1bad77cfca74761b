"""Identity embeddings for CSIM: ArcFace 5-point alignment at 112×112 and an ArcFace-family network.

Alignment is insightface's ``norm_crop``: the least-squares similarity transform (Umeyama, no
reflection) that maps the 5 detected points onto the ArcFace template, applied with bilinear
sampling and black outside the frame (``cv2.warpAffine`` semantics: pixel centres at integers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ARCFACE_TEMPLATE = torch.tensor([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041],
], dtype=torch.float64)
"""The 5 ArcFace points (left eye, right eye, nose, left and right mouth corner) at 112×112."""
ALIGN_SIZE = 112


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Args:
        src: [B,N,2] points; dst: [N,2] or [B,N,2].

    Returns:
        [B,2,3] affine matrices M with ``dst ≈ M @ [src; 1]`` (Umeyama 1991, no reflection).
    """
    src = src.to(torch.float64)
    dst = dst.to(src).expand_as(src)
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    cov = d.transpose(1, 2) @ s / src.shape[1]  # [B,2,2]
    u, sigma, vh = torch.linalg.svd(cov)
    sign = torch.ones_like(sigma)
    sign[:, 1] = torch.sign(torch.linalg.det(u @ vh))
    sign[sign == 0] = 1.0
    rotation = u @ torch.diag_embed(sign) @ vh
    var_s = s.pow(2).sum((1, 2)) / src.shape[1]
    scale = (sigma * sign).sum(1) / var_s.clamp(min=1e-12)
    translation = mu_d.squeeze(1) - scale[:, None] * (rotation @ mu_s.transpose(1, 2)).squeeze(2)
    return torch.cat([scale[:, None, None] * rotation, translation[:, :, None]], 2)


def align_faces(frames: torch.Tensor, kps5: torch.Tensor, size: int = ALIGN_SIZE) -> torch.Tensor:
    """ArcFace-aligned crops.

    Args:
        frames: [B,H,W,3] uint8 RGB on any device.
        kps5: [B,5,2] keypoints in frame pixels (SCRFD order).

    Returns:
        [B,3,size,size] float32 RGB in 0..255.
    """
    from kornia.geometry.transform import warp_affine

    template = ARCFACE_TEMPLATE * (size / ALIGN_SIZE)
    matrices = similarity_transform(kps5.to(torch.float64).cpu(), template).to(frames.device, torch.float32)
    images = frames.permute(0, 3, 1, 2).float()
    return warp_affine(images, matrices, (size, size), mode="bilinear", padding_mode="zeros", align_corners=True)


class FaceEmbedder:
    """An ArcFace-family ONNX network by registry name: aligned crops -> L2-normalised embeddings."""

    def __init__(self, name: str, path: str | Path, device: torch.device | str, pixel_mean, pixel_std):
        from avatarcli.onnx_torch import OnnxNet

        self.name, self.path = name, Path(path)
        self.net = OnnxNet(path, torch.device(device))
        self.device = self.net.device
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_registry(cls, name: str, device, models_dir=None) -> "FaceEmbedder":
        from avatarcli.registry import get_spec, resolve

        spec = get_spec(name)
        if "pixel_mean" not in spec.extra:
            from avatarcli.errors import AvatarError

            raise AvatarError(f"{name} is not a face-recognition model (no input normalisation in the registry)")
        return cls(name, resolve(name, models_dir), device, spec.extra["pixel_mean"], spec.extra["pixel_std"])

    @torch.no_grad()
    def __call__(self, aligned: torch.Tensor) -> torch.Tensor:
        """[B,3,112,112] RGB 0..255 -> [B,D] unit-norm embeddings (float32, on the model's device)."""
        x = (aligned.to(self.device) - self.mean) / self.std
        out = self.net(x)[0].float()
        return torch.nn.functional.normalize(out.flatten(1), dim=1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise cosine of unit vectors [B,D] x [B,D] -> [B] float64 numpy."""
    return (a * b).sum(1).double().cpu().numpy()
