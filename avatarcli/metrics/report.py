"""Eval summaries for people: the metrics table, a protocol in one line, .json/.csv summary files.

Torch-free (``avatar info`` and the eval command's report use it).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def format_mean(mean) -> str:
    """A summary mean: 'n/a' (no frame), 'inf' as stored, else 4 decimals."""
    return "n/a" if mean is None else mean if isinstance(mean, str) else f"{mean:.4f}"


def summary_table(summary: dict):
    """A rich table of an eval summary: metric (with ↑/↓), mean, frames, excluded, protocol."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"eval: {summary['pairs']} clip pair(s), {summary['frames']} frame pairs, "
                               f"{summary['mode']}"), header_style="bold")
    for column in ("metric", "mean", "frames", "excluded", "protocol"):
        table.add_column(column, overflow="fold")
    for name, entry in summary["metrics"].items():  # model names and modes may hold brackets: no markup
        table.add_row(escape(name + (" ↑" if entry["higher_is_better"] else " ↓")),
                      escape(format_mean(entry["mean"])), str(entry["frames"]), str(entry["excluded"]),
                      escape(protocol_line(name, entry["protocol"])))
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


def write_summary_file(path: str | Path, summary: dict) -> None:
    """The summary as ``.csv`` (a row per clip pair, then ALL) or, for any other suffix, as JSON
    (written whole or not at all)."""
    from avatarcli.stage.files import atomic_path

    target = Path(path)
    with atomic_path(target) as tmp:
        if target.suffix.lower() == ".csv":
            names = list(summary["metrics"])
            with open(tmp, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["generated", "reference", "frames", *names])
                for clip in summary["clips"]:
                    writer.writerow([clip["generated"], clip["reference"], clip["frames"], *[clip[n] for n in names]])
                writer.writerow(["ALL", "", summary["frames"], *[summary["metrics"][n]["mean"] for n in names]])
        else:
            tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
