"""``avatar eval``: generated vs reference artifacts -> protocol-stamped metrics."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from avatarcli.cli.common import (
    DeviceOpt, ModelsOpt, OutputOpt, StageProgress, device_or_global, emit_output, err, print_run_details, stdin_path,
)

NAME = "eval"
SUMMARY = "Metrics (psnr, ssim, lpips, csim, akd, aed, apd) with their protocol.  e.g. avatar eval gen.h5 --reference ref.h5"
HELP = (
    "Compare a generated artifact with a reference artifact, frame by frame (paired by clip id or --pairs, "
    "then by index): psnr, ssim, lpips, csim (ArcFace-family cosine on 5-point aligned 112² crops), akd "
    "(68 landmarks, px), aed and apd (L1 over face-model expression and pose coefficients; clips are fitted "
    "with fit-3dmm's landmark fit, coeffs artifacts are used as they are). Every number comes with its "
    "protocol: model names and sha256, alignment, resolution, region, distance, frames used and excluded. "
    "Frames without a detectable face are excluded (and counted), never scored 0. Writes an eval artifact; "
    "the summary goes to stderr as a table, to --summary FILE (.json or .csv) and, with --json, to stdout. "
    "'-' reads the generated artifact's path from stdin."
)
EPILOG = ("Example: avatar preprocess videos/ -o clips.h5 | avatar eval - --reference ref.h5 "
          "--metrics csim,aed,apd,akd,psnr,ssim -o eval.h5")


def command(
    generated: Annotated[str, typer.Argument(help="generated artifact (clips or coeffs), or '-' to read its path from stdin.")],
    reference: Annotated[str, typer.Option("--reference", "-r", help="reference artifact: driving or ground-truth frames (clips) or fits (coeffs).")],
    output: OutputOpt = "eval.h5",
    metrics: Annotated[str, typer.Option(help="Comma list of psnr,ssim,lpips,csim,akd,aed,apd; default: every one available.")] = "",
    mode: Annotated[str, typer.Option(help="same-id (CSIM vs the reference frame) or cross-id (vs --source).")] = "same-id",
    source: Annotated[Optional[str], typer.Option(help="cross-id: clips artifact with the source clips CSIM compares with.")] = None,
    source_frame: Annotated[int, typer.Option(help="cross-id: frame of each source clip used for CSIM.")] = 0,
    pairs: Annotated[Optional[str], typer.Option(help="CSV of generated,reference[,source] clip ids (instead of pairing by id).")] = None,
    region: Annotated[str, typer.Option(help="frame, or face (psnr/ssim/lpips inside the reference's fitted face region).")] = "frame",
    apd: Annotated[str, typer.Option(help="APD convention: angles, or angles+translation.")] = "angles+translation",
    csim_model: Annotated[str, typer.Option(help="Face-recognition model (registry name) or auto.")] = "auto",
    detector: Annotated[str, typer.Option(help="Face detector (registry name).")] = "scrfd_2.5g",
    landmark_model: Annotated[str, typer.Option(help="68-point landmark model (registry name).")] = "pfld68",
    face_model: Annotated[str, typer.Option(help="Face model of the landmark fits for aed/apd: ict, bfm or a file.")] = "ict",
    fit_iters: Annotated[Optional[int], typer.Option(help="Gauss-Newton steps of the landmark fit's shape stage (default: fit-3dmm's).", show_default=False)] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Error on unpaired clips and mismatched frame counts.")] = False,
    batch: Annotated[int, typer.Option(help="Frame pairs per device batch.")] = 64,
    summary: Annotated[Optional[str], typer.Option(help="Also write the summary to this .json or .csv file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary JSON on stdout instead of the output path.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an output made with other settings.")] = False,
    models: ModelsOpt = None,
    device: DeviceOpt = None,
) -> None:
    from stages.eval import EvalConfig, run

    fit_steps = {} if fit_iters is None else {"fit_iters": fit_iters}
    config = EvalConfig(
        metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()), mode=mode, region=region, apd=apd,
        csim_model=csim_model, detector=detector, landmark_model=landmark_model, source_frame=source_frame,
        face_model=face_model, strict=strict, batch=batch, models_dir=models,
        device=device_or_global(device), overwrite=overwrite, **fit_steps,
    )
    with StageProgress("eval", unit="clip pairs") as progress:
        result = run(config, stdin_path(generated), stdin_path(reference), output, source=source, pairs_file=pairs,
                     progress=progress)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}")
    err.print(summary_table(result.summary))
    print_run_details(result.timings, [], "clip")
    if summary:
        write_summary_file(summary, result.summary)
    if as_json:
        typer.echo(json.dumps(result.summary, indent=2, sort_keys=True))
    else:
        emit_output(result.output)


def summary_table(summary: dict):
    from rich.table import Table

    table = Table(title=f"eval: {summary['pairs']} clip pair(s), {summary['frames']} frame pairs, {summary['mode']}",
                  header_style="bold")
    for column in ("metric", "mean", "frames", "excluded", "protocol"):
        table.add_column(column, overflow="fold")
    for name, entry in summary["metrics"].items():
        mean = entry["mean"]
        shown = "n/a" if mean is None else mean if isinstance(mean, str) else f"{mean:.4f}"
        table.add_row(name + (" ↑" if entry["higher_is_better"] else " ↓"), shown, str(entry["frames"]),
                      str(entry["excluded"]), protocol_line(name, entry["protocol"]))
    return table


def protocol_line(metric: str, protocol: dict) -> str:
    """The protocol in one line: the model(s) with short hashes, and what the distance is."""
    parts = []
    for key in ("model", "landmarks"):
        if isinstance(protocol.get(key), dict):
            parts.append(f"{protocol[key]['name']}@{protocol[key]['sha256'][:8]}")
    if "models" in protocol:
        parts.append(" + ".join(f"{m['name']}@{m['sha256'][:8]}" for m in protocol["models"]))
    if "extractor" in protocol:
        parts.append(f"{protocol['face_model']}: {protocol['extractor']}")
    if "convention" in protocol:
        parts.append(protocol["convention"])
    if protocol.get("region") and protocol["region"] != "frame":
        parts.append("face region")
    if protocol.get("resolution"):
        parts.append(protocol["resolution"])
    return "; ".join(parts)


def write_summary_file(path: str, summary: dict) -> None:
    import csv
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".csv":
        names = list(summary["metrics"])
        with open(target, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["generated", "reference", "frames", *names])
            for clip in summary["clips"]:
                writer.writerow([clip["generated"], clip["reference"], clip["frames"], *[clip[n] for n in names]])
            writer.writerow(["ALL", "", summary["frames"], *[summary["metrics"][n]["mean"] for n in names]])
    else:
        target.write_text(json.dumps(summary, indent=2, sort_keys=True))
