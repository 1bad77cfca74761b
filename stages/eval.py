"""Stage ``eval``: generated vs reference artifacts -> protocol-stamped metrics (eval artifact).

check (kinds, metrics, clip pairs, frame counts) -> prepare (models, input hashes, parts store)
-> compute (per clip pair, batches of frame pairs on the device: image metrics, face analysis
(detector -> 5 points and 68 landmarks), identity embeddings; landmark-only face-model fits of the
analysed clips, batched across pairs, for AED/APD and the face region; each pair's part file
written as soon as the pair is finished, so an interrupted run resumes per pair) -> write (an
atomic eval artifact with per-frame values, per-clip and overall means, and the protocol).
The algorithms are in :mod:`avatarcli.evaluation`; this module orchestrates them.

Metrics (values per frame pair; a frame where a metric cannot be computed is *excluded* with a
reason, never scored 0):

* ``psnr``, ``ssim`` (:mod:`avatarcli.metrics.image`), on the frame or on the face region (the
  reference fit's face-region triangles rasterized at the evaluated resolution);
* ``lpips`` (AlexNet, v0.1; :mod:`avatarcli.metrics.lpips`);
* ``csim``: cosine of ArcFace-family embeddings of 5-point aligned 112² crops; same-id: generated
  frame t vs reference frame t; cross-id: generated frame t vs the source clip's frame ``source_frame``;
* ``akd``: mean Euclidean distance of the 68 landmarks (px at the evaluated resolution);
* ``aed``: mean absolute difference of the expression coefficients;
* ``apd``: mean absolute difference of the pose: (pitch, yaw, roll) in radians, and with
  ``angles+translation`` also (tx, ty, tz) in decimetres (Deep3DFaceRecon's unit), over 3 or 6 values.

Inputs may be clips artifacts (frames) or coeffs artifacts (fits: only aed/apd). Frames are
paired by clip (same clip id, or ``--pairs``) and index, except in clips made by ``avatar render``:
their frame t is compared with reference frame ``driving_frame[t]``, and by id they pair with their
``driving_clip`` (cross-id: CSIM against their ``source_clip``); a reference of another size is resized
to the generated size (antialiased bilinear) and the protocol says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarcli.errors import AvatarError
from avatarcli.evaluation.plan import (
    COEFF_METRICS, FACE_METRICS, IMAGE_METRICS, NO_FIT, PairPlan, check_coefficient_models, choose_metrics,
    open_side, plan_pairs, read_pairs_file, resolve_csim_model,
)
from avatarcli.fit.config import FitConfig
from avatarcli.schemas import CLIPS, COEFFS, EVAL
from avatarcli.stage import (
    InputSpec, PartsStore, Stage, StageConfig, StageSpec, Summary, existing_output_matches, option, result_hash, setting,
    unit_key,
)

READS = (CLIPS.kind, COEFFS.kind)
WRITES = EVAL.kind
PART_VERSION = 3  # 2: a PartsStore (stamp.json), a clip pair's part written as soon as it is finished;
# 3: parts also hold the landmark fits' inputs (a resumed run refits finished pairs' clips beside the others)


def parse_metrics(text: str) -> tuple[str, ...]:
    """'psnr, ssim' -> ('psnr', 'ssim') (the --metrics comma list)."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


@dataclass
class EvalConfig(StageConfig):
    """Settings of ``avatar eval``. Options change the result; settings do not."""

    metrics: tuple[str, ...] = option((), parse=parse_metrics, show=",".join,
                                      help="Comma list of psnr,ssim,lpips,csim,akd,aed,apd; default: every one "
                                           "the inputs and the local models allow.")
    mode: str = option("same-id", choices=("same-id", "cross-id"),
                       help="same-id (CSIM vs the reference frame) or cross-id (vs --source).")
    region: str = option("frame", choices=("frame", "face"),
                         help="frame, or face (psnr/ssim/lpips inside the reference's fitted face region; LPIPS "
                              "sets pixels outside it to black).")
    apd: str = option("angles+translation", choices=("angles", "angles+translation"),
                      help="APD convention: angles, or angles+translation.")
    csim_model: str = option("auto", help="Face-recognition model for CSIM (registry name), or auto: arcface_r50 "
                                          "when present, else the mobilefacenet_arcface stand-in.")
    detector: str = option("scrfd_2.5g", help="Face detector (registry name) giving the 5 points and boxes.")
    landmark_model: str = option("pfld68", aliases=("--landmarker",),
                                 help="68-point landmark model (registry name) for AKD and the landmark fits.")
    det_size: int = option(320, help="Detector input side (multiple of 32); frames are padded by --det-pad first.")
    det_pad: float = option(0.25, help="Border added around each frame before detection, as a fraction of its side "
                                       "(tight crops are otherwise missed).")
    det_threshold: float = option(0.5, help="Minimum detector score.")
    source_frame: int = option(0, help="cross-id: frame of each source clip used for CSIM.")
    face_model: str = option("ict", help="Face model of the landmark fits (aed/apd of clips, --region face): ict, "
                                         "bfm or a file.")
    fit_rigid_iters: int = option(FitConfig.rigid_iters,
                                  help="Gauss-Newton steps of the landmark fits' rigid stage (fit-3dmm's default).")
    fit_iters: int = option(FitConfig.iters,
                            help="Gauss-Newton steps of the landmark fits' shape stage (fit-3dmm's default).")
    fit_identity_weight: float = option(0.03, help="Identity prior weight of the landmark fits.")
    """Stronger than fit-3dmm's default: with the weak prior, 0.01 px of landmark noise moved the
    fitted depth by ~15 mm (depth and face size trade off on 2-D landmarks), which made APD depend
    on the device's rounding."""
    strict: bool = setting(False, help="Error on unpaired clips and mismatched frame counts.")
    batch_frames: int = setting(64, aliases=("--batch",), help="Frame pairs per device batch.")
    fit_batch_frames: int = setting(16384, help="Frames per landmark-fit batch (whole clips).")
    summary_file: str | None = setting(None, flag="--summary", help="Also write the summary to this .json or .csv file.")
    as_json: bool = setting(False, flag="--json", help="Print the summary JSON on stdout instead of the output path.")

    def check(self) -> None:
        """Settings a library caller may get wrong (the CLI checks the choices itself)."""
        for name, allowed in (("mode", ("same-id", "cross-id")), ("region", ("frame", "face")),
                              ("apd", ("angles", "angles+translation"))):
            if getattr(self, name) not in allowed:
                raise AvatarError(f"--{name} must be {' or '.join(allowed)}, not {getattr(self, name)!r}")
        if self.batch_frames < 1 or self.fit_batch_frames < 1 or self.det_size < 32 or self.det_size % 32:
            raise AvatarError("--batch-frames and --fit-batch-frames must be >= 1 and --det-size a multiple of 32")


class Eval(Stage):
    """Each clip pair is a unit: analysed (image and face metrics, landmarks), fitted (landmark fits
    streamed in batches across pairs, see :class:`~avatarcli.evaluation.coefficients.LandmarkFits`),
    given AED/APD and face-region metrics, and written to its part file as soon as all of that is done."""

    name, unit = "eval", "clip pair"
    cuda_events = True

    def __init__(self, config: EvalConfig, generated, reference, output, source=None, pairs=None, progress=None):
        super().__init__(config, Path(output), progress)
        self.paths = {"generated": generated, "reference": reference, "source": source, "pairs": pairs}
        self.store: PartsStore | None = None

    def check(self) -> None:
        config, paths = self.config, self.paths
        config.check()
        self.warnings: list[str] = []
        gen, ref = open_side(paths["generated"], "generated"), open_side(paths["reference"], "reference")
        src = open_side(paths["source"], "source") if paths["source"] is not None else None
        if src is not None and not src.has_frames:
            raise AvatarError(f"--source must be a clips artifact, {src.path} is a {src.kind!r} artifact")
        self.metrics, self.left_out = choose_metrics(config, gen, ref, self.warnings)
        listed = read_pairs_file(paths["pairs"]) if paths["pairs"] else None
        self.pairs = plan_pairs(config, gen, ref, src, listed, self.warnings)
        check_coefficient_models(config, self.metrics, gen, ref)
        if config.region == "face" and not ref.has_frames:
            raise AvatarError("--region face needs the reference frames (a clips artifact)")
        self.gen, self.ref, self.src = gen, ref, src
        self.size = gen.size if gen.has_frames else None
        coeff_metrics = any(m in COEFF_METRICS for m in self.metrics)
        self.second_pass = coeff_metrics or config.region == "face"
        """AED/APD or face-region metrics: a pair is finished only once its clips are fitted."""
        self.fitted_sides = ["gen"] if gen.has_frames and coeff_metrics else []
        self.fitted_sides += ["ref"] if ref.has_frames and self.second_pass else []
        """The sides whose clips get landmark fits ('gen', 'ref'); the fit of a pair's side is named
        '<side>:<unit key>'."""

    def prepare(self, ctx) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from avatarcli.provenance import sha256_file

        config, metrics, gen, ref, src = self.config, self.metrics, self.gen, self.ref, self.src
        sides = [side for side in (gen, ref, src) if side is not None]
        paths = list(dict.fromkeys(side.path.resolve() for side in sides))
        self.plan_models()
        with ThreadPoolExecutor(len(paths)) as hasher:
            hashing = hasher.map(sha256_file, paths)  # the inputs' content hashes are read while the models load
            with ctx.timer.step("load_models", sync=False):
                self.load_models(ctx, torch)
            with ctx.timer.step("hash_inputs", sync=False):
                hashes = dict(zip(paths, hashing))
        for side in sides:
            side.sha256 = hashes[side.path.resolve()]
        stamp = {"stage": self.name, "part_version": PART_VERSION, "result_hash": config.result_hash(),
                 "metrics": metrics, "pairs": [p.stamp() for p in self.pairs],
                 "inputs": [gen.sha256, ref.sha256, src.sha256 if src else ""]}
        self.stamp_hash = result_hash(stamp)
        existing_output_matches(self.output, EVAL.kind, self.stamp_hash, config.overwrite, key="stamp")
        self.keys = [unit_key(p.generated, p.reference, p.source) for p in self.pairs]
        self.store = PartsStore(self.output, stamp, suffix=".npz", overwrite=config.overwrite).__enter__()

    def plan_models(self) -> None:
        """Which networks the metrics need; every registry model among them is resolved now, so all
        missing ones are named in one error before any work."""
        from avatarcli import registry
        from avatarcli.facemodel import face_model_registry_names
        from avatarcli.metrics.lpips import LPIPS_NETS

        config, metrics = self.config, self.metrics
        self.need_faces = any(m in FACE_METRICS for m in metrics) or config.region == "face" or (
            any(m in COEFF_METRICS for m in metrics) and (self.gen.has_frames or self.ref.has_frames))
        self.csim_model = resolve_csim_model(config) if "csim" in metrics else ""
        names = [config.detector, config.landmark_model] if self.need_faces else []
        names += [self.csim_model] if self.need_faces and self.csim_model else []
        names += list(LPIPS_NETS["alex"][3:5]) if "lpips" in metrics else []
        names += face_model_registry_names(config.face_model) if self.fitted_sides else []
        registry.resolve_all(names, config.models_dir)

    def load_models(self, ctx, torch) -> None:
        """The face analysis, LPIPS and the face model of the fits, as far as the metrics need them
        (:meth:`plan_models` first)."""
        config, metrics = self.config, self.metrics
        self.faces = self.lpips_net = self.face_model = self.region_faces = None
        if self.need_faces:
            from avatarcli.evaluation.frames import load_face_analysis

            self.faces = load_face_analysis(config, ctx.device, self.csim_model)
        if "lpips" in metrics:
            from avatarcli.metrics.lpips import LPIPS

            self.lpips_net = LPIPS.from_registry(ctx.device, config.models_dir)
        if self.fitted_sides:
            from avatarcli.facemodel import load_face_model

            self.face_model = load_face_model(config.face_model, config.models_dir).to(ctx.device, torch.float32)
            if config.region == "face":
                self.region_faces = self.face_model.face_region_faces().to(ctx.device)

    def compute(self, ctx) -> None:
        from avatarcli.evaluation.coefficients import LandmarkFits
        from avatarcli.evaluation.frames import evaluate_frames

        config, metrics = self.config, self.metrics
        todo = [(plan, key) for plan, key in zip(self.pairs, self.keys) if not self.store.done(key)]
        self.units_now, self.frames_now = len(todo), sum(plan.frames for plan, _ in todo)
        ctx.progress.start(total_units=len(self.pairs), done_units=len(self.pairs) - len(todo))
        fits = None
        if self.fitted_sides and todo:
            fit_config = FitConfig(landmarks_only=True, rigid_iters=config.fit_rigid_iters, iters=config.fit_iters,
                                   w_identity=config.fit_identity_weight)
            fits = LandmarkFits(self.face_model, self.size, fit_config, config.fit_batch_frames, ctx.device, ctx.timer)
        first_pass = [m for m in metrics if not (config.region == "face" and m in IMAGE_METRICS)]
        waiting: list[tuple] = []  # analysed pairs whose fits are not all done yet, in order
        unfinished = {key for _, key in todo}
        for plan, key in zip(self.pairs, self.keys):
            if key not in unfinished:
                if fits is not None:  # its clips keep their places in the fit batches
                    self.add_finished_fits(fits, key)
                continue
            result = evaluate_frames(plan, config, first_pass, self.gen, self.ref, self.src, self.size, self.faces,
                                     self.lpips_net, ctx.device, ctx.timer)
            for m in metrics:  # filled in the second pass
                result["values"].setdefault(m, np.full(plan.frames, np.nan))
                result["excluded"].setdefault(m, np.zeros(plan.frames, np.uint8))
            if fits is not None:
                for side in self.fitted_sides:
                    fits.add(f"{side}:{key}", result[f"{side}_lmk"], result[f"{side}_found"])
            waiting.append((plan, key, result))
            while waiting and (fits is None or all(fits.ready(f"{side}:{waiting[0][1]}") for side in self.fitted_sides)):
                self.finish(ctx, *waiting.pop(0), fits)
        if fits is not None:
            fits.flush()
        for entry in waiting:
            self.finish(ctx, *entry, fits)

    def add_finished_fits(self, fits, key: str) -> None:
        """A finished pair's clips, from its part, to the fit batches (refitted only where they share
        a batch with unfinished pairs' clips; their results are dropped, the part stays as it is)."""
        from avatarcli.evaluation.artifact import read_fit_inputs

        for side in self.fitted_sides:
            fits.add(f"{side}:{key}", *read_fit_inputs(self.store.path(key), side), wanted=False)

    def finish(self, ctx, plan: PairPlan, key: str, result: dict, fits) -> None:
        """The second pass of a clip pair (AED/APD, face-region image metrics), then its part file."""
        from avatarcli.evaluation.artifact import write_part

        if self.second_pass:
            self.fitted_metrics(ctx, plan, key, result, fits)
        with ctx.timer.step("write_part", plan.frames, sync=False):
            with self.store.writing(key) as tmp:
                write_part(tmp, result, self.metrics, self.fitted_sides)
        ctx.progress.advance_frames(plan.frames)
        ctx.progress.unit_done(plan.generated, "ok", "")

    def fitted_metrics(self, ctx, plan: PairPlan, key: str, result: dict, fits) -> None:
        """AED/APD and the face-region image metrics of a clip pair whose clips are fitted, into ``result``."""
        from avatarcli.evaluation.coefficients import coefficient_metrics, read_coeffs
        from avatarcli.evaluation.frames import evaluate_frames

        config, metrics, gen, ref = self.config, self.metrics, self.gen, self.ref
        fitted = {side: fits.pop(f"{side}:{key}") for side in self.fitted_sides}
        ref_fit = fitted.get("ref") if ref.has_frames else read_coeffs(ref.path, plan.reference, plan.frames,
                                                                        plan.reference_frames)
        gen_fit = fitted.get("gen") if gen.has_frames else read_coeffs(gen.path, plan.generated, plan.frames)
        if any(m in COEFF_METRICS for m in metrics):
            with ctx.timer.step("aed_apd", plan.frames, sync=False):
                coefficient_metrics(result, metrics, config.apd, gen, ref, gen_fit, ref_fit)
        if config.region != "face":
            return
        image_metrics = [m for m in metrics if m in IMAGE_METRICS]
        if ref_fit is None:  # no face region without a fit of the reference: nothing to score
            for m in image_metrics:
                result["values"][m][:], result["excluded"][m][:] = np.nan, NO_FIT
            return
        again = evaluate_frames(plan, config, image_metrics, gen, ref, self.src, self.size, None, self.lpips_net,
                                ctx.device, ctx.timer, masks=(self.face_model, self.region_faces, ref_fit))
        for m in image_metrics:
            result["values"][m], result["excluded"][m] = again["values"][m], again["excluded"][m]

    def write(self, ctx) -> Summary:
        from avatarcli.evaluation.artifact import non_finite_warnings, write_eval_artifact
        from avatarcli.evaluation.protocol import build_protocol
        from avatarcli.metrics.report import write_summary_file

        config, gen, ref, src, pairs = self.config, self.gen, self.ref, self.src, self.pairs
        with ctx.timer.step("write", sync=False):
            self.warnings += non_finite_warnings(pairs, self.store.in_order(self.keys), self.metrics)
            protocol = build_protocol(config, self.metrics, gen, ref, self.size, self.faces, self.csim_model)
            parents = [(str(side.path.resolve()), side.sha256) for side in (gen, ref, src) if side is not None]
            config_json = {**config.to_json(), "stamp": self.stamp_hash, "kind": EVAL.kind, "metrics": self.metrics}
            head = {"generated": str(gen.path), "reference": str(ref.path), "source": str(src.path) if src else None,
                    "mode": config.mode, "left_out": self.left_out, "warnings": self.warnings}
            summary = write_eval_artifact(self.output, pairs, self.store.in_order(self.keys), self.metrics, protocol,
                                          config_json, parents, head)
        if not config.keep_parts:
            self.store.remove()
        if config.summary_file:
            write_summary_file(config.summary_file, summary)
        return Summary(self.name, self.output, self.unit, len(pairs), summary["frames"], units_now=self.units_now,
                       reused=len(pairs) - self.units_now, frames_now=self.frames_now, seconds=ctx.elapsed(),
                       warnings=list(self.warnings), timings=ctx.timer.as_dict(), device=ctx.device_name,
                       columns={"mode": config.mode, "metrics": len(self.metrics)}, details=summary)

    def run(self) -> Summary:
        try:
            return super().run()
        finally:  # release the parts folder's lock also when a phase failed
            if self.store is not None:
                self.store.__exit__(None, None, None)


def run(config: EvalConfig, generated: str | Path, reference: str | Path, output: str | Path,
        source: str | Path | None = None, pairs: str | Path | None = None, progress=None) -> Summary:
    """Evaluate ``generated`` against ``reference`` (clips or coeffs artifacts); write an eval artifact
    to ``output``. ``source``: cross-id source clips; ``pairs``: a CSV of clip pairs. The eval summary
    (metrics with protocol, per-clip means, warnings) is ``Summary.details``."""
    return Eval(config, generated, reference, output, source, pairs, progress).run()


def report(summary: Summary, config: EvalConfig) -> bool:
    """The metrics table (stderr); with --json the summary on stdout instead of the output path."""
    import json

    import typer

    from avatarcli.cli.common import err
    from avatarcli.metrics.report import summary_table

    err.print(summary_table(summary.details))
    if config.as_json:
        typer.echo(json.dumps(summary.details, indent=2, sort_keys=True))
        return True
    return False


STAGE = StageSpec(
    name="eval",
    summary="Metrics (psnr, ssim, lpips, csim, akd, aed, apd) with their protocol.  e.g. avatar eval gen.h5 "
            "--reference ref.h5",
    help=("Compare a generated artifact with a reference artifact, frame by frame (paired by clip id or --pairs, "
          "then by index): psnr, ssim, lpips, csim (ArcFace-family cosine on 5-point aligned 112² crops), akd "
          "(68 landmarks, px), aed and apd (L1 over face-model expression and pose coefficients; clips are fitted "
          "with fit-3dmm's landmark fit, coeffs artifacts are used as they are). Every number comes with its "
          "protocol: model names and sha256, alignment, resolution, region, distance, frames used and excluded. "
          "Frames without a detectable face are excluded (and counted), never scored 0. Writes an eval artifact; "
          "the summary goes to stderr as a table, to --summary FILE (.json or .csv) and, with --json, to stdout. "
          "An interrupted run resumes per clip pair. '-' reads the generated artifact's path from stdin."),
    epilog=("Example: avatar preprocess videos/ -o clips.h5 | avatar eval - --reference ref.h5 "
            "--metrics csim,aed,apd,akd,psnr,ssim -o eval.h5"),
    config=EvalConfig,
    run=run,
    inputs=(
        InputSpec("generated", "generated artifact (clips or coeffs), or '-' to read its path from stdin.", stdin=True),
        InputSpec("reference", "reference artifact: driving or ground-truth frames (clips) or fits (coeffs).",
                  flag="--reference", short="-r", stdin=True),
        InputSpec("source", "cross-id: clips artifact with the source clips CSIM compares with.", flag="--source",
                  required=False),
        InputSpec("pairs", "CSV of generated,reference[,source] clip ids (instead of pairing by id).",
                  flag="--pairs", required=False),
    ),
    unit="clip pair",
    output_default="eval.h5",
    report=report,
    order=40,
)
