"""Stage ``pretrain-expr``: frames + expression coefficients -> a CLeBS expression encoder.

check inputs -> prepare (load every clip's frames at the training size and its β; the groups of
1 + negatives frames per clip) -> compute (the shared training engine, ``avatarcli.train.engine``, on the
task ``avatarcli.train.tasks.clebs.ClebsTask``:
checkpoints in ``<output>.run/``, resumed by rerunning the same command) -> write (rank 0: the
encoder artifact with the probe scores, optionally the per-frame embeddings and a PNG of β and β′).

The model, loss and basis editing are in ``avatarcli.train.clebs``, the data in
``avatarcli.train.clebs_data``, the probes in ``avatarcli.train.probes``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatarcli.artifact import ArtifactWriter, write_strings
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file
from avatarcli.schemas import CLIPS
from avatarcli.train.checkpoint import fingerprint_hash
from avatarcli.train.clebs import Clebs, ClebsShape, flatten_state
from avatarcli.train.clebs_data import ClipBank, ExpressionData, load_expression_data
from avatarcli.train.distributed import shutdown_distributed
from avatarcli.train.engine import EngineConfig, TrainResult, train
from avatarcli.train.tasks.clebs import ClebsTask
from avatarcli.schemas import ENCODER, EXPR_EMBEDDINGS

READS = (CLIPS.kind, "coeffs")
WRITES = ENCODER.kind


@dataclass
class PretrainExprConfig:
    """Settings of ``avatar pretrain-expr`` (Export3D §3.1 defaults). The model, data and loss
    settings are checked on resume; ``engine`` holds the training-loop settings."""

    latent_dim: int = 256
    """d: dimension of β′ and of the image embedding."""
    basis_size: int = 10
    """n: learned basis vectors (coefficients λ per frame)."""
    hidden: int = 256
    """Hidden width of the expression encoder's two linear layers."""
    width: int = 64
    """Base width of the ResNetSE18 image encoder (64 = ResNet-18; smaller for quick CPU runs)."""
    norm: str = "batch"
    """Normalisation in ResNetSE18: 'batch', or 'group' (independent of how DDP splits the batch)."""
    image_size: int = 112
    """Side the 256² face crops are downscaled to for the image encoder."""
    negatives: int = 32
    """Negatives per positive: each group is 1 + negatives distinct frames of one clip."""
    negatives_from: str = "pose"
    """Which frames of the clip a group takes: 'pose', a random anchor and the frames nearest to it in
    head pose, so neither appearance nor pose can tell them apart (fitted β leaks pose); 'random',
    any frames of the clip (Export3D as published)."""
    batch_clips: int = 32
    """Groups per step over all processes (each from a clip drawn in proportion to its length)."""
    temperature: float = 0.07
    """τ of the InfoNCE loss."""
    beta_noise: float = 0.3
    """Std of Gaussian noise added to β in training, in units of each coefficient's std over the data
    (0 = off, as published). Nearby β must then map to nearby β′, so f_e cannot memorise a small
    corpus by separating frames on tiny (fitting-noise) differences of β. StyleTalk, 4000 steps:
    landmark-expression R² of β′ 0.50 with 0.3, 0.06 without (identity at chance in both)."""
    lr: float = 1e-4
    """Adam learning rate."""
    warmup_steps: int = 0
    """Linear learning-rate warmup over this many steps (0 = constant)."""
    identity_from: str = "stem"
    """Identity of each .mat input (for the probes and the plot): 'parent', 'stem' or 'regex:PATTERN'
    on the video path; clips artifacts carry their own identities."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(run_dir=""))
    """The training loop: steps, seed, precision, compile, clipping, EMA, checkpoints, ... ('' run_dir
    = ``<output>.run``)."""
    export_embeddings: str | None = None
    """Also write β, λ and β′ of every frame to this expr_embeddings artifact."""
    plot: str = ""
    """PNG of the 2-D PCA of β and β′ coloured by identity ('' = ``<output stem>.embedding.png``,
    'none' = no plot)."""
    probes: bool = True
    """Score identity leak and expression retention on held-out frames (stored in the artifact)."""

    def shape(self, expr_dim: int) -> ClebsShape:
        return ClebsShape(expr_dim=expr_dim, latent_dim=self.latent_dim, basis_size=self.basis_size,
                          hidden=self.hidden, width=self.width, norm=self.norm)


@dataclass
class PretrainSummary:
    output: Path | None
    """The encoder artifact (None on ranks other than 0)."""
    clips: int
    frames: int
    identities: int
    skipped: list[tuple[str, str]]
    result: TrainResult
    final_loss: float
    final_accuracy: float
    probes: object | None = None
    embeddings: Path | None = None
    plot: Path | None = None


def _check(config: PretrainExprConfig, world_size: int) -> None:
    if config.negatives < 1:
        raise AvatarError("--negatives must be at least 1")
    if config.beta_noise < 0:
        raise AvatarError("--beta-noise must be >= 0")
    if config.batch_clips < 1 or config.batch_clips % world_size:
        raise AvatarError(f"--batch-clips ({config.batch_clips}) must be a positive multiple of the number of "
                          f"processes ({world_size})")
    if config.basis_size > config.latent_dim:
        raise AvatarError(f"--basis-size ({config.basis_size}) cannot exceed --latent-dim ({config.latent_dim})")
    if config.norm not in ("batch", "group"):
        raise AvatarError(f"--norm must be batch or group, not {config.norm!r}")
    if config.image_size < 32:
        raise AvatarError("--image-size must be at least 32")


@torch.no_grad()
def embed_all(model: Clebs, data: ExpressionData) -> tuple[np.ndarray, np.ndarray]:
    """(λ [F,n], β′ [F,d]) of every frame of every clip, in clip order, fp32 on the CPU."""
    encoder = model.expression_encoder.float().cpu().eval()
    beta = torch.from_numpy(np.concatenate([c.beta for c in data.clips]))
    lam = torch.cat([encoder.coefficients(chunk) for chunk in beta.split(65536)])
    return lam.numpy(), (lam @ encoder.basis().T).numpy()


def run(config: PretrainExprConfig, inputs: list[str], output: str | Path, coeffs: list[str] | None = None,
        progress=None) -> PretrainSummary:
    """Train (or resume) and, on rank 0, write the encoder artifact. ``coeffs``: the coeffs artifact or
    Deep3DFaceRecon .mat files/folders that go with a clips artifact input."""
    import os

    output = Path(output)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    _check(config, world_size)
    engine = EngineConfig(**{**asdict(config.engine), "run_dir": config.engine.run_dir or str(output) + ".run"})
    data = load_expression_data(inputs, coeffs or [], config.image_size, config.identity_from)
    bank_device = "cpu"
    if engine.device != "cpu":
        from avatarcli.devices import resolve_device

        resolved = resolve_device(engine.device)
        if resolved.startswith("cuda"):
            # every frame on the GPU (uint8): gathering a batch is one indexing kernel, no loader
            bank_device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world_size > 1 else resolved
    bank = ClipBank(data, config.negatives + 1, bank_device, config.negatives_from)
    skipped = data.skipped + bank.too_short
    task = ClebsTask(config, bank, data)
    result = train(engine, task, progress)
    history = result.history
    final_loss = history["loss"][-1] if history["loss"] else float("nan")
    final_accuracy = history.get("accuracy", [float("nan")])[-1] if history.get("accuracy") else float("nan")
    summary = PretrainSummary(None, len(data.clips), data.num_frames, len({c.identity for c in data.clips}),
                              skipped, result, final_loss, final_accuracy)
    if result.world_size > 1:
        shutdown_distributed()
    if rank != 0:
        return summary

    model = task.trained_model(result.models)
    lam, beta_prime = embed_all(model, data)
    beta = np.concatenate([c.beta for c in data.clips])
    identity_names = sorted({c.identity for c in data.clips})
    labels = np.concatenate([np.full(len(c.beta), identity_names.index(c.identity)) for c in data.clips])
    lengths = [len(c.beta) for c in data.clips]
    probes = None
    if config.probes:
        from avatarcli.train.probes import run_probes

        lmk = np.concatenate([c.lmk68 for c in data.clips]) if all(c.lmk68 is not None for c in data.clips) else None
        pose = np.concatenate([c.pose for c in data.clips]) if all(c.pose is not None for c in data.clips) else None
        probes = run_probes(beta, beta_prime, lengths, labels, lmk, config.basis_size, pose)
    summary.probes = probes
    summary.output = write_encoder(output, config, engine, data, bank, task, result, probes)
    if config.export_embeddings:
        summary.embeddings = write_embeddings(Path(config.export_embeddings), data, beta, lam, beta_prime, summary.output)
    if config.plot != "none":
        from avatarcli.train.plots import embedding_plot

        plot_path = Path(config.plot) if config.plot else output.with_name(output.stem + ".embedding.png")
        summary.plot = embedding_plot(plot_path, [("beta: raw expression", beta), ("beta prime: CLeBS", beta_prime)],
                                      labels, identity_names, seed=engine.seed)
    return summary


def _config_json(config: PretrainExprConfig, engine: EngineConfig) -> dict:
    resolved = asdict(config)
    resolved["engine"] = asdict(engine)
    return resolved


def write_encoder(output: Path, config: PretrainExprConfig, engine: EngineConfig, data: ExpressionData,
                  bank: ClipBank, task: ClebsTask, result: TrainResult, probes) -> Path:
    model = task.trained_model(result.models)
    weights = flatten_state({k: v for k, v in model.state_dict().items()})
    nan = float("nan")
    attrs = {
        "encoder_type": "clebs",
        "shape_json": json.dumps(asdict(task.shape)),
        "expr_dim": task.shape.expr_dim,
        "latent_dim": task.shape.latent_dim,
        "basis_size": task.shape.basis_size,
        "image_size": config.image_size,
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
    with ArtifactWriter(output, ENCODER, _config_json(config, engine), data.parents, attrs) as writer:
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


def write_embeddings(path: Path, data: ExpressionData, beta: np.ndarray, lam: np.ndarray, beta_prime: np.ndarray,
                     encoder_path: Path) -> Path:
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

