"""`pllava caption | chat | demo`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

from .errors import PllavaError


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is none to show."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


_CONV_HELP = ("prompt template or recipe: plain, eval_vcgbench, eval_mvbench, ..., mvbench, vcgbench, videoqabench, "
              "recaption, demo (the *_llavanext ones for ChatML), or raw; see README 'Prompts' (default: plain, or "
              "eval_vcg_llavanext for a ChatML tokenizer)")
_QUANT_HELP = ("int8: weight-only int8 LLM linears, LoRA unmerged at the live alpha; on the CPU with --dtype bfloat16 "
               "(fastest) or float32 (fp32 activations: the most agreement). w8a8 (CPU): int8 as well, and the "
               "prefill's activations quantized per token for int8 x int8 GEMMs (a shorter time to first token, "
               "at some agreement). int4 (CPU and CUDA): int4 LLM linears in groups of 32 (0.6x int8's memory; on the "
               "CPU 1.1-1.5x its decode speed; the least agreement) (default: none)")
_DEVICE_HELP = "torch device, e.g. cuda, cuda:1, cpu (default: $PLLAVA_DEVICE when set, else cuda when present)"
_DTYPE_HELP = "float32 | float16 | bfloat16 (default: the checkpoint's on CUDA, bf16 for fp32 ones; float32 on CPU)"


def _engine_args(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="model directory or hub repo id")
    p.add_argument("--num-frames", type=_positive_int, default=None,
                   help="frames sampled a clip (default: the checkpoint's num_frames, 16 for llava-hf ones)")
    p.add_argument("--lora-alpha", type=_finite_float, default=None, help="LoRA alpha (default 4; 0 = the image LLM)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens generated at most per answer")
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    p.add_argument("--conv-mode", default=None, help=_CONV_HELP)
    p.add_argument("--quantize", choices=["int8", "w8a8", "int4"], default=None, help=_QUANT_HELP)
    p.add_argument("--json", action="store_true", help="one JSON object per video")


def _load(a):
    from .runtime import Engine

    return Engine.from_pretrained(a.model, device=a.device, dtype=a.dtype, num_frames=a.num_frames,
                                  lora_alpha=a.lora_alpha, conv_mode=a.conv_mode, quantize=a.quantize)


def _report(path, out, as_json: bool):
    if as_json:
        print(json.dumps({"video": path, "text": out.text, "num_prompt_tokens": out.num_prompt_tokens,
                          "num_new_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
                          "timings": {k: round(v, 6) for k, v in out.timings.items()}}), flush=True)
    else:
        print(f"{path}: {out.text}", flush=True)


def cmd_caption(a) -> int:
    """Caption inputs (files, URLs, folders, globs, list files) with continuous batching; records to --output
    (JSONL, resumable) or, without it, to stdout."""
    from .captioning import CaptionSettings, caption_to_jsonl, expand_inputs, json_line, make_record
    from .prompt import default_question

    if a.resume and not a.output:
        raise PllavaError("--resume needs --output (the JSONL file to resume)")
    if a.allow_mixed_settings and not a.resume:
        raise PllavaError("--allow-mixed-settings goes with --resume (it says which records count as done)")
    settings = CaptionSettings(a.prompt or default_question(a.conv_mode), a.max_new_tokens, a.lora_alpha,
                               os.path.basename(os.path.normpath(a.model)))
    if a.ray:
        from .distributed import caption_dataset

        if not a.output:
            raise PllavaError("--ray needs --output (the workers' records are written there)")
        summary = caption_dataset(a.inputs, a.output, a.model, prompt=settings.prompt,
                                  max_new_tokens=a.max_new_tokens, lora_alpha=a.lora_alpha, num_frames=a.num_frames,
                                  batch_size=a.batch_size, resume=a.resume, overwrite=a.overwrite,
                                  ray_address=a.ray_address, num_replicas=a.num_replicas,
                                  gpus_per_replica=a.gpus_per_replica, device=a.device, dtype=a.dtype,
                                  conv_mode=a.conv_mode, quantize=a.quantize,
                                  allow_mixed_settings=a.allow_mixed_settings)
        print(summary.line(), file=sys.stderr)
        return 130 if summary.interrupted else (1 if summary.failed else 0)
    items = expand_inputs(a.inputs) if a.output else expand_inputs(a.inputs, dedupe=False)
    eng = _load(a)
    if a.output:
        summary = caption_to_jsonl(eng, items, a.output, settings, batch_size=a.batch_size, resume=a.resume,
                                   overwrite=a.overwrite, progress=sys.stderr.isatty() or a.progress,
                                   decode_workers=a.decode_workers, allow_mixed_settings=a.allow_mixed_settings)
        print(summary.line(), file=sys.stderr)
        return 130 if summary.interrupted else (1 if summary.failed else 0)
    failed = 0
    try:
        outs = eng.generate_iter((settings.request(it.video) for it in items), a.batch_size,
                                 media_workers=a.decode_workers)
        results = dict(outs)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    warned: set = set()
    for i, it in enumerate(items):  # stdout keeps the input order
        out = results[i]
        failed += out.finish_reason == "error"
        if a.json:  # the record --output would write, carried list fields included
            print(json_line(make_record(it, out, settings, eng, warned)), flush=True)
        elif out.finish_reason == "error":
            print(f"{it.video}: ERROR {out.error}", file=sys.stderr, flush=True)
        else:
            _report(it.video, out, False)
    return 1 if failed else 0


def cmd_chat(a) -> int:
    eng = _load(a)
    if a.json:
        _report(a.video, eng.generate(a.video, a.question, max_new_tokens=a.max_new_tokens), True)
        return 0
    for piece in eng.stream(a.video, a.question, max_new_tokens=a.max_new_tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_live(a) -> int:
    from .prompt import default_question
    from .video import DecodeLimits

    eng = _load(a)
    eng.limits = DecodeLimits(timeout_s=a.timeout)
    src = sys.stdin.buffer if a.source == "-" else a.source
    for t, out in eng.live(src, a.prompt or default_question(eng.conv_mode), window_s=a.window, every_s=a.every,
                           growing=a.growing, max_new_tokens=a.max_new_tokens):
        if a.json:
            print(json.dumps({"t": round(t, 3), "text": out.text, "timings": out.timings}), flush=True)
        else:
            print(f"[{t:8.2f} s] {out.text}", flush=True)
    return 0


def cmd_demo(a) -> int:
    from .runtime import Engine
    from .testing import make_tiny_checkpoint, make_video

    print("pllava demo: building a tiny checkpoint with RANDOM weights and a synthetic video; the text below is "
          "noise from random weights, shown to prove the pipeline runs end to end offline.", flush=True)
    with tempfile.TemporaryDirectory(prefix="pllava-demo-") as d:
        model = make_tiny_checkpoint(os.path.join(d, "model"), "pllava")
        video = make_video(os.path.join(d, "clip.mp4"), num_frames=48, size=(128, 96))
        eng = Engine.from_pretrained(model, device=a.device)
        out = eng.generate(video, "Describe the video in details.", max_new_tokens=a.max_new_tokens)
        print(f"model: {model} (layout pllava, LoRA r={eng.config.lora.r}, alpha={eng.lora_alpha})")
        print(f"prompt tokens: {out.num_prompt_tokens}  new tokens: {len(out.token_ids)}  "
              f"finish: {out.finish_reason}")
        print("timings (ms): " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in out.timings.items()
                                            if isinstance(v, float)))
        print(f"text: {out.text!r}")
    return 0


def cmd_bench(a) -> int:
    from .bench import run_bench

    if a.batch:
        from .bench_batch import run_batch_bench

        batches = a.batch
        frames = a.frames or (16,)
        run_batch_bench(a.preset, batches=batches, frames=frames, new_tokens=a.new_tokens, runs=a.runs,
                        device=a.device, dtype=_parse_dtype(a.dtype), baseline=not a.no_baseline, video=a.video,
                        out_dir=a.out, quantize=a.quantize, baseline_dtype=_parse_dtype(a.baseline_dtype))
        return 0
    frames = a.frames or (1, 4, 8, 16, 32, 64)
    run_bench(a.preset, frames=frames, new_tokens=a.new_tokens, runs=a.runs, device=a.device,
              dtype=_parse_dtype(a.dtype), baseline=not a.no_baseline, video=a.video, out_dir=a.out,
              quantize=a.quantize, baseline_dtype=_parse_dtype(a.baseline_dtype))
    return 0


def cmd_serve(a) -> int:
    from .runtime import Engine

    try:
        from .server import ServerConfig, serve
    except ImportError as e:  # part of the base install; missing only in an environment pruned after it
        raise PllavaError(f"pllava serve needs {e.name}, which is not installed (it comes with pllava-engine): "
                          "pip install fastapi starlette uvicorn python-multipart") from None

    # on a CPU from_pretrained loads on a thread that ends: the model runs on the scheduler's thread, which should
    # be the only live one to have run parallel ops (ops.in_fresh_thread)
    eng = Engine.from_pretrained(a.model, device=a.device, dtype=a.dtype, num_frames=a.num_frames,
                                 lora_alpha=a.lora_alpha, conv_mode=a.conv_mode, quantize=a.quantize)
    if a.max_frames < eng.config.num_frames:  # every request that does not ask fewer would be refused
        raise PllavaError(f"--max-frames {a.max_frames} is under the model's num_frames {eng.config.num_frames}: "
                          "raise it, or lower --num-frames")
    cfg = ServerConfig(model_name=a.served_model_name or os.path.basename(os.path.normpath(a.model)),
                       api_key=a.api_key, max_concurrency=a.max_concurrency, max_queue=a.max_queue,
                       max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len, prefill_chunk=a.prefill_chunk,
                       allowed_local_media_path=a.allowed_local_media_path, max_video_bytes=a.max_video_bytes,
                       max_frames=a.max_frames, max_new_tokens_limit=a.max_new_tokens_limit,
                       lora_alpha=eng.lora_alpha,
                       allowed_fetch_hosts=frozenset(h for h in (a.allow_fetch_host or []) if h))
    serve(eng, cfg, a.host, a.port)
    return 0


def _int_list(s: str) -> tuple:
    try:
        v = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return v


def _finite_float(s: str) -> float:
    import math

    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _int_at_least(lo: int):
    """An argparse type: an integer >= lo, else a one-line error naming the bound."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _port(s: str) -> int:
    v = _positive_int(s)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [1, 65535], got {v}")
    return v


def _parse_dtype(s):
    if s is None:
        return None
    from .loading import resolve_dtype

    import torch

    return resolve_dtype(s, torch.device("cpu"), None)


class _SubParser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*a, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pllava", description="PLLaVA video-language inference engine",
                                formatter_class=_Help)
    p.add_argument("-v", "--verbose", action="store_true", help="log which paths run")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_SubParser)
    c = sub.add_parser("caption", help="caption videos, folders, globs or list files (batched; JSONL, resumable)")
    c.add_argument("inputs", nargs="+", help="video files, URLs, folders (recursive), globs, .txt/.jsonl/.csv lists")
    c.add_argument("--prompt", default=None, help="question to ask (default: 'Describe the video in details.', or the recipe's own query "
                   "for --conv-mode recaption)")
    c.add_argument("-o", "--output", default=None, help="JSONL file the records are appended to (default: stdout)")
    c.add_argument("--resume", action="store_true", help="skip inputs that already have a text record in --output")
    c.add_argument("--overwrite", action="store_true", help="empty --output first")
    c.add_argument("--allow-mixed-settings", action="store_true",
                   help="with --resume: skip the clips --output holds even when their records name other settings "
                        "(model, prompt, frames, alpha, max tokens, template) than this run's, instead of refusing")
    c.add_argument("--batch-size", type=_positive_int, default=8, help="requests decoding together")
    c.add_argument("--decode-workers", type=_positive_int, default=4, help="threads decoding clips ahead")
    c.add_argument("--progress", action="store_true", help="a progress bar even when stderr is not a terminal")
    c.add_argument("--ray", action="store_true", help="run on Ray Data (pip install -e '.[ray]')")
    c.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    c.add_argument("--num-replicas", type=_positive_int, default=None, help="engines (actors); default: 1 a GPU")
    c.add_argument("--gpus-per-replica", type=float, default=None, help="default 1 with GPUs, 0 on CPUs")
    _engine_args(c)
    c.set_defaults(func=cmd_caption)
    ch = sub.add_parser("chat", help="ask one question about a video (streams the answer)")
    ch.add_argument("video", help="a video file, URL or image")
    ch.add_argument("question", help="the question, rendered with --conv-mode's template")
    _engine_args(ch)
    ch.set_defaults(func=cmd_chat)
    lv = sub.add_parser("live", help="caption a live source (pipe '-', growing file, rtsp:// or device URL)")
    lv.add_argument("source", help="'-' (stdin), a growing file, or an rtsp:// / device URL")
    lv.add_argument("--prompt", default=None, help="question asked of each window (default: the caption prompt)")
    lv.add_argument("--window", type=float, default=8.0, help="seconds of video each answer looks at")
    lv.add_argument("--every", type=float, default=2.0, help="seconds of stream time between answers")
    lv.add_argument("--growing", action="store_true", help="the source is a file still being written")
    lv.add_argument("--timeout", type=float, default=15.0, help="end after this many silent seconds")
    _engine_args(lv)
    lv.set_defaults(func=cmd_live)
    d = sub.add_parser("demo", help="run the whole pipeline offline on a tiny random checkpoint")
    d.add_argument("--device", default=None, help=_DEVICE_HELP)
    d.add_argument("--max-new-tokens", type=_positive_int, default=24, help="tokens generated at most")
    d.set_defaults(func=cmd_demo)
    sv = sub.add_parser("serve", help="OpenAI-compatible server (chat completions with video_url, captions, a page)")
    sv.add_argument("--model", required=True, help="model directory or hub repo id")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=_port, default=8000, help="port to listen on")
    sv.add_argument("--api-key", default=os.environ.get("PLLAVA_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $PLLAVA_API_KEY, else none)")
    sv.add_argument("--served-model-name", default=None,
                    help="the model id clients send (default: the model directory's name)")
    sv.add_argument("--max-num-seqs", type=_positive_int, default=8,
                    help="requests decoding together in one batch (continuous batching)")
    sv.add_argument("--max-model-len", type=_positive_int, default=None,
                    help="positions of one KV slot (prompt + new tokens); default: the model's context")
    sv.add_argument("--prefill-chunk", type=_positive_int, default=None,
                    help="prefill long prompts this many tokens a step so running streams keep flowing "
                         "(default: a whole prompt in one step)")
    sv.add_argument("--max-concurrency", type=_positive_int, default=None,
                    help="requests past admission (media fetch + batch); default: --max-num-seqs")
    sv.add_argument("--max-queue", type=_nonnegative_int, default=16,
                    help="requests waiting for admission before 503s (0: none wait)")
    sv.add_argument("--allowed-local-media-path", default=None,
                    help="a folder file:// and plain-path media may come from (default: none may)")
    sv.add_argument("--max-video-bytes", type=_positive_int, default=200 << 20,
                    help="largest media a request may send or fetch")
    sv.add_argument("--max-frames", type=_positive_int, default=64,
                    help="most frames a request may ask for (num_frames; at least the model's own)")
    sv.add_argument("--max-new-tokens-limit", type=_positive_int, default=1024, help="most max_tokens a request may ask")
    sv.add_argument("--allow-fetch-host", action="append",
                    help="host:port an operator trusts for internal media, repeatable (default: none)")
    sv.add_argument("--lora-alpha", type=_finite_float, default=None,
                    help="requests' default LoRA alpha (default 4; a request's lora_alpha overrides it)")
    sv.add_argument("--num-frames", type=_positive_int, default=None,
                    help="frames sampled a clip (default: the checkpoint's num_frames)")
    sv.add_argument("--device", default=None, help=_DEVICE_HELP)
    sv.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    sv.add_argument("--conv-mode", default=None, help=_CONV_HELP)
    sv.add_argument("--quantize", choices=["int8", "w8a8", "int4"], default=None, help=_QUANT_HELP)
    sv.set_defaults(func=cmd_serve)
    b = sub.add_parser("bench", help="throughput per frame count and latency breakdown vs transformers")
    b.add_argument("--preset", default="small", help="small | pllava-7b | pllava-13b | pllava-34b")
    b.add_argument("--frames", type=_int_list, default=None, help="frame counts (default 1,4,8,16,32,64; with --batch: 16)")
    b.add_argument("--batch", type=_int_list, default=None,
                   help="batch sizes, e.g. 1,2,4,8,16: throughput per batch size (continuous batching vs sequential "
                        "vs transformers batched; default: the frame-count sweep instead)")
    b.add_argument("--new-tokens", type=_positive_int, default=64, help="tokens generated per run")
    b.add_argument("--runs", type=_positive_int, default=3, help="runs per point; the table shows medians")
    b.add_argument("--device", default=None, help=_DEVICE_HELP)
    b.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    b.add_argument("--video", default=None, help="clip for the decode stage (default: a cached 720p30 clip)")
    b.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    b.add_argument("--quantize", choices=["int8", "w8a8", "int4"], default=None,
                   help="the engine with int8 LLM linears (the fast CPU mode: --dtype bfloat16, or float32; w8a8: the "
                        "prefill's activations in int8 too; int4: int4 linears); the baseline "
                        "then runs in float32 unless --baseline-dtype says otherwise (default: none)")
    b.add_argument("--baseline-dtype", default=None, help="transformers' dtype (default: the engine's)")
    b.add_argument("--out", default="benchmarks/results", help="JSON and PNG plots go here")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return a.func(a)
    except PllavaError as e:
        print(f"pllava: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run that handles it itself (loading, say): no traceback
        print("pllava: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
