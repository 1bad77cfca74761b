"""A summary of any artifact: what ``avatar info`` shows (and prints as JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py

from avatarcli.artifact import get_schema, open_artifact, read_strings


def _dataset_row(path: str, dataset: h5py.Dataset) -> dict:
    dtype = "str" if h5py.check_string_dtype(dataset.dtype) else str(dataset.dtype)
    return {"path": path, "shape": list(dataset.shape), "dtype": dtype,
            "chunks": list(dataset.chunks) if dataset.chunks else None, "compression": dataset.compression}


def describe_artifact(path: str | Path, max_parents: int = 20) -> dict:
    path = Path(path)
    # hashes: a virtual artifact's sources must be the very files it was merged from
    with open_artifact(path, hashes=True) as handle:
        schema = get_schema(str(handle.attrs["avatar_kind"]))
        attrs = handle.attrs
        info: dict = {
            "path": str(path),
            "kind": schema.kind,
            "schema_version": int(attrs["avatar_schema_version"]),
            "provenance": {
                "avatar_version": str(attrs["avatar_version"]),
                "git_commit": str(attrs["avatar_git_commit"]),
                "created_utc": str(attrs["created_utc"]),
                "config": json.loads(attrs["config_json"]),
            },
            "size_bytes": path.stat().st_size,
        }
        parents = read_strings(handle["provenance/parent_path"])
        hashes = read_strings(handle["provenance/parent_sha256"])
        info["provenance"]["parents"] = [{"path": p, "sha256": h} for p, h in zip(parents[:max_parents], hashes)]
        info["provenance"]["num_parents"] = len(parents)
        extra = {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()
                 if k not in ("avatar_kind", "avatar_schema_version", "avatar_version", "avatar_git_commit",
                              "created_utc", "config_json")}
        info["attributes"] = {k: (str(v) if isinstance(v, bytes) else v) for k, v in extra.items()
                              if k not in ("summary_json", "protocol_json")}
        datasets = []
        handle.visititems(lambda name, obj: datasets.append(_dataset_row(name, obj))
                          if isinstance(obj, h5py.Dataset) and not (schema.unit_group and name.startswith(schema.unit_group + "/"))
                          else None)
        info["datasets"] = datasets
        if schema.unit_group:
            units = handle[schema.unit_group]
            names = list(units.keys())
            info["units"] = {"group": schema.unit_group, "count": len(names)}
            if names:
                first = units[names[0]]
                info["units"]["example"] = names[0]
                info["units"]["datasets"] = [
                    {**_dataset_row(f"{schema.unit_group}/<id>/{spec.path}", first[spec.path]),
                     "symbolic_shape": [str(s) for s in spec.shape], "doc": spec.doc}
                    for spec in schema.unit_datasets if spec.path in first
                ]
        if schema.kind == "clips":
            num_frames = handle["index/num_frames"][()]
            status = read_strings(handle["sources/status"])
            reasons = read_strings(handle["sources/reason"])
            paths = read_strings(handle["sources/path"])
            info["counts"] = {
                "clips": int(len(num_frames)),
                "identities": int(handle["identities/name"].shape[0]),
                "frames": int(num_frames.sum()),
                "sources": len(paths),
                "skipped": sum(s != "ok" for s in status),
            }
            info["skipped"] = [{"path": p, "reason": r} for p, s, r in zip(paths, status, reasons) if s != "ok"]
        elif schema.kind == "coeffs":
            skipped = read_strings(handle["skipped/clip_id"])
            info["counts"] = {"clips": int(handle["index/num_frames"].shape[0]),
                              "frames": int(handle["index/num_frames"][()].sum()), "skipped": len(skipped)}
            info["skipped"] = [{"path": c, "reason": r} for c, r in zip(skipped, read_strings(handle["skipped/reason"]))]
        elif schema.kind == "encoder":
            info["counts"] = {
                "steps": int(attrs["steps"]), "identities": int(attrs.get("probe_identities", 0)),
                "identity acc β": round(float(attrs["probe_identity_acc_beta"]), 3),
                "identity acc β′": round(float(attrs["probe_identity_acc_beta_prime"]), 3),
                "chance": round(float(attrs["probe_identity_chance"]), 3),
                "expression R² β": round(float(attrs["probe_expression_r2_beta"]), 3),
                "expression R² β′": round(float(attrs["probe_expression_r2_beta_prime"]), 3),
            }
        elif schema.kind == "eval":
            summary = json.loads(attrs["summary_json"])
            info["counts"] = {"clip pairs": summary["pairs"], "frame pairs": summary["frames"]}
            info["metrics"] = summary["metrics"]
            info["left_out"] = summary["left_out"]
    return info
