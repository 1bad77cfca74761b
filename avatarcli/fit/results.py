"""The per-clip arrays of a fitted batch (the content of a coeffs unit)."""

from __future__ import annotations

import numpy as np
import torch

from avatarcli.fit.problem import BatchFit


def batch_results(fit: BatchFit) -> list[dict]:
    """Per clip of ``fit``: ``name``, ``fps`` and float32 arrays ``identity`` [T,I], ``expression``
    [T,E], ``rotation`` [T,3], ``translation`` [T,3], ``lighting`` [T,9,3], ``camera25`` [T,25] (EG3D),
    ``pose6`` [T,6], ``intrinsics`` [T,3,3], ``lmk_error`` [T] (mean landmark error, crop px) and
    ``albedo`` [V,3]."""

    from avatarcli.camera import eg3d_camera

    with torch.no_grad():
        R, t = fit.rt()
        cam25 = eg3d_camera(R, t, fit.K[None].expand(len(R), 3, 3), fit.size)
        error = fit.landmark_residual_px().mean(1)
        idf = fit.identity_per_frame()
        albedo_all = fit.albedo()
        out = []
        start = 0
        for clip in fit.clips:
            sl = slice(start, start + len(clip.lmk68))
            start = sl.stop
            out.append({
                "name": clip.name, "fps": clip.fps,
                "identity": idf[sl].cpu().numpy().astype(np.float32),
                "expression": fit.exp[sl].cpu().numpy().astype(np.float32),
                "rotation": fit.rot[sl].cpu().numpy().astype(np.float32),
                "translation": fit.trans[sl].cpu().numpy().astype(np.float32),
                "lighting": fit.light[sl].cpu().numpy().astype(np.float32),
                "camera25": cam25[sl].cpu().numpy().astype(np.float32),
                "pose6": torch.cat([fit.rot[sl], fit.trans[sl]], -1).cpu().numpy().astype(np.float32),
                "intrinsics": fit.K[None].expand(sl.stop - sl.start, 3, 3).cpu().numpy().astype(np.float32),
                "lmk_error": error[sl].cpu().numpy().astype(np.float32),
                "albedo": albedo_all[sl.start].cpu().numpy().astype(np.float32),
            })
    return out
