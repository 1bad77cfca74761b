"""``avatar preprocess``: raw talking-head videos -> clips artifact."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from avatarcli.cli.common import (
    STATE, DeviceOpt, ModelsOpt, OutputOpt, StageProgress, device_or_global, emit_output, err,
    print_run_details, stdin_paths,
)

NAME = "preprocess"
SUMMARY = "Videos -> 25 fps, nose-centred 256² face crops with landmarks.  e.g. avatar preprocess videos/ -o clips.h5"
HELP = (
    "Decode videos (files, folders, or text files listing paths; '-' reads paths from stdin), resample to a "
    "fixed fps by timestamp, detect and track the main face, and write nose-centred square crops with 5- and "
    "68-point landmarks to a clips artifact. Bad inputs are recorded as skipped with a reason. Rerunning the "
    "same command resumes an interrupted run and adds new inputs to an existing output."
)
EPILOG = "Example: avatar preprocess videos/ -o clips.h5 | avatar info -"


def command(
    inputs: Annotated[List[str], typer.Argument(help="Videos, folders, .txt lists of paths, or '-' (stdin).")],
    output: OutputOpt,
    fps: Annotated[float, typer.Option(help="Output frame rate.")] = 25.0,
    crop_size: Annotated[int, typer.Option(help="Side of the square crops, pixels.")] = 256,
    crop_scale: Annotated[float, typer.Option(help="Crop side = scale * max(2*eye dist, 1.8*eye-mouth).")] = 2.0,
    identity_from: Annotated[str, typer.Option(help="Identity per clip: parent, stem or regex:PATTERN.")] = "parent",
    detector: Annotated[str, typer.Option(help="Face detector (registry name).")] = "scrfd_2.5g",
    landmarker: Annotated[str, typer.Option(help="68-point landmark model (registry name).")] = "pfld68",
    det_size: Annotated[int, typer.Option(help="Detector input side, multiple of 32 (0 = auto: 640 CUDA, 320 CPU).")] = 0,
    det_every: Annotated[int, typer.Option(help="Detect on every Nth frame (0 = auto: 1 on CUDA, 3 on CPU).")] = 0,
    lmk_every: Annotated[int, typer.Option(help="Landmarks on every Nth frame (0 = auto: 1 on CUDA, 2 on CPU).")] = 0,
    max_gap: Annotated[int, typer.Option(help="Longest detection gap (frames) that is interpolated.")] = 12,
    min_frames: Annotated[int, typer.Option(help="Drop clips shorter than this.")] = 25,
    batch_frames: Annotated[int, typer.Option(help="Frames per decode/model batch; 0 = by frame size (128 at 512²).")] = 0,
    workers: Annotated[int, typer.Option(help="CPU: processes; CUDA: decode threads (0 = auto).")] = 0,
    gpu_streams: Annotated[int, typer.Option(help="CUDA: sources processed concurrently, one stream each.")] = 1,
    shard: Annotated[str, typer.Option(help="Process only shard K/N of the inputs (merge with avatar merge).")] = "",
    strict: Annotated[bool, typer.Option("--strict", help="Exit nonzero when any input is skipped.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an output made with other settings.")] = False,
    models: ModelsOpt = None,
    device: DeviceOpt = None,
) -> None:
    from rich.table import Table

    from stages.preprocess import PreprocessConfig, run

    if det_size % 32:
        raise typer.BadParameter("must be a multiple of 32", param_hint="--det-size")
    config = PreprocessConfig(
        fps=fps, crop_size=crop_size, crop_scale=crop_scale, identity_from=identity_from, detector=detector,
        landmarker=landmarker, det_size=det_size, det_every=det_every, lmk_every=lmk_every, max_gap=max_gap, min_frames=min_frames,
        batch_frames=batch_frames, workers=workers, gpu_streams=gpu_streams, shard=shard, strict=strict, overwrite=overwrite,
        device=device_or_global(device), models_dir=models,
    )
    paths = stdin_paths(inputs)
    with StageProgress("preprocess") as progress:
        summary = run(config, paths, output, progress)

    table = Table(title="preprocess", show_header=True, header_style="bold")
    for column in ("inputs", "processed now", "kept from before", "clips", "identities", "frames", "skipped", "frames/s"):
        table.add_column(column, justify="right")
    rate = summary.frames_now / summary.seconds if summary.seconds > 0 else 0.0
    table.add_row(str(summary.sources), str(summary.processed_now), str(summary.reused), str(summary.clips),
                  str(summary.identities), str(summary.frames), str(len(summary.skipped)), f"{rate:.1f}")
    err.print(table)
    print_run_details(summary.timings, summary.skipped, "input")
    if summary.clips == 0:
        err.print(f"[bold red]error:[/] no clips were produced ({len(summary.skipped)} input(s) skipped); "
                  f"the skips are recorded in {summary.output}")
        raise typer.Exit(1)
    emit_output(summary.output)
    if strict and summary.skipped:
        err.print(f"[bold red]error:[/] --strict: {len(summary.skipped)} input(s) skipped")
        raise typer.Exit(1)
