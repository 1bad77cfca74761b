"""The one face-analysis wrapper: detector, 68 landmarks, 5-point alignment and identity embeddings.

Used by ``avatar preprocess`` (detection on every kept frame, landmarks from the host) and
``avatar eval`` (the best face of each frame, everything kept on the device). API::

    faces = FaceAnalysis.load("scrfd_2.5g", "pfld68", models_dir, device, det_size=320,
                              det_pad=0.25, det_threshold=0.5, recognition=None, half=False)
    faces.detect(frames)                    # uint8 [B,H,W,3] -> list[Detections] (CPU tensors), one transfer
    faces.detect_best(frames)               # -> BestFaces (found [B], boxes [B,4], kps [B,5,2], scores [B]) on device
    faces.landmarks(frames, boxes)          # boxes np [n,4] -> np [n,68,2] frame px (host path)
    faces.landmarks_on_device(frames, boxes, max_box_side)  # tensors in, tensor [n,68,2] out, no host sync
    faces.align(frames, kps5)               # -> [B,3,112,112] float 0..255, ArcFace-aligned
    faces.embed(frames, kps5)               # -> [B,D] unit embeddings (needs ``recognition``)
    faces.analyse(frames, with_embeddings, timer)  # eval's per-batch dict: found, kps5, lmk68, embeddings

``det_size`` 0 means automatic: 640 on CUDA, 320 on the CPU. ``half``: fp16 networks (CUDA only;
preprocess uses it, eval does not). ``faces.detector_path``, ``faces.landmark_path`` and
``faces.embedder`` (``.name``, ``.path``) describe the models for an artifact's protocol.

The networks are converted (and traced per batch shape) once per process and device: ``load``
resolves (and checksums) the registry names on every call but reuses networks already built, since
tracing costs seconds on CUDA and preprocess loads the models on every run.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from avatarcli.face.landmarks import PFLD68
from avatarcli.face.scrfd import SCRFD, BestFaces, Detections, detect, detect_best

_NETWORKS: dict[tuple, object] = {}
_NETWORKS_LOCK = threading.Lock()


def auto_det_size(det_size: int, device: torch.device | str) -> int:
    """``det_size``, or for 0 the default of the device: 640 on CUDA, 320 on the CPU."""
    return det_size or (640 if torch.device(device).type == "cuda" else 320)


def _network(kind: type, path: Path, device: torch.device, half: bool):
    """``kind(path, device, half=half)``, built once per process."""
    key = (kind.__name__, str(path), str(device), half)
    with _NETWORKS_LOCK:
        if key not in _NETWORKS:
            _NETWORKS[key] = kind(path, device, half=half)
        return _NETWORKS[key]


class FaceAnalysis:
    """SCRFD detector + PFLD 68-point landmarks (+ an ArcFace-family embedder) on one device."""

    def __init__(self, detector: SCRFD, landmarker: PFLD68, detector_path: Path, landmark_path: Path,
                 det_size: int, det_pad: float, det_threshold: float, embedder=None):
        self.detector, self.landmarker, self.embedder = detector, landmarker, embedder
        self.detector_path, self.landmark_path = detector_path, landmark_path
        self.device = detector.device
        self.det_size, self.det_pad, self.det_threshold = det_size, det_pad, det_threshold

    @classmethod
    def load(cls, detector: str, landmark_model: str, models_dir: str | None, device: torch.device | str, *,
             det_size: int = 0, det_pad: float = 0.25, det_threshold: float = 0.5, recognition: str | None = None,
             half: bool = False) -> "FaceAnalysis":
        """The models by registry name (``recognition``: an embedder such as ``arcface_r50``, or None)."""
        from avatarcli import registry

        device = torch.device(device)
        detector_path = registry.resolve(detector, models_dir)
        landmark_path = registry.resolve(landmark_model, models_dir)
        embedder = None
        if recognition is not None:
            from avatarcli.metrics.identity import FaceEmbedder

            embedder = FaceEmbedder.from_registry(recognition, device, models_dir)
        return cls(_network(SCRFD, detector_path, device, half), _network(PFLD68, landmark_path, device, half),
                   detector_path, landmark_path, auto_det_size(det_size, device), det_pad, det_threshold, embedder)

    def detect(self, frames: torch.Tensor) -> list[Detections]:
        """Every face of each uint8 RGB frame [B,H,W,3] (on the device), score-sorted, as CPU tensors
        in frame pixels: the whole batch comes back in one transfer."""
        return detect(self.detector, frames, self.det_size, self.det_pad, self.det_threshold)

    def detect_best(self, frames: torch.Tensor) -> BestFaces:
        """The highest-scoring face of each frame [B,H,W,3], without leaving the device."""
        return detect_best(self.detector, frames, det_size=self.det_size, pad=self.det_pad,
                           threshold=self.det_threshold)

    def landmarks(self, frames: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        """uint8 frames [n,H,W,3] on the device, detector boxes [n,4] (numpy) -> [n,68,2] frame px."""
        return self.landmarker(frames, boxes)

    def landmarks_on_device(self, frames: torch.Tensor, boxes: torch.Tensor, max_box_side: float) -> torch.Tensor:
        """Boxes [n,4] on the device -> [n,68,2] float32 on the device, queued without a host sync;
        ``max_box_side`` bounds the boxes (see :meth:`PFLD68.on_device`)."""
        return self.landmarker.on_device(frames, boxes, max_box_side)

    def align(self, frames: torch.Tensor, kps5: torch.Tensor) -> torch.Tensor:
        """ArcFace-aligned crops [B,3,112,112] float32 RGB 0..255 from frames [B,H,W,3] and kps5 [B,5,2]."""
        from avatarcli.metrics.identity import align_faces

        return align_faces(frames, kps5)

    def embed(self, frames: torch.Tensor, kps5: torch.Tensor) -> torch.Tensor:
        """[B,D] unit-norm identity embeddings of the faces at ``kps5`` [B,5,2] (on the embedder's device)."""
        if self.embedder is None:
            raise ValueError("FaceAnalysis was loaded without a recognition model")
        return self.embedder(self.align(frames, kps5))

    def analyse(self, frames: torch.Tensor, with_embeddings: bool = False, timer=None) -> dict:
        """frames [B,H,W,3] uint8 on the device -> on the device: found [B] bool, kps5 [B,5,2] and
        lmk68 [B,68,2] float32 (frame pixels; meaningless where no face), embeddings [B,D] (zeros
        where no face) or None.

        The highest-scoring face of each frame is analysed. Every frame goes through every network
        (frames without a face too, their outputs masked) and nothing is read back to the host, so
        on a GPU the next batch is queued while this one runs. ``timer``: a ``StepTimer`` (steps
        detect, lmk68, embed).
        """
        step = timer.step if timer is not None else (lambda name, items=0: nullcontext())
        count = len(frames)
        with step("detect", count):
            best = self.detect_best(frames)
        # the detector sees the frame with a border of det_pad: no sane box is longer than that
        longest_box = (1 + 2 * self.det_pad) * max(frames.shape[1:3])
        with step("lmk68", count):
            lmk = self.landmarks_on_device(frames, best.boxes, longest_box)
        embeddings = None
        if with_embeddings and self.embedder is not None:
            with step("embed", count):
                embeddings = self.embed(frames, best.kps) * best.found[:, None].to(self.embedder.device)
        return {"found": best.found, "kps5": best.kps, "lmk68": lmk, "embeddings": embeddings}
