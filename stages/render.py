"""Stage ``render``: generator + driving clips and their fits -> reenacted clips (a clips artifact).

check (settings, input kinds, clips, pairs, source frames; nothing heavy) -> prepare (load the
generator and its CLeBS encoder; β size, frame selection, edits and the driving/source cameras of
every output clip checked before any frame is rendered; input hashes; parts store) -> compute (per
output clip: the source frame read and prepared once, the driving frames rendered in batches of
``--batch-frames``, the clip written to ``<output>.parts/`` as it finishes, so a killed run
resumes) -> write (the clips artifact, atomically; with ``--mp4`` one video per output clip).

Output clip ids: ``<driving clip>`` when the source is the driving clip itself (same-identity
reenactment, ``--source-frame`` of that clip), ``<driving clip>__from__<source clip>`` otherwise.
Each output clip holds the CLIPS unit datasets — frames at the generator's size; the driving
frames' boxes, timestamps and source frame indices; landmarks NaN with ``detected``/``landmarked``
False and ``det_score`` 0 (the output is not analysed) — plus ``driving_frame`` [T] (the driving
frame each output frame renders; ``avatar eval`` compares generated frame t with reference frame
``driving_frame[t]``) and the attrs ``driving_clip``, ``source_clip``, ``source_frame_index``.
Its identity is the source's, so eval's CSIM measures identity preservation.

``--copy-source`` is the baseline of the paper's tables: every output frame is the source frame
(resized to the generator's size), written by this same pipeline. The library part (frame
selection, cameras, the batched forward, comparison frames) is :mod:`avatarcli.export3d.drive`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from avatarcli.artifact import ArtifactWriter, FrameWriter, create_h5, open_artifact, read_kind, read_strings
from avatarcli.clips import write_clip_tables
from avatarcli.errors import AvatarError
from avatarcli.evaluation.plan import read_clip_rows
from avatarcli.schemas import CLIPS, COEFFS
from avatarcli.stage import (
    InputSpec, PartsStore, Stage, StageConfig, StageSpec, Summary, existing_output_matches, option, result_hash, setting,
    unit_key,
)

GENERATOR_KIND = "generator"
READS = (GENERATOR_KIND, CLIPS.kind, COEFFS.kind)
WRITES = CLIPS.kind
PART_VERSION = 1


def parse_list(text: str) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b') (the --clips comma list)."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


@dataclass
class RenderConfig(StageConfig):
    """Settings of ``avatar render``. Options change the output; settings do not."""

    source_frame: int = option(0, help="Frame of each source clip that is reenacted (same-id: of the driving clip).")
    clips: tuple[str, ...] = option((), parse=parse_list, show=",".join,
                                    help="Comma list of driving clips to render (default: every one, or every "
                                         "one in --pairs).")
    frames: str = option("all", help="all, held-out (the frames the generator held out of training for each "
                                     "clip) or A:B (driving frames A..B-1).")
    camera: str = option("driving", help="driving, source (the source frame's camera; needs the source's fits), "
                                         "orbit:DEG (yaw swept -DEG..+DEG over the clip) or yaw=DEG,pitch=DEG.")
    edit: str = option("", help="CLeBS expression edits i=SCALE[,j=SCALE]: scale λ_i along basis vector i "
                                "(0 removes it, 2 doubles it).")
    copy_source: bool = option(False, help="Baseline: write the source frame for every driving frame (no "
                                           "generator forward).")
    precision: str = option("fp32", choices=("fp32", "bf16"), help="fp32, or bf16 autocast of the generator.")
    compression_level: int = option(1, help="Deflate level of the frames (0: none).")
    batch_frames: int = setting(32, aliases=("--batch",), help="Driving frames rendered at once.")
    mp4: str | None = setting(None, help="Also write one mp4 per output clip into this folder.")
    compare: bool = setting(False, help="With --mp4: videos show source | driving | output side by side.")

    def check(self) -> None:
        from avatarcli.export3d.drive import parse_camera, parse_edits, parse_frames

        if self.batch_frames < 1 or self.source_frame < 0 or not 0 <= self.compression_level <= 9:
            raise AvatarError("--batch-frames must be >= 1, --source-frame >= 0 and --compression-level in 0..9")
        if self.precision not in ("fp32", "bf16"):
            raise AvatarError(f"--precision must be fp32 or bf16, not {self.precision!r}")
        if self.compare and not self.mp4:
            raise AvatarError("--compare lays out the --mp4 videos; give --mp4 DIR too")
        self.parsed_frames = parse_frames(self.frames)
        self.parsed_camera = parse_camera(self.camera)
        self.parsed_edits = parse_edits(self.edit)
        if self.copy_source and (self.parsed_edits or self.parsed_camera.mode != "driving"):
            raise AvatarError("--copy-source writes the source frame as it is; --camera and --edit do not apply")


@dataclass
class ArtifactIndex:
    """Clip ids and frame counts of an input artifact, with its path and kind."""

    path: Path
    kind: str
    clips: dict[str, int]


def open_input(path, role: str, kind: str) -> ArtifactIndex:
    """Check that ``path`` exists and is an artifact of ``kind`` (one error line otherwise)."""
    path = Path(path)
    if not path.exists():
        raise AvatarError(f"{role} not found: {path}")
    found = read_kind(path)
    if found != kind:
        raise AvatarError(f"{role} must be a {kind} artifact; {path} is a {found!r} artifact")
    clips: dict[str, int] = {}
    if kind != GENERATOR_KIND:
        with open_artifact(path, kind) as handle:
            clips = dict(zip(read_strings(handle["index/clip_id"]), (int(n) for n in handle["index/num_frames"][()])))
    return ArtifactIndex(path, kind, clips)


class Render(Stage):
    """Each output clip is a unit: rendered in batches, written to its part file, then copied into
    the artifact in order."""

    name, unit = "render", "clip"

    def __init__(self, config: RenderConfig, output, generator, driving, driving_coeffs=None, source=None,
                 source_coeffs=None, pairs=None, progress=None):
        super().__init__(config, Path(output), progress)
        self.paths = {"generator": generator, "driving": driving, "driving_coeffs": driving_coeffs,
                      "source": source, "source_coeffs": source_coeffs, "pairs": pairs}
        self.store: PartsStore | None = None

    # -- check ---------------------------------------------------------------------------------

    def check(self) -> None:
        config, paths = self.config, self.paths
        config.check()
        if paths["driving_coeffs"] is None and not config.copy_source:
            raise AvatarError("--driving-coeffs is needed (the driving expressions and cameras); only --copy-source "
                              "renders without it")
        if paths["source_coeffs"] is not None and paths["source"] is None:
            raise AvatarError("--source-coeffs goes with --source (same-id renders use --driving-coeffs)")
        self.generator_index = open_input(paths["generator"], "generator", GENERATOR_KIND)
        self.driving = open_input(paths["driving"], "--driving", CLIPS.kind)
        self.driving_coeffs = (open_input(paths["driving_coeffs"], "--driving-coeffs", COEFFS.kind)
                               if paths["driving_coeffs"] is not None else None)
        self.source = open_input(paths["source"], "--source", CLIPS.kind) if paths["source"] else self.driving
        self.source_coeffs = (open_input(paths["source_coeffs"], "--source-coeffs", COEFFS.kind)
                              if paths["source_coeffs"] is not None
                              else self.driving_coeffs if paths["source"] is None else None)
        if config.parsed_camera.mode == "source" and self.source_coeffs is None:
            raise AvatarError("--camera source needs the source frames' fits: give --source-coeffs")
        inputs = [Path(p) for p in paths.values() if p is not None]
        for path in inputs:
            if path.resolve() == self.output.resolve() or (self.output.exists() and os.path.samefile(path, self.output)):
                raise AvatarError(f"the output {self.output} is one of the inputs; choose another output "
                                  "(an input is never overwritten, not even with --overwrite)")
        self.jobs = self.plan_jobs()

    def plan_jobs(self) -> list:
        """The output clips (frames chosen later, in prepare: held-out needs the generator)."""
        from avatarcli.export3d.drive import RenderJob, output_clip_id

        config, driving, source = self.config, self.driving, self.source
        cross = self.paths["source"] is not None
        if self.paths["pairs"] is not None:
            pairs = read_clip_rows(self.paths["pairs"], ("driving", "source"), 2)
        elif not cross:
            pairs = [(clip, clip) for clip in driving.clips]
        else:  # by id; a one-clip source drives every clip
            only = next(iter(source.clips)) if len(source.clips) == 1 else None
            pairs = []
            for clip in driving.clips:
                match = clip if clip in source.clips else only
                if match is None:
                    raise AvatarError(f"source artifact {source.path} has no clip {clip!r} and more than one clip: "
                                      "give --pairs FILE (driving,source rows)")
                pairs.append((clip, match))
        for clip in config.clips:
            if clip not in driving.clips:
                raise AvatarError(f"--clips: driving clip {clip!r} is not in {driving.path}")
        if config.clips:
            pairs = [pair for pair in pairs if pair[0] in set(config.clips)]
            if not pairs:
                raise AvatarError("--clips: none of these clips is in --pairs")
        jobs, seen = [], set()
        for drv, src in pairs:
            if drv not in driving.clips:
                raise AvatarError(f"driving clip {drv!r} is not in {driving.path}")
            if src not in source.clips:
                raise AvatarError(f"source clip {src!r} is not in {source.path}")
            if config.source_frame >= source.clips[src]:
                raise AvatarError(f"--source-frame {config.source_frame}: source clip {src!r} has "
                                  f"{source.clips[src]} frames")
            name = output_clip_id(drv, src if cross else None)
            if name in seen:
                raise AvatarError(f"clip pair {drv},{src} is listed twice")
            seen.add(name)
            if driving.clips[drv] == 0:
                raise AvatarError(f"driving clip {drv!r} has no frames")
            for index, role in ((self.driving_coeffs, "--driving-coeffs"), (self.source_coeffs, "--source-coeffs")):
                clip, clip_frames = (drv, driving.clips[drv]) if role == "--driving-coeffs" else (src, source.clips[src])
                if index is None or (role == "--source-coeffs" and config.parsed_camera.mode != "source"):
                    continue
                if clip not in index.clips:
                    raise AvatarError(f"{role} {index.path} has no fit of clip {clip!r}")
                if index.clips[clip] != clip_frames:
                    raise AvatarError(f"{role}: clip {clip!r} has {index.clips[clip]} fitted frames but {clip_frames} "
                                      "frames in its clips artifact (fits of another artifact?)")
            jobs.append(RenderJob(name, drv, src, config.source_frame, identity=""))
        return jobs

    # -- prepare -------------------------------------------------------------------------------

    def prepare(self, ctx) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from avatarcli.export3d.artifact import load_generator
        from avatarcli.provenance import sha256_file

        config = self.config
        inputs = [Path(p).resolve() for p in self.paths.values() if p is not None]
        with ThreadPoolExecutor(4) as hasher:
            hashing = hasher.map(sha256_file, inputs)  # the inputs' hashes are read while the model loads
            with ctx.timer.step("load_generator", sync=False):
                self.generator = load_generator(self.paths["generator"], ctx.device)
            self.plan_frames()
            with ctx.timer.step("hash_inputs", sync=False):
                self.hashes = dict(zip(inputs, hashing))
        self.size = int(self.generator.shape.image_size)
        self.driver = None
        if not config.copy_source:
            from avatarcli.export3d.drive import Driver

            self.driver = Driver(self.generator, ctx.device, config.precision, config.parsed_edits)
        stamp = {"stage": self.name, "part_version": PART_VERSION, "result_hash": config.result_hash(),
                 "inputs": [self.hashes[p] for p in inputs], "jobs": [(j.output_clip, j.driving_clip, j.source_clip)
                                                                    for j in self.jobs]}
        self.stamp_hash = result_hash(stamp)
        existing_output_matches(self.output, CLIPS.kind, self.stamp_hash, config.overwrite, key="stamp")
        self.keys = [unit_key(job.output_clip) for job in self.jobs]
        self.store = self.hold(PartsStore(self.output, stamp, suffix=".h5", overwrite=config.overwrite))

    def plan_frames(self) -> None:
        """Frames, β and cameras of every job, checked before anything is rendered."""
        import torch

        from avatarcli.export3d.drive import expected_beta_dim, job_cameras, select_frames

        config, generator = self.config, self.generator
        self.not_seen: list[tuple[str, str]] = []
        if config.parsed_frames == "held-out" and not config.clips:
            # without --clips, held-out means every clip the generator trained on; the others are skipped
            self.not_seen = [(job.output_clip, "the generator did not train on this clip (no held-out frames)")
                             for job in self.jobs if job.driving_clip not in generator.held_out]
            self.jobs = [job for job in self.jobs if job.driving_clip in generator.held_out]
            if not self.jobs:
                raise AvatarError("--frames held-out: the generator trained on none of the driving clips")
        edits = config.parsed_edits
        if edits:
            if generator.expression != "clebs" or generator.encoder is None:
                raise AvatarError("--edit scales CLeBS basis coefficients; this generator was trained on raw β")
            basis = int(generator.encoder.shape.basis_size)
            bad = [i for i, _ in edits if i >= basis]
            if bad:
                raise AvatarError(f"--edit index {bad[0]} is outside the CLeBS basis 0..{basis - 1}")
        with h5py.File(self.source.path, "r") as handle:
            for job in self.jobs:
                job.identity = str(handle["clips"][job.source_clip].attrs["identity"])
        self.inputs: dict[str, dict] = {}
        want = expected_beta_dim(generator)
        drv_handle = h5py.File(self.driving_coeffs.path, "r") if self.driving_coeffs else None
        src_handle = (h5py.File(self.source_coeffs.path, "r")
                      if self.source_coeffs is not None and config.parsed_camera.mode == "source" else None)
        try:
            for job in self.jobs:
                job.frames = select_frames(config.parsed_frames, job.driving_clip, self.driving.clips[job.driving_clip],
                                           generator.held_out)
                if drv_handle is None:
                    continue
                group = drv_handle["coeffs"][job.driving_clip]
                if "camera25" not in group:
                    raise AvatarError(f"{self.driving_coeffs.path}: clip {job.driving_clip!r} has no camera25")
                first, last = int(job.frames[0]), int(job.frames[-1]) + 1
                beta = group["expression"][first:last]
                camera = group["camera25"][first:last]
                if beta.shape[1] != want:
                    raise AvatarError(f"--driving-coeffs: clip {job.driving_clip!r} has {beta.shape[1]} expression "
                                      f"coefficients; this generator takes {want} ({generator.expression} mode)")
                for name, values in (("expression", beta), ("camera25", camera)):
                    bad = ~np.isfinite(values.reshape(len(values), -1)).all(1)
                    if bad.any():
                        raise AvatarError(f"--driving-coeffs: clip {job.driving_clip!r} frame "
                                          f"{first + int(np.argmax(bad))} has a non-finite {name}")
                source_camera = None
                if src_handle is not None:
                    source_camera = src_handle["coeffs"][job.source_clip]["camera25"][job.source_frame]
                    if not np.isfinite(source_camera).all():
                        raise AvatarError(f"--source-coeffs: clip {job.source_clip!r} frame {job.source_frame} has "
                                          "a non-finite camera25")
                cameras = job_cameras(config.parsed_camera, camera, source_camera, generator.world_scale)
                self.inputs[job.output_clip] = {"beta": torch.as_tensor(beta.astype(np.float32)), "cameras": cameras}
        finally:
            for handle in (drv_handle, src_handle):
                if handle is not None:
                    handle.close()

    # -- compute -------------------------------------------------------------------------------

    def compute(self, ctx) -> None:
        from avatarcli.artifact import FrameReader

        todo = {key for key in self.keys if not self.store.done(key)}
        self.units_now = len(todo)
        self.frames_now = int(sum(len(job.frames) for job, key in zip(self.jobs, self.keys) if key in todo))
        ctx.progress.start(total_units=len(self.jobs), done_units=len(self.jobs) - len(todo))
        reader, frame_writer = FrameReader(), FrameWriter(self.config.compression_level)
        self.videos: list[str] = []
        try:
            with h5py.File(self.driving.path, "r") as drv, h5py.File(self.source.path, "r") as src:
                for job, key in zip(self.jobs, self.keys):
                    if key in todo:
                        frames = self.render_clip(ctx, job, reader, src)
                        with ctx.timer.step("write", items=len(job.frames), sync=False):
                            with self.store.writing(key) as tmp, create_h5(tmp) as part:
                                self.write_clip_group(part.create_group(job.output_clip), job, frames, drv,
                                                      frame_writer)
                        ctx.progress.unit_done(job.output_clip, "ok", "")
                    else:
                        frames = None
                    if self.config.mp4:
                        with ctx.timer.step("mp4", items=len(job.frames), sync=False):
                            self.write_video(job, key, frames, reader, drv, src)
        finally:
            frame_writer.close()
            reader.close()

    def read_source_frame(self, job, reader, src) -> np.ndarray:
        """uint8 [H,W,3]: the source frame of ``job``."""
        return reader.read(src["clips"][job.source_clip]["frames"], job.source_frame, job.source_frame + 1)[0]

    def render_clip(self, ctx, job, reader, src) -> np.ndarray:
        """uint8 [T,S,S,3]: the output frames of ``job``."""
        import torch

        from avatarcli.export3d.drive import resize_frames

        config, count = self.config, len(job.frames)
        with ctx.timer.step("read_source", items=1, sync=False):
            source = self.read_source_frame(job, reader, src)
        if config.copy_source:
            frame = resize_frames(source[None], self.size)
            ctx.progress.advance_frames(count)
            return np.broadcast_to(frame, (count, *frame.shape[1:]))
        with ctx.timer.step("prepare_source", items=1):
            image = self.driver.source(torch.from_numpy(source))
        inputs = self.inputs[job.output_clip]
        # Batches stay on the device and come back once per clip (no host wait per batch).
        outputs = []
        for start in range(0, count, config.batch_frames):
            stop = min(count, start + config.batch_frames)
            with ctx.timer.step("render", items=stop - start):
                outputs.append(self.driver.render(image, inputs["beta"][start:stop], inputs["cameras"][start:stop]))
            ctx.progress.advance_frames(stop - start)
        with ctx.timer.step("read_back", items=count, sync=False):
            return torch.cat(outputs).cpu().numpy()

    def write_clip_group(self, group: h5py.Group, job, frames: np.ndarray, drv: h5py.File,
                         frame_writer: FrameWriter) -> None:
        """One ``/clips/<output clip>`` group: every CLIPS unit dataset, ``driving_frame`` and the attrs."""
        T = len(job.frames)
        driving = drv["clips"][job.driving_clip]
        first, last = int(job.frames[0]), int(job.frames[-1]) + 1  # selections are contiguous
        frame_writer.write(group, "frames", frames)
        for name in ("boxes", "timestamps", "source_frame"):
            group.create_dataset(name, data=driving[name][first:last])
        # The output is not analysed: no landmarks, nothing detected.
        group.create_dataset("kps5", data=np.full((T, 5, 2), np.nan, np.float32))
        group.create_dataset("lmk68", data=np.full((T, 68, 2), np.nan, np.float32))
        group.create_dataset("det_score", data=np.zeros(T, np.float32))
        group.create_dataset("detected", data=np.zeros(T, bool))
        group.create_dataset("landmarked", data=np.zeros(T, bool))
        group.create_dataset("driving_frame", data=job.frames.astype(np.int64))
        attrs = {k: driving.attrs[k] for k in CLIPS.unit_attrs}
        attrs.update({"identity": job.identity, "identity_id": -1, "driving_clip": job.driving_clip,
                      "source_clip": job.source_clip, "source_frame_index": int(job.source_frame),
                      "camera": self.config.camera, "copy_source": bool(self.config.copy_source)})
        group.attrs.update(attrs)

    def write_video(self, job, key: str, frames: np.ndarray | None, reader, drv, src) -> None:
        """``<mp4 dir>/<output clip>.mp4`` (source | driving | output with --compare); a resumed clip's
        video is made from its part when it is missing."""
        from avatarcli.export3d.drive import compare_frames
        from avatarcli.video import write_video

        path = Path(self.config.mp4) / (job.output_clip.replace(os.sep, "_") + ".mp4")
        if frames is None:
            if path.exists():
                self.videos.append(str(path))
                return
            with h5py.File(self.store.path(key), "r") as part:
                frames = part[job.output_clip]["frames"][()]
        if self.config.compare:
            first, last = int(job.frames[0]), int(job.frames[-1]) + 1
            driving = reader.read(drv["clips"][job.driving_clip]["frames"], first, last)
            frames = compare_frames(self.read_source_frame(job, reader, src), driving, frames)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, frames, float(drv["clips"][job.driving_clip].attrs["fps"]))
        self.videos.append(str(path))

    # -- write ---------------------------------------------------------------------------------

    def write(self, ctx) -> Summary:
        config, jobs = self.config, self.jobs
        identities = sorted({job.identity for job in jobs})
        identity_ids = {name: i for i, name in enumerate(identities)}
        with h5py.File(self.driving.path, "r") as drv:
            fps = float(drv.attrs["fps"])
            known = dict(zip(read_strings(drv["sources/path"]), read_strings(drv["sources/sha256"])))
            source_paths = [str(drv["clips"][job.driving_clip].attrs["source_path"]) for job in jobs]
        sources = list(dict.fromkeys(source_paths))
        parents = [(str(path), self.hashes[path]) for path in self.hashes]
        config_json = {**config.to_json(), "stamp": self.stamp_hash, "kind": CLIPS.kind, "stage": self.name,
                       "generator_sha256": self.hashes[Path(self.paths["generator"]).resolve()],
                       "image_size": self.size}
        with ctx.timer.step("write", sync=False):
            with ArtifactWriter(self.output, CLIPS, config_json, parents,
                                extra_attrs={"crop_size": self.size, "fps": fps}) as writer:
                clips = writer.handle.create_group("clips", track_order=True)
                for job, path in zip(jobs, self.store.in_order(self.keys)):
                    with h5py.File(path, "r") as part:
                        part.copy(part[job.output_clip], clips, name=job.output_clip)
                    clips[job.output_clip].attrs["identity_id"] = identity_ids[job.identity]
                write_clip_tables(
                    writer.handle, [j.output_clip for j in jobs], [identity_ids[j.identity] for j in jobs],
                    [len(j.frames) for j in jobs], [sources.index(p) for p in source_paths], identities, sources,
                    [known.get(p, "") for p in sources], ["ok"] * len(sources), [""] * len(sources),
                    [source_paths.count(p) for p in sources],
                )
        if not config.keep_parts:
            self.store.remove()
        frames = int(sum(len(job.frames) for job in jobs))
        return Summary(self.name, self.output, self.unit, len(jobs), frames, units_now=self.units_now,
                       reused=len(jobs) - self.units_now, frames_now=self.frames_now, seconds=ctx.elapsed(),
                       skipped=list(self.not_seen),
                       timings=ctx.timer.as_dict(), device=ctx.device_name,
                       columns={"size": f"{self.size}²", "camera": config.camera,
                                "mode": "copy-source" if config.copy_source else config.precision},
                       details={"videos": self.videos, "clips": [job.output_clip for job in jobs]})


def run(config: RenderConfig, generator, driving, output, driving_coeffs=None, source=None, source_coeffs=None,
        pairs=None, progress=None) -> Summary:
    """Reenact the ``driving`` clips (clips artifact, fitted in ``driving_coeffs``) with the generator
    artifact ``generator``; write a clips artifact to ``output``. ``source``: clips of other
    identities (default: each driving clip is its own source); ``pairs``: a CSV of driving,source
    clip ids. ``Summary.details``: the output clip ids and the videos written."""
    return Render(config, output, generator, driving, driving_coeffs, source, source_coeffs, pairs, progress).run()


STAGE = StageSpec(
    name="render",
    summary="Reenact driving clips with a trained generator (clips artifact).  e.g. avatar render gen.h5 "
            "--driving drv.h5 --driving-coeffs drvc.h5",
    help=("Render every driving frame with the Export3D generator: the source frame (of the driving clip itself, "
          "or of --source clips via --pairs) is driven by the driving frame's expression and seen from its "
          "camera (or --camera source|orbit:DEG|yaw=..,pitch=..), with optional CLeBS --edit. Writes a clips "
          "artifact whose clips name their driving clip and frames (driving_frame), so 'avatar eval - --reference "
          "DRV.h5' compares each output frame with the frame it renders. --copy-source writes the copy-the-source "
          "baseline through the same pipeline; --mp4 DIR also writes videos (--compare: source | driving | "
          "output). '-' reads the generator path from stdin."),
    epilog=("Example: avatar render gen.h5 --driving clips.h5 --driving-coeffs coeffs.h5 --frames held-out | "
            "avatar eval - --reference clips.h5 --metrics psnr,ssim,csim,akd,aed,apd"),
    config=RenderConfig,
    run=run,
    inputs=(
        InputSpec("generator", "generator artifact (avatar train-recon), or '-' to read its path from stdin.",
                  stdin=True),
        InputSpec("driving", "clips artifact with the driving clips.", flag="--driving"),
        InputSpec("driving_coeffs", "coeffs artifact: fits of the driving clips (expression, camera25).",
                  flag="--driving-coeffs", required=False),
        InputSpec("source", "clips artifact with source clips of other identities (default: the driving clips).",
                  flag="--source", required=False),
        InputSpec("source_coeffs", "coeffs artifact: fits of the source clips (for --camera source).",
                  flag="--source-coeffs", required=False),
        InputSpec("pairs", "CSV of driving,source clip ids (cross-identity).", flag="--pairs", required=False),
    ),
    unit="clip",
    output_default="render.h5",
    order=40,
)
