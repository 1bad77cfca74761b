"""Eyeballs for face models whose mesh has open eye sockets (ICT Light: eyes, teeth and mouth
interior are cut off, so a render shows black holes where the eyes are).

Each eye is a sphere placed from the model itself: the rim of the socket (the mesh's boundary
vertices nearest the six lid landmarks of that eye) gives the centre in x and y and the radius
(half the rim's width, +4 % so the sphere tucks under the corners; ~12.5 mm on ICT's neutral face,
a human eyeball's 12 mm), and the rim's middle third (the lid margins) gives the depth: the front
of the sphere sits 0.5 mm behind the lid margins, so the lids cover it and a blink closes over it.
The rim is read from the clip's identity mesh *without* expression, so the eyes move rigidly with
the head and do not follow the lids. If the model has gaze blendshapes (``eyeLookIn/Out/Up/Down``
with ``_L``/``_R``), each eye turns with them: yaw ``(out - in) * GAZE_YAW`` towards the ear,
pitch ``(up - down) * GAZE_PITCH``. The sphere's pole (+z, towards a frontal camera) carries a
brown iris and a black pupil, so the turn shows.

ICT Light ships no teeth or mouth interior (they are separate meshes of the full ICT model), so
an open mouth still shows the background.

Shapes: ``B`` batch, ``V`` face-model vertices, ``E`` sphere vertices per eye.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

GAZE_YAW = math.radians(30.0)
"""Eye yaw at a full ``eyeLookIn``/``eyeLookOut`` weight (ARKit's ~30° range of horizontal gaze)."""
GAZE_PITCH = math.radians(20.0)
"""Eye pitch at a full ``eyeLookUp``/``eyeLookDown`` weight."""
RADIUS_OVER_HALF_RIM = 1.04
FRONT_BEHIND_LIDS_MM = 0.5
RIM_SEARCH_MM = 25.0
"""Boundary vertices within this distance of an eye's lid-landmark centre form its socket rim."""
SCLERA, IRIS, PUPIL = (0.86, 0.83, 0.78), (0.33, 0.2, 0.11), (0.03, 0.03, 0.03)
IRIS_HALF_ANGLE, PUPIL_HALF_ANGLE = math.radians(32.0), math.radians(13.0)
"""Iris ~13 mm and pupil ~5.5 mm across on a 12.5 mm eyeball."""
EYE_LANDMARKS = {"R": range(36, 42), "L": range(42, 48)}
"""iBUG-68 lid landmarks of the subject's right eye (the image's left, -x) and left eye (+x)."""


def uv_sphere(segments: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit sphere with its pole on +z: vertices [E,3], faces [F,3] (counter-clockwise seen from
    outside) and per-vertex RGB [E,3] (iris and pupil around +z, rings placed on their edges so the
    colours change sharply)."""
    polar = sorted({0.0, PUPIL_HALF_ANGLE * 0.97, PUPIL_HALF_ANGLE, IRIS_HALF_ANGLE * 0.97, IRIS_HALF_ANGLE,
                    *[math.radians(a) for a in range(40, 180, 12)], math.pi})
    rings = []
    for theta in polar[1:-1]:
        phi = torch.arange(segments) * (2 * math.pi / segments)
        rings.append(torch.stack([math.sin(theta) * torch.cos(phi), math.sin(theta) * torch.sin(phi),
                                  torch.full_like(phi, math.cos(theta))], -1))
    verts = torch.cat([torch.tensor([[0.0, 0.0, 1.0]]), *rings, torch.tensor([[0.0, 0.0, -1.0]])])
    faces, n = [], segments
    back = len(verts) - 1
    for j in range(n):  # front cap, rings, back cap; outward normals
        faces.append((0, 1 + j, 1 + (j + 1) % n))
    for r in range(len(rings) - 1):
        a, b = 1 + r * n, 1 + (r + 1) * n
        for j in range(n):
            k = (j + 1) % n
            faces += [(a + j, b + j, b + k), (a + j, b + k, a + k)]
    last = 1 + (len(rings) - 1) * n
    for j in range(n):
        faces.append((back, last + (j + 1) % n, last + j))
    angle = torch.acos(verts[:, 2].clamp(-1, 1))
    colour = torch.tensor(SCLERA).expand(len(verts), 3).clone()
    colour[angle <= IRIS_HALF_ANGLE * 0.985] = torch.tensor(IRIS)
    colour[angle <= PUPIL_HALF_ANGLE * 0.985] = torch.tensor(PUPIL)
    return verts, torch.tensor(faces, dtype=torch.int64), colour


def boundary_vertices(faces: torch.Tensor) -> torch.Tensor:
    """[K] ids of the vertices on the mesh's open boundary (edges used by one triangle)."""
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
    counts = Counter(map(tuple, edges.tolist()))
    return torch.tensor(sorted({v for e, c in counts.items() if c == 1 for v in e}), dtype=torch.int64)


@dataclass
class EyeRig:
    """Two eyeballs of a face model (see the module doc). Index tensors live on the model's device."""

    rims: list[torch.Tensor]
    """Per eye (R, L) [K] vertex ids of the socket rim."""
    lids: list[torch.Tensor]
    """Per eye [M] ids of the rim's middle third in x (the lid margins), for the depth."""
    gaze: list[dict[str, int] | None]
    """Per eye the expression index of 'in', 'out', 'up', 'down' (None: the model has no gaze shapes)."""
    sphere: torch.Tensor
    """[E,3] unit sphere, pole +z."""
    sphere_faces: torch.Tensor
    """[F_e,3]."""
    colour: torch.Tensor
    """[E,3] albedo of one eye."""

    def placement(self, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres [B,2,3] (mm) and radii [B,2] from ``rest`` [B,V,3], the identity mesh without expression."""
        centres, radii = [], []
        for rim, lids in zip(self.rims, self.lids):
            ring = rest[:, rim]  # [B,K,3]
            radius = 0.5 * (ring[..., 0].amax(1) - ring[..., 0].amin(1)) * RADIUS_OVER_HALF_RIM
            front = rest[:, lids, 2].mean(1) - FRONT_BEHIND_LIDS_MM
            centre = torch.stack([ring[..., 0].mean(1), ring[..., 1].mean(1), front - radius], -1)
            centres.append(centre)
            radii.append(radius)
        return torch.stack(centres, 1), torch.stack(radii, 1)

    def rotations(self, exp: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        """[B,2,3,3] gaze rotation of each eye (identity without gaze shapes or ``exp``)."""
        out = torch.eye(3, dtype=like.dtype, device=like.device).expand(batch, 2, 3, 3).clone()
        if exp is None:
            return out
        for eye, (index, side) in enumerate(zip(self.gaze, (-1.0, 1.0))):
            if index is None:
                continue
            yaw = (exp[:, index["out"]] - exp[:, index["in"]]) * GAZE_YAW * side  # out = towards the ear
            pitch = (exp[:, index["up"]] - exp[:, index["down"]]) * GAZE_PITCH
            cy, sy, cp, sp = torch.cos(yaw), torch.sin(yaw), torch.cos(pitch), torch.sin(pitch)
            zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
            # +z turns to +x by yaw and to +y by pitch (y up)
            ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
            rx = torch.stack([one, zero, zero, zero, cp, sp, zero, -sp, cp], -1).reshape(-1, 3, 3)
            out[:, eye] = ry @ rx
        return out

    def eyeballs(self, rest: torch.Tensor, exp: torch.Tensor | None = None) -> torch.Tensor:
        """[B,2E,3] model-space vertices of both eyeballs (right eye first) for identity meshes
        ``rest`` [B,V,3] (no expression) and expression weights ``exp`` [B,K_exp] (gaze)."""
        centres, radii = self.placement(rest)
        turn = self.rotations(exp, rest.shape[0], rest)  # [B,2,3,3]
        sphere = self.sphere.to(rest)
        points = torch.einsum("beij,vj->bevi", turn, sphere) * radii[..., None, None] + centres[:, :, None]
        return points.reshape(rest.shape[0], -1, 3)

    def attach(self, verts: torch.Tensor, faces: torch.Tensor, albedo: torch.Tensor, rest: torch.Tensor,
               exp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The face mesh with both eyeballs appended: vertices [B,V+2E,3], faces [F+2F_e,3] and
        albedo [B,V+2E,3] from ``verts`` [B,V,3], ``faces`` [F,3], ``albedo`` [B,V,3] (or [V,3])."""
        eyes = self.eyeballs(rest, exp)
        count, n = verts.shape[1], len(self.sphere)
        sphere_faces = self.sphere_faces.to(faces.device)
        all_faces = torch.cat([faces, sphere_faces + count, sphere_faces + count + n])
        if albedo.dim() == 2:
            albedo = albedo.expand(verts.shape[0], -1, -1)
        colour = self.colour.to(albedo).repeat(2, 1).expand(verts.shape[0], 2 * n, 3)
        return torch.cat([verts, eyes], 1), all_faces, torch.cat([albedo, colour], 1)


def eye_rig(model) -> EyeRig | None:
    """The :class:`EyeRig` of a :class:`~avatarcli.facemodel.base.LinearFaceModel`, or None when its
    mesh has no open boundary around the eyes (closed eye regions, e.g. BFM)."""
    faces = model.faces.cpu()
    boundary = boundary_vertices(faces)
    if len(boundary) == 0:
        return None
    mean = model.mean.detach().cpu().float()
    lmk = model.lmk68.cpu()
    rims, lids, gaze = [], [], []
    for side, ids in EYE_LANDMARKS.items():
        centre = mean[lmk[list(ids)]].mean(0)
        near = boundary[(mean[boundary] - centre).norm(dim=1) < RIM_SEARCH_MM]
        if len(near) < 8:
            return None
        x = mean[near, 0]
        middle = (x - x.mean()).abs() < (x.amax() - x.amin()) / 6
        rims.append(near.to(model.faces.device))
        lids.append(near[middle].to(model.faces.device))
        names = model.exp_names or []
        wanted = {key: f"eyeLook{key.capitalize()}_{side}" for key in ("in", "out", "up", "down")}
        gaze.append({k: names.index(n) for k, n in wanted.items()} if all(n in names for n in wanted.values())
                    else None)
    sphere, sphere_faces, colour = uv_sphere()
    return EyeRig(rims, lids, gaze, sphere.to(mean.dtype), sphere_faces, colour)
