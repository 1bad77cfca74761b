"""Tests of avatarcli.losses: each loss against an independent computation (naive torch, scikit-image,
the ``lpips`` package), gradients (gradcheck in float64), the real identity stand-in network, and
the behaviour of network losses whose weights are absent. ``device`` x ``dtype`` come from conftest."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avatarcli.errors import AvatarError
from avatarcli.losses import (
    IdentityLoss,
    L1Loss,
    LossSet,
    PerceptualLoss,
    l1_loss,
    l2_loss,
    ms_ssim,
    ms_ssim_loss,
    ssim_loss,
)

DEEP3D = "data/deep3d_examples"
FACES = ("000002", "000006", "000031", "015259")
WANG_2003_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def smooth_images(shape, seed, dtype=torch.float64, device="cpu"):
    """Smooth random images in [0,1] (a blurred noise field plus a gradient), [B,C,H,W]."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    noise = F.avg_pool2d(torch.rand(b, c, h + 4, w + 4, generator=gen, dtype=torch.float64), 5, stride=1)
    ramp = torch.linspace(0, 0.3, w, dtype=torch.float64)
    return (0.7 * noise + ramp).clamp(0, 1).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# pixel and structure losses


@pytest.mark.parametrize("with_mask", [False, True])
def test_l1_l2_match_naive(device, dtype, with_mask):
    a, b = smooth_images((3, 3, 20, 24), 0, dtype, device), smooth_images((3, 3, 20, 24), 1, dtype, device)
    mask = (torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(2)) > 0.4).to(device) if with_mask else None
    expected_l1, expected_l2 = [], []
    for i in range(3):
        diff = (a[i] - b[i]).permute(1, 2, 0)  # [H,W,C]
        picked = diff[mask[i]] if with_mask else diff.reshape(-1, 3)
        expected_l1.append(picked.abs().mean())
        expected_l2.append(picked.pow(2).mean())
    expected_l1, expected_l2 = torch.stack(expected_l1), torch.stack(expected_l2)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(l1_loss(a, b, mask, reduction="none"), expected_l1, **tol)
    torch.testing.assert_close(l2_loss(a, b, mask, reduction="none"), expected_l2, **tol)
    torch.testing.assert_close(l1_loss(a, b, mask), expected_l1.mean(), **tol)
    torch.testing.assert_close(l2_loss(a, b, mask, reduction="sum"), expected_l2.sum(), **tol)
    assert L1Loss()(a, b, mask).dtype == dtype
    if with_mask:  # a [B,1,H,W] float mask means the same; an empty mask gives 0, not nan
        torch.testing.assert_close(l1_loss(a, b, mask[:, None].to(dtype)), expected_l1.mean(), **tol)
        assert l1_loss(a, b, torch.zeros_like(mask)).item() == 0.0


def test_ssim_loss_matches_metric_and_scikit_image(device, dtype):
    from skimage.metrics import structural_similarity

    from avatarcli.metrics.image import ssim

    a, b = smooth_images((2, 3, 32, 40), 3, dtype, device), smooth_images((2, 3, 32, 40), 4, dtype, device)
    loss = ssim_loss(a, b, reduction="none")
    assert loss.dtype == dtype and loss.shape == (2,)
    reference = [structural_similarity(a[i].permute(1, 2, 0).double().cpu().numpy(), b[i].permute(1, 2, 0).double().cpu().numpy(),
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                       channel_axis=-1) for i in range(2)]
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(loss.double().cpu().numpy(), 1 - np.array(reference), atol=tol)
    # the same number eval reports on the uint8 scale
    metric = ssim((a * 255).permute(0, 2, 3, 1), (b * 255).permute(0, 2, 3, 1), dtype=torch.float64)
    np.testing.assert_allclose(loss.double().cpu().numpy(), 1 - metric.cpu().numpy(), atol=tol)
    mask = torch.zeros(2, 32, 40, dtype=torch.bool, device=device)
    mask[:, 8:30, 4:33] = True
    masked = ssim_loss(a, b, mask, reduction="none")
    metric_masked = ssim((a * 255).permute(0, 2, 3, 1), (b * 255).permute(0, 2, 3, 1), mask, dtype=torch.float64)
    np.testing.assert_allclose(masked.double().cpu().numpy(), 1 - metric_masked.cpu().numpy(), atol=tol)
    assert ssim_loss(a, a).abs().item() < (1e-6 if dtype == torch.float32 else 1e-12)


def naive_ms_ssim(a: torch.Tensor, b: torch.Tensor, scales: int) -> torch.Tensor:
    """MS-SSIM written out directly: 2-D Gaussian conv2d (no banded matrices, no centring), float64."""
    a, b = a.double().cpu(), b.double().cpu()
    x = torch.arange(-5, 6, dtype=torch.float64)
    g = torch.exp(-x ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, 11, 11)
    blur = lambda t: F.conv2d(t, kernel, groups=a.shape[1])  # noqa: E731
    weights = torch.tensor(WANG_2003_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = torch.ones(a.shape[:2], dtype=torch.float64)
    for s in range(scales):
        if s:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
        cs = (2 * cov + c2) / (var_a + var_b + c2)
        if s == scales - 1:
            cs = cs * (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
        out = out * torch.relu(cs.mean((2, 3))) ** weights[s]
    return out.mean(1)


@pytest.mark.parametrize("size,scales", [((176, 184), 5), ((45, 52), 3), ((40, 50), 2)])
def test_ms_ssim_matches_naive(device, dtype, size, scales):
    a, b = smooth_images((2, 3, *size), 5, dtype, device), smooth_images((2, 3, *size), 6, dtype, device)
    b = 0.5 * a + 0.5 * b  # related images: every scale's cs well above 0
    value = ms_ssim(a, b)
    assert value.dtype == dtype and value.shape == (2,)
    expected = naive_ms_ssim(a, b, scales)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(value.double().cpu().numpy(), expected.numpy(), atol=tol)
    torch.testing.assert_close(ms_ssim_loss(a, b, reduction="none"), 1 - value)
    assert ms_ssim_loss(a, a).abs().item() < (1e-6 if dtype == torch.float32 else 1e-12)


def test_ms_ssim_clips_negative_terms_with_finite_gradients():
    a = smooth_images((1, 3, 24, 24), 7).requires_grad_(True)
    b = 1 - a.detach()  # anti-correlated: negative contrast-structure at the fine scale
    value = ms_ssim(a, b)
    value.sum().backward()
    assert value.item() >= 0 and torch.isfinite(a.grad).all()


def test_ssim_terms_keep_full_precision_under_bf16_autocast():
    """Under a bf16 autocast (how trainers run on CUDA) the SSIM statistics stay in the inputs' float32:
    the values equal those outside autocast and gradients are finite even for nearly flat images."""
    from avatarcli.losses import ms_ssim, ssim_loss

    g = torch.Generator().manual_seed(0)
    flat = 0.5 + 1e-3 * torch.rand(2, 3, 64, 64, generator=g)
    for generated, target in ((torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)),
                              (flat, flat + 1e-3 * torch.rand(2, 3, 64, 64, generator=g))):
        generated = generated.clone().requires_grad_(True)
        expected = ssim_loss(generated, target)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = ssim_loss(generated, target)
            multi = ms_ssim(generated, target)
        assert value.dtype == torch.float32 and multi.dtype == torch.float32
        torch.testing.assert_close(value, expected)
        value.backward()
        assert torch.isfinite(generated.grad).all()


def test_pixel_losses_gradcheck():
    a = smooth_images((2, 3, 24, 26), 8).requires_grad_(True)
    b = smooth_images((2, 3, 24, 26), 9)
    mask = torch.rand(2, 1, 24, 26, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda x: l1_loss(x, b, mask, reduction="none"), (a,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: l2_loss(x, b, mask, reduction="none"), (a,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: ssim_loss(x, b, reduction="none"), (a,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: ms_ssim_loss(x, 0.5 * (x.detach() + b), reduction="none"), (a,),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, y: ms_ssim_loss(x, y), (a, b.clone().requires_grad_(True)), fast_mode=True)


def test_bad_inputs_give_one_clear_error():
    a = smooth_images((1, 3, 16, 16), 0)
    with pytest.raises(AvatarError, match="differ in shape"):
        l1_loss(a, a[:, :, :8])
    with pytest.raises(AvatarError, match=r"\[B,C,H,W\]"):
        l2_loss(a[0], a[0])
    with pytest.raises(AvatarError, match="reduction"):
        l1_loss(a, a, reduction="avg")
    with pytest.raises(AvatarError, match="11×11"):
        ssim_loss(a[:, :, :8, :8], a[:, :, :8, :8])
    with pytest.raises(AvatarError, match="11×11"):
        ms_ssim_loss(a[:, :, :10], a[:, :, :10])
    with pytest.raises(AvatarError, match="mask"):
        l1_loss(a, a, torch.ones(1, 8, 8, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# identity loss with the real stand-in network


@pytest.fixture(scope="module")
def faces(assets):
    """Four different people at half size (~300×250, for speed): [4,3,H,W] float64 in [0,1] (zero-padded
    to one size), [4,5,2] keypoints in their pixels, and the [4,H,W,3] uint8 frames."""
    loaded, kps = [], []
    for name in FACES:
        image = cv2.cvtColor(cv2.imread(str(assets / DEEP3D / f"{name}.jpg")), cv2.COLOR_BGR2RGB)
        loaded.append(cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
        kps.append((np.loadtxt(assets / DEEP3D / "detections" / f"{name}.txt") + 0.5) * 0.5 - 0.5)  # pixel centres
    height, width = max(i.shape[0] for i in loaded), max(i.shape[1] for i in loaded)
    batch = np.zeros((len(loaded), height, width, 3), np.uint8)
    for i, image in enumerate(loaded):
        batch[i, : image.shape[0], : image.shape[1]] = image
    frames = torch.from_numpy(batch)
    return frames.permute(0, 3, 1, 2).double() / 255, torch.as_tensor(np.stack(kps)), frames


@pytest.fixture
def identity_loss(models_dir):
    return IdentityLoss(models_dir=models_dir, reduction="none")


def test_identity_loss_same_face_zero_different_faces_large(faces, identity_loss, device):
    loss_fn = identity_loss.to(device)
    photos, kps, _ = faces
    photos, kps = photos.to(device), kps.to(device)
    same = loss_fn(photos, photos, kps)
    assert same.shape == (4,) and same.dtype == torch.float64 and same.abs().max().item() < 1e-5
    # the same person under a photometric change and slight noise stays closer than any other person
    gen = torch.Generator().manual_seed(0)
    changed = (photos * 0.85 + 0.05 + 0.02 * torch.randn(photos.shape, generator=gen, dtype=torch.float64).to(device))
    same_changed = loss_fn(changed.clamp(0, 1), photos, kps)
    other = loss_fn(photos, photos.roll(1, 0), kps, kps.roll(1, 0))
    assert same_changed.max() < 0.5 * other.min(), (same_changed, other)
    assert other.min() > 0.5  # unrelated people: cosine near 0 for this network (MANIFEST: mean 0.02)


def test_identity_loss_matches_the_csim_metric_embeddings(faces, identity_loss, models_dir):
    from avatarcli.metrics.identity import FaceEmbedder, align_faces

    photos, kps, frames = faces
    metric = FaceEmbedder.from_registry("mobilefacenet_arcface", "cpu", models_dir)  # onnxruntime on the CPU
    expected = metric(align_faces(frames, kps))
    ours = identity_loss.cpu().embed(photos, kps)
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=0)


def test_identity_loss_gradient_reaches_the_input(faces, identity_loss):
    photos, kps, _ = faces
    generated = photos.roll(1, 0).clone().requires_grad_(True)
    loss = identity_loss(generated, photos, kps.roll(1, 0), kps).mean()
    loss.backward()
    grad = generated.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in identity_loss.parameters())  # frozen network
    # a step against the gradient lowers the loss
    with torch.no_grad():
        stepped = (generated - 20.0 * grad / grad.abs().max()).clamp(0, 1)
        assert identity_loss(stepped, photos, kps.roll(1, 0), kps).mean() < loss


def test_identity_loss_fixed_crop_of_aligned_faces(faces, identity_loss, models_dir):
    from avatarcli.metrics.identity import align_faces

    photos, kps, frames = faces
    aligned = align_faces(frames, kps, size=224) / 255  # faces on the ArcFace template at 224²
    whole = IdentityLoss(models_dir=models_dir, crop=(0.0, 1.0, 0.0, 1.0))
    cropped = whole.embed(aligned.double())
    keyed = identity_loss.embed(photos, kps)
    cosine = (cropped * keyed).sum(1)
    assert cosine.min() > 0.9, cosine  # same faces, resampled differently
    assert identity_loss(aligned, aligned).abs().max() < 1e-5  # default FFHQ-style crop path runs


def test_identity_loss_absent_model(tmp_path, monkeypatch):
    monkeypatch.delenv("AVATAR_MODELS", raising=False)
    with pytest.raises(AvatarError, match="identity loss: model 'arcface_r50'"):
        IdentityLoss("arcface_r50", models_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="identity loss disabled: model 'arcface_r50'"):
        loss = IdentityLoss("arcface_r50", models_dir=tmp_path, required=False)
    assert not loss.active and "w600k_r50.onnx" in loss.reason
    assert loss(smooth_images((2, 3, 16, 16), 0), smooth_images((2, 3, 16, 16), 1)).item() == 0.0
    with pytest.raises(AvatarError, match="not a face-recognition model"):
        IdentityLoss("pfld68")


# ------------------------------------------------------------------------------------------------
# perceptual loss


def test_perceptual_loss_without_weights_raises_or_disables_once(tmp_path, monkeypatch):
    monkeypatch.delenv("AVATAR_MODELS", raising=False)
    for net, missing in (("vgg", "vgg16_imagenet"), ("alex", "alexnet_imagenet")):
        with pytest.raises(AvatarError, match=rf"perceptual loss \(LPIPS {net}\): model '{missing}'"):
            PerceptualLoss(net, models_dir=tmp_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = PerceptualLoss(net, models_dir=tmp_path, required=False)
            a, b = smooth_images((2, 3, 32, 32), 0).requires_grad_(True), smooth_images((2, 3, 32, 32), 1)
            values = [loss(a, b), loss(a, b), PerceptualLoss(net, models_dir=tmp_path, required=False, reduction="none")]
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2 and all(m.startswith(f"perceptual loss (LPIPS {net}) disabled: model '{missing}'")
                                          for m in messages)  # one per instance, none per call
        assert values[0].item() == 0.0 and values[0].dtype == torch.float64
        assert not loss.active and missing in loss.reason and loss.lpips is None
        assert loss.describe() == {"active": False, "reason": loss.reason, "models": {}}
    with pytest.raises(AvatarError, match="unknown perceptual-loss network"):
        PerceptualLoss("resnet")


def _reference_lpips(net: str):
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()  # real linear heads, random backbone


def _models_dir_from_reference(reference, net: str, folder: Path) -> Path:
    """A models folder holding the reference's (random) backbone under the registry's file name and
    the lpips package's v0.1 linear heads (the registry pins their sha256)."""
    import lpips

    from avatarcli.registry import get_spec

    backbone_name, lin_name = ("vgg16_imagenet", "lpips_vgg_lin") if net == "vgg" else ("alexnet_imagenet", "lpips_alex_lin")
    (folder / "lpips").mkdir(parents=True, exist_ok=True)
    features = {}
    for key, value in reference.net.state_dict().items():
        _, index, param = key.split(".")  # slice<k>.<features index>.<param>
        features[f"features.{index}.{param}"] = value
    torch.save(features, folder / "lpips" / get_spec(backbone_name).filename)
    package_lin = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    shutil.copy(package_lin, folder / "lpips" / get_spec(lin_name).filename)
    return folder


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_perceptual_loss_matches_lpips_package(net, device, tmp_path):
    reference = _reference_lpips(net).to(device)
    models = _models_dir_from_reference(reference, net, tmp_path)
    loss = PerceptualLoss(net, models_dir=models, reduction="none").to(device)
    assert loss.active and loss.reason is None and set(loss.models) == {
        "vgg16_imagenet" if net == "vgg" else "alexnet_imagenet", f"lpips_{net}_lin"}
    a = smooth_images((3, 3, 64, 64), 10, torch.float32, device).requires_grad_(True)
    b = smooth_images((3, 3, 64, 64), 11, torch.float32, device)
    ours = loss(a, b)
    a_ref = a.detach().clone().requires_grad_(True)
    expected = reference(a_ref, b, normalize=True).view(-1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    ours.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(a.grad, a_ref.grad, atol=1e-6, rtol=1e-4)
    assert loss(b, b).abs().max() < 1e-6
    assert all(p.grad is None for p in loss.parameters())


def test_perceptual_loss_gradcheck():
    from avatarcli.metrics.lpips import LPIPS

    reference = _reference_lpips("alex")
    backbone = {f"features.{k.split('.')[1]}.{k.split('.')[2]}": v for k, v in reference.net.state_dict().items()}
    lin = {k: v for k, v in reference.state_dict().items() if k.startswith("lin")}
    loss = PerceptualLoss("alex", lpips=LPIPS(backbone, lin).double(), reduction="none")
    a, b = smooth_images((1, 3, 48, 48), 12).requires_grad_(True), smooth_images((1, 3, 48, 48), 13)
    assert torch.autograd.gradcheck(lambda x: loss(x, b), (a,), fast_mode=True)


def test_perceptual_loss_with_real_alexnet_weights_if_present(models_dir):
    """AlexNet-LPIPS with the real ImageNet weights, where a models folder has them (not the shared
    assets of this machine: then skipped)."""
    from avatarcli.registry import MODELS, find_local

    backbone = find_local(MODELS["alexnet_imagenet"], models_dir)
    if backbone is None or find_local(MODELS["lpips_alex_lin"], models_dir) is None:
        pytest.skip("AlexNet ImageNet / LPIPS weights not in the models folder")
    reference = _reference_lpips("alex")
    state = torch.load(backbone, map_location="cpu", weights_only=True)
    reference.net.load_state_dict({key: state["features.{}.{}".format(*key.split(".")[1:])]
                                   for key in reference.net.state_dict()})
    loss = PerceptualLoss("alex", models_dir=models_dir, reduction="none")
    a, b = smooth_images((2, 3, 64, 64), 14, torch.float32), smooth_images((2, 3, 64, 64), 15, torch.float32)
    torch.testing.assert_close(loss(a, b), reference(a, b, normalize=True).view(-1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# weighted sets


def test_loss_set_sums_weighted_terms_and_describes_them(models_dir, tmp_path, monkeypatch, faces):
    from avatarcli.registry import file_sha256, resolve

    monkeypatch.delenv("AVATAR_MODELS", raising=False)
    photos, kps, _ = faces
    photos, kps = photos[:2].float(), kps[:2]
    generated = photos.roll(1, 0).clone().requires_grad_(True)
    mask = torch.ones(2, 1, *photos.shape[2:], dtype=torch.bool)
    mask[..., :20, :] = False
    with pytest.warns(RuntimeWarning, match="perceptual loss \\(LPIPS vgg\\) disabled"):
        losses = LossSet({"l1": 1.0, "ms_ssim": 0.25, "identity": 0.1, "lpips_vgg": 0.8, "l2": 0.0},
                         models_dir=models_dir, required=False)
    total, terms = losses(generated, photos, mask=mask, keypoints=kps.roll(1, 0), target_keypoints=kps)
    assert set(terms) == {"l1", "ms_ssim", "identity"} and losses.active() == ["l1", "ms_ssim", "identity"]
    expected = (l1_loss(generated, photos, mask) + 0.25 * ms_ssim_loss(generated, photos)
                + 0.1 * IdentityLoss(models_dir=models_dir)(generated, photos, kps.roll(1, 0), kps))
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["l1"], l1_loss(generated, photos, mask).detach())
    assert not any(t.requires_grad for t in terms.values())
    total.backward()
    assert torch.isfinite(generated.grad).all() and generated.grad.abs().sum() > 0
    described = losses.describe()
    assert list(described) == ["identity", "l1", "lpips_vgg", "ms_ssim"]  # zero weight: left out
    assert described["identity"] == {"weight": 0.1, "active": True, "reason": None, "models": {
        "mobilefacenet_arcface": file_sha256(resolve("mobilefacenet_arcface", models_dir))}}
    assert described["lpips_vgg"]["active"] is False and "vgg16_imagenet" in described["lpips_vgg"]["reason"]
    assert described["l1"] == {"weight": 1.0, "active": True, "reason": None, "models": {}}
    losses.train()
    assert not losses.terms["identity"].training  # frozen networks stay in eval mode
    with pytest.raises(AvatarError, match="no loss in this set takes keypoint"):
        losses(generated, photos, keypoint=kps)
    with pytest.raises(AvatarError, match="unknown loss 'lpips'"):
        LossSet({"lpips": 1.0})
    with pytest.raises(AvatarError, match="perceptual loss"):
        LossSet({"lpips_alex": 1.0}, models_dir=tmp_path)  # required by default


def test_loss_set_takes_custom_terms():
    a, b = smooth_images((2, 3, 16, 16), 0), smooth_images((2, 3, 16, 16), 1)
    losses = LossSet({"l2": 2.0, "mean_shift": 0.5}, modules={"mean_shift": MeanShift()})
    total, terms = losses(a, b)
    torch.testing.assert_close(total, 2.0 * l2_loss(a, b) + 0.5 * (a.mean() - b.mean()).abs())
    assert losses.describe()["mean_shift"] == {"weight": 0.5, "active": True, "reason": None, "models": {}}


class MeanShift(torch.nn.Module):
    def forward(self, generated, target):
        return (generated.mean() - target.mean()).abs()
