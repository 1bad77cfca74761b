#!/usr/bin/env python
"""Throughput of the face models inside ``avatar preprocess``, per step, eager vs CUDA graphs.

Times, on one batch of real frames (decoded once, already on the device): SCRFD detection with
its pre- and post-processing (``detect``), 68-point landmarks with their crops (``PFLD68``), and
the 256² output crops (``crop_batch``). Each is timed in one thread and in ``--threads`` threads
at once (each on its own stream); the detector is also timed in parts (pre-processing, network,
decoding). ``--profile`` prints torch profiler tables of each step to stderr.

Prints ONE JSON object on stdout: per step, median / p10 / p90 ms per batch and frames/s.

    python examples/benchmarks/bench_face_models.py --device cuda --batch 32
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

DEFAULT_VIDEO = REPO_ROOT.parent / "shared/assets/data/sadtalker_hdtf/WDA_AlexandriaOcasioCortez_000.mp4"


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": 1000 * statistics.median(values), "p10_ms": 1000 * pick(0.1), "p90_ms": 1000 * pick(0.9)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", default=str(DEFAULT_VIDEO))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--det-size", type=int, default=640)
    p.add_argument("--models", default=None)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    import decord
    import torch

    from avatarcli import registry
    from avatarcli.face.crop import crop_batch
    from avatarcli.face.landmarks import PFLD68
    from avatarcli.face.scrfd import SCRFD, detect, prepare_batch

    device = torch.device(args.device)
    reader = decord.VideoReader(args.video)
    frames_np = reader.get_batch(list(range(min(args.batch, len(reader))))).asnumpy()
    frames = torch.from_numpy(frames_np).to(device)
    half = device.type == "cuda"
    det_path, lmk_path = registry.resolve("scrfd_2.5g", args.models), registry.resolve("pfld68", args.models)
    found = detect(SCRFD(det_path, "cpu"), torch.from_numpy(frames_np[:1]), 320)[0]
    box = found.boxes[0].numpy()
    det_boxes = np.tile(box, (len(frames), 1))
    side = int(2 * (box[2] - box[0]))
    cx, cy = (box[:2] + box[2:]) / 2
    crop_boxes = np.tile(np.array([[int(cx - side / 2), int(cy - side / 2), side]]), (len(frames), 1))

    def sync():
        if device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "batch": len(frames), "frame_size": list(frames_np.shape[1:3]),
                     "det_size": args.det_size, "steps": {}}
    detector = SCRFD(det_path, device, half=half)
    landmarker = PFLD68(lmk_path, device, half=half)
    prepared = prepare_batch(frames, args.det_size, 0.25)[0]
    steps = {
        "detect": lambda: detect(detector, frames, args.det_size),
        "detect.prepare": lambda: prepare_batch(frames, args.det_size, 0.25),
        "detect.network": lambda: detector.net(prepared),
        "detect.network_and_decode": lambda: detector(prepared),
        "landmarks": lambda: landmarker(frames, det_boxes),
        "landmarks.network": lambda: landmarker.net(torch.zeros(len(frames), 3, 112, 112, device=device)),
        "crop": lambda: crop_batch(frames, crop_boxes, 256).cpu(),
        "crop.no_download": lambda: crop_batch(frames, crop_boxes, 256),
    }
    for name, fn in steps.items():
        for threads in sorted({1, args.threads}):
            times: list[float] = []
            lock = threading.Lock()

            def worker():
                stream = torch.cuda.Stream(device) if device.type == "cuda" else None
                ctx = torch.cuda.stream(stream) if stream is not None else None
                if ctx:
                    ctx.__enter__()
                for _ in range(3):
                    fn()
                sync()
                for _ in range(args.iters):
                    start = time.perf_counter()
                    fn()
                    sync()
                    with lock:
                        times.append(time.perf_counter() - start)
                if ctx:
                    ctx.__exit__(None, None, None)

            pool = [threading.Thread(target=worker) for _ in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            key = f"{name}/threads{threads}"
            stats = percentiles(times)
            results["steps"][key] = {**stats, "fps": threads * len(frames) / (stats["median_ms"] / 1000)}
            print(key, json.dumps(results["steps"][key]), file=sys.stderr)
        if args.profile and "." not in name:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(5):
                    fn()
                sync()
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(f"== profile {name}", file=sys.stderr)
            print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=40), file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
