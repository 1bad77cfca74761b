"""``avatar pretrain-expr``: frames + expression coefficients -> a CLeBS appearance-free expression encoder."""

from __future__ import annotations

import os
from typing import Annotated, List, Optional

import typer

from avatarcli.cli.common import STATE, DeviceOpt, OutputOpt, device_or_global, emit_output, err, stdin_paths

NAME = "pretrain-expr"
SUMMARY = ("Train the CLeBS expression encoder (β -> appearance-free β′).  "
           "e.g. avatar pretrain-expr clips.h5 --coeffs coeffs.h5 -o encoder.h5")
HELP = (
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
)
EPILOG = ("Example: avatar preprocess videos/ -o clips.h5 | avatar fit-3dmm - -o coeffs.h5 && "
          "avatar pretrain-expr clips.h5 --coeffs coeffs.h5 -o encoder.h5 | avatar info -")


def command(
    inputs: Annotated[List[str], typer.Argument(help="A clips artifact, or Deep3DFaceRecon .mat files/folders, or '-'.")],
    output: OutputOpt,
    coeffs: Annotated[Optional[List[str]], typer.Option(
        "--coeffs", help="With a clips artifact: its coeffs artifact, or Deep3DFaceRecon .mat files/folders (repeatable).")] = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 60000,
    batch_clips: Annotated[int, typer.Option(help="Groups per step (all processes); a group is 1 + negatives frames of one clip.")] = 32,
    negatives: Annotated[int, typer.Option(help="Negatives per frame, from the same clip.")] = 32,
    negatives_from: Annotated[str, typer.Option(
        help="Group frames: pose (anchor + nearest in head pose) or random (any frames of the clip, as published).")] = "pose",
    image_size: Annotated[int, typer.Option(help="Side the face crops are downscaled to.")] = 112,
    latent_dim: Annotated[int, typer.Option(help="d: dimension of β′.")] = 256,
    basis_size: Annotated[int, typer.Option(help="n: learned basis vectors.")] = 10,
    hidden: Annotated[int, typer.Option(help="Hidden width of the expression encoder.")] = 256,
    width: Annotated[int, typer.Option(help="Base width of ResNetSE18 (64 = ResNet-18).")] = 64,
    norm: Annotated[str, typer.Option(help="ResNetSE18 normalisation: batch or group.")] = "batch",
    temperature: Annotated[float, typer.Option(help="InfoNCE temperature τ.")] = 0.07,
    beta_noise: Annotated[float, typer.Option(help="Training noise on β, in stds of each coefficient (0 = off, as published).")] = 0.3,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warmup steps.")] = 0,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")] = "auto",
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm (0 = off).")] = 1.0,
    ema_decay: Annotated[float, typer.Option(help="EMA of the weights (0 = off); the EMA is the result.")] = 0.0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 1000,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept.")] = 3,
    log_every: Annotated[int, typer.Option(help="Record the loss every N steps.")] = 50,
    image_every: Annotated[int, typer.Option(help="TensorBoard image grids every N steps (0 = never).")] = 1000,
    max_bad_steps: Annotated[int, typer.Option(help="Stop after N NaN/inf steps in a row.")] = 20,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="TensorBoard logs in the run folder.")] = True,
    run_dir: Annotated[Optional[str], typer.Option(help="Checkpoints and logs (default <output>.run).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Resume the latest checkpoint of the run folder.")] = True,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic kernels only.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed (overrides the global --seed).", show_default=False)] = None,
    identity_from: Annotated[str, typer.Option(help=".mat inputs: identity from parent, stem or regex:PATTERN of the video path.")] = "stem",
    export_embeddings: Annotated[Optional[str], typer.Option(help="Also write β, λ, β′ per frame to this artifact.")] = None,
    plot: Annotated[str, typer.Option(help="PNG of the β and β′ embeddings ('' = <output stem>.embedding.png, 'none').")] = "",
    probes: Annotated[bool, typer.Option("--probes/--no-probes", help="Score identity leak and expression retention.")] = True,
    device: DeviceOpt = None,
) -> None:
    from rich.table import Table

    from avatarcli.train.engine import EngineConfig, TrainingInterrupted
    from avatarcli.train.progress import RichTrainProgress
    from stages.pretrain_expr import PretrainExprConfig, run

    engine = EngineConfig(
        run_dir=run_dir or "", steps=steps, seed=STATE.seed if seed is None else seed, precision=precision,
        compile=compile_model, grad_clip=grad_clip, ema_decay=ema_decay, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, resume=resume, log_every=log_every, image_every=image_every,
        max_bad_steps=max_bad_steps, tensorboard=tensorboard, device=device_or_global(device),
        deterministic=deterministic,
    )
    config = PretrainExprConfig(
        latent_dim=latent_dim, basis_size=basis_size, hidden=hidden, width=width, norm=norm, image_size=image_size,
        negatives=negatives, negatives_from=negatives_from, batch_clips=batch_clips, temperature=temperature, beta_noise=beta_noise, lr=lr, warmup_steps=warmup_steps,
        identity_from=identity_from, engine=engine, export_embeddings=export_embeddings, plot=plot, probes=probes,
    )
    paths = stdin_paths(inputs)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    progress = RichTrainProgress("pretrain-expr", err, disable=not main_rank or (not err.is_terminal and STATE.verbose == 0))
    try:
        summary = run(config, paths, output, coeffs or [], progress)
    except TrainingInterrupted as exc:
        err.print(f"[bold yellow]interrupted:[/] {exc}")
        raise typer.Exit(130)
    if not main_rank:
        return
    result = summary.result
    table = Table(title="pretrain-expr", header_style="bold")
    for column in ("clips", "identities", "frames", "steps", "run now", "skipped steps", "steps/s", "loss", "match acc"):
        table.add_column(column, justify="right")
    table.add_row(str(summary.clips), str(summary.identities), str(summary.frames), str(result.step),
                  str(result.step - result.start_step), str(result.skipped_steps), f"{result.steps_per_second:.2f}",
                  f"{summary.final_loss:.4f}", f"{summary.final_accuracy:.3f}")
    err.print(table)
    if summary.probes is not None:
        probe = Table(title="probes (held-out frames)", header_style="bold")
        for column in ("score", "β", "β′"):
            probe.add_column(column, justify="right" if column != "score" else "left")
        for name, on_beta, on_prime, _ in summary.probes.rows():
            probe.add_row(name, f"{on_beta:.3f}", f"{on_prime:.3f}")
        err.print(probe)
    if summary.skipped:
        skipped = Table(title="skipped clips", header_style="bold yellow")
        skipped.add_column("clip", overflow="fold")
        skipped.add_column("reason", overflow="fold")
        for name, reason in summary.skipped:
            skipped.add_row(name, reason)
        err.print(skipped)
    if summary.plot:
        err.print(f"embedding plot: {summary.plot}")
    if summary.embeddings:
        err.print(f"embeddings: {summary.embeddings}")
    emit_output(summary.output)
