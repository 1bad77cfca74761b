"""Stage ``synth``: face model -> synthetic clips artifact with ground truth (no inputs).

Renders a linear face model (ICT-FaceKit by default) with a random identity per clip, smooth
expression and head-pose trajectories, camera-attached SH lighting, a plausible skin albedo and a
smooth background into a ``clips`` artifact that looks like ``avatar preprocess`` output (square,
nose-centred crops at a fixed fps, 5- and 68-point landmarks), plus the optional ``truth/*``
datasets of :data:`avatarcli.schemas.CLIPS` that hold what was rendered. Used to measure fitting
error and to make training data.

sample (per clip, numpy, from ``(seed, clip)`` only) -> geometry (model vertices, pose, landmark
projection) -> render (rasterize + SH shading) -> composite (over the background, uint8) -> write.

Conventions are those of :mod:`avatarcli.camera` (mm, model +y up / +z out of the face, OpenCV
camera, ``pose6 = (pitch, yaw, roll, tx, ty, tz)`` head pose relative to the camera) and
:mod:`avatarcli.render.mesh` (SH lighting attached to the camera, ``AMBIENT`` added to coefficient 0
inside the renderer: ``truth/lighting`` is the coefficient array *before* that offset, i.e. exactly
what :func:`avatarcli.render.mesh.render_mesh` takes).

Ground truth of a frame, given the unit's ``truth/*`` datasets::

    verts = model.vertices(identity[None], expression[t][None])        # mm, model space
    R, t  = pose6_to_rt(pose6[t])                                       # world -> OpenCV camera
    lmk68 = project(world_to_camera(model.landmarks(verts), R, t), intrinsics)   # crop pixels

Landmark visibility: ``lmk68`` (and ``kps5``, made from it) are the projected model landmark
*vertices*, whether or not they are visible. At large yaw the far-side jaw line, eye corners and
mouth corner are self-occluded by the nose or cheek but keep their projected position; that is the
definition of the ground truth here (it is also what a 3DMM fit that projects the same vertices
should reproduce). 2D landmark detectors instead put occluded contour points on the visible
silhouette, so compare against them with care at large yaw.

Rendering-only extras, not in the truth: the eye and mouth openings of the mesh are closed by caps
(:class:`Caps`: sclera with a dark iris, a dark mouth interior) so the background does not show
through them, and ``supersample`` > 1 anti-aliases edges. Re-rendering the truth with
:func:`avatarcli.render.mesh.render_mesh` (no caps, no supersampling) reproduces the frames inside
the model's mask up to rounding (the caps can shift the shading normals of the openings' rims a little).

``kps5`` follows SCRFD's order (left eye, right eye, nose, left mouth corner, right mouth corner,
left/right as seen in the image): the means of iBUG points 36-41 and 42-47, point 30, points 48
and 54. With the iBUG layout (point 0 is the subject's right jaw end, the image's left) that order
holds for every pose the sampler makes (|yaw| < 90 degrees, small roll).

Determinism: clip ``k`` is drawn from ``numpy.random.default_rng([seed, k])`` only, so the same seed
gives the same truth everywhere and byte-identical frames on the same device (CPU rendering is
deterministic; the rasterizer resolves depth ties by face index), and the first clips do not
depend on ``clips``. Truth and frames do depend on ``frames``, ``size``, ``fps`` and every
(result) setting.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from avatarcli.artifact import ArtifactWriter, FrameWriter, read_config
from avatarcli.clips import write_clip_tables
from avatarcli.devices import resolve_device
from avatarcli.errors import AvatarError
from avatarcli.schemas import CLIPS
from avatarcli.timing import StepTimer

READS: tuple[str, ...] = ()
WRITES = CLIPS.kind

STEPS = ("load_model", "sample", "geometry", "render", "composite", "write")

SKIN_LIGHT = (0.87, 0.70, 0.60)
"""Lightest skin tone of the sampler (sRGB-encoded albedo, 0..1)."""
SKIN_DARK = (0.36, 0.24, 0.18)
"""Darkest skin tone of the sampler."""
NOSE_TIP = 30
"""iBUG index of the nose tip (the crop centre of ``avatar preprocess``)."""


@dataclass
class SynthConfig:
    """Settings of ``avatar synth``. Fields marked (result) change the output; the others only
    change speed or reporting. Angles are in degrees, lengths in mm, sizes in pixels."""

    clips: int = 4
    """(result) Number of clips; each has its own identity, trajectories, light, skin and background."""
    frames: int = 50
    """(result) Frames per clip."""
    size: int = 256
    """(result) Side of the square frames, pixels (the ``crop_size`` of the artifact)."""
    fps: float = 25.0
    """(result) Frame rate of the trajectories and of the artifact."""
    seed: int = 0
    """(result) Random seed; clip k is drawn from ``numpy.random.default_rng([seed, k])``."""
    face_model: str = "ict"
    """(result) Face model name (``ict``, ``bfm``) or path (see ``avatarcli.facemodel``)."""
    models_dir: str | None = None
    """Folder searched first for the face model file."""
    focal: float = 1160.0
    """(result) Focal length in pixels at size 256 (scaled by size / 256); the principal point is
    the image centre."""
    distance: float = 1160.0
    """(result) Mean camera distance (z of the model origin in the camera), mm. With ``focal``
    1160 px at 256² the face spans about as much of the frame as an ``avatar preprocess`` crop."""
    distance_jitter: float = 0.08
    """(result) Per-clip relative distance jitter: distance * (1 ± U(0, jitter))."""
    id_scale: float = 1.0
    """(result) Std of the identity coefficients, N(0, id_scale²) (ICT's modes are unit-variance;
    for a model with ``id_std`` the coefficients are scaled by it too)."""
    exp_channels: int = 6
    """(result) Active expression channels per clip (chosen at random; the others stay 0)."""
    exp_max: float = 0.7
    """(result) Largest expression weight. ICT blendshape weights are in [0, exp_max] (exp_max ≤ 1);
    for PCA expression models (BFM) coefficients are in ±exp_max · 3 · exp_std."""
    exp_max_hz: float = 1.0
    """(result) Highest frequency of the expression trajectories, Hz (lowest: a tenth of it)."""
    yaw: float = 25.0
    """(result) Largest |yaw|, degrees (positive turns the nose to the image's right)."""
    pitch: float = 15.0
    """(result) Largest |pitch|, degrees (positive turns the nose down)."""
    roll: float = 8.0
    """(result) Largest |roll|, degrees."""
    pose_max_hz: float = 0.4
    """(result) Highest frequency of the pose trajectories, Hz (lowest: a tenth of it). With 25° yaw
    the yaw then changes by at most 25·2π·0.4/fps ≈ 2.5° per frame at 25 fps."""
    translation_jitter: float = 4.0
    """(result) Largest smooth offset of the head in x, y and z, mm. The head is otherwise placed so
    the identity's nose tip projects to the image centre (as ``avatar preprocess`` crops)."""
    light_ambient: float = 0.2
    """(result) Per-clip jitter of SH coefficient 0 around 0 (the renderer adds 0.8), ±."""
    light_directional: float = 0.3
    """(result) Per-clip range of SH coefficients 1-8 (bands 1 and 2), ±."""
    light_colour: float = 0.06
    """(result) Per-clip relative colour tint of the light, per channel ±."""
    light_drift: float = 0.05
    """(result) Smooth change of every SH coefficient over a clip, ± (0 = constant light)."""
    light_range: tuple[float, float] = (0.25, 1.4)
    """(result) Irradiance bounds on camera-facing normals: where a sampled light falls outside,
    bands 1-2 are scaled down (towards ambient light) until it fits (keeps the light plausible:
    no negative light, little clipping)."""
    skin_variation: float = 0.05
    """(result) Relative amplitude of the smooth per-vertex albedo variation (a few sinusoids of
    the vertex position, wavelengths 40-150 mm)."""
    lip_tint: float = 0.25
    """(result) Strength of the redder albedo around the mouth opening (0 = none)."""
    fill_holes: bool = True
    """(result) Close the eye and mouth openings of the mesh with rendering-only caps (sclera and a
    dark iris; a dark mouth interior) instead of showing the background through them. The caps
    are not part of the truth (they add vertices that ``truth/albedo`` does not list)."""
    background_noise: float = 0.02
    """(result) Std of the static per-pixel noise added to the background gradient (0..1 units)."""
    supersample: int = 1
    """(result) Render at N× the size and average N×N blocks (anti-aliased edges); 1 = off."""
    compression_level: int = 1
    """(result) Deflate level of the frames (0 = none)."""
    batch: int = 16
    """Frames rendered at once."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    overwrite: bool = False
    """Replace an existing output made with other settings instead of failing."""

    def result_fields(self) -> dict:
        skip = {"models_dir", "batch", "device", "overwrite"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def result_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.result_fields(), sort_keys=True).encode()).hexdigest()[:16]

    def focal_px(self) -> float:
        """Focal length in pixels at ``size``."""
        return self.focal * self.size / 256.0

    def check(self) -> None:
        if self.clips < 1 or self.frames < 1:
            raise AvatarError("--clips and --frames must be at least 1")
        if self.size < 16 or self.fps <= 0:
            raise AvatarError("--size must be at least 16 and --fps > 0")
        if self.focal <= 0 or self.distance <= 0 or not 0 <= self.distance_jitter < 0.5:
            raise AvatarError("focal and distance must be > 0 and distance_jitter in [0, 0.5)")
        if self.exp_channels < 0 or not 0 <= self.exp_max <= 1:
            raise AvatarError("--exp-channels must be >= 0 and --exp-max in [0, 1]")
        if self.id_scale < 0 or self.supersample < 1 or self.batch < 1:
            raise AvatarError("--id-scale must be >= 0, supersample and --batch >= 1")
        if max(abs(self.yaw), abs(self.pitch), abs(self.roll)) >= 80:
            raise AvatarError("--yaw, --pitch and --roll must be below 80 degrees")


# ------------------------------------------------------------------------------------------------
# sampling (numpy only: the truth of a clip does not depend on the device)


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


def _euler_np(angles: np.ndarray) -> np.ndarray:
    """Float64 numpy twin of :func:`avatarcli.camera.euler_to_matrix` (R = Rz Ry Rx)."""
    pitch, yaw, roll = angles[..., 0], angles[..., 1], angles[..., 2]
    cx, sx, cy, sy, cz, sz = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw), np.cos(roll), np.sin(roll)
    rows = [cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx,
            sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx,
            -sy, cy * sx, cy * cx]
    return np.stack(rows, -1).reshape(*angles.shape[:-1], 3, 3)


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops of a triangle mesh, each in the direction of its triangles' edges
    (an edge a->b of a triangle gives loop order a, b). Empty when the boundary is not a set of
    simple loops (a vertex with two outgoing boundary edges)."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).astype(np.int64)
    key = np.sort(directed, 1)
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    boundary = directed[counts[inverse.reshape(-1)] == 1]
    following: dict[int, int] = {}
    for a, b in boundary.tolist():
        if a in following:
            return []
        following[a] = b
    loops, seen = [], set()
    for start in following:
        if start in seen:
            continue
        loop, vertex = [], start
        while vertex not in seen:
            seen.add(vertex)
            loop.append(vertex)
            vertex = following.get(vertex, start)
        loops.append(np.asarray(loop, np.int64))
    return loops


CAP_SCLERA, CAP_IRIS, CAP_MOUTH, CAP_MOUTH_DEEP = range(4)
IRIS_COLOURS = ((0.20, 0.12, 0.07), (0.11, 0.07, 0.05), (0.33, 0.25, 0.12), (0.24, 0.33, 0.42), (0.24, 0.31, 0.19))
"""Iris albedos the sampler picks from (brown, dark brown, hazel, blue, green)."""
CAP_COLOURS = {CAP_SCLERA: (0.74, 0.70, 0.66), CAP_MOUTH: (0.36, 0.13, 0.12), CAP_MOUTH_DEEP: (0.07, 0.03, 0.03)}


@dataclass
class Caps:
    """Rendering-only geometry that closes the eye and mouth openings of a mesh.

    ``E`` extra vertices, each a fixed linear combination of boundary-loop vertices (so they follow
    identity and expression): ``extra = weights @ verts[gather]``. Eyes get an inner ring (sclera)
    and a centre vertex (iris), the mouth an inner ring and a centre (dark interior); the cap
    triangles run against the loop direction, so they face outwards like the mesh.
    """

    gather: np.ndarray
    """[L] mesh vertex ids the extra vertices are made from."""
    weights: np.ndarray
    """[E, L] float32."""
    faces: np.ndarray
    """[Fc, 3] int64 triangles over the extended vertex array (mesh vertices, then extras)."""
    kind: np.ndarray
    """[E] CAP_* colour class of each extra vertex."""
    mouth_loop: np.ndarray
    """Mesh vertex ids of the mouth opening (empty when none was found)."""


def find_caps(mean: np.ndarray, faces: np.ndarray, lmk68: np.ndarray) -> Caps | None:
    """Caps for the boundary loops around the eyes and the mouth (found from the landmarks of the
    mean shape: a loop whose centroid lies within 15 mm of an eye's or the inner mouth's landmark
    centre). None when the mesh has no such openings."""
    pts = mean[lmk68]
    centres = {"eye": [pts[36:42].mean(0), pts[42:48].mean(0)], "mouth": [pts[60:68].mean(0)]}
    gather: list[int] = []
    rows: list[tuple[list[int], list[float]]] = []  # per extra vertex: positions in gather, weights
    kinds: list[int] = []
    cap_faces: list[tuple[int, int, int]] = []
    mouth_loop = np.zeros(0, np.int64)
    n_verts = mean.shape[0]
    for loop in boundary_loops(faces):
        centroid = mean[loop].mean(0)
        label = next((k for k, cs in centres.items() if any(np.linalg.norm(centroid - c) < 15.0 for c in cs)), None)
        if label is None:
            continue
        n, base = len(loop), len(gather)
        gather.extend(loop.tolist())
        if label == "mouth":
            mouth_loop = loop
        rings = ((0.4, CAP_SCLERA),) if label == "eye" else ((0.35, CAP_MOUTH),)
        centre_kind = CAP_IRIS if label == "eye" else CAP_MOUTH_DEEP
        ring_ids = [loop.tolist()]  # the outer ring is the mesh's own boundary
        for frac, kind in rings:
            ids = []
            for i in range(n):
                cols = [base + i] + [base + j for j in range(n)]
                rows.append((cols, [1.0 - frac] + [frac / n] * n))
                kinds.append(kind)
                ids.append(n_verts + len(rows) - 1)
            ring_ids.append(ids)
        rows.append(([base + j for j in range(n)], [1.0 / n] * n))
        kinds.append(centre_kind)
        centre = n_verts + len(rows) - 1
        for outer, inner in zip(ring_ids[:-1], ring_ids[1:]):
            for i in range(n):
                j = (i + 1) % n
                cap_faces.append((outer[j], outer[i], inner[i]))
                cap_faces.append((outer[j], inner[i], inner[j]))
        last = ring_ids[-1]
        for i in range(n):
            cap_faces.append((last[(i + 1) % n], last[i], centre))
    if not rows:
        return None
    weights = np.zeros((len(rows), len(gather)), np.float32)
    for e, (cols, values) in enumerate(rows):
        np.add.at(weights[e], cols, values)
    return Caps(np.asarray(gather, np.int64), weights, np.asarray(cap_faces, np.int64), np.asarray(kinds), mouth_loop)


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


def _sh_basis_np(normals: np.ndarray) -> np.ndarray:
    """Numpy twin of :func:`avatarcli.render.shading.sh_basis`: [N,3] -> [N,9]."""
    from avatarcli.render.shading import SH_A, SH_C

    x, y, z = normals[:, 0], normals[:, 1], normals[:, 2]
    k0, k1, k2 = SH_A[0] * SH_C[0], SH_A[1] * SH_C[1], SH_A[2] * SH_C[2]
    return np.stack([np.full_like(x, k0), -k1 * y, k1 * z, -k1 * x, k2 * x * y, -k2 * y * z,
                     (k2 / (2 * math.sqrt(3.0))) * (3 * z * z - 1), -k2 * x * z, (k2 / 2) * (x * x - y * y)], -1)


def _camera_facing_normals(count: int = 256) -> np.ndarray:
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
    from avatarcli.render.mesh import AMBIENT

    basis = _sh_basis_np(_camera_facing_normals())  # [N,9]
    ambient = basis[None, :, 0, None] * (lighting[:, None, 0, :] + AMBIENT)  # [T,N,3] coefficient 0 alone
    directional = np.einsum("nk,tkc->tnc", basis[:, 1:], lighting[:, 1:, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        below = np.where(directional < 0, (ambient - low) / -directional, np.inf)
        above = np.where(directional > 0, (high - ambient) / directional, np.inf)
    scale = float(np.clip(min(below.min(), above.min(), 1.0), 0.0, 1.0))
    out = lighting.copy()
    out[:, 1:, :] *= scale
    return out


def sample_clip(config: SynthConfig, arrays: ModelArrays, index: int) -> ClipTruth:
    """Draw clip ``index``: identity, trajectories, light, albedo, intrinsics and background.

    Deterministic from ``(config.seed, index)`` and the (result) settings; numpy only.
    """
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
    rotated = (cv_from_gl @ _euler_np(angles) @ nose[:, None])[..., 0]  # [T,3] nose in camera axes
    trans = np.stack([-rotated[:, 0], -rotated[:, 1], np.full(T, distance)], -1) + jitter
    pose6 = np.concatenate([angles, trans], -1)

    # lighting: grey SH per clip, tinted per channel, drifting slowly; AMBIENT is added by the renderer
    from avatarcli.render.mesh import AMBIENT

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


# ------------------------------------------------------------------------------------------------
# geometry, render, composite (torch)


@dataclass
class SynthClip:
    """One rendered clip: truth, frames and landmarks (numpy)."""

    name: str
    identity: str
    truth: ClipTruth
    frames: np.ndarray
    """[T, S, S, 3] uint8."""
    lmk68: np.ndarray
    """[T, 68, 2] float32, crop pixels."""
    kps5: np.ndarray
    """[T, 5, 2] float32, crop pixels (SCRFD order)."""
    mask_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """[T] fraction of pixels covered by the face model."""


def kps5_from_lmk68(lmk68: np.ndarray) -> np.ndarray:
    """``[..., 68, 2]`` -> ``[..., 5, 2]`` in SCRFD order: image-left eye (mean of 36-41), image-right
    eye (42-47), nose tip (30), image-left mouth corner (48), image-right mouth corner (54)."""
    return np.stack([lmk68[..., 36:42, :].mean(-2), lmk68[..., 42:48, :].mean(-2), lmk68[..., 30, :],
                     lmk68[..., 48, :], lmk68[..., 54, :]], -2).astype(np.float32)


def clip_names(config: SynthConfig, index: int) -> tuple[str, str]:
    """``(clip_id, identity)`` of clip ``index``: both ``synth_s<seed>_<index:04d>`` (one identity per
    clip; the seed keeps clips of differently seeded artifacts apart when they are merged)."""
    name = f"synth_s{config.seed}_{index:04d}"
    return name, name


class Synthesizer:
    """Renders clips of one face model on one device (the library entry point).

    ``Synthesizer(config).clip(k)`` returns clip ``k`` as a :class:`SynthClip`, without writing
    anything; :func:`run` writes a whole artifact.
    """

    def __init__(self, config: SynthConfig, model=None, device: str | None = None, timer: StepTimer | None = None):
        import torch

        from avatarcli.facemodel import load_face_model

        config.check()
        self.config = config
        self.device = resolve_device(device or config.device)
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.startswith("cuda") else None
        self.timer = timer or StepTimer(sync)
        with self.timer.step("load_model", sync=False):
            if model is None:
                model = load_face_model(config.face_model, config.models_dir)
            self.arrays = ModelArrays.from_model(model)
            self.model = model.to(device=self.device, dtype=torch.float32)
            self.faces = self.model.faces
            caps = self.arrays.caps if config.fill_holes else None
            self.cap_gather = self.cap_weights = None
            if caps is not None:
                self.cap_gather = torch.from_numpy(caps.gather).to(self.device)
                self.cap_weights = torch.from_numpy(caps.weights).to(self.device)
                self.faces = torch.cat([self.faces, torch.from_numpy(caps.faces).to(self.device)])

    def sample(self, index: int) -> ClipTruth:
        with self.timer.step("sample", items=self.config.frames, sync=False):
            return sample_clip(self.config, self.arrays, index)

    def geometry(self, truth: ClipTruth, start: int, stop: int):
        """Vertices [B,V,3], R [B,3,3], t [B,3], K [3,3] and lmk68 [B,68,2] of frames start:stop."""
        import torch

        from avatarcli.camera import pose6_to_rt, project, world_to_camera

        dev = self.device
        count = stop - start
        identity = torch.from_numpy(truth.identity).to(dev)[None].expand(count, -1)
        expression = torch.from_numpy(truth.expression[start:stop]).to(dev)
        verts = self.model.vertices(identity, expression)
        R, t = pose6_to_rt(torch.from_numpy(truth.pose6[start:stop]).to(dev))
        K = torch.from_numpy(truth.intrinsics).to(dev)
        lmk = project(world_to_camera(self.model.landmarks(verts), R, t), K)
        return verts, R, t, K, lmk

    def render(self, truth: ClipTruth, progress_frames=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames [T,S,S,3] uint8, lmk68 [T,68,2] float32 and mask fractions [T] of a sampled clip."""
        import torch
        import torch.nn.functional as F

        from avatarcli.render.mesh import render_mesh

        config, dev = self.config, self.device
        S, ss, T = config.size, config.supersample, config.frames
        frames = np.empty((T, S, S, 3), np.uint8)
        lmk68 = np.empty((T, 68, 2), np.float32)
        coverage = np.empty(T, np.float32)
        albedo = torch.from_numpy(np.concatenate([truth.albedo, truth.cap_albedo])).to(dev)
        background = torch.from_numpy(truth.background).to(dev)
        scale = torch.tensor([[ss, 0.0, 0.0], [0.0, ss, 0.0], [0.0, 0.0, 1.0]], device=dev)
        with torch.no_grad():
            for start in range(0, T, config.batch):
                stop = min(T, start + config.batch)
                count = stop - start
                with self.timer.step("geometry", items=count):
                    verts, R, t, K, lmk = self.geometry(truth, start, stop)
                    sh = torch.from_numpy(truth.lighting[start:stop]).to(dev)
                    if self.cap_weights is not None:
                        extra = torch.einsum("el,blc->bec", self.cap_weights, verts.index_select(1, self.cap_gather))
                        verts = torch.cat([verts, extra], 1)
                with self.timer.step("render", items=count):
                    out = render_mesh(verts, self.faces, R, t, scale @ K, S * ss, albedo, sh)
                with self.timer.step("composite", items=count):
                    rgb = out.rgb.clamp(0.0, 1.0)
                    mask = out.mask[..., None].to(rgb.dtype)
                    if ss > 1:  # average ss x ss blocks: pixel (i, j) covers sub-pixels ss*i.., as K is scaled
                        rgb = F.avg_pool2d((rgb * mask).permute(0, 3, 1, 2), ss).permute(0, 2, 3, 1)
                        mask = F.avg_pool2d(mask.permute(0, 3, 1, 2), ss).permute(0, 2, 3, 1)
                        image = rgb + background * (1.0 - mask)
                    else:
                        image = rgb * mask + background * (1.0 - mask)
                    image = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
                    frames[start:stop] = image.cpu().numpy()
                    lmk68[start:stop] = lmk.float().cpu().numpy()
                    coverage[start:stop] = mask.mean(dim=(1, 2, 3)).float().cpu().numpy()
                if progress_frames is not None:
                    progress_frames(count)
        return frames, lmk68, coverage

    def clip(self, index: int, progress_frames=None) -> SynthClip:
        """Sample and render clip ``index``."""
        truth = self.sample(index)
        frames, lmk68, coverage = self.render(truth, progress_frames)
        name, identity = clip_names(self.config, index)
        return SynthClip(name, identity, truth, frames, lmk68, kps5_from_lmk68(lmk68), coverage)


# ------------------------------------------------------------------------------------------------
# write


def write_clip_group(group: h5py.Group, clip: SynthClip, config: SynthConfig, identity_id: int,
                     frame_writer: FrameWriter) -> None:
    """One ``/clips/<name>`` group with every CLIPS unit dataset and the ``truth/*`` datasets."""
    T, S = clip.frames.shape[0], config.size
    frame_writer.write(group, "frames", clip.frames)
    group.create_dataset("boxes", data=np.tile(np.array([0, 0, S, S], np.float32), (T, 1)))
    group.create_dataset("kps5", data=clip.kps5.astype(np.float32))
    group.create_dataset("lmk68", data=clip.lmk68.astype(np.float32))
    group.create_dataset("det_score", data=np.ones(T, np.float32))
    group.create_dataset("detected", data=np.ones(T, bool))
    group.create_dataset("landmarked", data=np.ones(T, bool))
    group.create_dataset("timestamps", data=np.arange(T, dtype=np.float64) / config.fps)
    group.create_dataset("source_frame", data=np.arange(T, dtype=np.int64))
    truth = group.create_group("truth")
    for name in ("identity", "expression", "pose6", "lighting", "albedo", "intrinsics"):
        truth.create_dataset(name, data=getattr(clip.truth, name).astype(np.float32))
    group.attrs.update({
        "source_path": source_path(config, clip.truth.index), "source_fps": float(config.fps),
        "fps": float(config.fps), "identity": clip.identity, "identity_id": identity_id, "segment": 0,
        "source_width": S, "source_height": S,
    })


def source_path(config: SynthConfig, index: int) -> str:
    """The pseudo source path of clip ``index``: ``synth:seed=S/clip=k``."""
    return f"synth:seed={config.seed}/clip={index}"


@dataclass
class SynthSummary:
    output: Path
    clips: int
    frames: int
    seconds: float
    frames_now: int
    reused: bool = False
    """True when an existing output made with the same settings was kept as it is."""
    timings: dict = field(default_factory=dict)
    device: str = "cpu"
    mask_fraction: float = 0.0
    """Mean fraction of the frame covered by the face model."""


def _same_existing(output: Path, config: SynthConfig) -> bool:
    """Whether ``output`` is a valid clips artifact made with the same (result) settings."""
    from avatarcli.artifact import open_artifact

    try:
        with open_artifact(output, CLIPS.kind) as handle:
            return read_config(handle).get("result_hash") == config.result_hash()
    except (AvatarError, OSError, ValueError, KeyError):
        return False


def run(config: SynthConfig, inputs: Sequence[str], output: str | Path, progress=None, *,
        timer: StepTimer | None = None, model=None) -> SynthSummary:
    """Run the stage: render ``config.clips`` clips into the clips artifact ``output``.

    ``inputs`` must be empty (the stage reads nothing; the argument keeps the stage signature).
    ``progress`` is an optional ``avatarcli.cli.common.StageProgress``; ``timer`` an optional
    :class:`StepTimer` that receives the per-step times; ``model`` an already loaded face model
    (else ``config.face_model`` is loaded). An existing output made with the same (result) settings
    is kept; one made otherwise is refused unless ``config.overwrite``.
    """
    started = time.perf_counter()
    if inputs:
        raise AvatarError("avatar synth takes no inputs")
    config.check()
    output = Path(output)
    if output.exists():
        if _same_existing(output, config) and not config.overwrite:
            with h5py.File(output, "r") as handle:
                frames = int(np.sum(handle["index/num_frames"][()]))
                clips = len(handle["clips"])
            if progress is not None:
                progress.start(total_units=clips, done_units=clips)
            return SynthSummary(output, clips, frames, time.perf_counter() - started, 0, reused=True)
        if not config.overwrite:
            raise AvatarError(f"{output} exists and was not made by avatar synth with these settings; "
                              "use --overwrite or another -o")

    synth = Synthesizer(config, model=model, timer=timer)
    timer = synth.timer
    model = synth.model
    config_json = {**asdict(config), "result_hash": config.result_hash(), "kind": CLIPS.kind,
                   "stage": "synth", "face_model_name": model.name, "face_model_sha256": model.sha256,
                   "focal_px": config.focal_px()}
    if progress is not None:
        progress.start(total_units=config.clips)
    advance = progress.advance_frames if progress is not None else None

    names, identities, num_frames, coverage = [], [], [], []
    frame_writer = FrameWriter(config.compression_level)
    try:
        with ArtifactWriter(output, CLIPS, config_json, [],
                            extra_attrs={"crop_size": config.size, "fps": float(config.fps)}) as writer:
            clips = writer.handle.create_group("clips", track_order=True)
            for index in range(config.clips):
                clip = synth.clip(index, advance)
                with timer.step("write", items=config.frames, sync=False):
                    write_clip_group(clips.create_group(clip.name), clip, config, index, frame_writer)
                names.append(clip.name)
                identities.append(clip.identity)
                num_frames.append(config.frames)
                coverage.append(float(clip.mask_fraction.mean()))
                if progress is not None:
                    progress.unit_done(clip.name, "ok", "")
            with timer.step("write", sync=False):
                write_clip_tables(
                    writer.handle, names, list(range(len(names))), num_frames, list(range(len(names))), identities,
                    [source_path(config, i) for i in range(config.clips)], [""] * config.clips, ["ok"] * config.clips,
                    [""] * config.clips, [1] * config.clips,
                )
            finalize = time.perf_counter()
        timer.add("write", time.perf_counter() - finalize)  # validation and rename
    finally:
        frame_writer.close()
    total = int(sum(num_frames))
    return SynthSummary(output, len(names), total, time.perf_counter() - started, total, timings=timer.as_dict(),
                        device=synth.device, mask_fraction=float(np.mean(coverage)) if coverage else 0.0)
