"""Adam whose whole state lives on the device, so that its step can be replayed in a CUDA graph."""

from __future__ import annotations

import torch


class DeviceAdam:
    """Adam (as ``torch.optim.Adam``) with an exponentially decaying learning rate, whose step count
    and rates live on the device: nothing on the host changes between steps, so a step can be part of
    a CUDA graph (``torch.optim.Adam`` with a scheduler changes host-side rates every step).

    ``params_lrs``: (tensor, learning rate) pairs; every rate is multiplied by ``scale`` and then by
    ``gamma`` after each step.
    """

    def __init__(self, params_lrs, scale: float, gamma: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p, _ in params_lrs]
        device = self.params[0].device
        self.lrs = torch.tensor([lr * scale for _, lr in params_lrs], dtype=torch.float32, device=device)
        self.gamma, self.betas, self.eps = gamma, betas, eps
        self.count = torch.zeros((), dtype=torch.float32, device=device)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads) -> None:
        """One update of every parameter in place from ``grads`` (same order as ``params``)."""
        b1, b2 = self.betas
        self.count += 1
        correction1 = 1 - torch.pow(b1, self.count)
        root_correction2 = torch.sqrt(1 - torch.pow(b2, self.count))
        for k, (p, g, m, v) in enumerate(zip(self.params, grads, self.m, self.v)):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_((self.lrs[k] / correction1) * m / (v.sqrt() / root_correction2 + self.eps))
        self.lrs.mul_(self.gamma)
