"""Tri-plane volume rendering against analytic references (avatarcli.export3d.volume)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avatarcli import camera as cam
from avatarcli.errors import AvatarError
from avatarcli.export3d import volume as vol

D = torch.float64
FOCAL = 4.2647  # EG3D's normalised focal length (fx / W)


def _frontal_camera(radius=2.7, focal=FOCAL, dtype=D):
    """Generator-world camera on +z looking at the origin (OpenCV axes: R = diag(1, -1, -1))."""
    R = cam.CV_FROM_GL.to(dtype)[None]
    t = torch.tensor([[0.0, 0.0, radius]], dtype=dtype)
    K = torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]], dtype=dtype)
    return cam.eg3d_camera(R, t, K, image_size=1)  # K already normalised


def _oblique_camera(radius=2.7, focal=1.2, yaw=0.4, pitch=0.25, dtype=D):
    R = cam.CV_FROM_GL.to(dtype) @ cam.euler_to_matrix(torch.tensor([pitch, yaw, 0.0], dtype=dtype))
    t = torch.tensor([0.0, 0.0, radius], dtype=dtype)
    K = torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]], dtype=dtype)
    return cam.eg3d_camera(R[None], t[None], K, image_size=1)


def test_camera_rays_frontal():
    res = 8
    origins, dirs = vol.camera_rays(_frontal_camera(), res)
    assert origins.shape == dirs.shape == (1, res * res, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(1, res * res, dtype=D))
    torch.testing.assert_close(origins[0, 0], torch.tensor([0.0, 0.0, 2.7], dtype=D))
    # Odd resolution: the centre pixel's ray points at the origin.
    _, d3 = vol.camera_rays(_frontal_camera(), 3)
    torch.testing.assert_close(d3[0, 4], torch.tensor([0.0, 0.0, -1.0], dtype=D))
    # Corner pixel (row 0, col 0): centre at (0.5/res, 0.5/res); angle from the axis is analytic.
    offset = (0.5 / res - 0.5) / FOCAL
    expected_angle = math.atan(math.sqrt(2.0) * abs(offset))
    corner = dirs[0, 0]
    angle = torch.acos(-corner[2])
    assert abs(angle.item() - expected_angle) < 1e-12
    # Top-left pixel looks up (+y world, image rows go down) and to world -x (image left).
    assert corner[0] < 0 and corner[1] > 0
    # Row-major: pixel (0, res-1) is top-right -> +x.
    assert dirs[0, res - 1, 0] > 0 and dirs[0, res - 1, 1] > 0
    # Resolution independence: on the z = 0 image plane, each 2x2 block of a 16 image's ray hits
    # averages to the 8 image's ray hit (pixel centres are linear in the normalised coordinates).
    _, d16 = vol.camera_rays(_frontal_camera(), 16)
    hits16 = (d16 / -d16[..., 2:]).reshape(8, 2, 8, 2, 3).mean(dim=(1, 3))
    torch.testing.assert_close(hits16, (dirs / -dirs[..., 2:]).reshape(8, 8, 3))


def test_camera_rays_bad_input():
    with pytest.raises(AvatarError):
        vol.camera_rays(torch.zeros(2, 16), 4)


def test_ray_box_intersect_axis_aligned_and_misses():
    origins = torch.tensor(
        [[0.0, 0.0, 2.0], [0.2, -0.1, -3.0], [0.0, 0.0, 0.0], [0.7, 0.0, 2.0], [0.0, 0.0, 2.0], [2.0, 0.3, 0.1]],
        dtype=D,
    )
    dirs = torch.tensor(
        [[0.0, 0.0, -1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]],
        dtype=D,
    )
    near, far, hit = vol.ray_box_intersect(origins[None], dirs[None], half_extent=0.5)
    assert near.shape == far.shape == hit.shape == (1, 6, 1)
    assert hit[0, :, 0].tolist() == [True, True, True, False, False, True]
    torch.testing.assert_close(near[0, :, 0], torch.tensor([1.5, 2.5, 0.0, 0.0, 0.0, 1.5], dtype=D))
    torch.testing.assert_close(far[0, :, 0], torch.tensor([2.5, 3.5, 0.5, 0.0, 0.0, 2.5], dtype=D))
    # A diagonal ray through the corner region: entry/exit on the x = +-h faces.
    o = torch.tensor([[[2.0, 0.0, 0.0]]], dtype=D)
    d = F.normalize(torch.tensor([[[-1.0, 0.2, 0.0]]], dtype=D), dim=-1)
    near, far, hit = vol.ray_box_intersect(o, d, 0.5)
    scale = math.sqrt(1.04)
    assert hit.item() and abs(near.item() - 1.5 * scale) < 1e-12 and abs(far.item() - 2.5 * scale) < 1e-12


def _softplus_inverse(x):
    return math.log(math.expm1(x))


def test_composite_constant_slab_and_thin_sheet():
    near = torch.tensor([[[0.5], [1.0]]], dtype=D)
    far = torch.tensor([[[1.3], [2.5]]], dtype=D)
    samples, density = 64, 1.7
    depths = vol.stratified_depths(near, far, samples, perturb=False)
    assert depths.shape == (1, 2, samples, 1)
    sigma = 1.0 + _softplus_inverse(density)  # softplus(sigma - 1) = density
    sigmas = torch.full_like(depths, sigma)
    c = torch.tensor([0.2, 0.5, 0.9, 0.3], dtype=D)
    colors = c.expand(1, 2, samples, 4)
    color, depth, weights = vol.composite(colors, sigmas, depths)
    length = (far - near)[..., 0]  # [1, 2]
    alpha = 1.0 - torch.exp(-density * length)
    torch.testing.assert_close(weights.sum(dim=2)[..., 0], alpha)
    torch.testing.assert_close(color, c * alpha[..., None])
    # Expected depth of a homogeneous slab: near + 1/density - L e^{-density L} / alpha (quadrature error O(delta^2)).
    expected = near[..., 0] + 1.0 / density - length * torch.exp(-density * length) / alpha
    torch.testing.assert_close(depth[..., 0], expected, atol=1e-3, rtol=0)
    # Perturbed depths with explicit near/far still tile [near, far].
    jittered = vol.stratified_depths(near, far, samples, perturb=True)
    assert (jittered[..., 1:, 0] > jittered[..., :-1, 0]).all()
    assert ((jittered >= near[..., None, :]) & (jittered <= far[..., None, :])).all()
    _, _, w = vol.composite(colors, sigmas, jittered, near, far)
    torch.testing.assert_close(w.sum(dim=2)[..., 0], alpha)
    # A thin dense sheet at sample 37: depth = its position, alpha ~ 1.
    sheet = torch.full_like(depths, -40.0)
    sheet[:, :, 37] = 1.0 + 2000.0
    _, depth, weights = vol.composite(colors, sheet, depths)
    torch.testing.assert_close(depth, depths[:, :, 37], atol=1e-9, rtol=0)
    assert (weights.sum(dim=2) > 0.999).all()


def _coordinate_planes(p, extra_channels=0):
    """Planes whose channels are (x, y, z, 1, 0...) at texel centres: xy holds (x, y), xz (x, z), zy (z, y)."""
    centres = (torch.arange(p, dtype=D) + 0.5) / p * 2 - 1  # normalised texel centres
    centres = centres * 0.5  # world units for half_extent 0.5
    v, u = torch.meshgrid(centres, centres, indexing="ij")  # height = second axis, width = first
    planes = torch.zeros(1, 3, 4 + extra_channels, p, p, dtype=D)
    planes[0, 0, 0], planes[0, 0, 1] = u, v  # xy: width x, height y
    planes[0, 1, 0], planes[0, 1, 2] = u, v  # xz: width x, height z
    planes[0, 2, 2], planes[0, 2, 1] = u, v  # zy: width z, height y
    planes[0, :, 3] = 1.0
    return planes


def test_sample_triplane_linear_planes():
    p = 16
    planes = _coordinate_planes(p)
    planes[0, 0, 3] = 3.0  # channel 3: plane-specific constants 3, 1, 2 -> mean 2
    planes[0, 2, 3] = 2.0
    g = torch.Generator().manual_seed(0)
    inner = 0.5 * (1 - 1.0 / p)  # bilinear is exact between the outermost texel centres
    points = (torch.rand(1, 200, 3, generator=g, dtype=D) * 2 - 1) * inner
    features = vol.sample_triplane(planes, points)
    assert features.shape == (1, 200, 4)
    torch.testing.assert_close(features[..., :3], points * 2.0 / 3.0)
    torch.testing.assert_close(features[..., 3], torch.full((1, 200), 2.0, dtype=D))
    outside = torch.tensor([[[0.6, 0.0, 0.0], [0.0, 0.0, -0.51], [0.1, 0.7, 0.2]]], dtype=D)
    assert (vol.sample_triplane(planes, outside) == 0).all()
    with pytest.raises(AvatarError):
        vol.sample_triplane(planes[:, :2], points)


def test_importance_depths_concentrate_on_weights():
    near = torch.zeros(1, 1, 1, dtype=D)
    far = torch.ones(1, 1, 1, dtype=D)
    depths = vol.stratified_depths(near, far, 32, perturb=False)
    weights = torch.zeros_like(depths)
    weights[:, :, 10:13] = 1.0  # bins [10/32, 13/32)
    for perturb in (False, True):
        fine = vol.importance_depths(depths, weights, 64, perturb, near, far)
        assert fine.shape == (1, 1, 64, 1)
        assert (fine[..., 1:, 0] >= fine[..., :-1, 0]).all()
        assert ((fine >= 0) & (fine <= 1)).all()
        inside = ((fine > 9 / 32) & (fine < 14 / 32)).double().mean().item()
        assert inside > 0.8, inside
    # Uniform weights give (roughly) uniform samples.
    fine = vol.importance_depths(depths, torch.ones_like(depths), 64, False, near, far)
    torch.testing.assert_close(fine[0, 0, :, 0], (torch.arange(64, dtype=D) + 0.5) / 64, atol=1e-9, rtol=0)


class _SphereDecoder(nn.Module):
    """Reads coordinates from coordinate planes: density `density` inside a sphere, ~0 outside; colour = position."""

    def __init__(self, radius, density):
        super().__init__()
        self.radius, self.inside = radius, 1.0 + _softplus_inverse(density)

    def forward(self, features):
        position = features[..., :3] * 1.5
        # Channel 3 is exactly 1 only away from the box border (zero padding blends it there).
        inside = (position.norm(dim=-1, keepdim=True) < self.radius) & (features[..., 3:4] > 0.999)
        outside = torch.full_like(position[..., :1], -60.0)
        sigma = torch.where(inside, torch.full_like(outside, self.inside), outside)
        return torch.sigmoid(position * 4), sigma


def test_render_triplane_sphere_matches_analytic_alpha():
    radius, density, res = 0.35, 6.0, 24
    planes = _coordinate_planes(32)
    cameras = _frontal_camera(focal=2.0)
    out = vol.render_triplane(planes, _SphereDecoder(radius, density), cameras, res, coarse=48, fine=48)
    assert out["features"].shape == (1, 3, res, res) and out["rgb"].shape == (1, 3, res, res)
    assert out["depth"].shape == out["alpha"].shape == (1, 1, res, res)
    origins, dirs = vol.camera_rays(cameras, res)
    along = (origins * dirs).sum(-1, keepdim=True)
    impact = (origins - along * dirs).norm(dim=-1)  # closest approach to the centre
    chord = 2 * (radius**2 - impact**2).clamp(min=0).sqrt()
    alpha = (1 - torch.exp(-density * chord)).reshape(1, 1, res, res)
    error = (out["alpha"] - alpha).abs()
    assert error.mean() < 0.003, error.mean()
    assert error.max() < 0.05, error.max()
    # Silhouette: pixels whose ray passes clearly inside / outside the sphere.
    impact = impact.reshape(1, 1, res, res)
    assert (out["alpha"][impact < radius - 0.03] > 0.5).all()
    assert (out["alpha"][impact > radius + 0.01] < 1e-6).all()
    # Depth of the centre-most pixels: the expected depth of a homogeneous chord behind the sphere's front.
    centre = impact < 0.05
    entry = along.reshape(1, 1, res, res).neg() - (chord / 2).reshape(1, 1, res, res)
    length = chord.reshape(1, 1, res, res)
    expected = entry + 1.0 / density - length * torch.exp(-density * length) / alpha
    torch.testing.assert_close(out["depth"][centre], expected[centre], atol=2e-3, rtol=0)
    # Colour is the decoder's colour at the hit point: red channel sigmoid(4 x) follows the image's x.
    assert out["rgb"][0, 0, res // 2, res // 2 + 4] > out["rgb"][0, 0, res // 2, res // 2 - 4]


def test_render_triplane_misses_are_background():
    planes = torch.randn(1, 3, 4, 8, 8, dtype=D)
    decoder = vol.TriplaneDecoder(4, 8, 5).double()
    out = vol.render_triplane(planes, decoder, _frontal_camera(focal=0.3), 16, coarse=6, fine=4)
    _, _, hit = vol.ray_box_intersect(*vol.camera_rays(_frontal_camera(focal=0.3), 16))
    miss = ~hit.reshape(1, 1, 16, 16)
    assert miss.any() and (~miss).any()
    assert (out["features"] * miss == 0).all() and (out["alpha"][miss] == 0).all()
    torch.testing.assert_close(out["depth"][miss], torch.full_like(out["depth"][miss], 2.7 + math.sqrt(3) * 0.5))
    assert (out["alpha"][~miss] > 0).all() and (out["alpha"] <= 1).all()
    torch.testing.assert_close(out["rgb"], out["features"][:, :3])


def test_gradcheck_composite_and_sample_triplane():
    g = torch.Generator().manual_seed(3)
    colors = torch.rand(1, 2, 5, 3, generator=g, dtype=D, requires_grad=True)
    sigmas = torch.randn(1, 2, 5, 1, generator=g, dtype=D, requires_grad=True)
    depths = (torch.rand(1, 2, 5, 1, generator=g, dtype=D) + 0.2).cumsum(dim=2).requires_grad_(True)
    near = torch.full((1, 2, 1), 0.1, dtype=D)
    far = torch.full((1, 2, 1), 6.0, dtype=D)

    def fn(c, s, d):
        color, depth, weights = vol.composite(c, s, d, near, far)
        return color, depth, weights

    assert torch.autograd.gradcheck(fn, (colors, sigmas, depths))
    planes = torch.randn(2, 3, 2, 4, 4, generator=g, dtype=D, requires_grad=True)
    points = ((torch.rand(2, 5, 3, generator=g, dtype=D) * 2 - 1) * 0.45).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, x: vol.sample_triplane(p, x), (planes, points))


def test_gradcheck_render_triplane_wrt_planes():
    torch.manual_seed(0)
    decoder = vol.TriplaneDecoder(2, 4, 3).double()
    planes = torch.randn(1, 3, 2, 4, 4, dtype=D, requires_grad=True)
    cameras = _oblique_camera(focal=1.5)

    def render(p):
        out = vol.render_triplane(p, decoder, cameras, 3, coarse=4, fine=0)
        return out["features"], out["alpha"], out["depth"]

    # fine = 0: the importance depths depend on the (detached) coarse weights, which finite differences
    # would see but the analytic gradient deliberately does not.
    assert torch.autograd.gradcheck(render, (planes,))
    out = vol.render_triplane(planes, decoder, cameras, 3, coarse=4, fine=3)
    (out["features"].sum() + out["depth"].sum()).backward()
    assert torch.isfinite(planes.grad).all() and planes.grad.abs().sum() > 0


def test_super_resolution_shapes_and_gradients():
    torch.manual_seed(0)
    sr = vol.SuperResolution(channels=8, in_resolution=8, out_resolution=32, width=16)
    assert len(sr.blocks) == 2
    rgb = torch.rand(2, 3, 8, 8, requires_grad=True)
    features = torch.randn(2, 8, 8, 8, requires_grad=True)
    image = sr(rgb, features)
    assert image.shape == (2, 3, 32, 32)
    image.square().mean().backward()
    assert rgb.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
    same = vol.SuperResolution(channels=8, in_resolution=8, out_resolution=8, width=16)
    assert same(rgb, features).shape == (2, 3, 8, 8)
    for bad in (24, 4):
        with pytest.raises(AvatarError):
            vol.SuperResolution(channels=8, in_resolution=8, out_resolution=bad)
    with pytest.raises(AvatarError):
        sr(rgb, features[:, :4])


def test_triplane_decoder_ranges():
    decoder = vol.TriplaneDecoder(6, 16, 5)
    colors, sigma = decoder(torch.randn(2, 7, 6) * 10)
    assert colors.shape == (2, 7, 5) and sigma.shape == (2, 7, 1)
    assert (colors >= -1e-3).all() and (colors <= 1 + 1e-3).all()
