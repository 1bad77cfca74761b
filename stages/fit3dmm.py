"""Stage ``fit-3dmm``: clips -> per-frame 3D morphable model parameters (coeffs artifact).

check inputs -> prepare (face model, batches of whole clips) -> compute (the solver of
``avatarcli.fit``, all frames of a batch at once: rigid pose, then identity and expression on
landmarks by Gauss-Newton, then photometric refinement) -> write (a part file per batch, then an
atomic assembly). A rerun with the same settings reuses finished batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from avatarcli.artifact import ArtifactWriter, create_h5, open_artifact, read_strings, write_strings
from avatarcli.devices import resolve_device
from avatarcli.errors import AvatarError
from avatarcli.fit.config import FitConfig
from avatarcli.provenance import sha256_file
from avatarcli.schemas import CLIPS, COEFFS

READS = CLIPS.kind
WRITES = COEFFS.kind
PART_VERSION = 1


@dataclass
class Fit3dmmConfig(FitConfig):
    """Settings of ``avatar fit-3dmm``: the solver's (:class:`avatarcli.fit.FitConfig`) and the
    stage's. All but the last group (and ``cuda_graphs``) change the result."""

    face_model: str = "ict"
    """Face model: 'ict' (ICT-FaceKit, default), 'bfm' (user-supplied BFM_model_front.mat) or a file path."""
    flag_px: float = 6.0
    """Frames whose mean landmark error (px at the crop size) exceeds this are flagged."""
    batch_frames: int = 512
    """Frames fitted together (whole clips are packed up to this; a longer clip is its own batch)."""
    # -- not part of the result
    models_dir: str | None = None
    """Folder searched first for the face model."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    preview: str | None = None
    """Folder for PNG grids per clip: input | landmarks | shaded render | overlay."""
    preview_frames: int = 6
    """Frames (rows) per preview grid."""
    overwrite: bool = False
    """Replace an output or parts made with other settings."""
    keep_parts: bool = False
    """Keep ``<output>.parts/`` after a successful run."""

    def result_fields(self) -> dict:
        skip = {"models_dir", "device", "preview", "preview_frames", "overwrite", "keep_parts", "cuda_graphs"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def result_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.result_fields(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FitSummary:
    output: Path
    clips: int
    frames: int
    skipped: list[tuple[str, str]]
    flagged: int
    lmk_error: float
    seconds: float
    frames_now: int
    reused: int
    timings: dict = field(default_factory=dict)
    device: str = "cpu"


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


def batch_key(names: list[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


def run(config: Fit3dmmConfig, clips_path: str | Path, output: str | Path, progress=None) -> FitSummary:
    """Fit every clip of ``clips_path``; write a coeffs artifact to ``output``.

    ``progress``: optional object with ``start(total_units, done_units)``, ``advance_frames(n)`` and
    ``unit_done(name, status, reason)`` (``avatarcli.cli.common.StageProgress``).
    """

    from concurrent.futures import ThreadPoolExecutor

    import torch

    from avatarcli.artifact import FrameReader
    from avatarcli.facemodel import load_face_model
    from avatarcli.fit import BatchFit, batch_results, fit_batch, plan_batches, read_clip_inputs, write_preview
    from avatarcli.runtime import stream_sync
    from avatarcli.timing import StepTimer

    started = time.perf_counter()
    clips_path, output = Path(clips_path), Path(output)
    if (min(config.rigid_iters, config.iters, config.photo_iters, config.photo_samples) < 0
            or config.batch_frames < 1 or config.photo_size < 16):
        raise AvatarError("iterations and --photo-samples must be >= 0, --batch-frames >= 1 and --photo-size >= 16")
    if not clips_path.exists():
        raise AvatarError(f"input not found: {clips_path}")
    device = resolve_device(config.device)
    model = load_face_model(config.face_model, config.models_dir).to(device, torch.float32)
    input_sha = sha256_file(clips_path)
    with open_artifact(clips_path, CLIPS.kind) as handle:
        crop_size = int(handle.attrs["crop_size"])
        names = read_strings(handle["index/clip_id"])
        lengths = [int(n) for n in handle["index/num_frames"][()]]
    batches = plan_batches(names, lengths, config.batch_frames)

    parts_dir = output.with_name(output.name + ".parts")
    stamp = {"result_hash": config.result_hash(), "input_sha256": input_sha, "face_model_sha256": model.sha256}
    if parts_dir.exists():
        old = json.loads((parts_dir / "config.json").read_text()) if (parts_dir / "config.json").exists() else {}
        if old != stamp:
            if not config.overwrite:
                raise AvatarError(f"{parts_dir} holds a run with other settings or input; use --overwrite or delete it")
            shutil.rmtree(parts_dir)
    if output.exists() and not config.overwrite:
        try:
            with open_artifact(output, COEFFS.kind) as old_out:
                same = json.loads(old_out.attrs["config_json"]).get("result_hash") == config.result_hash()
        except AvatarError:
            same = False
        if not same:
            raise AvatarError(f"{output} exists and was made with other settings; use --overwrite or choose another output")
    parts_dir.mkdir(parents=True, exist_ok=True)
    (parts_dir / "config.json").write_text(json.dumps(stamp))

    timer = StepTimer(stream_sync(device))
    done = {b: parts_dir / f"{batch_key(b)}.h5" for b in map(tuple, batches)}
    finished = {b for b, part in done.items() if _part_ok(part)}
    if progress is not None:
        progress.start(total_units=len(names), done_units=sum(len(b) for b in finished))
    frames_now = 0
    todo = [b for b in map(tuple, batches) if b not in finished]
    with_frames = not config.landmarks_only or bool(config.preview)
    reader, prefetch = FrameReader(), ThreadPoolExecutor(max_workers=1)
    with open_artifact(clips_path, CLIPS.kind) as handle, closing(reader), prefetch:

        def load(batch):  # in the prefetch thread: batch k+1 is read while batch k is fitted
            with timer.step("read", sync=False):
                return read_clip_inputs(handle, list(batch), with_frames, reader)

        pending = prefetch.submit(load, todo[0]) if todo else None
        for k, batch in enumerate(todo):
            inputs, skipped = pending.result()
            if k + 1 < len(todo):
                pending = prefetch.submit(load, todo[k + 1])
            results = []
            fit = None
            if inputs:
                fit = BatchFit(model, inputs, crop_size, config, torch.device(device))
                fit_batch(fit, config, timer)
                results = flag_frames(batch_results(fit), config.flag_px, crop_size)
                frames_now += sum(len(c.lmk68) for c in inputs)
            _write_part(done[batch], results, skipped, crop_size)
            if config.preview and fit is not None:
                with timer.step("preview"):
                    for index, clip in enumerate(fit.clips):
                        write_preview(Path(config.preview) / f"{clip.name}.png", fit, index, config.preview_frames)
            if progress is not None:
                progress.advance_frames(sum(len(c.lmk68) for c in inputs))
                for r in results:
                    progress.unit_done(r["name"], "ok", f"{float(r['lmk_error'].mean()):.2f} px")
                for name, reason in skipped:
                    progress.unit_done(name, "skipped", reason)

    with timer.step("assemble", sync=False):
        summary = _assemble(output, [done[b] for b in map(tuple, batches)], config, model, clips_path, input_sha, crop_size)
    if not config.keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return FitSummary(output=output, frames_now=frames_now, seconds=time.perf_counter() - started,
                      reused=sum(len(b) for b in finished), timings=timer.as_dict(), device=device, **summary)


def _part_ok(part: Path) -> bool:
    try:
        with h5py.File(part, "r") as handle:
            return int(handle.attrs.get("part_version", 0)) == PART_VERSION and "done" in handle.attrs
    except Exception:
        return False


def _write_part(path: Path, results: list[dict], skipped: list[tuple[str, str]], crop_size: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with create_h5(tmp) as handle:
            units = handle.create_group("coeffs")
            for result in results:
                write_unit(units.create_group(result["name"]), result, crop_size)
            write_strings(handle, "skipped_clip_id", [n for n, _ in skipped])
            write_strings(handle, "skipped_reason", [r for _, r in skipped])
            handle.attrs["part_version"] = PART_VERSION
            handle.attrs["done"] = True
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _assemble(output: Path, parts: list[Path], config: Fit3dmmConfig, model, clips_path: Path, input_sha: str,
              crop_size: int) -> dict:
    config_json = {**asdict(config), "result_hash": config.result_hash(), "kind": COEFFS.kind,
                   "face_model_description": model.describe() if hasattr(model, "describe") else model.name}
    names, frames, errors, skipped = [], [], [], []
    flagged = 0
    with ArtifactWriter(output, COEFFS, config_json, [(str(clips_path.resolve()), input_sha)],
                        extra_attrs={"face_model": model.name, "face_model_sha256": model.sha256 or "",
                                     "crop_size": crop_size}) as writer:
        units = writer.handle.create_group("coeffs", track_order=True)
        for part in parts:
            with h5py.File(part, "r") as src:
                for name in src["coeffs"]:
                    src.copy(src["coeffs"][name], units, name=name)
                    err = src["coeffs"][name]["lmk_error"][()]
                    names.append(name)
                    frames.append(len(err))
                    errors.append(float(err.mean()))
                    flagged += int(src["coeffs"][name]["flagged"][()].sum())
                skipped += list(zip(read_strings(src["skipped_clip_id"]), read_strings(src["skipped_reason"])))
        index = writer.handle.create_group("index")
        write_strings(index, "clip_id", names)
        index.create_dataset("num_frames", data=np.asarray(frames, np.int32).reshape(-1))
        index.create_dataset("lmk_error", data=np.asarray(errors, np.float32).reshape(-1))
        skip = writer.handle.create_group("skipped")
        write_strings(skip, "clip_id", [n for n, _ in skipped])
        write_strings(skip, "reason", [r for _, r in skipped])
    total = int(sum(frames))
    mean_err = float(np.average(errors, weights=frames)) if frames else float("nan")
    return {"clips": len(names), "frames": total, "skipped": skipped, "flagged": flagged, "lmk_error": mean_err}


