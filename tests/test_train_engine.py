"""The shared training engine on a toy regression task: checkpoints (atomic, weights_only), exact
resume, RNG state, the NaN/inf guard, EMA, SIGTERM, and a 2-process DDP run on the CPU (gloo)."""

from __future__ import annotations

import os
import random
import signal
import socket

import numpy as np
import pytest
import torch
from torch import nn

from avatarcli.train.engine import (
    EngineConfig, TrainingDiverged, TrainingInterrupted, capture_rng, list_checkpoints, load_checkpoint,
    restore_rng, save_checkpoint, train,
)

W_TRUE = torch.tensor([[1.0, -2.0, 0.5, 3.0]])


class ToyTask:
    """Linear regression; the batch of a step is a function of (seed, step, sample index) only.

    ``nan_steps``: steps whose loss is NaN; ``signal_at``: send SIGTERM to this process at that step;
    ``dropout``: use the global torch RNG inside the model (so restored RNG states matter).
    """

    def __init__(self, batch: int = 8, seed: int = 0, nan_steps=(), signal_at: int | None = None,
                 optimizer: str = "adam", dropout: float = 0.0):
        self.batch_size, self.seed, self.nan_steps = batch, seed, set(nan_steps)
        self.signal_at, self.optimizer, self.dropout = signal_at, optimizer, dropout

    def fingerprint(self) -> dict:
        return {"batch": self.batch_size, "seed": self.seed, "optimizer": self.optimizer, "dropout": self.dropout}

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(self.dropout), nn.Linear(16, 1))

    def build_optimizer(self, model):
        if self.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.05)
        return torch.optim.Adam(model.parameters(), lr=1e-2)

    def build_scheduler(self, optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.9)

    def batch(self, step, rank, world_size, device):
        if step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        per_rank = self.batch_size // world_size
        rows = [np.random.default_rng([self.seed, step, i]).standard_normal(4) for i in
                range(rank * per_rank, (rank + 1) * per_rank)]
        x = torch.tensor(np.stack(rows), dtype=torch.float32, device=device)
        return x, x @ W_TRUE.T.to(device), step in self.nan_steps

    def loss(self, model, batch):
        x, y, bad = batch
        loss = (model(x) - y).pow(2).mean()
        if bad:
            loss = loss * float("nan")
        return loss, {"abs_error": (model(x) - y).abs().mean().detach()}

    def images(self, model, batch):
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
    for key in ("model", "optimizer", "scheduler", "ema", "rng", "guard", "history"):
        assert state[key] is not None, key
    assert result.history["step"] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 13.0]
    assert "abs_error" in result.history
    # EMA on: the result is the average, not the last raw weights
    assert_same(weights(result.model), {k: v for k, v in state["ema"].items()})
    assert not torch.equal(state["ema"]["0.weight"], state["model"]["0.weight"])
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = train(config(tmp_path, "a", steps=12, ema_decay=0.8), ToyTask(dropout=0.3))
    first = train(config(tmp_path, "b", steps=6, ema_decay=0.8), ToyTask(dropout=0.3))
    assert first.step == 6
    resumed = train(config(tmp_path, "b", steps=12, ema_decay=0.8), ToyTask(dropout=0.3))
    assert resumed.start_step == 6 and resumed.step == 12
    assert_same(weights(straight.model), weights(resumed.model))
    assert resumed.history["loss"] == straight.history["loss"]
    # resuming a finished run does nothing; a different task refuses the checkpoint
    again = train(config(tmp_path, "b", steps=12, ema_decay=0.8), ToyTask(dropout=0.3))
    assert again.start_step == 12
    with pytest.raises(Exception, match="other settings"):
        train(config(tmp_path, "b", steps=14), ToyTask(batch=4))
    # --no-resume starts over
    fresh = train(config(tmp_path, "b", steps=3, resume=False), ToyTask(batch=4))
    assert fresh.start_step == 0 and [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]


def test_nan_guard_skips_counts_and_stops(tmp_path):
    result = train(config(tmp_path, "skip", steps=10), ToyTask(nan_steps={3, 4, 7}))
    assert result.skipped_steps == 3 and result.step == 10
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values())
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
    assert_same(weights(straight.model), weights(resumed.model))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from avatarcli.train.engine import shutdown_distributed

    result = train(EngineConfig(run_dir=run_dir, steps=8, checkpoint_every=4, log_every=2, device="cpu",
                                tensorboard=rank == 0), ToyTask(batch=8, optimizer="sgd"))
    torch.save({"weights": weights(result.model), "loss": result.history["loss"], "world": result.world_size},
               f"{out}.{rank}")
    shutdown_distributed()


def test_two_process_ddp_on_cpu_matches_one_process_with_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp_run"), out), nprocs=2, join=True)
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert rank0["world"] == 2
    assert_same(rank0["weights"], rank1["weights"])  # gradients were averaged: the ranks agree
    single = train(EngineConfig(run_dir=str(tmp_path / "single"), steps=8, checkpoint_every=4, log_every=2,
                                device="cpu", tensorboard=False), ToyTask(batch=8, optimizer="sgd"))
    for key, value in weights(single.model).items():
        torch.testing.assert_close(rank0["weights"][key], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rank0["loss"], single.history["loss"], rtol=1e-5)
    state = load_checkpoint(list_checkpoints(tmp_path / "ddp_run")[-1][1])
    assert len(state["rng"]) == 2 and state["sampler"]["world_size"] == 2
