"""Weight-only int8 for the LLM's linears (`Engine.from_pretrained(..., quantize="int8")`).

Per output channel, symmetric: w ≈ q · s with q = round(w / s) in [-127, 127], s = max|w_row| / 127, the scale in
the activation dtype. The LoRA stays unmerged in the activation dtype at the live alpha (only the base weight is
quantized), so set_lora_alpha works as before. Decode (M <= 16 rows) is memory-bound, so half the weight bytes is the point:
on the CPU, torch's `_weight_int8pack_mm` with bf16 activations measured 0.16-0.21x the fp32 GEMV time at 7B
shapes (with fp32 activations it is 4x slower, so this mode wants dtype=bfloat16). On CUDA the int8 weights are
dequantized per call (memory halves; speed does not: the Triton int8 kernel is not written yet), and the engine
says so in its log.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# Up to this many rows (decode, small batches) the int8 GEMV streams half the bytes. Past it the product is
# compute-bound, and dequantizing to bf16 for its GEMM wins: M = 2400, K = 768, N = 2048 on 2 Zen4 cores took
# 57.6 ms through _weight_int8pack_mm, 20.1 ms dequantized + bf16 F.linear, 50.6 ms in fp32.
DECODE_ROWS = 16


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), per-row scale (N,) in w's dtype), computed in fp32."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) · (q · scale)ᵀ + bias, in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.device.type == "cpu" and x2.shape[0] <= DECODE_ROWS:
        y = torch._weight_int8pack_mm(x2.contiguous(), q, scale.to(x2.dtype))
    elif x2.dtype == torch.bfloat16:  # prefill: bf16's GEMM on q itself (int8 values are exact in bf16; its range
        # holds x·q), the scale applied to the fp32 of its output: q · s rounded to bf16 first cost 2 of 59 top-1
        # agreements on the tiny checkpoint
        y = (F.linear(x2, q.to(x2.dtype)).float() * scale.float()).to(x2.dtype)
    else:  # fp16 (whose range x·q could overflow) and fp32: the dequantized weight
        y = F.linear(x2, q.to(x2.dtype) * scale.to(x2.dtype)[:, None])
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (buffers qweight, qscale)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        q, s = quantize_weight(lin.weight.data)
        self.register_buffer("qweight", q)
        self.register_buffer("qscale", s)
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x):
        return int8_linear(x, self.qweight, self.qscale, self.bias)


def quantize_lm_int8_(lm) -> int:
    """Quantize every linear of the LLM (attention q/k/v/o with their LoRA left as is, the MLP, lm_head) in place;
    the embedding stays. Returns the bytes the weights take now."""
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
    lm.lm_head = Int8Linear(lm.lm_head)
    return sum(b.numel() * b.element_size() for n, b in lm.named_buffers() if n.endswith(("qweight", "qscale")))
