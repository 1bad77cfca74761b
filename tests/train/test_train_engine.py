"""The shared training engine on toy tasks: checkpoints (atomic, weights_only), exact resume, RNG state,
the NaN/inf guard, EMA, SIGTERM, a 2-process DDP run on the CPU (gloo); a GAN with two optimizers and
lazy R1 resumed after SIGKILL; a hook that grows and prunes a parameter and its Adam state; gradient
accumulation; validation metrics and PNG grids."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from avatarcli.train.checkpoint import capture_rng, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from avatarcli.train.engine import EngineConfig, TrainingDiverged, TrainingInterrupted, train
from avatarcli.train.hooks import TrainHook
from avatarcli.train.task import EmaSpec, Phase, Validation

REPO = Path(__file__).resolve().parents[2]
W_TRUE = torch.tensor([[1.0, -2.0, 0.5, 3.0]])


def rows(seed: int, step: int, shard: int, shards: int, batch: int, width: int) -> np.ndarray:
    """Rows ``shard`` of ``shards`` of the batch of ``step``: row i is a function of (seed, step, i) only."""
    per_shard = batch // shards
    return np.stack([np.random.default_rng([seed, step, i]).standard_normal(width)
                     for i in range(shard * per_shard, (shard + 1) * per_shard)])


class ToyTask:
    """Linear regression; the batch of a step is a function of (seed, step, sample index) only.

    ``nan_steps``: steps whose loss is NaN; ``signal_at``: send SIGTERM to this process at that step;
    ``dropout``: use the global torch RNG inside the model (so restored RNG states matter).
    """

    def __init__(self, batch: int = 8, seed: int = 0, nan_steps=(), signal_at: int | None = None,
                 optimizer: str = "adam", dropout: float = 0.0, hooks=()):
        self.batch_size, self.seed, self.nan_steps = batch, seed, set(nan_steps)
        self.signal_at, self.optimizer, self.dropout, self._hooks = signal_at, optimizer, dropout, list(hooks)

    def fingerprint(self) -> dict:
        return {"batch": self.batch_size, "seed": self.seed, "optimizer": self.optimizer, "dropout": self.dropout}

    def build_models(self):
        return {"model": nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(self.dropout), nn.Linear(16, 1))}

    def build_optimizers(self, models):
        if self.optimizer == "sgd":
            return {"model": torch.optim.SGD(models["model"].parameters(), lr=0.05)}
        return {"model": torch.optim.Adam(models["model"].parameters(), lr=1e-2)}

    def build_schedulers(self, optimizers):
        return {"model": torch.optim.lr_scheduler.StepLR(optimizers["model"], step_size=5, gamma=0.9)}

    def phases(self):
        return [Phase("regression", ("model",), self.loss)]

    def hooks(self):
        return self._hooks

    def batch(self, step, shard, shards, device):
        if step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x = torch.tensor(rows(self.seed, step, shard, shards, self.batch_size, 4), dtype=torch.float32, device=device)
        return x, x @ W_TRUE.T.to(device), step in self.nan_steps

    def loss(self, models, batch, step):
        x, y, bad = batch
        loss = (models["model"](x) - y).pow(2).mean()
        if bad:
            loss = loss * float("nan")
        return loss, {"abs_error": (models["model"](x) - y).abs().mean().detach()}

    def images(self, models, batch):
        return {"toy": torch.rand(2, 3, 8, 8)}


def config(tmp_path, name="run", **kw) -> EngineConfig:
    base = dict(run_dir=str(tmp_path / name), steps=12, checkpoint_every=4, log_every=2, image_every=6, device="cpu")
    base.update(kw)
    return EngineConfig(**base)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def assert_same_tree(a, b, where: str = "") -> None:
    """Exact equality of nested dicts/lists of tensors and plain values (NaN equals NaN)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    else:
        assert a == b or (a != a and b != b), where


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in the numpy state
    state = capture_rng()
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    path = save_checkpoint(tmp_path, 7, {"format": 1, "rng": [state]}, keep=2)
    loaded = torch.load(path, weights_only=True)  # only tensors and primitives inside
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(loaded["rng"][0])
    got = (random.random(), np.random.standard_normal(3), torch.rand(3))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def test_checkpoints_are_atomic_pruned_and_complete(tmp_path):
    cfg = config(tmp_path, steps=13, keep_checkpoints=2, ema_decay=0.9)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    stale = tmp_path / "run" / "checkpoints" / ".step_00000004.pt.123.tmp"  # a save killed mid-write
    stale.write_bytes(b"partial")
    result = train(cfg, ToyTask())
    assert not stale.exists()
    steps = [s for s, _ in list_checkpoints(cfg.run_dir)]
    assert steps == [12, 13]  # every 4 steps and on exit, newest 2 kept
    state = load_checkpoint(list_checkpoints(cfg.run_dir)[-1][1])
    assert state["step"] == 13 and state["sampler"] == {"seed": 0, "step": 13, "world_size": 1}
    for key in ("models", "optimizers", "schedulers", "ema", "rng", "guard", "history"):
        assert state[key], key
    assert result.history["step"] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 13.0]
    assert "abs_error" in result.history
    # EMA on: a copy of the model holds the average, not the last raw weights
    assert_same(weights(result.models["model_ema"]), state["ema"]["model_ema"])
    assert not torch.equal(state["ema"]["model_ema"]["0.weight"], state["models"]["model"]["0.weight"])
    assert_same(weights(result.models["model"]), state["models"]["model"])
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = train(config(tmp_path, "a", steps=12, ema_decay=0.8), ToyTask(dropout=0.3))
    first = train(config(tmp_path, "b", steps=6, ema_decay=0.8), ToyTask(dropout=0.3))
    assert first.step == 6
    resumed = train(config(tmp_path, "b", steps=12, ema_decay=0.8), ToyTask(dropout=0.3))
    assert resumed.start_step == 6 and resumed.step == 12
    for name in ("model", "model_ema"):
        assert_same(weights(straight.models[name]), weights(resumed.models[name]))
    assert resumed.history["loss"] == straight.history["loss"]
    # resuming a finished run does nothing; a different task refuses the checkpoint
    again = train(config(tmp_path, "b", steps=12, ema_decay=0.8), ToyTask(dropout=0.3))
    assert again.start_step == 12
    with pytest.raises(Exception, match="other settings"):
        train(config(tmp_path, "b", steps=14), ToyTask(batch=4))
    # --no-resume starts over
    fresh = train(config(tmp_path, "b", steps=3, resume=False), ToyTask(batch=4))
    assert fresh.start_step == 0 and [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]


def test_a_single_model_checkpoint_of_format_1_resumes(tmp_path):
    """Runs begun before named models: 'model', 'optimizer', 'scheduler', 'ema' map onto the only ones."""
    straight = train(config(tmp_path, "a", steps=8, ema_decay=0.8, tensorboard=False), ToyTask())
    train(config(tmp_path, "b", steps=4, ema_decay=0.8, tensorboard=False), ToyTask())
    path = list_checkpoints(tmp_path / "b")[-1][1]
    state = load_checkpoint(path)
    old = {k: v for k, v in state.items() if k not in ("models", "optimizers", "schedulers", "ema")}
    old.update(format=1, model=state["models"]["model"], optimizer=state["optimizers"]["model"],
               scheduler=state["schedulers"]["model"], ema=state["ema"]["model_ema"])
    torch.save(old, path)
    resumed = train(config(tmp_path, "b", steps=8, ema_decay=0.8, tensorboard=False), ToyTask())
    assert resumed.start_step == 4
    assert_same(weights(straight.models["model_ema"]), weights(resumed.models["model_ema"]))


def test_nan_guard_skips_counts_and_stops(tmp_path):
    result = train(config(tmp_path, "skip", steps=10), ToyTask(nan_steps={3, 4, 7}))
    assert result.skipped_steps == 3 and result.step == 10
    assert all(torch.isfinite(v).all() for v in result.models["model"].state_dict().values())
    with pytest.raises(TrainingDiverged, match="NaN/inf for 3 steps in a row"):
        train(config(tmp_path, "stop", steps=20, max_bad_steps=3), ToyTask(nan_steps=set(range(5, 20))))
    state = load_checkpoint(list_checkpoints(tmp_path / "stop")[-1][1])
    assert state["step"] == 8 and state["guard"] == {"skipped": 3, "bad_in_a_row": 3}


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_identically(tmp_path):
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 6/12"):
        train(config(tmp_path, "sig"), ToyTask(signal_at=5))
    assert [s for s, _ in list_checkpoints(tmp_path / "sig")][-1] == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = train(config(tmp_path, "sig"), ToyTask())
    straight = train(config(tmp_path, "ref"), ToyTask())
    assert resumed.start_step == 6
    assert_same(weights(straight.models["model"]), weights(resumed.models["model"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from avatarcli.train.distributed import shutdown_distributed

    for accumulate in (1, 2):
        result = train(EngineConfig(run_dir=f"{run_dir}{accumulate}", steps=8, checkpoint_every=4, log_every=2,
                                    device="cpu", tensorboard=rank == 0, accumulate=accumulate),
                       ToyTask(batch=8, optimizer="sgd"))
        torch.save({"weights": weights(result.models["model"]), "loss": result.history["loss"],
                    "world": result.world_size}, f"{out}{accumulate}.{rank}")
    gan = train(EngineConfig(run_dir=f"{run_dir}gan", steps=12, log_every=4, device="cpu", tensorboard=False), ToyGan())
    torch.save({name: weights(model) for name, model in gan.models.items()}, f"{out}gan.{rank}")
    shutdown_distributed()


def test_two_process_ddp_on_cpu_matches_one_process_with_the_whole_batch(tmp_path):
    """Also with 2 micro-batches per process (gradients synchronised once, on the last one)."""
    import torch.multiprocessing as mp

    out, run_dir = str(tmp_path / "ddp"), str(tmp_path / "ddp_run")
    mp.spawn(_ddp_worker, args=(2, _free_port(), run_dir, out), nprocs=2, join=True)
    single = train(EngineConfig(run_dir=str(tmp_path / "single"), steps=8, checkpoint_every=4, log_every=2,
                                device="cpu", tensorboard=False), ToyTask(batch=8, optimizer="sgd"))
    for accumulate in (1, 2):
        rank0, rank1 = torch.load(f"{out}{accumulate}.0"), torch.load(f"{out}{accumulate}.1")
        assert rank0["world"] == 2
        assert_same(rank0["weights"], rank1["weights"])  # gradients were averaged: the ranks agree
        for key, value in weights(single.models["model"]).items():
            torch.testing.assert_close(rank0["weights"][key], value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rank0["loss"], single.history["loss"], rtol=1e-5)
        state = load_checkpoint(list_checkpoints(f"{run_dir}{accumulate}")[-1][1])
        assert len(state["rng"]) == 2 and state["sampler"]["world_size"] == 2
    # a GAN: the phases train one model each, the other forwards without synchronising gradients
    gan_single = train(EngineConfig(run_dir=str(tmp_path / "gan"), steps=12, log_every=4, device="cpu",
                                    tensorboard=False), ToyGan())
    gan0, gan1 = torch.load(f"{out}gan.0"), torch.load(f"{out}gan.1")
    assert gan0.keys() == {"generator", "discriminator", "generator_ema"}
    for name, model in gan_single.models.items():
        assert_same(gan0[name], gan1[name])
        for key, value in weights(model).items():
            torch.testing.assert_close(gan0[name][key], value, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# gradient accumulation


class GradientLog(TrainHook):
    """The gradients of every step, as the optimizer will see them (after accumulation)."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def after_backward(self, state, phase):
        self.grads.append({k: p.grad.clone() for k, p in state.models["model"].named_parameters()})


def test_four_micro_batches_of_8_equal_one_batch_of_32(tmp_path):
    logs = {1: GradientLog(), 4: GradientLog()}
    results = {k: train(config(tmp_path, f"acc{k}", steps=6, accumulate=k, log_every=1, tensorboard=False),
                        ToyTask(batch=32, optimizer="sgd", hooks=[logs[k]])) for k in logs}
    assert len(logs[4].grads) == 6  # one optimizer step (and one after_backward) per step, not per micro-batch
    for whole, accumulated in zip(logs[1].grads, logs[4].grads):
        for key in whole:
            torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-5, atol=1e-7)
    for key, value in weights(results[1].models["model"]).items():
        torch.testing.assert_close(weights(results[4].models["model"])[key], value, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(results[4].history["loss"], results[1].history["loss"], rtol=1e-5)
    with pytest.raises(Exception, match="other settings"):  # the split is part of the run's fingerprint
        train(config(tmp_path, "acc4", steps=8, accumulate=2), ToyTask(batch=32, optimizer="sgd"))


# ------------------------------------------------------------------------------------------------
# a toy GAN and a growing point cloud, killed (SIGKILL) mid-run and resumed


class KillAt(TrainHook):
    def __init__(self, step: int | None):
        self.step = step

    def after_step(self, state):
        if state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


REAL_MEAN = torch.tensor([2.0, -1.0])


class ToyGan:
    """G: z [B,4] -> x [B,2]; D: x -> logit. Real data N((2, -1), 0.3²). Non-saturating logistic loss;
    R1 on the real samples every 4 steps (lazy: scaled by 4); G's two layers in two param groups
    with their own learning rates; an EMA copy of G."""

    def __init__(self, batch: int = 32, kill_at: int | None = None, r1_every: int = 4, gamma: float = 0.5):
        self.batch_size, self.r1_every, self.gamma = batch, r1_every, gamma
        self.phase_log: list[tuple[int, str]] = []
        self._hooks = [KillAt(kill_at)]

    def fingerprint(self):
        return {"toy_gan": self.batch_size, "r1_every": self.r1_every, "gamma": self.gamma}

    def build_models(self):
        return {"generator": nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Linear(16, 2)),
                "discriminator": nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))}

    def build_optimizers(self, models):
        g = models["generator"]
        return {"generator": torch.optim.Adam([{"params": g[0].parameters(), "lr": 2e-3},
                                               {"params": g[2].parameters(), "lr": 1e-2}], betas=(0.5, 0.99)),
                "discriminator": torch.optim.Adam(models["discriminator"].parameters(), lr=4e-3, betas=(0.5, 0.99))}

    def build_schedulers(self, optimizers):
        return {"discriminator": torch.optim.lr_scheduler.StepLR(optimizers["discriminator"], 100, 0.5)}

    def ema_models(self):
        return {"generator_ema": EmaSpec("generator", 0.9)}

    def phases(self):
        return [Phase("d", ("discriminator",), self.d_loss), Phase("g", ("generator",), self.g_loss),
                Phase("r1", ("discriminator",), self.r1_loss, every=self.r1_every)]

    def hooks(self):
        return self._hooks

    def batch(self, step, shard, shards, device):
        data = torch.tensor(rows(7, step, shard, shards, self.batch_size, 10), dtype=torch.float32, device=device)
        return REAL_MEAN.to(device) + 0.3 * data[:, :2], data[:, 2:6], data[:, 6:10]

    def d_loss(self, models, batch, step):
        real, z_d, _ = batch
        self.phase_log.append((step, "d"))
        fake = models["generator"](z_d)
        assert not fake.requires_grad  # only D's parameters require gradients in D's phase
        real_logit, fake_logit = models["discriminator"](real), models["discriminator"](fake)
        loss = nn.functional.softplus(fake_logit).mean() + nn.functional.softplus(-real_logit).mean()
        return loss, {"d_real": real_logit.mean().detach(), "d_fake": fake_logit.mean().detach()}

    def g_loss(self, models, batch, step):
        _, _, z_g = batch
        self.phase_log.append((step, "g"))
        return nn.functional.softplus(-models["discriminator"](models["generator"](z_g))).mean(), {}

    def r1_loss(self, models, batch, step):
        real = batch[0].detach().requires_grad_(True)
        self.phase_log.append((step, "r1"))
        logits = models["discriminator"](real)
        (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
        penalty = grad.square().sum(1).mean()
        # + 0 * logits: the last bias gets a (zero) gradient too, as DDP needs (StyleGAN2-ADA does the same)
        return penalty * (self.gamma / 2) * self.r1_every + 0 * logits.mean(), {"r1_penalty": penalty.detach()}


class PointCloud(nn.Module):
    def __init__(self, points: int = 8):
        super().__init__()
        self.points = nn.Parameter(torch.randn(points, 2))
        self.scale = nn.Parameter(torch.ones(1))


class Densify(TrainHook):
    """Grows the cloud (3 new points) after the backward of step ``grow_at`` and prunes every third
    point after that of ``prune_at``, recording the Adam state before and after."""

    def __init__(self, grow_at: int, prune_at: int):
        self.grow_at, self.prune_at = grow_at, prune_at
        self.records: dict[str, dict] = {}

    def after_backward(self, state, phase):
        if state.step not in (self.grow_at, self.prune_at):
            return
        optimizer = state.optimizers["cloud"]
        old = state.models["cloud"].points
        before = {k: v.clone() for k, v in optimizer.state[old].items()}
        if state.step == self.grow_at:
            kind, keep = "grow", None
            new = state.append_rows("cloud", "points", old.detach()[:3] + 0.5)
        else:
            kind, keep = "prune", torch.arange(len(old))[torch.arange(len(old)) % 3 != 1]
            new = state.keep_rows("cloud", "points", keep)
        self.records[kind] = {"before": before, "after": {k: v.clone() for k, v in optimizer.state[new].items()},
                              "keep": keep, "old_in_state": old in optimizer.state, "new": new,
                              "in_group": any(p is new for p in optimizer.param_groups[0]["params"]),
                              "in_model": state.models["cloud"].points is new, "grad": new.grad.clone()}


class OneModelTask:
    """A task of one model ``name`` trained by Adam in one phase ('fit', ``self.loss``), no scheduler."""

    name, lr = "model", 0.05

    def build_optimizers(self, models):
        return {self.name: torch.optim.Adam(models[self.name].parameters(), lr=self.lr)}

    def build_schedulers(self, optimizers):
        return {}

    def phases(self):
        return [Phase("fit", (self.name,), self.loss)]


class CloudTask(OneModelTask):
    """Points pulled towards samples of N((1, 2), 1); a hook grows and prunes them; an EMA copy."""

    name = "cloud"

    def __init__(self, kill_at: int | None = None, grow_at: int = 5, prune_at: int = 11):
        self.densify = Densify(grow_at, prune_at)
        self._hooks = [self.densify, KillAt(kill_at)]

    def fingerprint(self):
        return {"cloud": [self.densify.grow_at, self.densify.prune_at]}

    def build_models(self):
        return {"cloud": PointCloud()}

    def hooks(self):
        return self._hooks

    def batch(self, step, shard, shards, device):
        return torch.tensor(rows(3, step, shard, shards, 16, 2), dtype=torch.float32, device=device) + torch.tensor([1.0, 2.0])

    def loss(self, models, batch, step):
        cloud = models["cloud"]
        return (cloud.points[None] * cloud.scale - batch[:, None]).square().sum(-1).mean(), {}


KILL_CASES = {
    "gan": (ToyGan, dict(steps=120, checkpoint_every=25, log_every=5)),
    "cloud": (CloudTask, dict(steps=16, checkpoint_every=3, log_every=1, ema_decay=0.5)),
}


def run_case(name: str, run_dir: str, kill_at: int | None = None):
    """Train a kill case; in a subprocess (``kill_at`` set) this process dies of SIGKILL mid-run."""
    task_type, settings = KILL_CASES[name]
    task = task_type(kill_at=kill_at)
    return task, train(EngineConfig(run_dir=run_dir, device="cpu", tensorboard=False, **settings), task)


@pytest.fixture
def one_thread():
    """CPU kernels are deterministic for a given thread count: the same one as the subprocess's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kill_and_resume(name: str, tmp_path: Path, kill_at: int):
    """(uninterrupted run, its final checkpoint, the killed-then-resumed run, its final checkpoint)."""
    killed_dir = tmp_path / f"{name}_killed"
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests' / 'train')!r}); import test_train_engine as t; "
            f"t.run_case({name!r}, {str(killed_dir)!r}, kill_at={kill_at})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    saved = [step for step, _ in list_checkpoints(killed_dir)]
    assert saved and saved[-1] < kill_at  # killed between checkpoints: the steps after the last one are redone
    straight = run_case(name, str(tmp_path / f"{name}_straight"))
    resumed = run_case(name, str(killed_dir))
    assert resumed[1].start_step == saved[-1]
    final = [load_checkpoint(list_checkpoints(d)[-1][1]) for d in (tmp_path / f"{name}_straight", killed_dir)]
    for key in ("step", "models", "optimizers", "schedulers", "ema", "guard", "history", "last_logged"):
        assert_same_tree(final[0][key], final[1][key], key)
    return straight, resumed


def test_toy_gan_with_lazy_r1_trains_and_resumes_bit_exactly_after_sigkill(tmp_path, one_thread):
    (task, result), _ = kill_and_resume("gan", tmp_path, kill_at=63)
    steps = KILL_CASES["gan"][1]["steps"]
    # D and G every step, R1 every 4th: alternating phases in that order
    assert task.phase_log[:7] == [(0, "d"), (0, "g"), (0, "r1"), (1, "d"), (1, "g"), (2, "d"), (2, "g")]
    assert [s for s, p in task.phase_log if p == "r1"] == list(range(0, steps, 4))
    history = result.history
    assert {"loss", "loss/d", "loss/g", "loss/r1", "d_real", "d_fake", "r1_penalty"} <= history.keys()
    assert all(len(v) == len(history["step"]) for v in history.values())
    # the generator moved its samples from around 0 to the real mean; D is near its equilibrium
    # (log 4 ≈ 1.39 where it cannot tell real from fake) and never collapsed to 0
    z = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = float(run_case_models_at_init("gan")["generator"](z).mean(0).sub(REAL_MEAN).norm())
        end = float(result.models["generator"](z).mean(0).sub(REAL_MEAN).norm())
        end_ema = float(result.models["generator_ema"](z).mean(0).sub(REAL_MEAN).norm())
    assert start > 1.5 and end < 0.35 * start and end_ema < 0.35 * start
    assert 0.9 < np.mean(history["loss/d"][-6:]) < 1.7 and min(history["loss/d"]) > 0.3
    assert max(history["r1_penalty"]) > 0
    groups = load_checkpoint(result.checkpoint)["optimizers"]["generator"]["param_groups"]
    assert [g["lr"] for g in groups] == [2e-3, 1e-2]
    assert not torch.equal(result.models["generator_ema"][2].weight, result.models["generator"][2].weight)


def run_case_models_at_init(name: str) -> dict[str, nn.Module]:
    """The models of a kill case as the engine initialises them (seed 0)."""
    from avatarcli.train.checkpoint import seed_everything

    seed_everything(0)
    return KILL_CASES[name][0]().build_models()


def test_a_hook_grows_and_prunes_a_parameter_with_its_adam_state_and_resumes(tmp_path, one_thread):
    (task, result), _ = kill_and_resume("cloud", tmp_path, kill_at=8)  # killed with 11 points, resumed from 8
    grow, prune = task.densify.records["grow"], task.densify.records["prune"]
    for record in (grow, prune):
        assert record["in_group"] and record["in_model"] and not record["old_in_state"]
    for key in ("exp_avg", "exp_avg_sq"):
        before, after = grow["before"][key], grow["after"][key]
        assert before.shape == (8, 2) and after.shape == (11, 2)
        assert torch.equal(after[:8], before) and not after[8:].any()  # kept rows kept, new rows zero
        assert torch.equal(prune["after"][key], prune["before"][key][prune["keep"]])
    assert torch.equal(grow["after"]["step"], grow["before"]["step"])
    assert not grow["grad"][8:].any() and grow["grad"][:8].any()
    assert result.models["cloud"].points.shape == (7, 2) and result.models["cloud_ema"].points.shape == (7, 2)


# ------------------------------------------------------------------------------------------------
# validation


class ImageTask(OneModelTask):
    """A 16² image parameter fitted to a fixed target; validation scores it with PSNR and SSIM."""

    name = "image"

    def __init__(self):
        ramp = torch.linspace(0, 1, 16)
        self.target = torch.stack([ramp[None].expand(16, 16), ramp[:, None].expand(16, 16), torch.full((16, 16), 0.25)])
        self.validated_at: list[int] = []

    def fingerprint(self):
        return {"image": 16}

    def build_models(self):
        return {"image": nn.ParameterDict({"pixels": nn.Parameter(torch.full((3, 16, 16), 0.5))})}

    def batch(self, step, shard, shards, device):
        return 0.01 * torch.randn(3, 16, 16)  # the global RNG: validation must not shift it

    def loss(self, models, batch, step):
        return (models["image"]["pixels"] - self.target - batch).square().mean(), {}

    def validate(self, models, step):
        from avatarcli.metrics.image import psnr, ssim

        torch.rand(100)  # drawing from the RNG here does not change the training
        self.validated_at.append(step)
        output = models["image"]["pixels"].clamp(0, 1)
        as_hwc = [x.permute(1, 2, 0)[None] for x in (output, self.target)]
        return Validation({"psnr": float(psnr(*as_hwc, data_range=1.0)[0]), "ssim": float(ssim(*as_hwc, data_range=1.0)[0])},
                          {"output": output[None], "target": self.target[None]})


def test_validation_every_n_steps_writes_metrics_and_a_png_grid(tmp_path):
    from PIL import Image

    task = ImageTask()
    result = train(config(tmp_path, "val", steps=12, validate_every=4, log_every=3), task)
    assert task.validated_at == [4, 8, 12]
    history = result.history
    assert history["validation/step"] == [4.0, 8.0, 12.0] and history["step"] == [3.0, 6.0, 9.0, 12.0]
    assert history["validation/psnr"][0] < history["validation/psnr"][-1]  # the fit improves
    assert 0 < history["validation/ssim"][-1] <= 1
    assert load_checkpoint(result.checkpoint)["history"]["validation/psnr"].tolist() == history["validation/psnr"]
    pngs = sorted(p.name for p in (tmp_path / "val" / "validation").iterdir())
    assert pngs == ["step_0000004.png", "step_0000008.png", "step_0000012.png"]
    grid = np.asarray(Image.open(tmp_path / "val" / "validation" / "step_0000012.png"))
    assert grid.shape == (32, 16, 3)  # the output above the target
    np.testing.assert_allclose(grid[16:], (task.target.permute(1, 2, 0).numpy() * 255), atol=0.51)
    unvalidated = train(config(tmp_path, "plain", steps=12, log_every=3), ImageTask())
    assert_same(weights(result.models["image"]), weights(unvalidated.models["image"]))
    with pytest.raises(Exception, match="no validation"):
        train(config(tmp_path, "x", validate_every=2), ToyTask())


def test_time_limit_ends_training_early_with_a_result_and_a_resumable_checkpoint(tmp_path):
    """time_limit: the loop stops after the step that crossed the limit, saves a checkpoint and returns
    normally (no interruption error); a rerun without the limit continues to ``steps``."""
    import time as _time

    class SlowTask(ToyTask):
        def batch(self, step, shard, shards, device):
            _time.sleep(0.05)
            return super().batch(step, shard, shards, device)

    limited = train(config(tmp_path, "t", steps=10_000, time_limit=0.3 / 60), SlowTask())
    assert 1 <= limited.step < 100
    assert [s for s, _ in list_checkpoints(tmp_path / "t")][-1] == limited.step
    resumed = train(config(tmp_path, "t", steps=limited.step + 3), SlowTask())
    assert resumed.start_step == limited.step and resumed.step == limited.step + 3
