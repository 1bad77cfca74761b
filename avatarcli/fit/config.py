"""Settings of the fitting solver (torch-free: CLI code may import it for defaults).

Each field is marked with :func:`avatarcli.stage.option` (changes the result) or
:func:`~avatarcli.stage.setting` (does not), so a stage config that extends :class:`FitConfig`
hashes and offers them on its command line like its own fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from avatarcli.stage.config import option, setting


@dataclass
class FitConfig:
    """Every solver setting. All but ``cuda_graphs`` change the result."""

    focal: float = option(1160.0, help="Focal length in px for a 256² crop (scaled with the crop size).")
    """Focal length in pixels for a 256² crop (scaled with the crop size); ~12.6° field of view."""
    rigid_iters: int = option(5, help="Gauss-Newton iterations of the rigid stage.")
    """Gauss-Newton iterations of the first stage: rotation and translation on landmarks."""
    iters: int = option(60, help="Gauss-Newton iterations of the landmark (identity + expression) stage.")
    """Gauss-Newton iterations of the second stage: + identity and expression on landmarks."""
    damping: float = option(1e-4, help="Levenberg-Marquardt damping of the Gauss-Newton steps (relative to "
                                       "the diagonal).")
    """Levenberg-Marquardt damping of the Gauss-Newton stages (relative to the diagonal)."""
    cg_iters: int = option(12, help="Conjugate-gradient iterations per Gauss-Newton step.")
    """Conjugate-gradient iterations per Gauss-Newton step (they resolve the coupling of
    neighbouring frames by smoothness and the weakly determined shape directions)."""
    adapt_noise: bool = option(True, help="Re-estimate each clip's landmark noise three times during the shape "
                                          "stage and weigh the landmarks by its inverse (off: 1 px throughout).")
    """Re-estimate each clip's landmark noise from its residuals three times during the shape stage
    (after each quarter; noise = 1 px before the first) and weigh the landmarks by its inverse (MAP
    with an estimated noise level: exact synthetic landmarks end at the floor, real detections near
    their error). Only a few times: re-estimating every iteration lets the shape chase detector
    noise. Off: noise = 1 px throughout."""
    landmark_noise_floor_px: float = option(0.05, help="Lower bound of the estimated landmark noise (px at 256²).")
    """Lower bound of that estimate (px at 256²): the strongest the landmarks can weigh against
    the priors (exact synthetic landmarks reach it; real detections stay near 1 px)."""
    photo_iters: int = option(50, help="Iterations of the photometric stage.")
    """Iterations of the photometric stage (0 or ``landmarks_only`` skips it)."""
    landmarks_only: bool = option(False, help="No photometric stage.")
    """Fit landmarks only: no rendering, lighting or albedo (albedo is the model's mean)."""
    photo_size: int = option(128, help="Render side for the photometric stage.")
    """Side of the renders compared with the (downsampled) frames in the photometric stage."""
    photo_samples: int = option(512, help="Random face pixels per frame per photometric iteration (0: all).")
    """Photometric stage: covered pixels per frame compared per iteration, drawn at random anew
    every ``sample_every`` iterations (an unbiased estimate of the mean over the face region at a
    cost that does not grow with ``photo_size``); 0 compares every covered pixel."""
    raster_every: int = option(25, help="Photometric stage: re-rasterize (visibility) every N iterations.")
    """Photometric stage: re-rasterize (visibility) every N iterations; between them the visible
    triangles are kept and only barycentrics, shading and colours are recomputed (differentiably).
    After the landmark stages the geometry moves little, so visibility changes slowly."""
    sample_every: int = option(5, help="Photometric stage: draw new pixel samples every N iterations.")
    """Photometric stage: draw new pixel samples from the last raster every N iterations."""
    lr: float = option(1.0, help="Scale of every learning rate of the photometric stage (Adam).")
    """Scale of every learning rate (Adam)."""
    w_landmarks: float = option(1.0, help="Weight of the robust landmark term (per point, px at 256²).")
    """Weight of the robust landmark term (per point, in px at 256²)."""
    w_contour: float = option(0.3, help="Weight of the 17 jaw-contour landmarks relative to the inner 51 "
                                        "(0: fit on the inner 51 only, e.g. to score the contour held out).")
    """Weight of the 17 jaw-contour landmarks (iBUG 0..16) relative to the inner 51: the contour is a
    silhouette on real faces, not fixed vertices, so it counts less; 0 holds it out of the fit."""
    w_photo: float = option(500.0, help="Weight of the robust photometric term (colour in 0..1).")
    """Weight of the robust photometric term (colour in 0..1)."""
    w_identity: float = option(3e-3, help="Weight of the identity prior, per clip.")
    """Weight of the identity prior (squared coefficients over their std), per clip, against the
    landmark term at 1 px noise (see ``adapt_noise``). 3e-3 by ``examples/prior_study.py`` (six real
    clips, ICT): in the band of lowest held-out jaw-contour error (3e-3..1e-2: the shape that
    generalises) and the best identity + expression recovery on synthetic clips at real landmark
    noise. Landmark error alone always prefers the weakest prior (the old 1e-3)."""
    w_expression: float = option(0.05, help="Weight of the expression prior.")
    """Weight of the expression prior (L1 for blendshape weights, squared for PCA coefficients).
    0.05 by the same study: mouth blendshapes on neutral real frames (pout) 7x lower than at 0.005
    and the best synthetic expression recovery; landmark error ~0.5 px higher in the study's short
    landmark-only fits."""
    w_smooth: float = option(1.0, help="Weight of temporal smoothness of pose and expression.")
    """Weight of temporal smoothness (squared frame-to-frame change of pose and expression)."""
    cuda_graphs: bool = setting(True, help="On CUDA, replay the Gauss-Newton steps and photometric iterations "
                                           "as CUDA graphs (same result up to rounding).")
    """On CUDA, replay the Gauss-Newton steps and the (sampled) photometric iterations as CUDA graphs
    (the same computation up to rounding, without a kernel launch from Python per operation).
    Does not change the result."""
