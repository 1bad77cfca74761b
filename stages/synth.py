"""Stage ``synth``: face model -> synthetic clips artifact with ground truth (no inputs).

Renders a linear face model (ICT-FaceKit by default) with a random identity per clip, smooth
expression and head-pose trajectories, camera-attached SH lighting, a plausible skin albedo and a
smooth background into a ``clips`` artifact that looks like ``avatar preprocess`` output (square,
nose-centred crops at a fixed fps, 5- and 68-point landmarks), plus the optional ``truth/*``
datasets of :data:`avatarcli.schemas.CLIPS` that hold what was rendered. Used to measure fitting
error and to make training data.

sample (per clip, on the host, from ``(seed, clip)`` only: :mod:`avatarcli.synthetic.sampling`) ->
geometry (model vertices, pose, landmark projection) -> render (rasterize + SH shading) -> composite
(over the background, uint8: :class:`avatarcli.synthetic.render.Synthesizer`) -> write. Each clip is
a unit: it is written to ``<output>.parts/`` as it finishes, so a killed run resumes where it
stopped, and the artifact is assembled from the parts in clip order at the end. An existing output
made with the same (result) settings is kept as it is.

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
(:class:`avatarcli.synthetic.caps.Caps`: sclera with a dark iris, a dark mouth interior) so the
background does not show through them, and ``supersample`` > 1 anti-aliases edges. Re-rendering the truth with
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

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from avatarcli.artifact import ArtifactWriter, FrameWriter, create_h5
from avatarcli.clips import write_clip_tables
from avatarcli.errors import AvatarError
from avatarcli.schemas import CLIPS
from avatarcli.stage import (
    PartsStore, Stage, StageConfig, StageSpec, Summary, existing_output_matches, option, setting, unit_key,
)
from avatarcli.synthetic.render import SynthClip, clip_names

READS: tuple[str, ...] = ()
WRITES = CLIPS.kind
STEPS = ("load_model", "sample", "geometry", "render", "composite", "write")
PART_VERSION = 1


def parse_range(text: str) -> tuple[float, float]:
    """'low,high' -> (low, high)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise AvatarError(f"--light-range must be two numbers 'low,high', not {text!r}") from None
    return low, high


def show_range(value: tuple[float, float]) -> str:
    return ",".join(f"{v:g}" for v in value)


@dataclass
class SynthConfig(StageConfig):
    """Settings of ``avatar synth``. Options change the output; settings (``batch_frames`` and the
    common ones) only speed or output handling. Angles in degrees, lengths in mm, sizes in pixels."""

    clips: int = option(4, help="Number of clips (one identity each, with its own trajectories, light, skin and "
                                "background).")
    frames: int = option(50, help="Frames per clip.")
    size: int = option(256, help="Side of the square frames, pixels (the artifact's crop_size).")
    fps: float = option(25.0, help="Frame rate of the trajectories and of the artifact.")
    seed: int = option(0, help="Random seed; clip k is drawn from numpy.random.default_rng([seed, k]).")
    face_model: str = option("ict", help="Face model: ict, bfm, or a .npz / .mat path.")
    focal: float = option(1160.0, help="Focal length in pixels at size 256 (scaled by size / 256); the principal "
                                       "point is the image centre.")
    distance: float = option(1160.0, help="Mean camera distance (z of the model origin), mm; with focal 1160 the "
                                          "face spans about as much as a preprocess crop.")
    distance_jitter: float = option(0.08, help="Per-clip relative distance jitter: distance * (1 ± U(0, jitter)).")
    id_scale: float = option(1.0, help="Std of the identity coefficients (times the model's id_std, if any).")
    exp_channels: int = option(6, help="Active expression channels per clip (chosen at random; others stay 0).")
    exp_max: float = option(0.7, help="Largest expression weight (blendshapes: at most 1; PCA models: "
                                      "±exp_max · 3 · exp_std).")
    exp_max_hz: float = option(1.0, help="Highest frequency of the expression trajectories, Hz (lowest: a tenth).")
    yaw: float = option(25.0, help="Largest |yaw|, degrees (positive turns the nose to the image's right).")
    pitch: float = option(15.0, help="Largest |pitch|, degrees (positive turns the nose down).")
    roll: float = option(8.0, help="Largest |roll|, degrees.")
    pose_max_hz: float = option(0.4, help="Highest frequency of the pose trajectories, Hz (lowest: a tenth); at "
                                          "25° yaw and 25 fps at most ≈2.5° per frame.")
    translation_jitter: float = option(4.0, help="Largest smooth head offset in x, y and z, mm (the identity's nose "
                                                 "tip otherwise projects to the image centre).")
    light_ambient: float = option(0.2, help="Per-clip jitter of SH coefficient 0 around 0 (the renderer adds 0.8), ±.")
    light_directional: float = option(0.3, help="Per-clip range of SH coefficients 1-8 (bands 1 and 2), ±.")
    light_colour: float = option(0.06, help="Per-clip relative colour tint of the light, per channel ±.")
    light_drift: float = option(0.05, help="Smooth change of every SH coefficient over a clip, ± (0: constant).")
    light_range: tuple[float, float] = option(
        (0.25, 1.4), parse=parse_range, show=show_range,
        help="Irradiance bounds 'low,high' on camera-facing normals: bands 1-2 of a light outside them are scaled "
             "down until it fits (no negative light, little clipping).")
    skin_variation: float = option(0.05, help="Relative amplitude of the smooth per-vertex albedo variation "
                                              "(sinusoids of the vertex position, wavelengths 40-150 mm).")
    lip_tint: float = option(0.25, help="Strength of the redder albedo around the mouth opening (0: none).")
    fill_holes: bool = option(True, help="Close the eye and mouth openings with rendering-only caps (sclera and "
                                         "iris, a dark mouth interior); not part of the truth.")
    background_noise: float = option(0.02, help="Std of the static per-pixel noise on the background gradient "
                                                "(0..1 units).")
    supersample: int = option(1, help="Render at N x the size and average N x N blocks (anti-aliasing); 1: off.")
    compression_level: int = option(1, help="Deflate level of the frames (0: none).")
    batch_frames: int = setting(16, aliases=("--batch",), help="Frames rendered at once.")

    def focal_px(self) -> float:
        """Focal length in pixels at ``size``."""
        return self.focal * self.size / 256.0

    def check(self) -> None:
        if self.clips < 1 or self.frames < 1:
            raise AvatarError("--clips and --frames must be at least 1")
        if self.size < 16 or self.fps <= 0:
            raise AvatarError("--size must be at least 16 and --fps > 0")
        if self.focal <= 0 or self.distance <= 0 or not 0 <= self.distance_jitter < 0.5:
            raise AvatarError("--focal and --distance must be > 0 and --distance-jitter in [0, 0.5)")
        if self.exp_channels < 0 or not 0 <= self.exp_max <= 1:
            raise AvatarError("--exp-channels must be >= 0 and --exp-max in [0, 1]")
        if self.id_scale < 0 or self.supersample < 1 or self.batch_frames < 1:
            raise AvatarError("--id-scale must be >= 0, --supersample and --batch-frames >= 1")
        if max(abs(self.yaw), abs(self.pitch), abs(self.roll)) >= 80:
            raise AvatarError("--yaw, --pitch and --roll must be below 80 degrees")
        if len(self.light_range) != 2 or not self.light_range[0] < self.light_range[1]:
            raise AvatarError("--light-range must be 'low,high' with low < high")


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


class Synth(Stage):
    """Clip ``k`` of ``config.clips`` is unit ``k``: rendered and written to its part file, then
    copied into the artifact in clip order (compressed chunks copied as they are)."""

    name, unit = "synth", "clip"

    def __init__(self, config: SynthConfig, output, progress=None, *, model=None):
        super().__init__(config, Path(output), progress)
        self.model = model
        self.store: PartsStore | None = None
        self.kept = False

    def check(self) -> None:
        config = self.config
        config.check()
        same = existing_output_matches(self.output, CLIPS.kind, config.result_hash(), config.overwrite)
        self.kept = same and not config.overwrite

    def prepare(self, ctx) -> None:
        if self.kept:
            return
        from avatarcli.synthetic.render import Synthesizer

        config = self.config
        self.synth = Synthesizer(config, model=self.model, device=ctx.device, timer=ctx.timer)
        self.names = [clip_names(config, index)[0] for index in range(config.clips)]
        self.keys = [unit_key(name) for name in self.names]
        stamp = {"stage": self.name, "part_version": PART_VERSION, "result_hash": config.result_hash(),
                 "face_model_sha256": self.synth.model.sha256}
        self.store = self.hold(PartsStore(self.output, stamp, suffix=".h5", overwrite=config.overwrite))

    def compute(self, ctx) -> None:
        config = self.config
        if self.kept:
            ctx.progress.start(total_units=config.clips, done_units=config.clips)
            return
        self.todo = [index for index, key in enumerate(self.keys) if not self.store.done(key)]
        ctx.progress.start(total_units=config.clips, done_units=config.clips - len(self.todo))
        frame_writer = FrameWriter(config.compression_level)
        try:
            for index in self.todo:
                clip = self.synth.clip(index, ctx.progress.advance_frames)
                with ctx.timer.step("write", items=config.frames, sync=False):
                    with self.store.writing(self.keys[index]) as tmp, create_h5(tmp) as part:
                        write_clip_group(part.create_group(clip.name), clip, config, index, frame_writer)
                        part.attrs["face_coverage"] = float(clip.mask_fraction.mean())
                ctx.progress.unit_done(clip.name, "ok", "")
        finally:
            frame_writer.close()

    def write(self, ctx) -> Summary:
        config = self.config
        size = f"{config.size}²"
        if self.kept:
            with h5py.File(self.output, "r") as handle:
                frames = int(np.sum(handle["index/num_frames"][()]))
                clips = len(handle["clips"])
            return Summary(self.name, self.output, self.unit, clips, frames, reused=clips, seconds=ctx.elapsed(),
                           device=ctx.device_name, columns={"size": size, "face coverage": "-"},
                           details={"output_kept": True})
        model = self.synth.model
        config_json = {**config.to_json(), "kind": CLIPS.kind, "stage": self.name, "face_model_name": model.name,
                       "face_model_sha256": model.sha256, "focal_px": config.focal_px()}
        count, coverage = config.clips, []
        with ctx.timer.step("write", sync=False):  # copies, tables, validation and the rename
            with ArtifactWriter(self.output, CLIPS, config_json, [],
                                extra_attrs={"crop_size": config.size, "fps": float(config.fps)}) as writer:
                clips = writer.handle.create_group("clips", track_order=True)
                for name, path in zip(self.names, self.store.in_order(self.keys)):
                    with h5py.File(path, "r") as part:
                        part.copy(part[name], clips, name=name)
                        coverage.append(float(part.attrs["face_coverage"]))
                write_clip_tables(
                    writer.handle, self.names, list(range(count)), [config.frames] * count, list(range(count)),
                    self.names, [source_path(config, i) for i in range(count)], [""] * count, ["ok"] * count,
                    [""] * count, [1] * count,
                )
        if not config.keep_parts:
            self.store.remove()
        mean_coverage = float(np.mean(coverage))
        frames_now = len(self.todo) * config.frames
        return Summary(self.name, self.output, self.unit, count, count * config.frames, units_now=len(self.todo),
                       reused=count - len(self.todo), frames_now=frames_now, seconds=ctx.elapsed(),
                       timings=ctx.timer.as_dict(), device=ctx.device_name,
                       columns={"size": size, "face coverage": f"{100 * mean_coverage:.0f}%"},
                       details={"face_coverage": mean_coverage})


def run(config: SynthConfig, output: str | Path, progress=None, *old_form, model=None) -> Summary:
    """Render ``config.clips`` clips into the clips artifact ``output``.

    ``progress``: an ``avatarcli.stage.Progress``; ``model``: an already loaded face model (else
    ``config.face_model`` is loaded). An existing output made with the same (result) settings is
    kept (``Summary.details["output_kept"]``); one made otherwise is refused unless
    ``config.overwrite``. The pre-contract form ``run(config, [], output, progress)`` is accepted too.
    """
    if isinstance(output, (list, tuple)):  # run(config, inputs, output, progress): synth has no inputs
        if output:
            raise AvatarError("avatar synth takes no inputs")
        output, progress = progress, (old_form[0] if old_form else None)
    return Synth(config, output, progress, model=model).run()


def report(summary: Summary, config: SynthConfig) -> bool:
    """The note when an existing output was kept (the table says the rest)."""
    if summary.details.get("output_kept"):
        from avatarcli.cli.common import err

        err.print(f"{summary.output} was already made with these settings; kept as is (--overwrite to redo)",
                  markup=False)
    return False


STAGE = StageSpec(
    name="synth",
    summary="Synthetic face clips with ground truth (3DMM, pose, light).  e.g. avatar synth -o synth.h5",
    help=("Render the face model (ICT-FaceKit by default) with a random identity per clip, smooth expression and "
          "head-pose trajectories, SH lighting, a skin albedo and a gradient background into a clips artifact "
          "shaped like 'avatar preprocess' output (nose-centred square frames, 5- and 68-point landmarks), with "
          "the ground truth beside the frames (truth/identity, expression, pose6, lighting, albedo, intrinsics). "
          "Landmarks are the projected model landmark vertices, visible or not. The same --seed gives the same "
          "clips; a killed run resumes with the clips it finished."),
    epilog="Example: avatar synth -o synth.h5 --clips 8 --frames 100 | avatar info -",
    config=SynthConfig,
    run=run,
    inputs=(),
    unit="clip",
    report=report,
    order=60,
)
