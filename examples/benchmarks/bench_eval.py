"""Benchmark ``avatar eval``: frame pairs per second for each metric alone and for all together.

Prepares a reference clips artifact with ``avatar preprocess`` from a real video (repeated
``--copies`` times as separate clips), and a "generated" copy with noise added to every frame. Then
runs the eval stage end to end (reading frames from HDF5, uploads, models, fits, writing the
artifact: everything but the one-time model load, which is timed apart) ``--repeats`` times per
metric set and prints JSON: median and spread of frame pairs/s, and per-step seconds.

LPIPS needs its weights in the models folder; ``--lpips-random-backbone`` times it with the real
LPIPS linear layers (``--lpips-lin PATH``, the 6 kB ``alex.pth``) over a randomly initialised
AlexNet (same cost as the real one; the values are then meaningless).

    python examples/benchmarks/bench_eval.py --device cuda --copies 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ASSETS = Path(os.environ.get("AVATAR_ASSETS", Path(__file__).resolve().parents[3] / "shared" / "assets"))


def prepare(video: Path, copies: int, work: Path, device: str, models: str | None) -> tuple[Path, Path, int]:
    from stages.preprocess import PreprocessConfig, run

    sources = work / "videos"
    sources.mkdir()
    for k in range(copies):
        shutil.copy(video, sources / f"{video.stem}_{k}{video.suffix}")
    ref = work / "ref.h5"
    run(PreprocessConfig(device=device, models_dir=models, identity_from="stem"), [str(sources)], ref)
    gen = work / "gen.h5"
    shutil.copy(ref, gen)
    rng = np.random.default_rng(0)
    frames = 0
    with h5py.File(gen, "r+") as handle:
        for name in handle["clips"]:
            data = handle["clips"][name]["frames"]
            for start in range(0, len(data), 256):
                block = data[start:start + 256].astype(np.int16)
                block += rng.integers(-10, 11, block.shape, dtype=np.int16)
                data[start:start + 256] = np.clip(block, 0, 255).astype(np.uint8)
            frames += len(data)
    return ref, gen, frames


def lpips_models(work: Path, lin: Path) -> Path:
    import torch
    from torchvision.models import alexnet

    folder = work / "models" / "lpips"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(alexnet(weights=None).state_dict(), folder / "alexnet-owt-7be5be79.pth")
    shutil.copy(lin, folder / "alex.pth")
    return work / "models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--video", default=str(ASSETS / "data/styletalk/source/video/Obama_clip1.mp4"))
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="frame pairs per device batch (--batch-frames)")
    parser.add_argument("--sets", default="psnr,ssim,lpips,csim,akd,aed+apd,all,all-lpips",
                        help="comma list of metric sets; '+' joins metrics; all = every metric")
    parser.add_argument("--lpips-random-backbone", action="store_true")
    parser.add_argument("--lpips-lin", default=None, help="alex.pth of LPIPS v0.1 (for --lpips-random-backbone)")
    parser.add_argument("--models", default=os.environ.get("AVATAR_MODELS"))
    parser.add_argument("--face-model", default=str(ASSETS / "3dmm/ict_facekit/ict_face_light_f16.npz"))
    parser.add_argument("--fit-iters", type=int, default=60)
    args = parser.parse_args()

    import torch

    from avatarcli.devices import resolve_device
    from avatarcli.evaluation.plan import METRICS
    from stages.eval import EvalConfig, run

    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        t0 = time.perf_counter()
        ref, gen, frames = prepare(Path(args.video), args.copies, work, device, args.models)
        prepare_s = time.perf_counter() - t0
        models = args.models
        lpips_note = "real weights from the models folder"
        if args.lpips_random_backbone:
            if not args.lpips_lin:
                parser.error("--lpips-random-backbone needs --lpips-lin PATH")
            lpips_dir = lpips_models(work, Path(args.lpips_lin))
            # one folder for all: the real models linked beside the LPIPS files
            for entry in Path(args.models).iterdir():
                (lpips_dir / entry.name).symlink_to(entry.resolve())
            models = str(lpips_dir)
            lpips_note = "random AlexNet backbone + real LPIPS v0.1 linear layers (timing only)"
        results = {}
        for metric_set in args.sets.split(","):
            names = METRICS if metric_set == "all" else tuple(m for m in METRICS if m != "lpips") \
                if metric_set == "all-lpips" else tuple(metric_set.split("+"))
            config = EvalConfig(metrics=names, device=device, models_dir=models, batch_frames=args.batch,
                                face_model=args.face_model, fit_iters=args.fit_iters, overwrite=True)
            try:
                t_load = time.perf_counter()
                run(config, gen, ref, work / "warmup.h5")  # loads models, traces, warms caches
                first_s = time.perf_counter() - t_load
            except Exception as exc:  # e.g. LPIPS weights missing: report and go on
                results[metric_set] = {"error": f"{exc.__class__.__name__}: {exc}"}
                continue
            rates, steps = [], []
            for _ in range(args.repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                summary = run(config, gen, ref, work / "eval.h5")
                seconds = time.perf_counter() - start
                rates.append(frames / seconds)
                steps.append(summary.timings)
            median_steps = {name: statistics.median(s[name]["seconds"] for s in steps if name in s)
                            for name in steps[0]}
            results[metric_set] = {
                "frame_pairs_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                                      "runs": rates},
                "first_run_s_incl_model_load": first_s,
                "step_seconds_median": median_steps,
                "means": {m: v["mean"] for m, v in summary.details["metrics"].items()},
            }
        report = {
            "benchmark": "eval", "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "torch": torch.__version__, "video": args.video, "clips": args.copies, "frame_pairs": frames,
            "resolution": 256, "batch": args.batch, "fit_iters": args.fit_iters, "lpips": lpips_note,
            "prepare_s (preprocess + noisy copy)": prepare_s, "results": results,
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
