"""Cameras, rotations and projection: the one place where coordinate conventions are written down.

Every function here is batched over leading dimensions, written in torch and differentiable.

Conventions
===========

World / model space ("head space")
    Right-handed, **millimetres**, **+y up**, **+z out of the face towards a frontal camera**
    (so **+x is the subject's left**, which a frontal camera sees on the image's right). This is the
    native frame of ICT-FaceKit (after cm → mm) and of the BFM / Deep3DFaceRecon front model (after
    dm → mm); :mod:`avatarcli.facemodel` loads every model in it. The "world" of a video is the
    head's own canonical frame: the head is fixed, the camera moves (as in EG3D).

Camera space
    **OpenCV**: x right, y down, z forward (along the optical axis, points in front have z > 0),
    same units as the world (mm). ``x_cam = R @ x_world + t``; ``(R, t)`` is always
    **world → camera** in this module. A frontal camera at distance d looking at the origin has
    ``R = diag(1, -1, -1)`` (:data:`CV_FROM_GL`) and ``t = (0, 0, d)``.

    OpenGL camera axes (x right, y up, z backward, looking down -z) differ by a flip of y and z:
    ``x_gl = CV_FROM_GL @ x_cv`` and ``x_cv = CV_FROM_GL @ x_gl`` (the matrix is its own inverse).
    A camera-to-world matrix converts with ``c2w_gl = c2w_cv @ diag(1, -1, -1, 1)``.

Image / pixels
    Origin at the **top-left corner** of the top-left pixel, u to the right (columns), v down (rows),
    in continuous pixel units: pixel (row i, col j) covers [j, j+1) x [i, i+1) and its **centre is
    (j + 0.5, i + 0.5)**. A centred principal point is therefore ``cx = W / 2, cy = H / 2``.
    (OpenCV's own calibration puts pixel centres at integers: ``cx_ours = cx_opencv + 0.5``.)
    **Image sizes are always ``(H, W)``** (rows, columns), or a single int for square images.

Intrinsics
    ``K = [[fx, s, cx], [0, fy, cy], [0, 0, 1]]`` in pixels (s: skew, normally 0);
    ``(u, v) = (fx·x/z + s·y/z + cx, fy·y/z + cy)`` for a camera-space point (x, y, z).

Euler angles (pitch, yaw, roll), radians — the Deep3DFaceRecon convention
    ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``, acting on column vectors (Deep3DFaceRecon builds the
    same product and applies its transpose to row vectors, ``x_row @ R.T``). With the world axes
    above: positive **pitch** turns the nose down (towards -y), positive **yaw** turns the nose
    towards +x (the subject's left, the image's right), positive **roll** raises the +x side
    (the face turns counter-clockwise as seen by a frontal camera, in the world and in the image
    alike). Gimbal lock at |yaw| = 90°.

6-d pose per frame (``pose6``)
    ``(pitch, yaw, roll, tx, ty, tz)``: radians, then millimetres. It is a head pose relative to the
    camera: ``R = CV_FROM_GL @ euler_to_matrix(pitch, yaw, roll)``, ``t = (tx, ty, tz)``, and
    ``x_cam = R @ x_model + t``. So the zero-angle pose is a frontal face looking into the camera,
    and ``t`` is the model origin in OpenCV camera coordinates (tz > 0 is the distance in mm). The
    angle order and meaning match the ``angles`` of Deep3DFaceRecon coefficients (see
    :func:`deep3d_pose_to_rt` for its translation).

Continuous 6-d rotation (Zhou et al., CVPR 2019)
    As in PyTorch3D: the 6 numbers are the **first two rows** of R; Gram-Schmidt restores R.

25-d EG3D camera
    ``c[:16]`` = row-major camera-to-world 4x4 with OpenCV camera axes (EG3D's convention) and its
    translation in **our world units (mm) times** ``translation_scale`` (default 1: mm; EG3D itself
    uses a normalised world where the camera sits at radius ~2.7, e.g. ``translation_scale =
    2.7 / camera_distance_mm``). ``c[16:]`` = row-major intrinsics normalised by the image size:
    ``(fx/W, s/W, cx/W, 0, fy/H, cy/H, 0, 0, 1)``, so a centred principal point is 0.5.

    **Generator world** (the Export3D tri-plane generator, :mod:`avatarcli.export3d`): the world
    above (same origin and axes) scaled by ``world_scale`` units per mm. A fit's camera (mm) maps
    to it with :func:`to_generator_camera` (camera centre times ``world_scale``; rotation and
    intrinsics unchanged) and back with :func:`from_generator_camera`; ``world_scale =``
    :func:`generator_world_scale` of the training cameras ``= GENERATOR_CAMERA_RADIUS / median
    camera distance (mm)`` puts the typical camera at EG3D's radius 2.7, so the generator's box
    ``[-0.5, 0.5]^3`` spans ±distance/5.4 mm around the model origin (the head at a ~1 m camera).
    :func:`orbit_camera` makes novel views in that world.

Clip space for the rasterizer (:func:`clip_from_camera`)
    NDC x = -1 is the left image edge and +1 the right edge; NDC **y = -1 is the top row** (y points
    down like image rows); depth z/w is in [-1, 1], **smaller = nearer** (-1 at ``near``, +1 at
    ``far``). Pixel (row i, col j) has its centre at ``NDC x = 2(j+0.5)/W - 1, y = 2(i+0.5)/H - 1``,
    so a point that :func:`project` maps to pixel (u, v) has NDC ``(2u/W - 1, 2v/H - 1)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from avatarcli.errors import AvatarError

__all__ = [
    "CV_FROM_GL",
    "cv_from_gl",
    "euler_to_matrix",
    "matrix_to_euler",
    "rotation_6d_to_matrix",
    "matrix_to_rotation_6d",
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "matrix_to_quaternion",
    "quaternion_to_matrix",
    "intrinsics_matrix",
    "project",
    "world_to_camera",
    "camera_to_world",
    "pose6_to_rt",
    "rt_to_pose6",
    "deep3d_pose_to_rt",
    "eg3d_camera",
    "from_eg3d_camera",
    "GENERATOR_CAMERA_RADIUS",
    "generator_world_scale",
    "to_generator_camera",
    "from_generator_camera",
    "orbit_camera",
    "clip_from_camera",
    "pixel_to_ndc",
    "ndc_to_pixel",
    "image_hw",
]

CV_FROM_GL = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
"""diag(1, -1, -1): flips y and z. Maps OpenGL-style (y up, z towards the viewer) coordinates to
OpenCV camera axes and back (it is its own inverse)."""

_EPS = 1e-8


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from an int (square) or an ``(H, W)`` pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


# --------------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------------


def euler_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from Euler angles.

    Args:
        angles: ``[..., 3]`` = (pitch, yaw, roll) in radians.

    Returns:
        ``[..., 3, 3]`` ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` acting on column vectors, with
        ``Rx(a) = [[1,0,0],[0,c,-s],[0,s,c]]``, ``Ry(a) = [[c,0,s],[0,1,0],[-s,0,c]]``,
        ``Rz(a) = [[c,-s,0],[s,c,0],[0,0,1]]`` — identical to Deep3DFaceRecon's
        ``compute_rotation`` (which returns ``R.T`` for row vectors).
    """
    pitch, yaw, roll = angles.unbind(-1)
    cx, sx = torch.cos(pitch), torch.sin(pitch)
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cz, sz = torch.cos(roll), torch.sin(roll)
    # Closed form of Rz @ Ry @ Rx.
    r00 = cz * cy
    r01 = cz * sy * sx - sz * cx
    r02 = cz * sy * cx + sz * sx
    r10 = sz * cy
    r11 = sz * sy * sx + cz * cx
    r12 = sz * sy * cx - cz * sx
    r20 = -sy
    r21 = cy * sx
    r22 = cy * cx
    return torch.stack([r00, r01, r02, r10, r11, r12, r20, r21, r22], dim=-1).reshape(*angles.shape[:-1], 3, 3)


def matrix_to_euler(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`euler_to_matrix`.

    Args:
        matrix: ``[..., 3, 3]`` rotation matrices.

    Returns:
        ``[..., 3]`` (pitch, yaw, roll) in radians with yaw in [-pi/2, pi/2] and pitch, roll in
        (-pi, pi]. At gimbal lock (|yaw| = pi/2) the split between pitch and roll is arbitrary.
    """
    r00, r10 = matrix[..., 0, 0], matrix[..., 1, 0]
    r20, r21, r22 = matrix[..., 2, 0], matrix[..., 2, 1], matrix[..., 2, 2]
    pitch = torch.atan2(r21, r22)
    yaw = torch.atan2(-r20, torch.sqrt(r00 * r00 + r10 * r10 + 1e-20))
    roll = torch.atan2(r10, r00)
    return torch.stack([pitch, yaw, roll], dim=-1)


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Continuous 6-d representation (Zhou et al. 2019) to rotation matrices.

    Args:
        d6: ``[..., 6]`` — two 3-vectors, the (unnormalised) first and second **rows** of R
            (PyTorch3D's layout).

    Returns:
        ``[..., 3, 3]`` orthonormal, det +1 (Gram-Schmidt, third row = cross product).
    """
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def matrix_to_rotation_6d(matrix: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 3]`` -> ``[..., 6]``: the first two rows of R, concatenated."""
    return matrix[..., :2, :].reshape(*matrix.shape[:-2], 6)


def _skew(v: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` -> ``[..., 3, 3]`` cross-product matrix ``[v]_x``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula.

    Args:
        axis_angle: ``[..., 3]`` rotation vector: unit axis times angle (radians, right-hand rule).

    Returns:
        ``[..., 3, 3]``. Uses Taylor expansions near angle 0, so values and gradients stay finite
        there.
    """
    theta2 = (axis_angle * axis_angle).sum(-1)
    small = theta2 < 1e-8
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)  # keeps the unused branch finite
    theta = torch.sqrt(safe2)
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / safe2)
    k = _skew(axis_angle)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand(k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to unit quaternions ``[..., 4]`` = (w, x, y, z) with w >= 0.

    Shepperd's method: of the four algebraically equivalent formulas, the best-conditioned one is
    used for each matrix.
    """
    m = matrix
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    q_abs = torch.sqrt(
        torch.clamp(
            torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1),
            min=1e-12,
        )
    )
    # Row r is 4·q_r·q (up to sign) computed from the formulas that divide by q_r.
    cand = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], -1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], -1),
        ],
        -2,
    )
    cand = cand / (2.0 * q_abs[..., :, None].clamp(min=0.1))
    best = q_abs.argmax(-1)
    quat = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    quat = F.normalize(quat, dim=-1)
    return torch.where(quat[..., :1] < 0, -quat, quat)


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (w, x, y, z), any norm > 0 -> ``[..., 3, 3]``."""
    w, x, y, z = F.normalize(quat, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(*quat.shape[:-1], 3, 3)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`axis_angle_to_matrix`: ``[..., 3, 3]`` -> ``[..., 3]``, angle in [0, pi]."""
    quat = matrix_to_quaternion(matrix)
    xyz = quat[..., 1:]
    sin_half = torch.linalg.vector_norm(xyz, dim=-1)
    angle = 2.0 * torch.atan2(sin_half, quat[..., 0])
    small = angle.abs() < 1e-6
    safe_angle = torch.where(small, torch.ones_like(angle), angle)
    # axis_angle = xyz * angle / sin(angle/2); for small angles angle/sin(angle/2) ~ 2 + angle^2/12.
    factor = torch.where(small, 2.0 + angle * angle / 12.0, safe_angle / torch.sin(safe_angle / 2.0))
    return xyz * factor[..., None]


# --------------------------------------------------------------------------------------------
# Intrinsics, projection, rigid transforms
# --------------------------------------------------------------------------------------------


def _as_tensor(x, like: torch.Tensor | None = None, dtype=None, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if like is not None:
        dtype, device = dtype or like.dtype, device or like.device
    return torch.as_tensor(x, dtype=dtype or torch.get_default_dtype(), device=device)


def intrinsics_matrix(focal, cx, cy, fy=None, skew=None) -> torch.Tensor:
    """Pinhole intrinsics ``K`` in pixels (see the module docstring for the pixel convention).

    Args:
        focal: fx in pixels; a float or a tensor ``[B]``.
        cx, cy: principal point in pixels (``W/2, H/2`` for a centred one); floats or ``[B]``.
        fy: optional separate vertical focal (default ``focal``).
        skew: optional skew ``s`` (default 0).

    Returns:
        ``[B, 3, 3]`` (``B = 1`` when every argument is a scalar)
        ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]``; dtype/device of the first tensor argument, else
        torch's default dtype.
    """
    ref = next((v for v in (focal, cx, cy, fy, skew) if isinstance(v, torch.Tensor)), None)
    fx = _as_tensor(focal, ref)
    fy_t = fx if fy is None else _as_tensor(fy, ref)
    cx_t, cy_t = _as_tensor(cx, ref), _as_tensor(cy, ref)
    s = torch.zeros_like(fx) if skew is None else _as_tensor(skew, ref)
    fx, fy_t, cx_t, cy_t, s = torch.broadcast_tensors(*(v.reshape(-1) for v in (fx, fy_t, cx_t, cy_t, s)))
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    return torch.stack([fx, s, cx_t, zero, fy_t, cy_t, zero, zero, one], -1).reshape(-1, 3, 3)


def project(points_cam: torch.Tensor, K: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Perspective projection of camera-space (OpenCV) points to pixels.

    Args:
        points_cam: ``[B, N, 3]`` (x right, y down, z forward), z > 0 for visible points.
        K: ``[B, 3, 3]`` or ``[3, 3]`` intrinsics.
        eps: z is clamped to at least ``eps`` (points behind the camera give meaningless pixels).

    Returns:
        ``[B, N, 2]`` pixel coordinates (u, v): u = column, v = row, continuous, origin at the
        top-left corner of the image (pixel centres at +0.5).
    """
    p = points_cam @ K.transpose(-1, -2)
    return p[..., :2] / p[..., 2:3].clamp(min=eps)


def world_to_camera(points: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_cam = R @ x + t``.

    Args:
        points: ``[B, N, 3]`` world (model) points, mm.
        R: ``[B, 3, 3]`` world -> camera rotation.
        t: ``[B, 3]`` world origin in camera coordinates, mm.

    Returns:
        ``[B, N, 3]`` OpenCV camera coordinates.
    """
    return points @ R.transpose(-1, -2) + t[..., None, :]


def camera_to_world(points_cam: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`world_to_camera`: ``x = R^T (x_cam - t)``; same shapes."""
    return (points_cam - t[..., None, :]) @ R


_CV_FROM_GL_ON: dict = {}


def cv_from_gl(like: torch.Tensor) -> torch.Tensor:
    """:data:`CV_FROM_GL` with the dtype and device of ``like``."""
    # cached per device and dtype: a host-to-device copy per call would also break CUDA graph capture
    key = (like.dtype, like.device)
    if key not in _CV_FROM_GL_ON:
        _CV_FROM_GL_ON[key] = CV_FROM_GL.to(dtype=like.dtype, device=like.device)
    return _CV_FROM_GL_ON[key]


def pose6_to_rt(pose6: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """6-d head pose to world -> camera ``(R, t)``.

    Args:
        pose6: ``[..., 6]`` = (pitch, yaw, roll, tx, ty, tz): radians, then mm.

    Returns:
        ``R`` ``[..., 3, 3]`` = ``CV_FROM_GL @ euler_to_matrix(angles)`` and ``t`` ``[..., 3]``;
        ``x_cam = R @ x_model + t`` (OpenCV camera). Zero angles = frontal face.
    """
    R = cv_from_gl(pose6) @ euler_to_matrix(pose6[..., :3])
    return R, pose6[..., 3:]


def rt_to_pose6(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pose6_to_rt`: ``[..., 3, 3], [..., 3]`` -> ``[..., 6]``."""
    angles = matrix_to_euler(cv_from_gl(R) @ R)
    return torch.cat([angles, t], dim=-1)


def deep3d_pose_to_rt(
    angles: torch.Tensor,
    trans: torch.Tensor,
    units_to_mm: float = 100.0,
    camera_distance: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deep3DFaceRecon ``angles`` / ``trans`` coefficients to our world -> camera ``(R, t)``.

    Deep3DFaceRecon places the posed face at ``R_e x + trans`` (decimetres, y up, z towards the
    camera) and views it from ``(0, 0, camera_distance)`` looking down -z with focal 1015 px and
    principal point 112 on its 224 x 224 crop. For a model loaded in mm (``x_mm = 100 x``):
    ``x_cam = CV_FROM_GL @ R_e @ x_mm + units_to_mm * (tx, -ty, camera_distance - tz)``.

    Args:
        angles: ``[..., 3]`` (pitch, yaw, roll), coefficient slice ``[224:227]``.
        trans: ``[..., 3]`` (tx, ty, tz) in decimetres, coefficient slice ``[254:257]``.

    Returns:
        ``R`` ``[..., 3, 3]``, ``t`` ``[..., 3]`` in mm. ``rt_to_pose6(R, t)`` keeps the angles.
        Pair them with ``intrinsics_matrix(1015, 112, 112)`` for Deep3DFaceRecon's 224 crop (their
        integer-centred pixel grid differs from ours by at most half a pixel).
    """
    R = cv_from_gl(angles) @ euler_to_matrix(angles)
    tx, ty, tz = trans.unbind(-1)
    t = torch.stack([tx, -ty, camera_distance - tz], dim=-1) * units_to_mm
    return R, t


# --------------------------------------------------------------------------------------------
# EG3D 25-d camera
# --------------------------------------------------------------------------------------------


def eg3d_camera(
    R: torch.Tensor,
    t: torch.Tensor,
    K: torch.Tensor,
    image_size: int | Sequence[int],
    translation_scale: float = 1.0,
) -> torch.Tensor:
    """EG3D-style 25-d camera label.

    Args:
        R: ``[B, 3, 3]`` world -> camera rotation (OpenCV camera).
        t: ``[B, 3]`` world -> camera translation, mm.
        K: ``[B, 3, 3]``, ``[1, 3, 3]`` or ``[3, 3]`` pixel intrinsics.
        image_size: ``(H, W)`` or int.
        translation_scale: multiplies the camera-to-world translation (1 = mm).

    Returns:
        ``[B, 25]``: row-major cam2world 4x4 ``[[R^T, -R^T t * scale], [0, 0, 0, 1]]`` (16), then
        row-major normalised intrinsics ``(fx/W, s/W, cx/W, 0, fy/H, cy/H, 0, 0, 1)`` (9).
    """
    h, w = image_hw(image_size)
    Rt = R.transpose(-1, -2)
    center = -(Rt @ t[..., :, None])[..., 0] * translation_scale
    top = torch.cat([Rt, center[..., :, None]], dim=-1)  # [B,3,4]
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    c2w = torch.cat([top, bottom], dim=-2)
    norm = torch.tensor([1.0 / w, 1.0 / h, 1.0], dtype=K.dtype, device=K.device)[:, None]
    Kn = torch.broadcast_to(K * norm, (R.shape[0], 3, 3))
    return torch.cat([c2w.reshape(-1, 16), Kn.reshape(-1, 9)], dim=-1)


def from_eg3d_camera(
    c25: torch.Tensor,
    image_size: int | Sequence[int],
    translation_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`eg3d_camera`.

    Args:
        c25: ``[B, 25]``.
        image_size: ``(H, W)`` or int, the size the pixel intrinsics should refer to.
        translation_scale: the value used to build ``c25`` (translation is divided by it).

    Returns:
        ``R`` ``[B, 3, 3]`` and ``t`` ``[B, 3]`` (world -> camera, mm) and ``K`` ``[B, 3, 3]`` in
        pixels.
    """
    h, w = image_hw(image_size)
    c2w = c25[..., :16].reshape(-1, 4, 4)
    R = c2w[:, :3, :3].transpose(-1, -2)
    center = c2w[:, :3, 3] / translation_scale
    t = -(R @ center[..., None])[..., 0]
    scale = torch.tensor([w, h, 1.0], dtype=c25.dtype, device=c25.device)[:, None]
    K = c25[..., 16:].reshape(-1, 3, 3) * scale
    return R, t, K


GENERATOR_CAMERA_RADIUS = 2.7
"""Distance of the typical camera from the origin in the generator world (EG3D's)."""

_CENTER = [3, 7, 11]  # the camera centre (cam2world translation) inside a 25-d camera


def generator_world_scale(camera25_mm: torch.Tensor) -> float:
    """Generator units per mm, ``2.7 / median ||camera centre||``, from ``[N, 25]`` cameras in mm (the
    training frames'): the median camera then sits at :data:`GENERATOR_CAMERA_RADIUS`."""
    centers = camera25_mm.reshape(-1, 25)[:, _CENTER].double()
    if len(centers) == 0:
        raise AvatarError("no cameras to set the generator's world scale from")
    distance = torch.linalg.vector_norm(centers, dim=-1).sort().values
    median = float(distance[(len(distance) - 1) // 2] + distance[len(distance) // 2]) / 2.0  # even N: mean of 2
    if not (math.isfinite(median) and median > 0):
        raise AvatarError(f"median camera distance {median}: cannot set the generator's world scale")
    return GENERATOR_CAMERA_RADIUS / median


def to_generator_camera(camera25_mm: torch.Tensor, world_scale: float) -> torch.Tensor:
    """``[..., 25]`` cameras in mm -> generator world: the camera centre times ``world_scale``."""
    out = camera25_mm.clone()
    out[..., _CENTER] = out[..., _CENTER] * world_scale
    return out


def from_generator_camera(camera25: torch.Tensor, world_scale: float) -> torch.Tensor:
    """Inverse of :func:`to_generator_camera`: ``[..., 25]`` generator world -> mm."""
    out = camera25.clone()
    out[..., _CENTER] = out[..., _CENTER] / world_scale
    return out


def orbit_camera(
    yaw: float,
    pitch: float,
    radius: float,
    intrinsics9: torch.Tensor,
    target: Sequence[float] = (0.0, 0.0, 0.0),
) -> torch.Tensor:
    """A generator-world camera on a sphere around ``target``, looking at it, without roll.

    The camera sits where the nose would point after turning a frontal head by (pitch, yaw) with
    :func:`euler_to_matrix`: centre ``target + radius * M @ (0, 0, 1)``, ``M =
    euler_to_matrix(pitch, yaw, 0)``, camera-to-world rotation ``M @ CV_FROM_GL``. So yaw = pitch
    = 0 is the frontal camera (on +z, ``R = diag(1, -1, -1)``); positive **yaw** moves the camera
    towards +x (the subject's left: the face appears turned towards the image's left, as for a head
    yawed by -yaw in front of a fixed camera); positive **pitch** moves it down (-y), looking up.

    ``yaw, pitch`` in radians, ``radius`` and ``target`` in generator units; ``intrinsics9`` ``[9]``
    (``c[16:]`` of a 25-d camera) also sets dtype and device. Returns ``[25]``.
    """
    like = intrinsics9
    angles = torch.tensor([pitch, yaw, 0.0], dtype=like.dtype, device=like.device)
    M = euler_to_matrix(angles)
    center = torch.as_tensor(target, dtype=like.dtype, device=like.device) + radius * M[:, 2]
    top = torch.cat([M @ cv_from_gl(like), center[:, None]], dim=-1)  # [3,4]
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=like.dtype, device=like.device)
    return torch.cat([torch.cat([top, bottom]).reshape(16), intrinsics9.reshape(9)])


# --------------------------------------------------------------------------------------------
# Clip space / NDC for the rasterizer
# --------------------------------------------------------------------------------------------


def clip_from_camera(
    points_cam: torch.Tensor,
    K: torch.Tensor,
    image_size: int | Sequence[int],
    near: float,
    far: float,
) -> torch.Tensor:
    """Homogeneous clip coordinates of camera-space points for the rasterizer.

    Args:
        points_cam: ``[B, N, 3]`` OpenCV camera coordinates (mm).
        K: ``[B, 3, 3]`` or ``[3, 3]`` pixel intrinsics (skew allowed).
        image_size: ``(H, W)`` or int.
        near, far: depth range (same units as z) mapped to NDC depth -1 and +1.

    Returns:
        ``[B, N, 4]`` ``(x_c, y_c, z_c, w)`` with ``w = z`` and
        ``x_c / w = 2u/W - 1``, ``y_c / w = 2v/H - 1`` where ``(u, v) = project(points_cam, K)``;
        NDC y = -1 is the top image row; ``z_c / w = ((f + n) - 2fn / z) / (f - n)`` in [-1, 1],
        smaller = nearer.
    """
    h, w = image_hw(image_size)
    x, y, z = points_cam.unbind(-1)
    Kb = K if K.dim() == 3 else K[None]
    fx, s, cx = Kb[:, 0, 0, None], Kb[:, 0, 1, None], Kb[:, 0, 2, None]
    fy, cy = Kb[:, 1, 1, None], Kb[:, 1, 2, None]
    xc = (2.0 / w) * (fx * x + s * y + cx * z) - z
    yc = (2.0 / h) * (fy * y + cy * z) - z
    zc = ((far + near) * z - 2.0 * far * near) / (far - near)
    return torch.stack([xc, yc, zc, z], dim=-1)


def pixel_to_ndc(uv: torch.Tensor, image_size: int | Sequence[int]) -> torch.Tensor:
    """``[..., 2]`` pixels (u, v) -> NDC ``(2u/W - 1, 2v/H - 1)`` (y down, -1 = top edge)."""
    h, w = image_hw(image_size)
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=uv.dtype, device=uv.device)
    return uv * scale - 1.0


def ndc_to_pixel(ndc: torch.Tensor, image_size: int | Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pixel_to_ndc`: ``[..., 2]`` NDC -> pixels ``((x+1) W/2, (y+1) H/2)``."""
    h, w = image_hw(image_size)
    scale = torch.tensor([w / 2.0, h / 2.0], dtype=ndc.dtype, device=ndc.device)
    return (ndc + 1.0) * scale
