"""Weight-only int8 for the LLM's linears (`Engine.from_pretrained(..., quantize="int8")`).

Per output channel, symmetric: w ≈ q · s with q = round(w / s) in [-127, 127], s = max|w_row| / 127, the scale in
the activation dtype. The LoRA stays unmerged in the activation dtype at the live alpha (only the base weight is
quantized), so set_lora_alpha works as before. Decode (M <= 16 rows) is memory-bound, so half the weight bytes is the point:
on the CPU, torch's `_weight_int8pack_mm` with bf16 activations measured 0.16-0.21x the fp32 GEMV time at 7B
shapes (with fp32 activations it is 4x slower, so this mode wants dtype=bfloat16). On the Triton path (CUDA) every
call is pllava.kernels.int8_linear: int8 tiles widened in registers, the scale on the fp32 accumulator, the LoRA's
expand fused at the live alpha; without triton there the weight is dequantized per call, and the log says which.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pllava.kernels.int8_linear import int8_linear as int8_linear_fused
from pllava.kernels.lora_linear import lora_delta

from .head import RescoredHead


# Up to this many rows (decode, small batches) the int8 GEMV streams half the bytes. Past it the product is
# compute-bound, and dequantizing to bf16 for its GEMM wins: M = 2400, K = 768, N = 2048 on 2 Zen4 cores took
# 57.6 ms through _weight_int8pack_mm, 20.1 ms dequantized + bf16 F.linear, 50.6 ms in fp32.
DECODE_ROWS = 16


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), per-row scale (N,) in w's dtype). The scale is max|w_row| / 127 rounded to
    w's dtype first, and q = round(w / that scale): the rounding the kernels multiply by is the one q was fitted
    to, not a per-row gain error of up to 2^-9 on every output. benchmarks/bench_quality.py 1024 (tiny
    checkpoint, top-1 disagreements with the fp32 model; q fitted to the fp32 scale before): prompt positions
    767 against 846 of 60416, decode positions 279 against 310 of 16384 (transformers bf16: 913, 259)."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(w.dtype)
    q = torch.round(w32 / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # a scale rounded down: 127.5
    return q, scale


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                lora=None, path: str = "torch") -> torch.Tensor:
    """x (..., K) · (q · scale)ᵀ + bias [+ the LoRA: lora = (lora_A, lora_B, s) at its live scale], in x's dtype.
    path 'triton': the fused Triton kernel; 'torch': the CPU kernels below (or the dequantized weight)."""
    if path == "triton":
        return int8_linear_fused(x, q, scale, bias, *(lora or (None, None, None)))
    x2 = x.reshape(-1, x.shape[-1])
    if x2.device.type == "cpu" and x2.shape[0] <= DECODE_ROWS:
        y = torch._weight_int8pack_mm(x2.contiguous(), q, scale.to(x2.dtype))
    elif x2.dtype == torch.bfloat16:  # prefill: bf16's GEMM on q itself (int8 values are exact in bf16; its range
        # holds x·q), then the scale: torch's bf16 multiply forms y·s in fp32 and rounds once, bit-identical to
        # (y.float() * s.float()).to(bf16) but 5x faster (2.6 against 13.9 ms at M = 2400, N = 2048, 2 cores)
        y = F.linear(x2, q.to(x2.dtype)).mul_(scale)
    else:  # fp16 (whose range x·q could overflow) and fp32: the dequantized weight
        y = F.linear(x2, q.to(x2.dtype) * scale.to(x2.dtype)[:, None])
    if bias is not None:
        y = y + bias
    y = y.reshape(*x.shape[:-1], q.shape[0])
    if lora is not None:
        y = y + lora_delta(x, *lora)
    return y


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (buffers qweight, qscale)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        q, s = quantize_weight(lin.weight.data)
        self.register_buffer("qweight", q)
        self.register_buffer("qscale", s)
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.kernel_path = "torch"  # 'triton': pllava.kernels.int8_linear (PllavaModel.set_kernel_path)

    def forward(self, x):
        return int8_linear(x, self.qweight, self.qscale, self.bias, path=self.kernel_path)


class Int8Head(RescoredHead):
    """lm_head at int8 speed without int8's top-1 cost. The weight is stored in two levels, w = q·s + r with
    r ≈ q2·s2 (per row; 2 bytes a weight, as bf16): the first pass streams the 1-byte q only; the rescored rows
    come from q·s + q2·s2, whose error (<= s2/2, about max|w_row| / 2·127²) is far under bf16's (2^-9 of each
    weight)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w32 = lin.weight.data.float()
        q, s = quantize_weight(lin.weight.data)
        q2, s2 = quantize_weight(w32 - q.float() * s.float()[:, None])  # the residual against the scale in use
        for name, t in (("qweight", q), ("qscale", s), ("rweight", q2), ("rscale", s2.float())):
            self.register_buffer(name, t)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.kernel_path = "torch"

    def first_pass(self, h2):
        return int8_linear(h2, self.qweight, self.qscale, None, path=self.kernel_path)

    def weight_rows(self, t):
        return (self.qweight[t].float() * self.qscale[t].float()[..., None]
                + self.rweight[t].float() * self.rscale[t][..., None])


def quantize_lm_int8_(lm) -> bool:
    """Quantize the decoder layers' linears (attention q/k/v/o with their LoRA left as is, the MLP) and lm_head
    (as an Int8Head) in place; the embedding stays in the weights' dtype. lm_head tied to the embedding stays too
    (its two-level copy would add 2 bytes a weight). Returns whether lm_head was quantized.
    benchmarks/bench_quality.py 1024 (tiny checkpoint, top-1 disagreements with the fp32 model at 60416 prompt /
    16384 decode positions; transformers' bf16: 913 / 259): lm_head in bf16 937 / 314, in plain int8 1160 / 353,
    as an Int8Head 767 / 279 (the gain is the fp32 logits of the rescored tokens)."""
    from .llm import LoRALinear

    for layer in lm.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m: LoRALinear = getattr(layer.self_attn, name)
            q, s = quantize_weight(m.weight.data)
            del m.weight  # the float weight goes: the memory is the point
            m.weight = None
            m.qweight, m.qscale = q, s
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, Int8Linear(getattr(layer.mlp, name)))
    if lm.lm_head.weight is lm.embed_tokens.weight:
        return False
    lm.lm_head = Int8Head(lm.lm_head)
    return True


def quantized_bytes(module) -> int:
    """Bytes of the int8 weights and their scales under `module`."""
    return sum(b.numel() * b.element_size() for n, b in module.named_buffers()
               if n.endswith(("qweight", "qscale", "rweight", "rscale")))
