"""The training loop every trainer shares.

A trainer describes *what* to train with a ``TrainTask`` (``avatarcli.train.task``): named models
and optimizers (param groups with their own learning rates), schedulers, EMA copies, the phases of
a step (``loss -> backward -> step some optimizers``, each every N steps), the batch of a step,
hooks, images and validation. ``train`` does the rest the same way for all of them:

* precision: bf16 autocast on CUDA (``precision='auto'``), fp32 on the CPU; optional ``torch.compile``;
* gradient accumulation: ``accumulate`` micro-batches per optimizer step, each loss divided by
  ``accumulate`` so the summed gradient is that of the whole batch; under DDP the gradients are
  synchronised on the last micro-batch only;
* gradient clipping per phase, EMA copies of named models;
* a NaN/inf guard: a phase whose loss or gradient norm is not finite does not step its optimizers
  and its step is counted as skipped; after ``max_bad_steps`` bad steps in a row training stops;
* validation every ``validate_every`` steps: metrics into the history and TensorBoard, image grids
  as PNG files in ``<run_dir>/validation/``;
* checkpoints (``avatarcli.train.checkpoint``) every ``checkpoint_every`` steps and on exit,
  written atomically, holding every model, optimizer, scheduler and EMA, the RNG states of every
  rank, the guard counters and the history; the latest one is resumed by default. Batches are a
  function of (seed, step, shard) only (``TrainTask.batch``), so a resumed run sees the same data
  as an uninterrupted one and, with deterministic kernels, ends with the same weights;
* DDP when started by ``torchrun`` (env:// rendezvous); NCCL on CUDA, gloo on the CPU;
* TensorBoard scalars and image grids, a progress bar (``TrainProgress``) on rank 0;
* SIGINT/SIGTERM: finish the step, save a checkpoint, raise ``TrainingInterrupted``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avatarcli.errors import AvatarError
from avatarcli.train.checkpoint import (
    CHECKPOINT_FORMAT, capture_rng, checkpoint_dir, fingerprint_hash, latest_checkpoint, list_checkpoints,
    load_checkpoint, remove_stale_temp_files, restore_rng, save_checkpoint, seed_everything, upgrade_checkpoint,
)
from avatarcli.train.distributed import DistInfo, StopRequest, all_reduce, barrier, init_distributed
from avatarcli.train.ema import ModelEma
from avatarcli.train.engine_config import EngineConfig  # noqa: F401 (the engine's settings, re-exported)
from avatarcli.train.hooks import EngineState, TrainHook
from avatarcli.train.params import match_state_shapes
from avatarcli.train.task import EmaSpec, Phase, TrainProgress, TrainTask, Validation
from avatarcli.train.validation import evaluation, image_grid, validation_png_path, write_grids_png


class TrainingDiverged(AvatarError):
    """The loss or the gradients were NaN/inf for too many steps in a row."""


class TrainingInterrupted(AvatarError):
    """SIGINT/SIGTERM: a checkpoint was saved; rerunning the same command resumes."""

    exit_code = 130


@dataclass
class TrainResult:
    models: dict[str, nn.Module]
    """Every model of the task and the EMA copies, unwrapped, by name."""
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
    """'step', 'loss' (the sum over the phases run in that step), 'loss/<phase>' (tasks of several
    phases) and each metric, recorded every ``log_every`` steps; 'validation/step' and
    'validation/<metric>' at every validation (the whole run, resumed parts included)."""
    checkpoint: str = ""

    @property
    def steps_per_second(self) -> float:
        run = self.step - self.start_step
        return run / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _PhaseOutcome:
    loss: float
    """Mean over the micro-batches and processes."""
    grad_norm: float
    finite: bool
    stop: bool
    metrics: dict[str, Any]
    """This rank's metrics (tensors or floats; read at logging steps only)."""


def _check_config(config: EngineConfig) -> None:
    if config.steps < 0 or config.checkpoint_every < 1 or config.log_every < 1:
        raise AvatarError("steps must be >= 0, checkpoint_every and log_every >= 1")
    if config.accumulate < 1 or config.validate_every < 0:
        raise AvatarError("accumulate must be >= 1 and validate_every >= 0")


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


def _use_deterministic_kernels() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _optimizer_parameters(optimizers: list[torch.optim.Optimizer]) -> list[nn.Parameter]:
    return [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]


def _trained_models(models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> list[str]:
    """Names of the models with a parameter in some optimizer."""
    trainable = {id(p) for p in _optimizer_parameters(list(optimizers.values()))}
    return [name for name, model in models.items() if any(id(p) in trainable for p in model.parameters())]


def _append_row(history: dict[str, list[float]], index_key: str, index: float, values: dict[str, float]) -> None:
    """One row of a table in ``history``: columns first seen later are padded with NaN at the front."""
    column = history.setdefault(index_key, [])
    column.append(float(index))
    for key, value in values.items():
        column = history.setdefault(key, [])
        column.extend([math.nan] * (len(history[index_key]) - 1 - len(column)))
        column.append(value)


def _build_state(config: EngineConfig, task: TrainTask, dist_info: DistInfo, device: torch.device) -> EngineState:
    seed_everything(config.seed)  # identical initial weights on every rank
    models = {name: model.to(device) for name, model in task.build_models().items()}
    optimizers = task.build_optimizers(models)
    schedulers = task.build_schedulers(optimizers)
    if hasattr(task, "ema_models"):
        specs = task.ema_models()
    elif config.ema_decay > 0:
        specs = {f"{name}_ema": EmaSpec(name, config.ema_decay) for name in _trained_models(models, optimizers)}
    else:
        specs = {}
    emas = {name: ModelEma(models[spec.source], spec.decay, spec.source) for name, spec in specs.items()}
    return EngineState(config, models, dict(models), optimizers, schedulers, emas, device, dist_info)


class _Run:
    """One call of ``train``: the state, the step and its phases, logging, validation, checkpoints."""

    def __init__(self, config: EngineConfig, task: TrainTask, state: EngineState, progress: TrainProgress | None):
        self.config, self.task, self.state = config, task, state
        self.dist = state.dist
        self.progress = progress if self.dist.is_main else None
        self.phases: list[Phase] = list(task.phases())
        self.hooks: list[TrainHook] = list(task.hooks()) if hasattr(task, "hooks") else []
        self._check_task()
        fingerprint = task.fingerprint()
        if config.accumulate != 1:  # the split changes batch statistics and rounding
            fingerprint = {**fingerprint, "engine_accumulate": config.accumulate}
        self.fingerprint = fingerprint_hash(fingerprint)
        self.skipped = self.bad_in_a_row = self.start_step = 0
        self.out_of_time = False
        """``EngineConfig.time_limit`` was reached: the loop ends after this step, as at ``steps``."""
        self.loop_started = 0.0
        """When :meth:`loop` began (the time limit counts from there)."""
        self.history: dict[str, list[float]] = {"step": [], "loss": []}
        self.last_values: dict[str, float] = {}
        self.resumed = False
        self.ddp: dict[str, nn.Module] = {}
        self.autocast, self.precision = _autocast(state.device, config.precision)
        self.writer = None

    def _check_task(self) -> None:
        for phase in self.phases:
            unknown = [name for name in phase.optimizers if name not in self.state.optimizers]
            if unknown or phase.every < 1:
                raise AvatarError(f"phase {phase.name!r}: unknown optimizers {unknown} or every < 1 "
                                  f"(optimizers: {sorted(self.state.optimizers)})")
        if self.config.validate_every and not hasattr(self.task, "validate"):
            raise AvatarError("validate_every is set but this trainer has no validation")

    # -- run directory, resume, wrapping --------------------------------------------------------

    def prepare_run_dir(self) -> None:
        if self.dist.is_main:
            remove_stale_temp_files(self.config.run_dir)
            if not self.config.resume:
                for _, old in list_checkpoints(self.config.run_dir):
                    old.unlink()
        barrier(self.dist)

    def resume(self) -> None:
        latest = latest_checkpoint(self.config.run_dir) if self.config.resume else None
        if latest is None:
            seed_everything(self.config.seed + self.dist.rank)
            return
        s = self.state
        state = load_checkpoint(latest)
        if state["fingerprint"] != self.fingerprint:
            raise AvatarError(
                f"{latest} was made with other settings or data (fingerprint {state['fingerprint']}, now "
                f"{self.fingerprint}); use another run directory, or --no-resume to start over")
        state = upgrade_checkpoint(state, list(s.models), list(s.optimizers), list(s.schedulers), list(s.emas), latest)
        for section, names in (("models", s.models), ("optimizers", s.optimizers), ("schedulers", s.schedulers),
                               ("ema", s.emas)):
            missing = sorted(set(names) - set(state[section]))
            if missing:
                raise AvatarError(f"{latest}: no {section} {missing}; use another run directory, or --no-resume")
        for name, model in s.models.items():
            match_state_shapes(model, state["models"][name], s.optimizers.values())
            model.load_state_dict(state["models"][name])
        for name, optimizer in s.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in s.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        for name, ema in s.emas.items():
            ema.load_state_dict(state["ema"][name])
        self.start_step = s.step = int(state["step"])
        self.skipped = int(state["guard"]["skipped"])
        self.bad_in_a_row = int(state["guard"]["bad_in_a_row"])
        self.history = {k: list(v.tolist()) for k, v in state["history"].items()}
        self.last_values = dict(state.get("last_logged", {}))
        rng_states = state["rng"]
        if len(rng_states) == self.dist.world_size:
            restore_rng(rng_states[self.dist.rank])
        else:  # another world size: batches are still exact; only global RNG draws differ
            seed_everything(self.config.seed + 1_000_003 * s.step + self.dist.rank)
        self.resumed = True

    def wrap_models(self) -> None:
        """DDP and ``torch.compile`` around the trained models; ``state.forward`` is what losses call."""
        s = self.state
        self.trained = _trained_models(s.models, s.optimizers)
        for name in self.trained:
            model = forward = s.models[name]
            if self.dist.enabled:
                from torch.nn.parallel import DistributedDataParallel

                forward = DistributedDataParallel(
                    model, device_ids=[s.device.index] if s.device.type == "cuda" else None)
                self.ddp[name] = forward
            if self.config.compile:
                forward = torch.compile(forward)
            s.forward[name] = forward
        s.forward.update({name: ema.module for name, ema in s.emas.items()})
        s.ddp_models = frozenset(self.ddp)

    # -- one step ---------------------------------------------------------------------------------

    def _train_only(self, params: list[nn.Parameter]) -> set[str]:
        """Let only ``params`` of the optimizers' parameters require gradients; the models they are in."""
        s = self.state
        trainable = {id(p) for p in _optimizer_parameters(list(s.optimizers.values()))}
        wanted = {id(p) for p in params}
        trained = set()
        for name, model in s.models.items():
            for param in model.parameters():
                if id(param) in trainable:
                    want = id(param) in wanted
                    if param.requires_grad != want:
                        param.requires_grad_(want)
                    if want:
                        trained.add(name)
        return trained

    def _gradient_sync(self, trained: set[str], final: bool) -> contextlib.ExitStack:
        """DDP synchronises the gradients of the models this phase trains, on its last micro-batch only."""
        stack = contextlib.ExitStack()
        for name, ddp in self.ddp.items():
            if not final or name not in trained:
                stack.enter_context(ddp.no_sync())
        return stack

    def _backward(self, phase: Phase, batches: list[Any], trained: set[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward and backward of every micro-batch, gradients summed: (mean loss, mean metrics)."""
        s, micro_batches = self.state, len(batches)
        loss_sum, metrics = None, {}
        for micro, batch in enumerate(batches):
            with self._gradient_sync(trained, micro == micro_batches - 1):
                with self.autocast:
                    loss, micro_metrics = phase.loss(s.forward, batch, s.step)
                (loss if micro_batches == 1 else loss / micro_batches).backward()
            value = loss.detach().float()
            loss_sum = value if loss_sum is None else loss_sum + value
            for key, metric in micro_metrics.items():
                metric = metric.detach() if torch.is_tensor(metric) else metric
                metrics[key] = metric if key not in metrics else metrics[key] + metric
        if micro_batches > 1:
            loss_sum = loss_sum / micro_batches
            metrics = {key: metric / micro_batches for key, metric in metrics.items()}
        return loss_sum, metrics

    def _run_phase(self, phase: Phase, batches: list[Any], stop: StopRequest) -> _PhaseOutcome:
        s = self.state
        optimizers = [s.optimizers[name] for name in phase.optimizers]
        trained = self._train_only(_optimizer_parameters(optimizers))
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss_sum, metrics = self._backward(phase, batches, trained)
        for hook in self.hooks:
            hook.after_backward(s, phase)
        clip = self.config.grad_clip if phase.grad_clip is None else phase.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(_optimizer_parameters(optimizers), clip if clip > 0 else math.inf)
        # one small all-reduce: the mean loss, whether any rank saw a bad loss, whether any rank was
        # asked to stop (all ranks must take the same branch or DDP deadlocks)
        flags = all_reduce(self.dist, torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(),
                                                   torch.tensor(float(stop.requested), device=loss_sum.device),
                                                   torch.tensor(float(self.time_up()), device=loss_sum.device)]))
        loss_value, bad_loss, stop_flag, time_flag = flags.tolist()
        self.out_of_time = self.out_of_time or time_flag > 0
        grad_norm = float(grad_norm)
        finite = bad_loss == 0 and math.isfinite(grad_norm)
        if finite:
            for hook in self.hooks:
                hook.before_optimizer_step(s, phase)
            for optimizer in optimizers:
                optimizer.step()
            for hook in self.hooks:
                hook.after_optimizer_step(s, phase)
        else:
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
        return _PhaseOutcome(loss_value / self.dist.world_size, grad_norm, finite, stop_flag > 0, metrics)

    def _stop_without_phases(self, stop: StopRequest) -> bool:
        flags = all_reduce(self.dist, torch.tensor([float(stop.requested), float(self.time_up())],
                                                   device=self.state.device))
        self.out_of_time = self.out_of_time or bool(flags[1].item() > 0)
        return bool(flags[0].item() > 0)

    def time_up(self) -> bool:
        """This rank's clock says the time limit is reached (the ranks' votes are all-reduced, so all
        of them stop after the same step)."""
        limit = self.config.time_limit
        return bool(limit) and time.perf_counter() - self.loop_started >= 60.0 * limit

    def run_step(self, stop: StopRequest) -> tuple[Any, dict[str, _PhaseOutcome], bool]:
        """One optimisation step: (its last micro-batch, the outcome of each phase run, stop?)."""
        s, k = self.state, self.config.accumulate
        batches = [self.task.batch(s.step, self.dist.rank * k + micro, self.dist.world_size * k, s.device)
                   for micro in range(k)]
        outcomes = {phase.name: self._run_phase(phase, batches, stop) for phase in self.phases
                    if s.step % phase.every == 0}
        if all(outcome.finite for outcome in outcomes.values()):
            self.bad_in_a_row = 0
            for ema in s.emas.values():
                ema.update(s.models[ema.source_name])
        else:
            self.skipped += 1
            self.bad_in_a_row += 1
        for scheduler in s.schedulers.values():
            scheduler.step()  # the learning rate is a function of the step, skipped or not
        s.step += 1
        for hook in self.hooks:
            hook.after_step(s)
        stop_now = any(o.stop for o in outcomes.values()) if outcomes else self._stop_without_phases(stop)
        return batches[-1], outcomes, stop_now

    # -- logging, images, validation -------------------------------------------------------------

    def log(self, outcomes: dict[str, _PhaseOutcome], total_loss: float, t0: float) -> None:
        s = self.state
        values = {f"loss/{name}": outcome.loss for name, outcome in outcomes.items()} if len(self.phases) > 1 else {}
        for outcome in outcomes.values():
            values.update({key: float(metric) for key, metric in outcome.metrics.items()})
        self.last_values.update(values)  # a lazily run phase keeps its last values
        _append_row(self.history, "step", s.step, {"loss": total_loss, **self.last_values})
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", total_loss, s.step)
        for key, value in self.last_values.items():
            self.writer.add_scalar(f"train/{key}", value, s.step)
        for name, outcome in outcomes.items():
            self.writer.add_scalar(f"train/grad_norm/{name}", outcome.grad_norm, s.step)
        for name, optimizer in s.optimizers.items():
            for index, group in enumerate(optimizer.param_groups):
                self.writer.add_scalar(f"train/lr/{name}" + (f"/{index}" if index else ""), group["lr"], s.step)
        self.writer.add_scalar("train/skipped_steps", self.skipped, s.step)
        self.writer.add_scalar("train/steps_per_s", (s.step - self.start_step) / (time.perf_counter() - t0), s.step)

    def write_images(self, batch: Any) -> None:
        s = self.state
        with evaluation(s.models, s.device):
            grids = self.task.images(s.models, batch)
        for name, images in grids.items():
            self.writer.add_image(name, image_grid(images), s.step)

    def validate(self) -> None:
        """The task's validation on rank 0: metrics into the history and TensorBoard, grids as a PNG."""
        s = self.state
        models = s.all_models()
        with evaluation(models, s.device):
            result: Validation = self.task.validate(models, s.step)
        metrics = {f"validation/{key}": float(value) for key, value in result.metrics.items()}
        _append_row(self.history, "validation/step", s.step, metrics)
        grids = {name: image_grid(images) for name, images in result.images.items()}
        if grids:
            write_grids_png(validation_png_path(self.config.run_dir, s.step), list(grids.values()))
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, s.step)
            for name, grid in grids.items():
                self.writer.add_image(f"validation/{name}", grid, s.step)

    # -- checkpoints ------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        s = self.state
        rng = capture_rng()
        if self.dist.enabled:
            import torch.distributed as dist

            rng_all: list = [None] * self.dist.world_size
            dist.all_gather_object(rng_all, rng)
        else:
            rng_all = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "step": s.step,
            "fingerprint": self.fingerprint,
            "config": asdict(self.config),
            "models": {name: model.state_dict() for name, model in s.models.items()},
            "optimizers": {name: optimizer.state_dict() for name, optimizer in s.optimizers.items()},
            "schedulers": {name: scheduler.state_dict() for name, scheduler in s.schedulers.items()},
            "ema": {name: ema.state_dict() for name, ema in s.emas.items()},
            "rng": rng_all,
            "sampler": {"seed": self.config.seed, "step": s.step, "world_size": self.dist.world_size},
            "guard": {"skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row},
            "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
            "last_logged": dict(self.last_values),
        }

    def write_checkpoint(self) -> None:
        state = self.checkpoint_state()  # every rank takes part (RNG gather)
        if self.dist.is_main:
            save_checkpoint(self.config.run_dir, self.state.step, state, self.config.keep_checkpoints)
        barrier(self.dist)
        self.last_saved = self.state.step

    # -- the loop ---------------------------------------------------------------------------------

    def finish_step(self, batch: Any, outcomes: dict[str, _PhaseOutcome], stop_now: bool, stop: StopRequest,
                   t0: float) -> None:
        config, step = self.config, self.state.step
        total_loss = math.fsum(outcome.loss for outcome in outcomes.values())
        if step % config.log_every == 0 or step == config.steps:
            self.log(outcomes, total_loss, t0)
        if self.writer is not None and config.image_every and step % config.image_every == 0 \
                and hasattr(self.task, "images"):
            self.write_images(batch)
        if config.validate_every and step % config.validate_every == 0 and self.dist.is_main:
            self.validate()
        if self.progress is not None:
            self.progress.update(step, total_loss, {"skipped": self.skipped})
        if self.bad_in_a_row >= config.max_bad_steps:
            self.write_checkpoint()
            raise TrainingDiverged(
                f"loss or gradients were NaN/inf for {self.bad_in_a_row} steps in a row (step {step}, "
                f"{self.skipped} skipped in all); the weights are those of the last good step, saved in "
                f"{checkpoint_dir(config.run_dir)}; lower the learning rate or check the inputs")
        if stop_now:
            self.write_checkpoint()
            raise TrainingInterrupted(
                f"{stop.signal_name or 'stop requested'} at step {step}/{config.steps}: checkpoint saved in "
                f"{checkpoint_dir(config.run_dir)}; rerun the same command to resume")
        if step % config.checkpoint_every == 0:
            self.write_checkpoint()

    def loop(self) -> float:
        """Train up to ``config.steps``; the seconds it took."""
        s = self.state
        self.last_saved = s.step if self.resumed else -1
        if self.config.tensorboard and self.dist.is_main:
            self.writer = _open_tensorboard(self.config, self.start_step)
        t0 = self.loop_started = time.perf_counter()
        if self.progress is not None:
            self.progress.start(self.config.steps, self.start_step)
        try:
            with StopRequest() as stop:
                for name in self.trained:
                    s.models[name].train()
                while s.step < self.config.steps and not self.out_of_time:
                    batch, outcomes, stop_now = self.run_step(stop)
                    self.finish_step(batch, outcomes, stop_now, stop, t0)
                if self.last_saved != s.step:
                    self.write_checkpoint()
        finally:
            self._train_only(_optimizer_parameters(list(s.optimizers.values())))  # as built: all require gradients
            if self.progress is not None:
                self.progress.close()
            if self.writer is not None:
                self.writer.close()
        return time.perf_counter() - t0


def train(config: EngineConfig, task: TrainTask, progress: TrainProgress | None = None) -> TrainResult:
    """Train ``task`` for ``config.steps`` steps (resuming when a checkpoint exists)."""
    _check_config(config)
    dist_info, device = init_distributed(config.device)
    if config.deterministic:
        _use_deterministic_kernels()
    run = _Run(config, task, _build_state(config, task, dist_info, device), progress)
    run.prepare_run_dir()
    run.resume()
    run.wrap_models()
    seconds = run.loop()
    latest_path = latest_checkpoint(config.run_dir)
    return TrainResult(models=run.state.all_models(), step=run.state.step, start_step=run.start_step,
                       skipped_steps=run.skipped, seconds=seconds, world_size=dist_info.world_size,
                       rank=dist_info.rank, device=str(device), precision=run.precision, history=run.history,
                       checkpoint=str(latest_path) if latest_path else "")


def train_in_stage(ctx, config: EngineConfig, task: TrainTask) -> TrainResult:
    """A trainer stage's compute step: :func:`train` with the stage's progress display (when it is a
    ``TrainProgress``), timed as the step 'train'; the process group is torn down after a DDP run."""
    from avatarcli.train.distributed import shutdown_distributed

    progress = ctx.progress if hasattr(ctx.progress, "update") else None
    with ctx.timer.step("train"):
        result = train(config, task, progress)
    if result.world_size > 1:
        shutdown_distributed()
    return result
