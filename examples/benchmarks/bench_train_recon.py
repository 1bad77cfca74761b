#!/usr/bin/env python
"""Training throughput, model FLOPs utilisation and peak memory of ``avatar train-recon`` (Export3D).

For each mode (fp32-eager, bf16 autocast, bf16 + ``torch.compile``) one fresh subprocess runs the
real engine loop (``avatarcli.train.engine.train``) on the real task
(``avatarcli.export3d.task.Export3DTask``: the generator, Eq. 13 losses with L2 + VGG-LPIPS when its
weights are there) at the chosen preset (default paper: 256², batch 8), on synthetic random batches
held on the device (random frames, β and orbit cameras; raw-β conditioning, so no encoder is
needed): ``--warmup`` untimed steps, then ``--steps`` timed ones. A step is everything the engine
does (batch, forward, backward, clipping, the NaN/inf check, Adam). The engine reads the loss back
every step, so each step ends synchronised; images/s is the median of batch / step-time with its
spread.

Model FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of
the reconstruction loss (fp32, before training; matmuls and convolutions, as the counter counts),
divided by the batch. MFU = FLOPs/image × images/s / peak, with the peak given by ``--peak-flops``
(default 989e12: H100 SXM dense bf16 tensor-core peak; the same peak is used for every mode so the
modes compare directly — fp32 modes would use TF32 at best, about half of it).

Peak memory: CUDA ``torch.cuda.max_memory_allocated`` over the whole run of a mode; CPU, the
subprocess's peak RSS. With ``--clips`` and ``--coeffs`` the loader throughput of a real ``ReconData``
(items/s drawn by ``ReconData.batch`` onto the device) is measured too.

Prints ONE JSON object on stdout; progress goes to stderr.

    python examples/benchmarks/bench_train_recon.py --device cuda                    # paper preset, 256², batch 8
    python examples/benchmarks/bench_train_recon.py --device cpu --preset tiny --image-size 32 --batch 2 \\
        --steps 2 --warmup 1 --modes fp32-eager --perceptual none                    # CPU smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from train_modes import MODES, StepClock, peak_memory, run_child, spread  # noqa: E402

H100_SXM_BF16_DENSE = 989e12


def log(*parts) -> None:
    print("[bench_train_recon]", *parts, file=sys.stderr, flush=True)


class RandomReconData:
    """``ReconData``'s training interface on random tensors already on the device: frames [F,3,s,s]
    uint8, β [F,K], generator-world orbit cameras [F,25]; a batch is one gather, as the real bank."""

    def __init__(self, frames: int, image_size: int, expr_dim: int, device: str, seed: int = 0):
        import torch

        from avatarcli.camera import GENERATOR_CAMERA_RADIUS, orbit_camera

        generator = torch.Generator().manual_seed(seed)
        self.frames = torch.randint(0, 256, (frames, 3, image_size, image_size), generator=generator,
                                    dtype=torch.uint8).to(device)
        self.beta = torch.randn(frames, expr_dim, generator=generator).to(device)
        intrinsics = torch.tensor([4.26, 0.0, 0.5, 0.0, 4.26, 0.5, 0.0, 0.0, 1.0])
        angles = (torch.rand(frames, 2, generator=generator) - 0.5) * 0.6
        self.camera = torch.stack([orbit_camera(float(yaw), float(pitch), GENERATOR_CAMERA_RADIUS, intrinsics)
                                   for yaw, pitch in angles.tolist()]).float().to(device)
        self.count = frames

    def batch(self, seed: int, step: int, items: range, device):
        import numpy as np
        import torch

        from avatarcli.export3d.data import ReconBatch

        rng = np.random.default_rng([seed, step, items.start])
        rows = torch.from_numpy(rng.integers(0, self.count, (2, len(items)))).to(self.frames.device)
        images = self.frames[rows.flatten()].float().div_(255.0)
        source, driving = images.chunk(2)
        index = rows.cpu().numpy()
        return ReconBatch(source, driving, self.beta[rows[1]], self.camera[rows[1]], self.camera[rows[0]],
                          index[0], index[1], np.zeros(len(items), np.int64))

    def signature(self) -> dict:
        return {"synthetic": self.count}


def model_flops_per_image(task, models, batch_size: int, device) -> float:
    """FLOPs of one forward + backward of the reconstruction loss (fp32), per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = task.batch(0, 0, 1, torch.device(device))
    with FlopCounterMode(display=False) as counter:
        loss, _ = task.reconstruction_loss(models, batch, 0)
        loss.backward()
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def run_mode(args) -> dict:
    """One mode, in this process (the parent starts one process per mode)."""
    import torch

    from avatarcli.export3d.task import Export3DTask, reconstruction_losses
    from avatarcli.train.checkpoint import seed_everything
    from avatarcli.train.engine import EngineConfig, train
    from stages.train_recon import TrainReconConfig

    precision, compile_model = MODES[args.mode]
    device = args.device
    engine = EngineConfig(run_dir=tempfile.mkdtemp(prefix="bench_train_recon."), steps=args.warmup + args.steps,
                          precision=precision, compile=compile_model, checkpoint_every=10**9, log_every=10**9,
                          image_every=0, tensorboard=False, device=device, seed=0)
    config = TrainReconConfig(preset=args.preset, image_size=args.image_size, expression="raw", batch=args.batch,
                              perceptual=args.perceptual, engine=engine, device=device)
    shape = config.shape(args.expr_dim)
    data = RandomReconData(args.frames, shape.image_size, args.expr_dim, device)
    losses = reconstruction_losses(args.perceptual, 1.0, args.models)
    task = Export3DTask(config, data, shape, None, losses, device)
    out = {"precision": precision, "compile": compile_model,
           "losses": {name: entry["active"] for name, entry in losses.describe().items()}}
    if args.mode == "fp32-eager" or args.flops_every_mode:
        seed_everything(0)
        models = {name: model.to(device).train() for name, model in task.build_models().items()}
        out["model_flops_per_image"] = model_flops_per_image(task, models, args.batch, device)
        out["parameters"] = sum(p.numel() for p in models["generator"].parameters())
        del models
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    t0 = time.perf_counter()
    result = train(engine, task, clock)
    total = time.perf_counter() - t0
    step_seconds = clock.step_seconds(args.warmup)
    out.update({
        "steps_timed": len(step_seconds),
        "images_per_s": spread([args.batch / s for s in step_seconds]),
        "step_ms_median": 1000 * statistics.median(step_seconds),
        "warmup_seconds": clock.warmup_seconds(args.warmup),
        "run_seconds": total,
        "final_loss": result.history["loss"][-1] if result.history["loss"] else None,
        "skipped_steps": result.skipped_steps,
        **peak_memory(device),
    })
    return out


def loader_throughput(args) -> dict:
    """Items/s of a real ReconData (frames on the device, as the stage keeps them)."""
    from avatarcli.export3d.data import load_recon_data
    from stages.train_recon import TrainReconConfig

    size = args.image_size or TrainReconConfig(preset=args.preset).shape(1).image_size
    t0 = time.perf_counter()
    data = load_recon_data(args.clips, args.coeffs, size, args.ids, 0, args.val_frames, 0, device=args.device)
    load_seconds = time.perf_counter() - t0
    rate = data.loader_throughput(seconds=3.0, batch=args.batch, device=args.device)
    return {"clips": len(data.clips), "frames": data.num_frames, "identities": len(data.train_identities),
            "load_seconds": load_seconds, "items_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cpu or cuda")
    parser.add_argument("--preset", default="paper", choices=("paper", "small", "tiny"))
    parser.add_argument("--image-size", type=int, default=0, help="0 = the preset's")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--frames", type=int, default=256, help="random frames held on the device")
    parser.add_argument("--expr-dim", type=int, default=53)
    parser.add_argument("--perceptual", default="vgg", choices=("vgg", "alex", "none"))
    parser.add_argument("--models", default=None, help="models folder for the LPIPS weights")
    parser.add_argument("--peak-flops", type=float, default=H100_SXM_BF16_DENSE,
                        help="peak FLOP/s for MFU (default: H100 SXM dense bf16, 989e12)")
    parser.add_argument("--flops-every-mode", action="store_true", help="count FLOPs in every mode, not only fp32")
    parser.add_argument("--clips", help="a clips artifact: also measure the real loader")
    parser.add_argument("--coeffs", help="its coeffs artifact")
    parser.add_argument("--ids", type=int, default=0, help="identities for the loader measurement (0 = all)")
    parser.add_argument("--val-frames", type=int, default=25, help="held-out frames per clip for the loader measurement")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    parser.add_argument("--loader", action="store_true", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    if args.loader:
        print(json.dumps(loader_throughput(args)))
        return
    if bool(args.clips) != bool(args.coeffs):
        parser.error("--clips and --coeffs go together")

    import torch

    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    report = {
        "benchmark": "train_recon_export3d",
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "config": {"preset": args.preset, "image_size": args.image_size or "preset", "batch": args.batch,
                   "expr_dim": args.expr_dim, "perceptual": args.perceptual, "steps": args.steps,
                   "warmup": args.warmup, "peak_flops": args.peak_flops,
                   "peak_flops_is": "H100 SXM dense bf16 (989 TFLOP/s)" if args.peak_flops == H100_SXM_BF16_DENSE
                   else "given by --peak-flops"},
        "modes": {},
    }
    passthrough = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                   if key not in ("modes", "mode", "loader", "flops_every_mode") and value is not None]
    if args.flops_every_mode:
        passthrough.append("--flops-every-mode")
    flops = None
    for mode in modes:
        log(f"{mode}: {args.warmup} warm-up + {args.steps} timed steps on {args.device}")
        result, error = run_child(__file__, passthrough, "--mode", mode)
        if result is None:
            report["modes"][mode] = {"error": error}
            continue
        flops = result.get("model_flops_per_image", flops)
        report["modes"][mode] = result
        log(f"{mode}: {result['images_per_s']['median']:.2f} images/s")
    for result in report["modes"].values():
        if "images_per_s" in result and flops:
            result["mfu"] = flops * result["images_per_s"]["median"] / args.peak_flops
    report["model_flops_per_image"] = flops
    if args.clips:
        log("loader throughput")
        loader, error = run_child(__file__, passthrough, "--loader")
        report["loader"] = loader if loader is not None else {"error": error}
        fastest = max((r["images_per_s"]["median"] for r in report["modes"].values() if "images_per_s" in r), default=0)
        if "items_per_s" in report["loader"] and fastest:
            report["loader"]["ratio_to_fastest_training"] = report["loader"]["items_per_s"] / fastest
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
