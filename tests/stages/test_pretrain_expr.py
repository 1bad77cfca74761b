"""avatar pretrain-expr: CLeBS model, loss, basis editing, probes, inputs, SIGKILL resume, torchrun DDP, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.stages.trainer_runs import kill_after_checkpoint, launcher  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
IDENTITY_RULE = r"regex:(person\d)"
# Threads fixed for every subprocess: CPU kernels are deterministic for a given thread count.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TINY = ["--width", "4", "--image-size", "32", "--negatives", "5", "--batch-clips", "2", "--latent-dim", "8",
        "--basis-size", "3", "--hidden", "16", "--norm", "group", "--lr", "1e-3", "--log-every", "1",
        "--device", "cpu", "--identity-from", IDENTITY_RULE, "--plot", "none", "--no-probes"]


def make_deep3d_set(root: Path, identities=3, clips_per_identity=2, frames=40, size=64, seed=0) -> Path:
    """Square 30-fps videos with Deep3DFaceRecon-style coefficient files two rows shorter than the
    video. β = an identity-specific offset (the appearance leak) + mouth and eye signals, which the
    frames show as bar heights on an identity-coloured background."""
    import cv2
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    (root / "video").mkdir(parents=True, exist_ok=True)
    (root / "3dmm").mkdir(parents=True, exist_ok=True)
    leak = rng.normal(0, 1.5, (identities, 64))
    for person in range(identities):
        colour = rng.integers(40, 200, 3)
        for clip in range(clips_per_identity):
            t = np.arange(frames) / 30.0
            mouth = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t + rng.uniform(0, 6))
            eyes = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 6))
            beta = leak[person] + rng.normal(0, 0.05, (frames, 64))
            beta[:, 0] += 2 * mouth
            beta[:, 1] += 2 * eyes
            name = f"person{person}_clip{clip}"
            writer = cv2.VideoWriter(str(root / "video" / f"{name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 30,
                                     (size, size))
            for k in range(frames):
                image = np.empty((size, size, 3), np.uint8)
                image[:] = colour
                h = int(2 + mouth[k] * size * 0.3)
                image[size - 4 - h: size - 4, size // 3: 2 * size // 3] = 255
                e = int(2 + eyes[k] * size * 0.2)
                image[6: 6 + e, 6:16] = 0
                image[6: 6 + e, size - 16: size - 6] = 0
                writer.write(image)
            writer.release()
            coeff = np.zeros((frames - 2, 257), np.float32)
            coeff[:, 80:144] = beta[: frames - 2]
            coeff[:, 224:227] = 0.05 * np.cumsum(rng.normal(size=(frames - 2, 3)), 0)  # head rotation, radians
            savemat(root / "3dmm" / f"{name}.mat", {"coeff": coeff})
    return root / "3dmm"


@pytest.fixture(scope="module")
def deep3d_set(tmp_path_factory) -> Path:
    return make_deep3d_set(tmp_path_factory.mktemp("deep3d"))


def cli_app():
    from avatarcli.cli.app import app

    return app


def encoder_weights(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        return handle["weights/flat"][()]


# ------------------------------------------------------------------------------------------------
# model, loss, editing


def test_basis_is_orthonormal_and_editing_scales_one_coefficient():
    from avatarcli.train.clebs import Clebs, ClebsShape, edit_expression

    torch.manual_seed(0)
    model = Clebs(ClebsShape(expr_dim=64, latent_dim=32, basis_size=6, hidden=16, width=4))
    encoder = model.expression_encoder
    basis = encoder.basis()
    torch.testing.assert_close(basis.T @ basis, torch.eye(6), atol=1e-5, rtol=0)
    beta = torch.randn(5, 64)
    prime = encoder(beta)
    lam = encoder.coefficients(beta)
    torch.testing.assert_close(prime @ basis, lam, atol=1e-5, rtol=1e-5)  # β′ lies in span(V), coords λ
    torch.testing.assert_close(edit_expression(encoder, beta, 2, 1.0), prime)
    removed = edit_expression(encoder, beta, 2, 0.0)
    assert (removed @ basis[:, 2]).abs().max() < 1e-5
    torch.testing.assert_close(removed @ basis[:, [0, 1, 3, 4, 5]], lam[:, [0, 1, 3, 4, 5]], atol=1e-5, rtol=1e-5)
    doubled = edit_expression(encoder, beta, 2, 2.0)
    torch.testing.assert_close(doubled @ basis[:, 2], 2 * lam[:, 2], atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError):
        edit_expression(encoder, beta, 6, 1.0)


def test_beta_noise_is_per_group_and_scaled_by_each_coefficients_std(deep3d_set):
    """Training noise on β depends only on (seed, step, group): a group gets the same numbers in a
    one-process batch and in one half of a two-process one; 0 leaves the bank's β untouched."""
    from avatarcli.train.clebs_data import ClipBank, load_expression_data
    from avatarcli.train.tasks.clebs import ClebsTask
    from stages.pretrain_expr import PretrainExprConfig

    data = load_expression_data([str(deep3d_set)], [], 32, with_frames=True)
    bank = ClipBank(data, 6, "cpu", "random")
    clean = ClebsTask(PretrainExprConfig(beta_noise=0.0, batch_clips=4, negatives=5), bank, data)
    noisy = ClebsTask(PretrainExprConfig(beta_noise=0.3, batch_clips=4, negatives=5), bank, data)
    _, beta = clean.batch(3, 0, 1, torch.device("cpu"))
    torch.testing.assert_close(beta, bank.batch(clean.config.engine.seed, 3, range(4))[1])
    _, whole = noisy.batch(3, 0, 1, torch.device("cpu"))
    _, half = noisy.batch(3, 1, 2, torch.device("cpu"))
    torch.testing.assert_close(half, whole[2:])
    scaled = (whole - beta) / (0.3 * noisy.beta_std)
    assert 0.8 < float(scaled.std()) < 1.2 and abs(float(scaled.mean())) < 0.1
    _, other_step = noisy.batch(4, 0, 1, torch.device("cpu"))
    assert not torch.allclose(other_step - clean.batch(4, 0, 1, torch.device("cpu"))[1], whole - beta)


def test_info_nce_rewards_aligned_pairs_and_images_flow_through_resnet_se18():
    from avatarcli.train.clebs import Clebs, ClebsShape, info_nce
    from avatarcli.train.nets import ResNetSE18

    torch.manual_seed(0)
    z = torch.randn(3, 9, 16)
    aligned, accuracy = info_nce(z, z + 0.01 * torch.randn_like(z))
    shuffled, _ = info_nce(z, z[:, torch.randperm(9)])
    assert accuracy == 1.0 and aligned < 0.1 < shuffled
    assert ResNetSE18(width=4)(torch.randn(2, 3, 64, 64)).shape == (2, 32)
    model = Clebs(ClebsShape(expr_dim=10, latent_dim=8, basis_size=3, hidden=8, width=4))
    zi, ze = model(torch.randn(2, 4, 3, 32, 32), torch.randn(2, 4, 10))
    assert zi.shape == ze.shape == (2, 4, 8)
    loss, _ = info_nce(zi, ze)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# probes


def test_probes_see_identity_where_it_is_and_chance_where_it_is_not():
    from avatarcli.train.probes import landmark_expression, ridge_r2, run_probes, temporal_split

    rng = np.random.default_rng(0)
    lengths = [60] * 8
    labels = np.repeat(np.arange(4), 120)  # 4 identities, 2 clips each
    expression = rng.normal(size=(480, 3))
    leaky = np.concatenate([expression, np.eye(4)[labels] * 3 + rng.normal(0, 0.3, (480, 4))], 1)
    clean = np.concatenate([expression, rng.normal(size=(480, 4))], 1)
    scores = run_probes(leaky, clean, lengths, labels, None, basis_size=3)
    assert scores.chance == 0.25
    assert scores.identity_beta > 0.95
    assert scores.identity_beta_prime < 0.5
    assert scores.beta_retention_beta_prime > 0.2  # clean keeps the expression columns of leaky
    split = temporal_split(lengths)
    assert not (split.train & split.test).any() and split.train.sum() == 8 * 42 and split.test.sum() == 8 * 15
    assert ridge_r2(expression, expression @ rng.normal(size=(3, 2)), split) > 0.99
    assert ridge_r2(rng.normal(size=(480, 3)), expression[:, :2], split) < 0.1
    # landmark measures: a wider inner-lip gap and wider eyes give larger ratios
    lmk = np.zeros((2, 68, 2))
    lmk[:, 60], lmk[:, 64] = (0, 0), (10, 0)
    lmk[:, 36], lmk[:, 39], lmk[:, 42], lmk[:, 45] = (0, 0), (4, 0), (8, 0), (12, 0)
    for frame, gap in enumerate((1.0, 4.0)):
        lmk[frame, 61:64, 1], lmk[frame, 65:68, 1] = -gap / 2, gap / 2
        lmk[frame, [37, 38, 43, 44], 1], lmk[frame, [40, 41, 46, 47], 1] = -gap / 4, gap / 4
    measures = landmark_expression(lmk)
    np.testing.assert_allclose(measures[:, 0], [0.1, 0.4])
    assert measures[1, 1] > measures[0, 1]


# ------------------------------------------------------------------------------------------------
# inputs


def test_deep3d_mats_with_videos_truncate_to_the_coefficients(deep3d_set, tmp_path):
    from avatarcli.errors import AvatarError
    from avatarcli.train.clebs_data import ClipBank, load_expression_data

    data = load_expression_data([str(deep3d_set)], [], 32, IDENTITY_RULE)
    assert data.input_kind == "deep3d-video" and len(data.clips) == 6
    assert {c.identity for c in data.clips} == {"person0", "person1", "person2"}
    clip = data.clips[0]
    assert clip.beta.shape == (38, 64) and clip.frames.shape == (38, 32, 32, 3)  # 40 frames, 38 rows
    assert len(data.parents) == 12  # every .mat and video with its hash
    bank = ClipBank(data, group_size=6)
    images, beta = bank.batch(seed=0, step=3, groups=range(4))
    again_images, again_beta = bank.batch(seed=0, step=3, groups=range(2, 4))
    assert images.shape == (4, 6, 3, 32, 32) and beta.shape == (4, 6, 64)
    assert torch.equal(beta[2:], again_beta) and torch.equal(images[2:], again_images)  # a function of (seed, step, group)
    assert not torch.equal(bank.batch(seed=0, step=4, groups=range(4))[1], beta)
    for group in beta:  # distinct frames of one clip
        assert len({tuple(row.tolist()) for row in group}) == 6
    # pose-matched groups: the anchor and the frames of its clip nearest to it in head pose
    index = bank.group_indices(seed=0, step=3, group=1)
    clip = int(np.searchsorted(bank.offsets, index[0], side="right") - 1)
    pose = bank.pose[clip]
    local = index - bank.offsets[clip]
    distance = np.linalg.norm(pose - pose[local[0]], axis=1)
    outside = np.setdiff1d(np.arange(len(pose)), local)
    assert distance[local].max() <= distance[outside].min()
    random_bank = ClipBank(data, group_size=6, negatives_from="random")
    assert random_bank.pose is None and len(set(random_bank.group_indices(0, 3, 1))) == 6
    (tmp_path / "3dmm").mkdir()
    (tmp_path / "3dmm" / "lonely.mat").write_bytes((deep3d_set / "person0_clip0.mat").read_bytes())
    with pytest.raises(AvatarError, match="no usable clips.*no video lonely.mp4"):
        load_expression_data([str(tmp_path / "3dmm")], [], 32)
    with pytest.raises(AvatarError, match="--coeffs goes with a clips artifact"):
        load_expression_data([str(deep3d_set)], ["x.h5"], 32)


@pytest.fixture(scope="module")
def real_clips(assets, models_dir, tmp_path_factory):
    from stages.preprocess import PreprocessConfig, run

    out = tmp_path_factory.mktemp("clips") / "clips.h5"
    video = assets / "data/styletalk/style/video/furious_talk2_clip1.mp4"
    run(PreprocessConfig(device="cpu", models_dir=str(models_dir), lmk_every=1), [str(video)], out)
    return out


@pytest.fixture(scope="module")
def real_coeffs(real_clips, assets, tmp_path_factory):
    """A landmark-only fit-3dmm coeffs artifact of ``real_clips`` (ICT)."""
    from stages.fit3dmm import Fit3dmmConfig, run as fit

    out = tmp_path_factory.mktemp("coeffs") / "coeffs.h5"
    fit(Fit3dmmConfig(face_model=str(assets / "3dmm/ict_facekit/ict_face_light_f16.npz"), landmarks_only=True,
                      device="cpu", rigid_iters=10, iters=15), real_clips, out)
    return out


def test_clips_artifact_with_deep3d_mats_or_a_coeffs_artifact(real_clips, real_coeffs, assets, tmp_path):
    from scipy.io import loadmat

    from stages.pretrain_expr import PretrainExprConfig, run
    from avatarcli.artifact import open_artifact
    from avatarcli.train.clebs_data import load_expression_data
    from avatarcli.train.engine import EngineConfig

    mats = assets / "data/styletalk/style/3dmm"
    data = load_expression_data([str(real_clips)], [str(mats)], 48)
    assert data.input_kind == "clips+deep3d" and len(data.clips) == 1
    coeff = loadmat(str(mats / "furious_talk2_clip1.mat"))["coeff"]
    with h5py.File(real_clips) as handle:
        group = handle["clips"][data.clips[0].clip_id]
        source_frame = group["source_frame"][()]
    keep = source_frame < len(coeff)
    assert keep.sum() == len(data.clips[0].beta)  # frames past the end of the .mat are dropped
    np.testing.assert_array_equal(data.clips[0].beta, coeff[source_frame[keep], 80:144])
    assert data.clips[0].lmk68.shape == (keep.sum(), 68, 2)
    np.testing.assert_array_equal(data.clips[0].pose, coeff[source_frame[keep], 224:227])

    config = PretrainExprConfig(width=4, image_size=32, negatives=5, batch_clips=2, latent_dim=8, basis_size=3,
                                hidden=8, plot="none", device="cpu",
                                engine=EngineConfig(steps=2, tensorboard=False, log_every=1))
    summary = run(config, [str(real_clips)], tmp_path / "enc.h5", [str(real_coeffs)])
    assert summary.units == 1 and summary.unit == "clip" and summary.details["steps"] == 2
    assert summary.columns["steps"] == 2 and summary.columns["run now"] == 2
    probes = {name: (on_beta, on_prime) for name, on_beta, on_prime, _ in summary.details["probes"]}
    assert np.isfinite(probes["expression_r2_landmarks"]).all()
    assert np.isfinite(probes["pose_r2"][0])  # fit-3dmm's rotation is the pose of the coeffs path
    with open_artifact(tmp_path / "enc.h5", "encoder") as handle:
        assert handle.attrs["input_kind"] == "coeffs" and handle.attrs["expr_dim"] == 53  # ICT expressions
        assert np.isnan(handle.attrs["probe_identity_acc_beta"])  # one identity: no identity probe


def test_non_finite_beta_is_an_error_before_training(launcher, real_clips, real_coeffs, deep3d_set, tmp_path):
    """NaN β in a coeffs artifact: exit 2 with one line naming the clip and the first bad frame, no encoder."""
    import shutil

    coeffs = tmp_path / "nan.h5"
    shutil.copy(real_coeffs, coeffs)
    with h5py.File(coeffs, "r+") as handle:
        clip = list(handle["coeffs"])[0]
        expression = handle["coeffs"][clip]["expression"]
        beta = expression[()]
        beta[[7, 12], 3] = np.nan
        expression[...] = beta
    out = tmp_path / "enc.h5"
    args = [a for a in TINY if a not in ("--identity-from", IDENTITY_RULE)]
    done = subprocess.run([sys.executable, str(launcher), "pretrain-expr", str(real_clips), "--coeffs", str(coeffs),
                           "-o", str(out), "--steps", "2", *args], env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and done.stdout == "", done.stderr
    assert f"clip {clip!r} has NaN or inf expression coefficients (β) at frame 7 (2 of" in lines[0]
    assert "Traceback" not in done.stderr and not out.exists()
    assert not Path(str(out) + ".run").joinpath("checkpoints").exists()  # no training step ran
    # Deep3DFaceRecon files with NaN are rejected when read
    from scipy.io import loadmat, savemat

    from avatarcli.errors import AvatarError
    from avatarcli.train.clebs_data import load_expression_data

    for folder in ("3dmm", "video"):
        (tmp_path / "d3d" / folder).mkdir(parents=True)
    coeff = loadmat(str(deep3d_set / "person0_clip0.mat"))["coeff"]
    coeff[5, 90] = np.nan
    savemat(tmp_path / "d3d/3dmm/person0_clip0.mat", {"coeff": coeff})
    shutil.copy(deep3d_set.parent / "video/person0_clip0.mp4", tmp_path / "d3d/video")
    with pytest.raises(AvatarError, match="person0_clip0.mat: .*NaN or infinite"):
        load_expression_data([str(tmp_path / "d3d/3dmm")], [], 32)


# ------------------------------------------------------------------------------------------------
# the command: resume after SIGKILL, DDP under torchrun, pipes, info


def command(launcher: Path, deep3d_set: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(launcher), "pretrain-expr", str(deep3d_set), "-o", str(out), "--steps", str(steps),
            *TINY, *extra]


@pytest.fixture(scope="module")
def reference_run(launcher, deep3d_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "enc.h5"
    done = subprocess.run(command(launcher, deep3d_set, out, 30, "--checkpoint-every", "5"), env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out)
    return out


def test_sigkill_then_the_same_command_resumes_and_ends_with_the_same_weights(launcher, deep3d_set, reference_run,
                                                                              tmp_path):
    out = tmp_path / "enc.h5"
    argv = command(launcher, deep3d_set, out, 30, "--checkpoint-every", "5")
    killed_at = kill_after_checkpoint(argv, SUBPROCESS_ENV, out, 10)
    assert 10 <= killed_at < 30
    done = subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with h5py.File(out) as handle:
        assert handle.attrs["steps"] == 30
    np.testing.assert_array_equal(encoder_weights(out), encoder_weights(reference_run))


def test_two_process_ddp_under_torchrun_matches_one_process(launcher, deep3d_set, reference_run, tmp_path):
    out = tmp_path / "ddp.h5"
    steps = 6
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(launcher),
            "pretrain-expr", str(deep3d_set), "-o", str(out), "--steps", str(steps), *TINY]
    done = subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == [str(out)]  # only rank 0 prints
    single = tmp_path / "single.h5"
    done = subprocess.run(command(launcher, deep3d_set, single, steps), env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with h5py.File(out) as a, h5py.File(single) as b:
        assert a.attrs["world_size"] == 2 and b.attrs["world_size"] == 1
        loss_ddp, loss_single = a["training/loss"][()], b["training/loss"][()]
    # step 1 starts from the same weights: the mean of the two halves is the loss of the whole batch
    np.testing.assert_allclose(loss_ddp[0], loss_single[0], rtol=1e-5)
    # later steps agree up to Adam's amplification of reduction-order rounding in near-zero gradients
    np.testing.assert_allclose(loss_ddp, loss_single, rtol=5e-3)
    np.testing.assert_allclose(encoder_weights(out), encoder_weights(single), atol=2 * 1e-3 * steps)


def test_cli_reads_stdin_writes_embeddings_plot_and_info(deep3d_set, tmp_path):
    from typer.testing import CliRunner

    from avatarcli.artifact import open_artifact
    from avatarcli.train.clebs import load_encoder

    app = cli_app()
    out, emb, png = tmp_path / "enc.h5", tmp_path / "emb.h5", tmp_path / "plot.png"
    args = [a for a in TINY if a not in ("--plot", "none", "--no-probes")]
    result = CliRunner().invoke(app, ["--seed", "5", "pretrain-expr", "-", "-o", str(out), "--steps", "3", *args,
                                      "--export-embeddings", str(emb), "--plot", str(png), "--no-tensorboard"],
                                input=f"{deep3d_set}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert f"embedding plot: {png}" in result.stderr and f"embeddings: {emb}" in result.stderr
    assert "probes (held-out frames)" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0 and '"kind": "encoder"' in info.output
    assert '"probe_identity_acc_beta_prime"' in info.output and '"probe_identity_chance": 0.333' in info.output
    encoder = load_encoder(out)
    with open_artifact(emb, "expr_embeddings", deep=True) as handle:
        name = list(handle["clips"])[0]
        beta = torch.from_numpy(handle["clips"][name]["beta"][()])
        torch.testing.assert_close(encoder.encode(beta), torch.from_numpy(handle["clips"][name]["beta_prime"][()]))
        assert handle["clips"][name]["lambda"].shape == (38, 3)
    with open_artifact(out, "encoder") as handle:
        np.testing.assert_allclose(handle["basis"][()], encoder.expression_encoder.basis().numpy(), atol=1e-6)
        assert handle["training/step"][()].tolist() == [1, 2, 3]
        config_json = json.loads(handle.attrs["config_json"])
    # the global --seed is the stage's seed and the engine's; the run folder defaults to <output>.run
    assert config_json["seed"] == 5 and config_json["engine"]["seed"] == 5
    assert config_json["engine"]["run_dir"] == str(out) + ".run" and config_json["engine"]["steps"] == 3
    from avatarcli.errors import AvatarError

    bad = CliRunner().invoke(app, ["pretrain-expr", str(tmp_path / "missing"), "-o", str(out)])
    assert isinstance(bad.exception, AvatarError) and "missing: no such file or folder" in str(bad.exception)


def test_sigint_saves_a_checkpoint_and_exits_130(launcher, deep3d_set, tmp_path):
    out = tmp_path / "enc.h5"
    process = subprocess.Popen(command(launcher, deep3d_set, out, 10**6, "--checkpoint-every", "5"),
                               env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = Path(str(out) + ".run") / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / "step_00000005.pt").exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "rerun the same command to resume" in stderr and stdout == "" and not out.exists()
    saved = max(int(p.stem.split("_")[1]) for p in checkpoints.glob("step_*.pt"))
    assert saved > 5  # the step it was at when interrupted, saved on the way out


def test_result_hash_follows_options_of_the_stage_and_its_engine():
    from avatarcli.errors import AvatarError
    from avatarcli.train.engine import EngineConfig
    from stages.pretrain_expr import PretrainExprConfig, PretrainExpr

    base = PretrainExprConfig().result_hash()
    for same in (PretrainExprConfig(engine=EngineConfig(log_every=1, checkpoint_every=7, tensorboard=False)),
                 PretrainExprConfig(run_dir="elsewhere", plot="none", device="cpu")):
        assert same.result_hash() == base
    for other in (PretrainExprConfig(engine=EngineConfig(steps=5)), PretrainExprConfig(engine=EngineConfig(accumulate=2)),
                  PretrainExprConfig(seed=1), PretrainExprConfig(lr=1e-3)):
        assert other.result_hash() != base
    engine = PretrainExprConfig(seed=4, device="cpu").engine_for(Path("x/enc.h5"))
    assert (engine.seed, engine.device, engine.run_dir) == (4, "cpu", "x/enc.h5.run")
    with pytest.raises(AvatarError, match="set seed on PretrainExprConfig"):
        PretrainExpr(PretrainExprConfig(engine=EngineConfig(seed=3)), ["x"], "enc.h5").check()
