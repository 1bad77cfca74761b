"""Stage ``preprocess``: raw videos -> clips artifact (fixed fps, nose-centred square face crops).

check inputs -> prepare (expand inputs, load models) -> compute (per source: decode, detect,
track, landmarks, crop) -> write (one part file per source, then an atomic assembly).

Each source is a unit: its result goes to ``<output>.parts/<key>.h5`` (temp file + rename), so a
crash loses at most the source in flight and a rerun with the same config resumes. Sources already
in an existing output made with the same config are kept as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from avatarcli.artifact import (
    ArtifactWriter, FrameWriter, create_h5, read_strings, validate_unit,
)
from avatarcli.clips import write_clip_tables
from avatarcli.devices import resolve_device
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file
from avatarcli.schemas import CLIPS
from avatarcli.timing import StepTimer
from avatarcli.video import VIDEO_EXTENSIONS, SkipInput, decode, open_video, resample_indices

READS: tuple[str, ...] = ()
WRITES = CLIPS.kind
PART_VERSION = 1


@dataclass
class PreprocessConfig:
    """Settings of ``avatar preprocess``. Fields marked (result) change the output and are checked
    on resume; the others only change speed or reporting."""

    fps: float = 25.0
    """(result) Output frame rate; frames are picked by presentation timestamp."""
    crop_size: int = 256
    """(result) Side of the square output crops, pixels."""
    crop_scale: float = 2.0
    """(result) Crop side = crop_scale * max(2 * eye distance, 1.8 * eye-to-mouth) (FFHQ at 2.0)."""
    identity_from: str = "parent"
    """(result) Identity per clip: 'parent' folder name, file 'stem', or 'regex:PATTERN'
    (first group, else the whole match, searched in the full path)."""
    detector: str = "scrfd_2.5g"
    """(result) Registry name of the SCRFD face detector."""
    landmarker: str = "pfld68"
    """(result) Registry name of the 68-point landmark model."""
    det_size: int = 0
    """(result) Detector input side (multiple of 32); the padded frame is letterboxed into it.
    0 = auto: 640 on CUDA, 320 on CPU (faces must then be at least ~1/12 of the frame's long side)."""
    det_pad: float = 0.25
    """(result) Border added on every side before detection, as a fraction of the long side, so
    faces that fill the frame are found."""
    det_threshold: float = 0.5
    """(result) Minimum detector score."""
    det_every: int = 0
    """(result) Run the detector on every Nth output frame (boxes in between are interpolated and
    refined by the landmark model); 0 = auto (1 on CUDA, 3 on CPU)."""
    lmk_every: int = 0
    """(result) Run the landmark model on every Nth frame of a clip (and its last), interpolating the
    rest; 0 = auto (1 on CUDA, 2 on CPU). 1 gives model landmarks on every frame."""
    max_gap: int = 12
    """(result) Longest run of frames without the face that is interpolated; longer gaps split the clip."""
    min_frames: int = 25
    """(result) Clips shorter than this (after splitting) are dropped."""
    center_sigma: float = 1.0
    """(result) Temporal smoothing (Gaussian sigma, frames) of the crop centre."""
    scale_sigma: float = 5.0
    """(result) Temporal smoothing (Gaussian sigma, frames) of the crop size."""
    compression_level: int = 1
    """(result) Deflate level of the frames (0 = none)."""
    batch_frames: int = 0
    """Frames per decode and model batch; 0 = as many as fit in 128 MiB of decoded frames, 8 to 128
    (128 at 512²: on an H100, 32-frame batches ran at 394 frames/s and 128-frame ones at 605)."""
    frame_cache_mb: int = 2048
    """Keep a source's decoded frames in memory up to this size; longer sources are decoded again."""
    workers: int = 0
    """CPU: N > 1 processes each handle whole sources. CUDA: N decode threads feed the GPU
    (0 = auto: half the cores, 2 to 8)."""
    gpu_streams: int = 1
    """CUDA: sources processed at once, each in its own thread and CUDA stream, so one source's
    host-side work (tracking, Python) overlaps another's kernels. With 128-frame batches one is as
    fast or faster (H100, 16 × 200 frames at 512²: 1 stream 606-630 frames/s, 2 streams 525-544:
    the threads compete for the GIL)."""
    shard: str = ""
    """'K/N': process only inputs K, K+N, K+2N, … (0-based) for cluster job arrays."""
    strict: bool = False
    """Exit nonzero when any input is skipped."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    models_dir: str | None = None
    """Folder searched first for model files."""
    overwrite: bool = False
    """Discard an existing output or parts made with a different config instead of failing."""
    keep_parts: bool = False
    """Keep ``<output>.parts/`` after a successful run (debugging)."""

    def result_fields(self) -> dict:
        keys = ("fps", "crop_size", "crop_scale", "identity_from", "detector", "landmarker", "det_size",
                "det_pad", "det_threshold", "det_every", "lmk_every", "max_gap", "min_frames", "center_sigma",
                "scale_sigma", "compression_level")
        return {k: getattr(self, k) for k in keys}

    def result_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.result_fields(), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# check inputs


def expand_inputs(inputs: list[str]) -> list[str]:
    """Video files, folders (recursive, video extensions only) and text files listing paths,
    in the given order, folders sorted, duplicates dropped. Paths are made absolute."""
    result: list[str] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = str(path.absolute())
        if key not in seen:
            seen.add(key)
            result.append(key)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in VIDEO_EXTENSIONS:
                    add(child)
        elif path.suffix.lower() in {".txt", ".lst", ".list"} and path.is_file():
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line) if Path(line).is_absolute() else path.parent / line
                    add(entry)
        elif path.exists():
            add(path)
        else:
            raise AvatarError(f"input not found: {item}")
    return result


def identity_of(path: str, rule: str) -> str:
    p = Path(path)
    if rule == "parent":
        return p.parent.name or "unknown"
    if rule == "stem":
        return p.stem
    if rule.startswith("regex:"):
        match = re.search(rule[len("regex:"):], path)
        if not match:
            return "unknown"
        return match.group(1) if match.groups() else match.group(0)
    raise AvatarError(f"--identity-from must be parent, stem or regex:PATTERN, not {rule!r}")


def check_identity_rule(rule: str) -> None:
    if rule in ("parent", "stem"):
        return
    if not rule.startswith("regex:"):
        raise AvatarError(f"--identity-from must be parent, stem or regex:PATTERN, not {rule!r}")
    try:
        re.compile(rule[len("regex:"):])
    except re.error as exc:
        raise AvatarError(f"--identity-from: bad regular expression: {exc}") from None


def parse_shard(shard: str) -> tuple[int, int]:
    if not shard:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", shard)
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise AvatarError(f"--shard must be K/N with 0 <= K < N, not {shard!r}")
    return int(match.group(1)), int(match.group(2))


def source_key(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()[:12]


def clip_name(path: str, segment: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem)[:60]
    return f"{stem}-{source_key(path)[:8]}-{segment}"


# ------------------------------------------------------------------------------------------------
# compute


@dataclass
class ClipResult:
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


class FaceModels:
    """Detector and landmark model on one device; ``FaceModels.load`` keeps one per process."""

    _loaded: dict[tuple, "FaceModels"] = {}
    _lock = threading.Lock()

    def __init__(self, detector_path: Path, landmarker_path: Path, device: str):
        import torch

        from avatarcli.face.landmarks import PFLD68
        from avatarcli.face.scrfd import SCRFD

        self.device = torch.device(device)
        self.half = self.device.type == "cuda"
        self.detector_path, self.landmarker_path = detector_path, landmarker_path
        self.detector = SCRFD(self.detector_path, self.device, half=self.half)
        self.landmarker = PFLD68(self.landmarker_path, self.device, half=self.half)

    @classmethod
    def load(cls, config: PreprocessConfig, device: str) -> "FaceModels":
        """Resolved (and checksummed) each call; converted and traced once per process, since
        tracing the networks for each batch shape costs seconds on CUDA."""
        from avatarcli import registry

        detector = registry.resolve(config.detector, config.models_dir)
        landmarker = registry.resolve(config.landmarker, config.models_dir)
        key = (str(detector), str(landmarker), device)
        with cls._lock:
            if key not in cls._loaded:
                cls._loaded[key] = cls(detector, landmarker, device)
            return cls._loaded[key]


BATCH_BYTES = 128 << 20


def frames_per_batch(config: PreprocessConfig, info) -> int:
    """``config.batch_frames``, or for 0 the frames of ``info``'s size that fit in ``BATCH_BYTES`` (8 to 128)."""
    if config.batch_frames > 0:
        return config.batch_frames
    return int(np.clip(BATCH_BYTES // max(1, info.width * info.height * 3), 8, 128))


def effective_det_every(config: PreprocessConfig, device: str) -> int:
    if config.det_every > 0:
        return config.det_every
    return 1 if device.startswith("cuda") else 3


def effective_lmk_every(config: PreprocessConfig, device: str) -> int:
    if config.lmk_every > 0:
        return config.lmk_every
    return 1 if device.startswith("cuda") else 2


def _rows_on(frames, rows, device):
    """Rows of a decoded batch (numpy, or a tensor already on the device) as a device tensor."""
    import torch

    if isinstance(frames, torch.Tensor):
        if len(rows) == len(frames):
            return frames
        return frames[torch.as_tensor(rows, device=frames.device)]
    return torch.from_numpy(np.ascontiguousarray(frames[rows])).to(device, non_blocking=True)


def _upload(frames: np.ndarray, device):
    """Decoded frames to the GPU from a decode thread, on that thread's own stream."""
    import torch

    stream = _thread_stream(device)
    with torch.cuda.stream(stream):
        # From pageable memory: page-locking it first cost the first run ~1.6 GB of cudaHostAlloc
        # (H100, 16 sources: 901 frames/s on the first run, 1072 without pinning)
        tensor = torch.from_numpy(frames).to(device, non_blocking=True)
    stream.synchronize()  # ready before another thread's stream reads it
    return tensor


_STREAMS = threading.local()
_WORKER_THREADS: dict = {}  # (device, threads) -> ThreadPoolExecutor
_WORKER_LOCK = threading.Lock()


def _worker_threads(device: str, count: int):
    """The process's model threads for ``device``, kept across runs: PyTorch keeps cuDNN's
    execution plans per thread, and a fresh thread re-plans every convolution shape (measured on an
    H100: the first PFLD batch in a new thread took 1.0-1.5 s instead of 4 ms)."""
    from concurrent.futures import ThreadPoolExecutor

    key = (device, count)
    with _WORKER_LOCK:
        if key not in _WORKER_THREADS:
            _WORKER_THREADS[key] = ThreadPoolExecutor(count, thread_name_prefix=f"avatar-{device}")
        return _WORKER_THREADS[key]


def _thread_stream(device):
    import torch

    if getattr(_STREAMS, "stream", None) is None:
        _STREAMS.stream = torch.cuda.Stream(device)
    return _STREAMS.stream


def _decoded_batches(reader, info, indices, config, cached: list | None):
    if cached is not None:
        yield from cached
        return
    yield from decode(reader, info, indices, frames_per_batch(config, info))


def process_source(
    path: str,
    config: PreprocessConfig,
    models: FaceModels,
    on_frames: Callable[[int], None] = lambda n: None,
    prefetched=None,
    timer: StepTimer | None = None,
) -> SourceResult:
    """Everything for one input video; bad input becomes a skipped result with a reason."""
    import torch

    from avatarcli.face import track
    from avatarcli.face.crop import boxes_xyxy, crop_batch, integer_boxes
    from avatarcli.face.scrfd import detect

    result = SourceResult(path=path, status="skipped")
    timer = timer or StepTimer()
    try:
        result.sha256 = prefetched[5] if prefetched is not None and prefetched[5] else sha256_file(path)
    except OSError as exc:
        result.reason = f"unreadable: {exc.strerror or exc}"
        return result
    try:
        if prefetched is not None:
            reader, info, indices, times, cached, _ = prefetched
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

    device = models.device
    lmk_every = effective_lmk_every(config, str(device))
    det_size = config.det_size or (640 if device.type == "cuda" else 320)
    det_every = effective_det_every(config, str(device))
    cache_limit = config.frame_cache_mb * 1024 * 1024
    keep = cached if cached is not None else ([] if len(indices) * info.width * info.height * 3 <= cache_limit else None)
    fresh_cache = cached is None and keep is not None

    # pass 1: detection on every det_every-th output frame (and the last one)
    detections: list[track.FrameDetections | None] = [None] * len(indices)
    decoded = 0
    batches = _decoded_batches(reader, info, indices, config, cached)
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
                batch = _rows_on(frames, positions, device)
                found = detect(models.detector, batch, det_size, config.det_pad, config.det_threshold)
                for i, det in zip(positions, found):
                    detections[offset + i] = track.FrameDetections(det.boxes.numpy(), det.kps.numpy(), det.scores.numpy())
        decoded = offset + len(frames)
        on_frames(len(frames) // 2)
    if decoded == 0:
        result.reason = "no decodable frames (corrupt or truncated video)"
        return result
    result.frames_in = decoded
    notes = []
    if decoded < len(indices):
        notes.append(f"truncated: decoded {decoded} of {len(indices)} frames")
        detections = detections[:decoded]
        indices, times = indices[:decoded], times[:decoded]

    track_start = time.perf_counter()
    tracks = track.link_tracks(detections)
    main = track.main_track(detections, tracks)
    if main is None:
        result.reason = "no face detected"
        return result
    segments = track.segments(detections, main, config.max_gap)
    short = [s for s in segments if len(s.boxes) < config.min_frames]
    segments = [s for s in segments if len(s.boxes) >= config.min_frames]
    if short:
        notes.append(f"dropped {len(short)} piece(s) shorter than {config.min_frames} frames")
    if not segments:
        result.reason = (f"no usable face track of at least {config.min_frames} frames "
                         f"(longest {max(len(s.boxes) for s in short)})")
        return result

    # pass 2: landmarks on every frame of the kept segments
    frame_segment = np.full(len(indices), -1)
    for k, seg in enumerate(segments):
        frame_segment[seg.start : seg.stop] = k
    lmk_src = np.zeros((len(indices), 68, 2), np.float32)
    def frame_batches():
        if keep is not None:
            yield from keep
            return
        stream = decode(reader, info, indices, frames_per_batch(config, info))
        while True:
            with timer.step("decode", sync=False):
                item = next(stream, None)
            if item is None:
                return
            yield item

    def boxes_for(offset: int, count: int, attr: str) -> tuple[list[int], np.ndarray]:
        rows, values = [], []
        for i in range(count):
            k = frame_segment[offset + i]
            if k >= 0:
                seg = segments[k]
                rows.append(i)
                values.append(getattr(seg, attr)[offset + i - seg.start])
        return rows, np.asarray(values, np.float32)

    timer.add("track", time.perf_counter() - track_start)
    # landmarks on every lmk_every-th frame of each segment (and its last); the rest interpolated
    measured = np.zeros(len(indices), bool)
    for seg in segments:
        local = np.arange(len(seg.boxes))
        measured[seg.start + local[(local % lmk_every == 0) | (local == len(local) - 1)]] = True
    for offset, frames in frame_batches():
        rows, boxes = boxes_for(offset, len(frames), "boxes")
        rows_boxes = [(r, b) for r, b in zip(rows, boxes) if measured[offset + r]]
        if not rows_boxes:
            continue
        rows = [r for r, _ in rows_boxes]
        with timer.step("landmarks", len(rows)):
            batch = _rows_on(frames, rows, device)
            lmk_src[offset + np.asarray(rows)] = models.landmarker(batch, np.stack([b for _, b in rows_boxes]))
    for seg in segments:
        span = np.arange(seg.start, seg.stop)
        known = span[measured[span]]
        if len(known) < len(span):
            flat = lmk_src[known].reshape(len(known), -1)
            lmk_src[span] = np.stack([np.interp(span, known, flat[:, i]) for i in range(flat.shape[1])], 1).reshape(-1, 68, 2)

    # crop geometry per segment, then the crops
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
            batch = _rows_on(frames, rows, device)
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
    result.status = "ok"
    result.reason = "; ".join(notes)
    return result


# ------------------------------------------------------------------------------------------------
# write: part files (one per source) and the final assembly


def write_clip_group(group: h5py.Group, clip: ClipResult, result: SourceResult, config: PreprocessConfig,
                     frame_writer: FrameWriter) -> None:
    frame_writer.write(group, "frames", clip.frames)
    for name in ("boxes", "kps5", "lmk68", "det_score", "detected", "landmarked", "timestamps", "source_frame"):
        group.create_dataset(name, data=getattr(clip, name))
    group.attrs.update({
        "source_path": result.path, "source_fps": result.source_fps, "fps": config.fps,
        "segment": clip.segment, "source_width": result.width, "source_height": result.height,
        "identity": identity_of(result.path, config.identity_from), "identity_id": -1,
    })


def write_part(parts_dir: Path, result: SourceResult, config: PreprocessConfig, frame_writer: FrameWriter) -> Path:
    target = parts_dir / f"{source_key(result.path)}.h5"
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=parts_dir)
    os.close(fd)
    try:
        with create_h5(tmp) as handle:
            handle.attrs.update({
                "part_version": PART_VERSION, "config_hash": config.result_hash(), "source_path": result.path,
                "status": result.status, "reason": result.reason, "sha256": result.sha256,
                "frames_in": result.frames_in,
            })
            clips = handle.create_group("clips")
            for clip in result.clips:
                write_clip_group(clips.create_group(clip_name(result.path, clip.segment)), clip, result, config, frame_writer)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@dataclass
class UnitRecord:
    """A finished source: where its clip groups live (a part file or an earlier output)."""

    path: str
    status: str
    reason: str
    sha256: str
    file: Path | None
    clip_names: list[str]
    frames: int = 0


def read_part(part: Path, config_hash: str) -> UnitRecord | None:
    """A finished part, or None if it is unreadable (crash debris) or from another config."""
    try:
        with h5py.File(part, "r") as handle:
            if handle.attrs.get("config_hash") != config_hash or int(handle.attrs.get("part_version", 0)) != PART_VERSION:
                return None
            names = list(handle["clips"].keys())
            for name in names:
                validate_unit(handle["clips"][name], CLIPS, label=str(part))
            frames = sum(int(handle["clips"][n]["frames"].shape[0]) for n in names)
            return UnitRecord(str(handle.attrs["source_path"]), str(handle.attrs["status"]), str(handle.attrs["reason"]),
                              str(handle.attrs["sha256"]), part, names, frames)
    except Exception:
        return None


def units_from_output(output: Path, config: PreprocessConfig) -> dict[str, UnitRecord]:
    """Sources already finished in an existing output (reused when its config matches)."""
    from avatarcli.artifact import open_artifact, read_config

    if not output.exists():
        return {}
    try:
        handle = open_artifact(output, CLIPS.kind)
    except AvatarError:
        if config.overwrite:
            return {}
        raise AvatarError(f"{output} exists and is not a clips artifact; use --overwrite to replace it") from None
    with handle:
        old = read_config(handle)
        if old.get("result_hash") != config.result_hash():
            if config.overwrite:
                return {}
            raise AvatarError(f"{output} exists and was made with different settings; use --overwrite to replace it "
                              "or choose another output")
        paths = read_strings(handle["sources/path"])
        status = read_strings(handle["sources/status"])
        reasons = read_strings(handle["sources/reason"])
        hashes = read_strings(handle["sources/sha256"])
        clip_ids = read_strings(handle["index/clip_id"])
        source_ids = handle["index/source_id"][()]
        frames = handle["index/num_frames"][()]
    units = {}
    for row, path in enumerate(paths):
        mine = [clip_ids[i] for i in np.flatnonzero(source_ids == row)]
        units[path] = UnitRecord(path, status[row], reasons[row], hashes[row], output, mine,
                                 int(frames[source_ids == row].sum()))
    return units


class ClipsAssembler:
    """Builds the final artifact while the run goes on: finished units are copied into its temp
    file in source order as they arrive (``offer``, from any thread; one background thread copies),
    so at the end only the tables remain (the copies were a 0.45 s serial tail per 3200 frames on
    the H100). Identity ids are known only when every source is done: set in ``finish``.
    Use as a context manager; leaving it with an exception removes the temp file."""

    def __init__(self, output: Path, sources: list[str], config: PreprocessConfig):
        self.sources, self.config = sources, config
        self.position = {p: i for i, p in enumerate(sources)}
        config_json = {**asdict(config), "result_hash": config.result_hash(), "kind": CLIPS.kind}
        self.writer = ArtifactWriter(output, CLIPS, config_json, [],
                                     extra_attrs={"crop_size": config.crop_size, "fps": config.fps})
        self.ready: dict[int, UnitRecord] = {}
        self.next = 0  # sources before this one are copied
        self.copied: list[tuple[int, str, int]] = []  # (source row, clip name, frames)
        self.lock = threading.Condition()
        self.failure: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.open_files: dict[Path, h5py.File] = {}

    def __enter__(self) -> "ClipsAssembler":
        self.writer.__enter__()
        self.clips = self.writer.handle.create_group("clips", track_order=True)
        self.thread = threading.Thread(target=self._copy_loop, daemon=True, name="assemble")
        self.thread.start()
        return self

    def offer(self, unit: UnitRecord) -> None:
        with self.lock:
            self.ready[self.position[unit.path]] = unit
            self.lock.notify_all()

    def _copy_loop(self) -> None:
        try:
            while True:
                with self.lock:
                    while self.next not in self.ready and self.next < len(self.sources) and self.failure is None:
                        self.lock.wait()
                    if self.next >= len(self.sources) or self.failure is not None:
                        return
                    row, unit = self.next, self.ready[self.next]
                self._copy(row, unit)
                with self.lock:
                    self.next += 1
                    self.lock.notify_all()
        except BaseException as exc:  # re-raised by finish()
            with self.lock:
                self.failure = exc
                self.lock.notify_all()

    def _copy(self, row: int, unit: UnitRecord) -> None:
        if not unit.clip_names:
            return
        if unit.file not in self.open_files:
            self.open_files[unit.file] = h5py.File(unit.file, "r")
        src = self.open_files[unit.file]["clips"]
        for name in unit.clip_names:
            src.copy(src[name], self.clips, name=name)  # H5Ocopy: compressed chunks copied as is
            self.clips[name].attrs["identity"] = identity_of(unit.path, self.config.identity_from)
            self.copied.append((row, name, int(self.clips[name]["frames"].shape[0])))
        if Path(unit.file) != Path(self.writer.path):
            self.open_files.pop(unit.file).close()  # a part file: done with it

    def finish(self, units: dict[str, UnitRecord]) -> dict:
        """Wait for the copies, write the tables; the artifact is validated and renamed on exit."""
        for unit in units.values():
            if self.position.get(unit.path, -1) not in self.ready:
                self.offer(unit)
        self.thread.join()
        if self.failure is not None:
            raise self.failure
        sources, config = self.sources, self.config
        identities = sorted({identity_of(p, config.identity_from) for p in sources
                             if units[p].status == "ok" and units[p].clip_names})
        identity_ids = {name: i for i, name in enumerate(identities)}
        clip_identity = []
        for row, name, _ in self.copied:
            identity_id = identity_ids[identity_of(sources[row], config.identity_from)]
            self.clips[name].attrs["identity_id"] = identity_id
            clip_identity.append(identity_id)
        self.writer.parents = [(p, units[p].sha256) for p in sources]
        write_clip_tables(
            self.writer.handle, [c[1] for c in self.copied], clip_identity, [c[2] for c in self.copied],
            [c[0] for c in self.copied], identities, sources,
            [units[p].sha256 for p in sources], [units[p].status for p in sources],
            [units[p].reason for p in sources], [len(units[p].clip_names) for p in sources],
        )
        return {"clips": len(self.copied), "frames": int(sum(c[2] for c in self.copied)), "identities": len(identities)}

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.thread is not None and self.thread.is_alive():
            with self.lock:
                self.failure = self.failure or RuntimeError("assembly stopped")
                self.lock.notify_all()
            self.thread.join()
        for handle in self.open_files.values():
            handle.close()
        self.open_files.clear()
        self.writer.__exit__(exc_type, exc, tb)


# ------------------------------------------------------------------------------------------------
# orchestration


_WORKER: dict = {}


def _worker_init(config: PreprocessConfig, parts_dir: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["config"] = config
    _WORKER["parts"] = Path(parts_dir)
    _WORKER["models"] = FaceModels.load(config, "cpu")
    _WORKER["writer"] = FrameWriter(config.compression_level, threads=threads)


def _worker_run(path: str) -> tuple[str, str, str, int, int]:
    config = _WORKER["config"]
    result = process_source(path, config, _WORKER["models"])
    write_part(_WORKER["parts"], result, config, _WORKER["writer"])
    return path, result.status, result.reason, len(result.clips), sum(len(c.frames) for c in result.clips)


def _prefetch(path: str, config: PreprocessConfig, timer: StepTimer | None = None, device: str = "cpu"):
    """Decode a whole source in a thread (decord releases the GIL) so the GPU never waits; on CUDA
    the frames are uploaded here too, overlapping the copies with other sources' kernels."""
    start = time.perf_counter()
    try:
        digest = sha256_file(path)  # here, off the GPU thread
    except OSError:
        digest = None  # process_source records the skip
    try:
        # CUDA: up to 8 sources decode at once; 2 decoder threads each fill the cores without
        # oversubscribing them (H100 host, 8 × 200 frames at 512²: 4470 frames/s, first ready
        # after 0.30 s; ffmpeg's automatic count: 3770 frames/s, 0.34 s)
        reader, info = open_video(path, num_threads=2 if device.startswith("cuda") else 0)
        indices, times = resample_indices(info.starts, info.ends, config.fps)
        cached = None
        if len(indices) * info.width * info.height * 3 <= config.frame_cache_mb * 1024 * 1024:
            cached = list(decode(reader, info, indices, frames_per_batch(config, info)))
            if device.startswith("cuda"):
                cached = [(offset, _upload(frames, device)) for offset, frames in cached]
        if timer is not None:
            timer.add("decode", time.perf_counter() - start, len(indices))
        return reader, info, indices, times, cached, digest
    except SkipInput as exc:
        return exc, None, None, None, None, digest


@dataclass
class RunSummary:
    output: Path
    clips: int
    frames: int
    identities: int
    sources: int
    skipped: list[tuple[str, str]]
    processed_now: int
    reused: int
    seconds: float
    frames_now: int
    timings: dict = field(default_factory=dict)
    device: str = "cpu"


def run(config: PreprocessConfig, inputs: list[str], output: str | Path, progress=None) -> RunSummary:
    """Run the stage. ``progress`` is an optional ``avatarcli.cli.common.StageProgress``."""
    started = time.perf_counter()
    output = Path(output)
    check_identity_rule(config.identity_from)
    shard_index, shard_count = parse_shard(config.shard)
    if config.fps <= 0 or config.crop_size < 16 or config.crop_scale <= 0:
        raise AvatarError("--fps must be > 0, --crop-size >= 16 and --crop-scale > 0")
    if config.batch_frames < 0:
        raise AvatarError("--batch-frames must be >= 0 (0 = by frame size)")
    sources = expand_inputs(inputs)
    sources = [p for i, p in enumerate(sources) if i % shard_count == shard_index]
    if not sources:
        raise AvatarError("no video inputs found" + (f" in shard {config.shard}" if config.shard else ""))
    device = resolve_device(config.device)

    # prepare: reuse finished units from the existing output and from parts of a crashed run
    parts_dir = output.with_name(output.name + ".parts")
    source_set = set(sources)
    units = units_from_output(output, config)
    units = {p: u for p, u in units.items() if p in source_set}
    if parts_dir.exists():
        stamp = parts_dir / "config.json"
        same = stamp.exists() and json.loads(stamp.read_text()).get("result_hash") == config.result_hash()
        if not same and not config.overwrite:
            raise AvatarError(f"{parts_dir} holds a run with different settings; use --overwrite or delete it")
        if not same:
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    (parts_dir / "config.json").write_text(json.dumps({"result_hash": config.result_hash(), **config.result_fields()}))
    for part in parts_dir.glob("*.h5"):
        record = read_part(part, config.result_hash())
        if record is not None and record.path in source_set and record.path not in units:
            units[record.path] = record
    todo = [p for p in sources if p not in units]
    reused = len(sources) - len(todo)
    frames_now = 0
    # CUDA: GPU steps are timed with events on the thread's stream, so timing them adds no host waits
    timer = StepTimer(cuda_events=device.startswith("cuda"))

    if progress is not None:
        progress.start(total_units=len(sources), done_units=reused)

    finished_lock = threading.Lock()

    def finished(path: str, status: str, reason: str, clips: int, frames: int) -> None:
        nonlocal frames_now
        with finished_lock:
            frames_now += frames
            if progress is not None:
                progress.unit_done(Path(path).name, status, reason)

    assembler = ClipsAssembler(output, sources, config)
    done_units: dict[str, UnitRecord] = {}

    def unit_finished(record: UnitRecord) -> None:
        with finished_lock:
            done_units[record.path] = record
        assembler.offer(record)

    with assembler:
        for unit in units.values():  # finished before: copied while the rest runs
            assembler.offer(unit)
        if todo:
            if device == "cpu" and config.workers > 1:
                threads = max(1, (os.cpu_count() or 1) // config.workers)
                import multiprocessing as mp

                with ProcessPoolExecutor(config.workers, mp_context=mp.get_context("spawn"),
                                         initializer=_worker_init, initargs=(config, str(parts_dir), threads)) as pool:
                    futures = [pool.submit(_worker_run, p) for p in todo]
                    for future in as_completed(futures):
                        path, status, reason, clips, frames = future.result()
                        record = read_part(parts_dir / f"{source_key(path)}.h5", config.result_hash())
                        if record is not None:
                            unit_finished(record)
                        if progress is not None:
                            progress.advance_frames(frames)
                        finished(path, status, reason, clips, frames)
            else:
                from concurrent.futures import ThreadPoolExecutor

                with timer.step("load_models", sync=False):
                    models = FaceModels.load(config, device)
                frame_writer = FrameWriter(config.compression_level)
                decode_threads = 1
                if device.startswith("cuda"):  # 0 = auto: half the cores decode (decord releases the GIL)
                    decode_threads = config.workers or max(2, min(8, (os.cpu_count() or 2) // 2))
                # A bounded window of sources decoding ahead; writes happen in one background thread.
                write_queue: queue.Queue = queue.Queue(maxsize=2)
                errors: list[BaseException] = []

                def writer_loop() -> None:
                    while (item := write_queue.get()) is not None:
                        try:
                            frames = sum(len(c.frames) for c in item.clips)
                            with timer.step("write", frames, sync=False):
                                part = write_part(parts_dir, item, config, frame_writer)
                            unit_finished(UnitRecord(item.path, item.status, item.reason, item.sha256, part,
                                                     sorted(clip_name(item.path, c.segment) for c in item.clips), frames))
                            finished(item.path, item.status, item.reason, len(item.clips), frames)
                        except BaseException as exc:  # surfaced in the main thread below
                            errors.append(exc)

                advance = progress.advance_frames if progress else (lambda n: None)
                cuda = device.startswith("cuda")

                def process(path: str, fetched) -> None:
                    if cuda:
                        import torch

                        with torch.cuda.stream(_thread_stream(device)):
                            result = process_source(path, config, models, advance, prefetched=fetched, timer=timer)
                    else:
                        result = process_source(path, config, models, advance, prefetched=fetched, timer=timer)
                    write_queue.put(result)

                # Two writers: one can write chunks while the other waits on its compression threads.
                writers = [threading.Thread(target=writer_loop, daemon=True) for _ in range(2 if cuda else 1)]
                # GPU threads give up the GIL at every sync; with decode and write threads busy they
                # would wait a whole switch interval (5 ms) to get it back.
                switch_interval = sys.getswitchinterval()
                if cuda:
                    sys.setswitchinterval(0.0005)
                for writer in writers:
                    writer.start()
                streams = max(1, config.gpu_streams) if cuda else 1
                try:
                    with ThreadPoolExecutor(decode_threads) as decoders:
                        model_pool = _worker_threads(device, streams)
                        window = decode_threads + streams
                        pending = [decoders.submit(_prefetch, p, config, timer, device) for p in todo[:window]]
                        running: list = []
                        for i, path in enumerate(todo):
                            if errors:
                                raise errors[0]
                            fetched = pending[i].result()
                            pending[i] = None  # the processing task holds the frames from here
                            if i + window < len(todo):
                                pending.append(decoders.submit(_prefetch, todo[i + window], config, timer, device))
                            running.append(model_pool.submit(process, path, fetched))
                            del fetched
                            while len(running) >= streams:  # bounded: at most `streams` sources in flight
                                done = next(as_completed(running))
                                running.remove(done)
                                done.result()
                        for task in running:
                            task.result()
                finally:
                    for writer in writers:
                        write_queue.put(None)
                    for writer in writers:
                        writer.join()
                    frame_writer.close()
                    sys.setswitchinterval(switch_interval)
                if errors:
                    raise errors[0]
            units.update(done_units)
            missing = [p for p in sources if p not in units]
            if missing:
                raise AvatarError(f"{len(missing)} input(s) were not finished (first: {missing[0]}); rerun to resume")

        assemble_start = time.perf_counter()
        counts = assembler.finish(units)
    timer.add("assemble", time.perf_counter() - assemble_start, len(sources))  # tables, validation, rename
    if not config.keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    skipped = [(p, units[p].reason) for p in sources if units[p].status != "ok"]
    return RunSummary(output, counts["clips"], counts["frames"], counts["identities"], len(sources), skipped,
                      len(todo), reused, time.perf_counter() - started, frames_now, timer.as_dict(), device)
