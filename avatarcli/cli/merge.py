"""``avatar merge``: combine shard artifacts into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List

import typer

from avatarcli.cli.common import OutputOpt, emit_output, err, stdin_paths

NAME = "merge"
SUMMARY = "Combine shard artifacts (from --shard K/N) into one.  e.g. avatar merge part*.h5 -o clips.h5"
HELP = ("Combine clips artifacts made with the same settings (for example the --shard K/N outputs of a job "
        "array) into one, by copying the clips or, with --virtual, by HDF5 virtual datasets that read the shards.")
EPILOG = "Example: avatar merge shard0.h5 shard1.h5 -o clips.h5"


def command(
    inputs: Annotated[List[str], typer.Argument(help="Artifacts to merge ('-' reads paths from stdin).")],
    output: OutputOpt,
    virtual: Annotated[bool, typer.Option("--virtual", help="Reference the shards instead of copying (they are named "
                                                            "relative to the output: move them together).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output (never an input).")] = False,
) -> None:
    from avatarcli.artifact import read_kind
    from avatarcli.errors import AvatarError
    from avatarcli.merge import merge_clips

    paths = [Path(p) for p in stdin_paths(inputs)]
    kinds = {read_kind(p) for p in paths}
    if kinds != {"clips"}:
        raise AvatarError(f"avatar merge combines clips artifacts; got kinds {sorted(kinds)}")
    counts = merge_clips(paths, Path(output), virtual=virtual, overwrite=overwrite)
    err.print(f"merged {len(paths)} artifact(s): {counts['clips']} clips, {counts['identities']} identities, "
              f"{counts['sources']} sources" + (" (virtual)" if virtual else ""))
    emit_output(output)
