"""What each eval number means: models with hashes, crops, resolution, region, distance."""

from __future__ import annotations

from pathlib import Path

from avatarcli.evaluation.plan import COEFF_METRICS, Side


def model_entry(name: str, path) -> dict:
    """A model of the protocol: registry name, file, sha256 and where it comes from."""
    from avatarcli.registry import file_sha256, get_spec

    spec = get_spec(name)
    return {"name": name, "file": Path(path).name, "sha256": file_sha256(Path(path)), "source": spec.source}


def build_protocol(config, metrics: list[str], gen: Side, ref: Side, size: int | None, faces,
                   csim_model: str) -> dict:
    """The protocol of every metric, by name. ``faces``: the
    :class:`avatarcli.face.analysis.FaceAnalysis` used (None without face analysis); ``config``:
    an ``EvalConfig``."""
    from avatarcli.metrics.image import SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_TRUNCATE
    from avatarcli.registry import resolve

    resized = bool(size and ref.size and ref.size != size)
    resolution = f"{size}x{size}" if size else None
    region = ("frame" if config.region == "frame" else
              f"face: face-region triangles of the reference's landmark fit ({config.face_model}), rasterized")
    common = {"resolution": resolution, "region": region,
              "reference_resized": f"{ref.size}->{size}, antialiased bilinear" if resized else "no"}
    detector = None
    if faces is not None:
        detector = {**model_entry(config.detector, faces.detector_path), "input_side": config.det_size,
                    "padding": config.det_pad, "threshold": config.det_threshold, "face": "highest score"}
    fitter = _fitter_entry(config, metrics, gen, ref, faces, detector)
    protocol: dict[str, dict] = {}
    for metric in metrics:
        if metric == "psnr":
            protocol[metric] = {**common, "definition": "10*log10(255^2 / MSE), MSE over pixels and RGB channels",
                                "data_range": 255, "identical": "inf"}
        elif metric == "ssim":
            protocol[metric] = {**common, "definition": "Wang et al. 2004, per RGB channel then averaged",
                                "window": f"gaussian sigma={SSIM_SIGMA}, truncate={SSIM_TRUNCATE} (11x11)",
                                "K1": SSIM_K1, "K2": SSIM_K2, "covariance": "population",
                                "border": "5 px dropped (window interior)", "data_range": 255,
                                "equals": "skimage structural_similarity(gaussian_weights=True, sigma=1.5, "
                                          "use_sample_covariance=False, data_range=255, channel_axis=-1)"}
        elif metric == "lpips":
            protocol[metric] = {**common, "network": "alex", "version": "0.1", "input": "RGB in [-1,1]",
                                "models": [model_entry(n, resolve(n, config.models_dir))
                                           for n in ("alexnet_imagenet", "lpips_alex_lin")],
                                "masking": "pixels outside the region set to 0 on both sides" if config.region == "face" else "none"}
        elif metric == "csim":
            protocol[metric] = {"model": model_entry(csim_model, faces.embedder.path),
                                "alignment": "ArcFace 5-point template, least-squares similarity, 112x112, bilinear, black border",
                                "keypoints": detector, "distance": "cosine of L2-normalised embeddings",
                                "pairs": ("generated frame t vs reference frame t" if config.mode == "same-id" else
                                          f"generated frame t vs frame {config.source_frame} of the source clip"),
                                "resolution": resolution, "comparable_to_published": csim_model == "arcface_r50"}
        elif metric == "akd":
            protocol[metric] = {"landmarks": model_entry(config.landmark_model, faces.landmark_path),
                                "detector": detector, "points": 68,
                                "distance": "mean Euclidean distance over the 68 points, px", "resolution": resolution}
        elif metric == "aed":
            protocol[metric] = {**fitter, "distance": "L1: mean |delta| over the expression coefficients"}
        elif metric == "apd":
            protocol[metric] = {**fitter, "convention": config.apd,
                                "distance": "L1: mean |delta| over (pitch, yaw, roll) radians"
                                + (" and (tx, ty, tz) decimetres" if config.apd == "angles+translation" else "")}
    return protocol


def _fitter_entry(config, metrics: list[str], gen: Side, ref: Side, faces, detector: dict | None) -> dict | None:
    """Where AED/APD's coefficients come from: eval's landmark fits, or the coeffs inputs as given."""
    if not any(m in COEFF_METRICS for m in metrics):
        return None
    if gen.has_frames or ref.has_frames:
        from avatarcli.facemodel import resolve_face_model
        from avatarcli.registry import file_sha256

        _, fm_path = resolve_face_model(config.face_model, config.models_dir)
        return {"extractor": "avatar fit-3dmm, landmarks only, on the evaluated frames' 68 landmarks",
                "face_model": config.face_model, "face_model_sha256": file_sha256(fm_path),
                "rigid_iters": config.fit_rigid_iters, "iters": config.fit_iters,
                "identity_weight": config.fit_identity_weight,
                "landmarks": model_entry(config.landmark_model, faces.landmark_path) if faces else None,
                "detector": detector}
    return {"extractor": "coefficients as given (no re-fitting)", "face_model": gen.face_model,
            "face_model_sha256": gen.face_model_sha256}
