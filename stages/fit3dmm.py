"""Stage ``fit-3dmm``: clips -> per-frame 3D morphable model parameters (coeffs artifact).

check settings and input -> prepare (face model, the clips index, batches of whole clips, the parts
store) -> compute (the solver of ``avatarcli.fit``, all frames of a batch at once: rigid pose, then
identity and expression on landmarks by Gauss-Newton, then photometric refinement; one part per
batch) -> write (the parts assembled in batch order, atomically). A rerun with the same settings and
input reuses finished batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from avatarcli.artifact import ArtifactWriter, create_h5, open_artifact, read_strings, write_strings
from avatarcli.errors import AvatarError
from avatarcli.fit.config import FitConfig
from avatarcli.provenance import sha256_file
from avatarcli.schemas import CLIPS, COEFFS
from avatarcli.stage import (
    InputSpec, PartsStore, Stage, StageConfig, StageSpec, Summary, existing_output_matches, option, setting, unit_key,
)

READS = CLIPS.kind
WRITES = COEFFS.kind
PART_VERSION = 1


@dataclass
class Fit3dmmConfig(FitConfig, StageConfig):
    """Settings of ``avatar fit-3dmm``: the solver's (:class:`avatarcli.fit.FitConfig`), the stage's and
    the common ones (:class:`avatarcli.stage.StageConfig`). Options change the result; settings
    (``cuda_graphs``, previews, device, output handling) do not."""

    face_model: str = option("ict", help="ict, bfm, or a face-model file.")
    """Face model: 'ict' (ICT-FaceKit, default), 'bfm' (user-supplied BFM_model_front.mat) or a file path."""
    flag_px: float = option(6.0, help="Flag frames whose landmark error exceeds this (px at 256²).")
    """Frames whose mean landmark error (px at 256², scaled to the crop size) exceeds this are flagged."""
    batch_frames: int = option(512, help="Frames fitted together (whole clips).")
    """Frames fitted together (whole clips are packed up to this; a longer clip is its own batch).
    Hashed: the batches are the parts of a resumed run."""
    preview: str | None = setting(None, help="Folder for previews per clip: a PNG grid (input | landmarks | "
                                             "render | overlay) and an mp4 of every frame (input | overlay).")
    """Folder for a PNG grid per clip (input | landmarks | shaded render | overlay) and an mp4 of
    every frame (input | overlay) at the clip's fps."""
    preview_frames: int = setting(6, help="Frames (rows) per preview grid.")
    """Frames (rows) per preview grid."""

    def check(self) -> None:
        if (min(self.rigid_iters, self.iters, self.photo_iters, self.photo_samples) < 0
                or self.batch_frames < 1 or self.photo_size < 16):
            raise AvatarError("iterations and --photo-samples must be >= 0, --batch-frames >= 1 and "
                              "--photo-size >= 16")
        if self.preview_frames < 1:
            raise AvatarError("--preview-frames must be >= 1")


UNIT_ARRAYS = ("identity", "expression", "rotation", "translation", "lighting", "camera25", "pose6", "intrinsics",
               "lmk_error", "flagged", "albedo")


def flag_frames(results: list[dict], flag_px: float, crop_size: int) -> list[dict]:
    """Adds ``flagged`` [T] bool to each clip's arrays: mean landmark error above ``flag_px`` at 256²."""
    for result in results:
        result["flagged"] = result["lmk_error"] > flag_px * crop_size / 256.0
    return results


def write_unit(group: h5py.Group, result: dict, crop_size: int) -> None:
    for name in UNIT_ARRAYS:
        group.create_dataset(name, data=result[name])
    group.attrs.update({"clip_id": result["name"], "fps": result["fps"], "crop_size": crop_size})


def write_part(path: Path, results: list[dict], skipped: list[tuple[str, str]], crop_size: int) -> None:
    """A batch's part: its fitted clips (``coeffs/<clip>``) and the clips skipped with their reasons."""
    with create_h5(path) as handle:
        units = handle.create_group("coeffs")
        for result in results:
            write_unit(units.create_group(result["name"]), result, crop_size)
        write_strings(handle, "skipped_clip_id", [n for n, _ in skipped])
        write_strings(handle, "skipped_reason", [r for _, r in skipped])


class Fit3dmm(Stage):
    """A batch of whole clips (``plan_batches``) is a unit: fitted together, written as one part;
    the summary counts clips."""

    name, unit = "fit-3dmm", "clip"

    def __init__(self, config: Fit3dmmConfig, clips, output, progress=None):
        super().__init__(config, Path(output), progress)
        self.clips_path = Path(clips)

    def check(self) -> None:
        self.config.check()
        if not self.clips_path.exists():
            raise AvatarError(f"input not found: {self.clips_path}")
        existing_output_matches(self.output, COEFFS.kind, self.config.result_hash(), self.config.overwrite)

    def prepare(self, ctx) -> None:
        import torch

        from avatarcli.facemodel import load_face_model
        from avatarcli.fit.inputs import plan_batches

        config = self.config
        self.model = load_face_model(config.face_model, config.models_dir).to(ctx.device, torch.float32)
        self.input_sha = sha256_file(self.clips_path)
        with open_artifact(self.clips_path, CLIPS.kind) as handle:
            self.crop_size = int(handle.attrs["crop_size"])
            self.names = read_strings(handle["index/clip_id"])
            lengths = [int(n) for n in handle["index/num_frames"][()]]
        self.batches = plan_batches(self.names, lengths, config.batch_frames)
        self.keys = [unit_key(*batch) for batch in self.batches]
        stamp = {"stage": self.name, "part_version": PART_VERSION, "result_hash": config.result_hash(),
                 "input_sha256": self.input_sha, "face_model_sha256": self.model.sha256}
        self.store = self.hold(PartsStore(self.output, stamp, suffix=".h5", overwrite=config.overwrite))

    def compute(self, ctx) -> None:
        from concurrent.futures import ThreadPoolExecutor
        from contextlib import closing

        from avatarcli.artifact import FrameReader
        from avatarcli.fit import BatchFit, batch_results, fit_batch, read_clip_inputs
        from avatarcli.fit.preview import write_preview, write_preview_video

        config, timer, progress = self.config, ctx.timer, ctx.progress
        todo = [index for index, key in enumerate(self.keys) if not self.store.done(key)]
        done_clips = sum(len(self.batches[i]) for i in range(len(self.batches)) if i not in todo)
        self.frames_now = self.fitted_now = 0
        progress.start(total_units=len(self.names), done_units=done_clips)
        with_frames = not config.landmarks_only or bool(config.preview)
        reader, prefetch = FrameReader(), ThreadPoolExecutor(max_workers=1)
        with open_artifact(self.clips_path, CLIPS.kind) as handle, closing(reader), prefetch:

            def load(index):  # in the prefetch thread: batch k+1 is read while batch k is fitted
                with timer.step("read", sync=False):
                    return read_clip_inputs(handle, self.batches[index], with_frames, reader)

            pending = prefetch.submit(load, todo[0]) if todo else None
            for k, index in enumerate(todo):
                inputs, skipped = pending.result()
                if k + 1 < len(todo):
                    pending = prefetch.submit(load, todo[k + 1])
                results, fit = [], None
                if inputs:
                    fit = BatchFit(self.model, inputs, self.crop_size, config, ctx.device)
                    fit_batch(fit, config, timer)
                    results = flag_frames(batch_results(fit), config.flag_px, self.crop_size)
                    self.frames_now += sum(len(c.lmk68) for c in inputs)
                    self.fitted_now += len(results)
                with self.store.writing(self.keys[index]) as tmp:
                    write_part(tmp, results, skipped, self.crop_size)
                if config.preview and fit is not None:
                    with timer.step("preview", sum(len(c.lmk68) for c in inputs)):
                        for clip_index, clip in enumerate(fit.clips):
                            folder = Path(config.preview)
                            write_preview(folder / f"{clip.name}.png", fit, clip_index, config.preview_frames)
                            write_preview_video(folder / f"{clip.name}.mp4", fit, clip_index)
                progress.advance_frames(sum(len(c.lmk68) for c in inputs))
                for result in results:
                    progress.unit_done(result["name"], "ok", f"{float(result['lmk_error'].mean()):.2f} px")
                for name, reason in skipped:
                    progress.unit_done(name, "skipped", reason)

    def write(self, ctx) -> Summary:
        config, model = self.config, self.model
        config_json = {**config.to_json(), "kind": COEFFS.kind,
                       "face_model_description": model.describe() if hasattr(model, "describe") else model.name}
        names, frames, errors, skipped = [], [], [], []
        flagged = 0
        with ctx.timer.step("assemble", sync=False):
            with ArtifactWriter(self.output, COEFFS, config_json, [(str(self.clips_path.resolve()), self.input_sha)],
                                extra_attrs={"face_model": model.name, "face_model_sha256": model.sha256 or "",
                                             "crop_size": self.crop_size}) as writer:
                units = writer.handle.create_group("coeffs", track_order=True)
                for part in self.store.in_order(self.keys):
                    with h5py.File(part, "r") as src:
                        for name in src["coeffs"]:
                            src.copy(src["coeffs"][name], units, name=name)
                            error = src["coeffs"][name]["lmk_error"][()]
                            names.append(name)
                            frames.append(len(error))
                            errors.append(float(error.mean()))
                            flagged += int(src["coeffs"][name]["flagged"][()].sum())
                        skipped += list(zip(read_strings(src["skipped_clip_id"]), read_strings(src["skipped_reason"])))
                index = writer.handle.create_group("index")
                write_strings(index, "clip_id", names)
                index.create_dataset("num_frames", data=np.asarray(frames, np.int32).reshape(-1))
                index.create_dataset("lmk_error", data=np.asarray(errors, np.float32).reshape(-1))
                skip = writer.handle.create_group("skipped")
                write_strings(skip, "clip_id", [n for n, _ in skipped])
                write_strings(skip, "reason", [r for _, r in skipped])
        if not config.keep_parts:
            self.store.remove()
        mean_error = float(np.average(errors, weights=frames)) if frames else float("nan")
        return Summary(self.name, self.output, self.unit, len(names), int(sum(frames)),
                       units_now=self.fitted_now, reused=len(names) - self.fitted_now,
                       frames_now=self.frames_now, seconds=ctx.elapsed(), skipped=skipped,
                       timings=ctx.timer.as_dict(), device=ctx.device_name,
                       columns={"flagged frames": flagged, "landmark error px": f"{mean_error:.2f}"},
                       details={"flagged": flagged, "lmk_error": mean_error,
                                **({} if names else {"error": "no clip could be fitted"})},
                       produced=bool(names))


def run(config: Fit3dmmConfig, clips: str | Path, output: str | Path, progress=None) -> Summary:
    """Fit every clip of the clips artifact ``clips``; write a coeffs artifact to ``output``.

    ``progress``: an ``avatarcli.stage.Progress``. ``Summary.units`` counts the fitted clips;
    ``details["lmk_error"]`` is the frame-weighted mean landmark error (crop px), ``details["flagged"]``
    the flagged frames; ``details["error"]`` is set when no clip could be fitted (the artifact,
    with the skips, is written anyway).
    """
    return Fit3dmm(config, clips, output, progress).run()


STAGE = StageSpec(
    name="fit-3dmm",
    summary="Clips -> identity, expression, pose, camera per frame.  e.g. avatar fit-3dmm clips.h5 -o coeffs.h5",
    help=("Fit a linear face model (ICT-FaceKit by default, or BFM) to every clip of a clips artifact: one identity "
          "and albedo per clip; expression, rotation, translation and SH lighting per frame. Coarse to fine, "
          "batched over frames and clips: rigid pose and then shape on the 68 landmarks, then photometric "
          "refinement against the frames (skip it with --landmarks-only). Writes a coeffs artifact with the "
          "25-d EG3D camera, the 6-d pose and the landmark error of every frame; frames above --flag-px are "
          "flagged. Clips without landmarks are skipped with a reason. A killed run resumes with the batches "
          "it finished. '-' reads the input path from stdin."),
    epilog="Example: avatar preprocess videos/ -o clips.h5 | avatar fit-3dmm - -o coeffs.h5 --preview previews/",
    config=Fit3dmmConfig,
    run=run,
    inputs=(InputSpec("clips", "clips artifact, or '-' to read its path from stdin.", stdin=True),),
    unit="clip",
    order=20,
)
