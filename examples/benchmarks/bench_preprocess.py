#!/usr/bin/env python
"""Performance benchmark of ``avatar preprocess`` (stage ``stages.preprocess``).

The test video is symlinked ``--copies`` times into a temp folder so the stage sees that many
sources. After one untimed warm-up run (one copy: model conversion and CUDA tracing, which the
stage does once per process, and caches out of the numbers), the stage is run ``--repeats``
times into a fresh output each time. End-to-end frames/s is ``frames_now / seconds`` of the
stage's own ``Summary``: decode, detection, landmarks, crop, part writes, final assembly and
per-run model resolution (checksums) are all included; nothing is subtracted.

A naive baseline (what a user would write: decord one frame at a time, the original SCRFD and
PFLD ONNX models on onnxruntime CPU at batch 1, numpy pre/post-processing, cv2 crops, one h5py
write per frame) is timed on the first ``--naive-frames`` frames of the same video.

Prints ONE JSON object on stdout; progress goes to stderr.

    python examples/benchmarks/bench_preprocess.py --device cpu --copies 2 --repeats 1 --naive-frames 30
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

STEPS = ("decode", "detect", "landmarks", "crop", "write", "track", "assemble", "load_models")
TARGETS = {"gpu_fps_512": 1000, "speedup_vs_naive": 5, "cpu_fps_2cores": 60}
DEFAULT_VIDEO = REPO_ROOT.parent / "shared/assets/data/sadtalker_hdtf/WDA_AlexandriaOcasioCortez_000.mp4"



def _resize(image, size):
    """cv2.resize where OpenCV is installed (as users have it), else Pillow (the GPU image lacks OpenCV)."""
    try:
        import cv2

        return cv2.resize(image, size)
    except ImportError:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def log(*parts) -> None:
    print("[bench_preprocess]", *parts, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    default_models = os.environ.get("AVATAR_MODELS") or str(REPO_ROOT.parent / "shared/assets/models")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video", default=str(DEFAULT_VIDEO), help="test video (512x512, 25 fps, 200 frames by default)")
    p.add_argument("--copies", type=int, default=8, help="symlinks of the video the stage sees as separate sources")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=3, help="timed stage runs")
    p.add_argument("--workers", type=int, default=0, help="PreprocessConfig.workers")
    p.add_argument("--gpu-streams", type=int, default=1, help="PreprocessConfig.gpu_streams")
    p.add_argument("--det-every", type=int, default=0, help="PreprocessConfig.det_every (0 = stage's auto)")
    p.add_argument("--lmk-every", type=int, default=0, help="PreprocessConfig.lmk_every (0 = stage's auto)")
    p.add_argument("--det-size", type=int, default=0, help="PreprocessConfig.det_size (0 = stage's auto)")
    p.add_argument("--batch-frames", type=int, default=0, help="PreprocessConfig.batch_frames (0 = stage's auto)")
    p.add_argument("--naive-frames", type=int, default=100, help="frames of the naive baseline (0 = skip it)")
    p.add_argument("--models", default=default_models, help="models folder ($AVATAR_MODELS or ../shared/assets/models)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.copies < 1 or args.repeats < 1:
        p.error("--copies and --repeats must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# stage runs


def make_sources(folder: Path, video: Path, copies: int) -> Path:
    """``copies`` symlinks of ``video`` with distinct names (distinct sources for the stage)."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = video.suffix or ".mp4"
    for i in range(copies):
        (folder / f"{video.stem}_copy{i:03d}{suffix}").symlink_to(video)
    return folder


def make_config(args: argparse.Namespace):
    from stages.preprocess import PreprocessConfig

    return PreprocessConfig(
        device=args.device, workers=args.workers, gpu_streams=args.gpu_streams, det_every=args.det_every, lmk_every=args.lmk_every,
        det_size=args.det_size, batch_frames=args.batch_frames, models_dir=args.models, overwrite=True,
    )


def cuda_sync(device: str) -> None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))


def run_stage(args: argparse.Namespace, sources: Path, work: Path, label: str):
    from avatarcli.devices import resolve_device
    from stages.preprocess import run

    config = make_config(args)
    device = resolve_device(config.device)
    out_dir = Path(tempfile.mkdtemp(prefix=f"{label}_", dir=work))
    try:
        cuda_sync(device)
        summary = run(config, [str(sources)], out_dir / "clips.h5")
        cuda_sync(device)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return config, summary


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# ------------------------------------------------------------------------------------------------
# naive baseline: per-frame onnxruntime CPU, numpy pre/post-processing, one h5py write per frame

DET_SIZE = 640
STRIDES = (8, 16, 32)


def _nms(dets: np.ndarray, thresh: float) -> list[int]:
    """insightface's numpy NMS on [n,5] (x0, y0, x1, y1, score)."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


class NaiveSCRFD:
    """The original SCRFD ONNX at batch 1 on onnxruntime CPU, insightface-style."""

    def __init__(self, path: str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self._centers: dict[int, np.ndarray] = {}

    def centers(self, stride: int) -> np.ndarray:
        if stride not in self._centers:
            side = DET_SIZE // stride
            grid = np.stack(np.mgrid[:side, :side][::-1], axis=-1).astype(np.float32)
            grid = (grid * stride).reshape(-1, 2)
            self._centers[stride] = np.stack([grid] * 2, axis=1).reshape(-1, 2)  # 2 anchors per cell
        return self._centers[stride]

    def detect(self, rgb: np.ndarray, threshold: float = 0.5, nms_thresh: float = 0.4):

        h, w = rgb.shape[:2]
        if h / w > 1.0:
            new_h, new_w = DET_SIZE, int(DET_SIZE * w / h)
        else:
            new_w, new_h = DET_SIZE, int(DET_SIZE * h / w)
        det_scale = new_h / h
        canvas = np.zeros((DET_SIZE, DET_SIZE, 3), np.uint8)
        canvas[:new_h, :new_w] = _resize(rgb, (new_w, new_h))
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]  # RGB NCHW
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})
        all_scores, all_boxes, all_kps = [], [], []
        for level, stride in enumerate(STRIDES):
            scores = outs[level].reshape(-1)
            dist = outs[level + 3] * stride
            offs = outs[level + 6] * stride
            centers = self.centers(stride)
            pos = np.where(scores >= threshold)[0]
            if pos.size == 0:
                continue
            c = centers[pos]
            d = dist[pos]
            boxes = np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], -1)
            kps = c[:, None, :] + offs[pos].reshape(-1, 5, 2)
            all_scores.append(scores[pos])
            all_boxes.append(boxes)
            all_kps.append(kps)
        if not all_scores:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        scores = np.concatenate(all_scores)
        boxes = np.concatenate(all_boxes) / det_scale
        kps = np.concatenate(all_kps) / det_scale
        dets = np.hstack([boxes, scores[:, None]]).astype(np.float32)
        keep = _nms(dets, nms_thresh)
        return dets[keep], kps[keep]


def crop_padded(rgb: np.ndarray, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """Square (x0, y0, side) of ``rgb`` with zeros outside the frame, cv2-resized to size x size."""

    h, w = rgb.shape[:2]
    side = max(int(side), 1)
    patch = np.zeros((side, side, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return _resize(patch, (size, size))


def run_naive(video: Path, models_dir: Path, frames: int, work: Path) -> dict:
    import decord
    import h5py
    import onnxruntime as ort

    det_path = models_dir / "face_detection/scrfd_2.5g_bnkps.onnx"
    lmk_path = models_dir / "landmarks68/pfld_68.onnx"
    detector = NaiveSCRFD(str(det_path))
    pfld = ort.InferenceSession(str(lmk_path), providers=["CPUExecutionProvider"])
    pfld_input = pfld.get_inputs()[0].name
    vr = decord.VideoReader(str(video), ctx=decord.cpu(0))
    count = min(frames, len(vr))
    # one untimed frame through both models (onnxruntime's first run allocates)
    first = vr[0].asnumpy()
    detector.detect(first)
    pfld.run(None, {pfld_input: np.zeros((1, 3, 112, 112), np.float32)})
    vr.seek(0)

    out_path = work / "naive.h5"
    faces = 0
    start = time.perf_counter()
    with h5py.File(out_path, "w") as handle:
        ds = handle.create_dataset("frames", shape=(count, 256, 256, 3), dtype=np.uint8,
                                   chunks=(1, 256, 256, 3), compression="gzip", compression_opts=1)
        for i in range(count):
            rgb = vr[i].asnumpy()
            dets, kps = detector.detect(rgb)
            if len(dets) == 0:
                ds[i] = np.zeros((256, 256, 3), np.uint8)
                continue
            faces += 1
            areas = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
            k = int(np.argmax(areas))
            box, pts = dets[k, :4], kps[k]
            # PFLD 68 landmarks: square 1.1*max(w, h) around the box centre, zero-padded, 112x112 RGB [0,1]
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            side = int(round(1.1 * max(box[2] - box[0], box[3] - box[1])))
            lx0, ly0 = int(round(cx - side / 2)), int(round(cy - side / 2))
            patch = crop_padded(rgb, lx0, ly0, side, 112)
            blob = (patch.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
            lmk = pfld.run(None, {pfld_input: np.ascontiguousarray(blob)})[0].reshape(68, 2)
            lmk = lmk * side + np.array([lx0, ly0], np.float32)  # noqa: F841  (a real script would store it)
            # output crop: 256x256 around the nose keypoint, side 4 * eye distance
            nose = pts[2]
            eye_dist = float(np.linalg.norm(pts[0] - pts[1]))
            cside = max(int(round(4 * eye_dist)), 1)
            cx0, cy0 = int(round(nose[0] - cside / 2)), int(round(nose[1] - cside / 2))
            ds[i] = crop_padded(rgb, cx0, cy0, cside, 256)
    seconds = time.perf_counter() - start
    out_path.unlink(missing_ok=True)
    return {"frames": count, "fps": count / seconds, "seconds": seconds, "frames_with_face": faces,
            "ort_threads": "onnxruntime default (all cores)"}


# ------------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def main(args: argparse.Namespace) -> dict:
    import torch

    from avatarcli.devices import resolve_device
    from avatarcli.face.analysis import auto_det_size
    from avatarcli.preprocess.source import effective_det_every, effective_lmk_every
    from avatarcli.video import open_video

    video = Path(args.video).absolute()
    if not video.is_file():
        raise SystemExit(f"video not found: {video}")
    models_dir = Path(args.models).absolute()
    args.models = str(models_dir)
    reader, info = open_video(str(video))
    del reader
    device = resolve_device(args.device)
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * len(os.sched_getaffinity(0)):
        log(f"warning: load average {load_before[0]:.2f} at start; other processes may skew the numbers")
    log(f"video {video.name}: {info.width}x{info.height} {info.fps:.2f} fps {info.num_frames} frames; "
        f"device {device}; copies {args.copies}; repeats {args.repeats}")

    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        warm_sources = make_sources(work / "warm_src", video, 1)
        sources = make_sources(work / "src", video, args.copies)

        log("warm-up run (1 copy, untimed) ...")
        t0 = time.perf_counter()
        _, warm = run_stage(args, warm_sources, work, "warm")
        log(f"warm-up: {warm.frames_now} frames in {time.perf_counter() - t0:.2f}s")

        summaries = []
        config = None
        for r in range(args.repeats):
            config, summary = run_stage(args, sources, work, f"run{r}")
            if summary.frames_now <= 0:
                raise SystemExit(f"stage produced no frames (skipped: {summary.skipped})")
            summaries.append(summary)
            log(f"repeat {r + 1}/{args.repeats}: {summary.frames_now} frames in {summary.seconds:.2f}s "
                f"= {summary.frames_now / summary.seconds:.1f} fps; "
                + ", ".join(f"{k} {v['seconds']:.2f}s" for k, v in summary.timings.items()))

        e2e = [s.frames_now / s.seconds for s in summaries]
        steps = {}
        for name in STEPS:
            secs = [s.timings[name]["seconds"] for s in summaries if name in s.timings]
            fps = [s.frames_now / s.timings[name]["seconds"] for s in summaries
                   if name in s.timings and s.timings[name]["seconds"] > 0]
            if not secs:
                steps[name] = None  # not timed in this process (e.g. CPU --workers > 1)
                continue
            steps[name] = {
                "seconds_median": statistics.median(secs),
                "fps_median": statistics.median(fps) if fps else None,
                "fps_min": min(fps) if fps else None,
                "fps_max": max(fps) if fps else None,
                "seconds_runs": secs,
                "items_runs": [s.timings[name]["items"] for s in summaries],
            }

        naive = None
        if args.naive_frames > 0:
            log(f"naive baseline: {args.naive_frames} frames, onnxruntime CPU batch 1 ...")
            naive = run_naive(video, models_dir, args.naive_frames, work)
            log(f"naive: {naive['frames']} frames in {naive['seconds']:.2f}s = {naive['fps']:.1f} fps")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    stage_device = summaries[0].device
    e2e_spread = spread(e2e)
    result = {
        "benchmark": "preprocess",
        "device": device_name(stage_device),
        "device_type": stage_device,
        "cpu": {"count": os.cpu_count(), "available": len(os.sched_getaffinity(0)),
                "torch_threads": torch.get_num_threads()},
        "load_average": {"start": [round(v, 2) for v in load_before],
                         "end": [round(v, 2) for v in os.getloadavg()]},
        "torch": torch.__version__,
        "video": {"path": str(video), "width": info.width, "height": info.height, "fps": info.fps,
                  "frames": info.num_frames},
        "copies": args.copies,
        "repeats": args.repeats,
        "frames_per_run": summaries[0].frames_now,
        "clips_per_run": summaries[0].columns["clips"],
        "skipped_per_run": len(summaries[0].skipped),
        "config": asdict(config),
        "effective": {
            "det_size": auto_det_size(config.det_size, stage_device),
            "det_every": effective_det_every(config, stage_device),
            "lmk_every": effective_lmk_every(config, stage_device),
            "detector_frames_per_run": summaries[0].timings.get("detect", {}).get("items"),
            "landmark_frames_per_run": summaries[0].timings.get("landmarks", {}).get("items"),
        },
        "end_to_end_fps": e2e_spread,
        "end_to_end_seconds": [s.seconds for s in summaries],
        "steps": steps,
        "naive": naive,
        "speedup_vs_naive": (e2e_spread["median"] / naive["fps"]) if naive else None,
        "targets": TARGETS,
        "notes": [
            "end_to_end_fps = Summary.frames_now / Summary.seconds: decode, detection, landmarks, crop, "
            "part writes, final assembly and per-run model resolution included; nothing subtracted; models are "
            "converted and traced once per process, in the warm-up run.",
            "one untimed warm-up run (1 copy) precedes the timed repeats; each repeat writes a fresh output "
            "(overwrite=True); on CUDA torch.cuda.synchronize() is called around each run.",
            "steps: fps = frames_now / step seconds of the same repeat. Step times are summed over threads: on CUDA "
            "'decode' runs in prefetch threads and 'write' in a writer thread, overlapping the model steps, so step "
            "times need not add up to the end-to-end time. On CUDA 'detect', 'landmarks' and 'crop' are CUDA-event "
            "times on the model thread's stream (between the GPU reaching the step's start and end events, idle gaps "
            "included); the other steps are host wall time. null = step not timed in this process.",
            "naive baseline: decord vr[i] per frame, original SCRFD-2.5G and PFLD-68 ONNX on onnxruntime "
            "CPUExecutionProvider at batch 1 (det 640x640 letterbox, numpy decode + NMS), cv2.resize crops, one "
            "h5py gzip-1 write per frame; session creation, reader opening and one warm-up frame are outside its "
            "timing. It always runs on the CPU: the GPU machine's onnxruntime has no CUDA execution provider.",
            "speedup_vs_naive = median stage end-to-end fps / naive fps. The naive loop detects at 640 and runs "
            "landmarks on every frame; the stage does what 'effective' says (CPU auto: det 320, detector on every "
            "3rd frame, landmarks on every 2nd, interpolated between), so on CPU part of the speedup is less "
            "model work, not only faster code.",
        ],
    }
    return result


if __name__ == "__main__":
    # Route everything written to stdout during the work (including C-level prints) to stderr,
    # so stdout carries exactly one JSON object.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    cli_args = parse_args()
    try:
        output = main(cli_args)
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    text = json.dumps(output, indent=2)
    print(text, flush=True)
    if cli_args.out:
        Path(cli_args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cli_args.out).write_text(text + "\n")
