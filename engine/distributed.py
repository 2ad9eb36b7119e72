"""Captioning on Ray Data: the input list as a Ray dataset, `map_batches` through an actor class holding one
Engine per replica (continuous batching inside each replica), records written by the driver to the same JSONL
as `pllava caption --output` (one writer: whole lines, resume honoured).

    pllava caption DATA/ --model M --output captions.jsonl --ray [--ray-address ADDR] [--num-replicas N]
    pllava.distributed.caption_dataset(inputs, output, model, ...)

Without an address a local Ray starts (and stops at the end). `ray` is an optional extra: pip install -e ".[ray]".
"""
from __future__ import annotations

import json
import logging
import os
import time

from .captioning import (CaptionSettings, Item, JsonlWriter, Summary, carry, json_line, make_record, plan_output,
                         record_settings)
from .errors import PllavaError

log = logging.getLogger("pllava")
RAY_MISSING = "--ray needs Ray Data, which is not installed: pip install -e \".[ray]\" (or pip install 'ray[data]')"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise PllavaError(RAY_MISSING) from None
    return ray


class CaptionReplica:
    """A Ray Data actor: one Engine, loaded once; each batch of clips goes through generate_many (batched)."""

    def __init__(self, model: str, settings: dict, engine_kw: dict, batch_size: int, threads: int):
        import torch

        from .runtime import Engine

        if threads:
            torch.set_num_threads(threads)  # one actor per CPU share: no oversubscription
        self.engine = Engine.from_pretrained(model, **engine_kw)
        self.settings = CaptionSettings(**settings)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        vids = [str(v) for v in batch["video"]]
        outs = self.engine.generate_many([self.settings.request(v) for v in vids], max_batch_size=self.batch_size,
                                         return_errors=True)
        recs = [json_line(make_record(Item(v), o, self.settings, self.engine))  # valid UTF-8 for Arrow
                for v, o in zip(vids, outs)]
        return {"i": np.asarray(batch["i"]), "record": np.asarray(recs, dtype=object)}


def caption_dataset(inputs, output: str, model: str, *, prompt: str | None = None, max_new_tokens: int = 256,
                    lora_alpha: float | None = None, num_frames: int | None = None, batch_size: int = 8,
                    resume: bool = False, overwrite: bool = False, ray_address: str | None = None,
                    num_replicas: int | None = None, gpus_per_replica: float | None = None, device=None,
                    dtype=None, rows_per_task: int | None = None, conv_mode: str | None = None,
                    quantize: str | None = None, allow_mixed_settings: bool = False) -> Summary:
    """Caption `inputs` into `output` on Ray Data; the same records as the single-process path (greedy text
    identical), extra list fields carried. Returns the summary (interrupted=True after Ctrl-C). Resuming an output
    captioned under other settings is refused unless `allow_mixed_settings` (the driver loads no engine, so the
    checkpoint's own num_frames and template are compared only when given here)."""
    ray = _import_ray()
    from .prompt import default_question

    settings = dict(prompt=prompt or default_question(conv_mode), max_new_tokens=max_new_tokens, lora_alpha=lora_alpha,
                    model=os.path.basename(os.path.normpath(model)))
    expect = None if allow_mixed_settings else record_settings(CaptionSettings(**settings), None, num_frames, conv_mode)
    todo, skipped = plan_output(inputs, output, resume, overwrite, expect)
    summary = Summary(skipped=skipped)
    if not todo:
        return summary
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 logging_level=logging.WARNING)
    writer = JsonlWriter(output)
    warned: set = set()
    t0 = time.perf_counter()
    try:
        res = ray.cluster_resources()
        gpus = gpus_per_replica if gpus_per_replica is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
        if num_replicas is None:
            num_replicas = max(1, int(res.get("GPU", 0) // gpus)) if gpus else 1
        cpus = max(1, int(res.get("CPU", 1) // num_replicas)) if not gpus else 1
        engine_kw = dict(device=device if device is not None else ("cuda" if gpus else "cpu"), dtype=dtype,
                         num_frames=num_frames, lora_alpha=lora_alpha, conv_mode=conv_mode, quantize=quantize)
        per_task = rows_per_task or 4 * batch_size  # a generate_many call per task: the batch drains at its end
        blocks = max(num_replicas, -(-len(todo) // per_task))  # one block a task, so every replica gets work
        ds = ray.data.from_items([{"i": k, "video": it.video} for k, it in enumerate(todo)],
                                 override_num_blocks=min(len(todo), blocks))
        ds = ds.map_batches(CaptionReplica, batch_size=per_task, concurrency=num_replicas, num_gpus=gpus, num_cpus=cpus,
                            fn_constructor_kwargs=dict(model=os.path.abspath(model) if os.path.isdir(model) else model,
                                                       settings=settings, engine_kw=engine_kw,
                                                       batch_size=batch_size, threads=0 if gpus else cpus))
        log.info("pllava caption --ray: %d clips, %d replicas x (%g GPU, %d CPU), %d rows a task", len(todo),
                 num_replicas, gpus, cpus, per_task)
        try:
            for row in ds.iter_rows():
                rec = carry(json.loads(row["record"]), todo[int(row["i"])].extra, warned)
                writer.write(rec)
                summary.count(rec)
        except KeyboardInterrupt:
            summary.interrupted = True
    finally:
        summary.elapsed_s = time.perf_counter() - t0
        writer.close()
        if started:
            ray.shutdown()
    return summary
