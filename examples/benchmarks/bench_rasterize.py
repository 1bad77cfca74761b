#!/usr/bin/env python
"""Performance benchmark of ``avatarcli.render``: ``rasterize`` alone, and ``rasterize`` +
``interpolate`` (per-vertex colours, barycentrics recomputed from the clip positions so gradients
reach the vertices) + backward of a mean-squared loss, the inner step of mesh fitting.

The mesh is the ``v_neutral``/``faces`` pair of an .npz (``--mesh``; the ICT face model has
vertices in cm, y up, +z towards the camera), else a synthetic UV sphere of similar size. It is put
in front of an OpenCV pinhole camera so that it fills about 90% of the image; each batch element gets
its own small random head rotation (fixed seed), so the frames differ as in real fitting.

Each case runs ``--warmup`` untimed calls, then ``--repeats`` timed ones (CUDA is synchronised
before and after each call). Prints ONE JSON object on stdout; progress goes to stderr.

    python examples/benchmarks/bench_rasterize.py --device cpu --sizes 64,128 --batches 1,2 --repeats 3
    python examples/benchmarks/bench_rasterize.py --device cuda \\
        --mesh ../shared/assets/3dmm/ict_facekit/ict_face_light_f16.npz --sizes 256,512 --batches 1,64
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from avatarcli.render import interpolate, rasterize  # noqa: E402


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_mesh(path: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(vertices [V,3] float64 in a y-up, +z-towards-camera frame, faces [F,3] int64, description)."""
    if path:
        data = np.load(path)
        return data["v_neutral"].astype(np.float64), data["faces"].astype(np.int64), Path(path).name
    # UV sphere, 75 x 150 -> 11,102 vertices / 22,050 triangles, counter-clockwise seen from outside.
    n_lat, n_lon = 75, 150
    theta = np.linspace(0, np.pi, n_lat + 2)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1).reshape(-1, 3)
    verts = np.concatenate([ring, [[0, 1, 0], [0, -1, 0]]]) * 10.0
    idx = np.arange(n_lat * n_lon).reshape(n_lat, n_lon)
    a, b = idx[:-1], np.roll(idx, -1, 1)[:-1]
    c, d = idx[1:], np.roll(idx, -1, 1)[1:]
    quads = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    top, bottom = n_lat * n_lon, n_lat * n_lon + 1
    caps = [[top, idx[0, i], idx[0, (i + 1) % n_lon]] for i in range(n_lon)]
    caps += [[bottom, idx[-1, (i + 1) % n_lon], idx[-1, i]] for i in range(n_lon)]
    return verts, np.concatenate([quads, np.array(caps)]).astype(np.int64), "synthetic_uv_sphere"


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (f(a) for a in (yaw, pitch, roll) for f in (math.cos, math.sin))
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return r_roll @ r_pitch @ r_yaw


def camera_points(verts: np.ndarray, batch: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """[B,V,3] OpenCV camera-space points (x right, y down, z forward) and the camera distance."""
    rng = np.random.default_rng(seed)
    centre = (verts.min(0) + verts.max(0)) / 2
    local = verts - centre
    extent = float(np.max(verts.max(0)[:2] - verts.min(0)[:2]))
    distance = 1.5 * extent / 0.9  # focal = 1.5 * size: extent spans ~90% of the image
    out = []
    for b in range(batch):
        angles = np.radians(rng.uniform(-15, 15, 3)) if b else np.zeros(3)
        rotated = local @ rotation(*angles).T
        # Model frame (y up, +z to the camera) -> OpenCV camera: flip y and z, then push back.
        out.append(np.stack([rotated[:, 0], -rotated[:, 1], distance - rotated[:, 2]], -1))
    return np.stack(out), distance


def camera_to_clip(points: torch.Tensor, focal: float, size: int, near: float, far: float) -> torch.Tensor:
    """[B,V,3] OpenCV camera points -> [B,V,4] clip positions of a square image with a centred
    principal point (the convention of ``avatarcli.camera.clip_from_camera``)."""
    x, y, z = points.unbind(-1)
    clip_x = (2.0 / size) * (focal * x)  # + cx z - z with cx = size / 2 cancels
    clip_y = (2.0 / size) * (focal * y)
    clip_z = ((far + near) * z - 2.0 * far * near) / (far - near)
    return torch.stack([clip_x, clip_y, clip_z, z], -1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def summary(times: list[float], batch: int) -> dict:
    ordered = sorted(times)

    def pct(q: float) -> float:
        return float(np.percentile(ordered, q))

    median = statistics.median(ordered)
    return {
        "median_ms": round(median, 3),
        "p10_ms": round(pct(10), 3),
        "p90_ms": round(pct(90), 3),
        "median_ms_per_frame": round(median / batch, 4),
        "frames_per_s": round(1000 * batch / median, 1),
        "repeats": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default=None, help=".npz with v_neutral (V,3), faces (F,3); default: a sphere")
    parser.add_argument("--sizes", default="256,512", help="square image sizes, comma separated")
    parser.add_argument("--batches", default="1,64", help="batch sizes, comma separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--cull-backfaces", action="store_true")
    parser.add_argument("--max-candidates", type=int, default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    verts, faces_np, mesh_name = load_mesh(args.mesh)
    faces = torch.from_numpy(faces_np).to(device)
    extra = {} if args.max_candidates is None else {"max_candidates": args.max_candidates}
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            points_np, distance = camera_points(verts, batch)
            points = torch.tensor(points_np, dtype=dtype, device=device)
            clip = camera_to_clip(points, 1.5 * size, size, near=distance / 10, far=distance * 10)
            colours = torch.rand(batch, verts.shape[0], 3, dtype=dtype, device=device, generator=None)

            def raster_only():
                return rasterize(clip, faces, size, size, cull_backfaces=args.cull_backfaces, **extra)

            def raster_interp_backward():
                clip_var = clip.detach().requires_grad_()
                colour_var = colours.detach().requires_grad_()
                raster = rasterize(clip_var, faces, size, size, cull_backfaces=args.cull_backfaces, **extra)
                image = interpolate(colour_var, raster, faces, clip_pos=clip_var)
                image.square().mean().backward()
                return clip_var.grad

            log(f"size {size} batch {batch} ...")
            probe = raster_only()
            coverage = float(probe.mask.float().mean())
            case = {
                "size": size,
                "batch": batch,
                "coverage": round(coverage, 4),
                "visible_faces_frame0": int(torch.unique(probe.face_index[0]).numel() - 1),
                "rasterize": summary(time_calls(raster_only, device, args.warmup, args.repeats), batch),
                "rasterize_interpolate_backward": summary(
                    time_calls(raster_interp_backward, device, args.warmup, args.repeats), batch
                ),
            }
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                raster_interp_backward()
                sync(device)
                case["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            results.append(case)
            log(json.dumps(case))
            del probe, clip, points, colours
    info = {
        "benchmark": "avatarcli.render rasterize",
        "mesh": mesh_name,
        "vertices": int(verts.shape[0]),
        "faces": int(faces_np.shape[0]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "dtype": args.dtype,
        "cull_backfaces": args.cull_backfaces,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": results,
    }
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
