"""Linear 3D face models behind one interface (:class:`LinearFaceModel`), all in millimetres.

``load_face_model(name_or_path)``:

* ``"ict"`` / ``"ict_facekit"`` — ICT-FaceKit Light (MIT) through the model registry: the compact
  ``3dmm/ict_facekit/ict_face_light_f16.npz`` is searched in ``--models``, ``$AVATAR_MODELS`` and the
  cache (at ``<dir>/3dmm/ict_facekit/`` or ``<dir>/``), else built from the official repository
  archive on first use.
* ``"bfm"`` — BFM 2009 in Deep3DFaceRecon's ``BFM_model_front.mat``; user-supplied (not
  redistributable), looked up as ``<dir>/3dmm/bfm/BFM_model_front.mat`` or ``<dir>/BFM_model_front.mat``
  in the same folders.
* a path to an ``.npz`` (ICT compact layout) or a ``.mat`` (BFM front layout).

Conventions (see :mod:`avatarcli.camera`): mm, right-handed, +y up, +z out of the face.
"""

from __future__ import annotations

import os
from pathlib import Path

from avatarcli.errors import AvatarError, ModelNotFoundError
from avatarcli.facemodel.base import LinearFaceModel
from avatarcli.facemodel.bfm import BFM_FILENAME, load_bfm
from avatarcli.facemodel.ict import build_ict_compact, load_ict

__all__ = [
    "LinearFaceModel",
    "load_face_model",
    "load_ict",
    "load_bfm",
    "build_ict_compact",
    "resolve_face_model",
    "face_model_registry_names",
    "FACE_MODEL_NAMES",
    "BFM_SUBDIR",
]

ICT_NAMES = ("ict", "ict_facekit")
BFM_NAMES = ("bfm", "bfm09", "bfm_front")
FACE_MODEL_NAMES = ICT_NAMES + BFM_NAMES
BFM_SUBDIR = "3dmm/bfm"
BFM_HELP = (
    "the Basel Face Model is not redistributable: get 01_MorphableModel.mat from "
    "https://faces.dmi.unibas.ch/bfm/main.php?nav=1-2&id=downloads and Exp_Pca.bin, "
    "then build BFM_model_front.mat as Deep3DFaceRecon's README describes "
    "(https://github.com/sicxu/Deep3DFaceRecon_pytorch#prepare-prerequisite-models)"
)


def face_model_registry_names(name_or_path: str | os.PathLike) -> list[str]:
    """The registry models behind a ``--face-model`` value (``["ict_facekit"]`` for the ICT names;
    none for the BFM, which is user-supplied, or a path): for :func:`avatarcli.registry.resolve_all`,
    which reports every missing model of a stage in one error."""
    return ["ict_facekit"] if str(name_or_path).lower() in ICT_NAMES else []


def resolve_face_model(
    name_or_path: str | os.PathLike,
    models_dir: str | os.PathLike | None = None,
    *,
    allow_download: bool = True,
) -> tuple[str, Path]:
    """``(kind, path)`` with kind ``"ict"`` or ``"bfm"``, without loading anything.

    Raises:
        ModelNotFoundError: the file is nowhere to be found (the message says where to put it).
        AvatarError: an unknown name or file type.
    """
    from avatarcli import registry

    text = str(name_or_path)
    key = text.lower()
    if key in ICT_NAMES:
        return "ict", registry.resolve("ict_facekit", models_dir, allow_download=allow_download)
    if key in BFM_NAMES:
        found = registry.find_file(BFM_FILENAME, BFM_SUBDIR, models_dir)
        if found is None:
            where = ", ".join(str(d / BFM_SUBDIR) for d in registry.search_dirs(models_dir))
            raise ModelNotFoundError(
                f"face model 'bfm' needs {BFM_FILENAME}, not found in {where} (or directly in those folders). "
                f"Put it at <models>/{BFM_SUBDIR}/{BFM_FILENAME} (--models DIR or AVATAR_MODELS); {BFM_HELP}"
            )
        return "bfm", found
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".npz", ".mat") or path.exists():
        if not path.is_file():
            raise ModelNotFoundError(f"face model file {path} does not exist")
        if suffix == ".npz":
            return "ict", path
        if suffix == ".mat":
            return "bfm", path
        raise AvatarError(f"face model file {path}: expected an .npz (ICT compact) or a .mat (BFM front)")
    raise AvatarError(
        f"unknown face model {text!r} (known: {', '.join(FACE_MODEL_NAMES)}, or a path to an .npz / .mat)"
    )


def load_face_model(
    name_or_path: str | os.PathLike,
    models_dir: str | os.PathLike | None = None,
    *,
    allow_download: bool = True,
    **kwargs,
) -> LinearFaceModel:
    """Load a face model by name (``ict``, ``ict_facekit``, ``bfm``) or path (``.npz`` / ``.mat``).

    Args:
        name_or_path: see the module docstring.
        models_dir: the ``--models`` folder, searched before ``$AVATAR_MODELS`` and the cache.
        allow_download: for ICT, download and build the compact file when it is missing
            (``$AVATAR_OFFLINE=1`` also forbids it).
        **kwargs: passed to :func:`load_ict` / :func:`load_bfm` (``dtype``, ``device``, ``id_std``...).

    Returns:
        A :class:`LinearFaceModel` in mm.
    """
    kind, path = resolve_face_model(name_or_path, models_dir, allow_download=allow_download)
    return load_ict(path, **kwargs) if kind == "ict" else load_bfm(path, **kwargs)
