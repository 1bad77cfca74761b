"""The generator world of Export3D (avatarcli.camera): scale, conversion both ways, orbit cameras."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avatarcli import camera as cam
from avatarcli.errors import AvatarError

D = torch.float64
ICT = "3dmm/ict_facekit/ict_face_light_f16.npz"


def _random_cameras(n: int, distance: float = 1000.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    angles = (torch.rand(n, 3, generator=g, dtype=D) * 2 - 1) * 0.5
    R, _ = cam.pose6_to_rt(torch.cat([angles, torch.zeros(n, 3, dtype=D)], -1))
    t = torch.randn(n, 3, generator=g, dtype=D) * 10 + torch.tensor([0, 0, distance], dtype=D)
    K = cam.intrinsics_matrix(torch.full((n,), 1160.0, dtype=D), 128.0, 128.0)
    return cam.eg3d_camera(R, t, K, 256)


def test_round_trip_changes_only_the_camera_centre():
    c = _random_cameras(16)
    g = cam.to_generator_camera(c, 0.0025)
    assert torch.allclose(cam.from_generator_camera(g, 0.0025), c, atol=1e-12)
    changed = (g != c).any(0).nonzero().flatten().tolist()
    assert changed == [3, 7, 11]
    assert torch.allclose(g[:, [3, 7, 11]], c[:, [3, 7, 11]] * 0.0025)
    # same as building the camera with eg3d_camera's translation_scale
    R, t, K = cam.from_eg3d_camera(c, 256)
    assert torch.allclose(cam.eg3d_camera(R, t, K, 256, translation_scale=0.0025), g, atol=1e-12)
    # leading dimensions and the input left alone
    assert cam.to_generator_camera(c.reshape(4, 4, 25), 2.0).shape == (4, 4, 25)
    assert torch.equal(c, _random_cameras(16))


def test_world_scale_is_the_median_distance_and_rejects_bad_cameras():
    c = _random_cameras(5, 800.0)
    distance = c[:, [3, 7, 11]].norm(dim=-1)
    assert math.isclose(cam.generator_world_scale(c), 2.7 / float(distance.median()), rel_tol=1e-12)
    even = c[:4]
    middle = distance[:4].sort().values[1:3].mean()
    assert math.isclose(cam.generator_world_scale(even), 2.7 / float(middle), rel_tol=1e-12)
    with pytest.raises(AvatarError, match="no cameras"):
        cam.generator_world_scale(c[:0])
    with pytest.raises(AvatarError, match="median camera distance"):
        cam.generator_world_scale(torch.full((3, 25), float("nan"), dtype=D))


@pytest.fixture(scope="module")
def ict(assets):
    from avatarcli.facemodel import load_face_model

    return load_face_model(assets / ICT).to("cpu", torch.float64)


def test_typical_camera_at_radius_2_7_and_face_inside_the_box(ict):
    """Cameras as `avatar synth` draws them (the distance of a fit-3dmm fit): after scaling, the
    median camera is at 2.7 and every ICT landmark of random identities and expressions is in ±0.5."""
    from avatarcli.synthetic import ModelArrays
    from avatarcli.synthetic.sampling import sample_clip
    from stages.synth import SynthConfig

    config = SynthConfig(clips=4, frames=30, size=256, face_model="ict", device="cpu")
    arrays = ModelArrays.from_model(ict.to("cpu", torch.float32))
    truths = [sample_clip(config, arrays, k) for k in range(4)]
    cameras, landmarks = [], []
    for truth in truths:
        pose6 = torch.from_numpy(truth.pose6).double()
        R, t = cam.pose6_to_rt(pose6)
        cameras.append(cam.eg3d_camera(R, t, torch.from_numpy(truth.intrinsics).double(), 256))
        identity = torch.from_numpy(truth.identity).double()[None].expand(len(pose6), -1)
        landmarks.append(ict.landmarks(ict.vertices(identity, torch.from_numpy(truth.expression).double())))
    cameras = torch.cat(cameras)
    scale = cam.generator_world_scale(cameras)
    generator = cam.to_generator_camera(cameras, scale)
    radius = generator[:, [3, 7, 11]].norm(dim=-1)
    assert math.isclose(float(radius.median()), 2.7, rel_tol=1e-3)
    assert float(radius.min()) > 2.3 and float(radius.max()) < 3.1
    points = torch.cat(landmarks) * scale
    assert float(points.abs().max()) < 0.5
    assert float(points.abs().max()) > 0.1  # the face fills a good part of the box, not a speck
    # the mean face's whole mesh fits too
    assert float((ict.vertices() * scale).abs().max()) < 0.5


def _intrinsics9() -> torch.Tensor:
    return torch.tensor([4.5, 0, 0.5, 0, 4.5, 0.5, 0, 0, 1], dtype=D)


def test_frontal_orbit_camera_is_the_frontal_eg3d_camera():
    K = cam.intrinsics_matrix(torch.tensor([1152.0], dtype=D), 128.0, 128.0)
    distance = 1000.0
    frontal = cam.eg3d_camera(cam.CV_FROM_GL.to(D)[None], torch.tensor([[0, 0, distance]], dtype=D), K, 256,
                              translation_scale=2.7 / distance)[0]
    assert torch.allclose(cam.orbit_camera(0.0, 0.0, 2.7, _intrinsics9()), frontal, atol=1e-12)


def test_orbit_camera_looks_at_the_target_and_follows_the_euler_convention():
    target = (0.01, -0.02, 0.03)
    for yaw, pitch in [(0.4, 0.0), (-0.7, 0.2), (0.3, -0.5), (1.2, 0.4)]:
        c = cam.orbit_camera(yaw, pitch, 2.0, _intrinsics9(), target)
        assert c.dtype == D and c.shape == (25,)
        R, t, K = cam.from_eg3d_camera(c[None], 256)
        centre = c[[3, 7, 11]]
        assert math.isclose(float((centre - torch.tensor(target, dtype=D)).norm()), 2.0, rel_tol=1e-12)
        # the target projects to the principal point, and the camera has no roll (x axis horizontal)
        uv = cam.project(cam.world_to_camera(torch.tensor([[target]], dtype=D), R, t), K)
        assert torch.allclose(uv, torch.tensor([[[128.0, 128.0]]], dtype=D), atol=1e-9)
        assert abs(float(R[0, 0, 1])) < 1e-12
        # same view as the frontal camera looking at a head turned by (-pitch, -yaw)
        head = cam.euler_to_matrix(torch.tensor([pitch, yaw, 0.0], dtype=D)).T
        assert torch.allclose(R[0], cam.CV_FROM_GL.to(D) @ head, atol=1e-12)
    right = cam.orbit_camera(0.3, 0.0, 2.7, _intrinsics9())
    assert right[3] > 0 and abs(float(right[7])) < 1e-12  # positive yaw: camera towards +x
    below = cam.orbit_camera(0.0, 0.3, 2.7, _intrinsics9())
    assert below[7] < 0  # positive pitch: camera below the face
    # seen from +x, the nose tip (on +z) appears left of the model origin in the image
    R, t, K = cam.from_eg3d_camera(right[None], 256)
    uv = cam.project(cam.world_to_camera(torch.tensor([[[0, 0, 0.0], [0, 0, 0.1]]], dtype=D), R, t), K)[0]
    assert uv[1, 0] < uv[0, 0]


def test_orbit_camera_keeps_float32_and_numpy_free():
    c = cam.orbit_camera(0.1, 0.2, 2.7, _intrinsics9().float())
    assert c.dtype == torch.float32 and np.isfinite(c.numpy()).all()
