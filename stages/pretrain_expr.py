"""Stage ``pretrain-expr``: frames + expression coefficients -> a CLeBS expression encoder.

check (settings) -> prepare (load every clip's frames at the training size and its β; the groups of
1 + negatives frames per clip; a missing input fails here, before training) -> compute (the shared
training engine, ``avatarcli.train.engine``, on the task ``avatarcli.train.tasks.clebs.ClebsTask``:
checkpoints in ``<output>.run/``, resumed by rerunning the same command; this is the stage's resume
scheme, not a parts store) -> write (rank 0: the encoder artifact with the probe scores, optionally
the per-frame embeddings and a PNG of β and β′; other DDP ranks return None).

The model, loss and basis editing are in ``avatarcli.train.clebs``, the data in
``avatarcli.train.clebs_data``, the probes in ``avatarcli.train.probes``. Torch is imported inside
the phases (``avatar --help`` loads this module).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from avatarcli.artifact import ArtifactWriter, write_strings
from avatarcli.cli.common import TrainProgressDisplay
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file
from avatarcli.schemas import CLIPS, ENCODER, EXPR_EMBEDDINGS
from avatarcli.stage import InputSpec, Stage, StageConfig, StageSpec, Summary, option, setting
from avatarcli.stage.config import field_meta
from avatarcli.train.engine_config import EngineConfig

READS = (CLIPS.kind, "coeffs")
WRITES = ENCODER.kind
STAGE_OWNED_ENGINE_FIELDS = ("run_dir", "seed", "device")
"""Engine settings the stage sets from its own (``--run-dir``, ``--seed``, ``--device``)."""
SIZES = {"cuda": {"width": 64, "image_size": 112, "negatives": 32, "batch_clips": 32},
         "cpu": {"width": 16, "image_size": 64, "negatives": 15, "batch_clips": 16}}
"""Sizes of the fields left at None, by device: Export3D §3.1 on CUDA; on the CPU, measured with
``examples/benchmarks/bench_train_engine.py --device cpu`` (2 cores, fp32): ~0.45 s a step, where
CUDA's sizes take ~30 s (width 64 alone at 64², batch 8 × 16: 2.6 s)."""


@dataclass
class PretrainExprConfig(StageConfig):
    """Settings of ``avatar pretrain-expr`` (Export3D §3.1 defaults). The model, data and loss
    settings are checked on resume; ``engine`` holds the training-loop settings (its ``run_dir``,
    ``seed`` and ``device`` come from this config's fields of those names)."""

    latent_dim: int = option(256, help="d: dimension of β′.")
    """d: dimension of β′ and of the image embedding."""
    basis_size: int = option(10, help="n: learned basis vectors.")
    """n: learned basis vectors (coefficients λ per frame)."""
    hidden: int = option(256, help="Hidden width of the expression encoder.")
    """Hidden width of the expression encoder's two linear layers."""
    width: int | None = option(None, help="Base width of ResNetSE18 (64 = ResNet-18). (default: 64 on CUDA, 16 on CPU)")
    """Base width of the ResNetSE18 image encoder (64 = ResNet-18); None: by device (:data:`SIZES`)."""
    norm: str = option("batch", choices=("batch", "group"), help="ResNetSE18 normalisation: batch or group.")
    """Normalisation in ResNetSE18: 'batch', or 'group' (independent of how DDP splits the batch)."""
    image_size: int | None = option(None, help="Side the face crops are downscaled to. "
                                            "(default: 112 on CUDA, 64 on CPU)")
    """Side the 256² face crops are downscaled to for the image encoder; None: by device."""
    negatives: int | None = option(None, help="Negatives per frame, from the same clip. "
                                           "(default: 32 on CUDA, 15 on CPU)")
    """Negatives per positive: each group is 1 + negatives distinct frames of one clip; None: by device."""
    negatives_from: str = option("pose", choices=("pose", "random"), help=(
        "Group frames: pose (anchor + nearest in head pose) or random (any frames of the clip, as published)."))
    """Which frames of the clip a group takes: 'pose', a random anchor and the frames nearest to it in
    head pose, so neither appearance nor pose can tell them apart (fitted β leaks pose); 'random',
    any frames of the clip (Export3D as published)."""
    batch_clips: int | None = option(None, help="Groups per step (all processes); a group is 1 + negatives frames of "
                                                "one clip. (default: 32 on CUDA, 16 on CPU)")
    """Groups per step over all processes (each from a clip drawn in proportion to its length); None: by device."""
    temperature: float = option(0.07, help="InfoNCE temperature τ.")
    """τ of the InfoNCE loss."""
    beta_noise: float = option(0.3, help="Training noise on β, in stds of each coefficient (0 = off, as published).")
    """Std of Gaussian noise added to β in training, in units of each coefficient's std over the data
    (0 = off, as published). Nearby β must then map to nearby β′, so f_e cannot memorise a small
    corpus by separating frames on tiny (fitting-noise) differences of β. StyleTalk, 4000 steps:
    landmark-expression R² of β′ 0.50 with 0.3, 0.06 without (identity at chance in both)."""
    lr: float = option(1e-4, help="Adam learning rate.")
    """Adam learning rate."""
    warmup_steps: int = option(0, help="Linear learning-rate warmup steps.")
    """Linear learning-rate warmup over this many steps (0 = constant)."""
    identity_from: str = option("stem", help=".mat inputs: identity from parent, stem or regex:PATTERN of the video path.")
    """Identity of each .mat input (for the probes and the plot): 'parent', 'stem' or 'regex:PATTERN'
    on the video path; clips artifacts carry their own identities."""
    seed: int = option(0, help="Seed of the initial weights and of every batch.")
    """Seeds model initialisation and every batch (the engine's ``seed``)."""
    engine: EngineConfig = setting(default_factory=EngineConfig)
    """The training loop: steps, precision, compile, clipping, EMA, checkpoints, ... (its result-changing
    fields are hashed by :meth:`result_fields`)."""
    run_dir: str | None = setting(None, help="Checkpoints and logs (default <output>.run).")
    """The engine's run folder (None or '' = ``<output>.run``)."""
    export_embeddings: str | None = setting(None, help="Also write β, λ, β′ per frame to this artifact.")
    """Also write β, λ and β′ of every frame to this expr_embeddings artifact."""
    plot: str = setting("", help="PNG of the β and β′ embeddings ('' = <output stem>.embedding.png, 'none').")
    """PNG of the 2-D PCA of β and β′ coloured by identity ('' = ``<output stem>.embedding.png``,
    'none' = no plot)."""
    probes: bool = option(True, help="Score identity leak and expression retention.")
    """Score identity leak and expression retention on held-out frames (stored in the artifact)."""

    def sized_for(self, cuda: bool, world_size: int = 1) -> "PretrainExprConfig":
        """This config with the sizes left at None (:data:`SIZES`) set for the device: Export3D's on
        CUDA, a step of ≲1 s on 2 CPU cores otherwise (the batch rounded up to a multiple of
        ``world_size``)."""
        sizes = SIZES["cuda" if cuda else "cpu"]
        chosen = {name: value for name, value in sizes.items() if getattr(self, name) is None}
        if "batch_clips" in chosen:
            chosen["batch_clips"] = -(-chosen["batch_clips"] // world_size) * world_size
        return replace(self, **chosen)

    def auto_sized(self) -> list[str]:
        """The size fields left to the device (None)."""
        return [name for name in SIZES["cuda"] if getattr(self, name) is None]

    def shape(self, expr_dim: int):
        """The :class:`avatarcli.train.clebs.ClebsShape` of these settings for β of ``expr_dim``
        (a width left at None: CUDA's, as published)."""
        from avatarcli.train.clebs import ClebsShape

        width = SIZES["cuda"]["width"] if self.width is None else self.width
        return ClebsShape(expr_dim=expr_dim, latent_dim=self.latent_dim, basis_size=self.basis_size,
                          hidden=self.hidden, width=width, norm=self.norm)

    def result_fields(self) -> dict:
        """The result options of this config and of its engine (``engine`` itself is a setting)."""
        engine = {f.name: getattr(self.engine, f.name) for f in dataclasses.fields(self.engine)
                  if field_meta(f)["result"] and f.name not in STAGE_OWNED_ENGINE_FIELDS}
        return {**super().result_fields(), "engine": engine}

    def engine_for(self, output: Path) -> EngineConfig:
        """The engine settings of a run writing ``output``: run folder, seed and device from this config."""
        return replace(self.engine, run_dir=self.run_dir or str(output) + ".run", seed=self.seed, device=self.device)


def _check(config: PretrainExprConfig, world_size: int) -> None:
    """The settings given; sizes left at None are checked once resolved (:meth:`PretrainExprConfig.sized_for`)."""
    if config.negatives is not None and config.negatives < 1:
        raise AvatarError("--negatives must be at least 1")
    if config.beta_noise < 0:
        raise AvatarError("--beta-noise must be >= 0")
    if config.batch_clips is not None and (config.batch_clips < 1 or config.batch_clips % world_size):
        raise AvatarError(f"--batch-clips ({config.batch_clips}) must be a positive multiple of the number of "
                          f"processes ({world_size})")
    if config.basis_size > config.latent_dim:
        raise AvatarError(f"--basis-size ({config.basis_size}) cannot exceed --latent-dim ({config.latent_dim})")
    if config.norm not in ("batch", "group"):
        raise AvatarError(f"--norm must be batch or group, not {config.norm!r}")
    if config.negatives_from not in ("pose", "random"):
        raise AvatarError(f"--negatives-from must be pose or random, not {config.negatives_from!r}")
    if config.image_size is not None and config.image_size < 32:
        raise AvatarError("--image-size must be at least 32")
    defaults = EngineConfig()
    moved = [name for name in STAGE_OWNED_ENGINE_FIELDS
             if getattr(config.engine, name) not in (getattr(defaults, name), "")]
    if moved:  # they would be silently replaced by the stage's own
        raise AvatarError(f"set {', '.join(moved)} on PretrainExprConfig, not on its engine")


def embed_all(model, data) -> tuple[np.ndarray, np.ndarray]:
    """(λ [F,n], β′ [F,d]) of every frame of every clip, in clip order, fp32 on the CPU."""
    import torch

    with torch.no_grad():
        encoder = model.expression_encoder.float().cpu().eval()
        beta = torch.from_numpy(np.concatenate([c.beta for c in data.clips]))
        lam = torch.cat([encoder.coefficients(chunk) for chunk in beta.split(65536)])
        return lam.numpy(), (lam @ encoder.basis().T).numpy()


class PretrainExpr(Stage):
    """Train (or resume) the CLeBS encoder; rank 0 writes the artifacts."""

    name = "pretrain-expr"
    unit = "clip"

    def __init__(self, config: PretrainExprConfig, inputs: list[str], output: str | Path,
                 coeffs: list[str] | None = None, progress=None):
        super().__init__(config, Path(output), progress)
        self.inputs = list(inputs)
        self.coeffs = list(coeffs or [])
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))

    def check(self) -> None:
        _check(self.config, self.world_size)
        if not self.inputs:
            raise AvatarError("no inputs given")

    def prepare(self, ctx) -> None:
        from avatarcli.train.clebs_data import ClipBank, load_expression_data
        from avatarcli.train.tasks.clebs import ClebsTask

        self.config = config = self.sized(ctx)
        self.engine = config.engine_for(self.output)
        with ctx.timer.step("load", sync=False):
            self.data = load_expression_data(self.inputs, self.coeffs, config.image_size, config.identity_from)
        bank_device = "cpu"
        if ctx.cuda:
            # every frame on the GPU (uint8): gathering a batch is one indexing kernel, no loader
            bank_device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if self.world_size > 1 else str(ctx.device)
        self.bank = ClipBank(self.data, config.negatives + 1, bank_device, config.negatives_from)
        # the task reads seed, grad_clip and ema_decay from the engine it is given (its fingerprint)
        self.task = ClebsTask(replace(config, engine=self.engine), self.bank, self.data)

    def sized(self, ctx) -> PretrainExprConfig:
        """The config with the sizes left to the device set (recorded in the artifact and the
        checkpoints' fingerprint, so a resumed run and the result hash see the values used); on a
        CPU one stderr line says which."""
        config = self.config.sized_for(ctx.cuda, self.world_size)
        auto = self.config.auto_sized()
        if auto and not ctx.cuda and int(os.environ.get("RANK", "0")) == 0:
            from avatarcli.cli.common import err

            def flags(values) -> str:
                return " ".join(f"--{name.replace('_', '-')} {values[name]}" for name in auto)

            err.print(f"pretrain-expr: on the CPU, so CPU-sized {flags(vars(config))} (on CUDA: "
                      f"{flags(SIZES['cuda'])}); give these options to override", soft_wrap=True, markup=False)
        _check(config, self.world_size)
        return config

    def compute(self, ctx) -> None:
        from avatarcli.train.engine import train_in_stage

        self.result = train_in_stage(ctx, self.engine, self.task)

    def write(self, ctx) -> Summary | None:
        if self.result.rank != 0:
            return None
        config, data, result = self.config, self.data, self.result
        model = self.task.trained_model(result.models)
        beta = np.concatenate([c.beta for c in data.clips])
        identity_names = sorted({c.identity for c in data.clips})
        labels = np.concatenate([np.full(len(c.beta), identity_names.index(c.identity)) for c in data.clips])
        with ctx.timer.step("embed", sync=False):
            lam, beta_prime = embed_all(model, data)
        probes = None
        if config.probes:
            from avatarcli.train.probes import run_probes

            lmk = np.concatenate([c.lmk68 for c in data.clips]) if all(c.lmk68 is not None for c in data.clips) else None
            pose = np.concatenate([c.pose for c in data.clips]) if all(c.pose is not None for c in data.clips) else None
            with ctx.timer.step("probes", sync=False):
                probes = run_probes(beta, beta_prime, [len(c.beta) for c in data.clips], labels, lmk,
                                    config.basis_size, pose)
        config_json = {**config.to_json(), "engine": asdict(self.engine)}
        with ctx.timer.step("write", sync=False):
            write_encoder(self.output, config_json, config.image_size, data, self.task, result, probes)
            embeddings = plot = None
            if config.export_embeddings:
                embeddings = write_embeddings(Path(config.export_embeddings), data, beta, lam, beta_prime, self.output)
            if config.plot != "none":
                from avatarcli.train.plots import embedding_plot

                plot = Path(config.plot) if config.plot else self.output.with_name(self.output.stem + ".embedding.png")
                plot = embedding_plot(plot, [("beta: raw expression", beta), ("beta prime: CLeBS", beta_prime)],
                                      labels, identity_names, seed=self.engine.seed)
        return self.summary(ctx, probes, embeddings, plot)

    def summary(self, ctx, probes, embeddings: Path | None, plot: Path | None) -> Summary:
        config, data, result = self.config, self.data, self.result
        history = result.history
        loss = history["loss"][-1] if history["loss"] else float("nan")
        accuracy = history["accuracy"][-1] if history.get("accuracy") else float("nan")
        run_now = result.step - result.start_step
        return Summary(
            self.name, self.output, self.unit, len(data.clips), data.num_frames, units_now=len(data.clips),
            # frames/s: training images per second (every step sees batch_clips groups of 1 + negatives)
            frames_now=run_now * config.batch_clips * (config.negatives + 1), seconds=ctx.elapsed(),
            skipped=data.skipped + self.bank.too_short, timings=ctx.timer.as_dict(), device=ctx.device_name,
            columns={"identities": len({c.identity for c in data.clips}), "steps": result.step, "run now": run_now,
                     "skipped steps": result.skipped_steps, "steps/s": f"{result.steps_per_second:.2f}",
                     "loss": f"{loss:.4f}", "match acc": f"{accuracy:.3f}"},
            details={"steps": result.step, "start_step": result.start_step, "skipped_steps": result.skipped_steps,
                     "steps_per_second": result.steps_per_second, "loss": loss, "accuracy": accuracy,
                     "world_size": result.world_size, "precision": result.precision,
                     "checkpoint": result.checkpoint,
                     # (metric, on β, on β′, doc) rows, as in the artifact's probe group
                     "probes": probes.rows() if probes else None,
                     "embeddings": str(embeddings) if embeddings else None, "plot": str(plot) if plot else None},
        )


def write_encoder(output: Path, config_json: dict, image_size: int, data, task, result, probes) -> Path:
    """The encoder artifact: weights, basis, β normalisation, training curve, probe scores."""
    from avatarcli.train.checkpoint import fingerprint_hash
    from avatarcli.train.clebs import flatten_state

    model = task.trained_model(result.models)
    weights = flatten_state({k: v for k, v in model.state_dict().items()})
    nan = float("nan")
    attrs = {
        "encoder_type": "clebs",
        "shape_json": json.dumps(asdict(task.shape)),
        "expr_dim": task.shape.expr_dim,
        "latent_dim": task.shape.latent_dim,
        "basis_size": task.shape.basis_size,
        "image_size": image_size,
        "steps": result.step,
        "skipped_steps": result.skipped_steps,
        "world_size": result.world_size,
        "precision": result.precision,
        "input_kind": data.input_kind,
        "fingerprint": fingerprint_hash(task.fingerprint()),
        "probe_identity_chance": probes.chance if probes else nan,
        "probe_identity_acc_beta": probes.identity_beta if probes else nan,
        "probe_identity_acc_beta_prime": probes.identity_beta_prime if probes else nan,
        "probe_identity_acc_beta_pca": probes.identity_beta_pca if probes else nan,
        "probe_expression_r2_beta": probes.expression_beta if probes else nan,
        "probe_expression_r2_beta_prime": probes.expression_beta_prime if probes else nan,
        "probe_beta_retention_r2_beta_prime": probes.beta_retention_beta_prime if probes else nan,
        "probe_pose_r2_beta": probes.pose_beta if probes else nan,
        "probe_pose_r2_beta_prime": probes.pose_beta_prime if probes else nan,
        "probe_identities": probes.identities if probes else 0,
    }
    history = result.history
    rows = probes.rows() if probes else []
    with ArtifactWriter(output, ENCODER, config_json, data.parents, attrs) as writer:
        h = writer.handle
        group = h.create_group("weights")
        for key in ("name", "shape_json", "dtype"):
            write_strings(group, key, weights[key])
        group.create_dataset("offset", data=weights["offset"])
        group.create_dataset("flat", data=weights["flat"])
        h.create_dataset("basis", data=model.expression_encoder.basis().detach().float().cpu().numpy())
        h.create_dataset("beta_mean", data=task.beta_mean.numpy().astype(np.float32))
        h.create_dataset("beta_std", data=task.beta_std.numpy().astype(np.float32))
        training = h.create_group("training")
        training.create_dataset("step", data=np.asarray(history["step"], np.int64))
        training.create_dataset("loss", data=np.asarray(history["loss"], np.float32))
        training.create_dataset("accuracy", data=np.asarray(history.get("accuracy", [nan] * len(history["step"])), np.float32))
        write_strings(training, "clip_id", [c.clip_id for c in data.clips])
        write_strings(training, "identity", [c.identity for c in data.clips])
        training.create_dataset("num_frames", data=np.asarray([len(c.beta) for c in data.clips], np.int32))
        probe = h.create_group("probe")
        write_strings(probe, "metric", [r[0] for r in rows])
        probe.create_dataset("beta", data=np.asarray([r[1] for r in rows], np.float64))
        probe.create_dataset("beta_prime", data=np.asarray([r[2] for r in rows], np.float64))
        write_strings(probe, "doc", [r[3] for r in rows])
    return output


def write_embeddings(path: Path, data, beta: np.ndarray, lam: np.ndarray, beta_prime: np.ndarray,
                     encoder_path: Path) -> Path:
    """β [F,K], λ [F,n] and β′ [F,d] of every frame, per clip, with the encoder as parent."""
    attrs = {"encoder_path": str(encoder_path.absolute()), "encoder_sha256": sha256_file(encoder_path)}
    parents = [(str(encoder_path.absolute()), attrs["encoder_sha256"])] + data.parents
    with ArtifactWriter(path, EXPR_EMBEDDINGS, {"encoder": str(encoder_path)}, parents, attrs) as writer:
        h = writer.handle
        index = h.create_group("index")
        write_strings(index, "clip_id", [c.clip_id for c in data.clips])
        write_strings(index, "identity", [c.identity for c in data.clips])
        index.create_dataset("num_frames", data=np.asarray([len(c.beta) for c in data.clips], np.int32))
        clips = h.create_group("clips")
        start = 0
        for clip in data.clips:
            stop = start + len(clip.beta)
            group = clips.create_group(clip.clip_id)
            group.attrs["clip_id"] = clip.clip_id
            group.attrs["identity"] = clip.identity
            group.create_dataset("beta", data=beta[start:stop].astype(np.float32))
            group.create_dataset("lambda", data=lam[start:stop].astype(np.float32))
            group.create_dataset("beta_prime", data=beta_prime[start:stop].astype(np.float32))
            start = stop
    return path



def run(config: PretrainExprConfig, inputs: list[str], output: str | Path, coeffs: list[str] | None = None,
        progress=None) -> Summary | None:
    """Train (or resume) and, on rank 0, write the encoder artifact; None on other DDP ranks.
    ``coeffs``: the coeffs artifact or Deep3DFaceRecon .mat files/folders that go with a clips
    artifact input; ``progress``: an ``avatarcli.train.task.TrainProgress`` (or None)."""
    return PretrainExpr(config, inputs, output, coeffs, progress).run()


def report(summary: Summary, config: PretrainExprConfig) -> bool:
    """The probe scores (held-out frames), the plot and embeddings paths, on stderr."""
    from rich.table import Table

    from avatarcli.cli.common import err

    rows = summary.details.get("probes")
    if rows:
        table = Table(title="probes (held-out frames)", header_style="bold")
        for column in ("score", "β", "β′"):
            table.add_column(column, justify="right" if column != "score" else "left", overflow="fold")
        for name, on_beta, on_prime, _ in rows:
            table.add_row(name, f"{on_beta:.3f}", f"{on_prime:.3f}")
        err.print(table)
    if summary.details.get("plot"):
        err.print(f"embedding plot: {summary.details['plot']}", soft_wrap=True, markup=False)
    if summary.details.get("embeddings"):
        err.print(f"embeddings: {summary.details['embeddings']}", soft_wrap=True, markup=False)
    return False


STAGE = StageSpec(
    name="pretrain-expr",
    summary=("Train the CLeBS expression encoder (β -> appearance-free β′).  "
             "e.g. avatar pretrain-expr clips.h5 --coeffs coeffs.h5 -o encoder.h5"),
    help=(
        "Contrastively pretrain a learned-basis expression encoder (CLeBS, Export3D §3.1): an image encoder "
        "(ResNetSE18) and an expression encoder (β -> n coefficients λ on an orthonormal basis V, β′ = V λ) are "
        "trained with InfoNCE so that each frame picks its own β among --negatives other frames of the same clip; "
        "appearance, constant within a clip, cannot help, so β′ keeps the expression and drops the person. "
        "Inputs: a clips artifact with --coeffs (its coeffs artifact from fit-3dmm, or folders of Deep3DFaceRecon "
        ".mat files matched to clips by source video name), or Deep3DFaceRecon .mat files/folders whose face-crop "
        "videos sit in ../video/ or beside them. Checkpoints go to <output>.run/ (every --checkpoint-every steps, "
        "on Ctrl-C/SIGTERM and at the end); rerunning the same command resumes the latest one. Under torchrun "
        "every process trains a share of each batch (DDP). Writes an encoder artifact with the weights, the basis, "
        "the training curve and probe scores (identity leak and expression retention of β and β′ on held-out "
        "frames), a PNG of both embeddings, and with --export-embeddings the β′ of every frame. "
        "'-' reads the input path from stdin."
    ),
    epilog=("Example: avatar preprocess videos/ -o clips.h5 | avatar fit-3dmm - -o coeffs.h5 && "
            "avatar pretrain-expr clips.h5 --coeffs coeffs.h5 -o encoder.h5 | avatar info -"),
    config=PretrainExprConfig,
    run=run,
    inputs=(InputSpec("inputs", "A clips artifact, or Deep3DFaceRecon .mat files/folders, or '-'.", many=True,
                      stdin=True),
            InputSpec("coeffs", "With a clips artifact: its coeffs artifact, or Deep3DFaceRecon .mat files/folders "
                      "(repeatable).", flag="--coeffs", many=True, required=False)),
    unit="clip",
    report=report,
    common=("device",),
    order=30,
    progress=TrainProgressDisplay,
)
