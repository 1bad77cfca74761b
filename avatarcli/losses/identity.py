"""Identity loss: 1 - cosine between ArcFace-family embeddings of generated and target faces.

The network is the registry's ONNX model (``mobilefacenet_arcface`` by default; ``arcface_r50``
where present) converted to native torch (onnx2torch, with the batch dimension freed by
:func:`avatarcli.onnx_torch.prepare_graph`), frozen: gradients flow to the images only. Faces are
brought to 112×112 either by ArcFace 5-point alignment (:func:`avatarcli.metrics.identity.align_faces`,
the CSIM metric's alignment, with given keypoints) or by a fixed crop of already aligned face
images, resized with an antialiased bilinear filter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avatarcli.errors import AvatarError
from avatarcli.losses.base import FrozenNetLoss, as_nhwc, check_images, reduce
from avatarcli.metrics.identity import ALIGN_SIZE, align_faces

DEFAULT_CROP = (35 / 256, 223 / 256, 32 / 256, 220 / 256)
"""(top, bottom, left, right) fractions of the image kept before resizing to 112²: the face region
of FFHQ-style aligned crops (the crop of pSp's identity loss, rows 35:223 and columns 32:220 of 256²)."""


class IdentityLoss(FrozenNetLoss):
    """``forward(generated, target, keypoints=None, target_keypoints=None)`` -> 1 - cos(embeddings).

    Args:
        model: registry name of an ArcFace-family ONNX network (with ``pixel_mean``/``pixel_std``).
        models_dir: extra models folder searched first (see :mod:`avatarcli.registry`).
        crop: fixed (top, bottom, left, right) crop fractions used when no keypoints are given.
        required: missing weights raise an ``AvatarError``; with False the loss is disabled instead
            (warns once, returns zeros, ``active`` False, ``reason`` says why).
        reduction: ``mean`` | ``sum`` | ``none`` ([B]).

    Inputs: generated, target [B,3,H,W] RGB in [0,1]; keypoints / target_keypoints [B,5,2] in pixels
    of those images (left eye, right eye, nose, left and right mouth corner; SCRFD order). Without
    ``target_keypoints`` the target is aligned with ``keypoints``; without either, both use ``crop``.
    """

    label = "identity loss"

    def __init__(self, model: str = "mobilefacenet_arcface", models_dir=None,
                 crop: tuple[float, float, float, float] = DEFAULT_CROP, required: bool = True,
                 reduction: str = "mean"):
        super().__init__()
        reduce(torch.zeros(1), reduction)
        top, bottom, left, right = crop
        if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
            raise AvatarError(f"identity loss crop must be fractions top < bottom, left < right in [0,1], got {crop}")
        self.model_name, self.crop, self.reduction = model, tuple(crop), reduction
        self.net = None
        self._load_or_disable(lambda: self._load(models_dir), required)

    def _load(self, models_dir) -> None:
        from onnx2torch import convert

        from avatarcli.onnx_torch import prepare_graph
        from avatarcli.registry import file_sha256, get_spec, resolve

        spec = get_spec(self.model_name)
        if "pixel_mean" not in spec.extra:
            raise AvatarError(f"{self.model_name} is not a face-recognition model (no input normalisation in the registry)")
        path = resolve(self.model_name, models_dir)
        self.net = convert(prepare_graph(path))
        # not persistent: a checkpoint holding this module needs no copy of fixed constants
        self.register_buffer("mean", torch.tensor(spec.extra["pixel_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.extra["pixel_std"]).view(1, 3, 1, 1), persistent=False)
        self.models = {self.model_name: file_sha256(path)}

    def align(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        """[B,3,H,W] in [0,1] (+ [B,5,2] keypoints in pixels) -> [B,3,112,112] float32 RGB in 0..255."""
        if keypoints is not None:
            if keypoints.shape != (images.shape[0], 5, 2):
                raise AvatarError(f"identity loss keypoints must be [B,5,2] with B={images.shape[0]}, "
                                  f"got {tuple(keypoints.shape)}")
            return align_faces(as_nhwc(images) * 255, keypoints)
        top, bottom, left, right = self.crop
        height, width = images.shape[2:]
        region = images[:, :, round(top * height): round(bottom * height), round(left * width): round(right * width)]
        return F.interpolate(region.float() * 255, size=(ALIGN_SIZE, ALIGN_SIZE), mode="bilinear",
                             align_corners=False, antialias=True)

    def _embed_aligned(self, faces: torch.Tensor) -> torch.Tensor:
        """[B,3,112,112] 0..255 -> [B,D] unit-norm float32 embeddings."""
        weight = next(self.net.parameters())
        x = (faces.to(weight.dtype) - self.mean.to(weight.dtype)) / self.std.to(weight.dtype)
        out = self.net(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return F.normalize(out.flatten(1).float(), dim=1)

    def embed(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        """[B,3,H,W] in [0,1] (+ optional [B,5,2] keypoints) -> [B,D] unit-norm float32 embeddings."""
        if not self.active:
            raise AvatarError(f"{self.label} is disabled: {self.reason}")
        return self._embed_aligned(self.align(images, keypoints))

    def forward(self, generated: torch.Tensor, target: torch.Tensor, keypoints: torch.Tensor | None = None,
                target_keypoints: torch.Tensor | None = None) -> torch.Tensor:
        check_images(generated, target, channels=3)
        if not self.active:
            return self._disabled(generated, self.reduction)
        if target_keypoints is None:
            target_keypoints = keypoints
        faces = torch.cat([self.align(generated, keypoints), self.align(target, target_keypoints)])
        embeddings = self._embed_aligned(faces)  # one network pass for both
        gen, tgt = embeddings.chunk(2)
        return reduce((1 - (gen * tgt).sum(1)).to(generated.dtype), self.reduction)
