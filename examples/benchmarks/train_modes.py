"""What the trainer benchmarks (bench_train_engine.py, bench_train_recon.py) share: the precision
modes, one fresh process per mode, a step clock and the timing summary of a run."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODES = {"fp32-eager": ("fp32", False), "bf16": ("bf16", False), "bf16-compile": ("bf16", True)}
"""mode -> (EngineConfig.precision, EngineConfig.compile)."""


class StepClock:
    """A TrainProgress that records the wall time of every step."""

    def __init__(self):
        self.times: list[float] = []

    def start(self, total: int, done: int) -> None:
        self.times = [time.perf_counter()]

    def update(self, step: int, loss: float, metrics: dict) -> None:
        self.times.append(time.perf_counter())

    def close(self) -> None:
        pass

    def step_seconds(self, warmup: int) -> list[float]:
        """Seconds of each step after the first ``warmup``."""
        return [b - a for a, b in zip(self.times[:-1], self.times[1:])][warmup:]

    def warmup_seconds(self, warmup: int) -> float:
        return sum(b - a for a, b in zip(self.times[:warmup], self.times[1:warmup + 1]))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def spread(values: list[float]) -> dict:
    """Median, p10, p90, min and max."""
    return {"median": statistics.median(values), "p10": quantile(values, 0.1), "p90": quantile(values, 0.9),
            "min": min(values), "max": max(values)}


def peak_memory(device: str) -> dict:
    """Peak memory of this process's run: CUDA allocations, or the process's peak RSS on the CPU."""
    import resource

    import torch

    if device.startswith("cuda"):
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "peak_memory_kind": "process peak RSS"}


def run_child(script: str, passthrough: list[str], *flags: str) -> tuple[dict | None, str]:
    """``python script *passthrough *flags`` in a fresh process (one compile/allocator state per mode):
    (the JSON of its last stdout line, '') or (None, its last stderr line)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, script, *passthrough, *flags], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
        return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""
