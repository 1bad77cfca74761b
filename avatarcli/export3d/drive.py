"""Driving a trained generator (the library part of ``avatar render``).

What an output clip is (:class:`RenderJob`), parsing of the render options (``--frames``,
``--camera``, ``--edit``), the cameras of each output frame in the generator's world, the batched
generator forward (:class:`Driver`) and the side-by-side comparison frames of ``--compare``.

Conventions are those of :mod:`avatarcli.export3d` (images float RGB in [0, 1], ``[B,3,H,W]``;
generator-world 25-d EG3D cameras) and of clips artifacts (frames uint8 ``[T,H,W,3]``).

Caching: G(S, β_D) conditions the encoder's transformer blocks on the driving expression (EAdaLN),
so the tri-plane cannot be reused across driving frames. What does not see β (the conv stem, the
patch merge and the high-resolution source branch) is a small part of the forward and the encoder
does not expose it separately, so :class:`Driver` prepares the source image once per clip and
expands it over each batch (a view, no copy); the whole encoder runs per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from avatarcli.errors import AvatarError

CROSS_SEPARATOR = "__from__"
"""Output clip id of a cross-identity render: ``<driving clip>__from__<source clip>``."""
CAMERA_MODES = ("driving", "source", "orbit", "fixed")


@dataclass(frozen=True)
class CameraChoice:
    """``--camera``: ``driving`` (the driving frame's camera), ``source`` (the source frame's camera
    for every frame), ``orbit`` (yaw swept linearly from -degrees to +degrees over the clip, pitch 0,
    radius 2.7, looking at the origin) or ``fixed`` (one yaw/pitch in degrees, radius 2.7).
    Orbit and fixed cameras keep the driving frame's intrinsics."""

    mode: str = "driving"
    degrees: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0


def parse_camera(text: str) -> CameraChoice:
    """'driving' | 'source' | 'orbit:DEG' | 'yaw=DEG,pitch=DEG' (either may be left out: 0)."""
    text = text.strip()
    if text in ("driving", "source"):
        return CameraChoice(text)
    problem = f"--camera must be driving, source, orbit:DEG or yaw=DEG,pitch=DEG, not {text!r}"
    if text.startswith("orbit:"):
        try:
            degrees = float(text[len("orbit:"):])
        except ValueError:
            raise AvatarError(problem) from None
        if not 0 < degrees < 90:
            raise AvatarError(f"--camera orbit:DEG needs 0 < DEG < 90, not {degrees:g}")
        return CameraChoice("orbit", degrees=degrees)
    angles = {"yaw": 0.0, "pitch": 0.0}
    try:
        for part in text.split(","):
            name, value = part.split("=")
            if name.strip() not in angles:
                raise ValueError(name)
            angles[name.strip()] = float(value)
    except ValueError:
        raise AvatarError(problem) from None
    if max(abs(angles["yaw"]), abs(angles["pitch"])) >= 90:
        raise AvatarError(f"--camera yaw and pitch must be within ±90 degrees, not {text!r}")
    return CameraChoice("fixed", yaw=angles["yaw"], pitch=angles["pitch"])


def parse_edits(text: str) -> tuple[tuple[int, float], ...]:
    """'i=SCALE[,j=SCALE...]' -> ((i, scale), ...): λ_i scaled along CLeBS basis vector i."""
    edits = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            index, scale = part.split("=")
            edits.append((int(index), float(scale)))
        except ValueError:
            raise AvatarError(f"--edit takes i=SCALE (comma-separated for several), not {part!r}") from None
        if edits[-1][0] < 0 or not math.isfinite(edits[-1][1]):
            raise AvatarError(f"--edit {part!r}: the index must be >= 0 and the scale finite")
    return tuple(edits)


def parse_frames(text: str) -> str | tuple[int, int | None]:
    """'all' | 'held-out' | 'A:B' (frames A..B-1 of each driving clip; B may be left out: to the end)."""
    text = text.strip()
    if text in ("all", "held-out"):
        return text
    try:
        start, stop = text.split(":")
        start = int(start) if start.strip() else 0
        stop = int(stop) if stop.strip() else None
    except ValueError:
        raise AvatarError(f"--frames must be all, held-out or A:B, not {text!r}") from None
    if start < 0 or (stop is not None and stop <= start):
        raise AvatarError(f"--frames {text}: need 0 <= A < B")
    return start, stop


def select_frames(spec: str | tuple[int, int | None], clip: str, num_frames: int,
                  held_out: dict[str, tuple[int, int]]) -> np.ndarray:
    """The driving frames [T] int64 of ``clip`` (``num_frames`` long) that ``spec`` selects.
    ``held_out``: the generator's clip -> (train frames, frames); its held-out frames are
    ``train_frames .. frames - 1``."""
    if spec == "all":
        return np.arange(num_frames, dtype=np.int64)
    if spec == "held-out":
        if clip not in held_out:
            raise AvatarError(f"--frames held-out: the generator never saw clip {clip!r}, so it has no held-out "
                              "frames (give --frames all or A:B)")
        train, total = held_out[clip]
        if total != num_frames:
            raise AvatarError(f"--frames held-out: clip {clip!r} has {num_frames} frames here but {total} in the "
                              "generator's training data (another driving artifact?)")
        if train >= total:
            raise AvatarError(f"--frames held-out: the generator held no frames of clip {clip!r} out")
        return np.arange(train, total, dtype=np.int64)
    start, stop = spec
    stop = num_frames if stop is None else stop
    if stop > num_frames:
        raise AvatarError(f"--frames {start}:{stop}: clip {clip!r} has only {num_frames} frames")
    return np.arange(start, stop, dtype=np.int64)


@dataclass
class RenderJob:
    """One output clip: the ``frames`` [T] of ``driving_clip`` rendered from ``source_frame`` of
    ``source_clip``; its identity is the source's."""

    output_clip: str
    driving_clip: str
    source_clip: str
    source_frame: int
    identity: str
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def same_identity(self) -> bool:
        return self.output_clip == self.driving_clip


def output_clip_id(driving_clip: str, source_clip: str | None) -> str:
    """'<driving>' (same clip, or no source) or '<driving>__from__<source>'."""
    if source_clip is None or source_clip == driving_clip:
        return driving_clip
    return f"{driving_clip}{CROSS_SEPARATOR}{source_clip}"


# ------------------------------------------------------------------------------------------------
# cameras


def orbit_cameras(intrinsics9: torch.Tensor, degrees: float) -> torch.Tensor:
    """[T,9] normalised intrinsics -> [T,25] generator-world cameras at radius 2.7 looking at the
    origin, yaw linear from -degrees to +degrees over the T frames, pitch 0."""
    from avatarcli.camera import GENERATOR_CAMERA_RADIUS, orbit_camera

    count = intrinsics9.shape[0]
    yaws = torch.linspace(-degrees, degrees, count) if count > 1 else torch.zeros(1)
    return torch.stack([orbit_camera(math.radians(float(y)), 0.0, GENERATOR_CAMERA_RADIUS, k)
                        for y, k in zip(yaws, intrinsics9)])


def fixed_cameras(intrinsics9: torch.Tensor, yaw: float, pitch: float) -> torch.Tensor:
    """[T,9] -> [T,25]: one orbit camera (degrees) at radius 2.7 with each frame's intrinsics."""
    from avatarcli.camera import GENERATOR_CAMERA_RADIUS, orbit_camera

    return torch.stack([orbit_camera(math.radians(yaw), math.radians(pitch), GENERATOR_CAMERA_RADIUS, k)
                        for k in intrinsics9])


def job_cameras(choice: CameraChoice, driving_mm: np.ndarray, source_mm: np.ndarray | None,
                world_scale: float) -> torch.Tensor:
    """The generator-world cameras [T,25] float32 of a job's frames.

    ``driving_mm``: [T,25] the driving frames' fitted cameras (mm world); ``source_mm``: [25] the
    source frame's (for ``source``); ``world_scale``: the generator's units per mm."""
    from avatarcli.camera import to_generator_camera

    driving = torch.as_tensor(np.asarray(driving_mm, np.float32))
    if choice.mode == "driving":
        return to_generator_camera(driving, world_scale).float()
    if choice.mode == "source":
        source = torch.as_tensor(np.asarray(source_mm, np.float32))
        return to_generator_camera(source, world_scale).float().expand(len(driving), 25).contiguous()
    if choice.mode == "orbit":
        return orbit_cameras(driving[:, 16:], choice.degrees).float()
    return fixed_cameras(driving[:, 16:], choice.yaw, choice.pitch).float()


# ------------------------------------------------------------------------------------------------
# images


def frames_to_images(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,size,size] in [0,1] (antialiased bilinear when resized)."""
    images = frames.permute(0, 3, 1, 2).float().div_(255.0)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True).clamp_(0, 1)
    return images


def images_to_frames(images: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] (about [0,1]; not clamped by the generator) -> uint8 [B,H,W,3]."""
    return images.float().clamp(0, 1).mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [B,H,W,3] -> uint8 [B,size,size,3], unchanged when already that size: eval's resize
    (``to_size``), so the copy-source baseline is resized exactly as eval resizes a reference."""
    from avatarcli.evaluation.frames import to_size

    return to_size(torch.as_tensor(frames), size).numpy()


def compare_frames(source: np.ndarray, driving: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Side by side: source | driving | output. ``source`` [H0,W0,3], ``driving`` [B,H1,W1,3] and
    ``output`` [B,S,S,3] uint8 -> [B,S,3S,3] (source and driving resized to S)."""
    size = output.shape[1]
    left = np.broadcast_to(resize_frames(source[None], size), output.shape)
    return np.concatenate([left, resize_frames(driving, size), output], axis=2)


# ------------------------------------------------------------------------------------------------
# the generator forward


def expected_beta_dim(generator) -> int:
    """The β size a :class:`~avatarcli.export3d.artifact.LoadedGenerator` takes: the CLeBS
    encoder's input size, or the generator's conditioning size in raw mode."""
    if generator.expression == "clebs" and generator.encoder is not None:
        return int(generator.encoder.shape.expr_dim)
    return int(generator.shape.expr_dim)


class Driver:
    """Renders batches of driving frames from one source image with a loaded generator.

    ``precision``: 'fp32', or 'bf16' (autocast on the device; the output is returned as uint8
    either way). ``edits``: CLeBS edits ((basis index, scale), ...) applied to every β."""

    def __init__(self, generator, device: torch.device | str, precision: str = "fp32",
                 edits: tuple[tuple[int, float], ...] = (), graphs: bool | None = None):
        if precision not in ("fp32", "bf16"):
            raise AvatarError(f"precision must be fp32 or bf16, not {precision!r}")
        if edits and generator.expression != "clebs":
            raise AvatarError("--edit scales CLeBS basis coefficients; this generator was trained on raw β "
                              "(--expression raw)")
        self.generator, self.device = generator, torch.device(device)
        self.model = generator.model
        self.precision, self.edits = precision, tuple(edits)
        self.size = int(generator.shape.image_size)
        # CUDA graphs (default on CUDA): one replay per batch instead of ~1000 kernel launches; a
        # 256² frame at batch 1 is launch-bound (15 ms eager on an H100). Smaller batches are padded
        # to the largest batch seen so far, so a run records at most a few graphs.
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        self._captured: dict[int, tuple] = {}

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def source(self, frame: torch.Tensor) -> torch.Tensor:
        """uint8 [H,W,3] (on any device) -> the source image [1,3,S,S] in [0,1] on the device."""
        return frames_to_images(frame[None].to(self.device), self.size)

    @torch.no_grad()
    def condition(self, beta: torch.Tensor) -> torch.Tensor:
        """β [B,K] -> the generator's conditioning [B,expr_dim] (β′ through CLeBS, with the edits)."""
        beta = beta.to(self.device, torch.float32)
        if self.edits:
            return self.generator.condition_edit(beta, list(self.edits))
        return self.generator.condition(beta)

    @torch.no_grad()
    def render(self, source: torch.Tensor, beta: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        """``source`` [1,3,S,S] (from :meth:`source`), β [B,K], generator-world cameras [B,25] ->
        uint8 [B,S,S,3] on the device."""
        expr = self.condition(beta)
        cameras = cameras.to(self.device, torch.float32)
        if self.graphs:
            return self._render_graphed(source, expr, cameras)
        return self._forward(source.expand(expr.shape[0], -1, -1, -1), expr, cameras)

    def _forward(self, source: torch.Tensor, expr: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            planes = self.model.planes(source, expr)
            image = self.model.render(planes, cameras, perturb=False)["image"]
        return images_to_frames(image)

    def _render_graphed(self, source: torch.Tensor, expr: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        from avatarcli.runtime import CapturedCall

        count = expr.shape[0]
        size = min([b for b in self._captured if b >= count], default=count)
        if size not in self._captured:
            inputs = (torch.zeros(size, 3, self.size, self.size, device=self.device),
                      torch.zeros(size, expr.shape[1], device=self.device), torch.zeros(size, 25, device=self.device))
            inputs[2].copy_(cameras[:1].expand(size, -1))  # a valid camera for the warm-up
            output = torch.zeros(size, self.size, self.size, 3, dtype=torch.uint8, device=self.device)

            def step() -> None:
                output.copy_(self._forward(*inputs))

            self._captured[size] = (inputs, output, CapturedCall(step))
        (static_source, static_expr, static_cameras), output, call = self._captured[size]
        static_source.copy_(source.expand(size, -1, -1, -1))
        static_expr[:count].copy_(expr)
        static_cameras[:count].copy_(cameras)
        if count < size:  # padding rows repeat the last frame (any valid input)
            static_expr[count:].copy_(expr[-1:].expand(size - count, -1))
            static_cameras[count:].copy_(cameras[-1:].expand(size - count, -1))
        call()
        return output[:count].clone()
