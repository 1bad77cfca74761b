"""Identity embeddings for CSIM: ArcFace 5-point alignment at 112×112 and an ArcFace-family network.

Alignment is insightface's ``norm_crop``: the least-squares similarity transform (Umeyama, no
reflection) that maps the 5 detected points onto the ArcFace template, applied with bilinear
sampling and black outside the frame (``cv2.warpAffine`` semantics: pixel centres at integers).
"""

from __future__ import annotations

from pathlib import Path

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
        [B,2,3] float64 affine matrices M with ``dst ≈ M @ [src; 1]``, on ``src``'s device.

    Umeyama (1991) without reflection, in its closed 2-D form: with centred points s and d,
    ``scale·cos θ = Σ s·d / Σ|s|²`` and ``scale·sin θ = Σ s×d / Σ|s|²`` (no SVD, so it batches
    on any device without a host round trip).
    """
    src = src.to(torch.float64)
    dst = dst.to(src).expand_as(src)
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    var_s = s.pow(2).sum((1, 2)).clamp(min=1e-12)
    a = (s * d).sum((1, 2)) / var_s
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / var_s
    linear = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], 1)  # [B,2,2]
    translation = mu_d.squeeze(1) - (linear @ mu_s.transpose(1, 2)).squeeze(2)
    return torch.cat([linear, translation[:, :, None]], 2)


def align_faces(frames: torch.Tensor, kps5: torch.Tensor, size: int = ALIGN_SIZE) -> torch.Tensor:
    """ArcFace-aligned crops.

    Args:
        frames: [B,H,W,3] uint8 RGB on any device.
        kps5: [B,5,2] keypoints in frame pixels (SCRFD order).

    Returns:
        [B,3,size,size] float32 RGB in 0..255.
    """
    # kornia.geometry.warp_affine computes the same; its generic matrix handling cost ~9 ms of host
    # time per batch, which bounded eval on a GPU. This is one affine_grid + grid_sample.
    import torch.nn.functional as F

    batch, height, width, _ = frames.shape
    template = ARCFACE_TEMPLATE * (size / ALIGN_SIZE)
    to_crop = similarity_transform(kps5.to(frames.device), template)  # [B,2,3]: frame px -> crop px
    # the sampling grid needs crop -> frame: invert the similarity [[a,-b],[b,a]] | t in closed form
    a, b = to_crop[:, 0, 0], to_crop[:, 1, 0]
    norm = (a * a + b * b).clamp(min=1e-12)
    linear = torch.stack([torch.stack([a, b], -1), torch.stack([-b, a], -1)], 1) / norm[:, None, None]
    to_frame = torch.cat([linear, -(linear @ to_crop[:, :, 2:])], 2)
    # pixel centres at integers on both sides (cv2.warpAffine), i.e. grid_sample's align_corners=True:
    # crop normalised -> crop px -> frame px -> frame normalised
    half_out = (size - 1) / 2
    in_scale = torch.tensor([2 / (width - 1), 2 / (height - 1)], dtype=to_frame.dtype, device=frames.device)
    theta = torch.cat([to_frame[:, :, :2] * half_out,
                       (to_frame[:, :, :2].sum(2, keepdim=True) * half_out + to_frame[:, :, 2:])], 2)
    theta = theta * in_scale[None, :, None]
    theta[:, :, 2] -= 1
    grid = F.affine_grid(theta.float(), [batch, 3, size, size], align_corners=True)
    images = frames.permute(0, 3, 1, 2).float()
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


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
