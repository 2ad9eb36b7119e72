"""Pieces shared by the kernels: the tl.dot dispatch on precision, and the interpreter's bf16 workaround."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs (macOS, no triton wheel): the torch paths serve
    HAVE_TRITON = False


def upcast_dot(dtype) -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) mis-multiplies bf16 tl.dot operands (numpy has no bf16); there the
    kernels upcast them to fp32, which holds every bf16 value exactly. Compiled kernels never take this branch."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


# What a config table is sized against, per arch: SMs of the smallest part it serves (H100 SXM / A100) and the
# most shared memory one CTA may take (227 KB on sm_90, 163 KB on sm_80).
SMS = {"sm90": 132, "sm80": 108}
SHARED_LIMIT = {"sm90": 232448, "sm80": 166912}


class LaunchSpec:
    """Exactly what a launcher launches: kernel, grid, the runtime arguments by name (tensors and ints, which the
    JIT specialises), the constexpr meta-parameters, warps and stages. compile_check compiles this same object."""

    def __init__(self, kernel, grid, args: dict, meta: dict, num_warps: int, num_stages: int, post=None):
        self.kernel, self.grid, self.args, self.meta = kernel, grid, args, meta
        self.num_warps, self.num_stages = num_warps, num_stages
        self.post = post  # what runs after the kernel (a split-K's reduction), or None

    def launch(self):
        self.kernel[self.grid](**self.args, **self.meta, num_warps=self.num_warps, num_stages=self.num_stages)
        if self.post is not None:
            self.post()

    @property
    def ctas(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


def pick_tile(table: dict, m: int, n: int, arch: str, decode_max_m: int):
    """From an arch's {'decode': [...], 'prefill': [...]} table (decode for M <= decode_max_m): the first config
    whose grid covers every SM, else the mode's last (decode: the narrowest N tile, the most CTAs there can be
    without splitting K). Returns (mode, config)."""
    mode = "decode" if m <= decode_max_m else "prefill"
    return mode, first_covering(table[mode], m, n, arch)


def first_covering(cfgs: list, m: int, n: int, arch: str):
    """The first (BLOCK_M, BLOCK_N, ...) config whose grid covers every SM of the arch, else the last (the tables
    end with their narrowest N tile: the most CTAs there can be without splitting K)."""
    for cfg in cfgs:
        if -(-m // cfg[0]) * -(-n // cfg[1]) >= SMS[arch]:
            return cfg
    return cfgs[-1]


# A split K keeps at least this many K tiles a CTA: fewer and the pipeline (3-4 stages) never fills.
MIN_K_TILES_PER_SPLIT = 8


def split_k(tiles: int, k: int, block_k: int, arch: str) -> int:
    """How many K ranges a decode grid of `tiles` CTAs splits into so that it covers the arch's SMs: 1 when it
    already does. PLLaVA-34B's v_proj (N = 1024: 64 tiles of 16 on 132 SMs) gets 3 (192 CTAs). The partial sums
    go to an fp32 workspace and are added in a fixed order (deterministic, unlike atomics)."""
    if tiles >= SMS[arch]:
        return 1
    return max(1, min(-(-SMS[arch] // tiles), -(-k // block_k) // MIN_K_TILES_PER_SPLIT))


def split_k_reduce(ws, y):
    """y = the sum over the split axis of the (S, M, N) fp32 partials, rounded once to y's dtype."""
    return lambda: y.copy_(ws.sum(0))


def output_for(op: str, x, m: int, n: int, out=None):
    """The (M, N) output in x's dtype on x's device: `out` when it is one (contiguous), else a new tensor."""
    if out is None:
        return torch.empty(m, n, device=x.device, dtype=x.dtype)
    if out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous ({m}, {n}) {x.dtype} tensor on {x.device}")
    return out


def check_bias_and_lora(op: str, x, m: int, n: int, k: int, bias, lora_a, lora_b, scale, max_rank: int,
                        weights=()):
    """What the quantized linears' launchers check alike past their weight's own form: bias (N,); lora_a (r, K),
    lora_b (N, r) and scale (0-dim, or one a row) together or all None, r in 1..max_rank; bias and the LoRA in x's
    dtype; they and `weights` ((name, tensor) pairs) on x's device. A ValueError names the operand."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"{op}: {msg}")

    if bias is not None:
        need(isinstance(bias, torch.Tensor) and tuple(bias.shape) == (n,), f"bias must be ({n},)")
    lora = (lora_a, lora_b, scale)
    need(all(t is None for t in lora) or all(isinstance(t, torch.Tensor) for t in lora),
         "lora_a, lora_b and scale come together (all tensors, or all None)")
    if lora_a is not None:
        need(lora_a.dim() == 2 and lora_a.shape[1] == k, f"lora_a shape {tuple(lora_a.shape)} must be (r, {k})")
        r = lora_a.shape[0]
        need(0 < r <= max_rank, f"rank r={r} is outside 1..{max_rank}")
        need(tuple(lora_b.shape) == (n, r), f"lora_b shape {tuple(lora_b.shape)} must be ({n}, {r})")
        need(scale.dim() == 0 or tuple(scale.shape) == (m,), f"scale must be 0-dim or ({m},) per row, got "
             f"{tuple(scale.shape)}")
    for name, t in (("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None:
            need(t.dtype == x.dtype, f"{name} dtype {t.dtype} differs from x's {x.dtype}")
    for name, t in (*weights, ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b), ("scale", scale)):
        if t is not None:
            need(t.device == x.device, f"{name} is on {t.device}, x is on {x.device}")


def arch_key(device: torch.device | None) -> str:
    """Which config table: 'sm90' (H100/H200 and newer) or 'sm80' (A100 and older); sm90 when there is no GPU."""
    if device is not None and device.type == "cuda":
        return "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"
    return "sm90"


if HAVE_TRITON:

    @triton.jit
    def mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a·b with fp32 accumulation: exact fp32 products for fp32 inputs (IEEE; torch does not use TF32
        for matmuls by default either), tensor cores for fp16/bf16."""
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            out = tl.dot(a, b, acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def expand_rank(xa_ptr, b_ptr, acc, offs_m, offs_n, offs_k, m_ok, n_ok, R, stride_xam, stride_xar, stride_bn,
                    stride_br, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + xs·Bᵀ: a LoRA's expand as R more steps of a K loop, BLOCK_K ranks at a time, on the output tile's
        accumulator (pipelined like the main GEMM, no extra (BLOCK_M, r) registers). xa_ptr holds the shrink
        s·(x·Aᵀ) (M, R) in the activation dtype, b_ptr lora_B (N, R)."""
        for r0 in range(0, R, BLOCK_K):
            rr = r0 + offs_k
            rr_ok = rr < R
            xs = tl.load(xa_ptr + offs_m[:, None] * stride_xam + rr[None, :] * stride_xar,
                         mask=m_ok[:, None] & rr_ok[None, :], other=0.0)
            bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + rr[:, None] * stride_br,
                         mask=rr_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(xs, bt, acc, IEEE, UPCAST)
        return acc

    @triton.jit
    def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Row and column offsets of this CTA's output tile, in grouped order (GROUP_M row tiles share each weight
        column tile while it is in L2), and their in-bounds masks."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_m, offs_n, offs_m < M, offs_n < N

    @triton.jit
    def bias_and_store(acc, bias_ptr, y_ptr, ws_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, N, stride_ym, stride_yn,
                       stride_ws, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
        """The epilogue of a (split-K) GEMM tile: the bias once (first K range), then the tile in y's dtype, or, for
        a split K, its fp32 partial into the workspace (the launcher adds the ranges in order and rounds once)."""
        if HAS_BIAS:
            if pid_k == 0:
                acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SPLIT_K > 1:
            tl.store(ws_ptr + pid_k * stride_ws + offs_m[:, None] * N + offs_n[None, :], acc,
                     mask=m_ok[:, None] & n_ok[None, :])
        else:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                     acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
