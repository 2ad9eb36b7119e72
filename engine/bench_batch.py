"""Throughput per batch size: continuous batching against our engine run sequentially and against transformers'
batched generate(), in the same run (`pllava bench --batch 1,2,4,8,16`).

For each frame count and batch size B, B requests on the same clip (prefix cache off: each pays for its video):
- pllava-engine batched: the scheduler with max_num_seqs = B (what generate_many and the server run);
- pllava-engine sequential: one generate() at a time (measured `runs` times on one request; B of them cost B
  times that, so its clips/s does not depend on B);
- transformers: LlavaForConditionalGeneration.generate() on a batch of B (left padding; same prompt and tokens),
  each clip read with load_video and CLIPImageProcessor.
Per row: clips/s, generated tokens/s, time to first token p50/p99 over the requests (from submission), and
inter-token latency p50/p99 (between consecutive tokens of a request; transformers: the mean step, every token
of a batch arrives at once).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .bench import (PROMPT, Clock, bench_setup, device_name, load_baseline, provenance, pyplot, run_mode, say,
                    warn_runs)

log = logging.getLogger("pllava")


@dataclass
class BatchRow:
    system: str
    frames: int
    batch: int
    clips_per_s: float
    tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    wall_s: float


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def _row(system, frames, batch, walls, ttfts, itls, tokens):
    wall = float(np.median(walls))
    return BatchRow(system, frames, batch, batch / wall, tokens / wall, _pct(ttfts, 50), _pct(ttfts, 99),
                    _pct(itls, 50), _pct(itls, 99), wall)


def bench_engine_batched(engine, video, frames, batch, new_tokens, runs) -> BatchRow:
    from .sequence import Request

    sched = engine.scheduler(max_num_seqs=batch, max_seq_len=_slot_len(engine, new_tokens))
    walls, ttfts, itls = [], [], []
    clock = engine._clock
    try:
        for run in range(runs + 1):  # the first is a warm-up at this shape
            stamps: dict[int, list[float]] = {}

            def on_event(s, _ev, stamps=stamps):
                stamps.setdefault(s.index, []).append(time.perf_counter())

            seqs = [sched.make_sequence(Request(video=video, prompt=PROMPT, max_new_tokens=new_tokens), i, on_event)
                    for i in range(batch)]
            t0 = clock()
            sched.run(seqs)
            wall = clock() - t0
            if any(s.error is not None for s in seqs):
                raise next(s.error for s in seqs if s.error is not None)
            if run == 0:
                continue
            walls.append(wall)
            ttfts += [s.output.timings["ttft"] for s in seqs]
            for ts in stamps.values():
                itls += list(np.diff(ts))
    finally:
        sched.stop()
        engine._sched = None
    return _row("pllava-engine batched", frames, batch, walls, ttfts, itls, batch * new_tokens)


def _slot_len(engine, new_tokens):
    ctx = engine.config.text.max_position_embeddings
    n = engine.config.num_visual_tokens + 64 + new_tokens
    return min(ctx, -(-n // 256) * 256)


def bench_engine_sequential(engine, video, frames, new_tokens, runs) -> tuple[float, float, list, list]:
    """(seconds per request, [ttft], [itl]) of one generate() at a time."""
    from .generate import SamplingParams

    engine.generate(video, PROMPT, max_new_tokens=4)
    walls, ttfts, itls = [], [], []
    for _ in range(runs):
        stamps = []
        t0 = engine._clock()
        timings: dict = {}
        # generate()'s own loop, one event per token (stream() yields text, and random weights may give none)
        for _ev in engine._run(video, PROMPT, SamplingParams(new_tokens), None, None, timings):
            stamps.append(time.perf_counter())
        walls.append(engine._clock() - t0)
        ttfts.append(timings["ttft"])
        itls += list(np.diff(stamps))
    return float(np.median(walls)), walls, ttfts, itls


def bench_baseline_batched(bl, video, frames, batch, new_tokens, runs, device) -> BatchRow:
    from transformers.video_utils import load_video

    from .prompt import build_prompt

    m, tok, proc = bl
    m.model.multi_modal_projector.pooling_shape = (frames, 12, 12)
    clock = Clock(torch.device(device))
    text = build_prompt(PROMPT, "plain").replace("<image>", "<image>" * (frames * 144))
    tok.padding_side = "left"  # decoder-only batching: every row's last token at the same column
    enc = tok([text] * batch, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    kw = dict(do_sample=False, min_new_tokens=0, pad_token_id=tok.pad_token_id)

    def once(n):
        """-> (seconds reading + preprocessing the B clips, seconds in generate(), new tokens)"""
        t0 = clock()
        px = [proc(images=list(load_video(video, num_frames=frames, backend="pyav")[0]),
                   return_tensors="pt")["pixel_values"] for _ in range(batch)]
        px = torch.cat(px).to(device, m.dtype)  # (B * frames, 3, S, S): one "image" of frames per request
        t1 = clock()
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=n, **kw)
        return t1 - t0, clock() - t1, out.shape[1] - ids.shape[1]

    once(2)
    walls, ttfts, itls = [], [], []
    for _ in range(runs):
        _, g1, _ = once(1)
        media, gn, n = once(new_tokens)
        walls.append(media + gn)
        ttfts += [media + g1] * batch  # every request's first token arrives with the batch's
        itls += [(gn - g1) / max(1, n - 1)] * batch
    return _row("transformers batched", frames, batch, walls, ttfts, itls, batch * new_tokens)


class _BatchedPooledProjector(torch.nn.Module):
    """HF's projector, then PLLaVA's pooling per request: (B*T, g*g, c) -> (B, T'h'w', d)."""

    def __init__(self, proj, grid: int):
        super().__init__()
        self.proj, self.grid, self.pooling_shape = proj, grid, (16, 12, 12)

    def forward(self, feats):
        h = self.proj(feats)
        t_all, _, d = h.shape
        t = self.pooling_shape[0]
        v = h.reshape(t_all // t, t, self.grid, self.grid, d).permute(0, 4, 1, 2, 3)
        v = torch.nn.functional.adaptive_avg_pool3d(v, self.pooling_shape)
        return v.permute(0, 2, 3, 4, 1).reshape(t_all // t, -1, d)


def table(rows: list[BatchRow]) -> str:
    out = ["| system | frames | batch | clips/s | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
           " wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.system} | {r.frames} | {r.batch} | {r.clips_per_s:.3f} | {r.tokens_per_s:.1f} | "
                   f"{r.ttft_p50 * 1e3:.0f} | {r.ttft_p99 * 1e3:.0f} | {r.itl_p50 * 1e3:.1f} | "
                   f"{r.itl_p99 * 1e3:.1f} | {r.wall_s:.2f} |")
    by = {(r.system, r.frames, r.batch): r for r in rows}
    out += ["", "Speed-up of batched pllava-engine (tokens/s ratio; > 1 = faster):", "",
            "| frames | batch | vs engine sequential | vs transformers batched |", "|---:|---:|---:|---:|"]
    for r in rows:
        if r.system != "pllava-engine batched":
            continue
        seq = by.get(("pllava-engine sequential", r.frames, r.batch))
        hf = by.get(("transformers batched", r.frames, r.batch))
        f = (lambda o: f"{r.tokens_per_s / o.tokens_per_s:.2f}" if o else "-")
        out.append(f"| {r.frames} | {r.batch} | {f(seq)} | {f(hf)} |")
    return "\n".join(out)


def plot(rows: list[BatchRow], path: str, title: str) -> str:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(r.system for r in rows):
        for f in sorted({r.frames for r in rows}):
            pts = sorted((r.batch, r.tokens_per_s) for r in rows if r.system == system and r.frames == f)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{system}, {f} frames")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (requests at once)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_batch_bench(preset: str = "small", batches=(1, 2, 4, 8, 16), frames=(16,), new_tokens: int = 64,
                    runs: int = 3, device=None, dtype=None, baseline: bool = True, video: str | None = None,
                    out_dir: str = "benchmarks/results", quantize: str | None = None,
                    baseline_dtype=None) -> dict:
    """Run the sweep; print and return {'rows', 'table', 'json', 'plot'}. `quantize` and `baseline_dtype` as in
    bench.run_bench (the fast CPU mode against transformers in fp32 by default)."""
    pyplot()  # fail before the measurements, not after them
    warn_runs(runs)
    device, dt, base, adapter, video, engine = bench_setup(preset, device, dtype, video, out_dir, quantize)
    bdt = baseline_dtype or (torch.float32 if quantize else dt)
    rows: list[BatchRow] = []
    for f in frames:
        engine.set_frames(f, (f, 12, 12))
        say(f"pllava-engine sequential, {f} frames, {runs} runs")
        per, walls, ttfts, itls = bench_engine_sequential(engine, video, f, new_tokens, runs)
        for b in batches:
            say(f"pllava-engine batched, {f} frames, batch {b}, {runs} runs")
            rows.append(BatchRow("pllava-engine sequential", f, b, 1 / per, new_tokens / per, _pct(ttfts, 50),
                                 _pct(ttfts, 99), _pct(itls, 50), _pct(itls, 99), per * b))
            rows.append(bench_engine_batched(engine, video, f, b, new_tokens, runs))
            log.info("engine %d frames batch %d: %s", f, b, rows[-1])
    del engine
    if baseline:
        say(f"loading the transformers baseline ({str(bdt).split('.')[-1]})")
        bl = load_baseline(base, adapter, device, bdt)
        grid = bl[0].config.vision_config.image_size // bl[0].config.vision_config.patch_size
        bl[0].model.multi_modal_projector = _BatchedPooledProjector(bl[0].model.multi_modal_projector.proj, grid)
        for f in frames:
            for b in batches:
                say(f"transformers batched, {f} frames, batch {b}, {runs} runs")
                rows.append(bench_baseline_batched(bl, video, f, b, new_tokens, runs, device))
                log.info("transformers %d frames batch %d: %s", f, b, rows[-1])
        del bl
    order = {"pllava-engine batched": 0, "pllava-engine sequential": 1, "transformers batched": 2}
    rows.sort(key=lambda r: (r.frames, order[r.system], r.batch))
    name = device_name(device)
    title = f"{preset}, {name}, {run_mode(dt, quantize, bdt, baseline)}, {new_tokens} new tokens, batch sweep"
    tbl = table(rows)
    js = os.path.join(out_dir, f"bench_batch_{preset}.json")
    with open(js, "w") as fh:
        json.dump({"preset": preset, "device": name, **provenance(), "dtype": str(dt), "quantize": quantize,
                   "baseline_dtype": str(bdt), "new_tokens": new_tokens, "runs": runs,
                   "rows": [asdict(r) for r in rows]}, fh, indent=1)
    png = plot(rows, os.path.join(out_dir, f"batch_throughput_{preset}.png"), title)
    print(f"\n### {title}\n\n{tbl}\n")
    say(f"wrote {js}, {png}")
    return {"rows": rows, "table": tbl, "json": js, "plot": png}
