"""``avatar info``: what an artifact holds and how it was made."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from avatarcli.cli.common import stdin_path

NAME = "info"
SUMMARY = "Show an artifact: kind, schema, provenance, datasets, counts, skips.  e.g. avatar info clips.h5"
HELP = "Show an artifact's kind, schema version, provenance, datasets (shapes, dtypes), counts and skipped inputs."
EPILOG = "Example: avatar preprocess videos/ -o clips.h5 | avatar info -"


def command(
    artifact: Annotated[str, typer.Argument(help="Artifact path, or '-' to read it from stdin.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    from rich.markup import escape
    from rich.table import Table

    from avatarcli.inspect import describe_artifact

    info = describe_artifact(stdin_path(artifact))
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    prov = info["provenance"]
    # The summary is what info is asked for, so it goes to stdout. Every string from the artifact (paths,
    # names, reasons, config) is escaped: '[bold]x.mp4' is a file name, not markup.
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"[bold]{escape(info['path'])}[/]  kind [cyan]{escape(info['kind'])}[/] v{info['schema_version']}  "
                  f"({info['size_bytes'] / 1e6:.1f} MB)")
    console.print(escape(f"made by avatar {prov['avatar_version']} {prov['git_commit'][:12]} at {prov['created_utc']}; "
                         f"{prov['num_parents']} parent(s)"))
    if "counts" in info:
        console.print("  ".join(f"{escape(k)}: [bold]{escape(str(v))}[/]" for k, v in info["counts"].items()))
    table = Table(title="datasets", header_style="bold")
    for column in ("path", "shape", "dtype", "chunks", "compression"):
        table.add_column(column, overflow="fold")  # folded, never cut with '…' (a log or pipe is 80 wide)
    for row in info["datasets"] + info.get("units", {}).get("datasets", []):
        shape = str(row["shape"]) + (f"  {row['symbolic_shape']}" if "symbolic_shape" in row else "")
        table.add_row(*(escape(cell) for cell in (row["path"], shape, row["dtype"], str(row["chunks"] or ""),
                                                   str(row["compression"] or ""))))
    console.print(table)
    if info.get("units"):
        console.print(escape(f"{info['units']['count']} unit(s) under /{info['units']['group']} "
                             f"(shapes above are of {info['units'].get('example', '-')})"))
    if info.get("skipped"):
        skipped = Table(title="skipped inputs", header_style="bold yellow")
        skipped.add_column("input", overflow="fold")
        skipped.add_column("reason", overflow="fold")
        for row in info["skipped"]:
            skipped.add_row(escape(row["path"]), escape(row["reason"]))
        console.print(skipped)
    if info.get("metrics"):
        from avatarcli.metrics.report import format_mean, protocol_line

        metrics = Table(title="metrics", header_style="bold")
        for column in ("metric", "mean", "frames", "excluded", "protocol"):
            metrics.add_column(column, overflow="fold")
        for name, entry in info["metrics"].items():
            metrics.add_row(escape(name), escape(format_mean(entry["mean"])), str(entry["frames"]),
                            str(entry["excluded"]), escape(protocol_line(name, entry["protocol"])))
        console.print(metrics)
    console.print(escape("config: " + json.dumps(prov["config"], sort_keys=True)))
