"""Export3D training data: (source, driving) frame pairs of one clip, with the driving expression β and
the driving camera in the generator's world.

Inputs: a clips artifact (``avatar preprocess`` or ``avatar synth``) and its coeffs artifact
(``avatar fit-3dmm``: ICT β [T,53], or ``avatar import-deep3d``: Deep3DFaceRecon β [T,64]); β =
``coeffs/<clip>/expression``, camera = :func:`avatarcli.camera.to_generator_camera` of
``coeffs/<clip>/camera25`` with ``world_scale`` = :func:`avatarcli.camera.generator_world_scale`
over every training frame (the median training camera sits at radius 2.7).

Held out, never trained on: the first ``val_ids`` identities of the seeded permutation (entirely;
their frames are not even loaded) and the last ``val_frames`` frames of every trained clip.

Every frame of the trained clips (held-out frames too, for validation) is read once with
:class:`avatarcli.artifact.FrameReader` (a whole clip per call), resized to the training size with an
antialiased bilinear filter when the crop size differs, and kept as one uint8 bank ``[F,3,s,s]`` on the
training device; a batch is then an index gather. Item k of a step is a pure function of
``(seed, step, k)``, so DDP ranks (disjoint item ranges) and resumed runs see the same data, and
``batch(range(0, 4))`` is the concatenation of ``batch(range(0, 2))`` and ``batch(range(2, 4))``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatarcli.camera import generator_world_scale, to_generator_camera
from avatarcli.errors import AvatarError
from avatarcli.provenance import sha256_file
from avatarcli.train.clebs_data import check_finite

RESIZE_CHUNK = 256  # frames resized at once (bounds the float32 working memory)


@dataclass
class ReconClip:
    """One trained clip: its frames are rows ``offset .. offset + num_frames`` of the bank; the first
    ``train_frames`` are trained on, the rest are held out."""

    clip_id: str
    identity: str
    offset: int
    num_frames: int
    train_frames: int
    beta: np.ndarray
    """[T,K] float32 expression vectors."""
    camera: np.ndarray
    """[T,25] float32 cameras in the generator world."""


@dataclass
class ReconBatch:
    """b (source, driving) pairs; every tensor on the requested device."""

    source: torch.Tensor
    """[b,3,s,s] float in [0, 1]."""
    driving: torch.Tensor
    """[b,3,s,s] float in [0, 1]."""
    beta: torch.Tensor
    """[b,K] float32 driving expression."""
    camera: torch.Tensor
    """[b,25] float32 driving camera (generator world)."""
    source_camera: torch.Tensor
    """[b,25] float32 source camera (generator world)."""
    source_index: np.ndarray
    """[b] int64 bank rows of the source frames (``ReconData.frame_clip`` maps them to clips)."""
    driving_index: np.ndarray
    """[b] int64 bank rows of the driving frames."""
    identity_index: np.ndarray
    """[b] int64 rows of ``ReconData.train_identities``."""


@dataclass
class ReconData:
    clips: list[ReconClip]
    train_identities: list[str]
    """Trained identities that kept a usable clip, sorted."""
    val_identities: list[str]
    """Held-out identities, sorted (not loaded)."""
    expr_dim: int
    world_scale: float
    """Generator units per mm."""
    parents: list[tuple[str, str]]
    """(path, sha256) of the clips and coeffs artifacts."""
    skipped: list[tuple[str, str]]
    """(clip, reason) of the trained identities' clips left out."""
    crop_size: int
    num_frames: int
    """Rows of the bank: every frame of the trained clips."""
    image_size: int
    settings: dict = field(default_factory=dict)
    """ids, val_ids, val_frames, seed (for :meth:`signature`)."""
    frames: torch.Tensor | None = field(default=None, repr=False)
    """[F,3,s,s] uint8 bank."""
    beta: torch.Tensor | None = field(default=None, repr=False)
    """[F,K] float32, on the bank's device."""
    camera: torch.Tensor | None = field(default=None, repr=False)
    """[F,25] float32 generator-world cameras, on the bank's device."""

    def __post_init__(self) -> None:
        self.offsets = np.array([c.offset for c in self.clips], np.int64)
        self.train_counts = np.array([c.train_frames for c in self.clips], np.int64)
        self.frame_clip = np.repeat(np.arange(len(self.clips)), [c.num_frames for c in self.clips])
        """[F] clip (row of ``clips``) of every bank row."""
        rows = {name: i for i, name in enumerate(self.train_identities)}
        self.clip_identity = np.array([rows[c.identity] for c in self.clips], np.int64)
        # per identity: its clips and their cumulative training-frame counts (clip ∝ training frames)
        self._identity_clips = [np.flatnonzero(self.clip_identity == i) for i in range(len(self.train_identities))]
        self._identity_cumulative = [np.cumsum(self.train_counts[c]) for c in self._identity_clips]

    @property
    def device(self) -> torch.device:
        return self.frames.device

    def pair(self, seed: int, step: int, item: int) -> tuple[int, int, int]:
        """(identity row, source bank row, driving bank row) of item ``item`` of step ``step``: an
        identity uniformly, a clip of it in proportion to its training frames, then two distinct
        training frames of that clip."""
        rng = np.random.default_rng([seed, step, item])
        who = int(rng.integers(len(self._identity_clips)))
        cumulative = self._identity_cumulative[who]
        clip = int(self._identity_clips[who][np.searchsorted(cumulative, rng.integers(cumulative[-1]), side="right")])
        count = int(self.train_counts[clip])
        source = int(rng.integers(count))
        driving = (source + 1 + int(rng.integers(count - 1))) % count  # any other training frame
        offset = int(self.offsets[clip])
        return who, offset + source, offset + driving

    def batch(self, seed: int, step: int, items: range, device: torch.device | str | None = None) -> ReconBatch:
        """The pairs of global items ``items`` of step ``step`` (a rank takes its own slice of items)."""
        rows = np.array([self.pair(seed, step, k) for k in items], np.int64).reshape(-1, 3)
        return self.gather(rows[:, 1], rows[:, 2], rows[:, 0], device)

    def gather(self, source: np.ndarray, driving: np.ndarray, identity: np.ndarray,
               device: torch.device | str | None = None) -> ReconBatch:
        """A batch of given bank rows ``[b]`` (uint8 crosses to ``device``, then becomes float)."""
        device = self.device if device is None else torch.device(device)
        both = torch.from_numpy(np.concatenate([source, driving])).to(self.device)
        images = self.frames[both].to(device, non_blocking=True).float().div_(255.0)
        src, drv = both[: len(source)], both[len(source):]
        return ReconBatch(images[: len(source)], images[len(source):], self.beta[drv].to(device),
                          self.camera[drv].to(device), self.camera[src].to(device),
                          np.asarray(source, np.int64), np.asarray(driving, np.int64), np.asarray(identity, np.int64))

    def validation_pairs(self) -> np.ndarray:
        """[P,3] (identity row, source row, driving row): every held-out frame of the trained clips with
        its clip's first training frame as the source, identities interleaved (round robin)."""
        per_identity: list[list[tuple[int, int, int]]] = [[] for _ in self.train_identities]
        for clip, who in zip(self.clips, self.clip_identity):
            per_identity[who] += [(int(who), clip.offset, clip.offset + t)
                                  for t in range(clip.train_frames, clip.num_frames)]
        longest = max(len(p) for p in per_identity)
        rows = [p[k] for k in range(longest) for p in per_identity if k < len(p)]
        return np.array(rows, np.int64).reshape(-1, 3)

    def validation_batch(self, count: int, device: torch.device | str | None = None) -> ReconBatch:
        """The first ``count`` of :meth:`validation_pairs` (fewer when there are fewer); deterministic."""
        pairs = self.validation_pairs()[:count]
        if len(pairs) == 0:
            raise AvatarError("no held-out frames to validate on: set --val-frames above 0")
        return self.gather(pairs[:, 1], pairs[:, 2], pairs[:, 0], device)

    def signature(self) -> dict:
        """What the data depends on, for fingerprints."""
        return {"inputs": [list(p) for p in self.parents], "image_size": self.image_size, **self.settings,
                "train_identities": list(self.train_identities), "val_identities": list(self.val_identities),
                "clips": [[c.clip_id, c.num_frames, c.train_frames] for c in self.clips],
                "world_scale": self.world_scale}

    def loader_throughput(self, seconds: float = 1.0, batch: int = 8,
                          device: torch.device | str | None = None) -> float:
        """Items per second drawn by :meth:`batch` (synchronised on CUDA) over about ``seconds``."""
        device = self.device if device is None else torch.device(device)
        items, step, start = 0, 0, time.perf_counter()
        while True:
            out = self.batch(0, step, range(batch), device)
            if out.source.is_cuda:
                torch.cuda.synchronize(out.source.device)
            items, step = items + batch, step + 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return items / elapsed


def _check_settings(image_size: int, ids: int, val_ids: int, val_frames: int) -> None:
    if image_size < 8:
        raise AvatarError(f"the training image size must be at least 8, not {image_size}")
    for name, value in (("--ids", ids), ("--val-ids", val_ids), ("--val-frames", val_frames)):
        if value < 0:
            raise AvatarError(f"{name} must be >= 0, not {value}")


def _check_kinds(clips_path, coeffs_path) -> None:
    from avatarcli.artifact import read_kind

    for path, kind, made_by in ((clips_path, "clips", "avatar preprocess or avatar synth"),
                                (coeffs_path, "coeffs", "avatar fit-3dmm or avatar import-deep3d")):
        actual = read_kind(path)
        if actual != kind:
            raise AvatarError(f"{path}: a {actual} artifact; expected a {kind} artifact ({made_by})")


def choose_identities(identities: list[str], ids: int, val_ids: int, seed: int,
                      where: str = "the clips artifact") -> tuple[list[str], list[str]]:
    """(trained, held out), both sorted: the sorted names permuted by ``default_rng(seed)``; the first
    ``val_ids`` are held out, the next ``ids`` (0: all the rest) trained."""
    names = sorted(set(identities))
    need = val_ids + max(ids, 1)
    if len(names) < need:
        raise AvatarError(f"{where} has {len(names)} identities; --ids {ids} with --val-ids {val_ids} "
                          f"needs at least {need}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    train = order[val_ids: val_ids + ids] if ids else order[val_ids:]
    return sorted(train), sorted(order[:val_ids])


def _check_camera(group, coeffs_path, name: str) -> None:
    if "camera25" not in group:
        raise AvatarError(f"{coeffs_path}: clip {name!r} has no camera25 (the EG3D camera train-recon needs); "
                          f"refit with avatar fit-3dmm or reimport with avatar import-deep3d")


def _check_first_camera(coeffs_path) -> None:
    """The camera of the first fitted clip, before schema validation reports it less clearly."""
    import h5py

    with h5py.File(coeffs_path, "r") as handle:
        units = handle.get("coeffs")
        first = next(iter(units), None) if isinstance(units, h5py.Group) else None
        if first is not None:
            _check_camera(units[first], coeffs_path, first)


def _read_coefficients(coeffs, coeffs_path, name: str, num_frames: int, clips_path) -> tuple[np.ndarray, ...]:
    """(β [T,K], camera25 [T,25] in mm) of one clip, checked."""
    from avatarcli.artifact import validate_unit
    from avatarcli.schemas import COEFFS

    group = coeffs["coeffs"][name]
    _check_camera(group, coeffs_path, name)
    validate_unit(group, COEFFS, label=str(coeffs_path))
    beta = np.asarray(group["expression"][()], np.float32)
    camera = np.asarray(group["camera25"][()], np.float32)
    if len(beta) != num_frames:
        raise AvatarError(f"{coeffs_path}: clip {name!r} has coefficients for {len(beta)} frames but {clips_path} "
                          f"holds {num_frames}: were these coeffs fitted on another clips artifact?")
    check_finite(coeffs_path, name, beta, np.asarray(group["rotation"][()], np.float32))
    bad = np.flatnonzero(~np.isfinite(camera).all(1))
    if len(bad):
        raise AvatarError(f"{coeffs_path}: clip {name!r} has a NaN or inf camera25 at frame {int(bad[0])}")
    return beta, camera


def _to_bank(frames: np.ndarray, bank: torch.Tensor, offset: int) -> None:
    """[T,S,S,3] uint8 -> bank rows ``offset..offset+T`` ([.,3,s,s] uint8), resized if S != s."""
    from avatarcli.evaluation.frames import to_size

    size = bank.shape[-1]
    for start in range(0, len(frames), RESIZE_CHUNK):
        chunk = to_size(torch.from_numpy(frames[start: start + RESIZE_CHUNK]).to(bank.device), size)
        bank[offset + start: offset + start + len(chunk)] = chunk.permute(0, 3, 1, 2)


def load_recon_data(clips_path: str | Path, coeffs_path: str | Path, image_size: int, ids: int, val_ids: int,
                    val_frames: int, seed: int, device: torch.device | str = "cpu", progress=None) -> ReconData:
    """Choose identities, read the trained clips' frames, β and cameras (module docstring)."""
    from avatarcli.artifact import FrameReader, open_artifact, read_strings, validate_unit
    from avatarcli.schemas import CLIPS, COEFFS

    _check_settings(image_size, ids, val_ids, val_frames)
    _check_kinds(clips_path, coeffs_path)
    _check_first_camera(coeffs_path)
    parents = [(str(Path(p).absolute()), sha256_file(p)) for p in (clips_path, coeffs_path)]
    with open_artifact(clips_path, CLIPS.kind) as clips, open_artifact(coeffs_path, COEFFS.kind) as coeffs:
        names = read_strings(clips["index/clip_id"])
        identity_names = read_strings(clips["identities/name"])
        clip_identity = [identity_names[i] for i in clips["index/identity_id"][()]]
        lengths = [int(n) for n in clips["index/num_frames"][()]]
        crop = int(clips.attrs["crop_size"])
        train, val = choose_identities(clip_identity, ids, val_ids, seed, str(clips_path))
        trained = set(train)
        fitted = set(read_strings(coeffs["index/clip_id"]))
        if not fitted & set(names):
            raise AvatarError(f"{coeffs_path} fits none of the clips of {clips_path}: were these coeffs fitted on "
                              f"another clips artifact?")
        plan, skipped = [], []
        for name, who, count in zip(names, clip_identity, lengths):
            if who not in trained:
                continue
            if name not in fitted:
                skipped.append((name, "not in the coeffs artifact (not fitted)"))
            elif count - val_frames < 2:
                skipped.append((name, f"{count} frames: fewer than 2 left to train on after holding out the "
                                      f"last {val_frames}"))
            else:
                plan.append((name, who, count))
        # β and cameras first (small), so bad coefficients fail before the frames are read
        coefficients = [_read_coefficients(coeffs, coeffs_path, name, count, clips_path) for name, _, count in plan]
        usable = sorted({who for _, who, _ in plan})
        if not plan:
            reasons = "; ".join(f"{n}: {r}" for n, r in skipped[:3])
            raise AvatarError(f"no usable clip among the {len(train)} trained identities "
                              f"({len(skipped)} skipped{': ' + reasons if reasons else ''})")
        world_scale = generator_world_scale(torch.from_numpy(
            np.concatenate([camera[: count - val_frames] for (_, _, count), (_, camera) in zip(plan, coefficients)])))
        total = sum(count for _, _, count in plan)
        bank = torch.empty((total, 3, image_size, image_size), dtype=torch.uint8, device=device)
        reader = FrameReader()
        recon_clips: list[ReconClip] = []
        offset = 0
        if progress is not None:
            progress.start(len(plan))
        try:
            for (name, who, count), (beta, camera) in zip(plan, coefficients):
                group = clips["clips"][name]
                validate_unit(group, CLIPS, label=str(clips_path))
                if group["frames"].shape[0] != count:
                    raise AvatarError(f"{clips_path}: clip {name!r} holds {group['frames'].shape[0]} frames, its "
                                      f"index says {count}")
                _to_bank(reader.read(group["frames"], 0, count), bank, offset)
                generator_camera = to_generator_camera(torch.from_numpy(camera), world_scale).numpy()
                recon_clips.append(ReconClip(name, who, offset, count, count - val_frames, beta, generator_camera))
                offset += count
                if progress is not None:
                    progress.unit_done(name, "ok", f"{count} frames")
        finally:
            reader.close()
    beta_bank = torch.from_numpy(np.concatenate([c.beta for c in recon_clips])).to(device)
    camera_bank = torch.from_numpy(np.concatenate([c.camera for c in recon_clips])).to(device)
    settings = {"ids": ids, "val_ids": val_ids, "val_frames": val_frames, "seed": seed}
    return ReconData(recon_clips, usable, val, int(beta_bank.shape[1]), world_scale, parents, skipped, crop, total,
                     image_size, settings, bank, beta_bank, camera_bank)
