"""``avatar models``: the model registry, where each model was found, and checksums."""

from __future__ import annotations

import json
from typing import Annotated, List, Optional

import typer

from avatarcli.cli.common import ModelsOpt

NAME = "models"
SUMMARY = "List registered models, where they are, and verify checksums.  e.g. avatar models --models ./weights"
HELP = ("List the registered models with file, license and input conventions; show where each is found "
        "(--models DIR, $AVATAR_MODELS, the cache) and verify its sha256. --download fetches missing ones.")
EPILOG = "Example: AVATAR_MODELS=../shared/assets/models avatar models"


def command(
    names: Annotated[Optional[List[str]], typer.Argument(help="Models to show (default: all).")] = None,
    models: ModelsOpt = None,
    download: Annotated[bool, typer.Option("--download", help="Download missing models now.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from avatarcli import registry
    from avatarcli.errors import AvatarError

    rows = []
    failed = False
    for name in names or list(registry.MODELS):
        spec = registry.get_spec(name)
        row = {"name": name, "file": spec.filename, "license": spec.license, "task": spec.task,
               "input": spec.input, "pinned_sha256": spec.sha256, "path": None, "status": "missing"}
        try:
            path = registry.resolve(name, models, allow_download=download) if download else registry.find_local(spec, models)
            if path is not None:
                row.update(path=str(path), sha256=registry.file_sha256(path),
                           status="ok" if spec.sha256 else "ok (no pinned checksum)")
        except AvatarError as exc:
            row["status"] = f"error: {exc}"
            failed = True
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        table = Table(title=escape(f"models (search: --models, $AVATAR_MODELS, {registry.cache_dir()})"),
                      header_style="bold")
        for column in ("name", "task", "status", "path", "license"):
            table.add_column(column, overflow="fold")
        for row in rows:
            style = "green" if row["status"].startswith("ok") else ("red" if row["status"].startswith("error") else "yellow")
            table.add_row(escape(row["name"]), escape(row["task"]), f"[{style}]{escape(row['status'])}[/]",
                          escape(row["path"] or "-"), escape(row["license"]))  # paths and errors: no markup
        Console(highlight=False).print(table)
    if failed:
        raise typer.Exit(1)
