"""Tests of the mp4 writer (avatarcli.video.VideoWriter): round trips through decord (the project's
reader) and PyAV, exact frame counts and timestamps at integer and NTSC rates, codec tolerance,
odd sizes, encoder fallback, and that an interrupted write leaves no file."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from avatarcli.errors import AvatarError
from avatarcli.video import VideoWriter, available_encoder, open_video, video_rate, write_video

av = pytest.importorskip("av")


def synthetic_frames(count: int, height: int, width: int) -> np.ndarray:
    """[T,H,W,3] uint8: smooth colour gradients that drift, with a bright disc and a dark square moving."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = np.empty((count, height, width, 3), np.uint8)
    for t in range(count):
        r = 40 + 150 * xx / width + 20 * np.sin(t / 5)
        g = 60 + 120 * yy / height
        b = 90 + 60 * np.cos((xx + yy) / 40 + t / 7)
        image = np.stack([r, g, b], -1)
        cx, cy = width * (0.2 + 0.6 * t / count), height * (0.5 + 0.25 * np.sin(t / 4))
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < (height / 6) ** 2] = (235, 225, 200)
        sx, sy = int(width * (0.75 - 0.5 * t / count)), int(height * 0.2)
        image[sy: sy + height // 5, sx: sx + height // 5] = (25, 30, 40)
        frames[t] = np.clip(np.round(image), 0, 255)
    return frames


def decode_all(path):
    reader, info = open_video(str(path))
    return reader.get_batch(list(range(info.num_frames))).asnumpy(), info


def pyav_timestamps(path) -> list[Fraction]:
    """Exact presentation times (pts × stream time base) of every decoded frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.pts * stream.time_base for frame in container.decode(stream)]


@pytest.mark.parametrize("fps", [25, Fraction(30000, 1001)], ids=["25", "29.97"])
def test_round_trip_exact_count_timestamps_and_pixels(tmp_path, fps):
    frames = synthetic_frames(37, 96, 128)
    path = tmp_path / "out.mp4"
    writer = write_video(path, frames, fps, crf=12)
    assert writer.codec == available_encoder("libx264") and writer.frames_written == 37
    assert writer.fps == Fraction(fps) and writer.encoded_size == (128, 96)
    decoded, info = decode_all(path)
    assert info.num_frames == 37 and decoded.shape == frames.shape
    assert info.fps == pytest.approx(float(Fraction(fps)), rel=1e-12)
    expected = [k / Fraction(fps) for k in range(37)]
    assert pyav_timestamps(path) == expected  # exact rationals: k · 1/fps
    np.testing.assert_allclose(info.starts, [float(t) for t in expected], atol=1e-6)  # decord's float seconds
    error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
    print(f"fps {fps}: mean abs error {error.mean():.3f}, 99th percentile {np.percentile(error, 99):.0f}")
    assert error.mean() < 3.0
    # frames are not swapped or duplicated: each decoded frame is closest to its own source frame
    distance = np.abs(decoded[:, None].astype(np.int16) - frames[None].astype(np.int16)).mean((2, 3, 4))
    assert (distance.argmin(1) == np.arange(37)).all()


def test_streamed_chunks_equal_one_call_and_any_rate(tmp_path):
    frames = synthetic_frames(12, 48, 64)
    with VideoWriter(tmp_path / "chunks.mp4", "60") as writer:
        writer.write(frames[:5])
        for frame in frames[5:]:
            writer.write(frame)  # [H,W,3]
    write_video(tmp_path / "whole.mp4", frames, 60)
    # same frames, same bytes (x264's mbtree off: see VideoWriter's `deterministic`), however they come
    assert (tmp_path / "chunks.mp4").read_bytes() == (tmp_path / "whole.mp4").read_bytes()
    for split in (1, 6, 11):  # with x264's mbtree on, about half of such rewrites differed
        write_video(tmp_path / "again.mp4", [frames[:split], frames[split:]], 60)
        assert (tmp_path / "again.mp4").read_bytes() == (tmp_path / "whole.mp4").read_bytes()
    decoded, info = decode_all(tmp_path / "chunks.mp4")
    assert info.num_frames == 12 and info.fps == 60.0 and np.abs(decoded.astype(np.int16) - frames).mean() < 3.0
    assert pyav_timestamps(tmp_path / "chunks.mp4") == [Fraction(k, 60) for k in range(12)]


def test_frame_rates_are_exact_fractions():
    assert video_rate(29.97) == Fraction(30000, 1001)
    assert video_rate(23.976) == Fraction(24000, 1001)
    assert video_rate(59.94) == Fraction(60000, 1001)
    assert video_rate("30000/1001") == Fraction(30000, 1001)
    assert video_rate(25) == 25 and video_rate(25.0) == 25 and video_rate(12.5) == Fraction(25, 2)
    for bad in (0, -5, "fast", "1/0"):
        with pytest.raises(AvatarError, match="frame rate"):
            video_rate(bad)


def test_odd_sizes_are_padded_to_even_by_repeating_the_edge(tmp_path):
    # (decord cannot decode some widths, 48 among them: "DECORDArrayCopyFromTo: The size must exactly match")
    frames = synthetic_frames(6, 35, 57)
    writer = write_video(tmp_path / "odd.mp4", frames, 25, crf=12)
    assert writer.size == (57, 35) and writer.encoded_size == (58, 36)
    decoded, info = decode_all(tmp_path / "odd.mp4")
    assert (info.width, info.height) == (58, 36) and info.num_frames == 6
    assert np.abs(decoded[:, :35, :57].astype(np.int16) - frames).mean() < 3.0
    # the padding repeats the last row and column (no black seam)
    assert np.abs(decoded[:, 35, :57].astype(np.int16) - frames[:, 34]).mean() < 4.0
    assert np.abs(decoded[:, :35, 57].astype(np.int16) - frames[:, :, 56]).mean() < 4.0


def test_interrupted_write_leaves_no_file(tmp_path):
    path = tmp_path / "broken.mp4"
    frames = synthetic_frames(4, 32, 32)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        with VideoWriter(path, 25) as writer:
            writer.write(frames)
            raise RuntimeError("renderer crashed")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp
    # an existing file is left as it was
    write_video(path, frames, 25)
    before = path.read_bytes()
    with pytest.raises(AvatarError, match="changed size"):
        with VideoWriter(path, 25) as writer:
            writer.write(synthetic_frames(3, 48, 48))
            writer.write(frames)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    writer = VideoWriter(tmp_path / "aborted.mp4", 25)
    writer.write(frames)
    writer.abort()
    assert list(tmp_path.iterdir()) == [path]
    with pytest.raises(AvatarError, match="no frames written"):
        write_video(tmp_path / "empty.mp4", np.zeros((0, 32, 32, 3), np.uint8), 25)
    assert list(tmp_path.iterdir()) == [path]


def test_killed_writer_leaves_only_a_hidden_temp_that_the_next_writer_removes(tmp_path):
    path = tmp_path / "killed.mp4"
    script = (
        "import sys, time, numpy as np\n"
        "from avatarcli.video import VideoWriter\n"
        "w = VideoWriter(sys.argv[1], 25)\n"
        "w.write(np.full((10, 32, 32, 3), 128, np.uint8))\n"
        "print('written', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "written"
    finally:
        process.kill()
        process.wait()
    left = list(tmp_path.iterdir())
    assert not path.exists() and len(left) == 1 and left[0].name.startswith(".killed.mp4.")
    write_video(path, synthetic_frames(3, 32, 32), 25)
    assert list(tmp_path.iterdir()) == [path]  # the stale temp of the dead process is gone


def test_bad_frames_and_paths_give_one_clear_error(tmp_path):
    with pytest.raises(AvatarError, match="uint8 RGB"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 16, 16, 3), np.float32), 25)
    with pytest.raises(AvatarError, match="uint8 RGB"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 16, 16), np.uint8), 25)
    with pytest.raises(AvatarError, match="must end in"):
        VideoWriter(tmp_path / "a.gif", 25)
    with pytest.raises(AvatarError, match="no video encoder"):
        VideoWriter(tmp_path / "a.mp4", 25, codec="no_such_encoder")
    assert list(tmp_path.iterdir()) == []


def test_torch_frames_and_the_mpeg4_fallback(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    frames = synthetic_frames(8, 40, 56)
    real_codec = av.codec.Codec

    def without_h264(name, mode="r"):
        if name in ("libx264", "libopenh264"):
            raise av.codec.codec.UnknownCodecError(name)
        return real_codec(name, mode)

    monkeypatch.setattr(av.codec, "Codec", without_h264)
    with pytest.warns(RuntimeWarning, match="libx264 is not available; writing fallback.mp4 with mpeg4"):
        writer = write_video(tmp_path / "fallback.mp4", torch.from_numpy(frames), 25, crf=12)
    assert writer.requested_codec == "libx264" and writer.codec == "mpeg4"
    decoded, info = decode_all(tmp_path / "fallback.mp4")
    with av.open(str(tmp_path / "fallback.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    error = np.abs(decoded.astype(np.int16) - frames).mean()
    print(f"mpeg4 q2: mean abs error {error:.3f}")
    assert info.num_frames == 8 and error < 3.0


def test_variable_frame_rate_and_rotation_are_written(tmp_path):
    """Timestamps given per frame come back exactly (a true VFR file); a rotation is stored as the
    display matrix that `mp4_rotation` (and players) read, the pixels as given."""
    import decord

    from avatarcli.video import mp4_rotation, write_video

    frames = np.stack([np.full((32, 48, 3), 8 * i, np.uint8) for i in range(12)])
    stamps = np.cumsum([0.0] + [0.04 if i % 2 else 0.1 for i in range(11)])
    write_video(tmp_path / "vfr.mp4", frames, 25, timestamps=stamps, crf=10)
    reader = decord.VideoReader(str(tmp_path / "vfr.mp4"))
    assert len(reader) == 12
    np.testing.assert_allclose(reader.get_frame_timestamp(range(12))[:, 0], stamps, atol=1e-4)
    with pytest.raises(AvatarError, match="timestamps"):
        write_video(tmp_path / "short.mp4", frames[:5], 25, timestamps=stamps)
    assert not (tmp_path / "short.mp4").exists()
    from avatarcli.video import decode

    marked = frames.copy()
    marked[:, :8, :8] = 255  # a marker in the stored top-left corner
    # where it must be seen once the display rotation (clockwise) is applied: (row, column) centres
    expected = {90: ((48, 32), (3.5, 27.5)), 180: ((32, 48), (27.5, 43.5)), 270: ((48, 32), (43.5, 3.5))}
    for degrees, (shape, centre) in expected.items():
        path = tmp_path / f"r{degrees}.mp4"
        write_video(path, marked, 25, rotation=degrees)
        assert mp4_rotation(str(path)) == degrees
        reader, info = open_video(str(path))
        _, upright = next(decode(reader, info, np.arange(12), 16))
        assert upright.shape == (12, *shape, 3), degrees
        rows, cols = np.nonzero(upright[0, ..., 0] > 200)
        assert abs(rows.mean() - centre[0]) < 1.5 and abs(cols.mean() - centre[1]) < 1.5, (degrees, rows.mean(), cols.mean())
