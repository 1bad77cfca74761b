"""Eyeballs of the ICT mesh (placement in the sockets, rigid with the head, gaze), the labelled
preview grid, and the contour-holdout option (``w_contour = 0``) of the fit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from avatarcli.fit.config import FitConfig
from tests.fit.test_fit_solver import ICT, moved_fit, synthetic_clip


@pytest.fixture(scope="module")
def ict(assets):
    from avatarcli.facemodel import load_face_model

    return load_face_model(str(assets / ICT))


@pytest.fixture(scope="module")
def rig(ict):
    from avatarcli.facemodel.eyes import eye_rig

    return eye_rig(ict)


def test_eyeballs_sit_in_the_sockets(ict, rig):
    """Centres between each eye's lid landmarks, a human eyeball's radius, the front just behind the
    lids, and no face vertex inside a sphere (nothing pokes through the cheeks or brows)."""
    rest = ict.vertices(torch.randn(2, ict.num_id, generator=torch.Generator().manual_seed(0)) * 0.5)  # two identities
    centres, radii = rig.placement(rest)
    assert ((radii > 10.0) & (radii < 15.0)).all(), radii
    for eye, ids in enumerate((range(36, 42), range(42, 48))):
        lids = rest[:, ict.lmk68[list(ids)]]  # [B,6,3]
        low, high = lids.amin(1), lids.amax(1)
        assert ((centres[:, eye, :2] > low[:, :2]) & (centres[:, eye, :2] < high[:, :2])).all()
        front = centres[:, eye, 2] + radii[:, eye]
        behind = lids[..., 2].mean(1) - front  # mm the sphere's front lies behind the lids' mean depth
        assert ((behind > -1.0) & (behind < 6.0)).all(), behind
    face = rest[:, ict.face_region]
    inside = (face[:, :, None] - centres[:, None]).norm(dim=-1) < radii[:, None] - 1.0
    assert not inside.any(), int(inside.sum())
    assert rig.sphere_faces.max() < len(rig.sphere) and len(rig.colour) == len(rig.sphere)


def _render(ict, rig, pose, exp=None, eyes=True, size=64):
    """Renders [B] of the mean face at ``pose`` [B,6] (translation x, y replaced: nose on the image
    centre, as preprocess crops), with or without eyes; and the R [B,3,3], t [B,3] used."""
    from avatarcli.camera import intrinsics_matrix, pose6_to_rt
    from avatarcli.render.mesh import render_mesh

    b = len(pose)
    pose = pose.clone()
    R, _ = pose6_to_rt(pose)
    pose[:, 3:5] = -(R @ ict.mean[ict.lmk68[30]])[:, :2]
    exp = torch.zeros(b, ict.num_exp) if exp is None else exp
    verts, faces, albedo = ict.vertices(None, exp).expand(b, -1, -1), ict.faces, ict.albedo(None, b)
    if eyes:
        verts, faces, albedo = rig.attach(verts, faces, albedo, ict.mean[None].expand(b, -1, -1), exp)
    R, t = pose6_to_rt(pose)
    light = torch.zeros(b, 9, 3)
    return render_mesh(verts, faces, R, t, intrinsics_matrix(1160.0 * size / 256, size / 2, size / 2)[0],
                       size, albedo, light), R, t


def test_eyes_fill_the_holes_and_move_with_the_head(ict, rig):
    """At several head poses the pixel of each lid-landmark centre is a hole of the bare mesh and
    the dark iris/pupil of the eyeball with eyes attached."""
    from avatarcli.camera import intrinsics_matrix, project, world_to_camera

    pose = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 700.0], [0.15, 0.3, 0.1, 0.0, 0.0, 650.0],
                         [-0.1, -0.3, -0.05, 0.0, 0.0, 750.0]])
    bare, R, t = _render(ict, rig, pose, eyes=False)
    with_eyes, _, _ = _render(ict, rig, pose)
    K = intrinsics_matrix(1160.0 * 64 / 256, 32, 32)[0]
    lids = ict.mean[ict.lmk68[36:48]].reshape(2, 6, 3).mean(1)  # [2,3] the two lid centres
    uv = project(world_to_camera(lids[None].expand(3, -1, -1), R, t), K).round().long()
    for b in range(3):
        for u, v in uv[b].tolist():
            assert not bare.mask[b, v, u]  # an eye hole in the face mesh
            assert with_eyes.mask[b, v, u]
            assert with_eyes.rgb[b, v, u].mean() < 0.3  # iris or pupil, not sclera or skin


def test_gaze_turns_the_eyes(ict, rig):
    """eyeLookOut_L turns the left eye (+x) towards +x; eyeLookUp_R turns the right eye up; the
    other eye does not move."""
    exp = torch.zeros(3, ict.num_exp)
    exp[1, ict.exp_index("eyeLookOut_L")] = 1.0
    exp[2, ict.exp_index("eyeLookUp_R")] = 1.0
    balls = rig.eyeballs(ict.mean[None].expand(3, -1, -1), exp).reshape(3, 2, -1, 3)
    pupil = balls[:, :, 0]  # the sphere's pole: the gaze direction's front point
    assert pupil[1, 1, 0] - pupil[0, 1, 0] > 3.0 and torch.allclose(pupil[1, 0], pupil[0, 0])
    assert pupil[2, 0, 1] - pupil[0, 0, 1] > 2.0 and torch.allclose(pupil[2, 1], pupil[0, 1])


def test_no_eyes_without_open_sockets():
    """A closed mesh (a tetrahedron) has no socket rims: no rig."""
    from avatarcli.facemodel.eyes import boundary_vertices

    closed = torch.tensor([[0, 1, 2], [0, 3, 1], [1, 3, 2], [2, 3, 0]])
    assert len(boundary_vertices(closed)) == 0
    assert boundary_vertices(closed[:3]).tolist() == [0, 2, 3]  # the open triangle (0, 2, 3)


def test_preview_has_column_labels_and_legend(ict, tmp_path):
    """The grid has a header band above the tiles, with text over every column and both landmark
    colours in its legend; the tiles show the eyes."""
    from PIL import Image

    from avatarcli.fit import BatchFit
    from avatarcli.fit.preview import COLUMNS, DETECTED, FITTED, HEADER_PX, write_preview

    size = 96
    clip, _ = synthetic_clip(ict, frames=2, size=size)
    fit = BatchFit(ict, [clip], size, FitConfig(landmarks_only=True), torch.device("cpu"))
    path = tmp_path / "p.png"
    write_preview(path, fit, 0, rows=2)
    grid = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert grid.shape == (HEADER_PX + 2 * size, len(COLUMNS) * size, 3)
    names = grid[:14]
    for col in range(len(COLUMNS)):
        text = names[:, col * size:(col + 1) * size]
        assert (text.min(-1) > 200).sum() > 10, col  # white glyphs on the dark band
    legend = grid[14:HEADER_PX].reshape(-1, 3)
    for colour in (DETECTED, FITTED):
        assert (np.abs(legend - np.array(colour)).sum(1) < 30).sum() >= 9, colour


def test_contour_holdout_ignores_the_jaw(ict):
    """With ``w_contour = 0`` the jaw targets drop out of the landmark objective and its Gauss-Newton
    weights (moving them changes neither), and the noise estimate uses the inner 51 points; with the
    default weight they count."""
    clip, _ = synthetic_clip(ict, frames=3, size=96, render=False)
    moved = clip.lmk68.copy()
    moved[:, :17] += np.array([6.0, -4.0], np.float32)
    moved_clip = replace(clip, lmk68=moved)

    def terms(c, **settings):
        fit = moved_fit(ict, [c], **settings)
        with torch.no_grad():
            objective = fit.landmark_objective(shape=True)
            weights, _, _ = fit.landmark_jacobians(shape=True)
            fit.update_landmark_noise()
        return objective, weights, fit.landmark_precision.clone()

    held, held_moved = terms(clip, w_contour=0.0), terms(moved_clip, w_contour=0.0)
    torch.testing.assert_close(held, held_moved)
    assert (held[1].reshape(3, 68, 2)[:, :17] == 0).all() and (held[1].reshape(3, 68, 2)[:, 17:] > 0).all()
    default, default_moved = terms(clip), terms(moved_clip)
    assert (default_moved[0] - default[0]).abs() > 1e-3 * default[0]
    assert not torch.allclose(default_moved[2], default[2], rtol=1e-3)
    assert (default[1].reshape(3, 68, 2)[:, :17] > 0).all()
    assert FitConfig().w_contour == 0.3
