"""The layer functions model code calls. They pick the Triton kernels (pllava.kernels) or the plain-torch path;
model code never imports triton itself.

`PLLAVA_KERNELS=torch|triton` forces a path; unset, Triton runs on CUDA tensors when it imports, torch elsewhere.
A forced path that cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from pllava import kernels as K

log = logging.getLogger("pllava")
_VALID = ("torch", "triton")


def kernel_path(device: torch.device | str) -> str:
    """Which path runs for tensors on `device`: 'triton' or 'torch'."""
    forced = os.environ.get("PLLAVA_KERNELS", "").strip().lower()
    if forced and forced not in _VALID:
        raise ValueError(f"PLLAVA_KERNELS={forced!r}: expected one of {_VALID}")
    dev = torch.device(device)
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not K.triton_available():
            raise RuntimeError("PLLAVA_KERNELS=triton but triton cannot run here "
                               "(not installed, or no CUDA device and TRITON_INTERPRET is not 1)")
        return "triton"
    return "triton" if dev.type == "cuda" and K.triton_available() else "torch"


def log_kernel_path(device) -> str:
    path = kernel_path(device)
    log.info("pllava kernels: %s path for the pool-projector and LoRA linears on %s", path, torch.device(device))
    return path


def lora_linear(x, weight, bias, lora_a, lora_b, scale, path: str = "torch"):
    if path == "triton":
        return K.lora_linear(x, weight, bias, lora_a, lora_b, scale)
    return K.lora_linear_reference(x, weight, bias, lora_a, lora_b, scale)


_logged: set = set()


@functools.cache
def _libgomp():
    """The libgomp torch loaded (dlopen of the same soname resolves to it), or None where torch runs another
    OpenMP runtime (then media workers keep torch's thread count, and the log says so)."""
    import ctypes

    try:
        return ctypes.CDLL("libgomp.so.1")
    except OSError:
        log.info("pllava: no libgomp in this process; media workers keep torch's thread count")
        return None


def helper_thread_init():
    """Initializer of the threads that decode and preprocess clips beside the model (media workers): their OpenMP
    regions run on one thread. libgomp spins only briefly at its barriers once it manages more threads than there
    are CPUs, and a helper's own team of torch threads tips it over: on 2 cores a decode step (small preset, bf16
    + int8) took 15 ms instead of 9.4 while an idle media worker that had once preprocessed a clip was alive, as
    slow as one thread (14 ms). torch's per-thread setup runs first (it would set the count back), then
    omp_set_num_threads(1) for this thread alone (torch.set_num_threads would also set MKL's, process-wide)."""
    torch.get_num_threads()
    if _libgomp() is not None:
        _libgomp().omp_set_num_threads(1)


def in_fresh_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a thread that ends when it returns (its result, or its exception re-raised here).
    For a CPU engine's one-off parallel work off the calling thread (Engine.from_pretrained's load, a Scheduler's
    slot cache: both use it on the CPU): a live thread that has run a parallel op keeps an OpenMP team, and with
    two such threads libgomp's barriers stop spinning (helper_thread_init), so the thread that decodes should be
    the only one; an ended thread gives its team back (a decode step in a second thread after the loading thread
    ended: 10.0 ms, 15.5 while it lived). A ModelThread of one job: a caller that stops waiting (Ctrl-C) gets its
    exception at once and the work stops at its next abandoned() check."""
    import threading

    done = threading.Event()

    def job():
        try:
            return fn(*args, **kwargs)
        finally:
            done.set()

    worker = ModelThread("pllava-oneoff")
    try:
        return worker.call(job)
    finally:
        worker.close()
        if done.is_set():
            worker.join()  # ended, and its OpenMP team given back, before the caller goes on


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is a failed allocation: CUDA's torch.OutOfMemoryError, or the CPU allocator's refusal of a
    tensor the host cannot hold (a plain RuntimeError from torch, named by its message)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err))


class Abandoned(RuntimeError):
    """Raised on a worker thread (ModelThread, in_fresh_thread's included) in work whose caller has stopped waiting
    for it."""


class ModelThread:
    """The one thread on which a CPU engine runs its model work (generate, stream, generate_many, generate_iter),
    whichever threads call them: each live thread that has run parallel torch ops keeps an OpenMP team, and a
    second team slows every decode step (helper_thread_init), so an application that calls the engine from a
    pool of threads (a web framework's workers) would otherwise decode beside one team a worker (2 pool threads
    in turn, small preset bf16 + int8: 229 voluntary context switches a decode step against 0.6 on one thread;
    benchmarks/bench_threads.py). Calls run one at a time, in order; a call from the model thread itself runs
    inline. A caller that stops waiting (Ctrl-C) gets its exception at once and the work sees abandoned() at its
    next check (a token, a scheduler step, a tensor of a load). Before each job the thread takes torch's current
    thread count (torch.set_num_threads after the thread started would not reach it otherwise)."""

    def __init__(self, name: str = "pllava-model"):
        import queue
        import threading

        self._name, self._jobs, self._lock = name, queue.SimpleQueue(), threading.Lock()
        self._thread = None

    def _ensure(self):
        import threading

        with self._lock:
            if self._thread is None:
                # not a daemon: at exit the interpreter waits for a job in flight (abandoned after Ctrl-C, it stops
                # at its next check) instead of finalizing under running torch code (the C++ runtime aborts, -6)
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=False)
                self._thread.pllava_abandon = None
                self._thread.start()

    def _loop(self):
        import queue
        import threading

        me = self._thread
        while True:
            try:
                job = self._jobs.get(timeout=0.25)
            except queue.Empty:
                if not threading.main_thread().is_alive():  # the interpreter is exiting
                    return
                continue
            if job is None:
                return
            fn, args, kwargs, fut, abandon = job
            del job
            n = torch.get_num_threads()  # torch's count now (also its per-thread setup, the first time)
            if _libgomp() is not None:
                _libgomp().omp_set_num_threads(n)
            me.pllava_abandon = abandon
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args, **kwargs))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller, re-raised there
                        fut.set_exception(e)
            finally:
                me.pllava_abandon = None
                del fn, args, kwargs, fut, abandon  # nothing of a job outlives it on this thread

    def on_thread(self) -> bool:
        import threading

        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, fn, *args, **kwargs):
        """-> (Future, abandon Event) of fn(*args, **kwargs) queued on the model thread."""
        import threading
        from concurrent.futures import Future

        self._ensure()
        fut, abandon = Future(), threading.Event()
        self._jobs.put((fn, args, kwargs, fut, abandon))
        return fut, abandon

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the model thread: its value, or its exception re-raised here."""
        from concurrent.futures import wait

        if self.on_thread():
            return fn(*args, **kwargs)
        fut, abandon = self.submit(fn, *args, **kwargs)
        try:
            wait([fut])
        except BaseException:  # the caller stopped waiting (Ctrl-C): the job stops at its next check
            abandon.set()
            raise
        return fut.result()

    def iterate(self, gen_fn, *args, **kwargs):
        """Yield what gen_fn(*args, **kwargs) yields, the generator run on the model thread (it runs ahead of
        the consumer). Closing this early (or Ctrl-C while waiting) abandons it: it is closed at its next item;
        a close waits for that, so the generator's own clean-up has run when close() returns."""
        import queue

        if self.on_thread():
            yield from gen_fn(*args, **kwargs)
            return
        out: queue.Queue = queue.Queue()

        def pump():
            gen = gen_fn(*args, **kwargs)
            try:
                for item in gen:
                    out.put((0, item))
                    if abandoned():
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                out.put((1, e))
            finally:
                gen.close()
                out.put((2, None))

        fut, abandon = self.submit(pump)
        interrupted = False
        try:
            while True:
                kind, item = out.get()
                if kind == 2:
                    return
                if kind == 1:
                    raise item
                yield item
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if not fut.done():
                abandon.set()
                if not interrupted:
                    fut.exception()  # waits for the job: the generator's clean-up has run once it is done

    def close(self):
        """Let the thread end once its queued jobs have run (the engine is gone)."""
        if self._thread is not None:
            self._jobs.put(None)

    def join(self):
        """Wait for the thread to end (after close())."""
        if self._thread is not None:
            self._thread.join()


def abandoned() -> bool:
    """Whether the caller of the ModelThread job running this code (a CPU engine's generate / generate_many, or
    its load through in_fresh_thread) has stopped waiting for it (Ctrl-C): long work checks between steps and
    stops, rather than finish a 15 GB load nobody takes while the caller, say, starts it again."""
    import threading

    ev = getattr(threading.current_thread(), "pllava_abandon", None)
    return ev is not None and ev.is_set()


def log_once(msg: str, level: int = logging.INFO):
    """Log a path choice once a process (the paths that run per call: preprocessing, int8 decode rows, kernels)."""
    if msg not in _logged:
        _logged.add(msg)
        log.log(level, msg)


def pool_projector(x, w1, b1, w2, b2, frame_shape, pooling_shape, act="gelu", path: str = "torch"):
    if path == "triton":
        if act == "gelu":
            return K.pool_projector(x, w1, b1, w2, b2, frame_shape, pooling_shape)
        # the fused kernel implements PLLaVA's erf GELU only
        log_once(f"pllava kernels: projector activation {act!r} has no Triton kernel; the torch path runs it",
                 logging.WARNING)
    return K.pool_projector_torch(x, w1, b1, w2, b2, frame_shape, pooling_shape, act)


# ---------------------------------------------------------------------------------------------- attention
ATTN_BACKENDS = ("sdpa", "flash_attn", "xformers")


def _attn_module(name: str):
    """The optional library behind attention backend `name` ('flash_attn' -> flash_attn, 'xformers' ->
    xformers.ops), imported here only; a missing one is an error naming the extra that installs it."""
    import importlib

    mod = {"flash_attn": "flash_attn", "xformers": "xformers.ops"}[name]
    try:
        return importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"attn_backend {name!r}: {mod} is not installed (pip install 'pllava-engine[gpu]')") from e


def check_attn_backend(name: str, device, dtype) -> str:
    """Validate an attention backend choice: 'sdpa' (torch; the default), or 'flash_attn' / 'xformers' when
    installed, on CUDA in fp16/bf16. A choice that cannot run is an error, never a silent fallback."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend {name!r}: expected one of {ATTN_BACKENDS}")
    if name == "sdpa":
        return name
    _attn_module(name)
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attn_backend {name!r} runs on CUDA in float16/bfloat16, not {torch.device(device)} "
                         f"{dtype}")
    log.info("pllava attention: %s for prefill; decode steps addressed on the device (batched, CUDA graphs) %s",
             name, "through flash_attn_with_kvcache (per-row cache_seqlens)" if name == "flash_attn" else
             "through the Triton slot kernel")
    return name


PREFILL_ATTN_DIMS = (16, 32, 64, 128, 256)  # the head sizes csrc/prefill_attention.cpp is built for


def native_prefill_attention():
    """pllava._C when it runs the bf16 prefill attention here (csrc/prefill_attention.cpp: built with it, a CPU
    with AVX512-BF16, PLLAVA_CPU_ISA not capping it below avx512), else None."""
    C = native_extension("prefill_attention")
    return C if C is not None and C.prefill_attention_available() else None


def cpu_attention_bf16(q, k, v, causal: bool):
    """Attention of bf16 q (B, H, L, hd), k / v (B, KV, Lk, hd) on the CPU by pllava._C -> (B, H, L, hd) bf16 (a
    view of a (B, L, H, hd) tensor, so the caller's transpose back is free), or None where it does not apply: not
    bf16 CPU tensors with hd contiguous, an hd outside PREFILL_ATTN_DIMS, autograd or torch.compile tracing, or no
    AVX512-BF16 here (torch's SDPA then, and the log says which). torch's flash kernel ran pllava-7b's causal prefill
    layer (32 x 2350 x 128) in 313 ms on 2 Zen 5 cores, this in 100; CLIP ViT-L's 4 frames 37 against 12
    (benchmarks/bench_prefill_attention.py)."""
    if (q.device.type != "cpu" or q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype
            or q.dim() != 4 or q.shape[-1] not in PREFILL_ATTN_DIMS or not (q.stride(-1) == k.stride(-1)
                                                                            == v.stride(-1) == 1)
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            or torch.compiler.is_compiling()):
        return None
    b, h, n, d = q.shape
    kv, nk = k.shape[1], k.shape[2]
    if v.shape != k.shape or k.shape[0] != b or k.shape[3] != d or h % kv or (causal and nk < n) or n < 1:
        return None
    C = native_prefill_attention()
    if C is None:
        log_once("bf16 prefill attention on the CPU: torch SDPA (pllava._C has no AVX512-BF16 path here)")
        return None
    log_once("bf16 prefill attention on the CPU: pllava._C (csrc/prefill_attention.cpp, AVX512-BF16)")
    o = torch.empty(b, n, h, d, dtype=torch.bfloat16).transpose(1, 2)  # (B, H, L, hd) over (B, L, H, hd)
    C.prefill_attention(q.data_ptr(), list(q.stride()[:3]), k.data_ptr(), list(k.stride()[:3]), v.data_ptr(),
                        list(v.stride()[:3]), o.data_ptr(), list(o.stride()[:3]), b, h, kv, n, nk, d, causal,
                        d ** -0.5, torch.get_num_threads())
    return o


def causal_attention(q, k, v, backend: str = "sdpa"):
    """Causal self-attention of a prefill from position 0: q (B, H, L, hd), k/v (B, KV, L, hd) -> (B, H, L, hd).
    bf16 on the CPU: pllava._C's kernel where it runs (cpu_attention_bf16)."""
    gqa = k.shape[1] != q.shape[1]
    if backend == "flash_attn":
        o = _attn_module("flash_attn").flash_attn_func(  # (B, L, H, hd) layout; GQA native
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return o.transpose(1, 2)
    if backend == "xformers":
        xops = _attn_module("xformers")
        if gqa:  # xformers' BMHK path wants as many K/V heads as query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            attn_bias=xops.LowerTriangularMask())
        return o.transpose(1, 2)
    o = cpu_attention_bf16(q, k, v, causal=True)
    if o is not None:
        return o
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def attention(q, k, v):
    """Bidirectional attention (CLIP's frames): q (B, H, L, hd), k / v (B, H, L, hd) -> (B, H, L, hd); bf16 on the
    CPU by pllava._C where it runs (cpu_attention_bf16), else torch's SDPA."""
    o = cpu_attention_bf16(q, k, v, causal=False)
    return o if o is not None else torch.nn.functional.scaled_dot_product_attention(q, k, v)


def slot_decode_attention(q, kc, vc, slot_t, pos_t, window: int | None = None, backend: str = "sdpa"):
    """Decode attention of B rows (one token each) addressed by device tensors only, so a CUDA graph can replay
    the step for any lengths: row b attends positions [0, pos_t[b]] of slot slot_t[b] (the last `window` of them
    under a sliding window). q (B, H, 1, hd); kc / vc (slots, KV, S, hd), the new token already written.
    backend 'flash_attn': flash-attn's flash_attn_with_kvcache with per-row cache_seqlens = pos + 1 and
    cache_batch_idx = slot (its (batch, seqlen, heads, hd) layout is a transposed view of the cache: no copy);
    otherwise the Triton kernel pllava.kernels.slot_attention."""
    if backend == "flash_attn":
        o = _attn_module("flash_attn").flash_attn_with_kvcache(
            q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), cache_seqlens=(pos_t + 1).to(torch.int32),
            cache_batch_idx=slot_t.to(torch.int32), causal=True,
            window_size=(window - 1, 0) if window else (-1, -1))  # keys > pos - window
        return o.transpose(1, 2)  # (B, H, 1, hd)
    return K.slot_decode_attention(q, kc, vc, slot_t, pos_t, window)


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, frozenset]:
    """(model name, flags) of the CPU from /proc/cpuinfo's first processor; ('', {}) where it cannot be read."""
    model, flags = "", frozenset()
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = val.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(val.split())
    except OSError:
        pass
    return model, flags


# x86 flags of the instructions torch's oneDNN runs a half-precision GEMM on natively; without them it converts
# each element to fp32 and back (measured below)
NATIVE_HALF_GEMM = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def half_gemm_emulated(dtype, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU whose flags say bf16 (fp16) GEMMs have no native instructions there: on a 2-core
    AVX2-only EPYC, bf16 ran the small preset's vision tower 7x and its prefill 5x slower than fp32 (pllava bench,
    4 frames: 2154 against 295 ms and 4786 against 860 ms). False where it cannot tell (another architecture, no
    /proc/cpuinfo) or for other dtypes."""
    import platform

    if dtype not in NATIVE_HALF_GEMM or platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return False
    flags = cpu_info(cpuinfo)[1]
    return bool(flags) and not any(f in flags for f in NATIVE_HALF_GEMM[dtype])


_EXT: list = []  # [pllava._C or None]: imported once; the decode paths ask per call


def native_extension(entry: str):
    """pllava._C when it is built and has `entry` (preprocess, int8_gemv, decode_attention, ...), else None: the
    one lookup of the optional extension for every path that can use it."""
    if not _EXT:
        try:
            from pllava import _C
        except ImportError:
            _C = None
        cap = os.environ.get("PLLAVA_CPU_ISA", "")
        if _C is not None and cap and hasattr(_C, "set_isa_cap"):
            # a lower vector path than the CPU's best, for a comparison or a suspected miscompile: avx2, generic
            try:
                _C.set_isa_cap(cap)
            except ValueError as e:
                from .errors import ConfigError

                raise ConfigError(f"PLLAVA_CPU_ISA={cap!r}: not one of avx512, avx2, generic, best") from e
            log.info("PLLAVA_CPU_ISA=%s: pllava._C's CPU kernels run %s (this CPU's best: %s)", cap, _C.cpu_isa(),
                     _C.cpu_isa_supported())
        _EXT.append(_C)
    return _EXT[0] if hasattr(_EXT[0], entry) else None


def native_decode_attention():
    """pllava._C when it is built with the decode-attention kernels (csrc/decode_attention.cpp: one sequence, and
    rows in their own slots), else None: the one rule for generate()'s steps, the scheduler's and the engine's
    choice of a bf16 cache (an older build without the per-row entry counts as none)."""
    return native_extension("decode_attention_rows")


CPU_KV_DTYPES = (torch.float32, torch.bfloat16)  # the caches pllava._C's decode attention reads


def _check_cpu_attention(q, k, v, where: str):
    """What the kernels need: q (B, H, 1, hd) fp32, K and V of one dtype (CPU_KV_DTYPES) and one layout, hd
    contiguous, H a multiple of KV (checked by the binding)."""
    if (k.stride() != v.stride() or k.stride(-1) != 1 or q.stride(-1) != 1 or k.dtype not in CPU_KV_DTYPES
            or v.dtype != k.dtype):
        raise ValueError(f"{where}: k and v must be fp32 or bf16 with one dtype and layout and hd contiguous, got "
                         f"{k.dtype} / {v.dtype} strides {k.stride()} / {v.stride()}")
    if q.dtype != torch.float32 or q.dim() != 4 or q.shape[2] != 1 or q.shape[3] != k.shape[3] or v.shape != k.shape:
        raise ValueError(f"{where}: q must be fp32 (B, H, 1, {k.shape[3]}) for a cache of {tuple(k.shape)}, got "
                         f"{q.dtype} {tuple(q.shape)} (v {tuple(v.shape)})")


def cpu_decode_attention(C, q, k, v, lo: int, hi: int):
    """One decode step's attention on the CPU by pllava._C: q (B, H, 1, hd) fp32 attends positions [lo, hi) of
    k / v (B, KV, S, hd), fp32 or bf16 (the static cache, hd contiguous; bf16 widened exactly, every sum in fp32)
    -> (B, H, 1, hd) fp32. What the masked SDPA over the cache's values in fp32 gives for a mask that is true on
    [lo, hi) only (tests/test_decode_attention.py), without reading the rest."""
    bsz, h, _, d = q.shape
    _check_cpu_attention(q, k, v, "cpu_decode_attention")
    if k.shape[0] != bsz:
        raise ValueError(f"cpu_decode_attention: q has {bsz} rows but the cache {tuple(k.shape)} has {k.shape[0]}")
    if hi > k.shape[2]:  # the kernel would read past the cache
        raise ValueError(f"cpu_decode_attention: positions [{lo}, {hi}) past the cache's {k.shape[2]}")
    o = torch.empty(bsz, h, 1, d, dtype=torch.float32)
    bf16 = k.dtype == torch.bfloat16
    log_once(f"decode attention: pllava._C's kernel over the used positions ({'bf16' if bf16 else 'fp32'} cache)")
    C.decode_attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                       k.stride(2), o.data_ptr(), o.stride(0), o.stride(1), bsz, h, k.shape[1], d, lo, hi, d ** -0.5,
                       torch.get_num_threads(), False, bf16)
    return o


_LIB = torch.library.Library("pllava", "FRAGMENT")  # the CPU ops of pllava._C's kernels


def define_cpu_op(schema: str, impl, fake):
    """Register pllava::<schema> with `impl` as its CPU kernel and `fake` for tracing: a compiled graph calls the
    kernel as one opaque op. Registered at this level, not by torch.library.custom_op, since its Python wrappers
    cost a decode step's ~65 calls 1 ms (2 Zen4 cores, x (1, 768) int8 GEMV: 21-34 us a call that way, 7-12 us
    here, 4-10 us for the kernel called directly)."""
    name = schema.split("(")[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CPU")
    torch.library.register_fake(f"pllava::{name}", fake, lib=_LIB)


def decode_attention_at(q, k, v, input_pos, window: int):
    """One sequence's CPU decode attention at position input_pos[0] (window 0: none): pllava::decode_attention_cpu's
    body, which eager steps call directly."""
    C = native_decode_attention()
    if C is None:
        raise RuntimeError("pllava::decode_attention_cpu: pllava._C is not built with decode_attention "
                           "(reinstall the package)")
    if input_pos.numel() != 1 or input_pos.device.type != "cpu":
        raise ValueError(f"decode_attention_cpu: input_pos must be one CPU position, got {tuple(input_pos.shape)} "
                         f"on {input_pos.device}")
    pos = int(input_pos.reshape(()))
    if pos < 0:
        raise ValueError(f"decode_attention_cpu: position {pos} is negative")
    lo = max(0, pos + 1 - window) if window > 0 else 0
    return cpu_decode_attention(C, q, k, v, lo, pos + 1)


def cpu_decode_attention_rows(C, q, kc, vc, slots: list[int], lo: list[int], hi: list[int]):
    """The batched scheduler's decode attention in one call a layer: row b of q (B, H, 1, hd) fp32 attends
    positions [lo[b], hi[b]) of slot slots[b] of kc / vc (num_slots, KV, S, hd), fp32 or bf16 -> (B, H, 1, hd)
    fp32; the binding refuses a slot or a range outside the cache, naming the row."""
    bsz, h, _, d = q.shape
    _check_cpu_attention(q, kc, vc, "cpu_decode_attention_rows")
    if not len(slots) == len(lo) == len(hi) == bsz:  # the kernel writes one row of o a slot
        raise ValueError(f"cpu_decode_attention_rows: {bsz} rows of q need {bsz} slots and ranges, got "
                         f"{len(slots)} / {len(lo)} / {len(hi)}")
    o = torch.empty(bsz, h, 1, d, dtype=torch.float32)
    C.decode_attention_rows(q.data_ptr(), q.stride(0), q.stride(1), kc.data_ptr(), vc.data_ptr(),
                            kc.dtype == torch.bfloat16, kc.stride(0), kc.stride(1), kc.stride(2), o.data_ptr(),
                            o.stride(0), o.stride(1), h, kc.shape[1], d, kc.shape[0], kc.shape[2], slots, lo, hi,
                            d ** -0.5, torch.get_num_threads())
    return o


# The compiled CPU decode step's attention (one sequence, an fp32 or bf16 static cache): q (B, H, 1, hd) fp32
# attends the positions [lo, pos] of k / v (B, KV, S, hd), pos = input_pos[0] read in the op (a CPU tensor: no
# device sync), lo = pos + 1 - window under a sliding window (window 0: none). What the masked SDPA over the whole
# static cache gives, reading the used positions only.
define_cpu_op("decode_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor input_pos, int window) -> Tensor",
              decode_attention_at, lambda q, k, v, input_pos, window: q.new_empty(q.shape, dtype=torch.float32))


def slot_attention(q, kc, vc, slots: list[int], starts: list[int], window: int | None = None):
    """Attention of rows that live in different slots of a slot KV cache, each over its own used positions only.

    q (B, H, L, hd): L new tokens per row at positions starts[b].. (already written to the cache);
    kc / vc (num_slots, KV, S, hd) -> (B, H, L, hd). Each row attends to [0, starts[b] + L) of slot slots[b]
    (causal among its L tokens; a sliding window when the config has one). The slices are views: no copy of
    the cache, and no unused or stale position is ever read, so whatever an earlier request left in a slot
    (NaN included) cannot reach this one. q comes in the model's dtype and the result goes back in it; on the CPU
    the rows attend in fp32 whatever the cache holds (bf16 decode attention is 7x slower there: 1.67 ms against
    0.23 ms a layer at 2400 keys, 12 heads), but for a bf16 prefill chunk, which attends through pllava._C's
    prefill attention where it runs, as a whole prompt does (cpu_attention_bf16: a row's bits then do not depend on
    where its prompt was cut); elsewhere in the cache's dtype.
    """
    gqa = kc.shape[1] != q.shape[1]
    n, out_dtype, q_in = q.shape[2], q.dtype, q
    q = q.to(torch.float32 if q.device.type == "cpu" else kc.dtype)
    # the CPU's batched decode: generate()'s kernel, every row in one call a layer (8 rows: 0.5-4.8 ms a step less
    # than a call a row, scratch timer, 100-2000 positions)
    native = (native_decode_attention() if n == 1 and q.device.type == "cpu"
              and q.dtype == torch.float32 and kc.dtype in CPU_KV_DTYPES and not torch.compiler.is_compiling()
              else None)
    if native is not None:
        lo = [max(0, a - window + 1) if window is not None else 0 for a in starts]
        log_once("decode attention: pllava._C's kernel over each row's own slot and positions")
        return cpu_decode_attention_rows(native, q, kc, vc, list(slots), lo, [a + 1 for a in starts]).to(out_dtype)
    outs = []
    for b, (s, a) in enumerate(zip(slots, starts)):
        end = a + n
        lo = max(0, a - window + 1) if window is not None else 0
        k, v = kc[s:s + 1, :, lo:end], vc[s:s + 1, :, lo:end]
        o = cpu_attention_bf16(q_in[b:b + 1], k, v, causal=True) if n > 1 and (window is None or end <= window) \
            else None
        if o is not None:
            outs.append(o.to(q.dtype))  # (exact: bf16 widened, then narrowed back below)
            continue
        mask = None
        if n > 1:  # a prefill chunk: causal among its own tokens (one decode token sees all of [lo, end))
            qpos = torch.arange(a, end, device=q.device)[:, None]
            kpos = torch.arange(lo, end, device=q.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask = mask & (kpos > qpos - window)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[b:b + 1], k.to(q.dtype), v.to(q.dtype),
                                                                     attn_mask=mask, enable_gqa=gqa))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(out_dtype)
