"""lm_head under half-precision or int8 weights: a cheap first pass ranks the vocabulary, then each row's best
HEAD_RESCORE logits are recomputed in fp32 and the logits come back in fp32.

Why: a bf16 logit near 8 is a multiple of 2^-5, so near-equal tokens tie or swap at the argmax. On the tests' tiny
checkpoint (benchmarks/bench_quality.py 2048: top-1 disagreements with the fp32 model at 120832 prompt / 32768
decode positions) the bf16 engine went from 1761 / 496 to 1370 / 384 with fp32 logits, int8 from 1890 / 623 to
1565 / 526 (transformers bf16: 1893 / 507; int8 fitted to bf16-rounded weights then). The rescoring reads 32
rows of the weight a row of logits (PLLaVA-7B: 256 KB against the head's 262 MB): 0.13 ms a step on the small
preset's CPU run (topk 0.06, rescoring 0.07), against a 2.1-4.3 ms first pass.

Greedy decoding and the top of a sampler's distribution see fp32 logits; only a sampler that reaches past a row's
32 best (a high temperature, top_p near 1) reads first-pass ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The first pass's error (bf16: 2^-9 of a logit; int8: about 0.4 % of a row's scale) moves a token by a few ranks,
# not 32: argmax needs only the true best among the rescored.
HEAD_RESCORE = 32
RESCORE_ROWS = 64  # rows of logits rescored at once: 64 x 32 x 4096 fp32 weights, 32 MB, bound the gather


class RescoredHead(nn.Module):
    """h (..., D) -> logits (..., V) fp32. Subclasses give the first pass and the fp32 weight rows."""

    def first_pass(self, h2: torch.Tensor) -> torch.Tensor:  # (R, D) -> (R, V)
        raise NotImplementedError

    def weight_rows(self, t: torch.Tensor) -> torch.Tensor:  # token ids (r, k) -> their weight rows (r, k, D) fp32
        raise NotImplementedError

    def forward(self, h):
        h2 = h.reshape(-1, h.shape[-1])  # (R, D)
        logits = self.first_pass(h2).float()  # (R, V)
        top = logits.topk(min(HEAD_RESCORE, logits.shape[-1]), dim=-1).indices  # (R, k)
        for r0 in range(0, h2.shape[0], RESCORE_ROWS):
            t, x = top[r0:r0 + RESCORE_ROWS], h2[r0:r0 + RESCORE_ROWS].float()
            logits[r0:r0 + RESCORE_ROWS].scatter_(-1, t, (self.weight_rows(t) @ x[:, :, None]).squeeze(-1))
        return logits.reshape(*h.shape[:-1], -1)


class HalfHead(RescoredHead):
    """A bf16 / fp16 lm_head: the first pass is its own GEMM (output in the weights' dtype), the rescoring reads
    the same weight (shared, not copied: a head tied to the embedding stays tied)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = lin.weight
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def first_pass(self, h2):
        # F.linear also for a skinny batch: the (V, D) x (D, B) order that wins in fp32 on the CPU (llm.py) lost
        # in bf16 (small preset's head, 2 cores: 7.0 against 11.6 ms at 2 rows, 8.3 against 11.7 at 8)
        # h2 in the weights' dtype: fp32 decode rows (the CPU's int8 mode, its head tied to the embedding) too
        return F.linear(h2.to(self.weight.dtype), self.weight)

    def weight_rows(self, t):
        return self.weight[t].float()
