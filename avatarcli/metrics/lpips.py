"""LPIPS (Zhang et al. 2018, v0.1, AlexNet; VGG16 with ``net="vgg"``): the standard perceptual distance.

Network: torchvision AlexNet features (ImageNet weights, registry ``alexnet_imagenet``), the
outputs of its 5 ReLUs unit-normalised over channels, squared differences weighted by the
learned 1×1 linear layers (registry ``lpips_alex_lin``), averaged over space and summed over
layers. Inputs are RGB in [-1, 1] passed through LPIPS's fixed shift/scale layer. Tested against
the reference ``lpips`` package with the same weights. No ``no_grad``: the weights are frozen, and
``avatarcli.losses`` backpropagates through it to the images.
"""

from __future__ import annotations

import torch
from torch import nn

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
ALEXNET_RELU_ENDS = (2, 5, 8, 10, 12)
"""End indices (exclusive) into ``alexnet.features`` of the 5 slices LPIPS taps."""
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
VGG16_RELU_ENDS = (4, 9, 16, 23, 30)
VGG16_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_NETS = {  # net -> (torchvision builder, tap ends, tap channels, backbone model, linear-head model)
    "alex": ("alexnet", ALEXNET_RELU_ENDS, ALEXNET_CHANNELS, "alexnet_imagenet", "lpips_alex_lin"),
    "vgg": ("vgg16", VGG16_RELU_ENDS, VGG16_CHANNELS, "vgg16_imagenet", "lpips_vgg_lin"),
}


class LPIPS(nn.Module):
    """``forward(a, b)``: [B,3,H,W] RGB in [-1,1] -> [B] LPIPS distance."""

    def __init__(self, backbone_state: dict, lin_state: dict, net: str = "alex"):
        super().__init__()
        import torchvision.models

        builder, self.relu_ends, channels, _, _ = LPIPS_NETS[net]
        with torch.device("meta"):  # shapes only: skips initialising 61M weights that are overwritten
            features = getattr(torchvision.models, builder)(weights=None).features
        prefix = "features."
        features.load_state_dict({k[len(prefix):]: v for k, v in backbone_state.items() if k.startswith(prefix)},
                                 assign=True)
        self.features = features.eval()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        for k, lin in enumerate(self.lins):
            lin.weight.data.copy_(lin_state[f"lin{k}.model.1.weight"])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_registry(cls, device, models_dir=None, net: str = "alex") -> "LPIPS":
        from avatarcli.registry import resolve

        _, _, _, backbone_name, lin_name = LPIPS_NETS[net]
        # mmap: only the feature weights (2.5 MB of AlexNet's 233 MB file) are read
        backbone = torch.load(resolve(backbone_name, models_dir), map_location="cpu", weights_only=True, mmap=True)
        lin = torch.load(resolve(lin_name, models_dir), map_location="cpu", weights_only=True)
        return cls(backbone, lin, net).to(device).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, start = [], 0
        x = (x - self.shift) / self.scale
        for end in self.relu_ends:
            for layer in self.features[start:end]:
                x = layer(x)
            taps.append(x)
            start = end
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((fa - fb) ** 2).mean((2, 3))
        return total.view(-1)


def to_lpips_input(images: torch.Tensor) -> torch.Tensor:
    """[B,H,W,3] uint8 -> [B,3,H,W] float32 in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
