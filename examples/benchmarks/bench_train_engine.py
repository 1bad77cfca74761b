#!/usr/bin/env python
"""Throughput and peak memory of the shared training engine on CLeBS (``avatar pretrain-expr``).

For each mode (fp32-eager, bf16 autocast, bf16 + ``torch.compile``) one fresh subprocess runs the
real engine loop (``avatarcli.train.engine.train``) with the real CLeBS task
(``avatarcli.train.tasks.clebs.ClebsTask``, default pose-matched groups) on synthetic clips held in memory (on the GPU with --device
cuda, as the stage does): ``--warmup`` untimed steps (compilation, cuDNN autotuning), then ``--steps``
timed ones. A step is everything the engine does: drawing the batch (deterministic per step), the
forward and backward passes, gradient clipping, the NaN/inf check and its all-reduce, the Adam step
and the scheduler. The engine reads the loss back every step, so each step ends synchronised and the
per-step wall times are honest; steps/s is reported as the median of 1/step-time with its spread.
Checkpoints and TensorBoard are off during the timed steps. A batch is ``--batch`` InfoNCE groups of
1 + ``--negatives`` frames of one clip each (``images_per_step`` in the JSON).

Peak memory: CUDA, ``torch.cuda.max_memory_allocated`` (and reserved) over the whole run of a mode;
CPU, the subprocess's peak resident set size (``ru_maxrss``, frames included).

Prints ONE JSON object on stdout; progress goes to stderr.

    python examples/benchmarks/bench_train_engine.py --device cuda                      # batch 32 x 33 frames, 112²
    python examples/benchmarks/bench_train_engine.py --device cpu --steps 3 --warmup 1 --batch 2 --negatives 7 --image-size 64
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


def log(*parts) -> None:
    print("[bench_train_engine]", *parts, file=sys.stderr, flush=True)


def synthetic_data(clips: int, frames: int, image_size: int, expr_dim: int, seed: int = 0):
    import numpy as np

    from avatarcli.train.clebs_data import ExpressionClip, ExpressionData

    rng = np.random.default_rng(seed)
    items = [ExpressionClip(f"clip{i}", f"person{i % 8}", rng.standard_normal((frames, expr_dim)).astype(np.float32),
                            rng.integers(0, 256, (frames, image_size, image_size, 3), dtype=np.uint8),
                            pose=0.05 * np.cumsum(rng.standard_normal((frames, 3)), 0).astype(np.float32))
             for i in range(clips)]
    return ExpressionData(items, "synthetic", [("synthetic", "")])


def run_mode(args) -> dict:
    """One mode, in this process (the parent starts one process per mode)."""
    import torch

    from avatarcli.train.clebs_data import ClipBank
    from avatarcli.train.engine import EngineConfig, train
    from avatarcli.train.tasks.clebs import ClebsTask
    from stages.pretrain_expr import PretrainExprConfig

    precision, compile_model = MODES[args.mode]
    device = args.device
    data = synthetic_data(args.clips, args.frames, args.image_size, args.expr_dim)
    engine = EngineConfig(run_dir=tempfile.mkdtemp(prefix="bench_train_engine."), steps=args.warmup + args.steps,
                          precision=precision, compile=compile_model, checkpoint_every=10**9, log_every=10**9,
                          image_every=0, tensorboard=False, device=device, seed=0)
    config = PretrainExprConfig(image_size=args.image_size, negatives=args.negatives, batch_clips=args.batch,
                                width=args.width, engine=engine)
    bank = ClipBank(data, args.negatives + 1, device, config.negatives_from)
    task = ClebsTask(config, bank, data)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    t0 = time.perf_counter()
    result = train(engine, task, clock)
    total = time.perf_counter() - t0
    step_seconds = clock.step_seconds(args.warmup)
    rates = [1.0 / s for s in step_seconds]
    out = {
        "precision": precision,
        "compile": compile_model,
        "steps_timed": len(step_seconds),
        "steps_per_s": spread(rates),
        "step_ms_median": 1000 * statistics.median(step_seconds),
        "images_per_s_median": statistics.median(rates) * args.batch * (args.negatives + 1),
        "warmup_seconds": clock.warmup_seconds(args.warmup),
        "run_seconds": total,
        "final_loss": result.history["loss"][-1] if result.history["loss"] else None,
        "skipped_steps": result.skipped_steps,
        **peak_memory(device),
    }
    if not device.startswith("cuda"):
        out["peak_memory_kind"] = "process peak RSS (includes the frames)"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--batch", type=int, default=32, help="InfoNCE groups per step")
    parser.add_argument("--negatives", type=int, default=32, help="negatives per group (group = 1 + negatives frames)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--width", type=int, default=64, help="ResNetSE18 base width (64 = ResNet-18)")
    parser.add_argument("--clips", type=int, default=64, help="synthetic clips in memory")
    parser.add_argument("--frames", type=int, default=100, help="frames per synthetic clip")
    parser.add_argument("--expr-dim", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = parser.parse_args()
    if args.frames < args.negatives + 1:
        parser.error("--frames must be at least --negatives + 1")
    if args.mode:
        print(json.dumps(run_mode(args)))
        return

    import torch

    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    report = {
        "benchmark": "train_engine_clebs",
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "config": {"batch_groups": args.batch, "negatives": args.negatives, "images_per_step": args.batch * (args.negatives + 1),
                   "image_size": args.image_size, "width": args.width, "latent_dim": 256, "basis_size": 10,
                   "expr_dim": args.expr_dim, "steps": args.steps, "warmup": args.warmup},
        "modes": {},
    }
    passthrough = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                   if key not in ("modes", "mode")]
    for mode in modes:
        log(f"{mode}: {args.warmup} warm-up + {args.steps} timed steps on {args.device}")
        result, error = run_child(__file__, passthrough, "--mode", mode)
        report["modes"][mode] = result if result is not None else {"error": error}
        if result is not None:
            log(f"{mode}: {result['steps_per_s']['median']:.2f} steps/s")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
