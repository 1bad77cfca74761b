"""Eval's part files (one per clip pair) and the eval artifact assembled from them.

A part (``.npz``) holds ``values`` [T,M] float64 and ``excluded`` [T,M] uint8 (a row of
:data:`~avatarcli.evaluation.plan.REASONS`) of one clip pair, metrics in the run's order, and the
inputs of the pair's landmark fits per fitted side: ``<side>_lmk`` [T,68,2] float32 (nan where no
face) and ``<side>_found`` [T] bool, so that a resumed run can refit them beside unfinished pairs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from avatarcli.artifact import ArtifactWriter, write_strings
from avatarcli.evaluation.plan import COEFF_METRICS, HIGHER_IS_BETTER, INCLUDED, NON_FINITE, REASONS, PairPlan
from avatarcli.schemas import EVAL


def write_part(path: Path, result: dict, metrics: list[str], fitted_sides: list[str]) -> None:
    """A clip pair's ``result`` (``values``/``excluded`` per metric; landmarks and found flags of the
    ``fitted_sides``, 'gen'/'ref') as a part file at ``path``."""
    fit_inputs = {f"{side}_{name}": result[f"{side}_{name}"] for side in fitted_sides for name in ("lmk", "found")}
    with open(path, "wb") as handle:  # a file object: np.savez would append .npz to a path
        np.savez(handle, values=np.stack([result["values"][m] for m in metrics], 1),
                 excluded=np.stack([result["excluded"][m] for m in metrics], 1).astype(np.uint8), **fit_inputs)


def read_fit_inputs(path: Path, side: str) -> tuple[np.ndarray, np.ndarray]:
    """The landmarks [T,68,2] and found flags [T] of a fitted side ('gen'/'ref') stored in a part."""
    with np.load(path) as part:
        return part[f"{side}_lmk"], part[f"{side}_found"]


def non_finite_warnings(pairs: list[PairPlan], parts: Iterable[Path], metrics: list[str]) -> list[str]:
    """One warning per clip pair (of ``pairs``, parts in that order) with frames excluded from
    AED/APD for non-finite coefficients, naming the clips and counting the frames. Read from the
    parts, so a resumed run warns about pairs finished before the interruption too."""
    columns = [col for col, m in enumerate(metrics) if m in COEFF_METRICS]
    warnings = []
    if not columns:
        return warnings
    for plan, path in zip(pairs, parts):
        with np.load(path) as part:
            count = int((part["excluded"][:, columns] == NON_FINITE).any(1).sum())
        if count:
            clips = plan.generated if plan.generated == plan.reference else \
                f"{plan.generated} (reference {plan.reference})"
            warnings.append(f"{clips}: {count} of {plan.frames} frames have non-finite coefficients (NaN or inf); "
                            f"excluded from {', '.join(metrics[col] for col in columns)}")
    return warnings


def json_number(value):
    """JSON has no inf/nan: inf -> "inf", nan -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def write_eval_artifact(output: Path, pairs: list[PairPlan], parts: Iterable[Path], metrics: list[str],
                        protocol: dict, config_json: dict, parents: list[tuple[str, str]], head: dict) -> dict:
    """The eval artifact from the part files of ``pairs`` (in that order), atomically; returns the
    summary (``head`` — generated, reference, source, mode, left_out, warnings — plus pairs, frames,
    per-metric overall means with their protocol, and per-clip means), also stored as ``summary_json``."""
    per_clip = []
    all_values: dict[str, list] = {m: [] for m in metrics}
    all_excluded: dict[str, list] = {m: [] for m in metrics}
    with ArtifactWriter(output, EVAL, config_json, parents) as writer:
        units = writer.handle.create_group("eval", track_order=True)
        clip_mean = np.full((len(pairs), len(metrics)), np.nan)
        clip_included = np.zeros((len(pairs), len(metrics)), np.int32)
        used_names: set[str] = set()
        for row, (plan, path) in enumerate(zip(pairs, parts)):
            with np.load(path) as part:
                values, excluded = part["values"], part["excluded"]
            name = plan.generated if plan.generated not in used_names else f"{plan.generated}@{plan.reference}"
            used_names.add(name)
            group = units.create_group(name)
            group.create_dataset("generated_frame", data=np.arange(plan.frames, dtype=np.int32))
            reference_frame = np.arange(plan.frames) if plan.reference_frames is None else plan.reference_frames
            group.create_dataset("reference_frame", data=np.asarray(reference_frame, np.int32))
            group.create_dataset("values", data=values.astype(np.float64))
            group.create_dataset("excluded", data=excluded.astype(np.uint8))
            group.attrs.update({"clip_id": plan.generated, "reference_clip": plan.reference, "source_clip": plan.source})
            for col, metric in enumerate(metrics):
                included = excluded[:, col] == INCLUDED
                clip_included[row, col] = int(included.sum())
                if included.any():
                    clip_mean[row, col] = float(values[included, col].mean())
                all_values[metric].append(values[:, col])
                all_excluded[metric].append(excluded[:, col])
            per_clip.append({"generated": plan.generated, "reference": plan.reference, "frames": plan.frames,
                             **{m: json_number(float(clip_mean[row, c])) for c, m in enumerate(metrics)}})
        index = writer.handle.create_group("index")
        write_strings(index, "clip_id", [p.generated for p in pairs])
        write_strings(index, "reference_clip", [p.reference for p in pairs])
        write_strings(index, "source_clip", [p.source for p in pairs])
        index.create_dataset("num_frames", data=np.asarray([p.frames for p in pairs], np.int32))
        index.create_dataset("clip_mean", data=clip_mean)
        index.create_dataset("clip_included", data=clip_included)
        write_strings(writer.handle.create_group("metrics"), "name", metrics)
        write_strings(writer.handle.create_group("reasons"), "text", list(REASONS))
        overall = {metric: _overall(np.concatenate(all_values[metric]), np.concatenate(all_excluded[metric]),
                                    metric, protocol[metric]) for metric in metrics}
        summary = {**head, "pairs": len(pairs), "frames": int(sum(p.frames for p in pairs)), "metrics": overall,
                   "clips": per_clip}
        writer.extra_attrs = {"protocol_json": json.dumps(protocol, sort_keys=True),
                              "summary_json": json.dumps(summary, sort_keys=True)}
    return summary


def _overall(values: np.ndarray, excluded: np.ndarray, metric: str, protocol: dict) -> dict:
    """A metric over every frame pair: mean of the included ones, counts, exclusion reasons, protocol."""
    included = excluded == INCLUDED
    reasons = {REASONS[code]: int((excluded == code).sum()) for code in np.unique(excluded) if code != INCLUDED}
    mean = float(values[included].mean()) if included.any() else None
    return {"mean": json_number(mean), "frames": int(included.sum()), "excluded": int((~included).sum()),
            "excluded_reasons": reasons, "higher_is_better": HIGHER_IS_BETTER[metric], "protocol": protocol}
