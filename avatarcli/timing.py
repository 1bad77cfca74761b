"""Per-step wall-clock accounting for stages and benchmarks.

GPU work is synchronised around a step with the ``sync`` callable given; stages pass a sync of
the calling thread's CUDA stream, not the whole device, so timing one thread's step does not
stall the others. With ``cuda_events`` a GPU step is instead bracketed by CUDA events on the
current stream and read when the totals are asked for: the host never waits, so it can keep
queueing work (a stage whose speed depends on that overlap is timed without destroying it).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager


class StepTimer:
    """Accumulates seconds and item counts per named step; safe to share between threads."""

    def __init__(self, sync=None, cuda_events: bool = False):
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._sync = sync
        self._events: list | None = [] if cuda_events else None  # (name, start event, end event)

    @contextmanager
    def step(self, name: str, items: int = 0, sync: bool = True):
        """Time a block; ``sync=False`` for host-only work (nothing of the GPU to wait for)."""
        if sync and self._events is not None:
            import torch

            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                with self._lock:
                    self._events.append((name, start, end))
                    self.counts[name] += items
            return
        sync = sync and self._sync
        if sync:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                self._sync()
            with self._lock:
                self.seconds[name] += time.perf_counter() - start
                self.counts[name] += items

    def add(self, name: str, seconds: float, items: int = 0) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.counts[name] += items

    def as_dict(self) -> dict[str, dict[str, float]]:
        with self._lock:
            events, self._events = self._events, [] if self._events is not None else None
        for name, start, end in events or ():
            end.synchronize()
            self.seconds[name] += start.elapsed_time(end) / 1000.0
        return {k: {"seconds": self.seconds[k], "items": self.counts[k]} for k in self.seconds}
