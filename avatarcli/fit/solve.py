"""The whole fit of a batch, coarse to fine: rigid pose on landmarks, then identity and expression
on landmarks (both by Gauss-Newton), then photometric refinement with lighting and albedo (Adam)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from avatarcli.fit.adam import DeviceAdam
from avatarcli.fit.config import FitConfig
from avatarcli.fit.gauss_newton import GaussNewtonStep
from avatarcli.fit.photometric import PhotometricTerm
from avatarcli.fit.problem import BatchFit
from avatarcli.runtime import CapturedCall


def fit_batch(fit: BatchFit, config: FitConfig, timer=None, progress=None) -> None:
    """Coarse to fine, in place on ``fit``'s parameters.

    ``timer``: optional :class:`avatarcli.timing.StepTimer` (steps 'rigid', 'landmarks',
    'photometric'); ``progress``: optional ``progress(step_name, iteration, iterations)``.
    """

    step = timer.step if timer is not None else None

    def run_gauss_newton(name, iters, shape):
        if iters <= 0:
            return
        gn_step = GaussNewtonStep(fit, shape, config.damping, config.cg_iters, config.cuda_graphs and iters > 2)
        with step(name, iters * len(fit.target)) if step else nullcontext():
            for i in range(iters):
                if shape and config.adapt_noise and i > 0 and i % max(1, iters // 4) == 0:
                    fit.update_landmark_noise()
                gn_step()
                if progress is not None:
                    progress(name, i + 1, iters)

    run_gauss_newton("rigid", config.rigid_iters, shape=False)
    run_gauss_newton("landmarks", config.iters, shape=True)
    if config.landmarks_only or config.photo_iters <= 0:
        return
    photo = PhotometricTerm(fit, config)
    params = [(fit.rot, 0.01), (fit.trans, 1.5), (fit.id, 0.06), (fit.exp, 0.03), (fit.light, 0.05),
              (fit.albedo_gain, 0.03)]
    if fit.albedo_coeffs is not None:
        params.append((fit.albedo_coeffs, 0.05))
    iters = config.photo_iters
    # decay to 5% of the initial rates: large steps find the basin, small ones settle in it
    adam = DeviceAdam(params, config.lr, gamma=0.05 ** (1.0 / max(1, iters)))

    def iteration():
        loss = (config.w_photo * photo.loss() + fit.landmark_loss() + fit.prior_loss()
                + fit.smooth_loss(with_light=True))
        adam.step(torch.autograd.grad(loss, adam.params))
        fit.project_constraints()

    # sampled pixels have fixed shapes, so the iterations between re-rasterizations replay as a graph
    graphs = config.cuda_graphs and fit.device.type == "cuda" and config.photo_samples > 0 and iters > 2
    iterate = CapturedCall(iteration) if graphs else iteration
    with step("photometric", iters * len(fit.target)) if step else nullcontext():
        for i in range(iters):
            if i % max(1, config.raster_every) == 0:
                photo.resample()
            elif config.photo_samples > 0 and i % max(1, config.sample_every) == 0:
                photo.resample(rasterize=False)
            iterate()
            if progress is not None:
                progress("photometric", i + 1, iters)
