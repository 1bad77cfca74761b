"""AED/APD: landmark-only face-model fits of analysed clips, and coefficient distances.

Clips artifacts are fitted with the fit-3dmm solver (:mod:`avatarcli.fit`, landmarks only) on the
68 landmarks eval found; coeffs artifacts are read as they are.
"""

from __future__ import annotations

import numpy as np

from avatarcli.artifact import open_artifact
from avatarcli.evaluation.plan import COEFF_METRICS, INCLUDED, NO_FACE_GEN, NO_FACE_REF, NO_FIT, NON_FINITE, Side
from avatarcli.schemas import COEFFS

DECIMETRE_MM = 100.0
FIT_FPS = 25.0
"""Frame rate given to the solver (its smoothness term is per frame, so it does not use it)."""


def fill_missing(points: np.ndarray, found: np.ndarray) -> np.ndarray:
    """[T,P,2] with nan rows where not found -> every row filled from the nearest found frames."""
    t = np.arange(len(points))
    flat = points.reshape(len(points), -1).copy()
    for column in range(flat.shape[1]):
        flat[:, column] = np.interp(t, t[found], flat[found, column])
    return flat.reshape(points.shape)


class LandmarkFits:
    """Landmark-only fits of clips added one by one, in batches of whole clips of at most
    ``batch_frames`` frames (:func:`avatarcli.fit.plan_batches`).

    A batch is fitted as soon as the next clip no longer fits into it, so the batches are exactly
    those of planning all clips at once in the order they were added, while a caller can finish
    (and save) the clip pairs whose fits are done. A clip without any detected face is not fitted
    (its result is None).

    A resumed run adds the clips of finished pairs too (``wanted=False``, from their parts), so each
    clip is fitted in the batch it has in an uninterrupted run: a batch of one clip rounds
    differently from a batch of more (~1e-4 in AED/APD; the solver's batched matrix-vector products
    take another kernel for a batch of one). A batch holding a wanted clip is fitted whole, the
    unwanted clips' results dropped; a batch of unwanted clips only is not fitted.
    """

    def __init__(self, model, size: int, fit_config, batch_frames: int, device, timer):
        self.model, self.size, self.fit_config = model, size, fit_config
        self.batch_frames, self.device, self.timer = batch_frames, device, timer
        self.queue: list = []  # ClipInputs of the batch being filled
        self.wanted: list[bool] = []  # per queued clip: its result is kept
        self.results: dict[str, dict | None] = {}

    def add(self, name: str, lmk68: np.ndarray, found: np.ndarray, wanted: bool = True) -> None:
        """``lmk68`` [T,68,2] crop px, nan where no face; ``found`` [T] bool. ``wanted=False``: a
        clip that only takes its place in the batches (its result is not kept)."""
        from avatarcli.fit import ClipInput, plan_batches

        if not found.any():
            if wanted:
                self.results[name] = None
            return
        self.queue.append(ClipInput(name, fill_missing(lmk68, found).astype(np.float32), found.astype(np.float32),
                                    FIT_FPS))
        self.wanted.append(wanted)
        batches = plan_batches([c.name for c in self.queue], [len(c.lmk68) for c in self.queue], self.batch_frames)
        if len(batches) > 1:  # the batch before this clip is complete
            self._fit_wanted(len(batches[0]))

    def flush(self) -> None:
        """Fit the last, partly filled batch."""
        if self.queue:
            self._fit_wanted(len(self.queue))

    def _fit_wanted(self, count: int) -> None:
        """Fit the first ``count`` queued clips if any of them is wanted; keep the wanted results."""
        clips, wanted = self.queue[:count], self.wanted[:count]
        self.queue, self.wanted = self.queue[count:], self.wanted[count:]
        if any(wanted):
            self._fit(clips)
            for clip, keep in zip(clips, wanted):
                if not keep:
                    del self.results[clip.name]

    def ready(self, name: str) -> bool:
        return name in self.results

    def pop(self, name: str) -> dict | None:
        """The fit-3dmm unit arrays of a fitted clip (expression, rotation, translation, identity,
        pose6, intrinsics, ... [T,...]), or None for a clip that could not be fitted."""
        return self.results.pop(name)

    def _fit(self, clips: list) -> None:
        import torch

        from avatarcli.fit import BatchFit, batch_results, fit_batch

        with self.timer.step("fit", sum(len(c.lmk68) for c in clips)):
            fit = BatchFit(self.model, clips, self.size, self.fit_config, torch.device(self.device))
            fit_batch(fit, self.fit_config, self.timer)
            for result in batch_results(fit):
                self.results[result["name"]] = result


def coefficient_distances(gen: dict, ref: dict, apd: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame AED and APD of two coefficient sets (arrays [T,...], same T).

    AED: mean |Δ expression| over the coefficients. APD: mean |Δ (pitch, yaw, roll)| in radians, and
    with 'angles+translation' also |Δ translation| in decimetres, over the 3 or 6 values.
    """
    aed = np.abs(gen["expression"].astype(np.float64) - ref["expression"].astype(np.float64)).mean(1)
    d_angles = np.abs(gen["rotation"].astype(np.float64) - ref["rotation"].astype(np.float64))
    if apd == "angles":
        return aed, d_angles.mean(1)
    d_trans = np.abs(gen["translation"].astype(np.float64) - ref["translation"].astype(np.float64)) / DECIMETRE_MM
    return aed, np.concatenate([d_angles, d_trans], 1).mean(1)


COMPARED = ("expression", "rotation", "translation")
"""The coefficients AED/APD compare."""


def finite_frames(fit: dict) -> np.ndarray:
    """[T] bool: the frames whose expression, rotation and translation are all finite (a coeffs
    artifact or a landmark fit may hold NaN or inf; such a frame has no distance to score)."""
    return np.logical_and.reduce([np.isfinite(fit[k].reshape(len(fit[k]), -1)).all(1) for k in COMPARED])


def coefficient_metrics(result: dict, metrics: list[str], apd: str, gen: Side, ref: Side,
                        gen_fit: dict | None, ref_fit: dict | None) -> None:
    """AED/APD values and exclusions of a clip pair into ``result`` (of
    :func:`avatarcli.evaluation.frames.evaluate_frames`); a fit of None: the clip could not be fitted."""
    values, excluded = result["values"], result["excluded"]
    if gen_fit is None or ref_fit is None:  # a side without any detected face could not be fitted
        for m in COEFF_METRICS:
            if m in metrics:
                excluded[m][:] = NO_FIT
        return
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: such frames are excluded below
        aed, apd_values = coefficient_distances(gen_fit, ref_fit, apd)
    reason = np.zeros(len(aed), np.uint8)
    if gen.has_frames:
        reason = np.where(~result["gen_found"], NO_FACE_GEN, reason)
    if ref.has_frames:
        reason = np.where((reason == INCLUDED) & ~result["ref_found"], NO_FACE_REF, reason)
    finite = finite_frames(gen_fit) & finite_frames(ref_fit)
    reason = np.where((reason == INCLUDED) & ~finite, NON_FINITE, reason)
    valid = reason == INCLUDED
    for m, v in (("aed", aed), ("apd", apd_values)):
        if m in metrics:
            values[m] = np.where(valid, v, np.nan)
            excluded[m] = reason.astype(np.uint8)


def read_coeffs(path, clip: str, frames: int, index=None) -> dict:
    """The first ``frames`` frames of a coeffs artifact's clip (the arrays AED/APD and face masks use),
    or with ``index`` (a rendered clip's driving frames) the frames ``index``."""
    names = ("expression", "rotation", "translation", "identity", "pose6", "intrinsics")
    with open_artifact(path, COEFFS.kind) as handle:
        group = handle["coeffs"][clip]
        if index is not None:
            return {k: group[k][()][np.asarray(index, np.int64)] for k in names}
        return {k: group[k][:frames] for k in names}
