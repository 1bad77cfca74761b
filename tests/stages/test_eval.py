"""avatar eval: metric definitions against references, self-comparison, Deep3D AED/APD, CSIM on real faces."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

STYLETALK = "data/styletalk"
ICT = "3dmm/ict_facekit/ict_face_light_f16.npz"


# ------------------------------------------------------------------------------------------------
# helpers


def read_video(path: Path, count: int, step: int = 1) -> np.ndarray:
    """The first ``count`` frames (every ``step``-th) of a video, RGB uint8 [T,H,W,3]."""
    capture = cv2.VideoCapture(str(path))
    frames, index = [], 0
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if index % step == 0:
            frames.append(frame[..., ::-1])
        index += 1
    capture.release()
    return np.stack(frames)


def write_clips(path: Path, clips: dict[str, np.ndarray], identities: dict[str, str] | None = None) -> Path:
    """A minimal valid clips artifact holding ``clips`` (frames only matter to eval)."""
    from avatarcli.artifact import ArtifactWriter
    from avatarcli.clips import write_clip_tables
    from avatarcli.schemas import CLIPS

    identities = identities or {name: name for name in clips}
    names = sorted(set(identities.values()))
    size = next(iter(clips.values())).shape[1]
    with ArtifactWriter(path, CLIPS, {"test": True}, extra_attrs={"crop_size": size, "fps": 25.0}) as writer:
        group = writer.handle.create_group("clips")
        for name, frames in clips.items():
            t = len(frames)
            unit = group.create_group(name)
            unit.create_dataset("frames", data=frames, chunks=(1, *frames.shape[1:]))
            for key, shape, dtype in (("boxes", (t, 4), np.float32), ("kps5", (t, 5, 2), np.float32),
                                      ("lmk68", (t, 68, 2), np.float32), ("det_score", (t,), np.float32),
                                      ("timestamps", (t,), np.float64), ("source_frame", (t,), np.int64)):
                unit.create_dataset(key, data=np.zeros(shape, dtype))
            for key in ("detected", "landmarked"):
                unit.create_dataset(key, data=np.ones(t, bool))
            unit.attrs.update({"source_path": name, "source_fps": 25.0, "fps": 25.0, "identity": identities[name],
                               "identity_id": names.index(identities[name]), "segment": 0,
                               "source_width": size, "source_height": size})
        write_clip_tables(writer.handle, list(clips), [names.index(identities[n]) for n in clips],
                          [len(f) for f in clips.values()], list(range(len(clips))), names,
                          list(clips), [""] * len(clips), ["ok"] * len(clips), [""] * len(clips), [1] * len(clips))
    return path


def cli(*args, stdin: str | None = None):
    from typer.testing import CliRunner

    from avatarcli.cli.app import app

    return CliRunner().invoke(app, list(map(str, args)), input=stdin)


def cli_process(*args):
    """The real entry point (one-line errors come from ``avatarcli.cli.app.main``)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-m", "avatarcli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ), timeout=600)


@pytest.fixture(scope="module")
def talking(assets, tmp_path_factory):
    """Two real clips of different people (12 frames each) and a perturbed copy of the first."""
    root = tmp_path_factory.mktemp("eval")
    a = read_video(assets / STYLETALK / "source/video/Obama_clip1.mp4", 12, step=5)
    b = read_video(assets / STYLETALK / "source/video/KristiNoem.mp4", 12, step=5)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    ref = write_clips(root / "ref.h5", {"obama": a, "kristi": b})
    gen = write_clips(root / "gen.h5", {"obama": noisy, "kristi": b[::-1].copy()})
    return {"root": root, "ref": ref, "gen": gen, "a": a, "b": b, "noisy": noisy}


# ------------------------------------------------------------------------------------------------
# definitions


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_psnr_ssim_match_scikit_image(assets, dtype):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from avatarcli.metrics.image import psnr, ssim

    real = read_video(assets / STYLETALK / "source/video/Obama_clip1.mp4", 3, step=7)
    rng = np.random.default_rng(1)
    noisy = np.clip(real.astype(int) + rng.integers(-25, 26, real.shape), 0, 255).astype(np.uint8)
    shifted = np.roll(real, 3, axis=2)
    for gen in (noisy, shifted):
        ours_p = psnr(torch.from_numpy(gen), torch.from_numpy(real)).numpy()
        ours_s = ssim(torch.from_numpy(gen), torch.from_numpy(real), dtype=dtype).numpy()
        for i in range(len(real)):
            ref_p = peak_signal_noise_ratio(real[i], gen[i], data_range=255)
            ref_s = structural_similarity(real[i], gen[i], gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255, channel_axis=-1)
            assert abs(ours_p[i] - ref_p) < 1e-4
            assert abs(ours_s[i] - ref_s) < 1e-4, (dtype, ours_s[i], ref_s)


def test_masked_psnr_ssim_are_means_over_the_mask():
    from avatarcli.metrics.image import psnr, ssim, ssim_map

    rng = np.random.default_rng(2)
    a = torch.from_numpy(rng.integers(0, 256, (2, 40, 40, 3)).astype(np.uint8))
    b = torch.from_numpy(np.clip(a.numpy().astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8))
    mask = torch.zeros(2, 40, 40, dtype=torch.bool)
    mask[:, 10:30, 5:25] = True
    per_image = [10 * np.log10(255 ** 2 / (a[i].double() - b[i].double())[mask[i]].pow(2).mean().item()) for i in range(2)]
    np.testing.assert_allclose(psnr(a, b, mask).numpy(), per_image, rtol=1e-12)
    full = ssim_map(a, b)  # [B,C,30,30]
    inner = mask[:, 5:35, 5:35]
    expected_ssim = [full[i][:, inner[i]].mean().item() for i in range(2)]
    np.testing.assert_allclose(ssim(a, b, mask).numpy(), expected_ssim, rtol=1e-6)


def test_lpips_matches_reference_package(tmp_path):
    lpips = pytest.importorskip("lpips")
    from avatarcli.metrics.lpips import LPIPS, to_lpips_input

    torch.manual_seed(0)
    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()  # real linear layers, random backbone
    backbone = {}
    for key, value in reference.net.state_dict().items():
        _, index, param = key.split(".")
        backbone[f"features.{index}.{param}"] = value
    from torchvision.models import alexnet

    full = alexnet(weights=None).state_dict()
    full.update(backbone)
    lin = {k: v for k, v in reference.state_dict().items() if k.startswith("lin")}
    ours = LPIPS(full, lin)
    a = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    expected = reference(to_lpips_input(a), to_lpips_input(b)).view(-1).detach()
    assert torch.allclose(ours(to_lpips_input(a), to_lpips_input(b)), expected, atol=1e-6)
    assert torch.allclose(ours(to_lpips_input(a), to_lpips_input(a)), torch.zeros(3), atol=1e-7)


def test_alignment_matches_insightface_norm_crop(assets):
    from skimage.transform import SimilarityTransform

    from avatarcli.metrics.identity import ARCFACE_TEMPLATE, align_faces, similarity_transform

    rng = np.random.default_rng(3)
    frame = read_video(assets / STYLETALK / "source/video/Obama_clip1.mp4", 1)[0]
    kps = ARCFACE_TEMPLATE.numpy() * 1.8 + np.array([20.0, 15.0]) + rng.normal(0, 2.0, (5, 2))
    tform = SimilarityTransform.from_estimate(kps, ARCFACE_TEMPLATE.numpy())
    ours = similarity_transform(torch.as_tensor(kps)[None], ARCFACE_TEMPLATE)[0].numpy()
    np.testing.assert_allclose(ours, tform.params[:2], atol=1e-9)
    expected = cv2.warpAffine(frame, tform.params[:2], (112, 112), borderValue=0.0)
    aligned = align_faces(torch.from_numpy(frame)[None], torch.as_tensor(kps)[None])[0]
    ours_img = aligned.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    assert np.abs(ours_img.astype(int) - expected.astype(int)).mean() < 1.0


# ------------------------------------------------------------------------------------------------
# the stage


def test_self_comparison_is_perfect(talking, models_dir, assets, tmp_path):
    from stages.eval import EvalConfig, run

    config = EvalConfig(models_dir=str(models_dir), device="cpu", face_model=str(assets / ICT))
    result = run(config, talking["ref"], talking["ref"], tmp_path / "self.h5")
    metrics = result.details["metrics"]
    assert set(metrics) == {"psnr", "ssim", "csim", "akd", "aed", "apd"}  # lpips: weights not in the assets
    assert "lpips" in result.details["left_out"]
    assert (result.units, result.units_now, result.reused, result.frames) == (2, 2, 0, 24)
    assert metrics["psnr"]["mean"] == "inf"
    assert metrics["ssim"]["mean"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["akd"]["mean"] == 0.0 and metrics["aed"]["mean"] == 0.0 and metrics["apd"]["mean"] == 0.0
    assert metrics["csim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert all(m["frames"] == 24 and m["excluded"] == 0 for m in metrics.values())
    # every number carries its protocol, with model hashes
    assert metrics["csim"]["protocol"]["model"]["name"] == "mobilefacenet_arcface"
    assert len(metrics["csim"]["protocol"]["model"]["sha256"]) == 64
    assert metrics["akd"]["protocol"]["landmarks"]["name"] == "pfld68"
    assert metrics["aed"]["protocol"]["face_model_sha256"]


def test_degraded_clip_scores_and_artifact(talking, models_dir, assets, tmp_path):
    from avatarcli.artifact import open_artifact, read_strings
    from skimage.metrics import peak_signal_noise_ratio
    from stages.eval import EvalConfig, run

    config = EvalConfig(metrics=("psnr", "ssim", "csim", "akd"), models_dir=str(models_dir), device="cpu")
    result = run(config, talking["gen"], talking["ref"], tmp_path / "e.h5")
    with open_artifact(tmp_path / "e.h5", "eval", deep=True) as handle:
        names = read_strings(handle["metrics/name"])
        assert names == ["psnr", "ssim", "csim", "akd"]
        clips = read_strings(handle["index/clip_id"])
        obama = handle["eval"]["obama"]["values"][()]
        expected = [peak_signal_noise_ratio(talking["a"][i], talking["noisy"][i], data_range=255) for i in range(12)]
        np.testing.assert_allclose(obama[:, 0], expected, atol=1e-6)
        protocol = json.loads(handle.attrs["protocol_json"])
        assert protocol["ssim"]["window"].startswith("gaussian sigma=1.5")
        assert set(clips) == {"obama", "kristi"}
    csim = {c["generated"]: c["csim"] for c in result.details["clips"]}
    assert csim["obama"] > 0.9  # noise keeps the identity
    # kristi is compared with her own frames reversed: same person, other expressions and poses
    assert 0.3 < csim["kristi"] < csim["obama"]
    assert result.details["metrics"]["akd"]["mean"] > 0.5


def test_face_region_restricts_image_metrics(talking, models_dir, assets, tmp_path):
    from avatarcli.metrics.image import psnr
    from stages.eval import EvalConfig, run

    gen = talking["a"].copy()
    gen[:, :40] = 0  # damage only the top rows: hair and background, outside the face region
    path = write_clips(tmp_path / "top.h5", {"obama": gen})
    common = dict(metrics=("psnr", "ssim"), models_dir=str(models_dir), device="cpu", face_model=str(assets / ICT))
    frame = run(EvalConfig(**common), path, talking["ref"], tmp_path / "frame.h5").details["metrics"]
    face = run(EvalConfig(region="face", **common), path, talking["ref"], tmp_path / "face.h5").details["metrics"]
    expected = psnr(torch.from_numpy(gen), torch.from_numpy(talking["a"])).mean().item()
    assert frame["psnr"]["mean"] == pytest.approx(expected)
    assert face["psnr"]["mean"] == "inf" and face["psnr"]["frames"] == 12  # the face itself is untouched
    assert face["ssim"]["mean"] > frame["ssim"]["mean"]
    assert face["psnr"]["protocol"]["region"].startswith("face")


def test_cross_id_csim_separates_people(talking, models_dir, tmp_path):
    from stages.eval import EvalConfig, run

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("generated,reference,source\nobama,obama,obama\nobama,kristi,kristi\n")
    config = EvalConfig(metrics=("csim",), mode="cross-id", models_dir=str(models_dir), device="cpu")
    result = run(config, talking["ref"], talking["ref"], tmp_path / "x.h5", source=talking["ref"], pairs=pairs)
    clip = {(c["generated"], c["reference"]): c["csim"] for c in result.details["clips"]}
    assert clip[("obama", "obama")] > 0.4 > clip[("obama", "kristi")]
    assert result.details["metrics"]["csim"]["protocol"]["pairs"].endswith("frame 0 of the source clip")


def test_deep3d_import_and_aed_apd_equal_numpy(assets, tmp_path):
    import scipy.io

    files = sorted((assets / STYLETALK).glob("*/3dmm/*.mat"))
    assert len(files) >= 30
    out = cli("import-deep3d", assets / STYLETALK, "-o", tmp_path / "d3d.h5")
    assert out.exit_code == 0, out.output
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "d3d.h5")
    pairs = [("Obama_clip1", "Obama_clip2"), ("KristiNoem", "trump_clip1"), ("andrew_clip_1", "feifeili_clip1")]
    (tmp_path / "pairs.csv").write_text("".join(f"{a},{b}\n" for a, b in pairs))
    for convention, cols in (("angles+translation", np.r_[224:227, 254:257]), ("angles", np.r_[224:227])):
        result = cli("eval", tmp_path / "d3d.h5", "-r", tmp_path / "d3d.h5", "--pairs", tmp_path / "pairs.csv",
                     "--apd", convention, "-o", tmp_path / f"{convention}.h5", "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        aed_all, apd_all = [], []
        for (a, b), clip in zip(pairs, summary["clips"]):
            ca = scipy.io.loadmat(str(next(f for f in files if f.stem == a)))["coeff"]
            cb = scipy.io.loadmat(str(next(f for f in files if f.stem == b)))["coeff"]
            n = min(len(ca), len(cb))
            aed = np.abs(ca[:n, 80:144] - cb[:n, 80:144]).mean(1)
            apd = np.abs(ca[:n][:, cols] - cb[:n][:, cols]).mean(1)
            assert clip["aed"] == pytest.approx(aed.mean(), rel=1e-6)
            assert clip["apd"] == pytest.approx(apd.mean(), rel=1e-5)
            aed_all.append(aed)
            apd_all.append(apd)
        assert summary["metrics"]["aed"]["mean"] == pytest.approx(np.concatenate(aed_all).mean(), rel=1e-6)
        assert summary["metrics"]["apd"]["mean"] == pytest.approx(np.concatenate(apd_all).mean(), rel=1e-5)
        assert summary["metrics"]["apd"]["protocol"]["extractor"].startswith("coefficients as given")
    # a coeffs artifact against a clips artifact is refused before any work (it used to exclude every frame)
    clips = write_clips(tmp_path / "clips.h5", {"Obama_clip1": np.zeros((3, 64, 64, 3), np.uint8)})
    refused = cli_process("eval", tmp_path / "d3d.h5", "-r", clips, "--metrics", "aed", "-o", tmp_path / "mixed.h5")
    assert refused.returncode != 0 and "fit " in refused.stderr and "first" in refused.stderr, refused.stderr
    assert not (tmp_path / "mixed.h5").exists()


def test_deep3d_import_conventions(assets, tmp_path):
    """The imported pose puts the model where Deep3DFaceRecon's own projection does."""
    import scipy.io

    from avatarcli.artifact import open_artifact
    from avatarcli.camera import from_eg3d_camera, pose6_to_rt, project, world_to_camera
    from stages.import_deep3d import ImportDeep3dConfig, run

    path = assets / STYLETALK / "source/3dmm/Obama_clip1.mat"
    run(ImportDeep3dConfig(), [str(path)], tmp_path / "one.h5")
    coeff = scipy.io.loadmat(str(path))["coeff"][:5].astype(np.float64)
    with open_artifact(tmp_path / "one.h5", "coeffs", deep=True) as handle:
        unit = handle["coeffs"]["Obama_clip1"]
        np.testing.assert_array_equal(unit["expression"][:5], coeff[:, 80:144].astype(np.float32))
        pose6, cam25 = torch.as_tensor(unit["pose6"][:5]).double(), torch.as_tensor(unit["camera25"][:5]).double()
        lighting = unit["lighting"][:5]
    np.testing.assert_array_equal(lighting[:, :, 0], coeff[:, 227:236].astype(np.float32))
    # Deep3DFaceRecon: x_cam = R x + trans, z -> 10 - z, u = 1015 x / z + 112, v = 223 - (1015 y / z + 112) (dm)
    points = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.2, 0.5], [-0.4, -0.1, 0.2]], dtype=torch.float64)
    from avatarcli.camera import euler_to_matrix

    angles, trans = torch.as_tensor(coeff[:, 224:227]), torch.as_tensor(coeff[:, 254:257])
    posed = (euler_to_matrix(angles)[:, None] @ points[None, :, :, None])[..., 0] + trans[:, None]
    z = 10.0 - posed[..., 2]
    u = 1015.0 * posed[..., 0] / z + 112.0
    v = 223.0 - (1015.0 * posed[..., 1] / z + 112.0)
    R, t = pose6_to_rt(pose6)
    K = torch.tensor([[1015.0, 0, 112.0], [0, 1015.0, 112.0], [0, 0, 1]], dtype=torch.float64)
    uv = project(world_to_camera(points[None] * 100.0, R, t), K)
    assert (uv[..., 0] - u).abs().max() < 1e-4  # translation is stored as float32
    assert (uv[..., 1] - v).abs().max() < 1.0 + 1e-4  # their grid is integer-centred: a one-pixel offset in v
    R2, t2, K2 = from_eg3d_camera(cam25, 224)
    assert (project(world_to_camera(points[None] * 100.0, R2, t2), K2) - uv).abs().max() < 1e-4


def test_bad_inputs_are_one_line_errors(talking, models_dir, tmp_path, assets):
    cases = [
        (["eval", talking["gen"], "-r", talking["ref"], "--metrics", "psnr,bogus"], "unknown metric 'bogus'"),
        (["eval", talking["gen"], "-r", tmp_path / "missing.h5"], "reference artifact not found"),
        (["eval", talking["gen"], "-r", talking["ref"], "--mode", "cross-id", "--metrics", "csim"], "needs --source"),
        (["eval", talking["gen"], "-r", talking["ref"], "--region", "nose"], "must be one of frame, face, not 'nose'"),
    ]
    for args, message in cases:
        result = cli_process(*args, "-o", tmp_path / "x.h5", "--models", models_dir, "--device", "cpu")
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "x.h5").exists()
    from avatarcli.errors import AvatarError
    from stages.eval import EvalConfig, run

    with pytest.raises(AvatarError, match="--region must be frame or face, not 'nose'"):  # library callers too
        run(EvalConfig(region="nose"), talking["gen"], talking["ref"], tmp_path / "x.h5")
    # frame-count mismatch: a warning, or an error with --strict
    short = write_clips(tmp_path / "short.h5", {"obama": talking["a"][:5], "kristi": talking["b"]})
    strict = cli_process("eval", short, "-r", talking["ref"], "--metrics", "psnr", "--strict", "-o", tmp_path / "s.h5")
    assert strict.returncode != 0 and "aligned by index" in strict.stderr
    loose = cli("eval", short, "-r", talking["ref"], "--metrics", "psnr", "-o", tmp_path / "s.h5", "--json")
    assert loose.exit_code == 0, loose.output
    summary = json.loads(loose.stdout)
    assert summary["frames"] == 17 and any("aligned by index" in w for w in summary["warnings"])


def test_excluded_frames_are_reported_not_zero(talking, models_dir, tmp_path):
    from stages.eval import EvalConfig, run

    blank_gen = talking["a"].copy()
    blank_gen[3:6] = 128  # no face in three generated frames
    gen = write_clips(tmp_path / "blank.h5", {"obama": blank_gen})
    config = EvalConfig(metrics=("psnr", "csim", "akd"), models_dir=str(models_dir), device="cpu")
    result = run(config, gen, talking["ref"], tmp_path / "b.h5")
    for metric in ("csim", "akd"):
        entry = result.details["metrics"][metric]
        assert entry["frames"] == 9 and entry["excluded"] == 3
        assert entry["excluded_reasons"] == {"no face detected in the generated frame": 3}
    assert result.details["metrics"]["psnr"]["frames"] == 12


def test_non_finite_coefficients_are_excluded_with_a_reason_and_a_warning(assets, tmp_path):
    """A coeffs artifact with NaN/inf in 5 of 50 frames: AED/APD exclude exactly those frames."""
    import shutil

    import h5py
    import scipy.io

    from stages.import_deep3d import ImportDeep3dConfig, run as import_deep3d

    coeff = scipy.io.loadmat(str(assets / STYLETALK / "source/3dmm/Obama_clip1.mat"))["coeff"][:50]
    scipy.io.savemat(tmp_path / "obama.mat", {"coeff": coeff})
    import_deep3d(ImportDeep3dConfig(), [str(tmp_path / "obama.mat")], tmp_path / "ref.h5")
    shutil.copy(tmp_path / "ref.h5", tmp_path / "gen.h5")
    bad = [3, 10, 20, 31, 49]
    with h5py.File(tmp_path / "gen.h5", "r+") as handle:
        unit = handle["coeffs"]["obama"]
        expression = unit["expression"][()] + np.float32(0.25)
        expression[bad[:4], 7] = np.nan
        expression[bad[4], 0] = np.inf
        unit["expression"][...] = expression
    result = cli("eval", tmp_path / "gen.h5", "-r", tmp_path / "ref.h5", "-o", tmp_path / "e.h5", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for metric in ("aed", "apd"):
        entry = summary["metrics"][metric]
        assert entry["frames"] == 45 and entry["excluded"] == 5
        assert entry["excluded_reasons"] == {"non-finite coefficients (NaN or inf) in this frame": 5}
        assert entry["mean"] is not None and np.isfinite(entry["mean"])
    assert summary["metrics"]["aed"]["mean"] == pytest.approx(0.25, rel=1e-4)  # the other frames are scored
    assert summary["metrics"]["apd"]["mean"] == 0.0
    warning = "obama: 5 of 50 frames have non-finite coefficients (NaN or inf); excluded from aed, apd"
    assert warning in summary["warnings"]
    assert "5 of 50 frames have non-finite coefficients" in result.stderr
    with h5py.File(tmp_path / "e.h5") as handle:
        excluded = handle["eval"]["obama"]["excluded"][()]
    assert (np.flatnonzero(excluded.any(1)) == bad).all()


def test_non_finite_landmark_fits_are_excluded():
    """A landmark fit with a NaN frame (clips inputs): that frame is excluded, not scored."""
    from avatarcli.evaluation.coefficients import coefficient_metrics
    from avatarcli.evaluation.plan import REASONS, Side

    frames = 6
    rng = np.random.default_rng(0)
    fit = {"expression": rng.normal(size=(frames, 5)), "rotation": rng.normal(size=(frames, 3)),
           "translation": rng.normal(size=(frames, 3))}
    broken = {k: v.copy() for k, v in fit.items()}
    broken["translation"][2, 1] = np.nan
    clips = Side(Path("x.h5"), "clips", {"a": frames}, 64)
    result = {"values": {}, "excluded": {}, "gen_found": np.ones(frames, bool), "ref_found": np.ones(frames, bool)}
    coefficient_metrics(result, ["aed", "apd"], "angles+translation", clips, clips, broken, fit)
    for metric in ("aed", "apd"):
        codes = result["excluded"][metric]
        assert np.flatnonzero(codes).tolist() == [2] and REASONS[codes[2]].startswith("non-finite coefficients")
        assert np.isnan(result["values"][metric][2]) and np.isfinite(np.delete(result["values"][metric], 2)).all()


def test_pipe_from_preprocess_style_stdin(talking, models_dir):
    import csv

    out, table = talking["root"] / "piped.h5", talking["root"] / "piped.csv"
    # --batch: the shipped spelling of --batch-frames
    result = cli("eval", "-", "-r", talking["ref"], "--metrics", "psnr,ssim", "-o", out, "--device", "cpu",
                 "--batch", "5", "--summary", table, stdin=f"{talking['gen']}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    info = cli("info", out)
    assert info.exit_code == 0 and "eval" in info.output
    rows = list(csv.reader(table.open()))
    assert rows[0] == ["generated", "reference", "frames", "psnr", "ssim"]
    assert [r[0] for r in rows[1:]] == ["obama", "kristi", "ALL"] and rows[-1][2] == "24"


def test_landmark_fit_batches_are_those_of_planning_all_clips_at_once():
    """Clips added one by one are fitted in exactly the batches ``plan_batches`` makes of all of them
    (so streaming the fits does not change them), each batch as soon as it is complete."""
    from avatarcli.evaluation.coefficients import LandmarkFits
    from avatarcli.fit import plan_batches

    class Recording(LandmarkFits):
        def _fit(self, clips):
            self.batches.append([c.name for c in clips])
            self.results.update({c.name: {"frames": len(c.lmk68)} for c in clips})

    lengths = [int(n) for n in np.random.default_rng(4).integers(1, 30, 40)]
    usable = [k for k in range(40) if k % 7]  # every 7th clip has no face: not fitted
    fits = Recording(None, 256, None, 50, "cpu", None)
    fits.batches = []
    for k, n in enumerate(lengths):
        found = np.full(n, k % 7 != 0)
        fits.add(f"c{k}", np.zeros((n, 68, 2), np.float32), found)
        so_far = [u for u in usable if u <= k]
        assert fits.batches == plan_batches([f"c{u}" for u in so_far], [lengths[u] for u in so_far], 50)[:-1]
    fits.flush()
    assert fits.batches == plan_batches([f"c{u}" for u in usable], [lengths[u] for u in usable], 50)
    assert all(fits.ready(f"c{k}") for k in range(40))
    assert fits.pop("c0") is None and fits.pop("c1") == {"frames": lengths[1]}


def test_interrupted_eval_resumes_per_clip_pair(talking, models_dir, assets, tmp_path, monkeypatch):
    """A clip pair's part is written as soon as the pair is finished: a run stopped while fitting the
    second pair's clips keeps the first pair; the rerun evaluates only the second and writes what an
    uninterrupted run writes.

    The interrupted run fits each pair's two clips as one batch (streamed), the others all four
    clips in one batch (the finished pair's refitted, their results dropped): a clip's fit does not
    depend on the other clips of a batch of two or more (bit-exact on the CPU; a batch of one clip
    rounds differently, see the next test)."""
    import dataclasses

    import h5py

    from avatarcli.evaluation.coefficients import LandmarkFits
    from stages.eval import EvalConfig, run

    config = EvalConfig(metrics=("psnr", "akd", "aed", "apd"), models_dir=str(models_dir), device="cpu",
                        face_model=str(assets / ICT), fit_iters=3)
    whole = run(config, talking["gen"], talking["ref"], tmp_path / "whole.h5")
    assert (whole.units_now, whole.reused) == (2, 0)
    fit, batches = LandmarkFits._fit, []

    def stop_at_second_batch(self, clips):
        batches.append([c.name for c in clips])
        if len(batches) == 2:
            raise KeyboardInterrupt
        fit(self, clips)

    monkeypatch.setattr(LandmarkFits, "_fit", stop_at_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run(dataclasses.replace(config, fit_batch_frames=24), talking["gen"], talking["ref"], tmp_path / "cut.h5")
    monkeypatch.setattr(LandmarkFits, "_fit", fit)
    assert [[name.split(":")[0] for name in batch] for batch in batches] == [["gen", "ref"]] * 2
    parts = tmp_path / "cut.h5.parts"
    assert len(list(parts.glob("*.npz"))) == 1 and not (tmp_path / "cut.h5").exists()
    resumed = run(config, talking["gen"], talking["ref"], tmp_path / "cut.h5")
    assert (resumed.units, resumed.reused, resumed.units_now, resumed.frames_now) == (2, 1, 1, 12)
    assert not parts.exists()
    with h5py.File(tmp_path / "whole.h5", "r") as a, h5py.File(tmp_path / "cut.h5", "r") as b:
        for group in ("index", "eval/obama", "eval/kristi"):
            for name, data in a[group].items():
                np.testing.assert_array_equal(data[()], b[group][name][()], err_msg=f"{group}/{name}")
        assert a.attrs["summary_json"] == b.attrs["summary_json"]


def test_resumed_eval_fits_clips_in_the_uninterrupted_runs_batches(talking, models_dir, assets, tmp_path, monkeypatch):
    """A resumed run plans its fit batches over every pair, finished ones included, and refits a batch
    holding clips of finished and unfinished pairs: each clip is fitted in the batch it has in an
    uninterrupted run. Here (three 12-frame clips per batch) the interrupted run keeps pair 0, whose
    clips share the first batch with pair 1's generated clip; fitting only the remaining clips would
    leave pair 2's reference alone in a batch of one, which rounds differently."""
    import h5py

    from avatarcli.evaluation.coefficients import LandmarkFits
    from avatarcli.stage import unit_key
    from stages.eval import EvalConfig, run

    a, b, noisy = talking["a"], talking["b"], talking["noisy"]
    ref = write_clips(tmp_path / "ref3.h5", {"p0": a, "p1": b, "p2": a[::-1].copy()})
    gen = write_clips(tmp_path / "gen3.h5", {"p0": noisy, "p1": b[::-1].copy(), "p2": noisy[::-1].copy()})
    config = EvalConfig(metrics=("psnr", "aed", "apd"), models_dir=str(models_dir), device="cpu",
                        face_model=str(assets / ICT), fit_iters=3, fit_batch_frames=36)
    names = {unit_key(p, p, ""): p for p in ("p0", "p1", "p2")}
    fit, batches = LandmarkFits._fit, []

    def recorded(stop_at: int | None):
        def fit_and_record(self, clips):
            batches.append([f"{c.name.split(':')[0]}:{names[c.name.split(':')[1]]}" for c in clips])
            if len(batches) == stop_at:
                raise KeyboardInterrupt
            fit(self, clips)
        monkeypatch.setattr(LandmarkFits, "_fit", fit_and_record)

    recorded(None)
    run(config, gen, ref, tmp_path / "whole.h5")
    expected = [["gen:p0", "ref:p0", "gen:p1"], ["ref:p1", "gen:p2", "ref:p2"]]
    assert batches == expected
    batches.clear()
    recorded(2)
    with pytest.raises(KeyboardInterrupt):
        run(config, gen, ref, tmp_path / "cut.h5")
    assert len(list((tmp_path / "cut.h5.parts").glob("*.npz"))) == 1  # pair 0
    batches.clear()
    recorded(None)
    resumed = run(config, gen, ref, tmp_path / "cut.h5")
    assert (resumed.units, resumed.reused, resumed.units_now) == (3, 1, 2)
    assert batches == expected  # pair 0's clips refitted with pair 1's generated clip
    with h5py.File(tmp_path / "whole.h5", "r") as whole, h5py.File(tmp_path / "cut.h5", "r") as cut:
        datasets = []
        whole.visititems(lambda name, item: datasets.append(name) if isinstance(item, h5py.Dataset) else None)
        assert "eval/p2/values" in datasets
        for name in datasets:
            np.testing.assert_array_equal(whole[name][()], cut[name][()], err_msg=name)  # nan == nan
        assert whole.attrs["summary_json"] == cut.attrs["summary_json"]


@pytest.mark.gpu
def test_cuda_matches_cpu(talking, models_dir, assets, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from stages.eval import EvalConfig, run

    results = {}
    for device in ("cpu", "cuda"):
        config = EvalConfig(models_dir=str(models_dir), device=device, face_model=str(assets / ICT))
        results[device] = run(config, talking["gen"], talking["ref"], tmp_path / f"{device}.h5").details["metrics"]
    for metric, tolerance in (("psnr", 1e-6), ("ssim", 1e-5), ("csim", 2e-3), ("akd", 0.05), ("aed", 5e-3), ("apd", 5e-3)):
        cpu, cuda = results["cpu"][metric], results["cuda"][metric]
        assert cpu["frames"] == cuda["frames"], metric
        assert abs(cpu["mean"] - cuda["mean"]) <= tolerance * max(1.0, abs(cpu["mean"])), (metric, cpu["mean"], cuda["mean"])
