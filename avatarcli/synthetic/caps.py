"""Rendering-only caps that close the eye and mouth openings of a face mesh.

A linear face model's mesh (ICT-FaceKit) is open at the eyes and the mouth; rendered as it is, the
background shows through. :func:`find_caps` finds those boundary loops from the landmarks of the
mean shape and closes each with rings of extra vertices, every one a fixed linear combination of
loop vertices (so the caps follow identity and expression). Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops of a triangle mesh, each in the direction of its triangles' edges
    (an edge a->b of a triangle gives loop order a, b). Empty when the boundary is not a set of
    simple loops (a vertex with two outgoing boundary edges)."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).astype(np.int64)
    key = np.sort(directed, 1)
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    boundary = directed[counts[inverse.reshape(-1)] == 1]
    following: dict[int, int] = {}
    for a, b in boundary.tolist():
        if a in following:
            return []
        following[a] = b
    loops, seen = [], set()
    for start in following:
        if start in seen:
            continue
        loop, vertex = [], start
        while vertex not in seen:
            seen.add(vertex)
            loop.append(vertex)
            vertex = following.get(vertex, start)
        loops.append(np.asarray(loop, np.int64))
    return loops


CAP_SCLERA, CAP_IRIS, CAP_MOUTH, CAP_MOUTH_DEEP = range(4)
IRIS_COLOURS = ((0.20, 0.12, 0.07), (0.11, 0.07, 0.05), (0.33, 0.25, 0.12), (0.24, 0.33, 0.42), (0.24, 0.31, 0.19))
"""Iris albedos the sampler picks from (brown, dark brown, hazel, blue, green)."""
CAP_COLOURS = {CAP_SCLERA: (0.74, 0.70, 0.66), CAP_MOUTH: (0.36, 0.13, 0.12), CAP_MOUTH_DEEP: (0.07, 0.03, 0.03)}


@dataclass
class Caps:
    """Rendering-only geometry that closes the eye and mouth openings of a mesh.

    ``E`` extra vertices, each a fixed linear combination of boundary-loop vertices (so they follow
    identity and expression): ``extra = weights @ verts[gather]``. Eyes get an inner ring (sclera)
    and a centre vertex (iris), the mouth an inner ring and a centre (dark interior); the cap
    triangles run against the loop direction, so they face outwards like the mesh.
    """

    gather: np.ndarray
    """[L] mesh vertex ids the extra vertices are made from."""
    weights: np.ndarray
    """[E, L] float32."""
    faces: np.ndarray
    """[Fc, 3] int64 triangles over the extended vertex array (mesh vertices, then extras)."""
    kind: np.ndarray
    """[E] CAP_* colour class of each extra vertex."""
    mouth_loop: np.ndarray
    """Mesh vertex ids of the mouth opening (empty when none was found)."""


def find_caps(mean: np.ndarray, faces: np.ndarray, lmk68: np.ndarray) -> Caps | None:
    """Caps for the boundary loops around the eyes and the mouth (found from the landmarks of the
    mean shape: a loop whose centroid lies within 15 mm of an eye's or the inner mouth's landmark
    centre). None when the mesh has no such openings."""
    pts = mean[lmk68]
    centres = {"eye": [pts[36:42].mean(0), pts[42:48].mean(0)], "mouth": [pts[60:68].mean(0)]}
    gather: list[int] = []
    rows: list[tuple[list[int], list[float]]] = []  # per extra vertex: positions in gather, weights
    kinds: list[int] = []
    cap_faces: list[tuple[int, int, int]] = []
    mouth_loop = np.zeros(0, np.int64)
    n_verts = mean.shape[0]
    for loop in boundary_loops(faces):
        centroid = mean[loop].mean(0)
        label = next((k for k, cs in centres.items() if any(np.linalg.norm(centroid - c) < 15.0 for c in cs)), None)
        if label is None:
            continue
        n, base = len(loop), len(gather)
        gather.extend(loop.tolist())
        if label == "mouth":
            mouth_loop = loop
        rings = ((0.4, CAP_SCLERA),) if label == "eye" else ((0.35, CAP_MOUTH),)
        centre_kind = CAP_IRIS if label == "eye" else CAP_MOUTH_DEEP
        ring_ids = [loop.tolist()]  # the outer ring is the mesh's own boundary
        for frac, kind in rings:
            ids = []
            for i in range(n):
                cols = [base + i] + [base + j for j in range(n)]
                rows.append((cols, [1.0 - frac] + [frac / n] * n))
                kinds.append(kind)
                ids.append(n_verts + len(rows) - 1)
            ring_ids.append(ids)
        rows.append(([base + j for j in range(n)], [1.0 / n] * n))
        kinds.append(centre_kind)
        centre = n_verts + len(rows) - 1
        for outer, inner in zip(ring_ids[:-1], ring_ids[1:]):
            for i in range(n):
                j = (i + 1) % n
                cap_faces.append((outer[j], outer[i], inner[i]))
                cap_faces.append((outer[j], inner[i], inner[j]))
        last = ring_ids[-1]
        for i in range(n):
            cap_faces.append((last[(i + 1) % n], last[i], centre))
    if not rows:
        return None
    weights = np.zeros((len(rows), len(gather)), np.float32)
    for e, (cols, values) in enumerate(rows):
        np.add.at(weights[e], cols, values)
    return Caps(np.asarray(gather, np.int64), weights, np.asarray(cap_faces, np.int64), np.asarray(kinds), mouth_loop)
