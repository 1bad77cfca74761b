"""Tests of ``avatar synth`` (stages/synth.py, avatarcli/synthetic/): schema, ground-truth consistency,
rendering, determinism, smoothness, resume and the CLI. Small sizes: a few seconds on 2 CPU cores."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from avatarcli.artifact import open_artifact, read_config, read_strings
from avatarcli.errors import AvatarError
from avatarcli.synthetic import ModelArrays, boundary_loops, kps5_from_lmk68, smooth_signals
from stages.synth import SynthConfig, run
from tests.core.test_cli import avatar

ICT = "3dmm/ict_facekit/ict_face_light_f16.npz"
TRUTH_SHAPES = {"identity": ("KI",), "expression": ("T", "KE"), "pose6": ("T", 6), "lighting": ("T", 9, 3),
                "albedo": ("V", 3), "intrinsics": (3, 3)}


def small_config(assets, **changes) -> SynthConfig:
    base = dict(clips=2, frames=8, size=128, seed=0, face_model=str(assets / ICT), device="cpu", batch_frames=8)
    return SynthConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def model(assets):
    from avatarcli.facemodel import load_face_model

    return load_face_model(assets / ICT)


@pytest.fixture(scope="module")
def synth_file(assets, model, tmp_path_factory, cpu_threads):
    path = tmp_path_factory.mktemp("synth") / "synth.h5"
    summary = run(small_config(assets), path, model=model)
    assert summary.units == 2 and summary.frames == 16 and summary.units_now == 2 and summary.reused == 0
    assert summary.frames_now == 16 and not summary.details.get("output_kept")
    assert 0 < summary.details["face_coverage"] < 1
    assert not (path.parent / "synth.h5.parts").exists()  # parts go after a successful assembly
    return path


def clip_groups(handle):
    return [handle["clips"][name] for name in read_strings(handle["index/clip_id"])]


def test_artifact_validates_with_truth(synth_file, model):
    with open_artifact(synth_file, "clips", deep=True) as handle:
        assert int(handle.attrs["crop_size"]) == 128 and float(handle.attrs["fps"]) == 25.0
        config = read_config(handle)
        assert config["face_model_name"] == model.name and config["face_model_sha256"] == model.sha256
        assert read_strings(handle["sources/path"]) == ["synth:seed=0/clip=0", "synth:seed=0/clip=1"]
        assert read_strings(handle["sources/status"]) == ["ok", "ok"]
        assert list(handle["index/num_frames"][()]) == [8, 8]
        assert len(set(read_strings(handle["identities/name"]))) == 2
        for group in clip_groups(handle):
            sizes = {"T": 8, "KI": model.num_id, "KE": model.num_exp, "V": model.num_vertices}
            for name, shape in TRUTH_SHAPES.items():
                expected = tuple(sizes.get(d, d) for d in shape)
                assert group[f"truth/{name}"].shape == expected and group[f"truth/{name}"].dtype == np.float32
            assert group["frames"].shape == (8, 128, 128, 3) and group["frames"].dtype == np.uint8
            assert np.array_equal(group["boxes"][()], np.tile([0, 0, 128, 128], (8, 1)))
            assert np.all(group["det_score"][()] == 1) and group["detected"][()].all() and group["landmarked"][()].all()
            assert np.allclose(group["timestamps"][()], np.arange(8) / 25.0)
            assert group.attrs["source_path"].startswith("synth:seed=0/clip=")
            assert group.attrs["source_width"] == 128 and group.attrs["segment"] == 0
            albedo = group["truth/albedo"][()]
            assert albedo.min() >= 0 and albedo.max() <= 1


def test_info_runs_on_it(synth_file):
    result = avatar("info", str(synth_file), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kind"] == "clips" and info["units"]["count"] == 2


def test_truth_reprojects_to_landmarks(synth_file, model):
    from avatarcli.camera import pose6_to_rt, project, world_to_camera

    with h5py.File(synth_file, "r") as handle:
        for group in clip_groups(handle):
            identity = torch.from_numpy(group["truth/identity"][()])
            expression = torch.from_numpy(group["truth/expression"][()])
            R, t = pose6_to_rt(torch.from_numpy(group["truth/pose6"][()]))
            K = torch.from_numpy(group["truth/intrinsics"][()])
            verts = model.vertices(identity[None].expand(len(expression), -1), expression)
            lmk = project(world_to_camera(model.landmarks(verts), R, t), K).numpy()
            assert np.abs(lmk - group["lmk68"][()]).max() <= 1e-3
            assert np.allclose(group["kps5"][()], kps5_from_lmk68(group["lmk68"][()]))
            kps = group["kps5"][()]
            assert (kps[:, 0, 0] < kps[:, 1, 0]).all() and (kps[:, 3, 0] < kps[:, 4, 0]).all()
            # nose-centred like preprocess crops; focal scaled to the size
            assert np.abs(group["lmk68"][:, 30] - 64).max() < 0.12 * 128
            assert K[0, 0] == pytest.approx(1160.0 * 128 / 256)


def test_face_is_rendered_where_the_landmarks_are(synth_file, model):
    from avatarcli.camera import pose6_to_rt
    from avatarcli.render.mesh import render_mesh

    with h5py.File(synth_file, "r") as handle:
        for group in clip_groups(handle):
            identity = torch.from_numpy(group["truth/identity"][()])
            expression = torch.from_numpy(group["truth/expression"][()])
            R, t = pose6_to_rt(torch.from_numpy(group["truth/pose6"][()]))
            verts = model.vertices(identity[None].expand(len(expression), -1), expression)
            out = render_mesh(verts, model.faces, R, t, torch.from_numpy(group["truth/intrinsics"][()]), 128,
                              torch.from_numpy(group["truth/albedo"][()]), torch.from_numpy(group["truth/lighting"][()]))
            mask = out.mask.numpy()
            coverage = mask.mean((1, 2))
            assert (coverage > 0.15).all() and (coverage < 0.8).all(), coverage
            frames = group["frames"][()].astype(np.float32) / 255
            for i, (u, v) in enumerate(group["lmk68"][:, 30]):
                assert mask[i, int(v), int(u)]
                face, background = frames[i][mask[i]].mean(0), frames[i][~mask[i]].mean(0)
                assert np.abs(face - background).sum() > 0.05
            # inside the mask (away from the eye and mouth openings, which are capped) the frame is the
            # rendered colour, clamped and rounded
            rgb = (out.rgb.clamp(0, 1).numpy() * 255).round()
            assert (np.abs(rgb[mask] - group["frames"][()][mask]) > 1).mean() < 0.01


def test_same_seed_same_frames_different_seed_different(assets, model, tmp_path, cpu_threads):
    config = dict(clips=1, frames=3, size=64)
    paths = [tmp_path / f"{name}.h5" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (3, 3, 4)):
        run(small_config(assets, seed=seed, **config), path, model=model)
    with h5py.File(paths[0]) as a, h5py.File(paths[1]) as b, h5py.File(paths[2]) as c:
        ga, gb, gc = clip_groups(a)[0], clip_groups(b)[0], clip_groups(c)[0]
        assert np.array_equal(ga["frames"][()], gb["frames"][()])
        for name in TRUTH_SHAPES:
            assert np.array_equal(ga[f"truth/{name}"][()], gb[f"truth/{name}"][()])
        assert not np.array_equal(ga["frames"][()], gc["frames"][()])
        assert not np.array_equal(ga["truth/identity"][()], gc["truth/identity"][()])


def test_trajectories_are_smooth_and_in_range(synth_file):
    config = SynthConfig()
    with h5py.File(synth_file, "r") as handle:
        for group in clip_groups(handle):
            pose = group["truth/pose6"][()].astype(np.float64)
            angles = np.degrees(pose[:, :3])
            assert (np.abs(angles) <= [config.pitch, config.yaw, config.roll]).all()
            assert np.abs(np.diff(angles, axis=0)).max() < 3.0  # degrees per frame at 25 fps
            assert np.abs(np.diff(pose[:, 3:], axis=0)).max() < 8.0  # mm per frame (the nose is kept centred)
            assert np.abs(pose[:, 5] - config.distance).max() < config.distance * config.distance_jitter + 5
            exp = group["truth/expression"][()]
            assert exp.min() >= 0 and exp.max() <= config.exp_max + 1e-6
            assert 1 <= (exp.max(0) > 0).sum() <= config.exp_channels
            assert np.abs(np.diff(exp, axis=0)).max() < 0.2
            light = group["truth/lighting"][()]
            assert np.abs(np.diff(light, axis=0)).max() < 0.05


def test_smooth_signals_bound_their_derivative():
    signals = smooth_signals(np.random.default_rng(0), 500, 25.0, 4, max_hz=0.5)
    assert np.abs(signals).max() <= 1
    assert np.abs(np.diff(signals, axis=0)).max() <= 2 * math.pi * 0.5 / 25.0


def test_caps_close_the_eyes_and_mouth(model):
    loops = boundary_loops(model.faces.numpy())
    assert len(loops) == 4  # two eyes, the mouth, the neck
    caps = ModelArrays.from_model(model).caps
    assert caps is not None and len(caps.mouth_loop) > 0
    assert caps.faces.max() < model.num_vertices + caps.weights.shape[0]
    assert np.allclose(caps.weights.sum(1), 1)


def test_existing_output_is_kept_or_refused(assets, model, tmp_path, cpu_threads):
    path = tmp_path / "s.h5"
    config = small_config(assets, clips=1, frames=1, size=32)
    run(config, path, model=model)
    kept = run(config, path, model=model)
    assert kept.details["output_kept"] and kept.units_now == 0 and kept.reused == 1 and kept.frames == 1
    with pytest.raises(AvatarError, match="--overwrite"):
        run(small_config(assets, clips=1, frames=2, size=32), path, model=model)
    redone = run(small_config(assets, clips=1, frames=2, size=32, overwrite=True), path, model=model)
    assert not redone.details.get("output_kept") and redone.units_now == 1 and redone.frames == 2


def datasets(path) -> dict:
    out = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_killed_run_resumes_with_its_finished_clips(assets, model, tmp_path, monkeypatch, cpu_threads):
    from avatarcli.synthetic.render import Synthesizer

    config = small_config(assets, clips=3, frames=2, size=32)
    whole = tmp_path / "whole.h5"
    run(config, whole, model=model)
    render_clip, rendered, die_at = Synthesizer.clip, [], [2]

    def clip(self, index, progress_frames=None):
        if index in die_at:
            raise KeyboardInterrupt  # as a user's Ctrl-C (or a kill) would stop the run
        rendered.append(index)
        return render_clip(self, index, progress_frames)

    monkeypatch.setattr(Synthesizer, "clip", clip)
    path = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        run(config, path, model=model)
    assert not path.exists() and len(list((tmp_path / "resumed.h5.parts").glob("*.h5"))) == 2
    die_at.clear()
    summary = run(config, path, model=model)  # in the same process: the killed run's lock was released
    assert rendered == [0, 1, 2] and summary.units_now == 1 and summary.reused == 2 and summary.frames_now == 2
    expected, got = datasets(whole), datasets(path)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert np.array_equal(value, got[name]), name

    # parts made with other settings are never mixed in: refused, or cleared with --overwrite
    die_at.append(2)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "other.h5", model=model)
    die_at.clear()
    other = small_config(assets, clips=3, frames=3, size=32)
    with pytest.raises(AvatarError, match="other settings"):
        run(other, tmp_path / "other.h5", model=model)
    other.overwrite = True
    assert run(other, tmp_path / "other.h5", model=model).units_now == 3


def test_cli_prints_only_the_output_path_and_keeps_a_same_output(assets, tmp_path):
    out = tmp_path / "cli.h5"
    common = ("--clips", "1", "--frames", "4", "--size", "64", "--face-model", str(assets / ICT), "--device", "cpu")
    result = avatar("--seed", "5", "synth", "-o", str(out), "--batch", "3", *common)  # old --batch spelling
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"
    with open_artifact(out, "clips", deep=True) as handle:
        assert clip_groups(handle)[0]["frames"].shape == (4, 64, 64, 3)
        assert read_strings(handle["sources/path"]) == ["synth:seed=5/clip=0"]  # the global --seed
    again = avatar("synth", "-o", str(out), "--seed", "5", "--batch-frames", "4", *common)  # batch: not a result
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{out}\n" and "kept as is" in again.stderr
