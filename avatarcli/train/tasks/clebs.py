"""The CLeBS trainer (``avatar pretrain-expr``) as a task of the shared engine: one model
('clebs'), one Adam, one phase (InfoNCE), an optional linear warmup."""

from __future__ import annotations

from dataclasses import asdict
from typing import Protocol

import numpy as np
import torch

from avatarcli.errors import AvatarError
from avatarcli.train.checkpoint import fingerprint_hash
from avatarcli.train.clebs import Clebs, ClebsShape, info_nce
from avatarcli.train.clebs_data import ClipBank, ExpressionData
from avatarcli.train.task import Phase

MODEL = "clebs"


class ClebsSettings(Protocol):
    """The settings the task reads (``stages.pretrain_expr.PretrainExprConfig``)."""

    image_size: int
    negatives: int
    negatives_from: str
    batch_clips: int
    temperature: float
    beta_noise: float
    lr: float
    warmup_steps: int
    engine: object
    """Its ``seed``, ``grad_clip`` and ``ema_decay`` are part of the fingerprint."""

    def shape(self, expr_dim: int) -> ClebsShape: ...


class ClebsTask:
    """InfoNCE between frames and their β over groups of frames of one clip (``avatarcli.train.clebs``)."""

    def __init__(self, config: ClebsSettings, bank: ClipBank, data: ExpressionData):
        self.config = config
        self.bank = bank
        all_beta = np.concatenate([c.beta for c in data.clips])
        self.beta_mean = torch.from_numpy(all_beta.mean(0))
        self.beta_std = torch.from_numpy(np.maximum(all_beta.std(0), 1e-6))
        self.shape = config.shape(data.expr_dim)
        self.data_signature = [(p, h) for p, h in data.parents] + [(c, int(n)) for c, n in zip(bank.clip_ids, bank.lengths)]

    def fingerprint(self) -> dict:
        c = self.config
        return {"shape": asdict(self.shape), "image_size": c.image_size, "negatives": c.negatives,
                "negatives_from": c.negatives_from, "batch_clips": c.batch_clips, "temperature": c.temperature,
                "lr": c.lr, "warmup": c.warmup_steps, "beta_noise": c.beta_noise,
                "seed": c.engine.seed, "grad_clip": c.engine.grad_clip, "ema": c.engine.ema_decay,
                "data": fingerprint_hash({"d": self.data_signature})}

    def build_models(self) -> dict[str, Clebs]:
        model = Clebs(self.shape)
        model.expression_encoder.beta_mean.copy_(self.beta_mean)
        model.expression_encoder.beta_std.copy_(self.beta_std)
        return {MODEL: model}

    def build_optimizers(self, models):
        return {MODEL: torch.optim.Adam(models[MODEL].parameters(), lr=self.config.lr)}

    def build_schedulers(self, optimizers):
        warmup = self.config.warmup_steps
        return {MODEL: torch.optim.lr_scheduler.LambdaLR(
            optimizers[MODEL], lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)}

    def phases(self) -> list[Phase]:
        return [Phase("contrastive", (MODEL,), self.loss)]

    def batch(self, step: int, shard: int, shards: int, device: torch.device):
        """(images [B,G,3,s,s] in -1..1, β [B,G,K]) of groups ``shard·B .. (shard+1)·B - 1``, B =
        batch_clips / shards; β with its training noise."""
        if self.config.batch_clips % shards:
            raise AvatarError(f"--batch-clips ({self.config.batch_clips}) must be a multiple of processes × "
                              f"accumulated micro-batches ({shards})")
        per_shard = self.config.batch_clips // shards
        groups = range(shard * per_shard, (shard + 1) * per_shard)
        images, beta = self.bank.batch(self.config.engine.seed, step, groups)
        if self.config.beta_noise > 0:
            # drawn per (seed, step, group): the same numbers whatever the process count or a resume
            noise = np.stack([np.random.default_rng((self.config.engine.seed, step, group, 7)).standard_normal(beta.shape[1:])
                              for group in groups])
            noise = torch.from_numpy(noise).to(beta.device, beta.dtype)
            beta = beta + self.config.beta_noise * self.beta_std.to(beta.device, beta.dtype) * noise
        return images.to(device, non_blocking=True), beta.to(device, non_blocking=True)

    def loss(self, models, batch, step):
        images, beta = batch
        image_embedding, expr_embedding = models[MODEL](images, beta)
        loss, accuracy = info_nce(image_embedding, expr_embedding, self.config.temperature)
        return loss, {"accuracy": accuracy.detach()}

    def images(self, models, batch):
        images, beta = batch
        image_embedding, expr_embedding = models[MODEL](images[:1], beta[:1])
        zi = torch.nn.functional.normalize(image_embedding[0].float(), dim=-1)
        ze = torch.nn.functional.normalize(expr_embedding[0].float(), dim=-1)
        similarity = ((zi @ ze.T + 1) / 2).cpu()  # [G,G] in 0..1; a bright diagonal = frames find their β
        size = images.shape[-1]
        heat = torch.nn.functional.interpolate(similarity[None, None], size=(size, size), mode="nearest")[0].expand(3, -1, -1)
        return {"frames_of_one_group": (images[0, :10].float().cpu() + 1) / 2,
                "frame_vs_beta_similarity": heat[None]}

    @staticmethod
    def trained_model(models: dict[str, Clebs]) -> Clebs:
        """The result of a run: the EMA copy when there is one (``--ema-decay``), else the model."""
        return models.get(f"{MODEL}_ema", models[MODEL])
