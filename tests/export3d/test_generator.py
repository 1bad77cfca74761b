"""Export3D generator: preset shapes, expression conditioning, the EMA tri-plane, full forward, discriminator."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from avatarcli.errors import AvatarError
from avatarcli.export3d.generator import (
    GENERATOR_PRESETS,
    CameraDiscriminator,
    Export3DGenerator,
    GeneratorShape,
    TriplaneEncoder,
)

EXPR = 7


def _cameras(batch: int, yaw: float = 0.0) -> torch.Tensor:
    """Generator-world EG3D cameras at radius 2.7 looking at the origin (yaw 0 = frontal, +z side)."""
    cos, sin = math.cos(yaw), math.sin(yaw)
    rotation = torch.tensor([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]]) @ torch.diag(
        torch.tensor([1.0, -1.0, -1.0]))
    cam2world = torch.eye(4)
    cam2world[:3, :3] = rotation
    cam2world[:3, 3] = rotation @ torch.tensor([0.0, 0.0, -2.7])
    intrinsics = torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1])
    return torch.cat([cam2world.flatten(), intrinsics]).expand(batch, 25).clone()


def _tiny(**overrides) -> GeneratorShape:
    return GeneratorShape.from_preset("tiny", EXPR, **overrides)


def test_presets_and_validation():
    assert set(GENERATOR_PRESETS) == {"paper", "small", "tiny"}
    shape = _tiny()
    assert (shape.image_size, shape.triplane_resolution, shape.neural_resolution, shape.expr_dim) == (64, 32, 16, EXPR)
    assert GeneratorShape.from_dict(shape.to_dict()) == shape
    paper = GeneratorShape.from_preset("paper", 20)
    assert (paper.image_size, paper.width, paper.heads, paper.blocks) == (256, 1024, 4, 5)
    with pytest.raises(AvatarError, match="unknown generator preset"):
        GeneratorShape.from_preset("huge", EXPR)
    with pytest.raises(AvatarError, match="unknown generator shape field"):
        GeneratorShape.from_preset("tiny", EXPR, depth=3)
    with pytest.raises(AvatarError, match="multiple of 16"):
        _tiny(image_size=72)
    with pytest.raises(AvatarError, match="heads"):
        _tiny(heads=3)


def test_paper_preset_parameter_count():
    shape = GeneratorShape.from_preset("paper", 64)
    with torch.device("meta"):  # no memory, no init cost
        model = Export3DGenerator(shape)
    total = sum(p.numel() for p in model.parameters())
    d = shape.width
    # One EAdaLN block: attention 4d²+4d, Mix-FFN 8d² + 4d·9 (depthwise) + 9d biases, adaLN d·6d + 6d.
    per_block = (4 * d * d + 4 * d) + (8 * d * d + 36 * d + 9 * d) + (6 * d * d + 6 * d)
    assert sum(p.numel() for p in model.encoder.blocks.parameters()) == shape.blocks * per_block
    assert 90e6 < total < 130e6, total  # ~108 M: the h = 1024 transformer dominates


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", {}),
    ("small", dict(width=96, heads=2, refine_width=32, high_width=16)),   # narrowed for CPU, 256² kept
    ("paper", dict(width=64, refine_width=32, high_width=16)),
])
def test_encoder_shapes(preset, overrides):
    shape = GeneratorShape.from_preset(preset, EXPR, **overrides)
    encoder = TriplaneEncoder(shape).eval()
    size = shape.image_size
    tokens = []
    encoder.blocks[0].register_forward_pre_hook(lambda module, args: tokens.append(args[0].shape))
    with torch.no_grad():
        planes = encoder(torch.rand(1, 3, size, size), torch.randn(1, EXPR))
    assert planes.shape == (1, 3, 32, size // 2, size // 2)
    assert tokens == [(1, size * size // 2**8, shape.width)]
    assert torch.isfinite(planes).all()
    with pytest.raises(AvatarError, match="source must be"):
        encoder(torch.rand(1, 3, size // 2, size // 2), torch.randn(1, EXPR))
    with pytest.raises(AvatarError, match="expression must be"):
        encoder(torch.rand(1, 3, size, size), torch.randn(1, EXPR + 1))


def test_expression_conditioning_learns():
    torch.manual_seed(0)
    encoder = TriplaneEncoder(_tiny())
    source = torch.rand(1, 3, 64, 64).expand(2, -1, -1, -1)
    expr = torch.randn(2, EXPR)
    planes = encoder(source, expr)
    # adaLN-Zero: the blocks start as the identity, so the expression has no effect yet ...
    assert torch.allclose(planes[0], planes[1])
    target = torch.randn_like(planes)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    F.mse_loss(planes, target).backward()
    assert encoder.blocks[0].modulation[1].weight.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        planes = encoder(source, expr)
    # ... but one step makes the gates expression-dependent.
    assert (planes[0] - planes[1]).abs().max() > 1e-4


def test_ema_plane_updates_only_in_training():
    torch.manual_seed(0)
    model = Export3DGenerator(_tiny())
    source, expr = torch.rand(3, 3, 64, 64), torch.randn(3, EXPR)
    assert model.ema_planes.shape == (1, 3, 32, 32, 32) and not model.ema_planes.any()
    with torch.no_grad():
        generated = model.encoder(source, expr)
    model.eval()
    assert torch.equal(model.planes(source, expr), generated)
    assert not model.ema_planes.any()
    model.train()
    planes = model.planes(source, expr)
    expected = (1 - model.shape.ema_decay) * generated.mean(0, keepdim=True)
    torch.testing.assert_close(model.ema_planes, expected)
    torch.testing.assert_close(planes, generated + expected)
    assert not model.ema_planes.requires_grad and planes.requires_grad
    model.eval()
    model.planes(source, expr)
    torch.testing.assert_close(model.ema_planes, expected)


def _ema_inputs() -> tuple[Export3DGenerator, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    return (Export3DGenerator(_tiny()).train(), torch.rand(4, 3, 64, 64, generator=generator),
            torch.randn(4, EXPR, generator=generator))


def _ema_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, source, expr = _ema_inputs()
    half = slice(2 * rank, 2 * rank + 2)
    model.planes(source[half], expr[half])
    torch.save(model.ema_planes, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~8 s of process start-up on 2 cores
def test_ema_plane_uses_the_global_batch_under_ddp(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ema")
    mp.spawn(_ema_worker, args=(2, port, out), nprocs=2, join=True)
    model, source, expr = _ema_inputs()
    model.planes(source, expr)
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{out}.{rank}"), model.ema_planes, rtol=1e-5, atol=1e-9)


def test_full_forward_and_gradients():
    torch.manual_seed(0)
    model = Export3DGenerator(_tiny()).train()
    source, expr, cameras = torch.rand(2, 3, 64, 64), torch.randn(2, EXPR), _cameras(2)
    out = model(source, expr, cameras)
    assert out["raw"].shape == (2, 3, 16, 16) and out["image"].shape == (2, 3, 64, 64)
    assert out["depth"].shape == (2, 1, 16, 16) and out["alpha"].shape == (2, 1, 16, 16)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert ((out["alpha"] >= 0) & (out["alpha"] <= 1 + 1e-5)).all()
    # Frontal camera at radius 2.7: every visible depth lies within the box seen from there.
    assert out["depth"].min() >= 2.7 - 0.5 * math.sqrt(3) - 1e-4
    loss = F.mse_loss(out["image"], source) + F.mse_loss(out["raw"], F.interpolate(source, size=16, mode="area"))
    loss.backward()
    for name in ("encoder.stem.0.weight", "encoder.high.0.weight", "encoder.patch_merge.weight",
                 "encoder.out.2.weight", "decoder.density_head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(AvatarError, match="cameras must be"):
        model.render(model.planes(source, expr), cameras[:, :16])


def test_render_perturbation_follows_mode():
    torch.manual_seed(0)
    model = Export3DGenerator(_tiny())
    planes = torch.randn(1, 3, 32, 32, 32)
    cameras = _cameras(1, yaw=0.3)
    model.eval()
    with torch.no_grad():
        first, second = model.render(planes, cameras), model.render(planes, cameras)
        jittered = model.render(planes, cameras, perturb=True)
    assert torch.equal(first["image"], second["image"])
    assert not torch.equal(first["raw"], jittered["raw"])


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = Export3DGenerator(_tiny()).train()
    source, expr, cameras = torch.rand(2, 3, 64, 64), torch.randn(2, EXPR), _cameras(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        planes = model.planes(source, expr)
        out = model.render(planes, cameras)
        loss = F.mse_loss(out["image"].float(), source)
    assert planes.dtype == torch.float32  # the float32 EMA buffer keeps sampling/compositing in float32
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.stem[0].weight.grad.abs().sum() > 0


def test_camera_discriminator():
    torch.manual_seed(0)
    disc = CameraDiscriminator(64, width=8, max_width=32)
    image, raw = torch.rand(3, 3, 64, 64, requires_grad=True), torch.rand(3, 3, 16, 16)
    logits = disc(image, raw, _cameras(3))
    assert logits.shape == (3,)
    with torch.no_grad():
        turned = disc(image, raw, _cameras(3, yaw=0.5))
        other_raw = disc(image, torch.rand(3, 3, 16, 16), _cameras(3))
    assert (logits - turned).abs().min() > 1e-6
    assert (logits - other_raw).abs().min() > 1e-6
    logits.sum().backward()
    assert image.grad.abs().sum() > 0
    plain = CameraDiscriminator(64, width=8, max_width=32, mbstd_group=0)
    assert plain(image, raw, _cameras(3)).shape == (3,)
    with pytest.raises(AvatarError, match="discriminator image"):
        disc(image[:, :, :32, :32], raw, _cameras(3))
    with pytest.raises(AvatarError, match="cameras"):
        disc(image, raw, _cameras(2))
    with pytest.raises(AvatarError, match="power of two"):
        CameraDiscriminator(96)
