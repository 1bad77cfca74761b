"""Main-face tracking over a clip, gap interpolation, and the smoothed nose-centred crop box."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes a [n,4] and b [m,4]."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


@dataclass
class FrameDetections:
    """Detections of one frame (numpy, source pixels); ``None`` for frames the detector skipped."""

    boxes: np.ndarray  # [n,4]
    kps: np.ndarray  # [n,5,2]
    scores: np.ndarray  # [n]


@dataclass
class Segment:
    """A contiguous run of frames of the main face, gaps filled by interpolation."""

    start: int
    boxes: np.ndarray  # [T,4]
    kps: np.ndarray  # [T,5,2]
    scores: np.ndarray  # [T] (0 where interpolated)
    detected: np.ndarray  # [T] bool

    @property
    def stop(self) -> int:
        return self.start + len(self.boxes)


def link_tracks(frames: list[FrameDetections | None], iou_threshold: float = 0.3) -> list[dict[int, int]]:
    """Greedy IoU linking: each track maps frame -> detection index.

    A track is matched against its last box however old it is, so a face that disappears and
    comes back in the same place stays one track (the gap is handled by ``segments``).
    """
    tracks: list[dict[int, int]] = []
    last_box: list[np.ndarray] = []
    for t, dets in enumerate(frames):
        if dets is None or len(dets.boxes) == 0:
            continue
        unmatched = set(range(len(dets.boxes)))
        if tracks:
            overlap = iou(dets.boxes, np.stack(last_box))
            while unmatched:
                d, k = np.unravel_index(np.argmax(overlap), overlap.shape)
                if overlap[d, k] < iou_threshold:
                    break
                tracks[k][t] = int(d)
                last_box[k] = dets.boxes[d]
                unmatched.discard(int(d))
                overlap[d, :] = -1
                overlap[:, k] = -1
        for d in sorted(unmatched):
            tracks.append({t: d})
            last_box.append(dets.boxes[d])
    return tracks


def main_track(frames: list[FrameDetections | None], tracks: list[dict[int, int]]) -> dict[int, int] | None:
    """The track with the largest summed face size (the largest face, present longest)."""
    best, best_score = None, 0.0
    for track in tracks:
        score = 0.0
        for t, d in track.items():
            box = frames[t].boxes[d]
            score += float(np.sqrt(max((box[2] - box[0]) * (box[3] - box[1]), 0.0)))
        if score > best_score:
            best, best_score = track, score
    return best


def segments(
    frames: list[FrameDetections | None], track: dict[int, int], max_gap: int
) -> list[Segment]:
    """Split ``track`` where it misses more than ``max_gap`` frames; interpolate shorter gaps."""
    if not track:
        return []
    times = sorted(track)
    runs: list[list[int]] = [[times[0]]]
    for t in times[1:]:
        if t - runs[-1][-1] - 1 > max_gap:
            runs.append([t])
        else:
            runs[-1].append(t)
    result = []
    for run in runs:
        start, stop = run[0], run[-1] + 1
        known = np.array(run)
        span = np.arange(start, stop)
        boxes = np.stack([frames[t].boxes[track[t]] for t in run])
        kps = np.stack([frames[t].kps[track[t]] for t in run])
        scores = np.array([frames[t].scores[track[t]] for t in run], dtype=np.float32)
        full_boxes = np.stack([np.interp(span, known, boxes[:, i]) for i in range(4)], 1)
        flat = kps.reshape(len(run), -1)
        full_kps = np.stack([np.interp(span, known, flat[:, i]) for i in range(flat.shape[1])], 1).reshape(-1, 5, 2)
        detected = np.isin(span, known)
        full_scores = np.zeros(len(span), dtype=np.float32)
        full_scores[known - start] = scores
        result.append(Segment(start, full_boxes.astype(np.float32), full_kps.astype(np.float32), full_scores, detected))
    return result


def gaussian_smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing along axis 0 with edge replication (offline, no lag)."""
    if sigma <= 0 or len(values) < 2:
        return values.copy()
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.concatenate([np.repeat(values[:1], radius, 0), values, np.repeat(values[-1:], radius, 0)], 0)
    flat = padded.reshape(len(padded), -1)
    out = np.stack([np.convolve(flat[:, i], taps, mode="valid") for i in range(flat.shape[1])], 1)
    return out.reshape(values.shape)


def crop_boxes(
    lmk68: np.ndarray, scale: float, center_sigma: float, scale_sigma: float
) -> np.ndarray:
    """Square crop boxes [T,4] from landmarks [T,68,2]: centred on the nose tip, side from the
    eye–mouth geometry (FFHQ's rule: max(2·eye distance, 1.8·eye-to-mouth) times ``scale``),
    both smoothed over time.
    """
    left_eye = lmk68[:, 36:42].mean(1)
    right_eye = lmk68[:, 42:48].mean(1)
    mouth = (lmk68[:, 48] + lmk68[:, 54]) / 2
    eye_mid = (left_eye + right_eye) / 2
    eye_dist = np.linalg.norm(right_eye - left_eye, axis=1)
    eye_mouth = np.linalg.norm(mouth - eye_mid, axis=1)
    side = scale * np.maximum(2.0 * eye_dist, 1.8 * eye_mouth)
    center = gaussian_smooth(lmk68[:, 30].astype(np.float64), center_sigma)
    side = np.exp(gaussian_smooth(np.log(np.maximum(side, 1.0)).astype(np.float64), scale_sigma))
    half = side[:, None] / 2
    return np.concatenate([center - half, center + half], 1).astype(np.float32)
