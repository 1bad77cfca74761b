"""ICT-FaceKit (ICT Face Model Light, MIT): the compact npz, its loader and its builder.

The compact file ``ict_face_light_f16.npz`` holds (cm, y up, +z towards the camera):

* ``v_neutral`` (11248, 3) f32 — ``FaceXModel/generic_neutral_mesh.obj``, vertices 0..11247
  (face plus head and neck; eyes, teeth and mouth sockets are cut off);
* ``faces`` (22288, 3) int32, 0-based — the quads of the neutral mesh whose vertices are all
  below 11248, split into triangles (a, b, c), (a, c, d);
* ``exp_names`` (53,) and ``exp_deltas`` (53, 11248, 3) f16 — ARKit-style blendshapes from the
  ``expressions`` list of ``vertex_indices.json`` (so ``PupilDilate_L/R`` and ``cheekRaiser_L/R``,
  which are OBJs but not in that list, are left out); weights in [0, 1];
* ``id_deltas`` (100, 11248, 3) f16 — ``identity000..099.obj`` minus the neutral mesh;
* ``lmk68_vertex_idx`` (68) — ``idx_to_landmark_verts`` (iBUG / Multi-PIE order);
* ``rigid_vertex_idx``, ``fitting_vertex_idx`` — ``idx_to_rigid_verts`` / ``idx_to_fitting_verts``
  restricted (order kept) to ids below 11248;
* ``narrow_face_num_vertices`` = 6706, ``full_face_num_vertices`` = 9409 (ICT's README: the narrow
  face area is vertices 0..6705, the full face area 0..9408); ``units`` = ``"cm"``.

Identity prior: ICT's own sampler (``Scripts/ict_face_model.py: randomize_identity``) draws the
identity weights from the standard normal, and the mode norms decay like PCA modes pre-scaled by
their standard deviation (first modes ~5 mm rms per unit weight). So ``id_std = 1`` is the model's
own prior; with it a random face moves the face vertices by 2.4 mm rms (at most 9 mm). Fitted
real faces typically land at |α| of a few tenths (the MANIFEST's "σ of a few tenths"): pass a
smaller ``id_std`` to :func:`load_ict` for a stronger regulariser.

Albedo: ICT Light ships no albedo model. :data:`ICT_SKIN_ALBEDO` is a hand-picked mid skin tone
(sRGB-encoded, 0..1) used as a constant per-vertex albedo, and there is no albedo basis.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from avatarcli.errors import AvatarError
from avatarcli.facemodel.base import LinearFaceModel

ICT_NUM_VERTICES = 11248
"""Vertices kept by the compact file: the face, head and neck of the ICT topology."""
ICT_NARROW_FACE_NUM_VERTICES = 6706
ICT_FULL_FACE_NUM_VERTICES = 9409
ICT_SKIN_ALBEDO = (0.70, 0.53, 0.44)
"""Constant RGB albedo (sRGB-encoded, 0..1) given to every ICT vertex; a plausible mid skin tone."""
ICT_UNITS_TO_MM = 10.0

REQUIRED_KEYS = ("v_neutral", "faces", "exp_names", "exp_deltas", "id_deltas", "lmk68_vertex_idx")


def load_ict(
    path: str | os.PathLike,
    *,
    id_std: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LinearFaceModel:
    """Load the compact ICT npz as a :class:`LinearFaceModel` in millimetres.

    Args:
        path: ``ict_face_light_f16.npz`` (or a file of the same layout, e.g. a smaller build).
        id_std: prior std of every identity weight (1 = ICT's own sampler; see the module doc).
        dtype, device: where the tensors go (the f16 deltas are cast to f32 first, then scaled).

    Returns:
        ``name="ict_facekit"``, ``mean`` ``[V,3]`` = ``v_neutral * 10``, ``id_basis``
        ``[100,V,3]``, ``exp_basis`` ``[53,V,3]`` (mm per unit weight), ``exp_range="unit"``,
        ``exp_names`` (53 ARKit-style names), ``face_region`` = vertices ``0..6705``, constant
        ``albedo_mean`` and no albedo basis.
    """
    from avatarcli.registry import file_sha256

    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AvatarError(f"{path}: not a readable ICT npz ({exc})") from None
    with data:
        missing = [k for k in REQUIRED_KEYS if k not in data.files]
        if missing:
            raise AvatarError(f"{path}: not an ICT compact face model (missing {', '.join(missing)})")
        units = str(data["units"]) if "units" in data.files else "cm"
        if units != "cm":
            raise AvatarError(f"{path}: unexpected units {units!r} (expected 'cm')")
        scale = ICT_UNITS_TO_MM

        def floats(key: str) -> torch.Tensor:
            return torch.from_numpy(data[key].astype(np.float32) * np.float32(scale)).to(device=device, dtype=dtype)

        def ints(key: str) -> torch.Tensor:
            return torch.from_numpy(data[key].astype(np.int64)).to(device=device)

        mean = floats("v_neutral")
        v = mean.shape[0]
        def count(key: str, default: int) -> int:
            return int(data[key]) if key in data.files else min(v, default)

        narrow = count("narrow_face_num_vertices", ICT_NARROW_FACE_NUM_VERTICES)
        full = count("full_face_num_vertices", ICT_FULL_FACE_NUM_VERTICES)
        extra = {
            "narrow_face_num_vertices": narrow,
            "full_face_num_vertices": full,
            "rigid_vertex_idx": ints("rigid_vertex_idx") if "rigid_vertex_idx" in data.files else None,
            "fitting_vertex_idx": ints("fitting_vertex_idx") if "fitting_vertex_idx" in data.files else None,
        }
        id_basis = floats("id_deltas")
        exp_basis = floats("exp_deltas")
        faces = ints("faces")
        lmk = ints("lmk68_vertex_idx")
        names = [str(n) for n in data["exp_names"]]
    if int(faces.max()) >= v or int(lmk.max()) >= v:
        raise AvatarError(f"{path}: vertex ids out of range")
    albedo = torch.tensor(ICT_SKIN_ALBEDO, dtype=dtype, device=device).expand(v, 3).clone()
    return LinearFaceModel(
        name="ict_facekit",
        mean=mean,
        id_basis=id_basis,
        exp_basis=exp_basis,
        faces=faces,
        lmk68=lmk,
        exp_range="unit",
        face_region=torch.arange(min(narrow, v), device=device),
        units_to_mm=scale,
        source_units="cm",
        sha256=file_sha256(path),
        exp_names=names,
        id_std=torch.full((id_basis.shape[0],), float(id_std), dtype=dtype, device=device),
        exp_std=None,
        albedo_mean=albedo,
        albedo_basis=None,
        extra=extra,
    )


# --------------------------------------------------------------------------------------------
# Builder: official repository -> compact npz
# --------------------------------------------------------------------------------------------


class _ModelFolder:
    """``FaceXModel/`` inside a repository checkout, the folder itself, or a GitHub archive zip."""

    def __init__(self, source: str | os.PathLike):
        path = Path(source)
        self.zip: zipfile.ZipFile | None = None
        self.dir: Path | None = None
        if path.is_file() and zipfile.is_zipfile(path):
            self.zip = zipfile.ZipFile(path)
            config = [n for n in self.zip.namelist() if n.endswith("FaceXModel/vertex_indices.json")]
            if not config:
                raise AvatarError(f"{path}: no FaceXModel/vertex_indices.json in the archive")
            self.prefix = min(config, key=len)[: -len("vertex_indices.json")]
            self.names = set(self.zip.namelist())
        elif (path / "FaceXModel" / "vertex_indices.json").is_file():
            self.dir = path / "FaceXModel"
        elif (path / "vertex_indices.json").is_file():
            self.dir = path
        else:
            raise AvatarError(f"{path}: not an ICT-FaceKit checkout (no FaceXModel/vertex_indices.json)")

    def exists(self, name: str) -> bool:
        if self.zip is not None:
            return self.prefix + name in self.names
        return (self.dir / name).is_file()

    def read_text(self, name: str) -> str:
        if self.zip is not None:
            with self.zip.open(self.prefix + name) as handle:
                return io.TextIOWrapper(handle, encoding="utf-8", errors="replace").read()
        return (self.dir / name).read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def parse_obj(text: str, *, faces: bool = False) -> tuple[np.ndarray, list[list[int]]]:
    """The ``v`` lines (x, y, z as float64 ``[N, 3]``) and, if asked, the ``f`` lines of an OBJ as
    0-based vertex-id polygons (texture/normal ids dropped; negative ids resolved)."""
    verts: list[list[str]] = []
    polys: list[list[int]] = []
    for line in text.splitlines():
        if line.startswith("v "):
            verts.append(line.split()[1:4])
        elif faces and line.startswith("f "):
            poly = []
            for token in line.split()[1:]:
                idx = int(token.split("/", 1)[0])
                poly.append(idx - 1 if idx > 0 else len(verts) + idx)
            polys.append(poly)
    return np.asarray(verts, dtype=np.float64).reshape(-1, 3), polys


def triangulate(polys: list[list[int]], num_vertices: int) -> np.ndarray:
    """Triangles ``[F, 3]`` int32 from polygons whose vertex ids are all below ``num_vertices``;
    a polygon (a, b, c, d, ...) becomes the fan (a, b, c), (a, c, d), ..."""
    tris = [
        (poly[0], poly[i], poly[i + 1])
        for poly in polys
        if len(poly) >= 3 and max(poly) < num_vertices
        for i in range(1, len(poly) - 1)
    ]
    return np.asarray(tris, dtype=np.int32).reshape(-1, 3)


def build_ict_compact(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    num_vertices: int = ICT_NUM_VERTICES,
    narrow_face_num_vertices: int = ICT_NARROW_FACE_NUM_VERTICES,
    full_face_num_vertices: int = ICT_FULL_FACE_NUM_VERTICES,
) -> Path:
    """Build the compact ICT npz from the official ICT-FaceKit repository.

    Reproduces the shared ``ict_face_light_f16.npz`` (see the module docstring): parse the ``v``
    lines of every OBJ and keep vertices ``0..num_vertices-1``; deltas = shape − neutral in f16;
    keep the faces whose vertices are all below ``num_vertices`` and split quads into triangles;
    take the landmark, rigid and fitting ids from ``vertex_indices.json``; save with
    ``np.savez_compressed``. The result holds the same arrays as the reference build, but its bytes
    differ (zip timestamps), so the registry checks built files by content.

    Args:
        source: a repository checkout (containing ``FaceXModel/``), the ``FaceXModel`` folder
            itself, or the GitHub archive zip (read in place, not extracted).
        out_path: the npz to write (written exactly at this path).
        num_vertices: how many leading vertices to keep (11248 for the real model; tests use a
            small number with a fake repository).
        narrow_face_num_vertices, full_face_num_vertices: recorded as is (ICT's region sizes).

    Returns:
        ``out_path``.
    """
    folder = _ModelFolder(source)
    try:
        config = json.loads(folder.read_text("vertex_indices.json"))
        exp_names = list(config.get("expressions") or [])
        if not exp_names:
            raise AvatarError("vertex_indices.json has no 'expressions' list")
        neutral_all, polys = parse_obj(folder.read_text("generic_neutral_mesh.obj"), faces=True)
        total = neutral_all.shape[0]
        if total < num_vertices:
            raise AvatarError(f"generic_neutral_mesh.obj has {total} vertices, fewer than {num_vertices}")
        neutral = neutral_all[:num_vertices]

        def deltas(names: list[str]) -> np.ndarray:
            out = np.empty((len(names), num_vertices, 3), dtype=np.float16)
            for i, name in enumerate(names):
                verts, _ = parse_obj(folder.read_text(name + ".obj"))
                if verts.shape[0] != total:
                    raise AvatarError(f"{name}.obj has {verts.shape[0]} vertices, the neutral mesh {total}")
                out[i] = (verts[:num_vertices] - neutral).astype(np.float16)
            return out

        missing = [n for n in exp_names if not folder.exists(n + ".obj")]
        if missing:
            raise AvatarError(f"expression OBJs missing: {', '.join(missing)}")
        id_names = []
        while folder.exists(f"identity{len(id_names):03d}.obj"):
            id_names.append(f"identity{len(id_names):03d}")
        if not id_names:
            raise AvatarError("no identity000.obj")

        def indices(key: str, required: bool = False) -> np.ndarray:
            values = config.get(key)
            if values is None:
                if required:
                    raise AvatarError(f"vertex_indices.json has no {key!r}")
                values = []
            return np.asarray([i for i in values if i < num_vertices], dtype=np.int32)

        lmk = np.asarray(config.get("idx_to_landmark_verts") or [], dtype=np.int32)
        if lmk.shape != (68,) or int(lmk.max()) >= num_vertices:
            raise AvatarError("idx_to_landmark_verts must hold 68 ids of kept vertices")
        arrays = dict(
            v_neutral=neutral.astype(np.float32),
            faces=triangulate(polys, num_vertices),
            exp_names=np.asarray(exp_names),
            exp_deltas=deltas(exp_names),
            id_deltas=deltas(id_names),
            lmk68_vertex_idx=lmk,
            rigid_vertex_idx=indices("idx_to_rigid_verts"),
            fitting_vertex_idx=indices("idx_to_fitting_verts"),
            narrow_face_num_vertices=np.int32(narrow_face_num_vertices),
            full_face_num_vertices=np.int32(full_face_num_vertices),
            units=np.asarray("cm"),
        )
    finally:
        folder.close()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as handle:  # a handle: np.savez would append ".npz" to a bare name
        np.savez_compressed(handle, **arrays)
    return out_path
