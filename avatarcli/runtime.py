"""CUDA execution helpers shared by the compute code: side streams, CUDA-graph capture and replay.

The home of every stream, graph and worker-thread helper (the per-thread streams and persistent
model threads of ``stages/preprocess.py`` belong here too). Torch is imported inside the functions,
so importing this module stays cheap (``avatar --help`` must not import torch).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from typing import Any, Callable


def stream_sync(device: str) -> Callable[[], None] | None:
    """A callable that waits for the calling thread's current CUDA stream on ``device`` ('cuda',
    'cuda:N'), or None for the CPU: the ``sync`` of a :class:`avatarcli.timing.StepTimer` (waiting for
    one stream, not the whole device, does not stall other threads' work)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return lambda: torch.cuda.current_stream().synchronize()


def on_side_stream(fn: Callable[[], Any]) -> Any:
    """``fn()`` run eagerly on a new side stream, ordered after and before the current stream's work:
    the warm-up before a CUDA graph capture (cuBLAS and the caching allocator must not initialise
    during capture)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def capture_graph(fn: Callable[[], Any], pool=None):
    """Records ``fn()`` into a new ``torch.cuda.CUDAGraph`` (nothing runs); only this thread's work
    is captured. ``pool``: the memory pool of another graph to share (``graph.pool()``)."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        fn()
    return graph


class CapturedCall:
    """Calls ``fn()`` (in-place updates of static tensors, fixed shapes, no host synchronisation)
    as a replayed CUDA graph. The first call runs eagerly on a side stream (the real first call, and
    the warm-up) and then records; later calls replay. If capture fails, it warns and stays eager."""

    def __init__(self, fn: Callable[[], None]):
        self.fn, self.graph, self.eager = fn, None, False

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.eager:
            self.fn()
            return
        on_side_stream(self.fn)
        try:
            self.graph = capture_graph(self.fn)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager calls
            warnings.warn(f"CUDA graph capture failed ({exc}); running eagerly", stacklevel=2)
            self.eager = True


_STREAMS = threading.local()
_WORKER_THREADS: dict = {}  # (device, count) -> ThreadPoolExecutor
_WORKER_LOCK = threading.Lock()


def worker_threads(device: str, count: int):
    """The process's ``count`` model threads for ``device`` (a ``ThreadPoolExecutor``), kept across
    runs: PyTorch keeps cuDNN's execution plans per thread, and a fresh thread re-plans every
    convolution shape (measured on an H100: the first PFLD batch in a new thread took 1.0-1.5 s
    instead of 4 ms)."""
    from concurrent.futures import ThreadPoolExecutor

    key = (device, count)
    with _WORKER_LOCK:
        if key not in _WORKER_THREADS:
            _WORKER_THREADS[key] = ThreadPoolExecutor(count, thread_name_prefix=f"avatar-{device}")
        return _WORKER_THREADS[key]


def thread_stream(device):
    """The calling thread's own CUDA stream on ``device`` (created on first use, kept for the thread)."""
    import torch

    if getattr(_STREAMS, "stream", None) is None:
        _STREAMS.stream = torch.cuda.Stream(device)
    return _STREAMS.stream


# ------------------------------------------------------------------------------------------------
# worker processes

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent(parent: int) -> None:
    """End this worker when the parent process dies (SIGKILL included): the kernel's parent-death
    signal on Linux, and a thread watching the parent pid everywhere (the parent may have died
    before the signal was asked for). Ctrl-C is left to the parent, which stops the workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher below still ends the worker
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
