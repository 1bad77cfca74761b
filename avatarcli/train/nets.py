"""Backbones written in plain torch (no downloaded weights)."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al. 2018): global pool -> bottleneck MLP -> sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(gate))))
        return x * gate


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 2) if channels >= 4 else 1, channels)
    raise ValueError(f"norm must be 'batch' or 'group', not {kind!r}")


class BasicBlockSE(nn.Module):
    """ResNet basic block (two 3x3 convs) with squeeze-excitation before the residual sum."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.se = SqueezeExcite(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        return torch.relu(y + self.shortcut(x))


class ResNetSE18(nn.Module):
    """ResNet-18 (2-2-2-2 basic blocks, widths w, 2w, 4w, 8w) with squeeze-excitation blocks.

    Returns the globally average-pooled features ``[B, 8w]`` (512 at the standard ``width=64``).
    ``width`` and ``norm`` exist so tests and CPU runs can use a narrow net and so DDP runs can
    use GroupNorm, whose output does not depend on how the batch is split across processes.
    """

    def __init__(self, width: int = 64, norm: str = "batch", in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), _norm(norm, width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers = []
        cin = width
        for stage, cout in enumerate(widths):
            stride = 1 if stage == 0 else 2
            layers += [BasicBlockSE(cin, cout, stride, norm), BasicBlockSE(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_features = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last norm of each residual branch: every block starts as the identity.
        for module in self.modules():
            if isinstance(module, BasicBlockSE) and isinstance(module.bn2, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean((2, 3))
