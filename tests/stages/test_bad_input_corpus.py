"""The bad-input corpus (tests/bad_inputs.py): every case ends as documented, in one run, and
broken artifacts give their one-line error."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests.bad_inputs import ARTIFACT_OUTCOMES, VIDEO_OUTCOMES, make_artifact_corpus, make_video_corpus
from tests.conftest import REPO

ICT = "3dmm/ict_facekit/ict_face_light_f16.npz"
FACE_VIDEO = "data/sadtalker_hdtf/WDA_AlexandriaOcasioCortez_000.mp4"


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "avatarcli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ), timeout=timeout)


@pytest.fixture(scope="module")
def corpus_run(assets, models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = make_video_corpus(root / "videos", assets / FACE_VIDEO)
    out = root / "clips.h5"
    result = cli("--device", "cpu", "preprocess", *files.values(), "-o", out, "--models", models_dir)
    return files, out, result


@pytest.mark.slow
def test_every_video_case_ends_as_documented(corpus_run):
    files, out, result = corpus_run
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(out)
    assert "Traceback" not in result.stderr
    with h5py.File(out, "r") as handle:
        paths = [p.decode() if isinstance(p, bytes) else p for p in handle["sources/path"][()]]
        status = [s.decode() if isinstance(s, bytes) else s for s in handle["sources/status"][()]]
        reasons = [r.decode() if isinstance(r, bytes) else r for r in handle["sources/reason"][()]]
        clips = handle["sources/num_clips"][()]
        by_name = {os.path.basename(p): (s, r, int(n)) for p, s, r, n in zip(paths, status, reasons, clips)}
        frames = {handle["clips"][c].attrs["source_path"].split("/")[-1]: handle["clips"][c]["frames"].shape
                  for c in handle["clips"]}
    assert set(by_name) == set(VIDEO_OUTCOMES)
    for name, (expected, text) in VIDEO_OUTCOMES.items():
        got, reason, count = by_name[name]
        assert got == expected, (name, got, reason)
        assert text in reason, (name, reason)
        assert (count >= 1) == (expected == "ok"), (name, count)
    # resampled to 25 fps whatever the source rate: 40 frames at 15 fps last 2.67 s, 80 at 60 fps 1.33 s
    assert abs(frames["fps15.mp4"][0] - round(40 / 15 * 25)) <= 1
    assert abs(frames["fps60.mp4"][0] - round(80 / 60 * 25)) <= 1
    assert frames["gray.mp4"][1:] == frames["portrait.mp4"][1:] == (256, 256, 3)


@pytest.mark.slow
def test_rotated_and_variable_rate_clips_come_out_upright_and_on_time(corpus_run):
    files, out, _ = corpus_run
    from avatarcli.video import mp4_rotation

    assert mp4_rotation(str(files["rotated.mp4"])) == 90
    with h5py.File(out, "r") as handle:
        for clip in handle["clips"].values():
            name = clip.attrs["source_path"].split("/")[-1]
            if name == "vfr.mp4":
                stamps = clip["timestamps"][()]
                np.testing.assert_allclose(np.diff(stamps), 0.04, atol=1e-6)  # 25 fps by timestamp
                # 20 gaps of 40 ms and 19 of 80 ms: the last frame is shown at 2.32 s -> ~59 frames at 25 fps
                assert abs(len(stamps) - 59) <= 2, len(stamps)
            if name in ("rotated.mp4", "fps15.mp4"):
                lmk = clip["lmk68"][()]
                # upright: eyes (36-47) above the mouth (48-67) in the crop
                assert (lmk[:, 36:48, 1].mean(1) < lmk[:, 48:68, 1].mean(1)).all(), name


def test_broken_artifacts_give_one_line_errors(assets, tmp_path):
    ict = assets / ICT
    clips, coeffs = tmp_path / "c.h5", tmp_path / "f.h5"
    assert cli("--device", "cpu", "synth", "-o", clips, "--clips", "1", "--frames", "3", "--size", "32",
               "--face-model", ict).returncode == 0
    assert cli("--device", "cpu", "fit-3dmm", clips, "-o", coeffs, "--landmarks-only", "--face-model", ict).returncode == 0
    for name, path in make_artifact_corpus(tmp_path / "bad", clips, coeffs).items():
        result = cli("--device", "cpu", "fit-3dmm", path, "-o", tmp_path / f"{name}.out.h5", "--face-model", ict)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, (name, result.stderr)
        assert ARTIFACT_OUTCOMES[name] in lines[0], (name, lines[0])
        assert not (tmp_path / f"{name}.out.h5").exists()


def test_unwritable_and_input_outputs_are_refused(assets, tmp_path):
    ict = assets / ICT
    clips = tmp_path / "c.h5"
    assert cli("--device", "cpu", "synth", "-o", clips, "--clips", "1", "--frames", "3", "--size", "32",
               "--face-model", ict).returncode == 0
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = cli("--device", "cpu", "fit-3dmm", clips, "-o", blocker / "out.h5", "--face-model", ict)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    before = clips.read_bytes()
    result = cli("merge", clips, "-o", clips, "--overwrite")
    assert result.returncode == 2 and clips.read_bytes() == before
