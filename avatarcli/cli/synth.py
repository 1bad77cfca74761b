"""``avatar synth``: render a face model into a synthetic clips artifact with ground truth."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from avatarcli.cli.common import (
    STATE, DeviceOpt, ModelsOpt, OutputOpt, StageProgress, device_or_global, emit_output, err,
)

NAME = "synth"
SUMMARY = "Synthetic face clips with ground truth (3DMM, pose, light).  e.g. avatar synth -o synth.h5"
HELP = (
    "Render the face model (ICT-FaceKit by default) with a random identity per clip, smooth expression and "
    "head-pose trajectories, SH lighting, a skin albedo and a gradient background into a clips artifact "
    "shaped like 'avatar preprocess' output (nose-centred square frames, 5- and 68-point landmarks), with the "
    "ground truth beside the frames (truth/identity, expression, pose6, lighting, albedo, intrinsics). "
    "Landmarks are the projected model landmark vertices, visible or not. The same --seed gives the same clips."
)
EPILOG = "Example: avatar synth -o synth.h5 --clips 8 --frames 100 | avatar info -"


def command(
    output: OutputOpt,
    clips: Annotated[int, typer.Option(help="Number of clips (one identity each).")] = 4,
    frames: Annotated[int, typer.Option(help="Frames per clip.")] = 50,
    size: Annotated[int, typer.Option(help="Side of the square frames, pixels.")] = 256,
    fps: Annotated[float, typer.Option(help="Frame rate.")] = 25.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: the global --seed, 0).",
                                                show_default=False)] = None,
    face_model: Annotated[str, typer.Option(help="Face model: ict, bfm, or a .npz / .mat path.")] = "ict",
    id_scale: Annotated[float, typer.Option(help="Std of the identity coefficients.")] = 1.0,
    exp_channels: Annotated[int, typer.Option(help="Active expression channels per clip.")] = 6,
    exp_max: Annotated[float, typer.Option(help="Largest expression weight (blendshapes: at most 1).")] = 0.7,
    yaw: Annotated[float, typer.Option(help="Largest |yaw|, degrees.")] = 25.0,
    pitch: Annotated[float, typer.Option(help="Largest |pitch|, degrees.")] = 15.0,
    roll: Annotated[float, typer.Option(help="Largest |roll|, degrees.")] = 8.0,
    supersample: Annotated[int, typer.Option(help="Render at N x the size and average (anti-aliasing).")] = 1,
    batch: Annotated[int, typer.Option(help="Frames rendered at once.")] = 16,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an output made with other settings.")] = False,
    models: ModelsOpt = None,
    device: DeviceOpt = None,
) -> None:
    from rich.table import Table

    from stages.synth import SynthConfig, run

    config = SynthConfig(
        clips=clips, frames=frames, size=size, fps=fps, seed=STATE.seed if seed is None else seed,
        face_model=face_model, models_dir=models, id_scale=id_scale, exp_channels=exp_channels, exp_max=exp_max,
        yaw=yaw, pitch=pitch, roll=roll, supersample=supersample, batch=batch, device=device_or_global(device),
        overwrite=overwrite,
    )
    with StageProgress("synth", unit="clips") as progress:
        summary = run(config, [], output, progress)

    if summary.reused:
        err.print(f"{summary.output} was already made with these settings; kept as is (--overwrite to redo)")
    else:
        table = Table(title="synth", show_header=True, header_style="bold")
        for column in ("clips", "frames", "size", "device", "face coverage", "seconds", "frames/s"):
            table.add_column(column, justify="right")
        rate = summary.frames_now / summary.seconds if summary.seconds > 0 else 0.0
        table.add_row(str(summary.clips), str(summary.frames), f"{size}²", summary.device,
                      f"{100 * summary.mask_fraction:.0f}%", f"{summary.seconds:.1f}", f"{rate:.1f}")
        err.print(table)
        if STATE.verbose:
            err.print("step seconds: " + ", ".join(f"{k} {v['seconds']:.2f}" for k, v in summary.timings.items()))
    emit_output(summary.output)
