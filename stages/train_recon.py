"""Stage ``train-recon``: clips + coeffs (+ CLeBS encoder) -> an Export3D tri-plane generator.

check (settings) -> prepare (load the training frames, β and generator-world cameras with
``avatarcli.export3d.data.load_recon_data``: identity choice, held-out identities and frames; the
frozen CLeBS encoder; the losses, saying which are active) -> compute (the shared training engine on
``avatarcli.export3d.task.Export3DTask``: checkpoints in ``<output>.run/``, resumed by rerunning the
same command; DDP under torchrun) -> write (rank 0: the generator artifact,
``avatarcli.export3d.artifact.write_generator``; other ranks return None).

Torch is imported inside the phases (``avatar --help`` loads this module).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from avatarcli.cli.common import TrainProgressDisplay
from avatarcli.errors import AvatarError
from avatarcli.stage import InputSpec, Stage, StageConfig, StageSpec, Summary, option, setting
from avatarcli.stage.config import field_meta
from avatarcli.train.engine_config import EngineConfig

STAGE_OWNED_ENGINE_FIELDS = ("run_dir", "seed", "device", "validate_every")
"""Engine settings the stage sets from its own (``--run-dir``, ``--seed``, ``--device``, ``--validate-every``)."""
PRESETS = ("paper", "small", "tiny")


@dataclass
class TrainReconConfig(StageConfig):
    """Settings of ``avatar train-recon`` (Export3D §3.2–3.3 defaults). The model, data and loss
    settings are checked on resume; ``engine`` holds the training-loop settings."""

    preset: str = option("paper", choices=PRESETS, help="Generator size: paper (h=1024, 256²), small, tiny (CPU tests).")
    """``avatarcli.export3d.generator.GENERATOR_PRESETS`` entry."""
    image_size: int = option(0, help="Output side (0 = the preset's); frames are resized to it.")
    """Generator output side H (0 = the preset's); the training frames are resized to it."""
    expression: str = option("clebs", choices=("clebs", "raw"), help="Condition on β′ (CLeBS encoder) or raw β.")
    """'clebs': β -> β′ through the frozen --encoder (the paper); 'raw': β itself (the Table 3 ablation)."""
    ids: int = option(0, help="Identities to train on (0 = all not held out); a seeded choice.")
    """Trained identities (0 = every identity not held out), chosen by a seeded permutation."""
    val_ids: int = option(0, help="Identities held out entirely (never trained on).")
    """Identities held out entirely, the first of the seeded permutation."""
    val_frames: int = option(25, help="Last frames of every trained clip held out for validation (25 = 1 s).")
    """The last ``val_frames`` frames of each trained clip are never trained on (validation)."""
    batch: int = option(8, help="Pairs per step over all processes.")
    """(source, driving) pairs per step, over all processes."""
    lr: float = option(1e-4, help="Generator Adam learning rate.")
    """Generator Adam learning rate (β = 0.9, 0.99)."""
    warmup_steps: int = option(0, help="Linear warm-up of the generator learning rate over N steps.")
    """The generator's learning rate rises linearly over the first ``warmup_steps`` steps (0 = constant)."""
    disc_lr: float = option(1e-5, help="Discriminator Adam learning rate.")
    """Discriminator Adam learning rate (β = 0, 0.99)."""
    adv_steps: int = option(0, help="Last N steps add the camera-conditioned adversarial loss (phase 2).")
    """The last ``adv_steps`` steps train the discriminator and add λ_adv·(non-saturating GAN loss)."""
    adv_weight: float = option(0.01, help="λ_adv: weight of the adversarial loss.")
    """λ_adv of Eq. 14."""
    raw_weight: float = option(1.0, help="Weight of the raw-image (H/4) reconstruction loss.")
    """Weight of (L2 + LPIPS)(raw, driving↓) in Eq. 13."""
    perceptual: str = option("vgg", choices=("vgg", "alex", "none"),
                             help="LPIPS backbone of the perceptual loss (missing weights: the term is dropped and said).")
    """LPIPS backbone; without its weights the term is disabled, the run says so and the artifact records it."""
    perceptual_weight: float = option(1.0, help="Weight of the perceptual (LPIPS) term.")
    """Weight of LPIPS relative to L2 in each reconstruction term."""
    ssim_weight: float = option(0.0, help="Weight of an added 1 − SSIM term (not in Export3D; 0 = off).")
    """Weight of 1 − SSIM in each reconstruction term. Not part of Export3D's Eq. 13 (L2 + LPIPS): a
    structural term for runs without the LPIPS weights, where L2 alone gives blurred faces."""
    seed: int = option(0, help="Seed of the initial weights, the identity choice and every batch.")
    """Seeds model initialisation, the identity choice and every batch (the engine's ``seed``)."""
    engine: EngineConfig = setting(default_factory=EngineConfig)
    """The training loop: steps, precision, compile, EMA, checkpoints, ... (result fields hashed)."""
    validate_every: int = setting(1000, help="Validation metrics on held-out frames every N steps (0 = never).")
    """PSNR / SSIM / L1 on the held-out frames every N steps (and at the end when N > 0)."""
    val_count: int = setting(32, help="Validation pairs (held-out frames of trained identities).")
    """Validation pairs drawn by ``ReconData.validation_batch``."""
    run_dir: str | None = setting(None, help="Checkpoints and logs (default <output>.run).")
    """The engine's run folder (None or '' = ``<output>.run``)."""

    def result_fields(self) -> dict:
        """The result options of this config and of its engine (``engine`` itself is a setting)."""
        engine = {f.name: getattr(self.engine, f.name) for f in dataclasses.fields(self.engine)
                  if field_meta(f)["result"] and f.name not in STAGE_OWNED_ENGINE_FIELDS}
        return {**super().result_fields(), "engine": engine}

    def engine_for(self, output: Path) -> EngineConfig:
        """The engine settings of a run writing ``output``: run folder, seed, device and validation."""
        every = self.validate_every if self.validate_every > 0 and self.val_frames > 0 else 0
        return replace(self.engine, run_dir=self.run_dir or str(output) + ".run", seed=self.seed, device=self.device,
                       validate_every=every)

    def shape(self, expr_dim: int):
        """The :class:`GeneratorShape` of these settings for conditioning of ``expr_dim``."""
        from avatarcli.export3d.generator import GeneratorShape

        overrides = {"image_size": self.image_size} if self.image_size else {}
        return GeneratorShape.from_preset(self.preset, expr_dim, **overrides)


def _check(config: TrainReconConfig, world_size: int, encoder: str | None) -> None:
    if config.preset not in PRESETS:
        raise AvatarError(f"--preset must be one of {', '.join(PRESETS)}, not {config.preset!r}")
    if config.expression not in ("clebs", "raw"):
        raise AvatarError(f"--expression must be clebs or raw, not {config.expression!r}")
    if config.expression == "clebs" and not encoder:
        raise AvatarError("--expression clebs needs the CLeBS encoder (--encoder ENCODER.h5 from avatar pretrain-expr); "
                          "or train on raw β with --expression raw")
    if config.expression == "raw" and encoder:
        raise AvatarError("--encoder is not used with --expression raw (leave it out, or use --expression clebs)")
    if config.perceptual not in ("vgg", "alex", "none"):
        raise AvatarError(f"--perceptual must be vgg, alex or none, not {config.perceptual!r}")
    if config.batch < 1 or config.batch % world_size:
        raise AvatarError(f"--batch ({config.batch}) must be a positive multiple of the number of processes "
                          f"({world_size})")
    if config.warmup_steps < 0:
        raise AvatarError("--warmup-steps must be >= 0")
    for name in ("lr", "disc_lr"):
        if not getattr(config, name) > 0:
            raise AvatarError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("adv_weight", "raw_weight", "perceptual_weight", "ssim_weight"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise AvatarError(f"--{name.replace('_', '-')} must be a finite number >= 0, not {value}")
    if config.ids < 0 or config.val_ids < 0 or config.val_frames < 0 or config.val_count < 0:
        raise AvatarError("--ids, --val-ids, --val-frames and --val-count must be >= 0")
    if not 0 <= config.adv_steps <= config.engine.steps:
        raise AvatarError(f"--adv-steps ({config.adv_steps}) must be between 0 and --steps ({config.engine.steps})")
    if config.image_size and (config.image_size < 32 or config.image_size % 16):
        raise AvatarError(f"--image-size must be 0 (the preset's) or a multiple of 16 >= 32, not {config.image_size}")
    size = config.image_size or {"paper": 256, "small": 256, "tiny": 64}[config.preset]
    if config.adv_steps and size & (size - 1):
        raise AvatarError(f"--adv-steps needs a power-of-two --image-size for the discriminator, not {size}")
    defaults = EngineConfig()
    moved = [name for name in STAGE_OWNED_ENGINE_FIELDS
             if getattr(config.engine, name) not in (getattr(defaults, name), "")]
    if moved:  # they would be silently replaced by the stage's own
        raise AvatarError(f"set {', '.join(moved)} on TrainReconConfig, not on its engine")


class TrainRecon(Stage):
    """Train (or resume) the Export3D generator; rank 0 writes the generator artifact."""

    name = "train-recon"
    unit = "clip"

    def __init__(self, config: TrainReconConfig, clips: str, output: str | Path, coeffs: str | None = None,
                 encoder: str | None = None, progress=None):
        super().__init__(config, Path(output), progress)
        self.clips, self.coeffs, self.encoder_path = clips, coeffs, encoder
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))

    def check(self) -> None:
        _check(self.config, self.world_size, self.encoder_path)
        if not self.clips:
            raise AvatarError("no clips artifact given")
        if not self.coeffs:
            raise AvatarError("--coeffs (the coeffs artifact of the clips, from avatar fit-3dmm) is required")

    def _device(self, ctx) -> str:
        if ctx.cuda:  # every frame on the GPU (uint8): a batch is one indexing kernel, no loader
            return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if self.world_size > 1 else str(ctx.device)
        return "cpu"

    def prepare(self, ctx) -> None:
        from avatarcli.export3d.data import load_recon_data
        from avatarcli.export3d.task import Export3DTask, reconstruction_losses
        from avatarcli.provenance import sha256_file
        from avatarcli.train.clebs import load_encoder

        config = self.config
        self.engine = config.engine_for(self.output)
        device = self._device(ctx)
        self.encoder, self.encoder_sha256 = None, ""
        if config.expression == "clebs":
            if not Path(self.encoder_path).is_file():
                raise AvatarError(f"{self.encoder_path}: no such encoder file")
            self.encoder = load_encoder(self.encoder_path, device)
            self.encoder_sha256 = sha256_file(self.encoder_path)
        size = config.image_size or config.shape(1).image_size
        with ctx.timer.step("load", sync=False):
            self.data = load_recon_data(self.clips, self.coeffs, size, config.ids, config.val_ids, config.val_frames,
                                        config.seed, device=device)
        if self.encoder is not None and self.encoder.shape.expr_dim != self.data.expr_dim:
            raise AvatarError(f"the encoder takes {self.encoder.shape.expr_dim} expression coefficients, the coeffs "
                              f"artifact has {self.data.expr_dim}; use the encoder trained on these coefficients")
        expr_dim = self.encoder.shape.latent_dim if self.encoder is not None else self.data.expr_dim
        self.shape = config.shape(expr_dim)
        self.losses = reconstruction_losses(config.perceptual, config.perceptual_weight, config.models_dir,
                                            config.ssim_weight)
        # the task reads seed, steps, grad_clip and ema_decay from the engine it is given (its fingerprint)
        self.task = Export3DTask(replace(config, engine=self.engine), self.data, self.shape, self.encoder,
                                 self.losses, device)

    def compute(self, ctx) -> None:
        from avatarcli.train.engine import train_in_stage

        self.result = train_in_stage(ctx, self.engine, self.task)

    def losses_record(self) -> dict:
        """``LossSet.describe()`` plus the adversarial term (active when --adv-steps > 0)."""
        record = self.losses.describe()
        if self.config.adv_steps:
            record["adversarial"] = {"weight": self.config.adv_weight, "active": True, "reason": None,
                                     "models": {}, "steps": self.config.adv_steps}
        return record

    def write(self, ctx) -> Summary | None:
        if self.result.rank != 0:
            return None
        from avatarcli.export3d.artifact import write_generator
        from avatarcli.export3d.task import VALIDATION_PROTOCOL

        config, result = self.config, self.result
        config_json = {**config.to_json(), "engine": asdict(self.engine)}
        with ctx.timer.step("write", sync=False):
            write_generator(
                self.output, self.task.trained_model(result.models), self.shape, preset=config.preset,
                expression=config.expression, config_json=config_json, data=self.data, history=result.history,
                losses=self.losses_record(), validation_protocol=VALIDATION_PROTOCOL,
                encoder_path=self.encoder_path if self.encoder is not None else None,
                encoder_sha256=self.encoder_sha256, steps=result.step, world_size=result.world_size,
                precision=result.precision,
                extra_attrs={"skipped_steps": result.skipped_steps, "batch": config.batch,
                             "fingerprint": _fingerprint(self.task)})
        return self.summary(ctx)

    def summary(self, ctx) -> Summary:
        config, data, result = self.config, self.data, self.result
        history = result.history
        loss = history["loss"][-1] if history["loss"] else float("nan")
        psnr = history.get("validation/psnr") or [float("nan")]
        run_now = result.step - result.start_step
        images_per_s = run_now * config.batch / result.seconds if result.seconds > 0 else 0.0
        losses = self.losses_record()
        return Summary(
            self.name, self.output, self.unit, len(data.clips), data.num_frames, units_now=len(data.clips),
            frames_now=run_now * config.batch, seconds=ctx.elapsed(), skipped=list(data.skipped),
            timings=ctx.timer.as_dict(), device=ctx.device_name,
            warnings=[f"{name} disabled: {entry['reason']}" for name, entry in losses.items() if not entry["active"]],
            columns={"identities": len(data.train_identities), "held-out ids": len(data.val_identities),
                     "steps": result.step, "run now": run_now, "images/s": f"{images_per_s:.2f}",
                     "loss": f"{loss:.4f}", "val PSNR": f"{psnr[-1]:.2f}"},
            details={"steps": result.step, "start_step": result.start_step, "skipped_steps": result.skipped_steps,
                     "images_per_second": images_per_s, "loss": loss, "val_psnr": psnr[-1],
                     "validation": {k.removeprefix("validation/"): v[-1] for k, v in history.items()
                                    if k.startswith("validation/") and k != "validation/step" and v},
                     "world_size": result.world_size, "precision": result.precision, "checkpoint": result.checkpoint,
                     "losses": losses, "train_identities": list(data.train_identities),
                     "val_identities": list(data.val_identities)},
        )


def _fingerprint(task) -> str:
    from avatarcli.train.checkpoint import fingerprint_hash

    return fingerprint_hash(task.fingerprint())


def run(config: TrainReconConfig, clips: str, output: str | Path, coeffs: str | None = None,
        encoder: str | None = None, progress=None) -> Summary | None:
    """Train (or resume) and, on rank 0, write the generator artifact; None on other DDP ranks."""
    return TrainRecon(config, clips, output, coeffs, encoder, progress).run()


def report(summary: Summary, config: TrainReconConfig) -> bool:
    """Which losses ran, the held-out identities and the last validation metrics, on stderr."""
    from avatarcli.cli.common import err

    losses = summary.details.get("losses") or {}
    used = ", ".join(f"{name}×{entry['weight']:g}" + ("" if entry["active"] else f" (disabled: {entry['reason']})")
                     for name, entry in losses.items())
    err.print(f"losses: {used}", soft_wrap=True, markup=False)
    if summary.details.get("val_identities"):
        err.print(f"held-out identities: {', '.join(summary.details['val_identities'])}", soft_wrap=True, markup=False)
    validation = summary.details.get("validation")
    if validation:
        err.print("validation (held-out frames): " + json.dumps({k: round(v, 4) for k, v in validation.items()}),
                  soft_wrap=True, markup=False)
    return False


STAGE = StageSpec(
    name="train-recon",
    summary=("Train the Export3D tri-plane generator (source image + expression -> 3D-aware face).  "
             "e.g. avatar train-recon clips.h5 --coeffs coeffs.h5 --encoder encoder.h5 -o generator.h5"),
    help=(
        "Train Export3D's generator (arXiv 2404.00636 §3.2-3.3): from a source frame S and the driving frame's "
        "expression β (mapped to β′ by the frozen CLeBS --encoder, or raw with --expression raw) it generates a "
        "tri-plane (EAdaLN-ViT, online EMA plane), volume-renders it from the driving frame's camera at H/4 and "
        "super-resolves it to H. Pairs (S, D) come from one clip of one identity; every trained identity is "
        "equally likely per batch. --ids N trains on N identities (seeded choice), --val-ids K holds out K "
        "identities and --val-frames the last frames of every trained clip (validation metrics every "
        "--validate-every steps). Loss: L2 + LPIPS on the raw and the super-resolved image (Eq. 13); the last "
        "--adv-steps steps add a camera-conditioned discriminator (Eq. 14). Without the LPIPS weights the run says "
        "so and records the losses it used. Checkpoints go to <output>.run/; rerunning the same command resumes. "
        "Under torchrun every process trains a share of each batch (DDP). Writes a generator artifact for "
        "avatar render. '-' reads the clips path from stdin."
    ),
    epilog=("Example: avatar train-recon clips.h5 --coeffs coeffs.h5 --encoder encoder.h5 --ids 1000 -o generator.h5 "
            "&& avatar render generator.h5 --driving clips.h5 --driving-coeffs coeffs.h5 -o out.h5"),
    config=TrainReconConfig,
    run=run,
    inputs=(InputSpec("clips", "A clips artifact (avatar preprocess / synth), or '-'.", stdin=True),
            InputSpec("coeffs", "Its coeffs artifact (avatar fit-3dmm or import-deep3d).", flag="--coeffs"),
            InputSpec("encoder", "The CLeBS encoder artifact (avatar pretrain-expr); not with --expression raw.",
                      flag="--encoder", required=False)),
    unit="clip",
    report=report,
    common=("models_dir", "device"),
    order=40,
    progress=TrainProgressDisplay,
)
