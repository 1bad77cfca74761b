"""Export3D reconstruction training (``avatar train-recon``) as a task of the shared engine.

Models: ``generator`` (:class:`Export3DGenerator`) and, with ``adv_steps`` > 0, ``discriminator``
(:class:`CameraDiscriminator`). Phases of a step, in order:

* ``reconstruction`` (generator, Adam lr, β = (0, 0.99)): Eq. 13, ``raw_weight``·(L2 + LPIPS)(raw,
  driving↓r) + (L2 + LPIPS)(image, driving); during the last ``adv_steps`` steps it also adds
  ``adv_weight``·softplus(−D(image, raw, camera)) (non-saturating, Eq. 14). The adversarial term is
  part of this phase rather than a phase of its own so that the generator takes one Adam step per
  training step.
* ``discriminator`` (only when ``adv_steps`` > 0; Adam ``disc_lr``, β = (0, 0.99) as EG3D): inside the
  adversarial range softplus(D(fake)) + softplus(−D(real)) on the fakes of this step's reconstruction
  phase (detached). Outside it the phase is a no-op: its loss does not touch D, so D's gradients stay
  None and Adam moves neither D nor its moments (a zero-gradient step would bump Adam's step count and
  inflate its first real updates); DDP is not involved since D is not called.

Conditioning: β of the driving frame through the frozen CLeBS encoder (β′, ``expression='clebs'``) or
β itself (``'raw'``), computed in :meth:`Export3DTask.batch`, outside autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from avatarcli.errors import AvatarError
from avatarcli.export3d.generator import CameraDiscriminator, Export3DGenerator, GeneratorShape
from avatarcli.losses import LossSet
from avatarcli.train.checkpoint import fingerprint_hash
from avatarcli.train.task import Phase, Validation

GENERATOR = "generator"
DISCRIMINATOR = "discriminator"
ADAM_BETAS = (0.0, 0.99)
"""The discriminator's Adam betas (EG3D's)."""
GENERATOR_BETAS = (0.9, 0.99)
"""The generator's: with β1 = 0 (EG3D's GAN setting) plain reconstruction learned slower (tiny preset,
fixed batch, lr 2e-3: 27.1 vs 31.0 dB after 300 steps) and at lr 5e-3 the density died (alpha 0.59 ->
3e-7 within 20 steps, never recovering)."""
"""EG3D's Adam betas for the generator and discriminator (no first-moment momentum)."""
VALIDATION_PROTOCOL = (
    "output (super-resolved image) vs driving frame, both [0,1] RGB at the generator's image size, on the fixed "
    "validation pairs of ReconData.validation_batch: source = first training frame of a trained clip, driving = "
    "its held-out last val_frames frames (never trained on); driving camera and β of the driving frame. "
    "psnr: dB over all pixels and channels, data range 1; ssim: Gaussian-window SSIM (avatarcli.metrics.image); "
    "l1: mean absolute error; each the mean over the pairs; generator weights: the EMA copy when there is one.")


class ReconSettings(Protocol):
    """The settings the task reads (``stages.train_recon.TrainReconConfig``)."""

    expression: str
    batch: int
    lr: float
    warmup_steps: int
    ssim_weight: float
    disc_lr: float
    adv_steps: int
    adv_weight: float
    raw_weight: float
    perceptual: str
    perceptual_weight: float
    val_count: int
    engine: object
    """Its ``steps``, ``seed``, ``grad_clip`` and ``ema_decay`` are part of the fingerprint."""


@dataclass
class ReconStep:
    """One shard of a step's batch, on the training device."""

    source: torch.Tensor
    """[b,3,s,s] in [0,1]."""
    driving: torch.Tensor
    """[b,3,s,s] in [0,1]."""
    expr: torch.Tensor
    """[b,expr_dim] the generator's conditioning (β′ or β)."""
    camera: torch.Tensor
    """[b,25] driving camera, generator world."""
    jitter: torch.Tensor | None = None
    """[b] int64 per-item seeds of the ray-sample jitter (``volume.Jitter``): a function of (seed, step,
    item), so DDP shards and micro-batches jitter exactly like the whole batch in one process (a
    tensor, not ints, so ``torch.compile`` does not specialise on its values)."""


def reconstruction_losses(perceptual: str, perceptual_weight: float, models_dir=None,
                          ssim_weight: float = 0.0) -> LossSet:
    """L2 + ``perceptual_weight``·LPIPS(``perceptual``) ('none': L2 only) [+ ``ssim_weight``·(1 − SSIM),
    not in Export3D's Eq. 13: structure where LPIPS weights are missing]; missing LPIPS weights disable
    that term (``describe()`` says so) instead of failing."""
    weights = {"l2": 1.0}
    if perceptual != "none":
        weights[f"lpips_{perceptual}"] = perceptual_weight
    if ssim_weight:
        weights["ssim"] = ssim_weight
    return LossSet(weights, models_dir=models_dir, required=False)


def discriminator_widths(shape: GeneratorShape) -> tuple[int, int]:
    """(width, max_width) of the discriminator for a generator shape: EG3D's (64, 512) at the paper
    preset (sr_width 128), scaled with the super-resolution width for the smaller presets."""
    width = max(16, shape.sr_width // 2)
    return width, 8 * width


def depth_image(depth: torch.Tensor) -> torch.Tensor:
    """[B,1,r,r] depth -> [B,3,r,r] in [0,1], each image normalised to its own range (near = bright)."""
    flat = depth.float().flatten(1)
    low, high = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
    return (1 - (depth.float() - low) / (high - low).clamp_min(1e-6)).expand(-1, 3, -1, -1)


def image_metrics(output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B,3,H,W] in [0,1] twice -> {'psnr', 'ssim', 'l1'}: [B] float64 each."""
    from avatarcli.metrics.image import psnr, ssim

    a = output.float().clamp(0, 1).permute(0, 2, 3, 1)
    b = target.float().permute(0, 2, 3, 1)
    return {"psnr": psnr(a, b, data_range=1.0), "ssim": ssim(a, b, data_range=1.0),
            "l1": (a - b).abs().flatten(1).mean(1).double()}


class Export3DTask:
    """Reconstruction (+ adversarial) training of the Export3D generator on ``ReconData``."""

    def __init__(self, config: ReconSettings, data, shape: GeneratorShape, encoder=None, losses: LossSet | None = None,
                 device: str | torch.device = "cpu"):
        if config.expression == "clebs" and encoder is None:
            raise AvatarError("expression 'clebs' needs a CLeBS encoder (--encoder), or use --expression raw")
        self.config, self.data, self.shape, self.encoder = config, data, shape, encoder
        if config.ssim_weight and shape.neural_resolution < 11:
            raise AvatarError(f"--ssim-weight needs raw images of at least 11 px; this generator renders "
                              f"{shape.neural_resolution} px (image size / 4): use a larger --image-size")
        self.device = torch.device(device)
        self.losses = (losses if losses is not None else
                       reconstruction_losses(config.perceptual, config.perceptual_weight,
                                             ssim_weight=config.ssim_weight)).to(self.device)
        self.adv_start = max(0, config.engine.steps - config.adv_steps) if config.adv_steps > 0 else None
        self._fakes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._validation = None

    # -- what the engine asks -----------------------------------------------------------------------

    def fingerprint(self) -> dict:
        c = self.config
        encoder = None
        if self.encoder is not None:
            encoder = fingerprint_hash({k: str(v) for k, v in self.encoder.attrs.items() if k != "created_utc"})
        return {"shape": self.shape.to_dict(), "expression": c.expression, "encoder": encoder, "batch": c.batch,
                "lr": c.lr, "warmup": c.warmup_steps, "disc_lr": c.disc_lr, "adv_steps": c.adv_steps,
                "adv_weight": c.adv_weight,
                "raw_weight": c.raw_weight, "losses": self.losses.describe(), "betas": (GENERATOR_BETAS, ADAM_BETAS),
                "steps": c.engine.steps if c.adv_steps else None,  # the adversarial range depends on it
                "seed": c.engine.seed, "grad_clip": c.engine.grad_clip, "ema": c.engine.ema_decay,
                "data": fingerprint_hash(self.data.signature())}

    def build_models(self) -> dict[str, torch.nn.Module]:
        models = {GENERATOR: Export3DGenerator(self.shape)}
        if self.config.adv_steps > 0:
            width, max_width = discriminator_widths(self.shape)
            models[DISCRIMINATOR] = CameraDiscriminator(self.shape.image_size, width=width, max_width=max_width)
        return models

    def build_optimizers(self, models):
        optimizers = {GENERATOR: torch.optim.Adam(models[GENERATOR].parameters(), lr=self.config.lr, betas=GENERATOR_BETAS)}
        if DISCRIMINATOR in models:
            optimizers[DISCRIMINATOR] = torch.optim.Adam(models[DISCRIMINATOR].parameters(), lr=self.config.disc_lr,
                                                         betas=ADAM_BETAS)
        return optimizers

    def build_schedulers(self, optimizers):
        warmup = self.config.warmup_steps
        if not warmup:
            return {}
        return {GENERATOR: torch.optim.lr_scheduler.LambdaLR(optimizers[GENERATOR],
                                                             lambda step: min(1.0, (step + 1) / warmup))}

    def phases(self) -> list[Phase]:
        phases = [Phase("reconstruction", (GENERATOR,), self.reconstruction_loss)]
        if self.config.adv_steps > 0:
            phases.append(Phase("discriminator", (DISCRIMINATOR,), self.discriminator_loss))
        return phases

    def condition(self, beta: torch.Tensor) -> torch.Tensor:
        """β [b,K] -> the generator's input [b,expr_dim] (β′ through the frozen encoder, or β)."""
        if self.encoder is None:
            return beta.float()
        return self.encoder.encode(beta.float()).float()

    def batch(self, step: int, shard: int, shards: int, device: torch.device) -> ReconStep:
        """Items ``shard·b .. (shard+1)·b − 1`` of step ``step``'s batch (b = batch / shards)."""
        if self.config.batch % shards:
            raise AvatarError(f"--batch ({self.config.batch}) must be a multiple of processes × accumulated "
                              f"micro-batches ({shards})")
        per_shard = self.config.batch // shards
        items = range(shard * per_shard, (shard + 1) * per_shard)
        b = self.data.batch(self.config.engine.seed, step, items, device)
        jitter = torch.tensor([int(np.random.default_rng([self.config.engine.seed, step, item, 11]).integers(2**62))
                               for item in items], dtype=torch.int64)
        return ReconStep(b.source.to(device), b.driving.to(device), self.condition(b.beta.to(device)),
                         b.camera.to(device).float(), jitter)

    # -- losses -------------------------------------------------------------------------------------

    def adversarial(self, step: int) -> bool:
        """Is ``step`` in the last ``adv_steps`` steps?"""
        return self.adv_start is not None and step >= self.adv_start

    def reconstruction_loss(self, models, batch: ReconStep, step: int):
        out = models[GENERATOR](batch.source, batch.expr, batch.camera, batch.jitter)
        raw, image = out["raw"].float(), out["image"].float()
        driving_low = F.interpolate(batch.driving, size=raw.shape[-2:], mode="area")
        raw_total, raw_terms = self.losses(raw, driving_low)
        image_total, image_terms = self.losses(image, batch.driving)
        loss = self.config.raw_weight * raw_total + image_total
        metrics = {**{f"raw_{k}": v for k, v in raw_terms.items()}, **{f"image_{k}": v for k, v in image_terms.items()}}
        if self.adversarial(step):
            logits = models[DISCRIMINATOR](out["image"], out["raw"], batch.camera)
            adversarial = F.softplus(-logits.float()).mean()
            loss = loss + self.config.adv_weight * adversarial
            metrics["adversarial"] = adversarial.detach()
            self._fakes[id(batch)] = (out["image"].detach(), out["raw"].detach())
        return loss, metrics

    def discriminator_loss(self, models, batch: ReconStep, step: int):
        if not self.adversarial(step):
            # no-op outside the adversarial range (module docstring): a graph that does not reach D
            return torch.zeros((), device=batch.source.device, requires_grad=True) * 0.0, {}
        fake = self._fakes.pop(id(batch), None)
        if fake is None:  # the reconstruction phase did not run on this batch: make the fakes here
            with torch.no_grad():
                out = models[GENERATOR](batch.source, batch.expr, batch.camera, batch.jitter)
            fake = (out["image"].detach(), out["raw"].detach())
        real_raw = F.interpolate(batch.driving, size=fake[1].shape[-2:], mode="area")
        logits = models[DISCRIMINATOR](torch.cat([fake[0], batch.driving.to(fake[0].dtype)]),
                                       torch.cat([fake[1], real_raw.to(fake[1].dtype)]),
                                       torch.cat([batch.camera, batch.camera]))
        fake_logits, real_logits = logits.float().chunk(2)
        loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        return loss, {"d_real": real_logits.mean().detach(), "d_fake": fake_logits.mean().detach()}

    # -- images and validation ------------------------------------------------------------------------

    @staticmethod
    def trained_model(models: dict[str, torch.nn.Module]) -> torch.nn.Module:
        """The result of a run: the EMA copy when there is one (``--ema-decay``), else the generator."""
        return models.get(f"{GENERATOR}_ema", models[GENERATOR])

    def grid(self, generator, source, driving, expr, camera) -> torch.Tensor:
        """Rows of [source | driving | raw (upsampled) | output | depth], [n,5,3,s,s] in [0,1]."""
        out = generator(source, expr, camera)
        size = source.shape[-2:]
        raw = F.interpolate(out["raw"].float(), size=size, mode="nearest")
        depth = F.interpolate(depth_image(out["depth"]), size=size, mode="nearest")
        columns = [source.float(), driving.float(), raw.clamp(0, 1), out["image"].float().clamp(0, 1), depth]
        return torch.stack(columns, 1).cpu()

    def images(self, models, batch: ReconStep) -> dict[str, torch.Tensor]:
        n = min(4, batch.source.shape[0])
        generator = self.trained_model(models)
        return {"source_driving_raw_output_depth": self.grid(
            generator, batch.source[:n], batch.driving[:n], batch.expr[:n], batch.camera[:n])}

    def validation_pairs(self, device: torch.device):
        if self._validation is None:
            self._validation = self.data.validation_batch(self.config.val_count, device)
        return self._validation

    def validate(self, models, step: int) -> Validation:
        """PSNR / SSIM / L1 of the output vs the held-out driving frames (``VALIDATION_PROTOCOL``)."""
        generator = self.trained_model(models)
        device = next(generator.parameters()).device
        pairs = self.validation_pairs(device)
        if pairs.source.shape[0] == 0:
            return Validation()
        values: dict[str, list[torch.Tensor]] = {}
        chunk = max(1, self.config.batch)
        for start in range(0, pairs.source.shape[0], chunk):
            part = slice(start, start + chunk)
            out = generator(pairs.source[part].to(device), self.condition(pairs.beta[part].to(device)),
                            pairs.camera[part].to(device).float())
            for name, value in image_metrics(out["image"], pairs.driving[part].to(device)).items():
                values.setdefault(name, []).append(value.cpu())
        metrics = {name: float(torch.cat(v).mean()) for name, v in values.items()}
        n = min(4, pairs.source.shape[0])
        grid = self.grid(generator, pairs.source[:n].to(device), pairs.driving[:n].to(device),
                         self.condition(pairs.beta[:n].to(device)), pairs.camera[:n].to(device).float())
        return Validation(metrics, {"source_driving_raw_output_depth": grid})
