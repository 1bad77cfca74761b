"""Sampling of synthetic face clips (``avatar synth``): everything drawn for a clip, on the host.

A clip's truth (identity, expression and head-pose trajectories, SH light, skin albedo, intrinsics,
background) is drawn from ``numpy.random.default_rng([seed, clip])`` only, so it does not depend on
the device or on the number of clips. ``config`` below is ``avatar synth``'s ``SynthConfig`` (any
object with its fields). The rotations and the SH basis are those of :mod:`avatarcli.camera` and
:mod:`avatarcli.render.shading`, evaluated in float64 on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from avatarcli.synthetic.caps import CAP_COLOURS, CAP_IRIS, IRIS_COLOURS, Caps, find_caps

SKIN_LIGHT = (0.87, 0.70, 0.60)
"""Lightest skin tone of the sampler (sRGB-encoded albedo, 0..1)."""
SKIN_DARK = (0.36, 0.24, 0.18)
"""Darkest skin tone of the sampler."""
NOSE_TIP = 30
"""iBUG index of the nose tip (the crop centre of ``avatar preprocess``)."""


@dataclass
class ModelArrays:
    """The few face-model arrays the sampler needs, in float64 numpy."""

    num_id: int
    num_exp: int
    id_std: np.ndarray
    """[KI] (ones when the model has none)."""
    exp_std: np.ndarray | None
    """[KE] for PCA expression models, None for blendshape weights."""
    exp_names: list[str] | None
    mean_verts: np.ndarray
    """[V, 3] neutral / mean shape, mm."""
    nose_mean: np.ndarray
    """[3] nose-tip vertex of the mean shape."""
    nose_id_basis: np.ndarray
    """[KI, 3] nose-tip displacement per identity coefficient."""
    caps: Caps | None
    """Eye and mouth caps (None when the mesh has no openings)."""
    lip_weight: np.ndarray
    """[V] 0..1, closeness to the mouth opening (for the lip tint; zeros without one)."""

    @classmethod
    def from_model(cls, model) -> "ModelArrays":
        lmk = model.lmk68.cpu().numpy()
        nose = int(lmk[NOSE_TIP])
        id_std = model.id_std.double().cpu().numpy() if model.id_std is not None else np.ones(model.num_id)
        exp_std = None
        if model.exp_range == "gaussian":
            exp_std = (model.exp_std.double().cpu().numpy() if model.exp_std is not None else np.ones(model.num_exp))
        mean = model.mean.double().cpu().numpy()
        caps = find_caps(mean, model.faces.cpu().numpy(), lmk)
        lip = np.zeros(mean.shape[0])
        if caps is not None and len(caps.mouth_loop):
            ring = mean[caps.mouth_loop]
            dist = np.sqrt(((mean[:, None, :] - ring[None]) ** 2).sum(-1)).min(1)
            lip = np.exp(-((dist / 8.0) ** 2))
        return cls(model.num_id, model.num_exp, id_std, exp_std, list(model.exp_names) if model.exp_names else None,
                   mean, mean[nose], model.id_basis[:, nose].double().cpu().numpy(), caps, lip)


@dataclass
class ClipTruth:
    """Everything drawn for one clip (float32 arrays), i.e. the ``truth/*`` datasets and the
    background."""

    index: int
    identity: np.ndarray
    """[KI] identity coefficients."""
    expression: np.ndarray
    """[T, KE] expression coefficients (ICT: blendshape weights in [0, 1])."""
    pose6: np.ndarray
    """[T, 6] (pitch, yaw, roll, tx, ty, tz), radians and mm."""
    lighting: np.ndarray
    """[T, 9, 3] SH coefficients as ``render_mesh`` takes them (AMBIENT added inside)."""
    albedo: np.ndarray
    """[V, 3] per-vertex albedo, 0..1."""
    intrinsics: np.ndarray
    """[3, 3] pinhole K in pixels of the ``size`` frame."""
    background: np.ndarray
    """[S, S, 3] background image, 0..1."""
    active: list[int] = field(default_factory=list)
    """Indices of the active expression channels."""
    cap_albedo: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    """[E, 3] albedo of the rendering-only cap vertices (see :class:`Caps`); empty without caps."""


def smooth_signals(rng: np.random.Generator, frames: int, fps: float, count: int, max_hz: float,
                   components: int = 3) -> np.ndarray:
    """``[frames, count]`` smooth signals in [-1, 1]: per signal a normalised sum of ``components``
    sinusoids with frequencies in [max_hz/10, max_hz], random phases and amplitudes.

    The derivative is at most ``2π · max_hz`` per second, so a signal moves by at most
    ``2π · max_hz / fps`` per frame.
    """
    t = np.arange(frames, dtype=np.float64) / fps
    freq = rng.uniform(max_hz / 10.0, max_hz, (components, count))
    phase = rng.uniform(0.0, 2.0 * math.pi, (components, count))
    amp = rng.uniform(0.5, 1.0, (components, count))
    waves = amp[None] * np.sin(2.0 * math.pi * freq[None] * t[:, None, None] + phase[None])  # [T,C,N]
    return waves.sum(1) / amp.sum(0)[None]


def _offset_signals(rng: np.random.Generator, frames: int, fps: float, count: int, max_hz: float,
                    offset: float = 0.4) -> np.ndarray:
    """Smooth signals in [-1, 1] around a random per-signal offset in ±offset."""
    centre = rng.uniform(-offset, offset, count)
    return centre[None] + (1.0 - np.abs(centre))[None] * smooth_signals(rng, frames, fps, count, max_hz)


def camera_facing_normals(count: int = 256) -> np.ndarray:
    """[count, 3] unit normals spread over the hemisphere facing the camera (z >= 0 in the
    y-up, z-to-viewer lighting frame): a Fibonacci spiral."""
    i = np.arange(count) + 0.5
    z = 1.0 - i / count
    r = np.sqrt(1.0 - z * z)
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)


def fit_light_range(lighting: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scale SH bands 1-2 of ``lighting`` [T,9,3] (renderer coefficients, AMBIENT added inside)
    down until the irradiance on every camera-facing normal is within [low, high] (as far as the
    ambient part allows). Returns a new array."""
    import torch

    from avatarcli.render.mesh import AMBIENT
    from avatarcli.render.shading import sh_basis

    basis = sh_basis(torch.from_numpy(camera_facing_normals())).numpy()  # [N,9] float64
    ambient = basis[None, :, 0, None] * (lighting[:, None, 0, :] + AMBIENT)  # [T,N,3] coefficient 0 alone
    directional = np.einsum("nk,tkc->tnc", basis[:, 1:], lighting[:, 1:, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        below = np.where(directional < 0, (ambient - low) / -directional, np.inf)
        above = np.where(directional > 0, (high - ambient) / directional, np.inf)
    scale = float(np.clip(min(below.min(), above.min(), 1.0), 0.0, 1.0))
    out = lighting.copy()
    out[:, 1:, :] *= scale
    return out


def sample_clip(config, arrays: ModelArrays, index: int) -> ClipTruth:
    """Draw clip ``index``: identity, trajectories, light, albedo, intrinsics and background.

    Deterministic from ``(config.seed, index)`` and the (result) settings; on the host (float64
    until the float32 result).
    """
    import torch

    from avatarcli.camera import euler_to_matrix
    from avatarcli.render.mesh import AMBIENT

    rng = np.random.default_rng([config.seed, index])
    T, S = config.frames, config.size
    f = config.focal_px()
    K = np.array([[f, 0.0, S / 2.0], [0.0, f, S / 2.0], [0.0, 0.0, 1.0]])

    # identity
    identity = rng.standard_normal(arrays.num_id) * config.id_scale * arrays.id_std

    # expression: a few active channels, each peak * smooth signal
    expression = np.zeros((T, arrays.num_exp))
    count = min(config.exp_channels, arrays.num_exp)
    active = sorted(int(i) for i in rng.choice(arrays.num_exp, size=count, replace=False)) if count else []
    signals = smooth_signals(rng, T, config.fps, max(count, 1), config.exp_max_hz)[:, :count]
    if arrays.exp_std is None:  # blendshape weights in [0, peak], peak <= exp_max <= 1
        peaks = rng.uniform(0.3, 1.0, count) * config.exp_max
        expression[:, active] = peaks[None] * (0.5 + 0.5 * signals)
        names = arrays.exp_names or []
        if "mouthClose" in names and "jawOpen" in names:
            # ARKit's mouthClose only makes sense on an open jaw: keep it at most jawOpen.
            close, jaw = names.index("mouthClose"), names.index("jawOpen")
            expression[:, close] = np.minimum(expression[:, close], expression[:, jaw])
        expression = np.clip(expression, 0.0, 1.0)
    else:  # PCA coefficients
        scale = 3.0 * config.exp_max * arrays.exp_std[active]
        expression[:, active] = scale[None] * signals

    # head pose: smooth angles around a per-clip offset; nose tip of the identity at the centre
    limits = np.radians([config.pitch, config.yaw, config.roll])
    angles = limits[None] * _offset_signals(rng, T, config.fps, 3, config.pose_max_hz)
    jitter = config.translation_jitter * smooth_signals(rng, T, config.fps, 3, config.pose_max_hz)
    distance = config.distance * (1.0 + rng.uniform(-config.distance_jitter, config.distance_jitter))
    nose = arrays.nose_mean + identity @ arrays.nose_id_basis  # [3] model space, mm
    cv_from_gl = np.diag([1.0, -1.0, -1.0])
    rotation = euler_to_matrix(torch.from_numpy(angles)).numpy()  # [T,3,3] float64
    rotated = (cv_from_gl @ rotation @ nose[:, None])[..., 0]  # [T,3] nose in camera axes
    trans = np.stack([-rotated[:, 0], -rotated[:, 1], np.full(T, distance)], -1) + jitter
    pose6 = np.concatenate([angles, trans], -1)

    # lighting: grey SH per clip, tinted per channel, drifting slowly; AMBIENT is added by the renderer
    grey = np.concatenate([rng.uniform(-config.light_ambient, config.light_ambient, 1),
                           rng.uniform(-config.light_directional, config.light_directional, 8)])
    tint = 1.0 + rng.uniform(-config.light_colour, config.light_colour, 3)
    drift = config.light_drift * smooth_signals(rng, T, config.fps, 9, config.pose_max_hz)  # [T,9], grey
    total = (grey[None, :] + drift)[:, :, None] * tint[None, None, :]
    total[:, 0, :] += AMBIENT * (tint[None, :] - 1.0)  # tint the ambient part too
    lighting = fit_light_range(total, *config.light_range)

    # albedo: a skin tone between SKIN_LIGHT and SKIN_DARK, smooth per-vertex variation
    u = rng.uniform(0.0, 1.0)
    tone = (1.0 - u) * np.array(SKIN_LIGHT) + u * np.array(SKIN_DARK)
    tone = tone * (1.0 + rng.uniform(-0.04, 0.04, 3))
    verts = arrays.mean_verts
    n_waves = 4
    directions = rng.standard_normal((2, n_waves, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    wavelength = rng.uniform(40.0, 150.0, (2, n_waves))
    phase = rng.uniform(0.0, 2.0 * math.pi, (2, n_waves))
    waves = np.sin(2.0 * math.pi * np.einsum("vd,knd->kvn", verts, directions / wavelength[..., None]) + phase[:, None])
    brightness = waves[0].mean(-1)  # [V] in [-1, 1]
    redness = waves[1].mean(-1)
    albedo = tone[None] * (1.0 + config.skin_variation * brightness[:, None])
    albedo[:, 0] *= 1.0 + 0.5 * config.skin_variation * redness
    albedo[:, 1] *= 1.0 - config.lip_tint * arrays.lip_weight
    albedo[:, 2] *= 1.0 - 0.8 * config.lip_tint * arrays.lip_weight
    albedo = np.clip(albedo, 0.0, 1.0)

    # background: a linear gradient between two colours plus static noise
    colours = rng.uniform(0.05, 0.95, (2, 3))
    theta = rng.uniform(0.0, 2.0 * math.pi)
    grid = (np.arange(S) + 0.5) / S - 0.5
    ramp = np.cos(theta) * grid[None, :] + np.sin(theta) * grid[:, None]  # [S,S] x: columns, y: rows
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-9)
    background = colours[0] * (1.0 - ramp[..., None]) + colours[1] * ramp[..., None]
    background = background + config.background_noise * rng.standard_normal((S, S, 3))
    background = np.clip(background, 0.0, 1.0)

    # caps (rendering only): sclera, a per-clip iris colour, mouth interior
    cap_albedo = np.zeros((0, 3))
    if config.fill_holes and arrays.caps is not None:
        colours = dict(CAP_COLOURS)
        colours[CAP_IRIS] = IRIS_COLOURS[int(rng.integers(len(IRIS_COLOURS)))]
        cap_albedo = np.array([colours[int(k)] for k in arrays.caps.kind])

    f32 = np.float32
    return ClipTruth(index, identity.astype(f32), expression.astype(f32), pose6.astype(f32), lighting.astype(f32),
                     albedo.astype(f32), K.astype(f32), background.astype(f32), active, cap_albedo.astype(f32))
