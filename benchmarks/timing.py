"""One timing rule for the op benchmarks: every candidate timed once a rep, the candidates interleaved rep by rep
(a noisy shared machine drifts; interleaving puts the drift on every candidate alike), the median of the reps."""
import statistics
import time


def interleaved_medians(runs: dict, reps: int) -> dict:
    """runs: {name: fn()}. One warm-up call each, then `reps` rounds of one timed call each -> {name: median ms}."""
    for f in runs.values():
        f()
    t = {k: [] for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            a = time.perf_counter()
            f()
            t[k].append(time.perf_counter() - a)
    return {k: statistics.median(v) * 1e3 for k, v in t.items()}
