"""The training loop every trainer shares.

A trainer describes *what* to train with a ``TrainTask`` (model, optimizer, scheduler, the batch of a
step, the loss); ``train`` does the rest the same way for all of them:

* precision: bf16 autocast on CUDA (``precision='auto'``), fp32 on the CPU; optional ``torch.compile``;
* gradient clipping, optional EMA of the weights;
* a NaN/inf guard: a step whose loss or gradient norm is not finite is skipped and counted; after
  ``max_bad_steps`` in a row training stops with a clear message;
* checkpoints every ``checkpoint_every`` steps and on exit, written atomically (temp file, fsync,
  rename), holding model, optimizer, scheduler, EMA, the RNG states of every rank (python, numpy,
  torch, CUDA), the step and the sampler state; loaded with ``weights_only=True``;
* resume (default): the latest checkpoint in the run directory. Batches are a function of
  (seed, step, rank) only (``TrainTask.batch``), so a resumed run sees the same data as an
  uninterrupted one and, with deterministic kernels, ends with the same weights;
* DDP when started by ``torchrun`` (env:// rendezvous: ``--nproc-per-node`` on one host or
  ``--nnodes``/``--rdzv-endpoint`` across hosts); NCCL on CUDA, gloo on the CPU;
* TensorBoard scalars and image grids, a progress bar (``TrainProgress``) on rank 0;
* SIGINT/SIGTERM: finish the step, save a checkpoint, raise ``TrainingInterrupted``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from avatarcli.errors import AvatarError

CHECKPOINT_FORMAT = 1
_CHECKPOINT_RE = re.compile(r"^step_(\d{8,})\.pt$")


class TrainingDiverged(AvatarError):
    """The loss or the gradients were NaN/inf for too many steps in a row."""


class TrainingInterrupted(AvatarError):
    """SIGINT/SIGTERM: a checkpoint was saved; rerunning the same command resumes."""


@dataclass
class EngineConfig:
    """Settings of the shared training loop (every trainer embeds these)."""

    run_dir: str = "run"
    """Folder of checkpoints (``checkpoints/``) and TensorBoard logs (``tensorboard/``)."""
    steps: int = 60000
    """Total optimisation steps (a resumed run continues up to this)."""
    seed: int = 0
    """Seeds model initialisation and every batch (a batch is a function of seed, step and rank)."""
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on the CPU), 'fp32' or 'bf16' (autocast on any device)."""
    compile: bool = False
    """Run the forward pass through ``torch.compile``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is still computed for the guard)."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights (0 = off); the EMA weights are the result."""
    checkpoint_every: int = 1000
    """Write a checkpoint every N steps (and always on exit)."""
    keep_checkpoints: int = 3
    """Keep the newest N checkpoints."""
    resume: bool = True
    """Resume from the latest checkpoint in ``run_dir`` (False: start over and replace them)."""
    log_every: int = 50
    """Record the loss (history, TensorBoard scalars) every N steps."""
    image_every: int = 1000
    """Write TensorBoard image grids every N steps (0 = never)."""
    max_bad_steps: int = 20
    """Stop after this many consecutive steps with a NaN/inf loss or gradient."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``run_dir/tensorboard``."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N' (under torchrun each process uses cuda:LOCAL_RANK)."""
    deterministic: bool = False
    """Use deterministic kernels only (slower on CUDA; CPU kernels are deterministic anyway)."""


class TrainTask(Protocol):
    """What a trainer supplies to ``train``."""

    def fingerprint(self) -> dict:
        """Everything that changes the result (model, data, loss settings): a checkpoint made with a
        different fingerprint is not resumed."""

    def build_model(self) -> nn.Module: ...

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer: ...

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any | None: ...

    def batch(self, step: int, rank: int, world_size: int, device: torch.device) -> Any:
        """The batch of ``step`` for ``rank``: a pure function of (seed, step, rank, world size)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, extra scalar metrics). ``model`` may be wrapped (DDP, compiled)."""

    def images(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Image grids for TensorBoard: name -> [N,3,H,W] in 0..1 (may be empty)."""


class TrainProgress(Protocol):
    def start(self, total: int, done: int) -> None: ...

    def update(self, step: int, loss: float, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


@dataclass
class TrainResult:
    model: nn.Module
    """The trained model (unwrapped; EMA weights loaded when EMA is on)."""
    step: int
    start_step: int
    skipped_steps: int
    seconds: float
    world_size: int
    rank: int
    device: str
    precision: str = "fp32"
    """'fp32' or 'bf16' (autocast), as resolved for the device."""
    history: dict[str, list[float]] = field(default_factory=dict)
    """'step', 'loss' and each metric, recorded every ``log_every`` steps (the whole run, resumed
    parts included)."""
    checkpoint: str = ""

    @property
    def steps_per_second(self) -> float:
        run = self.step - self.start_step
        return run / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (env://), or run alone; pick this rank's device."""
    from avatarcli.devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device_name)
    if resolved.startswith("cuda") and world > 1:
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(resolved)
    if device.type == "cuda":
        if device.index is None:  # 'cuda' means the current device; pin it so every tensor agrees
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local_rank)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
            info.initialized_here = True
    return info, device


# ------------------------------------------------------------------------------------------------
# RNG states (as tensors and primitives, so checkpoints load with weights_only=True)


def capture_rng() -> dict:
    version, state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python_version": int(version),
        "python": torch.tensor(state, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached),
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise AvatarError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise AvatarError(f"{path}: not an avatar training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int) -> Path:
    """Write ``step_<step>.pt`` atomically (temp file in the same folder, fsync, rename), then prune."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    _fsync_dir(folder)
    for _, old in list_checkpoints(run_dir)[: -max(keep, 1)]:
        with contextlib.suppress(OSError):
            old.unlink()
    return final


def _remove_stale_temp_files(run_dir: str | os.PathLike) -> None:
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for path in folder.glob(".step_*.tmp"):
            with contextlib.suppress(OSError):
                path.unlink()


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# EMA


class WeightEma:
    """Exponential moving average of a model's floating-point state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach(), 1.0 - self.decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)


# ------------------------------------------------------------------------------------------------
# signals


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT aborts at once."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------------------
# the loop


def _autocast(device: torch.device, precision: str):
    if precision not in ("auto", "fp32", "bf16"):
        raise AvatarError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext(), "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16), "bf16"


def _open_tensorboard(config: EngineConfig, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise AvatarError("TensorBoard logging needs the 'tensorboard' package (pip install tensorboard), "
                          "or turn it off (--no-tensorboard)") from None
    return SummaryWriter(str(Path(config.run_dir) / "tensorboard"), purge_step=purge_step)


def train(config: EngineConfig, task: TrainTask, progress: TrainProgress | None = None) -> TrainResult:
    """Train ``task`` for ``config.steps`` steps (resuming when a checkpoint exists)."""
    if config.steps < 0 or config.checkpoint_every < 1 or config.log_every < 1:
        raise AvatarError("steps must be >= 0, checkpoint_every and log_every >= 1")
    dist_info, device = init_distributed(config.device)
    import torch.distributed as dist

    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    seed_everything(config.seed)  # identical initial weights on every rank
    fingerprint = fingerprint_hash(task.fingerprint())

    model = task.build_model().to(device)
    optimizer = task.build_optimizer(model)
    scheduler = task.build_scheduler(optimizer)
    ema = WeightEma(model, config.ema_decay) if config.ema_decay > 0 else None

    start_step, skipped, bad_in_a_row = 0, 0, 0
    history: dict[str, list[float]] = {"step": [], "loss": []}
    resumed_from = None
    if dist_info.is_main:
        _remove_stale_temp_files(config.run_dir)
        if not config.resume:
            for _, old in list_checkpoints(config.run_dir):
                old.unlink()
    if dist_info.enabled:
        dist.barrier()
    latest = latest_checkpoint(config.run_dir) if config.resume else None
    if latest is not None:
        state = load_checkpoint(latest)
        if state["fingerprint"] != fingerprint:
            raise AvatarError(
                f"{latest} was made with other settings or data (fingerprint {state['fingerprint']}, now "
                f"{fingerprint}); use another run directory, or --no-resume to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_step = int(state["step"])
        skipped = int(state["guard"]["skipped"])
        bad_in_a_row = int(state["guard"]["bad_in_a_row"])
        history = {k: list(v.tolist()) for k, v in state["history"].items()}
        rng_states = state["rng"]
        if len(rng_states) == dist_info.world_size:
            restore_rng(rng_states[dist_info.rank])
        else:  # another world size: batches are still exact; only global RNG draws differ
            seed_everything(config.seed + 1_000_003 * start_step + dist_info.rank)
        resumed_from = str(latest)
    else:
        seed_everything(config.seed + dist_info.rank)

    forward_model: nn.Module = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        forward_model = torch.compile(forward_model)
    autocast, precision = _autocast(device, config.precision)

    writer = _open_tensorboard(config, start_step) if config.tensorboard and dist_info.is_main else None
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    last_saved = start_step if resumed_from else -1

    def checkpoint_state(step: int) -> dict:
        rng = capture_rng()
        if dist_info.enabled:
            gathered: list = [None] * dist_info.world_size
            dist.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "fingerprint": fingerprint,
            "config": {k: v for k, v in asdict(config).items()},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rng_all,
            "sampler": {"seed": config.seed, "step": step, "world_size": dist_info.world_size},
            "guard": {"skipped": skipped, "bad_in_a_row": bad_in_a_row},
            "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in history.items()},
        }

    def write_checkpoint(step: int) -> Path | None:
        nonlocal last_saved
        state = checkpoint_state(step)  # every rank takes part (RNG gather)
        path = save_checkpoint(config.run_dir, step, state, config.keep_checkpoints) if dist_info.is_main else None
        if dist_info.enabled:
            dist.barrier()
        last_saved = step
        return path

    step = start_step
    t0 = time.perf_counter()
    if progress is not None and dist_info.is_main:
        progress.start(config.steps, start_step)
    try:
        with StopRequest() as stop:
            model.train()
            while step < config.steps:
                batch = task.batch(step, dist_info.rank, dist_info.world_size, device)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss, metrics = task.loss(forward_model, batch)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                # one small all-reduce: the mean loss, whether any rank saw a bad loss, whether any
                # rank was asked to stop (all ranks must take the same branch or DDP deadlocks)
                flags = torch.stack([loss.detach().float(),
                                     (~torch.isfinite(loss.detach())).float(),
                                     torch.tensor(float(stop.requested), device=loss.device)])
                if dist_info.enabled:
                    dist.all_reduce(flags)
                loss_value, bad_loss, stop_flag = flags.tolist()
                loss_value /= dist_info.world_size
                finite = bad_loss == 0 and math.isfinite(float(grad_norm))
                if finite:
                    optimizer.step()
                    bad_in_a_row = 0
                    if ema is not None:
                        ema.update(model)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    bad_in_a_row += 1
                if scheduler is not None:
                    scheduler.step()  # the learning rate is a function of the step, skipped or not
                step += 1
                if step % config.log_every == 0 or step == config.steps:
                    history["step"].append(float(step))
                    history["loss"].append(loss_value)
                    for key, value in metrics.items():
                        history.setdefault(key, []).append(float(value))
                    if writer is not None:
                        writer.add_scalar("train/loss", loss_value, step)
                        writer.add_scalar("train/grad_norm", float(grad_norm), step)
                        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                        writer.add_scalar("train/skipped_steps", skipped, step)
                        writer.add_scalar("train/steps_per_s", (step - start_step) / (time.perf_counter() - t0), step)
                        for key, value in metrics.items():
                            writer.add_scalar(f"train/{key}", float(value), step)
                if writer is not None and config.image_every and step % config.image_every == 0:
                    _write_images(writer, task, model, batch, step)
                if progress is not None and dist_info.is_main:
                    progress.update(step, loss_value, {"skipped": skipped})
                if bad_in_a_row >= config.max_bad_steps:
                    write_checkpoint(step)
                    raise TrainingDiverged(
                        f"loss or gradients were NaN/inf for {bad_in_a_row} steps in a row (step {step}, "
                        f"{skipped} skipped in all); the weights are those of the last good step, saved in "
                        f"{checkpoint_dir(config.run_dir)}; lower the learning rate or check the inputs")
                if stop_flag > 0:
                    write_checkpoint(step)
                    raise TrainingInterrupted(
                        f"{stop.signal_name or 'stop requested'} at step {step}/{config.steps}: checkpoint saved in "
                        f"{checkpoint_dir(config.run_dir)}; rerun the same command to resume")
                if step % config.checkpoint_every == 0:
                    write_checkpoint(step)
            if last_saved != step:
                write_checkpoint(step)
    finally:
        if progress is not None and dist_info.is_main:
            progress.close()
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    latest_path = latest_checkpoint(config.run_dir)
    return TrainResult(model=model, step=step, start_step=start_step, skipped_steps=skipped, seconds=seconds,
                       world_size=dist_info.world_size, rank=dist_info.rank, device=str(device),
                       precision=precision, history=history, checkpoint=str(latest_path) if latest_path else "")


def _write_images(writer, task: TrainTask, model: nn.Module, batch: Any, step: int) -> None:
    from torchvision.utils import make_grid

    model.eval()
    try:
        # the RNG is forked so that how often images are logged cannot change the training
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            grids = task.images(model, batch)
    finally:
        model.train()
    for name, images in grids.items():
        writer.add_image(name, make_grid(images.float().clamp(0, 1).cpu(), nrow=min(len(images), 11)), step)


def shutdown_distributed() -> None:
    """Leave the process group (call once per process after the last collective)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
