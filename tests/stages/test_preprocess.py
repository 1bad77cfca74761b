"""`avatar preprocess` on real videos: acceptance, bad inputs, crash-resume, shards."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from avatarcli.artifact import open_artifact, read_strings
from tests.conftest import REPO

PY = sys.executable
STYLE = "data/styletalk/style/video"


def cli(*args, env=None, stdin=None, timeout=600):
    return subprocess.run([PY, "-m", "avatarcli", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          input=stdin, env={**os.environ, **(env or {})}, timeout=timeout)


def all_frames(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h:
        return {name: h["clips"][name]["frames"][()] for name in h["clips"]}


@pytest.fixture(scope="module")
def acceptance(assets, models_dir, tmp_path_factory):
    """The acceptance command, piped into `avatar info -` as a user would."""
    out = tmp_path_factory.mktemp("accept") / "clips.h5"
    command = (f"'{PY}' -m avatarcli preprocess '{assets}/data/liveportrait/source' '{assets}/data/video_retalking' "
               f"-o '{out}' --models '{models_dir}' | '{PY}' -m avatarcli info - --json")
    result = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_acceptance_pipe_into_info(acceptance):
    import json

    out, result = acceptance
    info = json.loads(result.stdout)
    assert info["kind"] == "clips" and info["path"] == str(out)
    assert info["counts"]["sources"] == 6 and info["counts"]["skipped"] == 0
    assert info["counts"]["clips"] >= 6 and info["counts"]["frames"] > 700
    assert info["provenance"]["num_parents"] == 6 and len(info["provenance"]["parents"][0]["sha256"]) == 64


def test_each_crop_is_its_source_frame_cut_at_its_stored_box(acceptance):
    """Frames land in their own slots: re-cropping the decoded source frames with the stored boxes
    gives the stored crops exactly (CPU path)."""
    import decord

    from avatarcli.face.crop import crop_batch

    out, _ = acceptance
    with open_artifact(out, "clips") as handle:
        for name in list(handle["clips"])[:3]:
            clip = handle["clips"][name]
            frames, boxes = clip["frames"][()], clip["boxes"][()]
            source = decord.VideoReader(str(clip.attrs["source_path"])).get_batch(list(clip["source_frame"][()])).asnumpy()
            int_boxes = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0]], 1).round().astype(np.int64)
            np.testing.assert_array_equal(crop_batch(torch.from_numpy(source), int_boxes, frames.shape[1]).numpy(), frames)


def test_every_clip_is_25fps_256(acceptance):
    out, _ = acceptance
    with open_artifact(out, "clips", deep=True) as h:
        assert h.attrs["fps"] == 25.0 and h.attrs["crop_size"] == 256
        for name in h["clips"]:
            clip = h["clips"][name]
            assert clip.attrs["fps"] == 25.0
            assert clip["frames"].shape[1:] == (256, 256, 3)
            np.testing.assert_allclose(np.diff(clip["timestamps"][()]), 0.04, atol=1e-9)
            # 30 fps sources are resampled: picked source frames advance by 1.2 on average
            if abs(clip.attrs["source_fps"] - 30) < 0.5:
                assert abs(np.diff(clip["source_frame"][()]).mean() - 1.2) < 0.05


def test_nose_is_centred(acceptance, models_dir):
    """Re-detect faces on the output crops: the nose within 8 px of the centre on >= 95% of frames."""
    from avatarcli.face.scrfd import SCRFD, detect

    out, _ = acceptance
    detector = SCRFD(models_dir / "face_detection" / "scrfd_2.5g_bnkps.onnx", "cpu")
    distances = []
    for frames in all_frames(out).values():
        for start in range(0, len(frames), 64):
            for det in detect(detector, torch.from_numpy(frames[start : start + 64]), 320, 0.25):
                if len(det.boxes) == 0:
                    distances.append(np.inf)
                    continue
                largest = int(((det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])).argmax())
                distances.append(float(np.linalg.norm(det.kps[largest, 2].numpy() - 128.0)))
    distances = np.asarray(distances)
    share = float((distances <= 8.0).mean())
    print(f"nose within 8 px on {share:.1%} of {len(distances)} frames; median {np.median(distances):.2f} px")
    assert share >= 0.95


def test_landmarks_are_in_crop_coordinates(acceptance):
    out, _ = acceptance
    with h5py.File(out, "r") as h:
        for name in h["clips"]:
            lmk = h["clips"][name]["lmk68"][()]
            kps = h["clips"][name]["kps5"][()]
            assert (np.abs(lmk[:, 30] - 128) < 20).mean() > 0.95  # the nose tip sits at the centre
            assert np.median(np.linalg.norm(lmk[:, 30] - kps[:, 2], axis=-1)) < 8


def _make_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()
    return path


@pytest.fixture(scope="module")
def bad_corpus(assets, tmp_path_factory):
    import decord

    root = tmp_path_factory.mktemp("bad")
    good = root / "good"
    good.mkdir()
    shutil.copy(assets / STYLE / "furious_talk2_clip1.mp4", good / "talk.mp4")
    data = (assets / "data/video_retalking/face5.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "zero.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None].repeat(96, 0).repeat(3, 2)
    _make_video(root / "noface.mp4", [np.roll(gradient, i, 1) for i in range(40)])
    face = decord.VideoReader(str(assets / STYLE / "spata_clip1.mp4"))[10].asnumpy()
    _make_video(root / "oneframe.mp4", [face])
    return root


EXPECTED_SKIPS = {
    "truncated.mp4": "not a readable video",
    "zero.mp4": "empty file (0 bytes)",
    "text.mp4": "not a readable video",
    "noface.mp4": "no face detected",
    "oneframe.mp4": "no usable face track of at least 25 frames (longest 1)",
}


def test_bad_inputs_are_recorded_not_crashed(bad_corpus, models_dir, tmp_path):
    out = tmp_path / "clips.h5"
    inputs = [bad_corpus / "good" / "talk.mp4", *(bad_corpus / name for name in EXPECTED_SKIPS)]
    result = cli("preprocess", *inputs, "-o", out, "--models", models_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(out)
    assert "Traceback" not in result.stderr
    with open_artifact(out, "clips", deep=True) as h:
        rows = dict(zip([Path(p).name for p in read_strings(h["sources/path"])],
                        zip(read_strings(h["sources/status"]), read_strings(h["sources/reason"]))))
        assert h["index/num_frames"].shape == (1,)
    assert rows["talk.mp4"][0] == "ok"
    for name, reason in EXPECTED_SKIPS.items():
        assert rows[name][0] == "skipped" and rows[name][1].startswith(reason), (name, rows[name])
    assert "skipped inputs" in result.stderr and "empty file (0 bytes)" in result.stderr
    assert not Path(str(out) + ".parts").exists()

    strict = cli("preprocess", *inputs, "-o", tmp_path / "strict.h5", "--models", models_dir, "--strict")
    assert strict.returncode == 1 and "--strict" in strict.stderr
    assert strict.stdout.strip() == ""  # a failed run prints no output path for the next stage


def test_nothing_usable_exits_nonzero_without_path(bad_corpus, models_dir, tmp_path):
    out = tmp_path / "none.h5"
    result = cli("preprocess", bad_corpus / "zero.mp4", bad_corpus / "text.mp4", "-o", out, "--models", models_dir)
    assert result.returncode == 1 and result.stdout == ""
    assert "no clips were produced" in result.stderr
    with open_artifact(out, "clips", deep=True) as h:  # the skips are still on record, validly
        assert read_strings(h["sources/status"]) == ["skipped", "skipped"]
        assert h["index/clip_id"].shape == (0,)


def test_missing_input_and_bad_options_are_one_line_errors(tmp_path, models_dir):
    result = cli("preprocess", tmp_path / "nope.mp4", "-o", tmp_path / "x.h5", "--models", models_dir)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: input not found")
    result = cli("preprocess", tmp_path, "-o", tmp_path / "x.h5", "--identity-from", "regex:(")
    assert result.returncode == 2 and "bad regular expression" in result.stderr
    result = cli("preprocess", tmp_path, "-o", tmp_path / "x.h5", "--shard", "3/2")
    assert result.returncode == 2 and "--shard" in result.stderr
    result = cli("preprocess", tmp_path, "-o", tmp_path / "x.h5", "--det-size", "100")
    assert result.returncode == 2 and "--det-size" in result.stderr


def test_old_landmarker_flag_still_names_the_landmark_model(assets, tmp_path, models_dir):
    """--landmark-model is the common spelling; the shipped --landmarker is a hidden alias of it."""
    video = assets / STYLE / "furious_talk2_clip3.mp4"
    for flag in ("--landmark-model", "--landmarker"):
        result = cli("preprocess", video, "-o", tmp_path / "x.h5", "--models", models_dir, flag, "no_such_model")
        assert result.returncode == 2 and "unknown model 'no_such_model'" in result.stderr and "Traceback" not in result.stderr
    assert "--landmarker" not in cli("preprocess", "--help", env={"COLUMNS": "200"}).stdout


def test_face_analysis_wraps_the_networks_unchanged(assets, models_dir):
    """FaceAnalysis gives exactly what the detector and landmark networks give, the best face on the
    device equals the first detection, and the converted networks are built once per process."""
    import decord

    from avatarcli.face.analysis import FaceAnalysis
    from avatarcli.face.landmarks import PFLD68
    from avatarcli.face.scrfd import SCRFD, detect

    frames = torch.from_numpy(decord.VideoReader(str(assets / STYLE / "spata_clip1.mp4")).get_batch([0, 5, 10]).asnumpy())
    frames = torch.cat([frames, torch.zeros_like(frames[:1])])  # and a frame without a face
    faces = FaceAnalysis.load("scrfd_2.5g", "pfld68", str(models_dir), "cpu")
    assert faces.det_size == 320 and faces.detector_path.name == "scrfd_2.5g_bnkps.onnx"
    again = FaceAnalysis.load("scrfd_2.5g", "pfld68", str(models_dir), "cpu", det_size=640, det_threshold=0.6)
    assert again.detector is faces.detector and again.landmarker is faces.landmarker and again.det_size == 640

    found = faces.detect(frames)
    expected = detect(SCRFD(faces.detector_path, "cpu"), frames, 320, 0.25, 0.5)
    assert [len(d.scores) for d in found] == [len(d.scores) for d in expected] == [1, 1, 1, 0]
    for a, b in zip(found, expected):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.kps, b.kps) and torch.equal(a.scores, b.scores)
    boxes = torch.stack([d.boxes[0] for d in found[:3]]).numpy()
    lmk = faces.landmarks(frames[:3], boxes)
    np.testing.assert_array_equal(lmk, PFLD68(faces.landmark_path, "cpu")(frames[:3], boxes))

    analysed = faces.analyse(frames)
    assert analysed["found"].tolist() == [True, True, True, False] and analysed["embeddings"] is None
    np.testing.assert_allclose(analysed["kps5"][:3].numpy(), np.stack([d.kps[0].numpy() for d in found[:3]]), atol=1e-4)
    np.testing.assert_allclose(analysed["lmk68"][:3].numpy(), lmk, atol=1e-2)
    aligned = faces.align(frames[:3], analysed["kps5"][:3])
    assert aligned.shape == (3, 3, 112, 112) and aligned.dtype == torch.float32
    with pytest.raises(ValueError, match="recognition"):
        faces.embed(frames[:3], analysed["kps5"][:3])


@pytest.fixture(scope="module")
def two_clips(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    for identity, name in (("alice", "furious_talk2_clip2.mp4"), ("bob", "spata_clip1.mp4"), ("bob", "furious_talk2_clip4.mp4")):
        (root / identity).mkdir(exist_ok=True)
        shutil.copy(assets / STYLE / name, root / identity / name)
    return root


@pytest.fixture(scope="module")
def reference_run(two_clips, models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "clips.h5"
    result = cli("preprocess", two_clips, "-o", out, "--models", models_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_identity_table(reference_run):
    with h5py.File(reference_run, "r") as h:
        assert read_strings(h["identities/name"]) == ["alice", "bob"]
        ids = h["index/identity_id"][()]
        names = read_strings(h["index/clip_id"])
        for name, identity in zip(names, ids):
            assert h["clips"][name].attrs["identity_id"] == identity
        assert sorted(ids.tolist()) == [0, 1, 1]


def test_sigkill_then_rerun_equals_uninterrupted(two_clips, models_dir, reference_run, tmp_path):
    out = tmp_path / "clips.h5"
    parts = Path(str(out) + ".parts")
    args = [PY, "-m", "avatarcli", "preprocess", str(two_clips), "-o", str(out), "--models", str(models_dir)]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(parts.glob("*.h5")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists(), "a killed run must not leave a valid-looking artifact"
    assert len(list(parts.glob("*.h5"))) >= 1

    result = cli("preprocess", two_clips, "-o", out, "--models", models_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not parts.exists()
    expected, actual = all_frames(reference_run), all_frames(out)
    assert sorted(expected) == sorted(actual)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


def test_rerun_adds_missing_inputs_and_keeps_finished(two_clips, models_dir, reference_run, tmp_path):
    from stages.preprocess import PreprocessConfig, run

    out = tmp_path / "clips.h5"
    first = cli("preprocess", two_clips / "alice", "-o", out, "--models", models_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run(PreprocessConfig(models_dir=str(models_dir)), [str(two_clips)], out)
    assert (second.units, second.units_now, second.reused) == (3, 2, 1)  # alice's source kept, not redone
    assert second.columns == {"clips": 3, "identities": 2} and second.produced and not second.details
    with h5py.File(out, "r") as h:
        assert second.frames == int(h["index/num_frames"][()].sum()) > second.frames_now > 0
    expected, actual = all_frames(reference_run), all_frames(out)
    assert sorted(expected) == sorted(actual)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])
    different = cli("preprocess", two_clips, "-o", out, "--models", models_dir, "--crop-size", "128")
    assert different.returncode == 2 and "other settings" in different.stderr


@pytest.mark.parametrize("virtual", [False, True])
def test_shards_merge_to_the_full_run(two_clips, models_dir, reference_run, tmp_path, virtual):
    shards = []
    for k in range(2):
        shard = tmp_path / f"shard{k}.h5"
        result = cli("preprocess", two_clips, "-o", shard, "--models", models_dir, "--shard", f"{k}/2")
        assert result.returncode == 0, result.stderr[-2000:]
        shards.append(shard)
    merged = tmp_path / "merged.h5"
    result = cli("merge", *shards, "-o", merged, *(["--virtual"] if virtual else []))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(merged)
    expected, actual = all_frames(reference_run), all_frames(merged)
    assert sorted(expected) == sorted(actual)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])
    with open_artifact(merged, "clips", deep=True) as h:
        assert read_strings(h["identities/name"]) == ["alice", "bob"]
        for name, identity in zip(read_strings(h["index/clip_id"]), h["index/identity_id"][()]):
            assert h["clips"][name].attrs["identity"] == ["alice", "bob"][identity]


def _synthetic_result(path: str, segments: int, frames: int = 3, status: str = "ok"):
    from avatarcli.preprocess.source import ClipResult, SourceResult

    rng = np.random.default_rng(zlib.crc32(path.encode()))
    clips = [ClipResult(
        segment=k, frames=rng.integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8),
        boxes=np.zeros((frames, 4), np.float32), kps5=np.zeros((frames, 5, 2), np.float32),
        lmk68=np.zeros((frames, 68, 2), np.float32), det_score=np.ones(frames, np.float32),
        detected=np.ones(frames, bool), landmarked=np.ones(frames, bool),
        timestamps=np.arange(frames, dtype=np.float64), source_frame=np.arange(frames, dtype=np.int64),
    ) for k in range(segments)] if status == "ok" else []
    return SourceResult(path=path, status=status, reason="" if status == "ok" else "no face detected",
                        sha256=f"{zlib.crc32(path.encode()):064x}", source_fps=25.0, width=16, height=16, frames_in=frames,
                        clips=clips)


def test_assembler_copies_in_source_order_whatever_the_finish_order(tmp_path):
    """Units offered out of order (several GPU streams, two writers) land in source order; a
    failure inside the assembler leaves no output, only the parts."""
    from avatarcli.artifact import FrameWriter
    from avatarcli.clips import ClipsAssembler
    from avatarcli.preprocess.parts import clip_name, read_part, write_part
    from avatarcli.stage import PartsStore
    from stages.preprocess import PreprocessConfig

    config = PreprocessConfig(crop_size=16, identity_from="stem")
    sources = [f"/videos/{name}.mp4" for name in ("b", "a", "c", "d")]
    writer = FrameWriter(1)
    results = {p: _synthetic_result(p, segments, status="ok" if segments else "skipped")
               for p, segments in zip(sources, (2, 1, 0, 1))}
    units = {}
    with PartsStore(tmp_path / "run.h5", {"stage": "preprocess", "result_hash": config.result_hash()}) as store:
        for path, result in results.items():
            units[path] = write_part(store, result, config, writer)
            assert units[path] == read_part(units[path].file)  # what a resumed run reads back
            assert units[path].clip_names == sorted(clip_name(path, c.segment) for c in result.clips)
    writer.close()
    parts = store.folder
    output = tmp_path / "clips.h5"
    with ClipsAssembler(output, sources, config) as assembler:
        for path in reversed(sources):
            assembler.offer(units[path])
        counts = assembler.finish(units)
    assert counts == {"clips": 4, "frames": 12, "identities": 3}
    with open_artifact(output, "clips") as handle:
        clip_ids = read_strings(handle["index/clip_id"])
        assert clip_ids == [n for p in sources for n in units[p].clip_names] == list(handle["clips"].keys())
        assert handle["index/source_id"][()].tolist() == [0, 0, 1, 3]
        assert read_strings(handle["identities/name"]) == ["a", "b", "d"]
        assert handle["index/identity_id"][()].tolist() == [1, 1, 0, 2]
        for k, name in enumerate(clip_ids):
            source = results[sources[handle["index/source_id"][k]]]
            segment = int(name.rsplit("-", 1)[1])
            np.testing.assert_array_equal(handle["clips"][name]["frames"][()], source.clips[segment].frames)
            assert handle["clips"][name].attrs["identity_id"] == handle["index/identity_id"][k]

    failed = tmp_path / "failed.h5"
    with pytest.raises(RuntimeError):
        with ClipsAssembler(failed, sources, config) as assembler:
            assembler.offer(units[sources[0]])
            raise RuntimeError("crash mid-run")
    assert not failed.exists() and not list(tmp_path.glob(".failed.h5.*"))
    assert len(list(parts.glob("*.h5"))) == 4


# ------------------------------------------------------------------------------------------------
# issue 16: hardening


def _sources_table(path) -> dict[str, tuple[str, str, str]]:
    with open_artifact(path, "clips", deep=True) as h:
        return {Path(p).name: row for p, *row in zip(read_strings(h["sources/path"]), read_strings(h["sources/sha256"]),
                                                     read_strings(h["sources/status"]), read_strings(h["sources/reason"]))}


def test_output_that_is_an_input_is_refused_even_with_overwrite(assets, tmp_path, models_dir):
    video = tmp_path / "talk.mp4"
    shutil.copy(assets / STYLE / "furious_talk2_clip1.mp4", video)
    before = video.read_bytes()
    for extra in ([], ["--overwrite"]):
        result = cli("preprocess", tmp_path, "-o", video, "--models", models_dir, *extra)
        assert result.returncode == 2 and "is one of the inputs" in result.stderr, result.stderr
        assert result.stdout == "" and "Traceback" not in result.stderr
    link = tmp_path / "other" / "link.h5"
    link.parent.mkdir()
    os.link(video, link)  # the same file under another name
    result = cli("preprocess", video, "-o", link, "--models", models_dir, "--overwrite")
    assert result.returncode == 2 and "is one of the inputs" in result.stderr
    assert video.read_bytes() == before


def test_changed_source_is_redone_unchanged_kept(assets, tmp_path, models_dir):
    """Resume trusts content, not the path: a source replaced at the same path is processed again
    (from an existing output and from parts), a touched but unchanged one is not."""
    from avatarcli.provenance import sha256_file
    from stages.preprocess import PreprocessConfig, run

    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(assets / STYLE / "furious_talk2_clip1.mp4", root / name)
    out = tmp_path / "clips.h5"
    config = PreprocessConfig(models_dir=str(models_dir), keep_parts=True)
    first = run(config, [str(root)], out)
    assert first.units_now == 2
    old_frames = all_frames(out)

    os.utime(root / "a.mp4")  # touched, same content: the hash says keep it
    shutil.copy(assets / STYLE / "furious_talk2_clip4.mp4", root / "b.mp4")  # replaced
    stat = (root / "b.mp4").stat()
    os.utime(root / "b.mp4", ns=(stat.st_atime_ns, (root / "a.mp4").stat().st_mtime_ns - 10**9))
    second = run(config, [str(root)], out)
    assert (second.units_now, second.reused) == (1, 1)
    table = _sources_table(out)
    assert table["b.mp4"][0] == sha256_file(root / "b.mp4") != table["a.mp4"][0]
    new_frames = all_frames(out)
    (a_clip,) = [n for n in new_frames if n.startswith("a-")]
    (b_clip,) = [n for n in new_frames if n.startswith("b-")]
    np.testing.assert_array_equal(new_frames[a_clip], old_frames[a_clip])
    assert new_frames[b_clip].shape != old_frames[b_clip].shape  # 69 source frames now, not 60

    # from the parts of an unfinished run: the output is gone, the parts stay (keep_parts)
    out.unlink()
    shutil.copy(assets / STYLE / "furious_talk2_clip1.mp4", root / "b.mp4")
    third = run(config, [str(root)], out)
    assert (third.units_now, third.reused) == (1, 1)
    assert _sources_table(out)["b.mp4"][0] == sha256_file(root / "b.mp4")
    again = run(config, [str(root)], out)  # nothing changed: no work, no hashing needed
    assert (again.units_now, again.reused) == (0, 2)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_and_wait_for_a_part(args, parts: Path, **kwargs) -> subprocess.Popen:
    process = subprocess.Popen([PY, "-m", "avatarcli", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, **kwargs)
    deadline = time.time() + 300
    while time.time() < deadline and not list(parts.glob("*.h5")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    return process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_the_parent_is_killed(assets, tmp_path, models_dir):
    out = tmp_path / "clips.h5"
    inputs = sorted((assets / STYLE).glob("*.mp4"))[:8]
    process = _start_and_wait_for_a_part(["preprocess", *inputs, "-o", out, "--models", models_dir, "--device", "cpu",
                                          "--workers", "2"], Path(str(out) + ".parts"))
    children = _children(process.pid)
    assert len(children) >= 2
    process.kill()  # SIGKILL to the parent only
    process.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    left = [pid for pid in children if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"worker processes outlived their parent: {left}"


def test_second_run_on_the_same_output_exits_2_naming_the_holder(assets, tmp_path, models_dir):
    out = tmp_path / "clips.h5"
    inputs = sorted((assets / STYLE).glob("*.mp4"))[:8]
    first = _start_and_wait_for_a_part(["preprocess", *inputs, "-o", out, "--models", models_dir, "--device", "cpu"],
                                       Path(str(out) + ".parts"))
    try:
        start = time.time()
        second = cli("preprocess", *inputs, "-o", out, "--models", models_dir, "--device", "cpu")
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
        assert "being written by another run" in second.stderr and second.stdout == ""
        assert time.time() - start < 60 and first.poll() is None  # it stopped at once, the first goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_ctrl_c_stops_within_two_seconds(assets, tmp_path, models_dir):
    out = tmp_path / "clips.h5"
    inputs = sorted((assets / STYLE).glob("*.mp4"))
    process = _start_and_wait_for_a_part(["preprocess", *inputs, "-o", out, "--models", models_dir, "--device", "cpu"],
                                         Path(str(out) + ".parts"))
    start = time.time()
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    took = time.time() - start
    assert process.returncode != 0 and not out.exists()
    # the work in flight stops at its next batch (before: queued sources and running ones were
    # finished, 7-14 s); the bound leaves room for a loaded 2-core test machine
    assert took < 4.0, f"took {took:.1f} s to stop"


def test_truncated_and_corrupted_sources_keep_their_decodable_prefix(assets, tmp_path, models_dir):
    import decord

    from avatarcli.video import write_video

    frames = decord.VideoReader(str(assets / STYLE / "furious_talk1_clip2.mp4")).get_batch(list(range(300))).asnumpy()
    data = write_video(tmp_path / "whole.mp4", frames, 30).path.read_bytes()
    root = tmp_path / "in"
    root.mkdir()
    (root / "cut.mp4").write_bytes(data[: int(len(data) * 0.3)])  # the index lists all 300 frames
    middle = bytearray(data)
    middle[len(data) // 2 : len(data) // 2 + 4000] = np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes()
    (root / "middle.mp4").write_bytes(bytes(middle))
    out = tmp_path / "clips.h5"
    result = cli("preprocess", root, "-o", out, "--models", models_dir, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    table = _sources_table(out)
    with open_artifact(out, "clips", deep=True) as h:
        clip_frames = dict(zip(read_strings(h["index/clip_id"]), h["index/num_frames"][()]))
    for name in ("cut.mp4", "middle.mp4"):
        _, status, reason = table[name]
        match = re.fullmatch(r"truncated: decoded (\d+) of (\d+) frames", reason.split("; ")[0])
        assert status == "ok" and match, (name, status, reason)
        decoded, total = map(int, match.groups())
        assert total == 250 and 25 <= decoded < total
        kept = sum(n for clip, n in clip_frames.items() if clip.startswith(name[:-4] + "-"))
        assert 25 <= kept <= decoded
