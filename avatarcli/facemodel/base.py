"""The linear face model every loader returns.

Units and axes (the same for every model; see :mod:`avatarcli.camera`): **millimetres**,
right-handed, **+y up**, **+z out of the face** (towards a frontal camera), +x the subject's left.
Loaders convert on load and record the factor in :attr:`LinearFaceModel.units_to_mm`
(``mm = source_units * units_to_mm``: ICT cm -> 10, BFM/Deep3DFaceRecon dm -> 100), so a basis
delta per unit coefficient is also in mm and the coefficients themselves keep the meaning they
have in the source model (ICT weights, Deep3DFaceRecon coefficients).

Shapes: ``V`` vertices, ``F`` triangles, ``K_id`` / ``K_exp`` / ``K_alb`` basis sizes, ``B`` batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

EXP_RANGES = ("unit", "gaussian")


@dataclass(frozen=True, eq=False)
class LinearFaceModel:
    """``verts = mean + Σ_k id_k · id_basis[k] + Σ_j exp_j · exp_basis[j]`` (mm).

    Immutable; :meth:`to` returns a moved copy. Float tensors share one dtype/device; index
    tensors are int64 on the same device.
    """

    name: str
    """Model family name: ``"ict_facekit"`` or ``"bfm"``."""
    mean: torch.Tensor
    """``[V, 3]`` neutral (ICT) / mean (BFM, centred) shape in mm."""
    id_basis: torch.Tensor
    """``[K_id, V, 3]`` identity displacement per unit coefficient, mm."""
    exp_basis: torch.Tensor
    """``[K_exp, V, 3]`` expression displacement per unit coefficient (or blendshape weight), mm."""
    faces: torch.Tensor
    """``[F, 3]`` int64 vertex ids of triangles, 0-based, winding as in the source model (ICT:
    counter-clockwise seen from outside, i.e. ``cross(v1-v0, v2-v0)`` points outwards)."""
    lmk68: torch.Tensor
    """``[68]`` int64 vertex ids of the iBUG / Multi-PIE 68 landmarks (0 = right jaw end, the
    image's left; 30 = nose tip; 48/54 = mouth corners)."""
    exp_range: str
    """``"unit"``: expression weights are blendshape weights in [0, 1] (ICT, ARKit-style);
    ``"gaussian"``: PCA coefficients ~ N(0, exp_std) (BFM)."""
    face_region: torch.Tensor
    """``[R]`` int64 vertex ids on which to evaluate geometric errors (ICT: the narrow face,
    vertices 0..6705; BFM: Deep3DFaceRecon's ``frontmask2_idx``)."""
    units_to_mm: float
    """Factor applied on load: ``mm = source value * units_to_mm``."""
    source_units: str
    """Units of the source file (``"cm"``, ``"dm"``)."""
    sha256: str
    """sha256 of the source file the model was loaded from."""
    exp_names: list[str] | None = None
    """``K_exp`` expression names (ICT blendshape names) or None (PCA)."""
    id_std: torch.Tensor | None = None
    """``[K_id]`` prior standard deviation of the identity coefficients: a zero-mean Gaussian
    prior ``Σ (id_k / id_std_k)^2`` is the natural regulariser."""
    exp_std: torch.Tensor | None = None
    """``[K_exp]`` prior std of the expression coefficients for ``exp_range == "gaussian"``; None for
    blendshape weights (use the [0, 1] box instead)."""
    albedo_mean: torch.Tensor | None = None
    """``[V, 3]`` RGB albedo in [0, 1] (sRGB-encoded values, as stored by the source model)."""
    albedo_basis: torch.Tensor | None = None
    """``[K_alb, V, 3]`` albedo displacement per unit coefficient (coefficients ~ N(0, 1)), or None."""
    extra: dict = field(default_factory=dict)
    """Model-specific arrays (tensors are moved by :meth:`to` too): ICT ``rigid_vertex_idx``,
    ``fitting_vertex_idx``, ``full_face_num_vertices``; BFM ``point_buf``, ``skinmask``,
    ``front_faces``."""

    def __post_init__(self) -> None:
        v = self.mean.shape[0]
        if self.mean.shape != (v, 3):
            raise ValueError(f"mean must be [V,3], got {tuple(self.mean.shape)}")
        bases = (("id_basis", self.id_basis), ("exp_basis", self.exp_basis), ("albedo_basis", self.albedo_basis))
        for label, basis in bases:
            if basis is not None and (basis.dim() != 3 or basis.shape[1:] != (v, 3)):
                raise ValueError(f"{label} must be [K,{v},3], got {tuple(basis.shape)}")
        if self.lmk68.shape != (68,):
            raise ValueError(f"lmk68 must be [68], got {tuple(self.lmk68.shape)}")
        if self.exp_range not in EXP_RANGES:
            raise ValueError(f"exp_range must be one of {EXP_RANGES}")
        if self.exp_names is not None and len(self.exp_names) != self.exp_basis.shape[0]:
            raise ValueError("exp_names and exp_basis disagree in length")

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def num_vertices(self) -> int:
        return self.mean.shape[0]

    @property
    def num_faces(self) -> int:
        return self.faces.shape[0]

    @property
    def num_id(self) -> int:
        return self.id_basis.shape[0]

    @property
    def num_exp(self) -> int:
        return self.exp_basis.shape[0]

    @property
    def num_albedo(self) -> int:
        return 0 if self.albedo_basis is None else self.albedo_basis.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def exp_index(self, name: str) -> int:
        """Index of a named expression (ICT blendshape name such as ``"jawOpen"``)."""
        if not self.exp_names or name not in self.exp_names:
            raise KeyError(f"{self.name} has no expression named {name!r}")
        return self.exp_names.index(name)

    # ---- evaluation --------------------------------------------------------------------------

    @staticmethod
    def _batch(*coeffs: torch.Tensor | None) -> int:
        sizes = {c.shape[0] for c in coeffs if c is not None}
        if len(sizes) > 1:
            raise ValueError(f"coefficient batches disagree: {sorted(sizes)}")
        return sizes.pop() if sizes else 1

    @staticmethod
    def _add(out: torch.Tensor, coeffs: torch.Tensor | None, basis: torch.Tensor | None, label: str) -> torch.Tensor:
        if coeffs is None:
            return out
        if coeffs.dim() != 2:
            raise ValueError(f"{label} coefficients must be [B,K], got {tuple(coeffs.shape)}")
        k = coeffs.shape[1]
        total = 0 if basis is None else basis.shape[0]
        if k > total:
            raise ValueError(f"{label}: {k} coefficients given, the model has {total}")
        if k == 0:
            return out
        flat = basis[:k].reshape(k, -1)  # [k, V*3], a view of the contiguous basis
        return torch.addmm(out, coeffs, flat)

    def vertices(self, id_coeffs: torch.Tensor | None = None, exp_coeffs: torch.Tensor | None = None) -> torch.Tensor:
        """Model vertices in mm.

        Args:
            id_coeffs: ``[B, k_id]`` with ``k_id <= K_id`` (the first ``k_id`` modes are used) or
                None (zeros).
            exp_coeffs: ``[B, k_exp]`` with ``k_exp <= K_exp`` or None. ICT: blendshape weights
                (0..1, not clamped here); BFM: PCA coefficients.

        Returns:
            ``[B, V, 3]`` (``B = 1`` when both are None). Same dtype/device as the model (convert
            coefficients or call :meth:`to` first). Cost: two ``addmm`` with ``[K, V*3]`` bases.
        """
        b = self._batch(id_coeffs, exp_coeffs)
        base = self.mean.reshape(1, -1).expand(b, -1)
        out = self._add(base, id_coeffs, self.id_basis, "identity")
        out = self._add(out, exp_coeffs, self.exp_basis, "expression")
        if out is base:  # nothing added: never hand out a view of the model's own tensor
            out = base.clone()
        return out.reshape(b, self.num_vertices, 3)

    def face_region_faces(self) -> torch.Tensor:
        """``[F_r, 3]`` the triangles whose three vertices are all in ``face_region`` (original ids)."""
        inside = torch.zeros(self.num_vertices, dtype=torch.bool, device=self.faces.device)
        inside[self.face_region.to(self.faces.device)] = True
        return self.faces[inside[self.faces].all(1)]

    def landmarks(self, verts: torch.Tensor) -> torch.Tensor:
        """``[B, V, 3]`` (or ``[B, V, D]``) -> ``[B, 68, 3]`` the 68 landmark vertices (iBUG order)."""
        return verts.index_select(-2, self.lmk68)

    def albedo(self, alb_coeffs: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Per-vertex RGB albedo in [0, 1] (not clamped).

        Args:
            alb_coeffs: ``[B, k_alb]`` with ``k_alb <= K_alb``, or None (the mean albedo).
            batch_size: B when ``alb_coeffs`` is None (default 1).

        Returns:
            ``[B, V, 3]``.
        """
        if self.albedo_mean is None:
            raise ValueError(f"{self.name} has no albedo")
        b = self._batch(alb_coeffs) if alb_coeffs is not None else (batch_size or 1)
        base = self.albedo_mean.reshape(1, -1).expand(b, -1)
        out = self._add(base, alb_coeffs, self.albedo_basis, "albedo")
        if out is base:
            out = base.clone()
        return out.reshape(b, self.num_vertices, 3)

    def prior_energy(
        self, id_coeffs: torch.Tensor | None = None, exp_coeffs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B]`` negative log Gaussian prior (up to constants): ``Σ (c/std)^2`` over identity and,
        for ``exp_range == "gaussian"``, expression coefficients."""
        b = self._batch(id_coeffs, exp_coeffs)
        energy = self.mean.new_zeros(b)
        if id_coeffs is not None and self.id_std is not None:
            energy = energy + ((id_coeffs / self.id_std[: id_coeffs.shape[1]]) ** 2).sum(-1)
        if exp_coeffs is not None and self.exp_std is not None:
            energy = energy + ((exp_coeffs / self.exp_std[: exp_coeffs.shape[1]]) ** 2).sum(-1)
        return energy

    # ---- moving ------------------------------------------------------------------------------

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LinearFaceModel":
        """A copy with float tensors in ``dtype`` on ``device`` (index tensors stay int64)."""

        def move(value):
            if isinstance(value, torch.Tensor):
                if value.is_floating_point():
                    return value.to(device=device, dtype=dtype)
                return value.to(device=device)
            return value

        changes = {f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        changes["extra"] = {k: move(v) for k, v in self.extra.items()}
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict:
        """Short JSON-able summary (for provenance records)."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "vertices": self.num_vertices,
            "faces": self.num_faces,
            "id": self.num_id,
            "exp": self.num_exp,
            "albedo": self.num_albedo,
            "units": "mm",
            "source_units": self.source_units,
            "exp_range": self.exp_range,
        }
