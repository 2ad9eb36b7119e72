"""A CPU-backed stand-in for CUDA, for a torch built without it: the engine's CUDA branches (device placement,
Triton launches, streams, CUDA-graph capture and replay) run on a machine with no GPU.

    PYTHONPATH=tests python -m pytest -p fake_cuda tests/test_gpu.py

What it proves, and what it cannot: a tensor on 'cuda:0' is a wrapper holding a CPU tensor; every op unwraps, runs
torch's CPU kernel and rewraps. So numbers are the CPU's (this checks logic, not GPU numerics), but CUDA's rules
are enforced as a GPU enforces them:
- an fp32 convolution rounds its input and weight to TF32 (10 mantissa bits) while torch.backends.cudnn.allow_tf32
  is set (torch's default), an fp32 GEMM while torch.backends.cuda.matmul.allow_tf32 is (not by default), and a
  Triton tl.dot of fp32 operands at input_precision "tf32" (Triton's default), as the GPU's tensor cores take
  them; the sums stay the CPU's fp32 ones;
- an op mixing cuda tensors with CPU tensors of one element or more raises (as on a GPU; 0-dim CPU scalars,
  copies and indexing with CPU indices are allowed, as there);
- inside a torch.cuda.graph capture, a read back to the host (.item(), .tolist(), .cpu(), synchronize) and a
  host->device copy of a tensor raise, as CUDA refuses them in a capture;
- a capture records the ops and Triton launches it ran, and CUDAGraph.replay() re-runs them on the same buffers,
  so a step that reads an input it did not capture (a Python number baked in, a tensor allocated afresh) replays
  stale values, as a real graph would.
Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1) on the wrapped CPU tensors; a launch with a CPU
tensor fails, as it does on a GPU machine. Not emulated: a capture
here also runs what it records (CUDA only records it), timing, memory, streams' concurrency, and torch.compile
(which would generate CUDA code). tests/test_fake_cuda.py checks the stand-in fails where a GPU would.
"""
from __future__ import annotations

import os
import threading
import time

import torch
from torch.utils._pytree import tree_flatten, tree_map

if torch.backends.cuda.is_built():
    raise ImportError("tests/fake_cuda.py stands in for CUDA only where torch was built without it")

CUDA = torch.device("cuda", 0)
STATS = {"ops": 0, "d2h": 0, "h2d": 0, "item": 0, "captures": 0, "replays": 0, "triton_launches": 0, "tf32": 0}
# ops a GPU runs with CPU tensors among the cuda ones (indices, the source of a copy)
_CPU_ARGS_OK = {"aten::copy_", "aten::_to_copy", "aten::index", "aten::index_put_", "aten::index_put",
                "aten::_index_put_impl_", "aten::_copy_from", "aten::_copy_from_and_resize", "aten::lift_fresh",
                "aten::set_"}
_tls = threading.local()
# fp32 ops CUDA runs on TF32 tensor cores where torch lets it (inputs rounded to 10 mantissa bits, fp32 sums):
# convolutions through cuDNN (torch.backends.cudnn.allow_tf32: True by default) and cuBLAS GEMMs
# (torch.backends.cuda.matmul.allow_tf32: False by default). Op name -> the positions of the operands it rounds.
_TF32_CONV = {"aten::convolution": (0, 1), "aten::_convolution": (0, 1)}
_TF32_GEMM = {"aten::mm": (0, 1), "aten::bmm": (0, 1), "aten::addmm": (1, 2), "aten::baddbmm": (1, 2)}


class CaptureError(RuntimeError):
    """What CUDA raises (cudaErrorStreamCaptureUnsupported and kin) for a sync inside a graph capture."""


def _capturing() -> bool:
    return getattr(_tls, "tape", None) is not None and not getattr(_tls, "in_kernel", False)


def _no_sync(what: str):
    if _capturing():
        raise CaptureError(f"{what} while a CUDA graph is being captured (CUDA refuses it)")


def _unwrap(a):
    return a.inner if isinstance(a, FakeCudaTensor) else a


def _transfer(to_host: bool):
    """A copy between the host and the device: refused in a capture (a pageable memcpy), counted."""
    _no_sync("a device->host copy" if to_host else "a host->device copy")
    STATS["d2h" if to_host else "h2d"] += 1


def _cuda_device(d) -> bool:
    return d is not None and torch.device(d).type == "cuda"


class FakeCudaTensor(torch.Tensor):
    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.size(), strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                device=CUDA, requires_grad=inner.requires_grad)
        r.inner = inner
        return r

    def __repr__(self, *, tensor_contents=None):
        return f"FakeCudaTensor({self.inner!r})"

    def tolist(self):
        _transfer(to_host=True)
        return self.inner.tolist()

    def numpy(self, *a, **k):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _set_data(self, value):  # param.data = t swaps the TensorImpl's contents; the wrapper's CPU tensor must follow
    _DATA.__set__(self, value)
    self.inner = _unwrap(value)


_DATA = torch._C.TensorBase.data
FakeCudaTensor.data = property(lambda self: _DATA.__get__(self), _set_data)


def tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32 as the tensor cores take it: to the nearest of 10 mantissa bits, ties away from zero."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32).view(t.shape)


def _tf32_on(op: str) -> bool:
    """Whether torch lets CUDA run fp32 `op` ("conv": cuDNN, "matmul": cuBLAS) in TF32. Read through the
    fp32_precision settings with their inheritance (op, then the CUDA backend's "all", then torch's generic one):
    the legacy allow_tf32 getters raise once a caller has mixed them with the new API."""
    get = torch._C._get_fp32_precision_getter
    for backend, which in (("cuda", op), ("cuda", "all"), ("generic", "all")):
        value = get(backend, which)
        if value != "none":
            return value == "tf32"
    return False


def _tf32_operands(name: str, uargs: tuple) -> tuple:
    where = None
    if name in _TF32_CONV and _tf32_on("conv"):
        where = _TF32_CONV[name]
    elif name in _TF32_GEMM and _tf32_on("matmul"):
        where = _TF32_GEMM[name]
    if where is None or not any(isinstance(uargs[i], torch.Tensor) and uargs[i].dtype == torch.float32
                                for i in where):
        return uargs
    STATS["tf32"] += 1
    return tuple(tf32(a) if i in where and isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                 for i, a in enumerate(uargs))


def _run(func, args, kwargs):
    STATS["ops"] += 1
    name = func._schema.name
    if func.namespace != "aten":  # the engine's own ops (torch.library.custom_op): their body on the cuda tensors
        from torch._library.custom_ops import OPDEFS

        op = OPDEFS.get(name)
        if op is None:
            raise NotImplementedError(f"fake CUDA: {name} is not a torch.library.custom_op")
        fn = op._backend_fns.get("cuda") or op._init_fn
        return fn(*args, **kwargs)
    flat = tree_flatten((args, kwargs))[0]
    fakes = [a for a in flat if isinstance(a, FakeCudaTensor)]
    if fakes and name not in _CPU_ARGS_OK:
        cpu = [tuple(a.shape) for a in flat if type(a) is torch.Tensor and a.device.type == "cpu" and a.dim() > 0]
        if cpu:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! ({func} with CPU tensors of shapes {cpu})")
    if name == "aten::_local_scalar_dense":
        _no_sync("reading a cuda tensor's value on the host (.item(), int(), float(), bool())")
        STATS["item"] += 1
    to = kwargs.get("device")
    uargs, ukw = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
    if _cuda_device(ukw.get("device")):
        ukw["device"] = torch.device("cpu")
    if name == "aten::_to_copy":
        dst = torch.device(to) if to is not None else (CUDA if fakes else torch.device("cpu"))
        if fakes and dst.type == "cpu":
            _transfer(to_host=True)
            return func(*uargs, **ukw)
        if not fakes and dst.type == "cuda":
            _transfer(to_host=False)
        out = func(*uargs, **ukw)
        res = FakeCudaTensor(out) if dst.type == "cuda" else out
        _record(func, args, kwargs, res)
        return res
    if name == "aten::copy_":
        dst_fake, src_fake = isinstance(args[0], FakeCudaTensor), isinstance(args[1], FakeCudaTensor)
        if dst_fake != src_fake:
            _transfer(to_host=src_fake)
        func(*uargs, **ukw)
        _record(func, args, kwargs, args[0])
        return args[0]
    if fakes:
        uargs = _tf32_operands(name, uargs)
    out = func(*uargs, **ukw)
    if not fakes and not _cuda_device(to):
        return out
    mine = {id(u): a for u, a in zip(tree_flatten((uargs, ukw))[0], flat) if isinstance(a, FakeCudaTensor)}

    def wrap(o):
        if isinstance(o, torch.Tensor) and not isinstance(o, FakeCudaTensor):
            hit = mine.get(id(o))  # an in-place op or out=: the caller's own wrapper
            return hit if hit is not None else FakeCudaTensor(o)
        return o
    res = tree_map(wrap, out)
    _record(func, args, kwargs, res)
    return res


def _record(func, args, kwargs, res):
    if _capturing():
        _tls.tape.append((func, args, kwargs, res))


def _replay(tape):
    """Each recorded op again, on the tensors the capture saw, its results written into the outputs the capture
    made (a graph's kernels write the same addresses at every replay)."""
    for entry in tape:
        if callable(entry):  # a Triton launch
            entry()
            continue
        func, args, kwargs, res = entry
        uargs, ukw = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
        if _cuda_device(ukw.get("device")):
            ukw["device"] = torch.device("cpu")
        out = func(*_tf32_operands(func._schema.name, uargs), **ukw)
        for o, r in zip(tree_flatten(res)[0], tree_flatten(out)[0]):
            if isinstance(o, FakeCudaTensor) and isinstance(r, torch.Tensor) and r is not o.inner:
                if r.data_ptr() != o.inner.data_ptr() or r.stride() != o.inner.stride():
                    o.inner.copy_(r)


# Factories and copies that reach the CUDA key itself (torch.tensor(..., device=...) and a few composite kernels
# run with the Python key excluded): the same handling there.
_LIB = torch.library.Library("aten", "IMPL")
_LIB.impl("empty.memory_format", lambda size, dtype=None, layout=None, device=None, pin_memory=None,
          memory_format=None: FakeCudaTensor(torch.empty(size, dtype=dtype, memory_format=memory_format)), "CUDA")
_LIB.impl("empty_strided", lambda size, stride, dtype=None, layout=None, device=None, pin_memory=None:
          FakeCudaTensor(torch.empty_strided(size, stride, dtype=dtype)), "CUDA")
_LIB.impl("copy_", lambda self, src, non_blocking=False: _run(torch.ops.aten.copy_.default, (self, src), {}), "CUDA")
_LIB.impl("_copy_from", lambda self, dst, non_blocking=False: _run(torch.ops.aten.copy_.default, (dst, self), {}),
          "CUDA")
_FALLBACK = torch.library.Library("_", "IMPL")
_FALLBACK.fallback(lambda op, *args, **kwargs: _run(op, args, kwargs), "CUDA")


# ---- torch.cuda's Python API, as far as the engine, its tests and benchmarks use it ----------------------------
class _Props:
    name = "fake CUDA (CPU-backed)"
    total_memory = 80 << 30
    multi_processor_count = 132
    major, minor = 9, 0


class Stream:
    def __init__(self, device=None, priority=0):
        self.device = CUDA

    def wait_stream(self, other):
        pass

    def synchronize(self):
        _no_sync("Stream.synchronize()")


class _StreamContext:
    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        return False


class Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        _no_sync("Event.synchronize()")

    def elapsed_time(self, end) -> float:
        return (end.t - self.t) * 1e3

    def query(self):
        return True


class CUDAGraph:
    def __init__(self, *a, **k):
        self.tape = None

    def replay(self):
        if self.tape is None:
            raise RuntimeError("CUDAGraph.replay() before a capture")
        STATS["replays"] += 1
        _replay(self.tape)

    def reset(self):
        self.tape = None


class graph:
    def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.cuda_graph = cuda_graph

    def __enter__(self):
        if getattr(_tls, "tape", None) is not None:
            raise CaptureError("a graph capture inside a graph capture")
        _tls.tape = []
        return self

    def __exit__(self, *exc):
        self.cuda_graph.tape, _tls.tape = _tls.tape, None
        STATS["captures"] += 1
        return False


_STREAM = Stream()
_GENERATOR = torch.Generator


class _Generator:
    """torch.Generator(device='cuda') -> a CPU generator: sampling runs on the wrapped CPU tensors."""
    def __new__(cls, device="cpu"):
        return _GENERATOR(device="cpu" if _cuda_device(device) else device)


def _patch_torch_cuda():
    c = torch.cuda
    for name, fn in dict(
            _lazy_init=lambda: None, is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: 1,
            current_device=lambda: 0, set_device=lambda d: None, is_bf16_supported=lambda *a, **k: True,
            synchronize=lambda device=None: _no_sync("torch.cuda.synchronize()"),
            get_device_name=lambda device=None: _Props.name, get_device_capability=lambda device=None: (9, 0),
            get_device_properties=lambda device=None: _Props(), mem_get_info=lambda device=None: (60 << 30, 80 << 30),
            memory_allocated=lambda device=None: 0, max_memory_allocated=lambda device=None: 0,
            reset_peak_memory_stats=lambda device=None: None, empty_cache=lambda: None,
            manual_seed=lambda seed: None, manual_seed_all=lambda seed: None,
            current_stream=lambda device=None: _STREAM, default_stream=lambda device=None: _STREAM,
            stream=lambda s: _StreamContext(s), graph_pool_handle=lambda: object(),
            is_current_stream_capturing=_capturing).items():
        setattr(c, name, fn)
    c.Stream, c.Event, c.CUDAGraph, c.graph = Stream, Event, CUDAGraph, graph
    torch.Generator = _Generator


def _patch_triton():
    """Triton launches go to the interpreter with the wrapped CPU tensors; in a capture they are recorded."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def launch_run(self, *args, **kwargs):
        cpu = [i for i, a in enumerate(tree_flatten((args, kwargs))[0])
               if type(a) is torch.Tensor and a.device.type == "cpu"]
        if cpu:  # what Triton says on a GPU machine, where no interpreter runs
            raise ValueError(f"Pointer argument (at {cpu[0]}) cannot be accessed from Triton (cpu tensor?)")

        def launch():
            STATS["triton_launches"] += 1
            was, _tls.in_kernel = getattr(_tls, "in_kernel", False), True
            try:
                return run(self, *tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
            finally:
                _tls.in_kernel = was
        if _capturing():
            _tls.tape.append(launch)
        return launch()
    InterpretedFunction.run = launch_run
    _patch_triton_dot()


def _patch_triton_dot():
    """tl.dot's input_precision, which the interpreter ignores (it multiplies in numpy at the operands' precision):
    "tf32", Triton's default for fp32 operands, rounds them to TF32 on a GPU's tensor cores, and so here."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    dot = InterpreterBuilder.create_dot

    def as_tf32(h):
        bits = (h.data.view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
        return TensorHandle(bits.view(np.float32), h.dtype)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == b.data.dtype == np.float32:
            STATS["tf32"] += 1
            a, b = as_tf32(a), as_tf32(b)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
    InterpreterBuilder.create_dot = create_dot


def _install_guard():
    from torch.utils.cpp_extension import load

    here = os.path.dirname(os.path.abspath(__file__))
    load("pllava_fake_cuda_guard", [os.path.join(here, "fake_cuda_guard.cpp")], verbose=False).install()


os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels decorated from here on interpret
# module.to("cuda") then swaps each parameter for its wrapper (the default, param.data = t, keeps a plain tensor
# object whose TensorImpl says cuda but has no CPU tensor behind it)
torch.__future__.set_swap_module_params_on_conversion(True)
_install_guard()
_patch_torch_cuda()
_patch_triton()


# ---- as a pytest plugin (-p fake_cuda) ---------------------------------------------------------------------------
def pytest_report_header(config):
    return "fake CUDA: a CPU-backed stand-in (tests/fake_cuda.py); numbers are the CPU's, CUDA's rules are enforced"


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("fake CUDA: " + ", ".join(f"{k} {v}" for k, v in STATS.items()))
