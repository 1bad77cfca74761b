"""Errors of a fit against the known parameters of a synthetic clips artifact (``avatar synth``)."""

from __future__ import annotations

from pathlib import Path

import torch


def synthetic_errors(clips_path: str | Path, coeffs_path: str | Path, face_model: str = "ict",
                     models_dir: str | None = None) -> dict:
    """Errors of a fit against the ``truth/*`` of a synthetic clips artifact (``avatar synth``).

    Vertex error: mean Euclidean distance (mm) over the face region between the fitted and true
    meshes in model space (identity + expression, pose removed), over all frames; no alignment (the
    headline number). ``vertex_error_mm_similarity_aligned``: the same after a per-frame similarity
    (scale, rotation, translation) alignment of the fitted to the true face region, which forgives
    the depth-versus-size ambiguity of a single calibrated camera (for comparison with NoW-style
    numbers only). Expression:
    mean absolute error per channel. Pose: mean absolute rotation error (degrees).
    """

    from avatarcli.artifact import open_artifact, read_strings
    from avatarcli.facemodel import load_face_model
    from avatarcli.schemas import CLIPS, COEFFS

    model = load_face_model(face_model, models_dir).to("cpu", torch.float32)
    region = model.face_region
    vertex_errors, aligned_errors, exp_abs, rot_abs, frames = [], [], [], [], 0
    with open_artifact(clips_path, CLIPS.kind) as clips, open_artifact(coeffs_path, COEFFS.kind) as coeffs:
        for name in read_strings(coeffs["index/clip_id"]):
            truth = clips["clips"][name]["truth"]
            fit = coeffs["coeffs"][name]
            id_true = torch.as_tensor(truth["identity"][()])[None]
            exp_true = torch.as_tensor(truth["expression"][()])
            id_fit = torch.as_tensor(fit["identity"][()])
            exp_fit = torch.as_tensor(fit["expression"][()])
            v_true = model.vertices(id_true.expand(len(exp_true), -1), exp_true)[:, region]
            v_fit = model.vertices(id_fit, exp_fit)[:, region]
            vertex_errors.append((v_fit - v_true).norm(dim=-1).mean(1))
            aligned_errors.append((similarity_align(v_fit, v_true) - v_true).norm(dim=-1).mean(1))
            exp_abs.append((exp_fit - exp_true).abs())
            rot_abs.append((torch.as_tensor(fit["rotation"][()]) - torch.as_tensor(truth["pose6"][()][:, :3])).abs())
            frames += len(exp_true)
    vertex = torch.cat(vertex_errors)
    aligned = torch.cat(aligned_errors)
    exp = torch.cat(exp_abs)
    rot = torch.cat(rot_abs)
    names = model.exp_names or [f"exp{i}" for i in range(exp.shape[1])]
    return {
        "frames": frames,
        "vertex_error_mm": {"mean": float(vertex.mean()), "median": float(vertex.median()), "max": float(vertex.max())},
        # secondary number, as NoW-style benchmarks report it: after a per-frame similarity alignment
        "vertex_error_mm_similarity_aligned": {"mean": float(aligned.mean()), "median": float(aligned.median()),
                                               "max": float(aligned.max())},
        "expression_mae_per_channel": {n: float(v) for n, v in zip(names, exp.mean(0))},
        "expression_mae_mean": float(exp.mean()),
        "rotation_error_deg": {k: float(v) for k, v in zip(("pitch", "yaw", "roll"), torch.rad2deg(rot.mean(0)))},
    }


def similarity_align(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``source`` [B,N,3] moved by the per-batch similarity (Umeyama) that best fits ``target`` [B,N,3]."""
    mu_s, mu_t = source.mean(1, keepdim=True), target.mean(1, keepdim=True)
    xs, xt = (source - mu_s).double(), (target - mu_t).double()
    u, sigma, vh = torch.linalg.svd(xt.transpose(1, 2) @ xs)
    sign = torch.ones_like(sigma)
    sign[:, -1] = torch.sign(torch.linalg.det(u @ vh))
    rotation = u @ torch.diag_embed(sign) @ vh
    scale = (sigma * sign).sum(1) / xs.pow(2).sum((1, 2))
    moved = scale[:, None, None] * xs @ rotation.transpose(1, 2)
    return (moved + mu_t.double()).to(source.dtype)
