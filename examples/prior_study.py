"""Choose the identity and expression priors of ``avatar fit-3dmm`` by measurement, not landmark error alone.

For each prior setting (w_identity, w_expression) it fits the landmarks (landmark stages only, no
photometric stage, on a frame subset of each clip) and scores:

* ``contour_px``: fit on the inner 51 landmarks (``w_contour = 0``) and measure the error of the
  17 held-out jaw-contour points (px at 256²): a face shape that generalises predicts its contour;
* ``lmk_px``: mean error of all 68 points of the ordinary fit (``w_contour`` default);
* ``neutral_mouth``: on neutral frames (the clip's frames with the smallest inner-lip gap whose eyes
  are open, by landmark geometry), the mean summed weight of the mouth blendshapes that make a pout
  (pucker, funnel, press, roll, shrug, close) of the ordinary fit; ``neutral_all``: all 53 weights;
* on synthetic clips (``avatar synth``, known truth) with Gaussian landmark noise of the level the
  landmark detector shows on the real clips (``jitter_px``: frame-to-frame jitter from second
  differences, σ = std(x[t-1] - 2x[t] + x[t+1]) / √6): ``synth_vertex_mm`` (identity + expression
  mesh error over the face region) and ``synth_exp_mae``.

    python examples/prior_study.py REAL_CLIPS.h5 [--synth SYNTH.h5] [--frames 16] [--iters 30] \
        [--face-model ../shared/assets/3dmm/ict_facekit/ict_face_light_f16.npz] [--json out.json]

Prints one JSON object (every number) and a table. CPU: a few minutes for six clips of 16 frames at --iters 30.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np

POUT = ("mouthPucker", "mouthFunnel", "mouthPress_L", "mouthPress_R", "mouthRollLower", "mouthRollUpper",
        "mouthShrugLower", "mouthShrugUpper", "mouthClose")
DEFAULT_SETTINGS = ("1e-3:0.005", "1e-2:0.005", "3e-2:0.005", "1e-2:0.02", "3e-2:0.02", "1e-1:0.02")


def subsample(clip, frames: int):
    """Every k-th frame of ``clip`` so at most ``frames`` remain (neighbours stay neighbours for smoothness)."""
    step = max(1, int(np.ceil(len(clip.lmk68) / frames)))
    keep = np.arange(0, len(clip.lmk68), step)[:frames]
    frames_ = clip.frames[keep] if clip.frames is not None else None
    return replace(clip, lmk68=clip.lmk68[keep], weights=clip.weights[keep], frames=frames_), keep


def neutral_frames(lmk: np.ndarray, share: float = 0.25) -> np.ndarray:
    """Indices of neutral frames of ``lmk`` [T,68,2]: eyes open (lid gap over eye width at least 0.8 of
    the clip's median) and, among those, the ``share`` with the smallest inner-lip gap (over the
    mouth width)."""
    def gap(upper, lower, left, right):
        width = np.linalg.norm(lmk[:, left] - lmk[:, right], axis=-1)
        return np.linalg.norm(lmk[:, upper] - lmk[:, lower], axis=-1).mean(1) / width

    eyes = 0.5 * (gap([37, 38], [41, 40], 36, 39) + gap([43, 44], [47, 46], 42, 45))
    mouth = gap([61, 62, 63], [67, 66, 65], 60, 64)
    candidates = np.nonzero(eyes >= 0.8 * np.median(eyes))[0]
    count = max(1, int(round(share * len(candidates))))
    return candidates[np.argsort(mouth[candidates])[:count]]


def jitter_px(lmk: np.ndarray, size: int) -> float:
    """Landmark noise σ (px at 256²) from second differences of ``lmk`` [T,68,2] (inner 51 points):
    white noise of σ per coordinate gives var(x[t-1] - 2x[t] + x[t+1]) = 6σ²; smooth motion adds little.
    The median over points is robust to the few frames with real fast motion."""
    second = lmk[:-2, 17:] - 2 * lmk[1:-1, 17:] + lmk[2:, 17:]
    return float(np.median(np.sqrt((second ** 2).mean(0) / 6.0)) * 256.0 / size)


def fit(model, clips, size, config, device):
    import torch

    from avatarcli.fit.problem import BatchFit
    from avatarcli.fit.solve import fit_batch

    problem = BatchFit(model, clips, size, config, torch.device(device))
    fit_batch(problem, config)
    return problem


def score_real(model, clips, size, config, device, pout_index) -> dict:
    import torch

    held = fit(model, clips, size, replace(config, w_contour=0.0), device)
    scale = 256.0 / size
    with torch.no_grad():
        contour = float(held.landmark_residual_px()[:, :17].mean()) * scale
        inner_heldout_fit = float(held.landmark_residual_px()[:, 17:].mean()) * scale
    full = fit(model, clips, size, config, device)
    with torch.no_grad():
        err = full.landmark_residual_px() * scale
        exp = full.exp.detach().cpu().numpy()
    start, mouth, total, per_clip = 0, [], [], {}
    for clip in clips:
        neutral = start + neutral_frames(clip.lmk68)
        mouth.append(exp[neutral][:, pout_index].sum(1))
        total.append(exp[neutral].sum(1))
        per_clip[clip.name] = {"lmk_px": float(err[start:start + len(clip.lmk68)].mean()),
                               "neutral_mouth": float(mouth[-1].mean())}
        start += len(clip.lmk68)
    return {"contour_px": contour, "inner_px_when_held_out": inner_heldout_fit, "lmk_px": float(err.mean()),
            "neutral_mouth": float(np.concatenate(mouth).mean()), "neutral_all": float(np.concatenate(total).mean()),
            "per_clip": per_clip}


def score_synth(model, clips, truth, size, config, device, sigma_px, seed=0) -> dict:
    import torch


    rng = np.random.default_rng(seed)
    noisy = [replace(c, lmk68=(c.lmk68 + rng.normal(0, sigma_px * size / 256.0, c.lmk68.shape)).astype(np.float32))
             for c in clips]
    problem = fit(model, noisy, size, config, device)
    region = model.face_region
    errors, exp_err, start = [], [], 0
    with torch.no_grad():
        for clip in noisy:
            sl = slice(start, start + len(clip.lmk68))
            start = sl.stop
            id_true, exp_true = truth[clip.name]
            v_true = model.vertices(id_true[None].expand(len(exp_true), -1), exp_true)[:, region]
            v_fit = model.vertices(problem.identity_per_frame()[sl], problem.exp[sl])[:, region]
            errors.append((v_fit - v_true).norm(dim=-1).mean())
            exp_err.append((problem.exp[sl] - exp_true).abs().mean())
    return {"synth_vertex_mm": float(torch.stack(errors).mean()), "synth_exp_mae": float(torch.stack(exp_err).mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("clips", help="clips artifact of real videos (avatar preprocess)")
    parser.add_argument("--synth", help="clips artifact of avatar synth (scored with the real clips' jitter)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (every k-th)")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="w_identity:w_expression")
    parser.add_argument("--iters", type=int, default=None, help="Gauss-Newton iterations (default: the config's)")
    parser.add_argument("--face-model", default="ict", help="ict, bfm or a file (found as fit-3dmm finds it)")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args(argv)

    import h5py
    import torch

    from avatarcli.facemodel import load_face_model
    from avatarcli.fit.config import FitConfig
    from avatarcli.fit.inputs import read_clip_inputs

    model = load_face_model(args.face_model, None).to("cpu", torch.float32)
    pout_index = [model.exp_index(n) for n in POUT]
    base = FitConfig(landmarks_only=True, cuda_graphs=False)
    if args.iters:
        base = replace(base, iters=args.iters)
    with h5py.File(args.clips, "r") as handle:
        names = sorted(handle["clips"])
        size = int(handle["clips"][names[0]]["frames"].shape[1])
        full, _ = read_clip_inputs(handle, names, with_frames=False)
    jitter = {c.name: jitter_px(c.lmk68, size) for c in full}
    sigma = float(np.median(list(jitter.values())))
    clips = [subsample(c, args.frames)[0] for c in full]
    synth, truth, synth_size = None, {}, None
    if args.synth:
        with h5py.File(args.synth, "r") as handle:
            snames = sorted(handle["clips"])
            synth_size = int(handle["clips"][snames[0]]["frames"].shape[1])
            full_synth, _ = read_clip_inputs(handle, snames, with_frames=False)
            synth = []
            for clip in full_synth:
                short, keep = subsample(clip, args.frames)
                synth.append(short)
                group = handle["clips"][clip.name]["truth"]
                truth[clip.name] = (torch.as_tensor(group["identity"][()]),
                                    torch.as_tensor(group["expression"][()][keep]))
    rows = []
    for setting in args.settings:
        w_id, w_exp = (float(v) for v in setting.split(":"))
        config = replace(base, w_identity=w_id, w_expression=w_exp)
        began = time.perf_counter()
        row = {"w_identity": w_id, "w_expression": w_exp, **score_real(model, clips, size, config, "cpu", pout_index)}
        if synth is not None:
            row.update(score_synth(model, synth, truth, synth_size, config, "cpu", sigma))
        row["seconds"] = round(time.perf_counter() - began, 1)
        rows.append(row)
        print(f"done {setting} in {row['seconds']} s: {json.dumps({k: v for k, v in row.items() if k != 'per_clip'})}",
              file=sys.stderr, flush=True)
    result = {"clips": [c.name for c in clips], "frames_per_clip": args.frames, "crop_size": size,
              "jitter_px": jitter, "noise_sigma_px": sigma, "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    header = ["w_id", "w_exp", "contour_px", "lmk_px", "neut_mouth", "neut_all", "syn_mm", "syn_exp"]
    print(" | ".join(f"{h:>10}" for h in header))
    for r in rows:
        cells = [r["w_identity"], r["w_expression"], r["contour_px"], r["lmk_px"], r["neutral_mouth"],
                 r["neutral_all"], r.get("synth_vertex_mm", float("nan")), r.get("synth_exp_mae", float("nan"))]
        print(" | ".join(f"{c:>10.4g}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
