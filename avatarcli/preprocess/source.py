"""One source video -> face clips: decode at a fixed fps, detect, track the main face, 68 landmarks,
nose-centred square crops.

``config`` is the stage's ``PreprocessConfig`` (read here: fps, crop_size, crop_scale, det_every,
lmk_every, max_gap, min_frames, center_sigma, scale_sigma, batch_frames, frame_cache_mb); the
detector settings live in the :class:`avatarcli.face.analysis.FaceAnalysis` given. Torch is
imported inside the functions.

On CUDA a source's frames are uploaded once (by its prefetch thread) and every pass reads them on
the device; crops come back by async copies into page-locked buffers; steps are timed with CUDA
events on the thread's stream (no host waits).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from avatarcli.provenance import sha256_file
from avatarcli.runtime import thread_stream
from avatarcli.timing import StepTimer
from avatarcli.video import SkipInput, decode, open_video, resample_indices

BATCH_BYTES = 128 << 20


class Stopped(Exception):
    """The run was told to stop (Ctrl-C): raised between batches, the source is left unfinished."""


def never() -> bool:
    return False


def fingerprint(path: str) -> tuple[str, tuple[int, int]]:
    """(sha256, (size, mtime_ns)) of the file at ``path``; raises ``OSError``. The stat is taken
    before hashing, so a file changed while it is hashed looks changed to the next run."""
    stat = os.stat(path)
    return sha256_file(path), (stat.st_size, stat.st_mtime_ns)


def _checked(batches, should_stop: Callable[[], bool]):
    """``batches``, raising ``Stopped`` before each one once ``should_stop()``."""
    for item in batches:
        if should_stop():
            raise Stopped()
        yield item


@dataclass
class ClipResult:
    """One clip (a segment of the main face track) of a source; arrays per output frame [T,...]."""

    segment: int
    frames: np.ndarray
    boxes: np.ndarray
    kps5: np.ndarray
    lmk68: np.ndarray
    det_score: np.ndarray
    detected: np.ndarray
    landmarked: np.ndarray
    timestamps: np.ndarray
    source_frame: np.ndarray


@dataclass
class SourceResult:
    path: str
    status: str  # "ok" | "skipped"
    reason: str = ""
    sha256: str = ""
    source_fps: float = 0.0
    width: int = 0
    height: int = 0
    frames_in: int = 0
    clips: list[ClipResult] = field(default_factory=list)
    stat: tuple[int, int] | None = None  # (size, mtime_ns) of the source when it was hashed


class Prefetched(NamedTuple):
    """A source opened (and, when it fits the frame cache, decoded) ahead of its processing.
    ``reader`` is the ``SkipInput`` when the source cannot be opened; ``cached``: (offset, frames)
    batches, on the device for CUDA, or None."""

    reader: object
    info: object
    indices: np.ndarray | None
    times: np.ndarray | None
    cached: list | None
    sha256: str | None
    stat: tuple[int, int] | None = None


def frames_per_batch(config, info) -> int:
    """``config.batch_frames``, or for 0 the frames of ``info``'s size that fit in ``BATCH_BYTES`` (8 to 128)."""
    if config.batch_frames > 0:
        return config.batch_frames
    return int(np.clip(BATCH_BYTES // max(1, info.width * info.height * 3), 8, 128))


def effective_det_every(config, device: str) -> int:
    if config.det_every > 0:
        return config.det_every
    return 1 if device.startswith("cuda") else 3


def effective_lmk_every(config, device: str) -> int:
    if config.lmk_every > 0:
        return config.lmk_every
    return 1 if device.startswith("cuda") else 2


def rows_on(frames, rows, device):
    """Rows of a decoded batch (numpy, or a tensor already on the device) as a device tensor."""
    import torch

    if isinstance(frames, torch.Tensor):
        if len(rows) == len(frames):
            return frames
        return frames[torch.as_tensor(rows, device=frames.device)]
    return torch.from_numpy(np.ascontiguousarray(frames[rows])).to(device, non_blocking=True)


def upload(frames: np.ndarray, device):
    """Decoded frames to the GPU from a decode thread, on that thread's own stream."""
    import torch

    stream = thread_stream(device)
    with torch.cuda.stream(stream):
        # From pageable memory: page-locking it first cost the first run ~1.6 GB of cudaHostAlloc
        # (H100, 16 sources: 901 frames/s on the first run, 1072 without pinning)
        tensor = torch.from_numpy(frames).to(device, non_blocking=True)
    stream.synchronize()  # ready before another thread's stream reads it
    return tensor


def prefetch(path: str, config, timer: StepTimer | None = None, device: str = "cpu",
             should_stop: Callable[[], bool] = never) -> Prefetched:
    """Decode a whole source in a thread (decord releases the GIL) so the GPU never waits; on CUDA
    the frames are uploaded here too, overlapping the copies with other sources' kernels. Raises
    ``Stopped`` between batches once ``should_stop()``."""
    start = time.perf_counter()
    try:
        digest, stat = fingerprint(path)  # here, off the GPU thread
    except OSError:
        digest, stat = None, None  # process_source records the skip
    try:
        # CUDA: up to 8 sources decode at once; 2 decoder threads each fill the cores without
        # oversubscribing them (H100 host, 8 × 200 frames at 512²: 4470 frames/s, first ready
        # after 0.30 s; ffmpeg's automatic count: 3770 frames/s, 0.34 s)
        reader, info = open_video(path, num_threads=2 if device.startswith("cuda") else 0)
        indices, times = resample_indices(info.starts, info.ends, config.fps)
        cached = None
        if len(indices) * info.width * info.height * 3 <= config.frame_cache_mb * 1024 * 1024:
            cached = list(_checked(decode(reader, info, indices, frames_per_batch(config, info)), should_stop))
            if device.startswith("cuda"):
                cached = [(offset, upload(frames, device)) for offset, frames in cached]
        if timer is not None:
            timer.add("decode", time.perf_counter() - start, len(indices))
        return Prefetched(reader, info, indices, times, cached, digest, stat)
    except SkipInput as exc:
        return Prefetched(exc, None, None, None, None, digest, stat)


def _decoded_batches(reader, info, indices, config, cached: list | None):
    if cached is not None:
        yield from cached
        return
    yield from decode(reader, info, indices, frames_per_batch(config, info))


def process_source(
    path: str,
    config,
    faces,
    on_frames: Callable[[int], None] = lambda n: None,
    prefetched: Prefetched | None = None,
    timer: StepTimer | None = None,
    should_stop: Callable[[], bool] = never,
) -> SourceResult:
    """Everything for one input video (``faces``: a ``FaceAnalysis``); bad input becomes a skipped
    result with a reason. ``on_frames(n)``: progress, called as output frames are handled.
    Raises ``Stopped`` between batches once ``should_stop()`` (Ctrl-C)."""
    import torch

    from avatarcli.face import track

    result = SourceResult(path=path, status="skipped")
    timer = timer or StepTimer()
    try:
        if prefetched is not None and prefetched.sha256:
            result.sha256, result.stat = prefetched.sha256, prefetched.stat
        else:
            result.sha256, result.stat = fingerprint(path)
    except OSError as exc:
        result.reason = f"unreadable: {exc.strerror or exc}"
        return result
    try:
        if prefetched is not None:
            reader, info, indices, times, cached = prefetched[:5]
            if isinstance(reader, SkipInput):
                raise reader
        else:
            with timer.step("decode", sync=False):
                reader, info = open_video(path)
                indices, times = resample_indices(info.starts, info.ends, config.fps)
            cached = None
    except SkipInput as exc:
        result.reason = str(exc)
        return result
    result.source_fps, result.width, result.height = info.fps, info.width, info.height
    if info.rotation in (90, 270):
        result.width, result.height = info.height, info.width

    device = faces.device
    cache_limit = config.frame_cache_mb * 1024 * 1024
    keep = cached if cached is not None else ([] if len(indices) * info.width * info.height * 3 <= cache_limit else None)
    fresh_cache = cached is None and keep is not None

    # pass 1: detection on every det_every-th output frame (and the last one)
    det_every = effective_det_every(config, str(device))
    detections: list[track.FrameDetections | None] = [None] * len(indices)
    decoded = 0
    batches = _checked(_decoded_batches(reader, info, indices, config, cached), should_stop)
    while True:
        with timer.step("decode", sync=False):
            item = next(batches, None)
        if item is None:
            break
        offset, frames = item
        if device.type == "cuda" and not isinstance(frames, torch.Tensor):
            frames = torch.from_numpy(frames).to(device, non_blocking=True)  # uploaded once, used by every pass
        if fresh_cache:
            keep.append((offset, frames))
        positions = [i for i in range(len(frames)) if (offset + i) % det_every == 0 or offset + i == len(indices) - 1]
        if positions:
            with timer.step("detect", len(positions)):
                found = faces.detect(rows_on(frames, positions, device))
                for i, det in zip(positions, found):
                    detections[offset + i] = track.FrameDetections(det.boxes.numpy(), det.kps.numpy(), det.scores.numpy())
        decoded = offset + len(frames)
        on_frames(len(frames) // 2)
    if decoded == 0:
        result.reason = "no decodable frames (corrupt or truncated video)"
        return result
    result.frames_in = decoded
    notes = []
    truncated = decoded < len(indices)
    if truncated:
        notes.append(f"truncated: decoded {decoded} of {len(indices)} frames")
        detections = detections[:decoded]
        indices, times = indices[:decoded], times[:decoded]

    track_start = time.perf_counter()
    tracks = track.link_tracks(detections)
    main = track.main_track(detections, tracks)
    if main is None:
        result.reason = "; ".join(["no face detected", *notes])
        return result
    segments = track.segments(detections, main, config.max_gap)
    short = [s for s in segments if len(s.boxes) < config.min_frames]
    segments = [s for s in segments if len(s.boxes) >= config.min_frames]
    if short:
        notes.append(f"dropped {len(short)} piece(s) shorter than {config.min_frames} frames")
    if not segments:
        result.reason = "; ".join([f"no usable face track of at least {config.min_frames} frames "
                                   f"(longest {max(len(s.boxes) for s in short)})", *notes[:1 if truncated else 0]])
        return result
    timer.add("track", time.perf_counter() - track_start)

    def frame_batches():
        if keep is not None:
            yield from _checked(keep, should_stop)
            return
        stream = decode(reader, info, indices, frames_per_batch(config, info))
        while True:
            with timer.step("decode", sync=False):
                item = next(stream, None)
            if item is None:
                return
            if should_stop():
                raise Stopped()
            yield item

    frame_segment = np.full(len(indices), -1)
    for k, seg in enumerate(segments):
        frame_segment[seg.start : seg.stop] = k
    lmk_src, measured = _landmark_pass(frame_batches, segments, frame_segment, len(indices), config, faces, timer)
    _crop_pass(result, frame_batches, segments, frame_segment, lmk_src, measured, indices, times, config, device,
               timer, on_frames)
    result.status = "ok"
    result.reason = "; ".join(notes)
    return result


def _landmark_pass(frame_batches, segments, frame_segment, count: int, config, faces, timer):
    """Pass 2: landmarks [count,68,2] (source px) on every lmk_every-th frame of each segment (and its
    last), the rest interpolated; also which frames the model saw ([count] bool)."""
    lmk_every = effective_lmk_every(config, str(faces.device))
    lmk_src = np.zeros((count, 68, 2), np.float32)
    measured = np.zeros(count, bool)
    for seg in segments:
        local = np.arange(len(seg.boxes))
        measured[seg.start + local[(local % lmk_every == 0) | (local == len(local) - 1)]] = True
    for offset, frames in frame_batches():
        rows_boxes = []
        for i in range(len(frames)):
            k = frame_segment[offset + i]
            if k >= 0 and measured[offset + i]:
                rows_boxes.append((i, segments[k].boxes[offset + i - segments[k].start]))
        if not rows_boxes:
            continue
        rows = [r for r, _ in rows_boxes]
        with timer.step("landmarks", len(rows)):
            batch = rows_on(frames, rows, faces.device)
            lmk_src[offset + np.asarray(rows)] = faces.landmarks(batch, np.stack([b for _, b in rows_boxes]))
    for seg in segments:
        span = np.arange(seg.start, seg.stop)
        known = span[measured[span]]
        if len(known) < len(span):
            flat = lmk_src[known].reshape(len(known), -1)
            lmk_src[span] = np.stack([np.interp(span, known, flat[:, i]) for i in range(flat.shape[1])], 1).reshape(-1, 68, 2)
    return lmk_src, measured


def _crop_pass(result: SourceResult, frame_batches, segments, frame_segment, lmk_src, measured, indices, times,
               config, device, timer, on_frames) -> None:
    """Pass 3: the crop geometry per segment from the landmarks, then the crops; appends one
    ``ClipResult`` per segment to ``result``."""
    import torch

    from avatarcli.face import track
    from avatarcli.face.crop import boxes_xyxy, crop_batch, integer_boxes

    seg_crops = [
        integer_boxes(track.crop_boxes(lmk_src[s.start : s.stop], config.crop_scale, config.center_sigma, config.scale_sigma))
        for s in segments
    ]
    crop_shape = (config.crop_size, config.crop_size, 3)
    on_gpu = device.type == "cuda"
    if on_gpu:  # page-locked, so the crops come back by async copies (pageable ones cost ~24 ms per 200 frames)
        crops_out = [torch.empty((len(s.boxes), *crop_shape), dtype=torch.uint8, pin_memory=True) for s in segments]
    else:
        crops_out = [np.zeros((len(s.boxes), *crop_shape), np.uint8) for s in segments]
    for offset, frames in frame_batches():
        rows = [i for i in range(len(frames)) if frame_segment[offset + i] >= 0]
        if not rows:
            on_frames(len(frames) - len(frames) // 2)
            continue
        boxes = np.stack([seg_crops[frame_segment[offset + i]][offset + i - segments[frame_segment[offset + i]].start] for i in rows])
        with timer.step("crop", len(rows)):
            batch = rows_on(frames, rows, device)
            crops = crop_batch(batch, boxes, config.crop_size)
            # a segment is a contiguous range of frames: one copy per (batch, segment)
            j = 0
            while j < len(rows):
                k = frame_segment[offset + rows[j]]
                stop = j + 1
                while stop < len(rows) and frame_segment[offset + rows[stop]] == k:
                    stop += 1
                first = offset + rows[j] - segments[k].start
                if on_gpu:
                    crops_out[k][first : first + stop - j].copy_(crops[j:stop], non_blocking=True)
                else:
                    crops_out[k][first : first + stop - j] = crops[j:stop].numpy()
                j = stop
        on_frames(len(frames) - len(frames) // 2)
    if on_gpu:
        torch.cuda.current_stream().synchronize()  # the copies have landed before the writer reads them
        crops_out = [t.numpy() for t in crops_out]

    for k, seg in enumerate(segments):
        boxes = boxes_xyxy(seg_crops[k])
        origin = boxes[:, None, :2]
        to_crop = (config.crop_size / (boxes[:, 2] - boxes[:, 0]))[:, None, None]
        result.clips.append(ClipResult(
            segment=k,
            frames=crops_out[k],
            boxes=boxes,
            kps5=((seg.kps - origin) * to_crop).astype(np.float32),
            lmk68=((lmk_src[seg.start : seg.stop] - origin) * to_crop).astype(np.float32),
            det_score=seg.scores.astype(np.float32),
            detected=seg.detected.astype(bool),
            landmarked=measured[seg.start : seg.stop].copy(),
            timestamps=times[seg.start : seg.stop].astype(np.float64),
            source_frame=indices[seg.start : seg.stop].astype(np.int64),
        ))
