"""The fitting solver (``avatarcli.fit``) on its own: objectives against plain-torch references,
Jacobians against autograd, PCG against dense solves, Gauss-Newton and photometric fits of
synthetic clips with known parameters, the device Adam against ``torch.optim.Adam``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ICT = "3dmm/ict_facekit/ict_face_light_f16.npz"


@pytest.fixture(scope="module")
def ict(assets):
    from avatarcli.facemodel import load_face_model

    return load_face_model(str(assets / ICT))


def synthetic_clip(model, frames=6, size=96, seed=0, name="synthetic", render=True):
    """A clip of the model with known parameters (independent of avatar synth): landmarks, and
    rendered frames with ``render``."""
    from avatarcli.camera import intrinsics_matrix, pose6_to_rt, project, world_to_camera
    from avatarcli.fit import ClipInput
    from avatarcli.render.mesh import render_mesh

    gen = torch.Generator().manual_seed(seed)
    identity = torch.randn(1, model.num_id, generator=gen) * 0.5
    expression = torch.zeros(frames, model.num_exp)
    time = torch.linspace(0, 1, frames)
    for k, channel in enumerate(torch.randperm(model.num_exp, generator=gen)[:5]):
        expression[:, channel] = 0.3 + 0.2 * torch.sin(time * 2 + k)
    pose = torch.zeros(frames, 6)
    pose[:, 1] = 0.25 * torch.sin(time * 2)  # yaw
    pose[:, 0] = 0.08 * torch.cos(time * 2)  # pitch
    pose[:, 5] = 1160.0
    verts = model.vertices(identity.expand(frames, -1), expression)
    R, t = pose6_to_rt(pose)
    nose = (R @ verts[:, model.lmk68[30], :, None])[..., 0]
    pose[:, 3:5] = -nose[:, :2]  # nose on the image centre, like preprocess crops
    R, t = pose6_to_rt(pose)
    K = intrinsics_matrix(1160.0 * size / 256, size / 2, size / 2)
    images = None
    if render:
        light = torch.zeros(frames, 9, 3)
        light[:, 1], light[:, 2] = 0.2, 0.15
        rendered = render_mesh(verts, model.faces, R, t, K, size, model.albedo_mean, light)
        images = (rendered.rgb.clamp(0, 1) * 255).round().byte()
        images[~rendered.mask] = 40
        images = images.numpy()
    lmk = project(world_to_camera(model.landmarks(verts), R, t), K)
    clip = ClipInput(name, lmk.numpy(), np.ones(frames, np.float32), 25.0, images)
    return clip, {"identity": identity, "expression": expression, "pose": pose, "verts": verts}


def moved_fit(model, clips, size=96, device="cpu", seed=0, **settings):
    """A BatchFit of ``clips`` with its parameters moved off zero (random but reproducible), so that
    every term and derivative is exercised away from the start."""
    from avatarcli.fit import BatchFit, FitConfig

    fit = BatchFit(model.to(device, torch.float32), clips, size, FitConfig(**settings), torch.device(device))
    gen = torch.Generator().manual_seed(seed)

    def noise(tensor, scale, low=-0.5):
        return ((torch.rand(tensor.shape, generator=gen) + low) * scale).to(device)

    with torch.no_grad():
        fit.rot.add_(noise(fit.rot, 0.1))
        fit.trans.add_(noise(fit.trans, 5.0))
        fit.id.add_(noise(fit.id, 0.5))
        fit.exp.add_(noise(fit.exp, 0.2, low=0.0))  # blendshape weights stay in [0, 1]
        fit.exp[:, ::4] = 0.0  # some at the lower bound
        fit.landmark_precision.copy_(torch.tensor([1.0, 4.0][:len(clips)], device=device))
    return fit


# ------------------------------------------------------------------------------------------------
# objectives and derivatives against references


def test_landmark_geometry_and_loss_match_plain_torch(ict):
    """The 68-row landmark geometry equals the full mesh's landmarks, and the landmark loss equals
    its definition written out clip by clip."""
    from avatarcli.camera import pose6_to_rt, project, world_to_camera

    clips = [synthetic_clip(ict, frames=n, seed=s, name=f"c{s}", render=False)[0] for s, n in ((0, 4), (1, 3))]
    clips[1].weights[:] = [1.0, 0.5, 1.0]
    fit = moved_fit(ict, clips)
    with torch.no_grad():
        R, t = pose6_to_rt(torch.cat([fit.rot, fit.trans], -1))
        full = ict.vertices(fit.id[fit.clip_of_frame], fit.exp)
        reference_2d = project(world_to_camera(ict.landmarks(full), R, t), fit.K)
        torch.testing.assert_close(fit.landmarks_2d(), reference_2d, atol=1e-3, rtol=0)
        expected = []
        start = 0
        for c, clip in enumerate(clips):
            frames = slice(start, start + len(clip.lmk68))
            start = frames.stop
            err = (reference_2d[frames] - torch.as_tensor(clip.lmk68)).norm(dim=-1) * 256 / 96
            rho = 4.0 * (torch.sqrt(1 + (err / 2.0) ** 2) - 1)  # pseudo-Huber at 2 px
            point_weight = torch.ones(68)
            point_weight[:17] = 0.3
            share = torch.as_tensor(clip.weights) / clip.weights.sum()
            expected.append(fit.landmark_precision[c] * (share * (rho * point_weight).mean(1)).sum())
        torch.testing.assert_close(fit.landmark_loss(per_clip=True), torch.stack(expected), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fit.landmark_loss(), torch.stack(expected).sum(), rtol=1e-4, atol=1e-6)


def test_landmark_jacobians_match_autograd(ict):
    """The analytic Jacobians of the residuals equal autograd's, and with the IRLS weights they give
    the exact gradient of the robust landmark loss (2 Jᵀ C e)."""
    clips = [synthetic_clip(ict, frames=n, seed=s, name=f"c{s}", render=False)[0] for s, n in ((0, 3), (1, 2))]
    fit = moved_fit(ict, clips)
    c, jx, j_id = fit.landmark_jacobians(shape=True)
    T = len(fit.target)
    rot, trans, exp, ident = (p.detach() for p in (fit.rot, fit.trans, fit.exp, fit.id))

    def residuals(rot_, trans_, exp_, id_):
        fit.rot, fit.trans, fit.exp, fit.id = rot_, trans_, exp_, id_
        return ((fit.landmarks_2d() - fit.target) * fit.px_scale).reshape(T, 136)

    jac = torch.autograd.functional.jacobian(residuals, (rot, trans, exp, ident), vectorize=True)
    frames = torch.arange(T)
    per_frame = [j[frames, :, frames] for j in jac[:3]]  # [T,136,k]: each frame's own unknowns
    torch.testing.assert_close(jx, torch.cat(per_frame, -1), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(j_id, jac[3][frames, :, fit.clip_of_frame], atol=2e-3, rtol=2e-3)
    # the IRLS weights make 2 Jᵀ C e the gradient of the robust loss
    fit.rot, fit.trans, fit.exp, fit.id = (p.clone().requires_grad_(True) for p in (rot, trans, exp, ident))
    grads = torch.autograd.grad(fit.landmark_loss(), [fit.rot, fit.trans, fit.exp, fit.id])
    with torch.no_grad():
        weighted = 2.0 * c * ((fit.landmarks_2d() - fit.target) * fit.px_scale).reshape(T, 136)
        torch.testing.assert_close((jx.transpose(1, 2) @ weighted[..., None])[..., 0],
                                   torch.cat(grads[:3], -1), atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(fit.clip_sum_rows((j_id.transpose(1, 2) @ weighted[..., None])[..., 0]),
                                   grads[3], atol=1e-5, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# linear algebra


def _block_system(device, dtype, clip_of_frame, P=3, I=2, seed=0):
    """Random SPD systems, one per clip, over (the clip's frames' [P] unknowns, its [I] unknowns):
    dense matrices [C,n_c,n_c] and apply / dot for :func:`pcg`."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.bincount(clip_of_frame).tolist()
    dense = []
    for n in counts:
        size = n * P + I
        root = torch.randn(size, size, generator=gen, dtype=torch.float64)
        dense.append((root @ root.T / size + 0.2 * torch.eye(size, dtype=torch.float64)).to(device, dtype))

    def split(vx, vi):
        out, start = [], 0
        for c, n in enumerate(counts):
            out.append(torch.cat([vx[start:start + n].reshape(-1), vi[c]]))
            start += n
        return out

    def join(vectors):
        return (torch.cat([v[:-I].reshape(-1, P) for v in vectors]), torch.stack([v[-I:] for v in vectors]))

    def apply(vx, vi):
        return join([H @ v for H, v in zip(dense, split(vx, vi))])

    def dot(ax, ai, bx, bi):
        return torch.stack([(a * b).sum() for a, b in zip(split(ax, ai), split(bx, bi))])

    return dense, split, join, apply, dot


def test_pcg_matches_dense_solve(device, dtype):
    """PCG of several clips at once (per-clip step lengths) equals a dense solve of each clip's
    system: in one iteration with the exact inverse as preconditioner, and with a Jacobi
    preconditioner after as many iterations as unknowns."""
    from avatarcli.fit.gauss_newton import pcg

    clip_of_frame = torch.tensor([0, 0, 0, 1, 1, 2], device=device)
    dense, split, join, apply, dot = _block_system(device, dtype, clip_of_frame)
    gen = torch.Generator().manual_seed(1)
    rhs = (torch.randn(6, 3, generator=gen).to(device, dtype), torch.randn(3, 2, generator=gen).to(device, dtype))
    expected = join([torch.linalg.solve(H, b) for H, b in zip(dense, split(*rhs))])
    inverses = [torch.linalg.inv(H) for H in dense]
    jacobi = [1.0 / H.diagonal() for H in dense]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)

    exact = pcg(apply, lambda rx, ri: join([M @ r for M, r in zip(inverses, split(rx, ri))]), dot, rhs, 1,
                clip_of_frame)
    jacobi_solution = pcg(apply, lambda rx, ri: join([d * r for d, r in zip(jacobi, split(rx, ri))]), dot, rhs,
                          3 * 3 + 2, clip_of_frame)
    for solution in (exact, jacobi_solution):
        torch.testing.assert_close(solution[0], expected[0], **tol)
        torch.testing.assert_close(solution[1], expected[1], **tol)


def test_spd_inverse_of_badly_scaled_blocks(device, dtype):
    """Unknowns in units 1e-3 to 1e3 apart (radians, mm, weights): the scaled Cholesky inverse is
    accurate relative to each entry's scale (up to its 1e-6 ridge), in float32 too."""
    from avatarcli.fit.gauss_newton import spd_inverse

    gen = torch.Generator().manual_seed(0)
    root = torch.randn(4, 5, 5, generator=gen, dtype=torch.float64)
    scale = torch.tensor([1e-3, 1.0, 1e3, 10.0, 0.1], dtype=torch.float64)
    A = (root @ root.transpose(1, 2) + torch.eye(5, dtype=torch.float64)) * scale[:, None] * scale[None, :]
    inverse = spd_inverse(A.to(device, dtype)).cpu().double()
    unscaled = inverse * scale[:, None] * scale[None, :]  # the inverse of the well-conditioned core
    expected = torch.linalg.inv(A) * scale[:, None] * scale[None, :]
    torch.testing.assert_close(unscaled, expected, atol=1e-4, rtol=0)


def test_gauss_newton_direction_solves_the_assembled_system(ict):
    """The PCG step of a shape (identity + expression) Gauss-Newton system equals a dense solve of
    that system assembled from its blocks (frames coupled by smoothness and by the clip's shared
    identity); unknowns held at a bound stay at zero. Damped enough to converge in float32 (at the
    default damping the depth-versus-size direction is nearly flat; the fit needs no exact step)."""
    from avatarcli.fit.gauss_newton import gn_direction, gn_factor, gn_system

    clips = [synthetic_clip(ict, frames=n, seed=s, name=f"c{s}", render=False)[0] for s, n in ((0, 4), (1, 3))]
    fit = moved_fit(ict, clips)
    system = gn_system(fit, shape=True, damping=0.1)
    factors = gn_factor(fit, system)
    step_x, step_id = gn_direction(fit, system, factors, shape=True, cg_iters=40)
    A, diag, mask, pair_w = (system[k].double() for k in ("A", "diag", "mask", "pair_w"))
    Bm, h_id, g, g_id = (system[k].double() for k in ("Bm", "h_id", "g", "g_id"))
    P, I = A.shape[-1], h_id.shape[-1]
    pair_of = {int(p): k for k, p in enumerate(fit.pairs)}
    assert (mask == 0).any() and (mask == 1).any()  # some expression weights are held at their bound
    start = 0
    for c, clip in enumerate(clips):
        frames = range(start, start + len(clip.lmk68))
        start = frames.stop
        n = len(frames)
        H = torch.zeros(n * P + I, n * P + I, dtype=torch.float64)
        for i, t in enumerate(frames):
            block = slice(i * P, (i + 1) * P)
            H[block, block] += A[t] + torch.diag(diag[t])
            H[block, n * P:] = Bm[t]
            H[n * P:, block] = Bm[t].T
            if t in pair_of and t + 1 in frames:  # smoothness between t and t+1
                w = torch.diag(pair_w[pair_of[t]])
                nxt = slice((i + 1) * P, (i + 2) * P)
                H[block, block] += w
                H[nxt, nxt] += w
                H[block, nxt] -= w
                H[nxt, block] -= w
        H[n * P:, n * P:] = h_id[c]
        free = torch.cat([mask[list(frames)].reshape(-1).bool(), torch.ones(I, dtype=torch.bool)])
        rhs = -torch.cat([g[list(frames)].reshape(-1), g_id[c]])
        solution = torch.zeros(n * P + I, dtype=torch.float64)
        solution[free] = torch.linalg.solve(H[free][:, free], rhs[free])
        got = torch.cat([step_x[list(frames)].reshape(-1), step_id[c]]).double()
        assert (got[~free] == 0).all()
        error = (got - solution).norm() / solution.norm()
        assert error < 1e-3, (c, float(error))


# ------------------------------------------------------------------------------------------------
# fits of synthetic clips


def test_gauss_newton_steps_lower_each_clips_objective(ict, device):
    """Every step of both landmark stages lowers (or keeps) each clip's objective, and a clip's fit
    does not depend on which other clip shares its batch."""
    from avatarcli.fit import BatchFit, FitConfig
    from avatarcli.fit.gauss_newton import GaussNewtonStep

    model = ict.to(device, torch.float32)
    clips = [synthetic_clip(ict, frames=n, seed=s, name=f"c{s}", render=False)[0] for s, n in ((0, 6), (1, 4))]
    config = FitConfig(landmarks_only=True, cuda_graphs=False)
    fit = BatchFit(model, clips, 96, config, torch.device(device))
    alone = BatchFit(model, clips[:1], 96, config, torch.device(device))
    start_px = fit.landmark_residual_px().mean().item()
    for shape, count in ((False, 4), (True, 10)):
        steps = [GaussNewtonStep(f, shape, config.damping, config.cg_iters, graphs=False) for f in (fit, alone)]
        for _ in range(count):
            with torch.no_grad():
                before = fit.landmark_objective(shape, per_clip=True)
            for step in steps:
                step()
            with torch.no_grad():
                after = fit.landmark_objective(shape, per_clip=True)
            assert (after <= before * (1 + 1e-6)).all(), (shape, before, after)
    assert fit.landmark_residual_px().mean().item() < 0.2 * start_px
    frames = len(clips[0].lmk68)
    for name, tol in (("rot", 1e-4), ("trans", 1e-2), ("exp", 1e-3)):
        gap = (getattr(fit, name)[:frames] - getattr(alone, name)).abs().max().item()
        assert gap < tol, (name, gap)


def test_landmark_fit_recovers_pose_on_synthetic(ict):
    from avatarcli.fit import BatchFit, FitConfig, fit_batch

    clip, truth = synthetic_clip(ict, render=False)
    config = FitConfig(landmarks_only=True)
    fit = BatchFit(ict, [clip], 96, config, torch.device("cpu"))
    fit_batch(fit, config)
    px = fit.landmark_residual_px().mean().item() * 256 / 96
    rot_err = torch.rad2deg((fit.rot.detach() - truth["pose"][:, :3]).abs()).mean(0)
    assert px < 1.5, px
    assert (rot_err < 5.0).all(), rot_err
    assert ((fit.exp >= 0) & (fit.exp <= 1)).all()


def test_landmark_fit_recovers_shape_on_synthetic(ict):
    """Gauss-Newton with a per-clip shared identity and the estimated (here ~0) landmark noise:
    face-region vertex error in model space, no alignment. Adam with the old prior gave 2.1 mm."""
    from avatarcli.fit import BatchFit, FitConfig, fit_batch

    errors = []
    for seed in (0, 1):
        clip, truth = synthetic_clip(ict, frames=12, seed=seed, render=False)
        config = FitConfig(landmarks_only=True)
        fit = BatchFit(ict, [clip], 96, config, torch.device("cpu"))
        fit_batch(fit, config)
        with torch.no_grad():
            verts = ict.vertices(fit.id.expand(len(fit.exp), -1), fit.exp)[:, ict.face_region]
            errors.append(float((verts - truth["verts"][:, ict.face_region]).norm(dim=-1).mean()))
    assert np.mean(errors) < 1.5, errors


def test_photometric_stage_lowers_the_photometric_error(ict):
    from dataclasses import replace

    from avatarcli.fit import BatchFit, FitConfig, PhotometricTerm, fit_batch

    clip, _ = synthetic_clip(ict, frames=3, size=64)
    config = FitConfig(photo_size=64, photo_iters=25, rigid_iters=40, iters=60)
    fit = BatchFit(ict, [clip], 64, config, torch.device("cpu"))
    fit_batch(fit, replace(config, landmarks_only=True))
    with torch.no_grad():
        before = PhotometricTerm(fit, config).loss().item()
        # the face-region submesh the term renders is the full mesh's face region
        torch.testing.assert_close(PhotometricTerm(fit, config).vertices(),
                                   fit.vertices()[:, ict.face_region.sort().values], atol=1e-3, rtol=0)
    fit_photo = BatchFit(ict, [clip], 64, config, torch.device("cpu"))
    fit_batch(fit_photo, config)
    with torch.no_grad():
        after = PhotometricTerm(fit_photo, config).loss().item()
    assert after < 0.7 * before, (before, after)


def test_batch_results_arrays(ict):
    from avatarcli.fit import BatchFit, FitConfig, batch_results

    clips = [synthetic_clip(ict, frames=n, seed=s, name=f"c{s}", render=False)[0] for s, n in ((0, 4), (1, 3))]
    fit = BatchFit(ict, clips, 96, FitConfig(), torch.device("cpu"))
    results = batch_results(fit)
    assert [r["name"] for r in results] == ["c0", "c1"]
    for result, clip in zip(results, clips):
        T = len(clip.lmk68)
        assert result["expression"].shape == (T, ict.num_exp) and result["pose6"].shape == (T, 6)
        assert result["camera25"].shape == (T, 25) and result["albedo"].shape == (ict.num_vertices, 3)
        assert all(v.dtype == np.float32 for v in result.values() if isinstance(v, np.ndarray))
    with torch.no_grad():
        np.testing.assert_allclose(results[1]["lmk_error"], fit.landmark_residual_px().mean(1)[4:].numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# optimizer and CUDA graphs


def test_device_adam_matches_torch_adam(device):
    from avatarcli.fit import DeviceAdam

    gen = torch.Generator().manual_seed(0)
    target = [torch.randn(5, 3, generator=gen).to(device), torch.randn(4, generator=gen).to(device)]
    ours = [torch.zeros(5, 3, device=device), torch.zeros(4, device=device)]
    theirs = [p.clone().requires_grad_(True) for p in ours]
    adam = DeviceAdam([(ours[0], 0.1), (ours[1], 0.03)], scale=2.0, gamma=0.9)
    reference = torch.optim.Adam([{"params": [theirs[0]], "lr": 0.2}, {"params": [theirs[1]], "lr": 0.06}])
    schedule = torch.optim.lr_scheduler.ExponentialLR(reference, gamma=0.9)
    for _ in range(20):
        adam.step([2 * (p - t) ** 3 for p, t in zip(ours, target)])
        reference.zero_grad()
        sum(((p - t) ** 4).sum() / 2 for p, t in zip(theirs, target)).backward()
        reference.step()
        schedule.step()
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine, ref.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_steps_match_eager_steps(ict):
    """Gauss-Newton steps and photometric iterations replayed as CUDA graphs compute what eager ones
    compute, step by step (rounding aside: cuBLAS may pick other kernels under capture)."""
    from avatarcli.fit import BatchFit, FitConfig, GaussNewtonStep, fit_batch

    model = ict.to("cuda", torch.float32)
    clips = [synthetic_clip(ict, frames=10, seed=seed)[0] for seed in (0, 1, 2)]
    fits = {graphs: BatchFit(model, clips, 96, FitConfig(), torch.device("cuda")) for graphs in (False, True)}
    tolerance = {"rot": 1e-5, "trans": 1e-2, "exp": 1e-4, "id": 1e-3}
    for shape, count in ((False, 5), (True, 8)):
        steps = {g: GaussNewtonStep(fits[g], shape, 1e-4, 12, graphs=g) for g in fits}
        for _ in range(count):
            for g in fits:
                steps[g]()
            for name, tol in tolerance.items():
                gap = (getattr(fits[True], name) - getattr(fits[False], name)).abs().max().item()
                assert gap < tol, (shape, name, gap)
    assert steps[True].solve_graph is not None  # it was replayed, not eager
    # the photometric stage (sampled pixels) from the same start
    results = {}
    for graphs in (False, True):
        config = FitConfig(rigid_iters=0, iters=0, photo_iters=6, raster_every=3, photo_size=64, cuda_graphs=graphs)
        fit = BatchFit(model, clips, 96, config, torch.device("cuda"))
        with torch.no_grad():
            for name in ("rot", "trans", "exp", "id"):
                getattr(fit, name).copy_(getattr(fits[False], name))
        fit_batch(fit, config)
        results[graphs] = {name: getattr(fit, name).detach() for name in ("rot", "trans", "exp", "id", "light", "albedo_gain")}
    for name, eager in results[False].items():
        torch.testing.assert_close(results[True][name], eager, atol=1e-4, rtol=1e-4, msg=name)
