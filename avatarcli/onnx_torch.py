"""Run ONNX models batched on any device: torch (converted graph) on CUDA, onnxruntime on CPU.

Exported detectors often end in ``Transpose -> Reshape(-1, C)`` heads whose constant shapes pin
the batch to 1. ``prepare_graph`` can cut a graph at named intermediate tensors and frees the
batch dimension, so the model returns raw convolution maps that batch; callers do the reshape.
Torch runs the converted graph natively on the GPU (onnxruntime builds often lack CUDA); on the
CPU onnxruntime is several times faster than torch for these depthwise-conv networks.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch


@functools.lru_cache(maxsize=16)
def _load_onnx(path: str):
    import onnx

    return onnx.load(path)


def head_inputs_before(model, op_types: tuple[str, ...] = ("Transpose",)) -> list[str]:
    """For each graph output, the input tensor of the first ``op_types`` node found walking back."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for output in model.graph.output:
        name = output.name
        for _ in range(8):
            node = producers.get(name)
            if node is None:
                raise ValueError(f"no {op_types} node above output {output.name}")
            if node.op_type in op_types:
                names.append(node.input[0])
                break
            name = node.input[0]
        else:
            raise ValueError(f"no {op_types} node above output {output.name}")
    return names


def prepare_graph(path: str | Path, outputs: list[str] | None = None):
    """The ONNX model at ``path``, cut at ``outputs`` if given, with a symbolic batch dimension."""
    import onnx

    model = _load_onnx(str(path))
    initializers = {w.name for w in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if outputs is not None:
        model = onnx.utils.Extractor(model).extract_model(inputs, outputs)
    else:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    _batch_reshapes(model)
    flush_denormal_weights(model)
    for graph_input in model.graph.input:
        if graph_input.name in inputs:
            graph_input.type.tensor_type.shape.dim[0].dim_param = "batch"
    for graph_output in model.graph.output:
        dims = graph_output.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_value == 1:
            dims[0].dim_param = "batch"
    return model


def flush_denormal_weights(model) -> int:
    """Set subnormal float32 weights (|w| < 1.2e-38) to zero, in place; returns how many.

    Some exported nets are full of them (the PFLD-68 stand-in: 60% of its weights), and x86 CPUs
    multiply subnormals through a microcode assist: onnxruntime ran that net at 18-28 ms per frame
    on 2 cores, 2.4 ms with them flushed. Their products are below float32's normal range, so the
    outputs do not change (bit-identical in our tests).
    """
    from onnx import numpy_helper

    tiny = np.finfo(np.float32).tiny
    flushed = 0
    for init in model.graph.initializer:
        if init.data_type != 1:  # FLOAT
            continue
        weights = numpy_helper.to_array(init)
        subnormal = (weights != 0) & (np.abs(weights) < tiny)
        count = int(subnormal.sum())
        if count:
            weights = weights.copy()
            weights[subnormal] = 0
            init.CopyFrom(numpy_helper.from_array(weights, init.name))
            flushed += count
    return flushed


def _batch_reshapes(model) -> None:
    """Make ``Reshape(x, [1, ...])`` keep x's batch: exporters often bake batch 1 into the shape.

    Only rewrites a constant shape whose leading 1 copies a leading dimension of 1 (by shape
    inference at the exported batch), to 0, ONNX's "copy this dimension from the input".
    """
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    leading = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input):
        dims = info.type.tensor_type.shape.dim
        if len(dims):
            leading[info.name] = dims[0].dim_value if dims[0].HasField("dim_value") else None
    constants = {node.output[0]: node for node in model.graph.node if node.op_type == "Constant"}
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Reshape" or leading.get(node.input[0]) != 1:
            continue
        holder = constants.get(node.input[1])
        tensor = holder.attribute[0].t if holder is not None else initializers.get(node.input[1])
        if tensor is None:
            continue
        shape = numpy_helper.to_array(tensor).copy()
        if shape.ndim == 1 and len(shape) >= 2 and shape[0] == 1:
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))


def padded_batch(n: int) -> int:
    """Batch size a network is traced for: the next power of two (few traces, little padding)."""
    return 1 << max(0, (n - 1).bit_length())


class OnnxNet:
    """A batched ONNX network on one device: ``net(x: Tensor[B,...]) -> list[Tensor]`` on that device.

    On CUDA the converted module is traced and frozen once per padded input shape (batches are
    zero-padded to a power of two). The converted graphs have hundreds of small ops; run from
    Python, their dispatch held the GIL and bounded throughput when several threads share the
    GPU, while a frozen TorchScript module runs them in C++ (and folds batch norms into convs).
    """

    def __init__(self, path: str | Path, device: torch.device, outputs: list[str] | None = None,
                 half: bool = False, threads: int | None = None, trace: bool = True):
        self.device = torch.device(device)
        self.trace = trace and self.device.type == "cuda"
        self.path, self.outputs = Path(path), list(outputs or [])
        self._traced: dict[tuple, torch.jit.ScriptModule] = {}
        self._trace_lock = threading.Lock()
        graph = prepare_graph(path, outputs)
        self.half = half and self.device.type == "cuda"
        if self.device.type == "cpu":
            import onnxruntime as ort

            ort.set_default_logger_severity(3)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            # Measured on 2 cores: the extended fusions make these depthwise nets ~25% slower.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            self.session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self.module = None
        else:
            from onnx2torch import convert

            self.session = None
            module = convert(graph).eval().to(self.device)
            for param in module.parameters():
                param.requires_grad_(False)
            module = module.half() if self.half else module
            # NHWC lets cuDNN use its tensor-core kernels without layout transposes (see examples/benchmarks/bench_face_models.py).
            self.module = module.to(memory_format=torch.channels_last)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.session is not None:
            outs = self.session.run(None, {self.input_name: np.ascontiguousarray(x.float().numpy())})
            return [torch.from_numpy(o) for o in outs]
        x = x.to(self.dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        module, n = self.module, x.shape[0]
        if self.trace:
            padded = padded_batch(n)
            if padded > n:
                x = torch.cat([x, x.new_zeros((padded - n, *x.shape[1:]))])
                if x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
            module = self._traced_for(x)
        outs = module(x)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        return [out[:n] for out in outs]

    def _traced_for(self, x: torch.Tensor):
        key = tuple(x.shape)
        with self._trace_lock:
            if key not in self._traced:
                cached = self._trace_file(x)
                traced = _load_traced(cached, self.device)
                if traced is None:
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            traced = torch.jit.freeze(torch.jit.trace(self.module, x, check_trace=False))
                        _save_traced(traced, cached)
                    except Exception:  # an op TorchScript cannot trace: stay eager for this shape
                        traced = self.module
                self._traced[key] = traced
            return self._traced[key]

    def _trace_file(self, x: torch.Tensor) -> Path:
        """Where the frozen trace for input ``x`` is cached: tracing and freezing take ~0.4 s per
        network and shape, paid again by every command otherwise."""
        import hashlib

        from avatarcli.registry import file_sha256

        key = json.dumps({"onnx": file_sha256(self.path), "outputs": self.outputs, "shape": list(x.shape),
                          "dtype": str(x.dtype), "torch": torch.__version__,
                          "device": torch.cuda.get_device_name(self.device), "format": TRACE_FORMAT})
        name = f"{self.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
        return trace_cache_dir() / name


TRACE_FORMAT = 2
"""Bump when the conversion or tracing changes, so old cached traces are not used."""


def trace_cache_dir() -> Path:
    """Frozen TorchScript traces of the ONNX networks (``AVATAR_TRACE_CACHE``, default under the user cache)."""
    env = os.environ.get("AVATAR_TRACE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "avatar" / "traces"


def _load_traced(path: Path, device: torch.device):
    if not path.exists():
        return None
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception:  # a damaged or incompatible file: trace again (and overwrite it)
        return None


def _save_traced(module, path: Path) -> None:
    """Atomically (temp file + rename), so a concurrent reader never sees half a file; a read-only
    or full cache only costs the next command a new trace."""
    from avatarcli.stage.files import atomic_path

    try:
        with atomic_path(path) as tmp:
            torch.jit.save(module, str(tmp))
    except OSError:
        pass
