"""Batched, damped, projected Gauss-Newton on the landmark objective of a :class:`BatchFit`.

One step: :func:`gn_system` (gradient, Hessian and preconditioner blocks), :func:`gn_factor` (the
preconditioner's SPD inverses; eager, cuSOLVER cannot be captured), :func:`gn_solve` (the PCG step
of :func:`gn_direction` and the per-clip line search). :class:`GaussNewtonStep` replays the first
and last phases as CUDA graphs.
"""

from __future__ import annotations

import warnings

import torch

from avatarcli.fit.problem import BatchFit
from avatarcli.runtime import capture_graph, on_side_stream


def gauss_newton_step(fit: BatchFit, shape: bool, damping: float, cg_iters: int = 4) -> None:
    """One damped, projected Gauss-Newton step on ``fit.landmark_objective``, in place.

    Unknowns: per frame rotation, translation (and expression when ``shape``), per clip identity
    (when ``shape``). The gradient is the exact one (autograd); the Hessian is 2 JᵀCJ of the
    landmark residuals with the IRLS weights of the robust loss, plus the priors and the exact
    smoothness coupling of neighbouring frames. The step solves that system by preconditioned
    conjugate gradients; the preconditioner solves it without the coupling, eliminating the
    frames through the Schur complement of the identity that a clip's frames share (so all frames
    of a clip, with their different poses, constrain the shape together). Expression weights at
    a bound whose gradient points outwards are held (projected Newton), and each clip takes the
    best of a few step lengths (monotone). No host synchronisation.
    """
    system = gn_system(fit, shape, damping)
    gn_solve(fit, system, gn_factor(fit, system), shape, cg_iters)


def gn_system(fit: BatchFit, shape: bool, damping: float) -> dict:
    """Phase 1: gradient, Hessian blocks and preconditioner blocks (tensors only, no host sync).

    Keys: ``A`` [T,P,P] data Hessian per frame, ``g`` [T,P] masked gradient, ``mask`` [T,P] free
    unknowns, ``pair_w`` [pairs,P] smoothness weights, ``diag`` [T,P] prior + damping diagonal,
    ``pre_x`` [T,P,P] preconditioner blocks; with ``shape`` also ``Bm`` [T,P,I] frame-identity
    coupling, ``h_id`` [C,I,I] identity Hessian and ``g_id`` [C,I] identity gradient."""
    params = [fit.rot, fit.trans] + ([fit.exp, fit.id] if shape else [])
    grads = torch.autograd.grad(fit.landmark_objective(shape), params)
    with torch.no_grad():
        c, jx, j_id = fit.landmark_jacobians(shape)
        T, P = jx.shape[0], jx.shape[2]
        cjx = c[..., None] * jx
        A = 2.0 * jx.transpose(1, 2) @ cjx  # [T,P,P]
        g = torch.cat(grads[:3], -1) if shape else torch.cat(grads, -1)  # [T,P]
        # smoothness: per pair weight of each unknown (its Hessian is a chain Laplacian)
        pair_w = (2.0 * fit.config.w_smooth * fit.pair_share)[:, None] * fit.smooth_scale[:P]  # [pairs,P]
        p0, p1 = fit.pairs, fit.pairs + 1
        smooth_diag = g.new_zeros(T, P).index_add_(0, p0, pair_w).index_add_(0, p1, pair_w)
        prior_diag = g.new_zeros(T, P)
        free = torch.ones_like(g, dtype=torch.bool)
        if shape:
            if fit.unit_exp:  # L1 prior on [0, 1]: no curvature, bounds
                g_exp, exp = grads[2], fit.exp
                free[:, 6:] = ~(((exp <= 0) & (g_exp > 0)) | ((exp >= 1) & (g_exp < 0)))
            else:
                prior_diag[:, 6:] = 2.0 * fit.config.w_expression * fit.frame_share[:, None] / fit.exp_std ** 2
        A_diag = A.diagonal(dim1=1, dim2=2)
        damp_x = damping * (A_diag + smooth_diag + prior_diag)
        mask = free.to(g.dtype)
        # preconditioner blocks: per frame, the smoothness Laplacian replaced by its diagonal
        pre_x = A + torch.diag_embed(smooth_diag + prior_diag + damp_x)
        pre_x = pre_x * (mask[:, :, None] * mask[:, None, :]) + torch.diag_embed(1.0 - mask)
        system = {"A": A, "g": g * mask, "mask": mask, "pair_w": pair_w, "diag": prior_diag + damp_x,
                  "pre_x": pre_x}
        if shape:
            system["Bm"] = 2.0 * cjx.transpose(1, 2) @ j_id * mask[..., None]  # [T,P,I]
            h_id = fit.clip_sum_rows(2.0 * j_id.transpose(1, 2) @ (c[..., None] * j_id))  # [C,I,I]
            h_id_diag = h_id.diagonal(dim1=1, dim2=2)
            id_diag = 2.0 * fit.config.w_identity / fit.id_std ** 2 + damping * h_id_diag
            system["h_id"] = h_id + torch.diag_embed(id_diag.expand_as(h_id_diag))
            system["g_id"] = grads[3]
    return system


def gn_factor(fit: BatchFit, system: dict) -> dict:
    """Phase 2: inverses of the preconditioner's SPD blocks (frames, then the identity's Schur
    complement). Explicit inverses make every later solve one batched matmul; cuSOLVER/MAGMA
    factorisations cannot be captured in a CUDA graph, so this phase always runs eagerly."""
    with torch.no_grad():
        factors = {"x_inv": spd_inverse(system["pre_x"])}
        if "Bm" in system:
            Bm = system["Bm"]
            a_inv_b = factors["x_inv"] @ Bm  # [T,P,I]
            schur = system["h_id"] - fit.clip_sum_rows(Bm.transpose(1, 2) @ a_inv_b)
            factors["a_inv_b"] = a_inv_b
            factors["id_inv"] = spd_inverse(schur)
    return factors


def gn_solve(fit: BatchFit, system: dict, factors: dict, shape: bool, cg_iters: int) -> None:
    """Phase 3: preconditioned conjugate gradients and the per-clip line search (no host sync)."""
    with torch.no_grad():
        step_x, step_id = gn_direction(fit, system, factors, shape, cg_iters)
        params = [fit.rot, fit.trans] + ([fit.exp, fit.id] if shape else [])
        line_search(fit, shape, params, [step_x[:, :3], step_x[:, 3:6]] + ([step_x[:, 6:], step_id] if shape else []))


def gn_direction(fit: BatchFit, system: dict, factors: dict, shape: bool, cg_iters: int):
    """The Gauss-Newton step of :func:`gn_system`'s system by ``cg_iters`` iterations of PCG with the
    preconditioner of :func:`gn_factor`: per-frame step [T,P] (rotation, translation, expression)
    and per-clip identity step [C,I] ([C,0] unless ``shape``)."""
    with torch.no_grad():
        A, g, mask, pair_w, diag = system["A"], system["g"], system["mask"], system["pair_w"], system["diag"]
        p0, p1 = fit.pairs, fit.pairs + 1
        x_inv = factors["x_inv"]

        def apply_x(v):  # (data + prior + damping) part of the per-frame blocks, masked
            return (A @ v[..., None])[..., 0] + diag * v

        def apply_smooth(v):
            diff = (v[p1] - v[p0]) * pair_w
            return v.new_zeros(v.shape).index_add_(0, p0, -diff).index_add_(0, p1, diff)

        if shape:
            Bm, h_id, a_inv_b, id_inv = system["Bm"], system["h_id"], factors["a_inv_b"], factors["id_inv"]
            frame_clip = fit.clip_of_frame

            def precondition(rx, ri):
                y = x_inv @ rx[..., None]
                zi = id_inv @ (ri - fit.clip_sum_rows(Bm.transpose(1, 2) @ y)[..., 0])[..., None]
                zx = (y - a_inv_b @ zi[frame_clip])[..., 0]
                return zx * mask, zi[..., 0]

            def apply(vx, vi):
                hx = apply_x(vx) + (Bm @ vi[frame_clip][..., None])[..., 0] + apply_smooth(vx)
                hi = fit.clip_sum_rows((Bm.transpose(1, 2) @ vx[..., None]))[..., 0] + (h_id @ vi[..., None])[..., 0]
                return hx * mask, hi

            def dot(ax, ai, bx, bi):
                return fit.clip_sum((ax * bx).sum(1)) + (ai * bi).sum(1)

            rhs = (-g, -system["g_id"])
        else:
            def precondition(rx, ri):
                return (x_inv @ rx[..., None])[..., 0] * mask, ri

            def apply(vx, vi):
                return (apply_x(vx) + apply_smooth(vx)) * mask, vi

            def dot(ax, ai, bx, bi):
                return fit.clip_sum((ax * bx).sum(1))

            rhs = (-g, g.new_zeros(len(fit.clips), 0))
        return pcg(apply, precondition, dot, rhs, cg_iters, fit.clip_of_frame)


def line_search(fit: BatchFit, shape: bool, params: list[torch.Tensor], steps: list[torch.Tensor],
                lengths=(1.0, 0.5, 0.25, 0.1)) -> None:
    """Per clip, move ``params`` by the step length (or none) that lowers the objective most.
    ``params``/``steps``: rotation, translation (and expression, identity when ``shape``)."""
    start = [p.detach().clone() for p in params]
    per_frame = [True, True] + ([True, False] if shape else [])  # identity is per clip

    def move(length_per_clip):
        for p, s0, d, frame in zip(params, start, steps, per_frame):
            scale = length_per_clip[fit.clip_of_frame] if frame else length_per_clip
            p.copy_(s0 + scale[:, None] * d)
        fit.project_constraints()

    best = fit.landmark_objective(shape, per_clip=True)
    best_length = torch.zeros_like(best)
    for length in lengths:
        trial = torch.full_like(best, length)
        move(trial)
        value = fit.landmark_objective(shape, per_clip=True)
        better = value < best
        best = torch.where(better, value, best)
        best_length = torch.where(better, trial, best_length)
    move(best_length)


def spd_inverse(A: torch.Tensor) -> torch.Tensor:
    """Inverses of the batched symmetric positive definite matrices ``A`` [B,N,N], by Cholesky after
    Jacobi scaling (so float32 copes with unknowns of very different units: radians, mm, blendshape
    weights). No host synchronisation (``cholesky_ex``)."""
    d = A.diagonal(dim1=1, dim2=2)
    inv_sqrt = torch.rsqrt(d.clamp(min=1e-12))  # [B,N]
    scaled = A * inv_sqrt[:, :, None] * inv_sqrt[:, None, :]
    # a touch of ridge keeps Cholesky of a (numerically) semi-definite block from failing
    chol, _ = torch.linalg.cholesky_ex(scaled + 1e-6 * torch.eye(A.shape[-1], device=A.device, dtype=A.dtype))
    return torch.cholesky_inverse(chol) * inv_sqrt[:, :, None] * inv_sqrt[:, None, :]


def pcg(apply, precondition, dot, rhs, iters: int, clip_of_frame: torch.Tensor):
    """Preconditioned conjugate gradients for the per-clip systems ``apply(x) = rhs`` (all clips at
    once; the unknowns are a pair (per-frame [T,P], per-clip [C,I]); ``dot`` gives per-clip inner
    products [C]; ``clip_of_frame`` [T]). A fixed number of iterations, so no host synchronisation."""
    bx, bi = rhs
    x_x, x_i = torch.zeros_like(bx), torch.zeros_like(bi)
    r_x, r_i = bx, bi
    z_x, z_i = precondition(r_x, r_i)
    p_x, p_i = z_x, z_i
    rz = dot(r_x, r_i, z_x, z_i)
    for _ in range(iters):
        q_x, q_i = apply(p_x, p_i)
        alpha = rz / dot(p_x, p_i, q_x, q_i).clamp(min=1e-30)
        x_x = x_x + alpha[clip_of_frame, None] * p_x
        x_i = x_i + alpha[:, None] * p_i
        r_x = r_x - alpha[clip_of_frame, None] * q_x
        r_i = r_i - alpha[:, None] * q_i
        z_x, z_i = precondition(r_x, r_i)
        rz_new = dot(r_x, r_i, z_x, z_i)
        beta = rz_new / rz.clamp(min=1e-30)
        p_x = z_x + beta[clip_of_frame, None] * p_x
        p_i = z_i + beta[:, None] * p_i
        rz = rz_new
    return x_x, x_i


class GaussNewtonStep:
    """:func:`gauss_newton_step` on ``fit`` as a callable; on CUDA (``graphs=True``) its first and
    last phases are replayed as CUDA graphs around the eager factorisations: a step is ~1000 small
    kernels, and launching them one by one from Python costs more than running them.

    The first call runs eagerly on a side stream (the warm-up), then records the graphs; later calls
    replay them. Replays compute what eager calls compute (up to rounding: cuBLAS may pick other
    kernels under capture). If capture fails, it warns and stays eager.
    """

    def __init__(self, fit: BatchFit, shape: bool, damping: float, cg_iters: int, graphs: bool):
        self.fit, self.shape, self.damping, self.cg_iters = fit, shape, damping, cg_iters
        self.graphs = graphs and fit.device.type == "cuda"
        self.system_graph = self.solve_graph = None
        self.system = self.factors = None

    def __call__(self) -> None:
        fit = self.fit
        if not self.graphs:
            gauss_newton_step(fit, self.shape, self.damping, self.cg_iters)
            return
        if self.solve_graph is not None:
            self.system_graph.replay()
            for name, value in gn_factor(fit, self.system).items():
                self.factors[name].copy_(value)
            self.solve_graph.replay()
            return

        def first_step():  # the real first step, and the warm-up
            system = gn_system(fit, self.shape, self.damping)
            factors = gn_factor(fit, system)
            gn_solve(fit, system, factors, self.shape, self.cg_iters)
            return factors

        factors = on_side_stream(first_step)
        try:
            def record_system():
                self.system = gn_system(fit, self.shape, self.damping)

            system_graph = capture_graph(record_system)
            self.factors = {name: torch.empty_like(value) for name, value in factors.items()}
            solve_graph = capture_graph(lambda: gn_solve(fit, self.system, self.factors, self.shape, self.cg_iters),
                                        pool=system_graph.pool())
            self.system_graph, self.solve_graph = system_graph, solve_graph
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
            warnings.warn(f"CUDA graph capture of the Gauss-Newton step failed ({exc}); running eagerly",
                          stacklevel=2)
            self.graphs, self.system, self.factors = False, None, None
