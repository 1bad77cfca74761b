#!/usr/bin/env python
"""Performance benchmark of ``avatar synth`` (stage ``stages.synth``).

After one untimed warm-up run (one clip of ``--batch-frames`` frames: first-call costs of the rasterizer and,
on CUDA, kernel loading), the stage is run ``--repeats`` times into a fresh output each time.
End-to-end frames/s is ``frames / seconds`` of the stage's own summary: face-model loading, sampling,
geometry, rendering, compositing, compression, the HDF5 write, validation and the atomic rename are all
included. Per step, frames/s is ``frames / seconds spent in that step`` (CUDA is synchronised around
the device steps): ``sample`` (trajectories, light, albedo, background; numpy), ``geometry`` (model
vertices, pose, landmark projection, caps), ``render`` (rasterize + SH shading + interpolation),
``composite`` (over the background, to uint8, to the host) and ``write`` (deflate + HDF5 + validation).

Prints ONE JSON object on stdout; progress goes to stderr.

    python examples/benchmarks/bench_synth.py --device cpu --clips 1 --frames 8 --size 128 --repeats 1
    python examples/benchmarks/bench_synth.py --device cuda --clips 8 --frames 100 --size 256 --batch-frames 64
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
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

DEFAULT_MODEL = REPO_ROOT.parent / "shared/assets/3dmm/ict_facekit/ict_face_light_f16.npz"
STEPS = ("load_model", "sample", "geometry", "render", "composite", "write")


def log(*parts) -> None:
    print("[bench_synth]", *parts, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--clips", type=int, default=2, help="clips per run")
    p.add_argument("--frames", type=int, default=50, help="frames per clip")
    p.add_argument("--size", type=int, default=256, help="frame side, pixels")
    p.add_argument("--batch-frames", "--batch", type=int, default=16,
                   help="frames rendered at once (SynthConfig.batch_frames)")
    p.add_argument("--supersample", type=int, default=1, help="SynthConfig.supersample")
    p.add_argument("--repeats", type=int, default=3, help="timed stage runs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--face-model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL.exists() else "ict",
                   help="face model name or path (default: the shared ICT file, else 'ict' via the registry)")
    p.add_argument("--models", default=os.environ.get("AVATAR_MODELS"), help="models folder for 'ict'")
    return p.parse_args(argv)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main(args: argparse.Namespace) -> dict:
    import torch

    from avatarcli.devices import resolve_device
    from avatarcli.facemodel import load_face_model
    from stages.synth import SynthConfig, run

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    def config(**changes) -> SynthConfig:
        base = dict(clips=args.clips, frames=args.frames, size=args.size, batch_frames=args.batch_frames,
                    supersample=args.supersample, face_model=args.face_model, models_dir=args.models, device=device,
                    overwrite=True)
        return SynthConfig(**{**base, **changes})

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as work:
        model = load_face_model(args.face_model, args.models)  # resolved once (a download would skew run 1)
        log(f"warm-up on {device}")
        run(config(clips=1, frames=min(args.batch_frames, args.frames)), Path(work) / "warmup.h5", model=model)
        for repeat in range(args.repeats):
            out = Path(work) / f"run{repeat}.h5"
            started = time.perf_counter()
            summary = run(config(), out, model=None)  # the stage loads the model itself, as the CLI does
            seconds = time.perf_counter() - started
            size_mb = out.stat().st_size / 1e6
            runs.append((summary, seconds, size_mb))
            log(f"run {repeat + 1}/{args.repeats}: {summary.frames} frames in {seconds:.2f} s "
                f"({summary.frames / seconds:.1f} frames/s), {size_mb:.1f} MB")

    frames = runs[0][0].frames
    steps = {}
    for step in STEPS:
        secs = [r[0].timings.get(step, {}).get("seconds", 0.0) for r in runs]
        steps[step] = {"seconds": spread(secs),
                       "fps": spread([frames / s for s in secs if s > 0]) if all(s > 0 for s in secs) else None}
    return {
        "benchmark": "synth",
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "settings": {"clips": args.clips, "frames": args.frames, "size": args.size, "batch_frames": args.batch_frames,
                     "supersample": args.supersample, "repeats": args.repeats, "face_model": args.face_model},
        "frames_per_run": frames,
        "end_to_end": {"fps": spread([frames / r[1] for r in runs]), "seconds": spread([r[1] for r in runs])},
        "steps": steps,
        "face_coverage": statistics.mean(r[0].details["face_coverage"] for r in runs),
        "output_mb": statistics.median(r[2] for r in runs),
    }


if __name__ == "__main__":
    print(json.dumps(main(parse_args()), indent=2))
