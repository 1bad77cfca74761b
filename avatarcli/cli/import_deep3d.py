"""``avatar import-deep3d``: Deep3DFaceRecon coefficient files -> a coeffs artifact."""

from __future__ import annotations

from typing import Annotated

import typer

from avatarcli.cli.common import OutputOpt, StageProgress, emit_output, err, print_run_details, stdin_paths

NAME = "import-deep3d"
SUMMARY = "Deep3DFaceRecon .mat coefficients -> coeffs artifact.  e.g. avatar import-deep3d fits/ -o d3d.h5"
HELP = (
    "Import Deep3DFaceRecon result files (.mat with a 257-d 'coeff' per frame; folders are searched "
    "recursively) as a coeffs artifact, one clip per file named by its stem: identity, expression and "
    "angles verbatim; translation, 6-d pose and the 25-d camera in avatar's OpenCV/mm conventions. "
    "avatar eval then computes AED/APD on them with the Deep3D protocol, without re-fitting. "
    "Unreadable files are skipped with a reason."
)
EPILOG = "Example: avatar import-deep3d gen_3dmm/ -o gen.h5 && avatar eval gen.h5 -r ref.h5 --metrics aed,apd"


def command(
    inputs: Annotated[list[str], typer.Argument(help=".mat files or folders; '-' reads paths from stdin.")],
    output: OutputOpt,
    fps: Annotated[float, typer.Option(help="Frame rate of the fitted videos (the files do not store it).")] = 30.0,
) -> None:
    from stages.import_deep3d import ImportDeep3dConfig, run

    with StageProgress("import-deep3d", unit="files") as progress:
        summary = run(ImportDeep3dConfig(fps=fps), stdin_paths(inputs), output, progress)
    err.print(f"imported {summary.clips} clip(s), {summary.frames} frames in {summary.seconds:.1f} s")
    print_run_details({}, summary.skipped, "file")
    emit_output(summary.output)
