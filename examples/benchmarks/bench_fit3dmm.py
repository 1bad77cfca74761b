#!/usr/bin/env python
"""Performance and accuracy benchmark of ``avatar fit-3dmm`` (stage ``stages.fit3dmm``).

1. Renders synthetic clips with known truth (``stages.synth``, untimed).
2. Fits them with the stage, landmark-only and photometric, ``--repeats`` times each into fresh
   outputs. Frames/s = frames fitted / the stage's own wall time: reading the clips, every
   iteration, writing parts and the final artifact are included (the face model is loaded per run).
3. Scores each fit against the truth (``avatarcli.fit.synthetic_errors``): face-region vertex
   error in mm, expression error per channel, rotation error.
4. Times the rasterizer alone on the face mesh (frontal, filling the frame) at 256² and 512²,
   batch 1 and 64.

Prints ONE JSON object on stdout; progress goes to stderr.

    python examples/benchmarks/bench_fit3dmm.py --device cpu --clips 1 --frames 8 --repeats 1 --photo-iters 10
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore")

DEFAULT_MODEL = REPO_ROOT.parent / "shared/assets/3dmm/ict_facekit/ict_face_light_f16.npz"


def log(*parts) -> None:
    print("[bench_fit3dmm]", *parts, file=sys.stderr, flush=True)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def time_rasterizer(model, device: str, sizes: list[int], batches: list[int], repeats: int) -> list[dict]:
    import torch

    from avatarcli.camera import clip_from_camera, intrinsics_matrix, pose6_to_rt, world_to_camera
    from avatarcli.render.rasterize import rasterize

    out = []
    verts = model.mean[None].to(device)
    faces = model.faces.to(device)
    pose = torch.tensor([[0.0, 0.0, 0.0, 0.0, -4.0, 1160.0]], device=device)
    R, t = pose6_to_rt(pose)
    cam = world_to_camera(verts, R, t)
    for size in sizes:
        K = intrinsics_matrix(1160.0 * size / 256, size / 2, size / 2).to(device)
        clip = clip_from_camera(cam, K, size, 10.0, 1e5)
        for batch in batches:
            clips = clip.expand(batch, -1, -1).contiguous()
            times = []
            for i in range(repeats + 3):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                raster = rasterize(clips, faces, size, size, cull_backfaces=True)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= 3:
                    times.append(1000 * (time.perf_counter() - start))
            out.append({"size": size, "batch": batch, "ms": spread(times),
                        "ms_per_frame": statistics.median(times) / batch,
                        "coverage": float(raster.mask.float().mean())})
            log(f"rasterize {size}² batch {batch}: {statistics.median(times):.2f} ms")
    return out


def main() -> None:
    from stages.fit3dmm import Fit3dmmConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--face-model", default=str(DEFAULT_MODEL))
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--frames", type=int, default=128)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    defaults = Fit3dmmConfig()
    p.add_argument("--iters", type=int, default=defaults.iters, help="Gauss-Newton iterations, shape stage")
    p.add_argument("--rigid-iters", type=int, default=defaults.rigid_iters, help="Gauss-Newton iterations, rigid stage")
    p.add_argument("--photo-iters", type=int, default=defaults.photo_iters)
    p.add_argument("--photo-size", type=int, default=defaults.photo_size)
    p.add_argument("--photo-samples", type=int, default=defaults.photo_samples)
    p.add_argument("--raster-every", type=int, default=defaults.raster_every)
    p.add_argument("--sample-every", type=int, default=defaults.sample_every)
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager Gauss-Newton steps")
    p.add_argument("--batch-frames", type=int, default=defaults.batch_frames)
    p.add_argument("--raster-repeats", type=int, default=10)
    p.add_argument("--skip-photometric", action="store_true")
    p.add_argument("--skip-landmarks-only", action="store_true")
    p.add_argument("--skip-rasterizer", action="store_true")
    args = p.parse_args()

    import torch

    from avatarcli.devices import resolve_device
    from avatarcli.facemodel import load_face_model
    from avatarcli.fit import synthetic_errors
    from stages.fit3dmm import Fit3dmmConfig, run
    from stages.synth import SynthConfig
    from stages.synth import run as synth_run

    device = resolve_device(args.device)
    model = load_face_model(args.face_model)
    work = Path(tempfile.mkdtemp(prefix="bench_fit3dmm_"))
    clips = work / "synth.h5"
    log(f"rendering {args.clips} synthetic clips x {args.frames} frames at {args.size}² on {device}")
    synth_run(SynthConfig(clips=args.clips, frames=args.frames, size=args.size, face_model=args.face_model,
                          device=device), [], clips)
    result = {
        "benchmark": "fit-3dmm", "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "clips": args.clips, "frames_per_run": args.clips * args.frames,
        "size": args.size, "face_model": model.name, "modes": {},
    }
    modes = ([] if args.skip_landmarks_only else [("landmarks_only", True)]) + ([] if args.skip_photometric else [("photometric", False)])
    for mode, landmarks_only in modes:
        config = Fit3dmmConfig(face_model=args.face_model, device=device, landmarks_only=landmarks_only,
                               iters=args.iters, rigid_iters=args.rigid_iters, photo_iters=args.photo_iters,
                               photo_size=args.photo_size, photo_samples=args.photo_samples,
                               raster_every=args.raster_every, sample_every=args.sample_every, cuda_graphs=not args.no_cuda_graphs,
                               batch_frames=args.batch_frames, overwrite=True)
        fps, steps = [], {}
        for repeat in range(args.repeats):
            out = work / f"{mode}_{repeat}.h5"
            summary = run(config, clips, out)
            fps.append(summary.frames_now / summary.seconds)
            for name, value in summary.timings.items():
                steps.setdefault(name, []).append(value["seconds"])
            log(f"{mode} {repeat + 1}/{args.repeats}: {summary.frames_now} frames in {summary.seconds:.2f}s "
                f"= {fps[-1]:.1f} fps, landmark error {summary.details['lmk_error']:.2f} px")
        errors = synthetic_errors(clips, out, args.face_model)
        result["modes"][mode] = {
            "frames_per_s": spread(fps),
            "step_seconds_median": {k: statistics.median(v) for k, v in steps.items()},
            "landmark_error_px": summary.details["lmk_error"],
            "truth": errors,
            "config": {k: getattr(config, k) for k in ("iters", "rigid_iters", "photo_iters", "photo_size",
                                                       "batch_frames", "raster_every", "sample_every", "photo_samples", "cuda_graphs", "w_identity", "w_smooth",
                                                       "adapt_noise", "cg_iters")},
        }
        log(f"{mode}: vertex error {errors['vertex_error_mm']['mean']:.2f} mm, "
            f"expression MAE {errors['expression_mae_mean']:.3f}")
    if not args.skip_rasterizer:
        result["rasterizer"] = time_rasterizer(model, device, [256, 512], [1, 64], args.raster_repeats)
    result["targets"] = {"photometric_frames_per_s_h100": 1000, "vertex_error_mm": 1.0, "landmark_error_px_real": 3.0}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
