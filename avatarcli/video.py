"""Video decoding with decord (probing, timestamp-based resampling to a fixed fps, rotation) and
frame-exact writing with PyAV (:class:`VideoWriter`, :func:`write_video`)."""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from avatarcli.errors import AvatarError

VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".flv", ".mpg", ".mpeg", ".wmv", ".ts", ".3gp"}


class SkipInput(Exception):
    """An input that cannot be used; the message is the reason recorded in the artifact."""


@dataclass
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    rotation: int
    """Clockwise degrees to rotate decoded frames for display (0, 90, 180, 270)."""
    starts: np.ndarray
    """[n] presentation start time of each decoded frame, seconds."""
    ends: np.ndarray


def _mp4_boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def mp4_rotation(path: str) -> int:
    """Display rotation of the video track of an MP4/MOV (clockwise degrees), from tkhd's matrix.

    decord returns frames as stored; phones store portrait video landscape with a rotation
    matrix, which players (and ffmpeg's autorotate) honour.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return 0
    for kind, start, end in _mp4_boxes(data, 0, len(data)):
        if kind != b"moov":
            continue
        for tkind, tstart, tend in _mp4_boxes(data, start, end):
            if tkind != b"trak":
                continue
            for hkind, hstart, hend in _mp4_boxes(data, tstart, tend):
                if hkind != b"tkhd":
                    continue
                version = data[hstart]
                matrix_at = hstart + (52 if version == 1 else 40)
                if matrix_at + 44 > hend:
                    continue
                a, b = struct.unpack(">ii", data[matrix_at : matrix_at + 8])
                width, height = struct.unpack(">II", data[matrix_at + 36 : matrix_at + 44])
                if width == 0 or height == 0:  # audio track
                    continue
                theta = math.degrees(math.atan2(b / 65536.0, a / 65536.0))
                return int(round(theta / 90.0)) % 4 * 90
    return 0


_NATIVE_LOG_LINE = re.compile(rb"^\[\d\d:\d\d:\d\d\] \S+\.(?:cc|cpp|h):\d+: ")
"""decord's C++ log lines (dmlc ``LOG``): ``[17:10:45] .../video_reader.cc:83: ERROR opening: ...``."""
_STDERR_HELD = threading.Lock()


@contextmanager
def _native_log_lines_dropped():
    """Drop decord's C++ log lines, which go to fd 2 with no level switch (the error they repeat is
    raised too): fd 2 is held in a temp file meanwhile and every other line is passed on after."""
    with _STDERR_HELD, tempfile.TemporaryFile() as held:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no fd 2 (a closed or replaced stderr): nothing to hold
            yield
            return
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if not _NATIVE_LOG_LINE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def _rotation_of(path: str) -> int:
    return mp4_rotation(path) if Path(path).suffix.lower() in {".mp4", ".mov", ".m4v", ".3gp"} else 0


def open_video(path: str, num_threads: int = 0):
    """Open ``path`` with decord and return (reader, info); bad input raises ``SkipInput``."""
    import decord

    if not os.path.exists(path):
        raise SkipInput("file not found")
    size = os.path.getsize(path)
    if size == 0:
        raise SkipInput("empty file (0 bytes)")
    rotation = _rotation_of(path)  # reads the file's boxes: once per open
    if rotation:
        # decord turns 90°/270° videos upright itself and returns broken 4-channel frames at 180°;
        # rotated videos (phones' portrait clips) are read with PyAV as stored and rotated by ``decode``
        opened = _open_prefix(path, rotation)
        if opened is not None:
            return opened
    decord.logging.set_level(decord.logging.QUIET)  # its FFmpeg's lines; we report our own skip reason
    try:
        with _native_log_lines_dropped():
            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as exc:  # decord raises DECORDError or RuntimeError for unreadable containers
        # decord indexes every packet when it opens a file, so an MP4 cut short fails here whole;
        # its decodable prefix is still read (``decode`` then reports fewer frames than asked for)
        opened = _open_prefix(path, rotation)
        if opened is not None:
            return opened
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
        raise SkipInput(f"not a readable video ({first})") from None
    count = len(reader)
    if count == 0:
        raise SkipInput("zero-length video (no frames)")
    stamps = np.asarray(reader.get_frame_timestamp(range(count)), dtype=np.float64).reshape(count, 2)
    first = reader[0].shape
    fps = float(reader.get_avg_fps() or 0.0)
    info = VideoInfo(
        path=path, num_frames=count, fps=fps, width=int(first[1]), height=int(first[0]),
        rotation=rotation,
        starts=stamps[:, 0], ends=stamps[:, 1],
    )
    reader.seek(0)
    return reader, info


class _Frames:
    """What decord's ``get_batch`` returns: frames with ``asnumpy()``."""

    def __init__(self, frames: np.ndarray):
        self.frames = frames

    def asnumpy(self) -> np.ndarray:
        return self.frames


class PrefixReader:
    """A decord-like reader over the decodable prefix of a file decord cannot open: a container whose
    index lists more frames (``len``) than its data holds (``decodable``, decoded in order with PyAV).
    Asking for a frame past the prefix raises ``IndexError``, so :func:`decode` stops there."""

    def __init__(self, path: str, decodable: int, declared: int):
        self.path, self.decodable, self.declared = path, decodable, declared
        self._container = self._frames = None
        self._next = 0  # index of the frame self._frames yields next

    def __len__(self) -> int:
        return self.declared

    def seek(self, index: int) -> None:
        if index < self._next:
            self._close()

    def _close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._frames = None
        self._next = 0

    def _frame(self, index: int) -> np.ndarray:
        import av

        if index >= self.decodable:
            raise IndexError(f"frame {index} is past the decodable prefix ({self.decodable} frames)")
        if index < self._next:
            self._close()
        if self._container is None:
            self._container = av.open(self.path)
            self._frames = self._container.decode(self._container.streams.video[0])
        while True:
            frame = next(self._frames)
            self._next += 1
            if self._next - 1 == index:
                return frame.to_ndarray(format="rgb24")

    def __getitem__(self, index: int) -> _Frames:
        return _Frames(self._frame(int(index)))

    def get_batch(self, indices) -> _Frames:
        return _Frames(np.stack([self._frame(int(i)) for i in indices]))


def _open_prefix(path: str, rotation: int):
    """(``PrefixReader``, info) for a video container whose index lists frames its data lacks (a
    truncated MP4), or None (not such a file, or nothing decodable). The missing frames are given
    times at the stream's average rate, so the output covers the declared duration and the caller
    sees how much of it was decoded."""
    try:
        import av

        with av.open(path) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            declared = int(stream.frames or 0)
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if declared <= 0 or rate <= 0:  # no frame index (an image, a raw stream): not a cut-short video
                return None
            starts, width, height = [], 0, 0
            try:
                for frame in container.decode(stream):
                    starts.append(float(frame.time if frame.time is not None else len(starts) / rate))
                    width, height = frame.width, frame.height
            except (av.FFmpegError, EOFError):
                pass  # the end of the decodable data
    except Exception:  # noqa: BLE001 - PyAV cannot read it either: the caller reports decord's reason
        return None
    if not starts:
        return None
    decodable = len(starts)
    declared = max(declared, decodable)
    starts += [starts[-1] + (k + 1) / rate for k in range(declared - decodable)]
    # float32 seconds, as decord gives them: ties between output and source times resolve the same way
    starts_array = np.asarray(starts, np.float32).astype(np.float64)
    ends_array = (np.asarray(starts, np.float64) + 1.0 / rate).astype(np.float32).astype(np.float64)
    info = VideoInfo(
        path=path, num_frames=declared, fps=rate, width=int(width), height=int(height),
        rotation=rotation,
        starts=starts_array, ends=ends_array,
    )
    return PrefixReader(path, decodable, declared), info


def resample_indices(starts: np.ndarray, ends: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Source frame shown at each output time ``t0 + k/fps`` (variable frame rate safe).

    Returns (source indices [T], output times [T] in seconds of the source).
    """
    order = np.argsort(starts, kind="stable")
    starts_sorted = starts[order]
    t0 = float(starts_sorted[0])
    t_end = float(max(ends.max(), starts_sorted[-1]))
    count = int(math.floor((t_end - t0) * fps + 1e-6))
    count = max(count, 1)
    times = t0 + np.arange(count, dtype=np.float64) / fps
    shown = np.searchsorted(starts_sorted, times + 1e-9, side="right") - 1
    shown = np.clip(shown, 0, len(starts_sorted) - 1)
    return order[shown].astype(np.int64), times


def rotate_frames(frames: np.ndarray, rotation: int) -> np.ndarray:
    if rotation == 0:
        return frames
    return np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=(1, 2)))


def decode(reader, info: VideoInfo, indices: np.ndarray, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (offset, frames [b,H,W,3] uint8 RGB) for ``indices`` in batches.

    A decode error mid-stream (a truncated file) ends the stream at the last good frame; the
    caller sees fewer frames than asked for.
    """
    # Duplicate indices (upsampling) are decoded once per batch.
    for offset in range(0, len(indices), batch):
        wanted = indices[offset : offset + batch]
        unique, inverse = np.unique(wanted, return_inverse=True)
        try:
            frames = reader.get_batch(unique.tolist()).asnumpy()
        except Exception:
            good = []
            for index in unique.tolist():
                try:
                    good.append(reader[index].asnumpy())
                except Exception:
                    break
            if not good:
                return
            frames = np.stack(good)
            keep = inverse < len(good)
            # only the leading run of decodable frames is kept
            stop = int(np.argmin(keep)) if not keep.all() else len(keep)
            if stop:
                yield offset, rotate_frames(frames[inverse[:stop]], info.rotation)
            return
        # Without duplicates the frames are already in order: skip the copy (100 MB per 512² batch,
        # made holding the GIL, which starved the GPU thread of preprocess).
        yield offset, rotate_frames(frames if len(unique) == len(wanted) else frames[inverse], info.rotation)


# ----------------------------------------------------------------------------------------------
# Writing: PyAV (FFmpeg in its wheel), H.264 where the build has it.

FALLBACK_ENCODERS = ("libx264", "libopenh264", "mpeg4")
"""Tried in this order when the requested encoder is one of them and is not in PyAV's FFmpeg."""
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
_BT601 = 6  # AVCOL_SPC/PRI/TRC_SMPTE170M: what swscale's default RGB -> YUV conversion produces
_LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG


def video_rate(fps) -> Fraction:
    """``fps`` as an exact fraction.

    ``Fraction``, ``int`` and ``"30000/1001"``-style strings are taken as given. Floats that are NTSC
    rates to 0.005 (23.976, 29.97, 59.94: N·1000/1001 for an integer N, not itself an integer) become
    N·1000/1001; other floats their decimal value (12.5 -> 25/2).
    """
    try:
        if isinstance(fps, float):
            ntsc = round(fps * 1.001)
            if fps != int(fps) and abs(fps - ntsc / 1.001) < 0.005:
                rate = Fraction(ntsc * 1000, 1001)
            else:
                rate = Fraction(repr(fps)).limit_denominator(1_000_000)
        else:
            rate = Fraction(fps)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):
        raise AvatarError(f"frame rate must be a positive number or fraction like 30000/1001, got {fps!r}") from None
    if rate <= 0:
        raise AvatarError(f"frame rate must be positive, got {fps!r}")
    return rate


def available_encoder(codec: str) -> str:
    """``codec`` if PyAV's FFmpeg can encode with it, else the first of its fallbacks that it can."""
    import av

    candidates = [codec] + [c for c in FALLBACK_ENCODERS if c != codec] if codec in FALLBACK_ENCODERS else [codec]
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # UnknownCodecError, or a decoder-only name
            continue
        return name
    raise AvatarError(f"no video encoder available among {', '.join(candidates)} in this FFmpeg build")


class VideoWriter:
    """Frame-exact video file writer (PyAV): ``with VideoWriter(path, fps) as w: w.write(frames)``.

    Args:
        path: output file (.mp4, .m4v, .mov or .mkv).
        fps: frame rate, exact: ``25``, ``Fraction(30000, 1001)``, ``"30000/1001"`` or ``29.97`` (see
            :func:`video_rate`). The stream's time base is 1/fps and frame k has PTS k, so k/fps is
            its exact timestamp in any container.
        codec: encoder; ``libx264`` (H.264) falls back to ``libopenh264``, then ``mpeg4``, when this
            FFmpeg lacks it. ``.codec`` holds the one used (a warning says when it fell back).
        crf: quality as x264's constant rate factor (0 best .. 51 worst; 18 is visually lossless).
            mpeg4 gets the quantiser ``round(crf / 6)`` in 1..31 (18 -> 3); libopenh264 a bit rate of
            ``0.2 · 2^((18 - crf) / 6)`` bits per pixel.
        pix_fmt: encoded pixel format. ``yuv420p`` (players' default) needs even sizes: frames of odd
            width or height are padded by repeating their last column / row, so the file is
            (H + H % 2) × (W + W % 2); ``.encoded_size`` is (width, height) as written.
        options: extra encoder options (strings), e.g. ``{"preset": "veryfast"}``; they override the
            defaults (``crf``, and x264's ``x264-params``).
        timestamps: optional presentation time in seconds of every frame, strictly increasing (a
            variable frame rate); frames then get PTS ``round(t · 90000)`` on a 1/90000 time base and
            ``fps`` is only the nominal rate. Exactly as many frames must be written.
        rotation: clockwise display rotation in degrees (0, 90, 180, 270) written as the stream's
            display matrix, as phones store portrait video (players and ``mp4_rotation`` honour it).
        deterministic: the same frames give the same bytes. x264's macroblock-tree rate control
            (mbtree) made files differ from run to run (PyAV 18.1's x264, even on one thread: 5
            different files in 10 runs; none with it off), so it is off unless this is False (mbtree
            saves some bits at the same quality).

    ``write(frames)``: uint8 RGB ``[T,H,W,3]`` or ``[H,W,3]`` (numpy, or a torch tensor on any
    device); every frame of a file has the same size. The file is written to a hidden temp file
    beside ``path`` and renamed onto it only by a successful ``close()``: an exception inside the
    ``with`` block, ``abort()``, or a killed process never leaves a half-written file at ``path``.
    A file without frames is an error.
    """

    def __init__(self, path, fps, codec: str = "libx264", crf: int = 18, pix_fmt: str = "yuv420p",
                 options: dict[str, str] | None = None, deterministic: bool = True, timestamps=None,
                 rotation: int = 0):
        from contextlib import ExitStack

        from avatarcli.stage.files import atomic_path, remove_stale_temps

        self.path = Path(path)
        self.format = CONTAINER_FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise AvatarError(f"video output must end in {', '.join(CONTAINER_FORMATS)}: {self.path}")
        if not 0 <= crf <= 51:
            raise AvatarError(f"crf must be in 0..51, got {crf}")
        self.fps = video_rate(fps)
        self.requested_codec, self.codec = codec, available_encoder(codec)
        if self.codec != codec:
            import warnings

            warnings.warn(f"video encoder {codec} is not available; writing {self.path.name} with {self.codec}",
                          RuntimeWarning, stacklevel=2)
        self.crf, self.pix_fmt, self.options = crf, pix_fmt, dict(options or {})
        self.deterministic = deterministic
        self.timestamps = None if timestamps is None else np.asarray(timestamps, np.float64)
        if self.timestamps is not None and (self.timestamps.ndim != 1 or np.any(np.diff(self.timestamps) <= 0)):
            raise AvatarError("video timestamps must be one strictly increasing time (s) per frame")
        if rotation % 90:
            raise AvatarError(f"video rotation must be a multiple of 90 degrees, got {rotation}")
        self.rotation = rotation % 360
        self.frames_written = 0
        self.size: tuple[int, int] | None = None
        """(width, height) of the frames given."""
        self.encoded_size: tuple[int, int] | None = None
        self._container = self._stream = None
        remove_stale_temps(self.path.parent, self.path.name)  # temp files of killed earlier runs
        self._files = ExitStack()
        self._tmp = self._files.enter_context(atomic_path(self.path))
        self._open = True

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)

    def _start(self, height: int, width: int) -> None:
        import av

        self.size = (width, height)
        even = self.pix_fmt in ("yuv420p", "yuvj420p", "nv12")
        self.encoded_size = (width + width % 2, height + height % 2) if even else (width, height)
        options = {"movflags": "+faststart"} if self.format in ("mp4", "mov") else {}
        self._container = av.open(str(self._tmp), mode="w", format=self.format, options=options)
        stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.width, stream.height = self.encoded_size
        stream.pix_fmt = self.pix_fmt
        time_base = Fraction(self.fps.denominator, self.fps.numerator)
        if self.timestamps is not None:
            time_base = Fraction(1, 90000)
        if self.rotation:
            stream.set_display_rotation(-self.rotation)  # FFmpeg's angle is counter-clockwise
        stream.time_base = time_base
        context = stream.codec_context
        context.time_base = time_base
        context.colorspace = context.color_primaries = context.color_trc = _BT601
        context.color_range = _LIMITED_RANGE
        options = {}
        if self.codec == "libx264":
            options["crf"] = str(self.crf)
            if self.deterministic:
                options["x264-params"] = "mbtree=0"
        elif self.codec == "mpeg4":
            context.qscale = True  # constant quantiser, ffmpeg's -q:v
            context.global_quality = min(31, max(1, round(self.crf / 6))) * 118  # FF_QP2LAMBDA
        elif self.codec == "libopenh264":
            width, height = self.encoded_size
            context.bit_rate = int(0.2 * 2 ** ((18 - self.crf) / 6) * width * height * float(self.fps))
        options.update(self.options)
        stream.options = options
        self._stream = stream

    def write(self, frames) -> None:
        """Append uint8 RGB frames ``[T,H,W,3]`` or ``[H,W,3]``."""
        import av

        if not self._open:
            raise AvatarError(f"video writer for {self.path} is closed")
        if hasattr(frames, "detach"):  # a torch tensor, without importing torch here
            frames = frames.detach().cpu().numpy()
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise AvatarError(f"video frames must be uint8 RGB [T,H,W,3] or [H,W,3], got {frames.dtype} "
                              f"{list(frames.shape)}")
        height, width = frames.shape[1:3]
        if self._stream is None:
            if height < 2 or width < 2:
                raise AvatarError(f"video frames must be at least 2×2 pixels, got {width}×{height}")
            self._start(height, width)
        elif (width, height) != self.size:
            raise AvatarError(f"video frames changed size from {self.size[0]}×{self.size[1]} to {width}×{height}")
        pad_w, pad_h = self.encoded_size[0] - width, self.encoded_size[1] - height
        if pad_w or pad_h:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        for frame in frames:
            # swscale's default conversion (BT.601, limited range: what the stream's colour tags say),
            # done here for every encoder alike, on one thread (frames are small; no slice races).
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture = picture.reformat(format=self.pix_fmt, threads=1)
            if self.timestamps is None:
                picture.pts = self.frames_written
            elif self.frames_written < len(self.timestamps):
                picture.pts = round(float(self.timestamps[self.frames_written]) * 90000)
            else:
                raise AvatarError(f"more frames than the {len(self.timestamps)} timestamps given for {self.path}")
            picture.time_base = self._stream.codec_context.time_base
            self._container.mux(self._stream.encode(picture))
            self.frames_written += 1

    def close(self) -> Path:
        """Flush the encoder, finish the file and move it to ``path``; returns ``path``."""
        if not self._open:
            return self.path
        if self.frames_written == 0:
            self.abort(AvatarError(f"no frames written to {self.path}"))
            raise AvatarError(f"no frames written to {self.path}")
        if self.timestamps is not None and self.frames_written != len(self.timestamps):
            problem = AvatarError(f"{self.frames_written} frames written to {self.path} for "
                                  f"{len(self.timestamps)} timestamps")
            self.abort(problem)
            raise problem
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
        except BaseException as exc:
            self.abort(exc)
            raise
        self._open = False
        self._files.close()  # rename the temp file onto path
        return self.path

    def abort(self, exc: BaseException | None = None) -> None:
        """Stop writing and remove the temp file (``path`` is left as it was)."""
        if not self._open:
            return
        self._open = False
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # a broken encoder or a full disk: the file is removed anyway
                pass
        exc = exc if exc is not None else AvatarError("video write aborted")
        self._files.__exit__(type(exc), exc, exc.__traceback__)


def write_video(path, frames, fps, codec: str = "libx264", crf: int = 18, pix_fmt: str = "yuv420p",
                options: dict[str, str] | None = None, deterministic: bool = True, timestamps=None,
                rotation: int = 0) -> VideoWriter:
    """Write uint8 RGB ``frames`` [T,H,W,3] (or an iterable of [H,W,3] / [t,H,W,3] chunks) to ``path``.

    Arguments as :class:`VideoWriter`; returns the closed writer (``.codec``, ``.frames_written``,
    ``.encoded_size``).
    """
    with VideoWriter(path, fps, codec, crf, pix_fmt, options, deterministic, timestamps, rotation) as writer:
        if isinstance(frames, np.ndarray) or hasattr(frames, "detach"):
            writer.write(frames)
        else:
            for chunk in frames:
                writer.write(chunk)
    return writer
