"""The 3D morphable model fitting solver, for ``avatar fit-3dmm``, eval's landmark fits and trainers.

Modules (``config`` is torch-free; the others import torch, so the names below load lazily):

- ``config``: :class:`FitConfig`, every solver setting.
- ``inputs``: :class:`ClipInput` (a clip's landmarks and frames), :func:`read_clip_inputs`, :func:`plan_batches`.
- ``problem``: :class:`BatchFit`, the parameters, objectives and landmark Jacobians of a batch of clips.
- ``gauss_newton``: Gauss-Newton steps (Schur complement of the shared identity, PCG, line search),
  :class:`GaussNewtonStep` (replayed as CUDA graphs).
- ``photometric``: :class:`PhotometricTerm`; ``adam``: :class:`DeviceAdam`.
- ``solve``: :func:`fit_batch`, the coarse-to-fine fit of a batch.
- ``results``: :func:`batch_results`; ``preview``: :func:`write_preview`;
  ``synthetic``: :func:`synthetic_errors` against ``avatar synth``'s truth.

Typical use::

    config = FitConfig(landmarks_only=True)
    fit = BatchFit(model, clips, crop_size, config, torch.device("cpu"))
    fit_batch(fit, config)
    arrays = batch_results(fit)
"""

from __future__ import annotations

from importlib import import_module

from avatarcli.fit.config import FitConfig

_LAZY = {
    "ClipInput": "inputs", "read_clip_inputs": "inputs", "plan_batches": "inputs",
    "BatchFit": "problem",
    "GaussNewtonStep": "gauss_newton", "gauss_newton_step": "gauss_newton",
    "PhotometricTerm": "photometric", "DeviceAdam": "adam",
    "fit_batch": "solve", "batch_results": "results", "write_preview": "preview",
    "synthetic_errors": "synthetic",
}

__all__ = ["FitConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"avatarcli.fit.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'avatarcli.fit' has no attribute {name!r}")
