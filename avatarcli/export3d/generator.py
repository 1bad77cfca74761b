"""Export3D generator G(S, β_D) (arXiv 2404.00636 §3.2–3.3) and its camera-conditioned discriminator.

The tri-plane encoder follows Live 3D Portrait (LP3D): a convolutional stem and Segformer-style transformer
blocks (overlap patch merge, Mix-FFN = MLP with a 3x3 depthwise conv, so no positional embedding) whose
LayerNorms are modulated by the expression vector DiT-style (EAdaLN, adaLN-Zero gates), pixel-shuffle
upsampling with a Gaussian low-pass after every step (anti-aliasing), then ViT + conv refinement at H/2,
joined by a high-resolution conv branch read straight from the source image (LP3D's E_high).

Shapes: B batch, H = W = image_size, P = H/2 tri-plane resolution, r = H/4 neural-render resolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import nn

from avatarcli.errors import AvatarError
from avatarcli.export3d.volume import SuperResolution, TriplaneDecoder, render_triplane

# Anti-aliasing low-pass after each x2 pixel shuffle: sigma 1 px keeps ~30% at the old grid's Nyquist/2
# and removes >99% at the new Nyquist, where the shuffle's checkerboard lives.
_BLUR_KERNEL = (5, 5)
_BLUR_SIGMA = (1.0, 1.0)


@dataclass
class GeneratorShape:
    """Every size of the generator. ``triplane_resolution = image_size // 2``,
    ``neural_resolution = image_size // 4`` (the volume-rendered raw image, super-resolved to image_size)."""

    image_size: int = 256
    width: int = 1024            # h: token width of the EAdaLN-ViT blocks at H/16
    heads: int = 4
    blocks: int = 5              # EAdaLN-ViT blocks at H/16
    refine_blocks: int = 2       # ViT + conv blocks at H/2 after upsampling
    expr_dim: int = 64           # conditioning size: β′ (CLeBS d) or raw β (K)
    triplane_channels: int = 32
    coarse: int = 48             # stratified samples per ray
    fine: int = 48               # importance samples per ray
    decoder_hidden: int = 64
    sr_width: int = 128
    ema_decay: float = 0.998     # δ of Eq. 12
    refine_width: int = 256      # channels of the H/2 refinement (moderate: attention there has P² queries)
    high_width: int = 64         # channels of the high-resolution source branch (E_high)
    refine_sr_ratio: int = 2     # Segformer spatial reduction of keys/values in the H/2 attention

    def __post_init__(self):
        if self.image_size % 16 or self.image_size < 32:
            raise AvatarError(f"generator image_size must be a multiple of 16 and >= 32, not {self.image_size}")
        if self.width % self.heads or self.width % 16:
            raise AvatarError(f"generator width {self.width} must be a multiple of 16 and of heads ({self.heads})")
        if self.refine_width % 8:
            raise AvatarError(f"generator refine_width must be a multiple of 8, not {self.refine_width}")
        for name in ("blocks", "refine_blocks", "expr_dim", "coarse", "decoder_hidden", "sr_width",
                     "high_width", "refine_sr_ratio", "triplane_channels"):
            if getattr(self, name) < (0 if name in ("blocks", "refine_blocks") else 1):
                raise AvatarError(f"generator {name} must be positive, not {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise AvatarError(f"generator ema_decay must be in [0, 1), not {self.ema_decay}")

    @property
    def triplane_resolution(self) -> int:
        return self.image_size // 2

    @property
    def neural_resolution(self) -> int:
        return self.image_size // 4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GeneratorShape:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AvatarError(f"unknown generator shape field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, expr_dim: int, **overrides) -> GeneratorShape:
        if name not in GENERATOR_PRESETS:
            raise AvatarError(f"unknown generator preset {name!r} (choose from {', '.join(GENERATOR_PRESETS)})")
        return cls.from_dict({**GENERATOR_PRESETS[name], "expr_dim": expr_dim, **overrides})


GENERATOR_PRESETS: dict[str, dict] = {
    # The paper's generator (h = 1024, 4 heads, 256² output, 48+48 samples); batch 8 in the paper.
    "paper": dict(image_size=256, width=1024, heads=4, blocks=5, refine_blocks=2, coarse=48, fine=48,
                  decoder_hidden=64, sr_width=128, refine_width=256, high_width=64),
    # Short real runs (<= 10 min on one H100) at 256²: narrower tokens, fewer blocks and samples.
    "small": dict(image_size=256, width=384, heads=6, blocks=3, refine_blocks=1, coarse=32, fine=32,
                  decoder_hidden=64, sr_width=64, refine_width=128, high_width=32),
    # CPU tests at 64²: a training step at batch 2 on 2 cores in well under a second.
    "tiny": dict(image_size=64, width=64, heads=2, blocks=1, refine_blocks=1, coarse=8, fine=8,
                 decoder_hidden=32, sr_width=32, refine_width=32, high_width=16),
}


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT modulation of normalised tokens x [B,N,d] by shift, scale [B,d]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _tokens_to_grid(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B,N,C] (row-major, N = height*width) -> [B,C,height,width]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def _grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> [B,h*w,C]."""
    return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Segformer Mix-FFN: Linear -> 3x3 depthwise conv (positional information) -> GELU -> Linear."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        hidden = dim * ratio
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """x [B,N,d], N = height*width -> [B,N,d]."""
        y = self.dwconv(_tokens_to_grid(self.fc1(x), height, width))
        return self.fc2(F.gelu(_grid_to_tokens(y)))


class Attention(nn.Module):
    """Multi-head self-attention; with sr_ratio > 1 keys and values come from a strided-conv-reduced grid
    (Segformer's efficient attention), so P² queries attend to (P/sr)² keys."""

    def __init__(self, dim: int, heads: int, sr_ratio: int = 1):
        super().__init__()
        self.heads = heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.reduce = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.reduce_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """x [B,N,d] -> [B,N,d]."""
        b, n, d = x.shape
        source = x
        if self.sr_ratio > 1:
            source = self.reduce_norm(_grid_to_tokens(self.reduce(_tokens_to_grid(x, height, width))))
        q = self.q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(source).view(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block with Mix-FFN. With ``cond_dim`` it is an EAdaLN block: LayerNorms without affine,
    then shift/scale/gate (DiT adaLN-Zero: zero-initialised, so the block starts as the identity and the
    gates grow expression-dependent from the first step) from the conditioning vector."""

    def __init__(self, dim: int, heads: int, cond_dim: int | None = None, sr_ratio: int = 1):
        super().__init__()
        conditioned = cond_dim is not None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not conditioned, eps=1e-6)
        self.attn = Attention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not conditioned, eps=1e-6)
        self.mlp = MixFFN(dim)
        self.modulation = None
        if conditioned:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, height: int, width: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,N,d], cond [B,cond_dim] (conditioned blocks only) -> [B,N,d]."""
        if self.modulation is None:
            x = x + self.attn(self.norm1(x), height, width)
            return x + self.mlp(self.norm2(x), height, width)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift1, scale1), height, width)
        return x + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift2, scale2), height, width)


class ConvBlock(nn.Module):
    """Residual 3x3 conv pair with LeakyReLU (no norm: the output must not depend on the batch split)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), 0.2))


class ShuffleUp(nn.Module):
    """x2 pixel shuffle, Gaussian low-pass (anti-aliasing), then a 3x3 conv to the output width."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        if cin % 4:
            raise AvatarError(f"pixel-shuffle upsampling needs channels divisible by 4, not {cin}")
        self.conv = nn.Conv2d(cin // 4, cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,cin,h,w] -> [B,cout,2h,2w]."""
        x = gaussian_blur2d(F.pixel_shuffle(x, 2), _BLUR_KERNEL, _BLUR_SIGMA)
        return F.leaky_relu(self.conv(x), 0.2)


def _conv_act(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2), nn.LeakyReLU(0.2)]


class TriplaneEncoder(nn.Module):
    """Source image + expression -> tri-plane.

    ``forward(source [B,3,H,W] in [0,1], expr [B,expr_dim]) -> planes [B,3,C,H/2,W/2]`` (C = 32).
    """

    def __init__(self, shape: GeneratorShape):
        super().__init__()
        self.shape = shape
        h = shape.width
        # Conv stem: three stride-2 convs, [B,3,H,W] -> [B,h/4,H/8,W/8].
        stem = [max(h // 16, 8), max(h // 8, 8), h // 4]
        self.stem = nn.Sequential(*_conv_act(3, stem[0], 3, 2), *_conv_act(stem[0], stem[1], 3, 2),
                                  *_conv_act(stem[1], stem[2], 3, 2))
        # Overlap patch merge (Segformer k3 s2): H/8 -> H/16, h-dim tokens.
        self.patch_merge = nn.Conv2d(h // 4, h, 3, 2, 1)
        self.patch_norm = nn.LayerNorm(h)
        self.expr_embed = nn.Sequential(nn.Linear(shape.expr_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList([TransformerBlock(h, shape.heads, cond_dim=h) for _ in range(shape.blocks)])
        self.final_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        # Upsampling H/16 -> H/8 -> H/4 -> H/2.
        self.up = nn.Sequential(ShuffleUp(h, h // 2), ShuffleUp(h // 2, h // 4), ShuffleUp(h // 4, shape.refine_width))
        rw = shape.refine_width
        refine_heads = max(1, rw // 64)
        self.refine_vit = nn.ModuleList([TransformerBlock(rw, refine_heads, sr_ratio=shape.refine_sr_ratio)
                                         for _ in range(shape.refine_blocks)])
        self.refine_conv = nn.ModuleList([ConvBlock(rw) for _ in range(shape.refine_blocks)])
        # E_high: detail straight from the source at H/2, joined before the final convs.
        hw = shape.high_width
        self.high = nn.Sequential(*_conv_act(3, hw, 7, 2), *_conv_act(hw, hw, 3, 1), *_conv_act(hw, hw, 3, 1))
        self.out = nn.Sequential(*_conv_act(rw + hw, rw, 3, 1), nn.Conv2d(rw, 3 * shape.triplane_channels, 3, 1, 1))
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # adaLN-Zero (xavier above overwrote it)
            nn.init.zeros_(block.modulation[1].weight)
            nn.init.zeros_(block.modulation[1].bias)
        nn.init.zeros_(self.final_modulation[1].weight)
        nn.init.zeros_(self.final_modulation[1].bias)

    def forward(self, source: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        s = self.shape
        if source.ndim != 4 or source.shape[1] != 3 or source.shape[-2:] != (s.image_size, s.image_size):
            raise AvatarError(f"generator source must be [B,3,{s.image_size},{s.image_size}], "
                              f"not {list(source.shape)}")
        if expr.ndim != 2 or expr.shape != (source.shape[0], s.expr_dim):
            raise AvatarError(f"generator expression must be [{source.shape[0]},{s.expr_dim}], not {list(expr.shape)}")
        source = source * 2 - 1                                           # [0,1] -> [-1,1], zero-centred
        x = self.patch_merge(self.stem(source))                           # [B,h,H/16,W/16]
        height, width = x.shape[-2:]
        x = self.patch_norm(_grid_to_tokens(x))                           # [B,H·W/2^8,h]
        cond = self.expr_embed(expr.to(x.dtype))                          # [B,h]
        for block in self.blocks:
            x = block(x, height, width, cond)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        x = _tokens_to_grid(_modulate(self.final_norm(x), shift, scale), height, width)
        x = self.up(x)                                                    # [B,rw,H/2,W/2]
        height, width = x.shape[-2:]
        for vit, conv in zip(self.refine_vit, self.refine_conv):
            x = conv(_tokens_to_grid(vit(_grid_to_tokens(x), height, width), height, width))
        x = self.out(torch.cat([x, self.high(source)], dim=1))            # [B,3C,H/2,W/2]
        return x.view(x.shape[0], 3, s.triplane_channels, height, width)


class Export3DGenerator(nn.Module):
    """G(S, β_D): tri-plane encoder + online EMA tri-plane (Eq. 12), volume rendering at H/4, super-resolution.

    ``forward(source [B,3,H,W], expr [B,expr_dim], cameras [B,25]) -> dict(raw [B,3,r,r], image [B,3,H,W],
    depth [B,1,r,r], alpha [B,1,r,r])``; cameras are generator-world 25-d EG3D cameras.
    """

    def __init__(self, shape: GeneratorShape):
        super().__init__()
        self.shape = shape
        c, p = shape.triplane_channels, shape.triplane_resolution
        self.encoder = TriplaneEncoder(shape)
        self.decoder = TriplaneDecoder(in_features=c, hidden=shape.decoder_hidden, out_features=c)
        self.superres = SuperResolution(channels=c, in_resolution=shape.neural_resolution,
                                        out_resolution=shape.image_size, width=shape.sr_width)
        self.register_buffer("ema_planes", torch.zeros(1, 3, c, p, p))

    def planes(self, source: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """source [B,3,H,W], expr [B,expr_dim] -> generated + EMA tri-plane [B,3,C,P,P].

        In training mode the EMA plane first absorbs this batch's mean (ema = δ·ema + (1-δ)·mean, no gradient;
        under torch.distributed the mean is all-reduced, so every rank must run training-mode forwards together).
        """
        generated = self.encoder(source, expr)
        if self.training:
            with torch.no_grad():
                batch_mean = generated.detach().float().mean(0, keepdim=True)
                world = _world_size()
                if world > 1:  # the global batch mean, so DDP at batch b/rank equals one process at b
                    dist.all_reduce(batch_mean)
                    batch_mean /= world
                self.ema_planes.lerp_(batch_mean, 1.0 - self.shape.ema_decay)
        # The float32 buffer promotes bf16 (autocast) planes to float32 for sampling and compositing.
        return generated + self.ema_planes

    def render(self, planes: torch.Tensor, cameras: torch.Tensor, perturb=None) -> dict:
        """planes [B,3,C,P,P], cameras [B,25] -> dict(raw, image, depth, alpha) (see the class docstring).
        ``perturb`` (sample jitter: False, True or per-item seeds, ``volume.Jitter``) defaults to
        ``self.training``."""
        if cameras.ndim != 2 or cameras.shape != (planes.shape[0], 25):
            raise AvatarError(f"generator cameras must be [{planes.shape[0]},25], not {list(cameras.shape)}")
        s = self.shape
        perturb = self.training if perturb is None else perturb
        out = render_triplane(planes, self.decoder, cameras, s.neural_resolution, coarse=s.coarse, fine=s.fine,
                              half_extent=0.5, perturb=perturb)
        image = self.superres(out["rgb"], out["features"])
        return dict(raw=out["rgb"], image=image, depth=out["depth"], alpha=out["alpha"])

    def forward(self, source: torch.Tensor, expr: torch.Tensor, cameras: torch.Tensor, perturb=None) -> dict:
        return self.render(self.planes(source, expr), cameras, perturb)


class _DownBlock(nn.Module):
    """StyleGAN2 residual discriminator block: two 3x3 convs then /2, skip = avg-pool + 1x1; sum / sqrt 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2)
        return (F.avg_pool2d(y, 2) + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2.0)


def _minibatch_std(x: torch.Tensor, group: int) -> torch.Tensor:
    """Append one channel: the std over groups of samples, averaged over channels and pixels. [B,C,h,w] ->
    [B,C+1,h,w]. The group size divides the batch (gcd), so any batch size works."""
    b, c, h, w = x.shape
    g = math.gcd(b, group)
    y = x.float().view(g, b // g, c, h, w)
    std = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))   # [B/g]
    std = std.view(1, b // g, 1, 1, 1).expand(g, b // g, 1, h, w).reshape(b, 1, h, w)
    return torch.cat([x, std.to(x.dtype)], dim=1)


class CameraDiscriminator(nn.Module):
    """Dual discriminator (EG3D): the image and the upsampled raw image (6 channels) through residual
    downsampling blocks to 4x4, conditioned on the camera by projection (Miyato & Koyama 2018):
    ``logit = fc(φ(x)) + <proj(φ(x)), embed(camera)>``.

    ``forward(image [B,3,H,W], raw [B,3,r,r], cameras [B,25]) -> logits [B]``.
    """

    def __init__(self, image_size: int, width: int = 64, max_width: int = 512, camera_dim: int = 25,
                 mbstd_group: int = 4, cmap_dim: int = 256):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise AvatarError(f"discriminator image_size must be a power of two >= 8, not {image_size}")
        self.image_size = image_size
        self.camera_dim = camera_dim
        self.mbstd_group = mbstd_group

        def channels(res: int) -> int:
            return min(width * (image_size // res), max_width)

        self.from_rgb = nn.Sequential(nn.Conv2d(6, channels(image_size), 1), nn.LeakyReLU(0.2))
        blocks, res = [], image_size
        while res > 4:
            blocks.append(_DownBlock(channels(res), channels(res // 2)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        top = channels(4)
        self.epilogue_conv = nn.Conv2d(top + (1 if mbstd_group > 0 else 0), top, 3, 1, 1)
        self.features = nn.Linear(top * 16, top)
        self.fc = nn.Linear(top, 1)
        self.proj = nn.Linear(top, cmap_dim, bias=False)
        self.camera_embed = nn.Sequential(nn.Linear(camera_dim, cmap_dim), nn.LeakyReLU(0.2),
                                          nn.Linear(cmap_dim, cmap_dim))
        self.cmap_scale = 1.0 / math.sqrt(cmap_dim)

    def forward(self, image: torch.Tensor, raw: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        if image.ndim != 4 or image.shape[1:] != (3, self.image_size, self.image_size):
            raise AvatarError(f"discriminator image must be [B,3,{self.image_size},{self.image_size}], "
                              f"not {list(image.shape)}")
        if raw.ndim != 4 or raw.shape[:2] != (b, 3) or cameras.shape != (b, self.camera_dim):
            raise AvatarError(f"discriminator raw must be [{b},3,r,r] and cameras [{b},{self.camera_dim}], "
                              f"not {list(raw.shape)} and {list(cameras.shape)}")
        raw_up = F.interpolate(raw, size=image.shape[-2:], mode="bilinear", align_corners=False)
        x = self.blocks(self.from_rgb(torch.cat([image, raw_up.to(image.dtype)], dim=1)))   # [B,c,4,4]
        if self.mbstd_group > 0:
            x = _minibatch_std(x, self.mbstd_group)
        x = F.leaky_relu(self.epilogue_conv(x), 0.2)
        features = F.leaky_relu(self.features(x.flatten(1)), 0.2)                     # [B,c]
        cmap = self.camera_embed(cameras.to(features.dtype))                          # [B,cmap]
        projection = (self.proj(features) * cmap).sum(dim=1) * self.cmap_scale
        return self.fc(features).squeeze(1) + projection
