import math

import pytest
import torch

from avatarcli import camera as cam

torch.manual_seed(0)
D = torch.float64


def _rx(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=D)


def _ry(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=D)


def _rz(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=D)


def _random_angles(n):
    g = torch.Generator().manual_seed(1)
    pitch = (torch.rand(n, generator=g, dtype=D) * 2 - 1) * 3.0
    yaw = (torch.rand(n, generator=g, dtype=D) * 2 - 1) * 1.5
    roll = (torch.rand(n, generator=g, dtype=D) * 2 - 1) * 3.0
    return torch.stack([pitch, yaw, roll], -1)


def _assert_rotation(R, atol=1e-10):
    eye = torch.eye(3, dtype=R.dtype).expand(R.shape)
    assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=atol)
    assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=atol)


def test_euler_matches_explicit_product_and_round_trips():
    angles = _random_angles(64)
    R = cam.euler_to_matrix(angles)
    for i in range(5):
        p, y, r = angles[i].tolist()
        assert torch.allclose(R[i], _rz(r) @ _ry(y) @ _rx(p), atol=1e-12)
    _assert_rotation(R)
    back = cam.matrix_to_euler(R)
    assert torch.allclose(back, angles, atol=1e-9)


def test_euler_signs_follow_the_documented_convention():
    nose = torch.tensor([0.0, 0.0, 1.0], dtype=D)
    down = cam.euler_to_matrix(torch.tensor([0.3, 0.0, 0.0], dtype=D)) @ nose
    assert down[1] < 0  # positive pitch: nose down
    left = cam.euler_to_matrix(torch.tensor([0.0, 0.3, 0.0], dtype=D)) @ nose
    assert left[0] > 0  # positive yaw: nose towards +x (image right)
    ear = cam.euler_to_matrix(torch.tensor([0.0, 0.0, 0.3], dtype=D)) @ torch.tensor([1.0, 0, 0], dtype=D)
    assert ear[1] > 0  # positive roll: +x side goes up


def test_6d_round_trip_and_gram_schmidt():
    R = cam.euler_to_matrix(_random_angles(32))
    assert torch.allclose(cam.rotation_6d_to_matrix(cam.matrix_to_rotation_6d(R)), R, atol=1e-12)
    noisy = torch.randn(32, 6, dtype=D)
    out = cam.rotation_6d_to_matrix(noisy)
    _assert_rotation(out)
    # the first row keeps the direction of the first 3-vector
    assert torch.allclose(out[:, 0], noisy[:, :3] / noisy[:, :3].norm(dim=-1, keepdim=True), atol=1e-12)


def test_axis_angle_round_trip_including_tiny_and_near_pi():
    g = torch.Generator().manual_seed(2)
    axes = torch.nn.functional.normalize(torch.randn(40, 3, generator=g, dtype=D), dim=-1)
    angles = torch.cat([torch.rand(30, generator=g, dtype=D) * 3.0, torch.tensor([0.0, 1e-12, 1e-7, 1e-4, 3.1, 3.14, 3.1415, 0.5, 1.0, 2.0], dtype=D)])
    aa = axes * angles[:, None]
    R = cam.axis_angle_to_matrix(aa)
    _assert_rotation(R)
    back = cam.matrix_to_axis_angle(R)
    assert torch.allclose(back, aa, atol=1e-7)
    assert torch.allclose(cam.axis_angle_to_matrix(back), R, atol=1e-10)
    # Rodrigues vs a known rotation: 90 degrees about +z maps x to y
    Rz = cam.axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=D))
    assert torch.allclose(Rz @ torch.tensor([1.0, 0, 0], dtype=D), torch.tensor([0.0, 1, 0], dtype=D), atol=1e-12)


def test_quaternion_round_trip():
    R = cam.euler_to_matrix(_random_angles(32))
    q = cam.matrix_to_quaternion(R)
    assert torch.allclose(q.norm(dim=-1), torch.ones(32, dtype=D))
    assert (q[:, 0] >= 0).all()
    assert torch.allclose(cam.quaternion_to_matrix(q), R, atol=1e-12)


def test_pose6_round_trip_and_frontal_pose():
    angles = _random_angles(16)
    t = torch.randn(16, 3, dtype=D) * 50 + torch.tensor([0, 0, 600.0], dtype=D)
    pose = torch.cat([angles, t], -1)
    R, t2 = cam.pose6_to_rt(pose)
    _assert_rotation(R)
    assert torch.allclose(cam.rt_to_pose6(R, t2), pose, atol=1e-9)
    R0, _ = cam.pose6_to_rt(torch.tensor([0, 0, 0, 0, 0, 500.0], dtype=D))
    assert torch.allclose(R0, torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=D)))
    # a frontal face: the nose (+z) is nearer the camera than the origin, the forehead (+y) is higher in the image
    pts = torch.tensor([[[0.0, 0, 0], [0, 0, 100], [0, 50, 0], [30, 0, 0]]], dtype=D)
    pc = cam.world_to_camera(pts, R0[None], torch.tensor([[0, 0, 500.0]], dtype=D))
    uv = cam.project(pc, cam.intrinsics_matrix(1000.0, 256.0, 256.0).to(D))
    assert pc[0, 1, 2] < pc[0, 0, 2]
    assert uv[0, 2, 1] < uv[0, 0, 1]
    assert uv[0, 3, 0] > uv[0, 0, 0]  # +x (subject's left) appears on the image's right


def test_world_camera_inverse():
    R = cam.euler_to_matrix(_random_angles(4))
    t = torch.randn(4, 3, dtype=D)
    p = torch.randn(4, 10, 3, dtype=D)
    assert torch.allclose(cam.camera_to_world(cam.world_to_camera(p, R, t), R, t), p, atol=1e-12)


def test_intrinsics_and_project_match_manual():
    K = cam.intrinsics_matrix(torch.tensor([800.0, 900.0], dtype=D), torch.tensor([320.0, 300.0], dtype=D), 240.0, fy=810.0)
    assert K.shape == (2, 3, 3) and K.dtype == D
    assert K[0].tolist() == [[800.0, 0.0, 320.0], [0.0, 810.0, 240.0], [0.0, 0.0, 1.0]]
    p = torch.randn(2, 7, 3, dtype=D) + torch.tensor([0, 0, 5.0], dtype=D)
    uv = cam.project(p, K)
    u = K[:, 0, 0, None] * p[..., 0] / p[..., 2] + K[:, 0, 2, None]
    v = K[:, 1, 1, None] * p[..., 1] / p[..., 2] + K[:, 1, 2, None]
    assert torch.allclose(uv, torch.stack([u, v], -1))
    assert cam.intrinsics_matrix(1000.0, 112.0, 112.0).shape == (1, 3, 3)


def _camera_batch(n=3):
    angles = _random_angles(n) * 0.3
    R, t = cam.pose6_to_rt(torch.cat([angles, torch.tensor([[5.0, -3.0, 600.0]], dtype=D).expand(n, 3)], -1))
    K = cam.intrinsics_matrix(torch.tensor([1100.0, 1200.0, 900.0], dtype=D)[:n], 256.0, 200.0, fy=torch.tensor([1105.0, 1190.0, 905.0], dtype=D)[:n])
    return R, t, K


def test_eg3d_round_trip_and_layout():
    R, t, K = _camera_batch()
    size = (400, 512)  # H, W
    c = cam.eg3d_camera(R, t, K, size)
    assert c.shape == (3, 25)
    c2w = c[:, :16].reshape(3, 4, 4)
    assert torch.allclose(c2w[:, 3], torch.tensor([0, 0, 0, 1.0], dtype=D).expand(3, 4))
    center = -(R.transpose(-1, -2) @ t[..., None])[..., 0]
    assert torch.allclose(c2w[:, :3, 3], center)
    assert torch.allclose(c[:, 16:], torch.stack([K[:, 0, 0] / 512, K[:, 0, 1] / 512, K[:, 0, 2] / 512,
                                                   torch.zeros(3, dtype=D), K[:, 1, 1] / 400, K[:, 1, 2] / 400,
                                                   torch.zeros(3, dtype=D), torch.zeros(3, dtype=D), torch.ones(3, dtype=D)], -1))
    R2, t2, K2 = cam.from_eg3d_camera(c, size)
    assert torch.allclose(R2, R) and torch.allclose(t2, t) and torch.allclose(K2, K)
    scaled = cam.eg3d_camera(R, t, K, size, translation_scale=2.7 / 600)
    assert torch.allclose(scaled[:, :16].reshape(3, 4, 4)[:, :3, 3].norm(dim=-1), center.norm(dim=-1) * 2.7 / 600)
    R3, t3, _ = cam.from_eg3d_camera(scaled, size, translation_scale=2.7 / 600)
    assert torch.allclose(R3, R) and torch.allclose(t3, t)


def test_eg3d_frontal_camera_is_opencv_looking_at_origin():
    R0, t0 = cam.pose6_to_rt(torch.tensor([[0, 0, 0, 0, 0, 2.7]], dtype=D))
    c = cam.eg3d_camera(R0, t0, cam.intrinsics_matrix(4.2647 * 512, 256.0, 256.0).to(D), 512)
    c2w = c[0, :16].reshape(4, 4)
    # EG3D's LookAtPoseSampler at yaw = pitch = 0: right = +x, down = -y, forward = -z, origin (0,0,2.7)
    assert torch.allclose(c2w[:3, :3], torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=D)))
    assert torch.allclose(c2w[:3, 3], torch.tensor([0, 0, 2.7], dtype=D))
    assert torch.allclose(c[0, 16:], torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1], dtype=D))


def test_clip_space_lands_on_the_projected_pixel():
    R, t, K = _camera_batch()
    K = K.clone()
    K[:, 0, 1] = 3.0  # skew too
    size = (400, 512)
    g = torch.Generator().manual_seed(3)
    world = (torch.rand(3, 50, 3, generator=g, dtype=D) * 2 - 1) * torch.tensor([80.0, 100.0, 60.0], dtype=D)
    pc = cam.world_to_camera(world, R, t)
    uv = cam.project(pc, K)
    clip = cam.clip_from_camera(pc, K, size, near=100.0, far=2000.0)
    assert clip.shape == (3, 50, 4)
    ndc = clip[..., :2] / clip[..., 3:]
    assert torch.allclose(cam.ndc_to_pixel(ndc, size), uv, atol=1e-9)
    assert torch.allclose(ndc, cam.pixel_to_ndc(uv, size), atol=1e-12)
    # through the 25-d camera
    R2, t2, K2 = cam.from_eg3d_camera(cam.eg3d_camera(R, t, K, size), size)
    clip2 = cam.clip_from_camera(cam.world_to_camera(world, R2, t2), K2, size, 100.0, 2000.0)
    assert torch.allclose(cam.ndc_to_pixel(clip2[..., :2] / clip2[..., 3:], size), uv, atol=1e-9)
    # depth: -1 at near, +1 at far, increasing
    z = torch.tensor([[[0, 0, 100.0], [0, 0, 500.0], [0, 0, 2000.0]]], dtype=D)
    dz = cam.clip_from_camera(z, K[0], size, 100.0, 2000.0)
    depth = dz[..., 2] / dz[..., 3]
    assert torch.allclose(depth[0, [0, 2]], torch.tensor([-1.0, 1.0], dtype=D))
    assert depth[0, 0] < depth[0, 1] < depth[0, 2]


def test_pixel_centres_and_image_edges_in_ndc():
    H, W = 4, 6
    i, j = 1, 2
    ndc = cam.pixel_to_ndc(torch.tensor([j + 0.5, i + 0.5], dtype=D), (H, W))
    assert torch.allclose(ndc, torch.tensor([2 * (j + 0.5) / W - 1, 2 * (i + 0.5) / H - 1], dtype=D))
    assert cam.pixel_to_ndc(torch.tensor([0.0, 0.0], dtype=D), (H, W)).tolist() == [-1.0, -1.0]  # top-left corner
    # the optical axis of a centred camera hits NDC (0, 0)
    K = cam.intrinsics_matrix(500.0, W / 2, H / 2).to(D)
    c = cam.clip_from_camera(torch.tensor([[[0, 0, 3.0]]], dtype=D), K, (H, W), 1.0, 10.0)
    assert torch.allclose(c[..., :2] / c[..., 3:], torch.zeros(1, 1, 2, dtype=D))
    # a point below the axis (camera y down) lands in a lower row: larger NDC y
    c = cam.clip_from_camera(torch.tensor([[[0, 0.01, 3.0]]], dtype=D), K, (H, W), 1.0, 10.0)
    assert (c[..., 1] / c[..., 3]).item() > 0


def test_deep3d_pose_matches_deep3dfacerecon_projection():
    # Deep3DFaceRecon: posed = x @ R_e^T + trans (dm); z_cam = 10 - z; u = f x/z + c, v_up = f y/z + c
    g = torch.Generator().manual_seed(4)
    angles = (torch.rand(2, 3, generator=g, dtype=D) - 0.5) * 0.6
    trans = (torch.rand(2, 3, generator=g, dtype=D) - 0.5) * 0.4
    x = (torch.rand(2, 20, 3, generator=g, dtype=D) - 0.5) * 1.5
    posed = x @ cam.euler_to_matrix(angles).transpose(-1, -2) + trans[:, None]
    zc = 10.0 - posed[..., 2]
    u = 1015.0 * posed[..., 0] / zc + 112.0
    v_up = 1015.0 * posed[..., 1] / zc + 112.0
    R, t = cam.deep3d_pose_to_rt(angles, trans)
    uv = cam.project(cam.world_to_camera(x * 100.0, R, t), cam.intrinsics_matrix(1015.0, 112.0, 112.0).to(D))
    assert torch.allclose(uv[..., 0], u, atol=1e-9)
    assert torch.allclose(uv[..., 1], 224.0 - v_up, atol=1e-9)
    assert torch.allclose(cam.rt_to_pose6(R, t)[:, :3], angles, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite(dtype):
    angles = (_random_angles(8) * 0.5).to(dtype).requires_grad_()
    aa = torch.cat([torch.zeros(1, 3), torch.randn(7, 3)]).to(dtype).requires_grad_()
    d6 = torch.randn(8, 6, dtype=dtype, requires_grad=True)
    pose = torch.cat([_random_angles(8) * 0.3, torch.tensor([[0, 0, 500.0]]).expand(8, 3).to(D)], -1).to(dtype).requires_grad_()
    focal = torch.tensor([1000.0], dtype=dtype, requires_grad=True)
    pts = (torch.randn(8, 5, 3, dtype=dtype) * 50).requires_grad_()
    R_pose, t = cam.pose6_to_rt(pose)
    K = cam.intrinsics_matrix(focal, 256.0, 256.0)
    pc = cam.world_to_camera(pts, R_pose @ cam.euler_to_matrix(angles) @ cam.axis_angle_to_matrix(aa) @ cam.rotation_6d_to_matrix(d6), t)
    loss = (
        cam.project(pc, K).sum()
        + cam.clip_from_camera(pc, K, 512, 10.0, 5000.0).sum()
        + cam.eg3d_camera(R_pose, t, K, 512).sum()
        + cam.matrix_to_euler(cam.euler_to_matrix(angles)).sum()
        + cam.matrix_to_axis_angle(cam.axis_angle_to_matrix(aa)).sum()
        + cam.rt_to_pose6(R_pose, t).sum()
    )
    loss.backward()
    for tensor in (angles, aa, d6, pose, focal, pts):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
