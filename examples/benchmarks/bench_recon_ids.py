"""``avatar train-recon --ids N`` at scale: N synthetic identities, loader throughput vs training rate.

The issue's check: 1000 identities from ``avatar synth`` train for a few hundred steps without the
loader being the bottleneck (loader throughput >= 5x the rate at which training consumes items).

1. ``avatar synth``: N clips (one identity each) of ``--frames`` frames at ``--size``², and their
   ground truth as a coeffs artifact (``avatarcli.synthetic.truth``: what a perfect fit writes).
2. The loader alone: ``ReconData.loader_throughput`` — items (source, driving, β, camera) per second
   drawn by the seeded pair sampler from the frame bank onto the device.
3. ``avatar train-recon --ids N`` for ``--steps`` steps (raw β: no encoder needed): images/s.

Prints one JSON object on stdout: both rates, their ratio and whether it meets 5x.

    python examples/benchmarks/bench_recon_ids.py --device cuda --ids 1000 --steps 300
    python examples/benchmarks/bench_recon_ids.py --device cpu --ids 1000 --steps 200 --preset tiny --size 64
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def log(message: str) -> None:
    print(f"[bench_recon_ids] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ids", type=int, default=1000, help="synthetic identities (one clip each), all trained")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip")
    parser.add_argument("--size", type=int, default=64, help="crop side of the synthetic clips")
    parser.add_argument("--preset", default="tiny", choices=("paper", "small", "tiny"))
    parser.add_argument("--image-size", type=int, default=0, help="generator output side (0: --size)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--face-model", default="ict", help="face model of the synthetic clips (name or file)")
    parser.add_argument("--workdir", default="", help="keep the synthetic data here (default: a temp folder)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from avatarcli.devices import resolve_device
    from avatarcli.export3d.data import load_recon_data
    from avatarcli.synthetic.truth import write_truth_coeffs
    from avatarcli.train.engine_config import EngineConfig
    from stages.synth import SynthConfig
    from stages.synth import run as synth
    from stages.train_recon import TrainReconConfig
    from stages.train_recon import run as train_recon

    args = parse_args(argv)
    device = resolve_device(args.device)
    image_size = args.image_size or args.size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        clips, coeffs = root / f"ids{args.ids}.h5", root / f"ids{args.ids}_coeffs.h5"
        start = time.perf_counter()
        if not clips.exists():
            synth(SynthConfig(clips=args.ids, frames=args.frames, size=args.size, seed=0, face_model=args.face_model,
                              device=device), clips)
        if not coeffs.exists():
            write_truth_coeffs(clips, coeffs)
        synth_seconds = time.perf_counter() - start
        log(f"{args.ids} identities x {args.frames} frames in {synth_seconds:.1f} s")

        start = time.perf_counter()
        data = load_recon_data(clips, coeffs, image_size, ids=args.ids, val_ids=0, val_frames=2, seed=0, device=device)
        load_seconds = time.perf_counter() - start
        data.loader_throughput(0.5, args.batch, device)  # warm-up
        loader = data.loader_throughput(3.0, args.batch, device)
        log(f"loader: {loader:.0f} items/s ({len(data.train_identities)} identities, {data.num_frames} frames)")
        del data

        engine = EngineConfig(steps=args.steps, log_every=10, checkpoint_every=max(args.steps, 1), tensorboard=False)
        config = TrainReconConfig(preset=args.preset, image_size=image_size, expression="raw", ids=args.ids, val_ids=0,
                                  val_frames=2, batch=args.batch, perceptual="none", validate_every=0, device=device,
                                  engine=engine, run_dir=str(root / "run"), overwrite=True)
        summary = train_recon(config, str(clips), root / "generator.h5", str(coeffs))
        trained_ids = len(summary.details["train_identities"])
        train_rate = float(summary.details["images_per_second"])
    ratio = loader / train_rate if train_rate else float("inf")
    report = {
        "benchmark": "bench_recon_ids", "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        "torch": torch.__version__, "ids": args.ids, "trained_identities": trained_ids, "frames_per_clip": args.frames,
        "crop_size": args.size, "preset": args.preset, "image_size": image_size, "batch": args.batch,
        "steps": summary.details["steps"], "synth_seconds": synth_seconds, "load_seconds": load_seconds,
        "loader_items_per_s": loader, "training_items_per_s": train_rate, "loader_over_training": ratio,
        "target_ratio": 5.0, "meets_target": ratio >= 5.0,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
