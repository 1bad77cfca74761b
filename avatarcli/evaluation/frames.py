"""Image and face metrics of one clip pair, in device batches (eval's per-frame work).

Per batch of frame pairs: PSNR/SSIM/LPIPS (optionally inside a face-region mask), then the face
analysis of generated and reference frames together (best face -> 5 points, 68 landmarks and
identity embeddings): CSIM and AKD. Results stay on the device and come back once per clip.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from avatarcli.evaluation.plan import (
    EMPTY_REGION, IMAGE_METRICS, INCLUDED, NO_FACE_GEN, NO_FACE_REF, NO_FACE_SRC, PairPlan, Side,
)


def load_face_analysis(config, device: torch.device | str, csim_model: str | None):
    """The :class:`avatarcli.face.analysis.FaceAnalysis` of eval's settings (``config``: an
    ``EvalConfig``: detector, landmark model, detector input side, padding and threshold), with the
    embedder ``csim_model`` (a registry name) or none."""
    from avatarcli.face.analysis import FaceAnalysis

    return FaceAnalysis.load(config.detector, config.landmark_model, config.models_dir, device,
                             det_size=config.det_size, det_pad=config.det_pad, det_threshold=config.det_threshold,
                             recognition=csim_model or None)


def to_size(frames: torch.Tensor, size: int) -> torch.Tensor:
    """[B,H,W,3] uint8 -> [B,size,size,3] uint8 (antialiased bilinear), unchanged when already that size."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def face_region_masks(model, faces: torch.Tensor, fit: dict, frames: np.ndarray, size: int,
                      device: torch.device) -> torch.Tensor:
    """[len(frames),size,size] bool: ``faces`` (the model's face-region triangles, on ``device``) of a
    fit (arrays ``identity``, ``expression``, ``pose6``, ``intrinsics`` [T,...]), rasterized at ``size``."""
    from avatarcli.camera import clip_from_camera, pose6_to_rt, world_to_camera
    from avatarcli.render.rasterize import rasterize

    identity = torch.as_tensor(fit["identity"][frames], device=device)
    expression = torch.as_tensor(fit["expression"][frames], device=device)
    verts = model.vertices(identity, expression)
    R, t = pose6_to_rt(torch.as_tensor(fit["pose6"][frames], device=device))
    K = torch.as_tensor(fit["intrinsics"][frames], device=device)
    cam = world_to_camera(verts, R, t)
    clip = clip_from_camera(cam, K, size, 10.0, 1e5)
    return rasterize(clip, faces, size, size, cull_backfaces=True).mask


def read_frames_at(reader, dataset: h5py.Dataset, indices, out: np.ndarray) -> np.ndarray:
    """Frames ``indices`` (any order) of ``dataset`` into ``out`` [len(indices),...], read as runs of
    consecutive frames (a rendered clip's driving frames are one run)."""
    indices = np.asarray(indices, np.int64)
    start = 0
    while start < len(indices):
        stop = start + 1
        while stop < len(indices) and indices[stop] == indices[stop - 1] + 1:
            stop += 1
        reader.read(dataset, int(indices[start]), int(indices[stop - 1]) + 1, out=out[start:stop])
        start = stop
    return out


def empty_result(plan: PairPlan, metrics: list[str]) -> dict:
    """Per-frame arrays of a clip pair before any metric: ``values`` (nan) and ``excluded`` (0) per
    metric [T]; ``gen_found``/``ref_found`` [T] bool; ``gen_lmk``/``ref_lmk`` [T,68,2] (nan)."""
    n = plan.frames
    return {"values": {m: np.full(n, np.nan) for m in metrics}, "excluded": {m: np.zeros(n, np.uint8) for m in metrics},
            "gen_found": np.zeros(n, bool), "ref_found": np.zeros(n, bool),
            "gen_lmk": np.full((n, 68, 2), np.nan, np.float32), "ref_lmk": np.full((n, 68, 2), np.nan, np.float32)}


def evaluate_frames(plan: PairPlan, config, metrics: list[str], gen: Side, ref: Side, src: Side | None,
                    size: int | None, faces, lpips_net, device: torch.device, timer, masks=None) -> dict:
    """Image and face metrics of one clip pair (:func:`empty_result`'s dict, filled); landmarks kept
    for the fits. ``faces``: a :class:`avatarcli.face.analysis.FaceAnalysis` or None (no face
    metrics); ``masks``: None, or (face model, face-region triangles, reference fit) to compute the
    image metrics inside the reference's face region (then no face analysis). ``config``: an
    ``EvalConfig`` (``batch_frames``, ``mode``, ``source_frame``)."""
    from avatarcli.artifact import FrameReader

    result = empty_result(plan, metrics)
    if not gen.has_frames or not ref.has_frames:
        return result  # coefficient metrics only
    reader = FrameReader()
    prefetch = ThreadPoolExecutor(max_workers=1)  # reads batch k+1 while the device works on batch k
    try:
        return _evaluate_batches(plan, config, metrics, gen, ref, src, size, faces, lpips_net, device, timer, masks,
                                 result, reader, prefetch)
    finally:
        prefetch.shutdown(wait=True)
        reader.close()


def _evaluate_batches(plan, config, metrics, gen, ref, src, size, faces, lpips_net, device, timer, masks, result,
                      reader, prefetch) -> dict:
    from avatarcli.metrics.image import psnr, ssim
    from avatarcli.metrics.lpips import to_lpips_input

    n, batch = plan.frames, config.batch_frames
    values, excluded = result["values"], result["excluded"]
    wants_faces = faces is not None and masks is None
    image_metrics = [m for m in metrics if m in IMAGE_METRICS]
    source_embedding = None
    # Per-batch results stay on the device and come back once per clip: a read-back per batch
    # would make the host wait for the GPU each time instead of queueing the next batch.
    on_device: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        on_device.setdefault(name, []).append(tensor)

    pinned = torch.device(device).type == "cuda"
    with h5py.File(gen.path, "r") as gh, h5py.File(ref.path, "r") as rh:
        gen_frames, ref_frames = gh["clips"][plan.generated]["frames"], rh["clips"][plan.reference]["frames"]

        def read(start: int):
            stop = min(n, start + batch)
            pair = []
            for frames, index in ((gen_frames, None), (ref_frames, plan.reference_frames)):
                # page-locked, so the upload is queued like a kernel instead of blocking the host
                buffer = torch.empty((stop - start, *frames.shape[1:]), dtype=torch.uint8, pin_memory=pinned)
                if index is None:
                    reader.read(frames, start, stop, out=buffer.numpy())
                else:  # a rendered clip: its reference frames are the driving frames it renders
                    read_frames_at(reader, frames, index[start:stop], buffer.numpy())
                pair.append(buffer)
            return pair

        starts = list(range(0, n, batch))
        pending = prefetch.submit(read, starts[0])
        if wants_faces and "csim" in metrics and config.mode == "cross-id":
            with h5py.File(src.path, "r") as sh:
                frame = config.source_frame
                source_frame = torch.as_tensor(sh["clips"][plan.source]["frames"][frame:frame + 1], device=device)
                found = faces.analyse(to_size(source_frame, size), with_embeddings=True, timer=timer)
                source_embedding = found["embeddings"] if bool(found["found"][0]) else None
        for k, start in enumerate(starts):
            stop = min(n, start + batch)
            with timer.step("read_wait", stop - start, sync=False):
                g_host, r_host = pending.result()
            if k + 1 < len(starts):
                pending = prefetch.submit(read, starts[k + 1])
            with timer.step("upload", stop - start):
                g = g_host.to(device, non_blocking=True)
                r = to_size(r_host.to(device, non_blocking=True), size)
            mask = None
            if masks is not None:
                model, region_faces, ref_fit = masks
                with timer.step("face_mask", stop - start):
                    mask = face_region_masks(model, region_faces, ref_fit, np.arange(start, stop), size, device)
                keep("empty", ~mask.flatten(1).any(1))
            if image_metrics:
                with timer.step("image_metrics", stop - start):
                    if "psnr" in metrics:
                        keep("psnr", psnr(g, r, mask))
                    if "ssim" in metrics:
                        keep("ssim", ssim(g, r, mask))
                    if "lpips" in metrics:
                        gi, ri = to_lpips_input(g), to_lpips_input(r)
                        if mask is not None:
                            gi, ri = gi * mask[:, None], ri * mask[:, None]
                        keep("lpips", lpips_net(gi, ri))
            if wants_faces:
                both = faces.analyse(torch.cat([g, r]), with_embeddings="csim" in metrics, timer=timer)
                count = stop - start
                keep("gen_found", both["found"][:count])
                keep("ref_found", both["found"][count:])
                keep("gen_lmk", both["lmk68"][:count])
                keep("ref_lmk", both["lmk68"][count:])
                if "csim" in metrics:
                    emb = both["embeddings"]
                    if config.mode == "same-id":
                        keep("csim", (emb[:count] * emb[count:]).sum(1))
                    elif source_embedding is not None:
                        keep("csim", (emb[:count] * source_embedding).sum(1))
    with timer.step("read_back", n, sync=False):
        host = {name: torch.cat(parts).double().cpu().numpy() if parts[0].is_floating_point()
                else torch.cat(parts).cpu().numpy() for name, parts in on_device.items()}
    for m in image_metrics:
        values[m][:] = host[m]
        if masks is not None:
            values[m][host["empty"]] = np.nan
            excluded[m][host["empty"]] = EMPTY_REGION
    if not wants_faces:
        return result
    _face_metrics(result, host, metrics, config.mode, source_embedding is not None)
    return result


def _face_metrics(result: dict, host: dict, metrics: list[str], mode: str, have_source: bool) -> None:
    """Landmarks, found flags, AKD and CSIM of a clip pair from the read-back batch outputs."""
    values, excluded = result["values"], result["excluded"]
    gf, rf = host["gen_found"], host["ref_found"]
    result["gen_found"][:], result["ref_found"][:] = gf, rf
    result["gen_lmk"][:] = np.where(gf[:, None, None], host["gen_lmk"], np.nan)
    result["ref_lmk"][:] = np.where(rf[:, None, None], host["ref_lmk"], np.nan)
    reason = np.where(~gf, NO_FACE_GEN, np.where(~rf, NO_FACE_REF, INCLUDED)).astype(np.uint8)
    if "akd" in metrics:
        d = np.linalg.norm(result["gen_lmk"].astype(np.float64) - result["ref_lmk"], axis=-1).mean(1)
        values["akd"][:] = np.where(gf & rf, d, np.nan)
        excluded["akd"][:] = reason
    if "csim" in metrics:
        if mode == "same-id":
            values["csim"][:] = np.where(gf & rf, host["csim"], np.nan)
            excluded["csim"][:] = reason
        elif not have_source:
            excluded["csim"][:] = NO_FACE_SRC
        else:
            values["csim"][:] = np.where(gf, host["csim"], np.nan)
            excluded["csim"][:] = np.where(~gf, NO_FACE_GEN, INCLUDED)
