import struct

import numpy as np

from avatarcli.face import track
from avatarcli.video import mp4_rotation, resample_indices


def test_resample_constant_rate_30_to_25():
    starts = np.arange(60) / 30.0
    idx, times = resample_indices(starts, starts + 1 / 30, 25.0)
    assert len(idx) == 50
    np.testing.assert_allclose(times, np.arange(50) / 25.0)
    # frame shown at t is the last one that started at or before t
    assert list(idx[:7]) == [0, 1, 2, 3, 4, 6, 7]


def test_resample_variable_frame_rate_follows_timestamps():
    # 10 frames at 50 fps, then a 0.2 s frame, then 10 frames at 10 fps
    starts = np.concatenate([np.arange(10) * 0.02, [0.2], 0.4 + np.arange(10) * 0.1])
    ends = np.append(starts[1:], starts[-1] + 0.1)
    idx, times = resample_indices(starts, ends, 25.0)
    for i, t in zip(idx, times):
        assert starts[i] <= t + 1e-9 and (i == len(starts) - 1 or starts[i + 1] > t)
    assert abs(times[-1] - (ends[-1] - 0.04)) < 0.041


def _mp4_with_matrix(a, b, c, d):
    matrix = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    tkhd_body = bytes([0, 0, 0, 3]) + b"\0" * 36 + matrix + struct.pack(">II", 640 << 16, 480 << 16)
    tkhd = struct.pack(">I4s", 8 + len(tkhd_body), b"tkhd") + tkhd_body
    trak = struct.pack(">I4s", 8 + len(tkhd), b"trak") + tkhd
    moov = struct.pack(">I4s", 8 + len(trak), b"moov") + trak
    return struct.pack(">I4s", 16, b"ftyp") + b"isom\0\0\0\0" + moov


def test_mp4_rotation_from_tkhd_matrix(tmp_path):
    one = 1 << 16
    for (a, b, c, d), expected in [((one, 0, 0, one), 0), ((0, one, -one, 0), 90), ((-one, 0, 0, -one), 180), ((0, -one, one, 0), 270)]:
        path = tmp_path / f"r{expected}.mp4"
        path.write_bytes(_mp4_with_matrix(a, b, c, d))
        assert mp4_rotation(str(path)) == expected


def _det(*boxes):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    kps = np.repeat(((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None], 5, 1)
    return track.FrameDetections(boxes, kps, np.ones(len(boxes), np.float32))


def test_main_track_prefers_large_face_and_interpolates_short_gaps():
    big, small = [100, 100, 300, 300], [500, 50, 540, 90]
    frames = [_det(big, small) for _ in range(10)]
    frames[4] = _det(small)  # big face missed for one frame
    frames[5] = None  # detector not run
    tracks = track.link_tracks(frames)
    main = track.main_track(frames, tracks)
    assert frames[0].boxes[main[0]][0] == 100
    segs = track.segments(frames, main, max_gap=3)
    assert len(segs) == 1 and len(segs[0].boxes) == 10
    assert not segs[0].detected[4] and not segs[0].detected[5] and segs[0].detected[6]
    np.testing.assert_allclose(segs[0].boxes[4], big)


def test_long_gap_splits_track():
    frames = [_det([0, 0, 10, 10]) for _ in range(30)]
    for t in range(10, 20):
        frames[t] = _det()
    segs = track.segments(frames, track.main_track(frames, track.link_tracks(frames)), max_gap=5)
    assert [(s.start, len(s.boxes)) for s in segs] == [(0, 10), (20, 10)]


def test_gaussian_smoothing_is_zero_phase():
    ramp = np.arange(50, dtype=np.float64)[:, None]
    smoothed = track.gaussian_smooth(ramp, 2.0)
    np.testing.assert_allclose(smoothed[10:40], ramp[10:40], atol=1e-9)  # no lag on linear motion
    noisy = ramp + np.random.default_rng(0).normal(0, 1, ramp.shape)
    assert np.std(track.gaussian_smooth(noisy, 2.0)[5:45] - ramp[5:45]) < 0.6


def test_matmul_crop_equals_padded_resize():
    """The GPU crop (weight matrices) equals zero-padding the square and resizing it with torch."""
    import torch
    import torch.nn.functional as F

    from avatarcli.face.crop import crop_batch_matmul

    torch.manual_seed(0)
    frames = torch.randint(0, 256, (4, 120, 100, 3), dtype=torch.uint8)
    boxes = np.array([[-20, 10, 90], [5, 5, 50], [30, -10, 130], [0, 0, 40]])
    for size in (40, 64, 112):
        expected = []
        for frame, (x0, y0, side) in zip(frames, boxes):
            patch = torch.zeros((side, side, 3))
            sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, 100), min(y0 + side, 120)
            patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = frame[sy0:sy1, sx0:sx1].float()
            out = F.interpolate(patch.permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                                antialias=side > size, align_corners=False)
            expected.append(out[0].permute(1, 2, 0).round().clamp(0, 255))
        got = crop_batch_matmul(frames, boxes, size).float()
        diff = (got - torch.stack(expected)).abs()
        assert diff.max() <= 1 and diff.mean() < 0.01  # rounding ties only


def test_matmul_crop_with_device_boxes_equals_host_boxes():
    """Boxes given as a tensor (no host read-back, whole frame as the region) crop the same pixels."""
    import torch

    from avatarcli.face.crop import crop_batch_matmul

    torch.manual_seed(1)
    frames = torch.randint(0, 256, (4, 120, 100, 3), dtype=torch.uint8)
    boxes = np.array([[-20, 10, 90], [5, 5, 50], [30, -10, 130], [0, 0, 40]])
    for size in (40, 112):
        host = crop_batch_matmul(frames, boxes, size).int()
        device = crop_batch_matmul(frames, torch.as_tensor(boxes, dtype=torch.float32), size, max_side=160).int()
        assert (host - device).abs().max() <= 1 and (host != device).float().mean() < 0.01  # summation order only


def test_truncated_mp4_keeps_its_decodable_prefix(assets, tmp_path):
    """An MP4 cut short (its index lists frames past the data; decord cannot open it at all) is read
    up to the last decodable frame: the same output indices and pixels as the whole file there, and
    fewer frames than asked for. A file that is no video is still refused."""
    import pytest

    from avatarcli.video import PrefixReader, SkipInput, decode, open_video, write_video

    import decord

    frames = decord.VideoReader(str(assets / "data/styletalk/style/video/furious_talk1_clip1.mp4")).get_batch(
        list(range(90))).asnumpy()
    whole = write_video(tmp_path / "whole.mp4", frames, 30).path  # moov first (faststart)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.4)])

    reader, info = open_video(str(cut))
    full_reader, full_info = open_video(str(whole))
    assert isinstance(reader, PrefixReader) and 0 < reader.decodable < len(reader) == info.num_frames == 90
    np.testing.assert_array_equal(info.starts, full_info.starts)
    indices, _ = resample_indices(info.starts, info.ends, 25.0)
    full_indices, _ = resample_indices(full_info.starts, full_info.ends, 25.0)
    np.testing.assert_array_equal(indices, full_indices)
    got = np.concatenate([f for _, f in decode(reader, info, indices, 16)])
    assert 0 < len(got) < len(indices)
    expected = np.concatenate([f for _, f in decode(full_reader, full_info, full_indices, 16)])[: len(got)]
    np.testing.assert_array_equal(got, expected)

    image = tmp_path / "image.mp4"
    import cv2

    cv2.imwrite(str(tmp_path / "image.png"), frames[0])
    image.write_bytes((tmp_path / "image.png").read_bytes())
    with pytest.raises(SkipInput, match="not a readable video"):
        open_video(str(image))
