"""``avatar fit-3dmm``: clips artifact -> per-frame 3D morphable model coefficients."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from avatarcli.cli.common import (
    DeviceOpt, ModelsOpt, OutputOpt, StageProgress, device_or_global, emit_output, err,
    print_run_details, stdin_path,
)

NAME = "fit-3dmm"
SUMMARY = "Clips -> identity, expression, pose, camera per frame.  e.g. avatar fit-3dmm clips.h5 -o coeffs.h5"
HELP = (
    "Fit a linear face model (ICT-FaceKit by default, or BFM) to every clip of a clips artifact: one identity "
    "and albedo per clip; expression, rotation, translation and SH lighting per frame. Coarse to fine, "
    "batched over frames and clips: rigid pose and then shape on the 68 landmarks, then photometric "
    "refinement against the frames (skip it with --landmarks-only). Writes a coeffs artifact with the "
    "25-d EG3D camera, the 6-d pose and the landmark error of every frame; frames above --flag-px are "
    "flagged. Clips without landmarks are skipped with a reason. '-' reads the input path from stdin."
)
EPILOG = "Example: avatar preprocess videos/ -o clips.h5 | avatar fit-3dmm - -o coeffs.h5 --preview previews/"


def command(
    clips: Annotated[str, typer.Argument(help="clips artifact, or '-' to read its path from stdin.")],
    output: OutputOpt,
    face_model: Annotated[str, typer.Option(help="ict, bfm, or a face-model file.")] = "ict",
    iters: Annotated[int, typer.Option(help="Gauss-Newton iterations of the landmark (identity + expression) stage.")] = 60,
    rigid_iters: Annotated[int, typer.Option(help="Gauss-Newton iterations of the rigid stage.")] = 5,
    photo_iters: Annotated[int, typer.Option(help="Iterations of the photometric stage.")] = 50,
    landmarks_only: Annotated[bool, typer.Option("--landmarks-only", help="No photometric stage.")] = False,
    photo_size: Annotated[int, typer.Option(help="Render side for the photometric stage.")] = 128,
    photo_samples: Annotated[int, typer.Option(help="Random face pixels per frame per photometric iteration (0: all).")] = 512,
    batch_frames: Annotated[int, typer.Option(help="Frames fitted together (whole clips).")] = 512,
    flag_px: Annotated[float, typer.Option(help="Flag frames whose landmark error exceeds this (px at 256²).")] = 6.0,
    preview: Annotated[Optional[str], typer.Option(help="Folder for PNG grids: input | landmarks | render | overlay.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an output made with other settings.")] = False,
    models: ModelsOpt = None,
    device: DeviceOpt = None,
) -> None:
    from rich.table import Table

    from stages.fit3dmm import Fit3dmmConfig, run

    config = Fit3dmmConfig(
        face_model=face_model, iters=iters, rigid_iters=rigid_iters, photo_iters=photo_iters,
        landmarks_only=landmarks_only, photo_size=photo_size, photo_samples=photo_samples, batch_frames=batch_frames, flag_px=flag_px,
        preview=preview, overwrite=overwrite, models_dir=models, device=device_or_global(device),
    )
    path = stdin_path(clips)
    with StageProgress("fit-3dmm", unit="clips") as progress:
        summary = run(config, path, output, progress)
    table = Table(title="fit-3dmm", header_style="bold")
    for column in ("clips", "frames", "fitted now", "kept from before", "skipped", "flagged frames",
                   "landmark error px", "frames/s"):
        table.add_column(column, justify="right")
    rate = summary.frames_now / summary.seconds if summary.seconds > 0 else 0.0
    table.add_row(str(summary.clips), str(summary.frames), str(summary.frames_now), str(summary.reused),
                  str(len(summary.skipped)), str(summary.flagged), f"{summary.lmk_error:.2f}", f"{rate:.1f}")
    err.print(table)
    print_run_details(summary.timings, summary.skipped, "clip")
    if summary.clips == 0:
        err.print("[bold red]error:[/] no clip could be fitted")
        raise typer.Exit(1)
    emit_output(summary.output)
