#!/usr/bin/env python
"""Performance benchmark of ``avatar render`` (stage ``stages.render``).

For each image size a generator of ``--preset`` (default: the paper's, h = 1024) is built with
RANDOM weights (speed does not depend on the weights; the frames are meaningless) and written as a
generator artifact, with a synthetic driving clip (``--frames`` frames at that size) and its fits
(random β, cameras 1 m in front of the head). Then, per precision (fp32, bf16 autocast) and batch
(``--batches``):

* ``stage``: the whole stage, ``stages.render.run`` into a fresh output (after one untimed warm-up
  run): loading the generator, hashing the inputs, reading the source frame and the fits, rendering,
  deflating and writing the frames, validating and renaming the artifact. ``stage_ms_per_frame`` is
  the summary's seconds / frames; ``stage_steady_ms_per_frame`` leaves out the per-run fixed costs
  (generator load and input hashing), i.e. what a long clip costs per frame.
* ``model``: ``Driver.render`` alone (β -> β′, G(S, β) tri-plane, volume rendering, super-resolution,
  to uint8), on the device, synchronised, median of ``--repeats`` timed calls after a warm-up.

Targets (issue 14, one H100): <= 16 ms per frame at batch 1 at 256² and >= 300 frames/s batched.
Prints ONE JSON object on stdout; progress goes to stderr.

    python examples/benchmarks/bench_render.py --device cpu --preset tiny --sizes 64 --batches 1,4 --frames 8
    python examples/benchmarks/bench_render.py --device cuda --sizes 256,512 --batches 1,32 --frames 128
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
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

BETA_DIM = 53  # ICT expression coefficients (fit-3dmm)
TARGET_MS_BATCH1_256 = 16.0
TARGET_FPS_BATCHED = 300.0


def log(*parts) -> None:
    print("[bench_render]", *parts, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--preset", default="paper", help="generator preset (paper, small, tiny)")
    p.add_argument("--sizes", default="256,512", help="comma list of image sizes")
    p.add_argument("--batches", default="1,32", help="comma list of --batch-frames values")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--frames", type=int, default=128, help="frames of the synthetic driving clip")
    p.add_argument("--repeats", type=int, default=5, help="timed model-only calls (median)")
    p.add_argument("--skip-stage", action="store_true", help="model-only figures")
    return p.parse_args(argv)


def write_inputs(root: Path, size: int, frames: int) -> tuple[Path, Path]:
    """A one-clip driving artifact (smooth random frames) and its fits (random β, frontal cameras)."""
    import torch

    from avatarcli.artifact import ArtifactWriter, FrameWriter, write_strings
    from avatarcli.camera import eg3d_camera, intrinsics_matrix, pose6_to_rt
    from avatarcli.clips import write_clip_tables
    from avatarcli.schemas import CLIPS, COEFFS

    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (frames, 8, 8, 3)).astype(np.float32)
    video = torch.nn.functional.interpolate(torch.from_numpy(low).permute(0, 3, 1, 2), size=(size, size),
                                            mode="bilinear").permute(0, 2, 3, 1).round().byte().numpy()
    clips = root / f"drv{size}.h5"
    with ArtifactWriter(clips, CLIPS, {"bench": True}, extra_attrs={"crop_size": size, "fps": 25.0}) as writer:
        unit = writer.handle.create_group("clips").create_group("clip")
        writer_frames = FrameWriter(1)
        writer_frames.write(unit, "frames", video)
        writer_frames.close()
        t = frames
        for key, data in (("boxes", np.zeros((t, 4), np.float32)), ("kps5", np.zeros((t, 5, 2), np.float32)),
                          ("lmk68", np.zeros((t, 68, 2), np.float32)), ("det_score", np.ones(t, np.float32)),
                          ("detected", np.ones(t, bool)), ("landmarked", np.ones(t, bool)),
                          ("timestamps", np.arange(t) / 25.0), ("source_frame", np.arange(t, dtype=np.int64))):
            unit.create_dataset(key, data=data)
        unit.attrs.update({"source_path": "bench", "source_fps": 25.0, "fps": 25.0, "identity": "bench",
                           "identity_id": 0, "segment": 0, "source_width": size, "source_height": size})
        write_clip_tables(writer.handle, ["clip"], [0], [t], [0], ["bench"], ["bench"], [""], ["ok"], [""], [1])
    pose6 = np.zeros((frames, 6), np.float32)
    pose6[:, 1] = np.linspace(-0.3, 0.3, frames)
    pose6[:, 5] = 1000.0
    R, tr = pose6_to_rt(torch.from_numpy(pose6))
    cams = eg3d_camera(R, tr, intrinsics_matrix(4.5 * size, size / 2, size / 2), size).numpy()
    coeffs = root / f"drvc{size}.h5"
    with ArtifactWriter(coeffs, COEFFS, {"bench": True}, [],
                        extra_attrs={"face_model": "ict", "face_model_sha256": "", "crop_size": size}) as writer:
        group = writer.handle.create_group("coeffs").create_group("clip")
        arrays = {"identity": np.zeros((frames, 4)), "expression": rng.normal(size=(frames, BETA_DIM)) * 0.3,
                  "rotation": pose6[:, :3], "translation": pose6[:, 3:], "lighting": np.zeros((frames, 9, 3)),
                  "camera25": cams, "pose6": pose6, "intrinsics": np.tile(np.eye(3), (frames, 1, 1)),
                  "lmk_error": np.zeros(frames)}
        for key, value in arrays.items():
            group.create_dataset(key, data=np.asarray(value, np.float32))
        group.create_dataset("flagged", data=np.zeros(frames, bool))
        group.attrs.update({"clip_id": "clip", "fps": 25.0, "crop_size": size})
        index = writer.handle.create_group("index")
        write_strings(index, "clip_id", ["clip"])
        index.create_dataset("num_frames", data=np.asarray([frames], np.int32))
        index.create_dataset("lmk_error", data=np.zeros(1, np.float32))
        skipped = writer.handle.create_group("skipped")
        write_strings(skipped, "clip_id", [])
        write_strings(skipped, "reason", [])
    return clips, coeffs


def write_random_generator(root: Path, preset: str, size: int, cams: np.ndarray) -> Path:
    """A raw-β generator of ``preset`` at ``size`` with random weights (timing only)."""
    import torch

    from avatarcli.camera import generator_world_scale
    from avatarcli.export3d.artifact import write_generator
    from avatarcli.export3d.generator import Export3DGenerator, GeneratorShape

    torch.manual_seed(0)
    shape = GeneratorShape.from_preset(preset, expr_dim=BETA_DIM, image_size=size)
    data = SimpleNamespace(clips=[], world_scale=generator_world_scale(torch.from_numpy(cams)), parents=[],
                           train_identities=[], val_identities=[])
    return write_generator(root / f"gen{size}.h5", Export3DGenerator(shape).eval(), shape, preset=preset,
                           expression="raw", config_json={"bench": "random weights"}, data=data,
                           history={"step": [], "loss": []}, losses={}, validation_protocol="none (benchmark)")


def time_stage(gen, clips, coeffs, out: Path, device: str, batch: int, precision: str) -> dict:
    from stages.render import RenderConfig, run

    config = RenderConfig(device=device, batch_frames=batch, precision=precision, overwrite=True)
    run(RenderConfig(device=device, batch_frames=batch, precision=precision, overwrite=True, frames="0:2"),
        gen, clips, out, coeffs)  # warm-up (first-call costs)
    summary = run(config, gen, clips, out, coeffs)
    fixed = sum(summary.timings.get(k, {}).get("seconds", 0.0) for k in ("load_generator", "hash_inputs"))
    return {"stage_ms_per_frame": 1000 * summary.seconds / summary.frames,
            "stage_fps": summary.frames / summary.seconds,
            "stage_steady_ms_per_frame": 1000 * (summary.seconds - fixed) / summary.frames,
            "stage_seconds": summary.seconds, "frames": summary.frames,
            "steps_seconds": {k: round(v["seconds"], 4) for k, v in summary.timings.items()}}


def time_model(gen, coeffs, device, batch: int, precision: str, repeats: int) -> dict:
    import h5py
    import torch

    from avatarcli.camera import to_generator_camera
    from avatarcli.export3d.artifact import load_generator
    from avatarcli.export3d.drive import Driver

    loaded = load_generator(gen, device)
    driver = Driver(loaded, device, precision)
    with h5py.File(coeffs) as handle:
        beta = torch.from_numpy(handle["coeffs/clip/expression"][:batch]).to(device)
        cams = to_generator_camera(torch.from_numpy(handle["coeffs/clip/camera25"][:batch]), loaded.world_scale)
    size = loaded.shape.image_size
    source = driver.source(torch.randint(0, 256, (size, size, 3), dtype=torch.uint8))
    cams = cams.to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    driver.render(source, beta, cams)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        driver.render(source, beta, cams)
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None
    return {"model_ms_per_frame": 1000 * seconds / batch, "model_fps": batch / seconds,
            "model_peak_gib": peak, "parameters_m": sum(p.numel() for p in loaded.model.parameters()) / 1e6}


def main(argv=None) -> int:
    import torch

    from avatarcli.devices import resolve_device

    args = parse_args(argv)
    device = resolve_device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    precisions = [p.strip() for p in args.precisions.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in sizes:
            clips, coeffs = write_inputs(root, size, args.frames)
            import h5py

            with h5py.File(coeffs) as handle:
                cams = handle["coeffs/clip/camera25"][()]
            gen = write_random_generator(root, args.preset, size, cams)
            for precision in precisions:
                for batch in batches:
                    if torch.device(device).type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    row = {"size": size, "batch": batch, "precision": precision}
                    row.update(time_model(gen, coeffs, device, batch, precision, args.repeats))
                    if not args.skip_stage:
                        row.update(time_stage(gen, clips, coeffs, root / "out.h5", device, batch, precision))
                    log(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                    if k != "steps_seconds"}))
                    results.append(row)
    batch1 = [r for r in results if r["size"] == 256 and r["batch"] == 1]
    batched = [r for r in results if r["batch"] > 1]
    key = "stage_steady_ms_per_frame" if not args.skip_stage else "model_ms_per_frame"
    report = {
        "benchmark": "bench_render", "device": device,
        "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor(),
        "torch": torch.__version__, "preset": args.preset, "frames": args.frames,
        "weights": "random (timing only: speed does not depend on the weights)",
        "results": results,
        "targets": {"batch1_256_ms": TARGET_MS_BATCH1_256, "batched_fps": TARGET_FPS_BATCHED},
        "best_batch1_256_ms": min((r[key] for r in batch1), default=None),
        "best_batched_fps": max((1000 / r[key] for r in batched), default=None),
        "measure": key,
    }
    report["meets_batch1_target"] = (report["best_batch1_256_ms"] is not None
                                     and report["best_batch1_256_ms"] <= TARGET_MS_BATCH1_256)
    report["meets_batched_target"] = (report["best_batched_fps"] is not None
                                      and report["best_batched_fps"] >= TARGET_FPS_BATCHED)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
