import h5py
import numpy as np
import pytest

from avatarcli.artifact import (
    ArtifactSchema, ArtifactWriter, DatasetSpec, FrameWriter, open_artifact, register_schema, validate,
)
from avatarcli.errors import ArtifactError

TOY = register_schema(ArtifactSchema(
    kind="toy", version=2, doc="test kind",
    datasets=(DatasetSpec("index/name", "str", ("N",)), DatasetSpec("index/length", "int32", ("N",))),
    unit_group="units",
    unit_datasets=(DatasetSpec("frames", "uint8", ("T", "S", "S", 3)), DatasetSpec("score", "float32", ("T",))),
    unit_attrs=("label",), global_symbols=("S",), unit_count_symbol="N",
))


def write_toy(path, lengths=(3, 4), size=8, mutate=None):
    from avatarcli.artifact import write_strings

    with ArtifactWriter(path, TOY, {"a": 1}, [("in.mp4", "ab" * 32)]) as writer:
        h = writer.handle
        units = h.create_group("units")
        for i, t in enumerate(lengths):
            g = units.create_group(f"u{i}")
            FrameWriter(1).write(g, "frames", np.full((t, size, size, 3), i, np.uint8))
            g.create_dataset("score", data=np.zeros(t, np.float32))
            g.attrs["label"] = f"u{i}"
        write_strings(h.require_group("index"), "name", [f"u{i}" for i in range(len(lengths))])
        h["index"].create_dataset("length", data=np.asarray(lengths, np.int32))
        if mutate:
            mutate(h)
    return path


def test_roundtrip_and_provenance(tmp_path):
    path = write_toy(tmp_path / "a.h5")
    with open_artifact(path, deep=True) as h:
        assert h.attrs["avatar_kind"] == "toy"
        assert int(h.attrs["avatar_schema_version"]) == 2
        assert "created_utc" in h.attrs and "avatar_version" in h.attrs
        assert h["provenance/parent_path"][0].decode() == "in.mp4"
        assert h["units/u1/frames"].compression == "gzip"
        assert (h["units/u1/frames"][()] == 1).all()
        assert h["units/u1/frames"].chunks == (1, 8, 8, 3)


def test_frames_readable_by_plain_hdf5_filter(tmp_path):
    # Chunks written raw after zlib compression must decode through HDF5's own gzip filter.
    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "f.h5", "w") as h:
        FrameWriter(level=6).write(h, "frames", frames)
    with h5py.File(tmp_path / "f.h5", "r") as h:
        np.testing.assert_array_equal(h["frames"][()], frames)
        np.testing.assert_array_equal(h["frames"][3], frames[3])


def test_frame_reader_equals_h5py_for_every_layout(tmp_path):
    from avatarcli.artifact import FrameReader

    frames = np.random.default_rng(1).integers(0, 255, (7, 16, 16, 3), dtype=np.uint8)
    reader = FrameReader(threads=2)
    with h5py.File(tmp_path / "f.h5", "w") as h:
        FrameWriter(level=1).write(h, "threaded", frames)  # raw deflate chunks: inflated in threads
        h.create_dataset("plain", data=frames)  # contiguous: read through h5py
        h.create_dataset("shuffled", data=frames, chunks=(1, 16, 16, 3), compression="gzip", shuffle=True)
    with h5py.File(tmp_path / "f.h5", "r") as h:
        for name in ("threaded", "plain", "shuffled"):
            np.testing.assert_array_equal(reader.read(h[name], 2, 6), frames[2:6])
            np.testing.assert_array_equal(reader.read(h[name], 5, 99), frames[5:])
            assert reader.read(h[name], 7, 9).shape == (0, 16, 16, 3)
        assert reader._chunk_table(h["threaded"]) is not None  # read with pread, not through HDF5
        buffer = np.zeros((5, 16, 16, 3), np.uint8)
        assert reader.read(h["threaded"], 1, 4, out=buffer).base is buffer
        np.testing.assert_array_equal(buffer[:3], frames[1:4])
    reader.close()


def test_frame_reader_direct_reads_honour_a_userblock(tmp_path):
    from avatarcli.artifact import FrameReader

    frames = np.random.default_rng(2).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "u.h5", "w", userblock_size=1024) as h:
        FrameWriter(level=1).write(h, "frames", frames)
    reader = FrameReader(threads=2)
    with h5py.File(tmp_path / "u.h5", "r") as h:
        assert reader._chunk_table(h["frames"]) is not None
        np.testing.assert_array_equal(reader.read(h["frames"], 0, 5), frames)
    reader.close()


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "a.h5"

    def boom(h):
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_toy(target, mutate=boom)
    assert list(tmp_path.iterdir()) == []


def test_invalid_content_is_not_renamed_into_place(tmp_path):
    target = tmp_path / "a.h5"
    with pytest.raises(ArtifactError, match="shape"):
        write_toy(target, mutate=lambda h: h["units/u0"].__delitem__("score") or h["units/u0"].create_dataset("score", data=np.zeros(9, np.float32)))
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: h.attrs.__setitem__("avatar_kind", "clips"), "wrong artifact kind 'clips', expected 'toy'"),
        (lambda h: h.attrs.__setitem__("avatar_schema_version", 3), "schema version 3 is newer"),
        (lambda h: h.__delitem__("index/length"), "missing dataset /index/length"),
        (lambda h: h["units/u0"].__delitem__("score"), "missing dataset score"),
        (lambda h: h["units/u1"].attrs.__delitem__("label"), "missing attribute 'label'"),
        (lambda h: (h["units/u0"].__delitem__("score"), h["units/u0"].create_dataset("score", data=np.zeros(3, np.float64))), "dtype float64"),
        (lambda h: (h["units/u0"].__delitem__("score"), h["units/u0"].create_dataset("score", data=np.zeros(5, np.float32))), "T=5 here but T=3"),
        (lambda h: (h["units/u1"].__delitem__("frames"), h["units/u1"].create_dataset("frames", data=np.zeros((4, 9, 9, 3), np.uint8))), "S=9 here but S=8"),
        (lambda h: (h["index"].__delitem__("length"), h["index"].create_dataset("length", data=np.zeros(3, np.int32))), "N=3 here but N=2"),
    ],
)
def test_validation_errors_are_precise(tmp_path, mutate, message):
    path = write_toy(tmp_path / "a.h5")
    with h5py.File(path, "a") as h:
        mutate(h)
    with h5py.File(path, "r") as h:
        with pytest.raises(ArtifactError) as info:
            validate(h, TOY, deep=True)
    assert message in str(info.value)


def test_open_rejects_non_artifacts(tmp_path):
    (tmp_path / "x.h5").write_text("not hdf5")
    with pytest.raises(ArtifactError, match="not an HDF5 file"):
        open_artifact(tmp_path / "x.h5")
    with h5py.File(tmp_path / "y.h5", "w"):
        pass
    with pytest.raises(ArtifactError, match="not an avatar artifact"):
        open_artifact(tmp_path / "y.h5")
    with pytest.raises(ArtifactError, match="no such file"):
        open_artifact(tmp_path / "missing.h5")
