"""Basel Face Model 2009 in Deep3DFaceRecon's ``BFM_model_front.mat`` layout.

The BFM is not redistributable: users obtain ``01_MorphableModel.mat`` from the University of
Basel and build ``BFM_model_front.mat`` with Deep3DFaceRecon's instructions (its
``util/load_mats.py: transferBFM09`` plus ``Exp_Pca.bin`` from Guo et al.). That file holds
(MATLAB 1-based ids; ``V`` = 35709 front vertices):

* ``meanshape`` (1, 3V), ``idBase`` (3V, 80), ``exBase`` (3V, 64): **decimetres** (BFM09's µm
  divided by 1e5: the face is about ±0.8 units wide, the camera sits at 10 units), y up,
  +z towards the camera; rows interleaved x0 y0 z0 x1 ...; bases already multiplied by their
  standard deviations, so coefficients are ~ N(0, 1);
* ``meantex`` (1, 3V) and ``texBase`` (3V, 80): 0..255 RGB;
* ``tri`` (70789, 3), ``keypoints`` (1, 68), ``point_buf`` (V, 8), ``frontmask2_idx``,
  ``skinmask`` (1, V), ``tri_mask2`` — the topology (also in the shared ``facemodel_info.mat``).

Like Deep3DFaceRecon's ``ParametricFaceModel(recenter=True)``, :func:`load_bfm` subtracts the mean
over vertices from the mean shape (the bases are left as they are), then scales everything by 100
to millimetres. So ``vertices(id, exp) = 100 * Deep3DFaceRecon.compute_shape(id, exp)`` with the
same coefficients.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from avatarcli.errors import AvatarError
from avatarcli.facemodel.base import LinearFaceModel

BFM_UNITS_TO_MM = 100.0
BFM_FILENAME = "BFM_model_front.mat"
REQUIRED_KEYS = ("meanshape", "idBase", "exBase", "tri", "keypoints")


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is a dependency
        raise AvatarError("reading BFM .mat files needs scipy (pip install scipy)") from None
    try:
        return loadmat(str(path))
    except NotImplementedError:
        # MATLAB v7.3 files are HDF5; h5py stores them transposed.
        import h5py

        with h5py.File(path, "r") as handle:
            return {k: np.asarray(v).T for k, v in handle.items() if isinstance(v, h5py.Dataset)}
    except (OSError, ValueError) as exc:
        raise AvatarError(f"{path}: not a readable .mat file ({exc})") from None


def _basis(flat: np.ndarray, v: int, scale: float) -> np.ndarray:
    """``(3V, K)`` interleaved -> ``(K, V, 3)`` float32 times ``scale``."""
    flat = np.asarray(flat, dtype=np.float32)
    if flat.ndim != 2 or flat.shape[0] != 3 * v:
        raise AvatarError(f"BFM basis has shape {flat.shape}, expected (3*{v}, K)")
    return np.ascontiguousarray(flat.T.reshape(flat.shape[1], v, 3)) * np.float32(scale)


def load_bfm(
    path: str | os.PathLike,
    *,
    recenter: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LinearFaceModel:
    """Load Deep3DFaceRecon's ``BFM_model_front.mat`` as a :class:`LinearFaceModel` in mm.

    Args:
        path: the .mat file.
        recenter: subtract the vertex mean from ``meanshape`` (Deep3DFaceRecon's default).
        dtype, device: where the tensors go.

    Returns:
        ``name="bfm"``, ``mean`` ``[V,3]``, ``id_basis`` ``[80,V,3]``, ``exp_basis`` ``[64,V,3]``
        (mm per unit coefficient), ``exp_range="gaussian"``, ``id_std = exp_std = 1``,
        ``albedo_mean`` ``[V,3]`` = ``meantex / 255``, ``albedo_basis`` ``[80,V,3]`` =
        ``texBase / 255``, 0-based ``faces`` and ``lmk68 = keypoints - 1``, ``face_region`` =
        ``frontmask2_idx - 1`` (all vertices when absent). ``extra``: ``point_buf`` ``[V,8]``
        (0-based face ids per vertex; the value ``F`` means "no face": Deep3DFaceRecon appends a
        zero normal), ``skinmask`` ``[V]`` bool, ``front_faces`` (``tri_mask2 - 1``).
    """
    from avatarcli.registry import file_sha256

    path = Path(path)
    mat = _loadmat(path)
    missing = [k for k in REQUIRED_KEYS if k not in mat]
    if missing:
        raise AvatarError(f"{path}: not a Deep3DFaceRecon BFM_model_front.mat (missing {', '.join(missing)})")
    mean = np.asarray(mat["meanshape"], dtype=np.float64).reshape(-1, 3)
    v = mean.shape[0]
    if recenter:
        mean = mean - mean.mean(axis=0, keepdims=True)
    scale = BFM_UNITS_TO_MM

    def floats(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device=device, dtype=dtype)

    def ids(key: str, shape_last: int | None = None) -> torch.Tensor | None:
        if key not in mat:
            return None
        array = np.asarray(mat[key]).astype(np.int64) - 1
        array = array.reshape(-1, shape_last) if shape_last else array.reshape(-1)
        return torch.from_numpy(array).to(device=device)

    faces = ids("tri", 3)
    lmk = ids("keypoints")
    if int(faces.min()) < 0 or int(faces.max()) >= v or lmk.shape != (68,) or int(lmk.max()) >= v:
        raise AvatarError(f"{path}: tri / keypoints do not fit the {v} vertices (expected 1-based MATLAB ids)")
    id_basis = floats(_basis(mat["idBase"], v, scale))
    exp_basis = floats(_basis(mat["exBase"], v, scale))
    albedo_mean = albedo_basis = None
    if "meantex" in mat:
        albedo_mean = floats(np.asarray(mat["meantex"], dtype=np.float32).reshape(v, 3) / 255.0)
        if "texBase" in mat:
            albedo_basis = floats(_basis(mat["texBase"], v, 1.0 / 255.0))
    region = ids("frontmask2_idx")
    skin = None
    if "skinmask" in mat:
        skin = torch.from_numpy(np.asarray(mat["skinmask"]).reshape(-1) > 0).to(device=device)
    extra = {
        "point_buf": ids("point_buf", 8),
        "skinmask": skin,
        "front_faces": ids("tri_mask2", 3),
    }
    return LinearFaceModel(
        name="bfm",
        mean=floats(mean * scale),
        id_basis=id_basis,
        exp_basis=exp_basis,
        faces=faces,
        lmk68=lmk,
        exp_range="gaussian",
        face_region=region if region is not None else torch.arange(v, device=device),
        units_to_mm=scale,
        source_units="dm",
        sha256=file_sha256(path),
        exp_names=None,
        id_std=torch.ones(id_basis.shape[0], dtype=dtype, device=device),
        exp_std=torch.ones(exp_basis.shape[0], dtype=dtype, device=device),
        albedo_mean=albedo_mean,
        albedo_basis=albedo_basis,
        extra=extra,
    )
