"""``avatar merge`` never destroys its inputs, and a virtual merge whose shards moved or changed is an
error naming the shard (issue 16, items 1 and 2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from avatarcli.artifact import ArtifactError, open_artifact, read_strings
from avatarcli.provenance import sha256_file
from tests.conftest import REPO

PY = sys.executable


def avatar(*args):
    return subprocess.run([PY, "-m", "avatarcli", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=os.environ.copy(), timeout=300)


def frames_of(path) -> dict[str, np.ndarray]:
    with open_artifact(path, "clips") as handle:
        return {name: handle["clips"][name]["frames"][()] for name in handle["clips"]}


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def synth_clip(assets, tmp_path_factory):
    """A one-clip, 3-frame, 32-pixel synthetic clips artifact."""
    from stages import synth

    out = tmp_path_factory.mktemp("synth") / "clip.h5"
    synth.run(synth.SynthConfig(clips=1, frames=3, size=32, face_model=str(assets / "3dmm/ict_facekit/ict_face_light_f16.npz")),
              out)
    return out


@pytest.fixture
def shards(synth_clip, tmp_path):
    """Two mergeable shards (same settings, different clip ids) in ``tmp_path/run``."""
    folder = tmp_path / "run"
    folder.mkdir()
    first, second = folder / "shard0.h5", folder / "shard1.h5"
    shutil.copyfile(synth_clip, first)
    shutil.copyfile(synth_clip, second)
    with h5py.File(second, "r+") as handle:
        (clip_id,) = read_strings(handle["index/clip_id"])
        handle["clips"].move(clip_id, clip_id + "_b")
        handle["index/clip_id"][0] = clip_id + "_b"
        handle["clips"][clip_id + "_b"]["frames"][0, 0, 0] = 255 - handle["clips"][clip_id + "_b"]["frames"][0, 0, 0]
    return first, second


@pytest.mark.parametrize("flags", [[], ["--virtual"], ["--overwrite"], ["--virtual", "--overwrite"]])
def test_output_that_is_an_input_is_refused_and_the_input_kept(shards, tmp_path, flags):
    first, second = shards
    before = sha256_file(first)
    os.link(first, tmp_path / "alias.h5")
    for output in (first, first.parent / ".." / "run" / first.name, tmp_path / "alias.h5"):
        result = avatar("merge", first, second, "-o", output, *flags)
        assert result.returncode != 0
        assert "is also an input" in error_line(result) and "never replaces its inputs" in result.stderr
        assert sha256_file(first) == before
    assert frames_of(first)  # still a readable artifact


def test_output_that_a_virtual_input_reads_is_refused(shards, tmp_path):
    first, second = shards
    merged = tmp_path / "run" / "merged.h5"
    assert avatar("merge", first, second, "-o", merged, "--virtual").returncode == 0
    before = sha256_file(second)
    result = avatar("merge", merged, "-o", second, "--virtual", "--overwrite")
    assert result.returncode != 0 and "reads" in error_line(result)
    assert sha256_file(second) == before
    assert frames_of(merged)


def test_existing_output_is_replaced_only_with_overwrite(shards, tmp_path):
    first, second = shards
    output = tmp_path / "coeffs.h5"
    output.write_bytes(b"someone's coefficients")
    result = avatar("merge", first, second, "-o", output)
    assert result.returncode != 0 and "already exists" in error_line(result) and "--overwrite" in result.stderr
    assert output.read_bytes() == b"someone's coefficients"
    result = avatar("merge", first, second, "-o", output, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(frames_of(output)) == 2


def test_zero_clips_is_an_error(synth_clip, tmp_path):
    empty = tmp_path / "empty.h5"
    shutil.copyfile(synth_clip, empty)
    with h5py.File(empty, "r+") as handle:  # the same artifact with its one clip taken out
        del handle["clips"][read_strings(handle["index/clip_id"])[0]]
        for name in ("clip_id", "identity_id", "num_frames", "source_id"):
            data = handle["index"][name][:0]
            del handle["index"][name]
            handle["index"].create_dataset(name, data=data, dtype=data.dtype)
    with open_artifact(empty, "clips", deep=True) as handle:
        assert len(handle["clips"]) == 0
    output = tmp_path / "merged.h5"
    for flags in ([], ["--virtual"]):
        result = avatar("merge", empty, "-o", output, *flags)
        assert result.returncode != 0 and "0 clips" in error_line(result)
        assert not output.exists()


def test_virtual_merge_names_shards_relative_to_itself_and_moves_with_them(shards, tmp_path):
    first, second = shards
    expected = {**frames_of(first), **frames_of(second)}
    merged = first.parent / "merged.h5"
    assert avatar("merge", first, second, "-o", merged, "--virtual").returncode == 0
    with h5py.File(merged, "r") as handle:
        names = {vds.file_name for clip in handle["clips"].values() for vds in clip["frames"].virtual_sources()}
        assert names == {"shard0.h5", "shard1.h5"}
        assert read_strings(handle["virtual_sources/path"]) == ["shard0.h5", "shard1.h5"]
        assert handle["virtual_sources/size_bytes"][()].tolist() == [first.stat().st_size, second.stat().st_size]
        assert read_strings(handle["virtual_sources/sha256"]) == [sha256_file(first), sha256_file(second)]
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(first.parent, moved)
    actual = frames_of(moved / "merged.h5")
    assert sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])
    assert avatar("info", moved / "merged.h5").returncode == 0


def test_moved_shard_is_an_error_naming_it(shards, tmp_path):
    first, second = shards
    merged = tmp_path / "merged.h5"  # outside the shards' folder: named ../run/shardK.h5
    assert avatar("merge", first, second, "-o", merged, "--virtual").returncode == 0
    frames_of(merged)
    second.rename(tmp_path / "away.h5")
    result = avatar("info", merged)
    assert result.returncode != 0
    line = error_line(result)
    assert "shard1.h5" in line and "missing" in line
    with pytest.raises(ArtifactError, match="shard1.h5.*missing"):
        frames_of(merged)


def test_changed_shard_is_an_error_naming_it(shards, tmp_path):
    first, second = shards
    merged = tmp_path / "merged.h5"
    assert avatar("merge", first, second, "-o", merged, "--virtual").returncode == 0
    # same size, other content: caught by the sha256 that info compares
    with h5py.File(second, "r+") as handle:
        frames = handle["clips"][read_strings(handle["index/clip_id"])[0]]["frames"]
        frames[0, 0, 0] = 255 - frames[0, 0, 0]
    assert second.stat().st_size == open_artifact(merged)["virtual_sources/size_bytes"][1]
    result = avatar("info", merged)
    assert result.returncode != 0 and "shard1.h5" in error_line(result) and "changed" in result.stderr
    with pytest.raises(ArtifactError, match="shard1.h5.*sha256"):
        open_artifact(merged, deep=True)
    # another size: caught on every open
    with open(second, "ab") as handle:
        handle.write(b"\0" * 16)
    with pytest.raises(ArtifactError, match="shard1.h5.*changed"):
        frames_of(merged)


def test_virtual_artifact_reading_itself_is_an_error_not_a_crash(shards, tmp_path):
    """What older avatars made of `merge a.h5 -o a.h5 --virtual` (no record of its sources)."""
    first, _ = shards
    made = first.parent / "made.h5"
    assert avatar("merge", first, "-o", made, "--virtual").returncode == 0
    with h5py.File(made, "r+") as handle:
        if "virtual_sources" in handle:
            del handle["virtual_sources"]
    first.unlink()
    made.rename(first)  # its virtual datasets now read the file itself
    result = avatar("info", first)
    assert result.returncode == 2 and "is the artifact itself" in error_line(result)
