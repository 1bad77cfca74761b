"""avatar fit-3dmm (the stage): settings, real clips after preprocess, skips, resume, pipes. The solver's
own tests are in test_fit_solver.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ICT = "3dmm/ict_facekit/ict_face_light_f16.npz"


def test_config_hashes_every_solver_setting():
    """The stage config extends the solver's: every solver setting that changes the result (all but
    cuda_graphs) and the stage's own result settings are hashed; device, output and preview
    handling are not."""
    from dataclasses import fields

    from avatarcli.fit import FitConfig
    from stages.fit3dmm import Fit3dmmConfig

    hashed = set(Fit3dmmConfig().result_fields())
    solver = {f.name for f in fields(FitConfig)}
    assert solver - {"cuda_graphs"} <= hashed and "cuda_graphs" not in hashed
    assert {"face_model", "flag_px", "batch_frames"} <= hashed
    assert not hashed & {"models_dir", "device", "preview", "preview_frames", "overwrite", "keep_parts"}
    base = Fit3dmmConfig().result_hash()
    for name, value in (("damping", 1e-3), ("photo_samples", 0), ("flag_px", 3.0)):
        assert Fit3dmmConfig(**{name: value}).result_hash() != base, name
    assert Fit3dmmConfig(cuda_graphs=False, device="cpu", preview="p").result_hash() == base


def test_flag_frames_at_the_crop_scale():
    from stages.fit3dmm import flag_frames

    results = flag_frames([{"lmk_error": np.array([1.0, 2.9, 3.1], np.float32)}], flag_px=6.0, crop_size=128)
    np.testing.assert_array_equal(results[0]["flagged"], [False, False, True])  # 6 px at 256² = 3 px at 128²


@pytest.fixture(scope="module")
def real_clips(assets, models_dir, tmp_path_factory):
    from stages.preprocess import PreprocessConfig, run

    out = tmp_path_factory.mktemp("fit") / "clips.h5"
    video = assets / "data/styletalk/style/video/furious_talk2_clip3.mp4"
    run(PreprocessConfig(device="cpu", models_dir=str(models_dir)), [str(video)], out)
    return out


def test_fit_real_clip_landmark_error_and_artifact(real_clips, assets, tmp_path):
    from avatarcli.artifact import open_artifact
    from avatarcli.camera import from_eg3d_camera, pose6_to_rt, project, world_to_camera
    from avatarcli.facemodel import load_face_model
    from stages.fit3dmm import Fit3dmmConfig, run

    config = Fit3dmmConfig(face_model=str(assets / ICT), landmarks_only=True, device="cpu",
                           preview=str(tmp_path / "preview"))
    summary = run(config, real_clips, tmp_path / "coeffs.h5")
    assert summary.units == 1 and summary.units_now == 1 and summary.details["lmk_error"] <= 3.0, summary.details
    assert summary.columns["landmark error px"] == f"{summary.details['lmk_error']:.2f}"
    assert len(list((tmp_path / "preview").glob("*.png"))) == 1
    model = load_face_model(str(assets / ICT))
    with open_artifact(tmp_path / "coeffs.h5", "coeffs", deep=True) as h, open_artifact(real_clips, "clips") as c:
        name = list(h["coeffs"])[0]
        g = h["coeffs"][name]
        assert (g["identity"][()] == g["identity"][0]).all()  # one identity per clip
        verts = model.vertices(torch.as_tensor(g["identity"][()]), torch.as_tensor(g["expression"][()]))
        lmk = model.landmarks(verts)
        R, t = pose6_to_rt(torch.as_tensor(g["pose6"][()]))
        uv_pose = project(world_to_camera(lmk, R, t), torch.as_tensor(g["intrinsics"][()]))
        R2, t2, K2 = from_eg3d_camera(torch.as_tensor(g["camera25"][()]), int(h.attrs["crop_size"]))
        uv_cam = project(world_to_camera(lmk, R2, t2), K2)
        assert (uv_pose - uv_cam).abs().max() < 1e-2  # the 25-d camera and the 6-d pose agree
        target = torch.as_tensor(c["clips"][name]["lmk68"][()])
        err = (uv_pose - target).norm(dim=-1).mean(1).numpy()
        np.testing.assert_allclose(err, g["lmk_error"][()], atol=1e-3)


def test_skips_resume_and_determinism(real_clips, assets, tmp_path):
    import shutil

    import h5py

    from avatarcli.artifact import open_artifact, read_strings
    from stages.fit3dmm import Fit3dmmConfig, run

    broken = tmp_path / "clips.h5"
    shutil.copy(real_clips, broken)
    with h5py.File(broken, "r+") as h:
        name = list(h["clips"])[0]
        h["clips"][name]["landmarked"][...] = False
    config = Fit3dmmConfig(face_model=str(assets / ICT), landmarks_only=True, device="cpu", rigid_iters=20, iters=30)
    summary = run(config, broken, tmp_path / "none.h5")
    assert summary.units == 0 and summary.skipped and "no landmarks" in summary.skipped[0][1]
    assert not summary.produced and summary.details["error"] == "no clip could be fitted"
    with open_artifact(tmp_path / "none.h5", "coeffs") as h:
        assert read_strings(h["skipped/reason"])[0].startswith("no landmarks")

    first = run(config, real_clips, tmp_path / "a.h5")
    again = run(config, real_clips, tmp_path / "b.h5")
    keep = Fit3dmmConfig(**{**config.__dict__, "keep_parts": True})
    run(keep, real_clips, tmp_path / "c.h5")
    (tmp_path / "c.h5").unlink()  # as if the assembly had crashed: the parts are reused
    resumed = run(keep, real_clips, tmp_path / "c.h5")
    assert resumed.reused == 1 and resumed.frames_now == 0
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b, h5py.File(tmp_path / "c.h5") as c:
        name = list(a["coeffs"])[0]
        for key in ("expression", "pose6", "camera25"):
            np.testing.assert_array_equal(a["coeffs"][name][key][()], b["coeffs"][name][key][()])
            np.testing.assert_array_equal(a["coeffs"][name][key][()], c["coeffs"][name][key][()])
    assert first.units == 1 and first.reused == 0 and first.frames_now == first.frames > 0


def test_cli_pipe(real_clips, assets, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from avatarcli.cli.app import app

    out = tmp_path / "coeffs.h5"
    result = CliRunner().invoke(app, ["fit-3dmm", "-", "-o", str(out), "--face-model", str(assets / ICT),
                                      "--landmarks-only", "--iters", "30", "--rigid-iters", "20", "--device", "cpu"],
                                input=f"{real_clips}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "coeffs" in info.output



def test_preview_video_every_frame_at_the_clip_fps(real_clips, assets, tmp_path):
    """--preview writes <clip>.mp4 beside the PNG grid: every frame of the clip, input | overlay side
    by side, at the clip's fps; the left half is the input frame (up to the codec's loss)."""
    import av
    import h5py

    from stages.fit3dmm import Fit3dmmConfig, run

    config = Fit3dmmConfig(face_model=str(assets / ICT), landmarks_only=True, device="cpu", rigid_iters=10, iters=15,
                           preview=str(tmp_path / "preview"))
    run(config, real_clips, tmp_path / "coeffs.h5")
    with h5py.File(real_clips) as handle:
        name = list(handle["clips"])[0]
        frames = handle["clips"][name]["frames"][()]
        fps = float(handle["clips"][name].attrs["fps"])
    video = tmp_path / "preview" / f"{name}.mp4"
    assert video.exists() and (tmp_path / "preview" / f"{name}.png").exists()
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert float(stream.average_rate) == pytest.approx(fps)
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    size = frames.shape[1]
    assert len(decoded) == len(frames) and decoded[0].shape == (size, 2 * size, 3)
    left = np.stack([d[:, :size] for d in decoded]).astype(np.float32)
    assert np.abs(left - frames).mean() < 4.0  # the input half is the clip's frames
    right = np.stack([d[:, size:] for d in decoded]).astype(np.float32)
    assert np.abs(right - frames).mean() > 1.0  # the overlay half shows the render
