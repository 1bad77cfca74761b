"""Settings of the fitting solver (torch-free: CLI code may import it for defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FitConfig:
    """Every solver setting. All but ``cuda_graphs`` change the result."""

    focal: float = 1160.0
    """Focal length in pixels for a 256² crop (scaled with the crop size); ~12.6° field of view."""
    rigid_iters: int = 5
    """Gauss-Newton iterations of the first stage: rotation and translation on landmarks."""
    iters: int = 60
    """Gauss-Newton iterations of the second stage: + identity and expression on landmarks."""
    damping: float = 1e-4
    """Levenberg-Marquardt damping of the Gauss-Newton stages (relative to the diagonal)."""
    cg_iters: int = 12
    """Conjugate-gradient iterations per Gauss-Newton step (they resolve the coupling of
    neighbouring frames by smoothness and the weakly determined shape directions)."""
    adapt_noise: bool = True
    """Re-estimate each clip's landmark noise from its residuals three times during the shape stage
    (after each quarter; noise = 1 px before the first) and weigh the landmarks by its inverse (MAP
    with an estimated noise level: exact synthetic landmarks end at the floor, real detections near
    their error). Only a few times: re-estimating every iteration lets the shape chase detector
    noise. Off: noise = 1 px throughout."""
    landmark_noise_floor_px: float = 0.05
    """Lower bound of that estimate (px at 256²): the strongest the landmarks can weigh against
    the priors (exact synthetic landmarks reach it; real detections stay near 1 px)."""
    photo_iters: int = 50
    """Iterations of the photometric stage (0 or ``landmarks_only`` skips it)."""
    landmarks_only: bool = False
    """Fit landmarks only: no rendering, lighting or albedo (albedo is the model's mean)."""
    photo_size: int = 128
    """Side of the renders compared with the (downsampled) frames in the photometric stage."""
    photo_samples: int = 512
    """Photometric stage: covered pixels per frame compared per iteration, drawn at random anew
    every ``sample_every`` iterations (an unbiased estimate of the mean over the face region at a
    cost that does not grow with ``photo_size``); 0 compares every covered pixel."""
    raster_every: int = 25
    """Photometric stage: re-rasterize (visibility) every N iterations; between them the visible
    triangles are kept and only barycentrics, shading and colours are recomputed (differentiably).
    After the landmark stages the geometry moves little, so visibility changes slowly."""
    sample_every: int = 5
    """Photometric stage: draw new pixel samples from the last raster every N iterations."""
    lr: float = 1.0
    """Scale of every learning rate (Adam)."""
    w_landmarks: float = 1.0
    """Weight of the robust landmark term (per point, in px at 256²)."""
    w_photo: float = 500.0
    """Weight of the robust photometric term (colour in 0..1)."""
    w_identity: float = 1e-3
    """Weight of the identity prior (squared coefficients over their std), per clip, against the
    landmark term at 1 px noise (see ``adapt_noise``)."""
    w_expression: float = 0.005
    """Weight of the expression prior (L1 for blendshape weights, squared for PCA coefficients)."""
    w_smooth: float = 1.0
    """Weight of temporal smoothness (squared frame-to-frame change of pose and expression)."""
    cuda_graphs: bool = True
    """On CUDA, replay the Gauss-Newton steps and the (sampled) photometric iterations as CUDA graphs
    (the same computation up to rounding, without a kernel launch from Python per operation).
    Does not change the result."""
