"""How much memory is free for new tensors on a device: the load's weight check (loading.check_weights_fit), the KV
cache budget (slots.default_kv_budget) and generate()'s cache growth (check_host_allocation) read it here."""
from __future__ import annotations

import os

import torch

from .errors import MemoryBudgetError


def available_bytes(device) -> tuple[int, str]:
    """(bytes free for new tensors on `device`, where the number comes from): on CUDA what the driver reports free;
    on the host MemAvailable of /proc/meminfo (free memory and the page cache the kernel can reclaim; swap not
    counted), else the physical memory, or what this process's memory cgroup still allows where that is less (a
    container's limit, which its OOM killer enforces, while MemAvailable counts the whole host)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    have, source = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical host memory"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have, source = int(line.split()[1]) * 1024, "available host memory (MemAvailable)"
                    break
    except OSError:
        pass
    cg = cgroup_available()
    if cg is not None and cg[0] < have:
        have, source = cg[0], f"this process's memory cgroup: its {cg[1] / 1e9:.1f} GB limit less what it uses"
    return have, source


def cgroup_available(root: str = "/sys/fs/cgroup", proc: str = "/proc/self/cgroup") -> tuple[int, int] | None:
    """(bytes this process's memory cgroup still allows, its limit): the limit less its use plus the page cache it
    can reclaim (cgroup v2: memory.max, memory.current, memory.stat's file; v1: memory.limit_in_bytes,
    memory.usage_in_bytes, total_cache), or None where no limit is set or none can be read. A container's limit
    is what its OOM killer enforces, while MemAvailable counts the whole host's memory."""
    try:
        with open(proc, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, ctrls, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and not ctrls:
            d, names = os.path.join(root, path.lstrip("/")), ("memory.max", "memory.current", "file")
        elif "memory" in ctrls.split(","):
            d, names = os.path.join(root, "memory", path.lstrip("/")), ("memory.limit_in_bytes",
                                                                        "memory.usage_in_bytes", "total_cache")
        else:
            continue
        try:
            with open(os.path.join(d, names[0]), encoding="ascii") as f:
                limit = f.read().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as ~2^63
                continue
            with open(os.path.join(d, names[1]), encoding="ascii") as f:
                used = int(f.read())
            cache = 0
            with open(os.path.join(d, "memory.stat"), encoding="ascii") as f:
                for stat in f:
                    key, _, val = stat.partition(" ")
                    if key == names[2]:
                        cache = int(val)
        except (OSError, ValueError):
            continue
        return max(0, int(limit) - used + cache), int(limit)
    return None


def check_host_allocation(nbytes: int, device, what: str, advice: str):
    """Refuse, with a MemoryBudgetError naming the numbers, `nbytes` more of host memory than is available: a
    torch.zeros past it is not an exception under Linux's overcommit but an OOM kill of the whole process as the
    pages are written. On CUDA the allocator raises a catchable out-of-memory error itself (and its cached blocks,
    which the driver counts as used, would make this check refuse what fits), so nothing is checked there."""
    if torch.device(device).type != "cpu" or nbytes <= 0:
        return
    have, source = available_bytes(device)
    if nbytes > have:
        raise MemoryBudgetError(f"{what} needs {human_bytes(nbytes)} more of host memory, but {human_bytes(have)} "
                                f"is free ({source}); {advice}")


def human_bytes(n: int) -> str:
    """1.0 GB, 12.3 MB or 4.5 kB (decimal units, as the sizes the messages compare)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
