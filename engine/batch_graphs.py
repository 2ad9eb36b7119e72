"""Batched decode steps of the scheduler captured as CUDA graphs, one per batch-size bucket (opt-in:
PLLAVA_CUDA_GRAPHS=1 / engine.cuda_graphs). Never measured on a GPU yet; tests/test_gpu.py checks it against eager.
"""
from __future__ import annotations

import logging

import torch

from .model.llm import SlotKVCache, SlotRows

log = logging.getLogger("pllava")


class BatchDecodeGraphs:
    """Batched decode steps captured as CUDA graphs, one per batch-size bucket (1, 2, 4, 8, 16, ...): a step of B
    rows replays the smallest bucket >= B, its extra rows copies of row 0 (they write the same K/V to the same
    place and their logits are dropped). Replays need a step with no host integers in it: the Triton slot
    attention (device-side slots and positions), the LoRA scale per row on the device. Capturing runs the step
    three times on the real rows; every run writes the same values, so a capture in the middle of serving is safe.
    Tied to the weights and the cache: dropped when either changes (merge_lora, a new scheduler)."""

    def __init__(self, lm, cache: SlotKVCache, device):
        self.lm, self.cache, self.device = lm, cache, device
        self.graphs: dict[int, tuple] = {}
        self.pool = None

    @staticmethod
    def bucket(b: int) -> int:
        return 1 << (b - 1).bit_length()

    def _capture(self, k: int, fill):
        dev = self.device
        tok = torch.zeros((k, 1), dtype=torch.long, device=dev)
        pos = torch.zeros((k, 1), dtype=torch.long, device=dev)
        slot = torch.zeros((k,), dtype=torch.long, device=dev)
        scale = torch.zeros((k,), dtype=torch.float32, device=dev)
        rows = SlotRows([], [], pos, slot, scale)
        fill(tok, pos, slot, scale)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # lazy initialisation (cuBLAS handles, Triton compiles) outside the capture
                self.lm.forward_slots(self.lm.embed(tok), rows, self.cache)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every bucket
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            out = self.lm.forward_slots(self.lm.embed(tok), rows, self.cache)
        self.graphs[k] = (graph, tok, pos, slot, scale, out)
        log.info("pllava scheduler: captured the batched decode step for %d rows as a CUDA graph", k)

    def __call__(self, toks: list[int], slots: list[int], positions: list[int], scales: list[float]) -> torch.Tensor:
        b = len(toks)
        k = self.bucket(b)
        pad = k - b

        def fill(tok, pos, slot, scale):
            tok.copy_(torch.tensor([[t] for t in toks + toks[:1] * pad]))
            pos.copy_(torch.tensor([[p] for p in positions + positions[:1] * pad]))
            slot.copy_(torch.tensor(slots + slots[:1] * pad))
            scale.copy_(torch.tensor(scales + scales[:1] * pad, dtype=torch.float32))

        if k not in self.graphs:
            self._capture(k, fill)
        graph, tok, pos, slot, scale, out = self.graphs[k]
        fill(tok, pos, slot, scale)
        graph.replay()
        return out[:b]
