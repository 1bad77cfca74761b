"""Execution helpers shared by the compute code: CPU thread counts and passive waiting; CUDA side
streams, CUDA-graph capture and replay.

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


# ------------------------------------------------------------------------------------------------
# CPU threads

THREADS_ENV = "AVATAR_THREADS"
PASSIVE_WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
"""OpenMP workers that sleep at a barrier instead of spinning. Read once, when torch loads OpenMP,
so they must be in the environment before ``import torch``. Measured with torch 2.14.1 (libgomp)
on 2 cores kept busy by other processes (load ~8), the default fit of 100 frames: 2 threads
with OMP_WAIT_POLICY=ACTIVE 467 s wall (231 s CPU: the spinning workers and the other processes
took the cores in turns), PASSIVE 25 s; 1 thread 23-27 s either way. ``KMP_BLOCKTIME`` is the same
for Intel's OpenMP."""


def cpu_threads(cores: int, load: float, env: str | None = None) -> int:
    """Intra-op threads for a CPU run: ``env`` (the value of ``AVATAR_THREADS``, a positive integer)
    when set, else the ``cores`` this process may run on less those kept busy by other processes
    (``load``, the 1-minute load average, taken before this process's work starts), rounded to the
    nearest whole core, at least 1. More threads than free cores only queue behind the others."""
    from avatarcli.errors import AvatarError

    if env is not None and env.strip():
        try:
            threads = int(env)
        except ValueError:
            threads = 0
        if threads < 1:
            raise AvatarError(f"{THREADS_ENV} must be a positive integer, not {env!r}")
        return threads
    return max(1, min(cores, int(cores - max(0.0, load) + 0.5)))


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_cpu_environment() -> bool:
    """Passive OpenMP waiting (:data:`PASSIVE_WAIT_ENV`, values the user set are kept) for this
    process and its children. Returns False when torch was already imported: then it has no effect
    on this process's workers. Call it before the first ``import torch``."""
    for name, value in PASSIVE_WAIT_ENV.items():
        os.environ.setdefault(name, value)
    return "torch" not in sys.modules


_CONFIGURED: list[int] = []


def configure_cpu_threads() -> int:
    """Passive waiting (when torch is not loaded yet) and torch's intra-op threads from the free
    cores (:func:`cpu_threads`), one inter-op thread (torch only runs inter-op work for TorchScript
    forks); once per process. Returns the intra-op thread count."""
    if _CONFIGURED:
        return _CONFIGURED[0]
    prepare_cpu_environment()
    threads = cpu_threads(available_cores(), os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
                          os.environ.get(THREADS_ENV))
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # inter-op work already started in this process; its pool keeps its size
    _CONFIGURED.append(threads)
    return threads


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
