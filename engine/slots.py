"""How many KV slots fit the memory budget: `plan_slots` (the scheduler's and `pllava bench`'s), with the budget on
CUDA or the host from `default_kv_budget` unless the caller gives kv_cache_bytes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError, MemoryBudgetError
from .model.llm import SlotKVCache
from .memory import available_bytes


@dataclass
class SlotPlan:
    num_slots: int
    slot_len: int  # positions a slot holds (prompt + new tokens of one request)
    bytes_per_token: int
    budget_bytes: int
    budget_source: str


def default_kv_budget(device: torch.device) -> tuple[int, str]:
    """Bytes the KV cache may take: on CUDA what is free less 10 % of the card (activations of a 2350-token
    prefill of a 7B model are ~0.3 GB; the vision tower's ~0.2 GB); on the host half of the available memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(free - 0.1 * total)), f"free CUDA memory ({free / 2**30:.1f} GiB) less 10 % of the card"
    avail, _ = available_bytes(device)
    return avail // 2, f"half the available host memory ({avail / 2**30:.1f} GiB)"


def plan_slots(text_cfg, dtype, device, max_num_seqs: int, slot_len: int,
               kv_cache_bytes: int | None = None) -> SlotPlan:
    """How many slots of `slot_len` positions fit the budget (at most max_num_seqs)."""
    if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise InputError(f"max_num_seqs (max_batch_size) must be an integer >= 1, got {max_num_seqs!r}")
    bpt = SlotKVCache.bytes_per_token(text_cfg, dtype)
    if kv_cache_bytes is None:
        budget, source = default_kv_budget(torch.device(device))
    else:
        budget, source = int(kv_cache_bytes), "kv_cache_bytes"
    per_slot = slot_len * bpt
    n = min(max_num_seqs, budget // per_slot)
    if n < 1:
        raise MemoryBudgetError(
            f"KV cache budget of {budget} bytes ({source}) cannot hold one slot of {slot_len} positions x "
            f"{bpt} bytes per position = {per_slot} bytes; lower max_seq_len / --max-model-len or free memory")
    return SlotPlan(int(n), slot_len, bpt, budget, source)
