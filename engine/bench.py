"""Throughput per frame count and a latency breakdown, the engine against HF transformers in the same run.

`pllava bench --preset small --frames 1,4,16` (CLI) and benchmarks/bench_e2e.py call `run_bench`. Presets have
the real shapes and random, seeded weights (performance does not depend on values), written once to a cache
directory: a base checkpoint in transformers' layout, which the baseline loads with from_pretrained, plus a
PEFT adapter (r = 128 on q/v), which the engine runs unmerged at alpha 4. The baseline gets the LoRA merged into
its weights (the cheaper form), so ratios are conservative. The EOS row of lm_head is zeroed so every run
generates exactly the asked number of tokens. The presets' context is raised to 16384 so 64 frames x 144 tokens
fit (real PLLaVA-7B has 4096).

Baseline: LlavaForConditionalGeneration with PLLaVA's pooling after its projector, transformers' load_video
(PyAV) and CLIPImageProcessor, generate() with the same prompt and max_new_tokens.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import ops
from .errors import ConfigError
from .loading import resolve_device
from .memory import human_bytes

log = logging.getLogger("pllava")
STAGES = ("decode", "preprocess", "vision", "projector", "prefill", "ttft", "decode_tok_s", "e2e")
PROMPT = "Describe the video in details."
BENCH_CONTEXT = 16384


def cache_dir() -> str:
    return os.environ.get("PLLAVA_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pllava-bench"))


def _fill(shape, seed: int, std: float, dtype, device):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)


SHARD_BYTES = 4 << 30  # a preset checkpoint's shard: what its writer holds in memory at once


def _preset_specs(cfg: dict) -> dict:
    """key (transformers' current layout) -> (shape, seed, std, kind) of every tensor of a preset checkpoint:
    our own model's parameters built on meta, seeded 1, 2, ... in their order, then the tensors real checkpoints
    hold past vision_feature_layer (the last vision layer, a copy of layer 0; post_layernorm: seed 0, ones /
    zeros). kind: "normal" (seeded N(0, std)), "norm" (1 + seeded N(0, 0.05)), "ones", "zeros"."""
    from .config import parse_config
    from .model import PllavaModel

    with torch.device("meta"):
        net = PllavaModel(parse_config(cfg))
    specs = {}
    for seed, (name, p) in enumerate(net.named_parameters(), 1):
        if name.startswith("vision_tower."):
            key = "model.vision_tower.vision_model." + name[len("vision_tower."):]
        elif name.startswith("multi_modal_projector."):
            key = "model." + name
        elif name == "language_model.lm_head.weight":
            key = "lm_head.weight"
        else:
            key = "model.language_model." + name[len("language_model."):]
        is_norm = p.dim() == 1 and name.endswith("weight") and ("norm" in name or "layrnorm" in name)
        specs[key] = (tuple(p.shape), seed, 0.02 if p.dim() > 1 else 0.01, "norm" if is_norm else "normal")
    vc = cfg["vision_config"]
    last = vc["num_hidden_layers"] - 1
    for key in [k for k in specs if ".encoder.layers.0." in k]:
        specs[key.replace(".layers.0.", f".layers.{last}.")] = specs[key]
    d = (vc["hidden_size"],)
    specs["model.vision_tower.vision_model.post_layernorm.weight"] = (d, 0, 0.0, "ones")
    specs["model.vision_tower.vision_model.post_layernorm.bias"] = (d, 0, 0.0, "zeros")
    return specs


def _preset_tensor(key: str, spec, dtype, device) -> torch.Tensor:
    shape, seed, std, kind = spec
    if kind in ("ones", "zeros"):
        return (torch.ones if kind == "ones" else torch.zeros)(shape, dtype=dtype)
    t = (torch.ones(shape, dtype=dtype) + _fill(shape, seed, 0.05, dtype, device).cpu() if kind == "norm"
         else _fill(shape, seed, std, dtype, device).cpu())
    if key == "lm_head.weight":
        t[2].zero_()  # EOS never wins: every run generates the asked number of tokens
    return t


def _write_preset_shards(specs: dict, base: str, dtype, device):
    """The checkpoint's shards, one at a time: each shard's tensors are made, saved and dropped before the next
    (pllava-7b in fp32 is 28 GB: held whole, it was OOM-killed at 24 GB on a 24 GB machine). Keys go round-robin
    over the sorted keys into total // SHARD_BYTES + 1 shards, with the index transformers reads."""
    from safetensors.torch import save_file

    elem = torch.empty((), dtype=dtype).element_size()
    size = {k: int(np.prod(v[0])) * elem for k, v in specs.items()}
    total = sum(size.values())
    old = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base)  # an interrupted write's shards
              if f.startswith("model") and f.endswith(".safetensors"))
    free = shutil.disk_usage(base).free
    if total > free + old:  # not a full disk with half a checkpoint on it, 28 GB in (pllava-7b in fp32)
        raise ConfigError(f"writing the preset's weights needs {human_bytes(total)} in {base}, but "
                          f"{human_bytes(free + old)} is free there; point PLLAVA_BENCH_CACHE at a roomier "
                          "directory")
    shards = max(1, total // SHARD_BYTES + 1)
    keys = sorted(specs)
    wm, done = {}, 0
    for n in range(shards):
        part = keys[n::shards]
        fn = "model.safetensors" if shards == 1 else f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {k: _preset_tensor(k, specs[k], dtype, device) for k in part}
        save_file(tensors, os.path.join(base, fn), metadata={"format": "pt"})
        del tensors
        wm.update({k: fn for k in part})
        done += len(part)
        say(f"  weights {100 * done // len(keys)}% (shard {n + 1} of {shards})")
    if shards > 1:
        with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=1)


def make_preset_checkpoint(preset: str, root: str | None = None, dtype=torch.bfloat16, lora_r: int = 128,
                           device: str = "cpu") -> tuple[str, str]:
    """Write (once) the preset's base checkpoint and LoRA adapter; return (base_dir, adapter_dir)."""
    from .config import PRESETS
    from .testing import make_tokenizer

    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    base = os.path.join(root or cache_dir(), f"{preset}-{str(dtype).split('.')[-1]}")
    adir = os.path.join(base, "adapter")
    if os.path.exists(os.path.join(base, "DONE")):
        return base, adir
    say(f"writing the {preset} preset's seeded random weights to {base} (once; later runs reuse them)")
    t_build = time.perf_counter()
    os.makedirs(adir, exist_ok=True)
    tok = make_tokenizer(base)
    cfg = json.loads(json.dumps(PRESETS[preset]))
    cfg["text_config"]["max_position_embeddings"] = BENCH_CONTEXT
    cfg.update(image_token_index=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
               vocab_size=cfg["text_config"]["vocab_size"], torch_dtype=str(dtype).split(".")[-1],
               architectures=["LlavaForConditionalGeneration"], projector_hidden_act="gelu",
               vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg["text_config"].update(bos_token_id=1, eos_token_id=2, pad_token_id=tok.pad_token_id)
    g = cfg["vision_config"]["image_size"]
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    from .preprocess import clip_defaults

    with open(os.path.join(base, "preprocessor_config.json"), "w") as f:
        json.dump(dict(clip_defaults(g), image_processor_type="CLIPImageProcessor"), f)
    specs = _preset_specs(cfg)
    _write_preset_shards(specs, base, dtype, device)
    seed = max(spec[1] for spec in specs.values())  # the adapter's seeds follow the parameters'
    from safetensors.torch import save_file

    tc = cfg["text_config"]
    heads, hd = tc["num_attention_heads"], tc["hidden_size"] // tc["num_attention_heads"]
    kv = tc.get("num_key_value_heads", heads)
    ad = {}
    for i in range(tc["num_hidden_layers"]):
        for proj, out in (("q_proj", heads * hd), ("v_proj", kv * hd)):
            seed += 2
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}."
            ad[p + "lora_A.weight"] = _fill((lora_r, tc["hidden_size"]), seed, 0.02, dtype, device).cpu()
            ad[p + "lora_B.weight"] = _fill((out, lora_r), seed + 1, 0.02, dtype, device).cpu()
    save_file(ad, os.path.join(adir, "adapter_model.safetensors"))
    with open(os.path.join(adir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": lora_r, "lora_alpha": 4.0, "target_modules": ["q_proj", "v_proj"],
                   "base_model_name_or_path": os.path.abspath(base)}, f)
    open(os.path.join(base, "DONE"), "w").close()
    say(f"  weights written in {time.perf_counter() - t_build:.0f} s")
    return base, adir


def bench_video(root: str | None = None, seconds: int = 10, size=(1280, 720), fps: int = 30) -> str:
    """A cached 720p30 h264 clip (1 s GOP) for the decode stage."""
    from .testing import make_video

    path = os.path.join(root or cache_dir(), f"clip_{size[0]}x{size[1]}_{seconds}s.mp4")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        make_video(path + ".part.mp4", num_frames=seconds * fps, size=size, fps=fps, codec="libx264", gop=fps)
        os.replace(path + ".part.mp4", path)
    return path


# ---------------------------------------------------------------------------------------------- measurement
class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def reset_peak_rss():
    try:  # Linux: writing 5 resets VmHWM, the peak resident set size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@dataclass
class Row:
    system: str
    frames: int
    visual_tokens: int
    stages: dict = field(default_factory=dict)  # seconds (decode_tok_s: tokens/s)
    frames_per_s: float = 0.0
    peak_host_mb: float = 0.0
    peak_cuda_mb: float = 0.0


def _median(xs):
    return float(np.median(xs))


def bench_engine(engine, video: str, frames: int, new_tokens: int, runs: int) -> Row:
    engine.set_frames(frames, (frames, 12, 12))
    engine.generate(video, PROMPT, max_new_tokens=4)  # warm-up at this shape
    rec = {k: [] for k in STAGES}
    reset_peak_rss()
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(runs):
        out = engine.generate(video, PROMPT, max_new_tokens=new_tokens)
        tm = out.timings
        n_dec = len(out.token_ids) - 1
        rec["decode"].append(tm.get("video_decode", 0.0))
        rec["preprocess"].append(tm.get("preprocess", 0.0))
        rec["vision"].append(tm.get("vision", 0.0))
        rec["projector"].append(tm.get("projector", 0.0))
        rec["prefill"].append(tm["prefill"])
        rec["ttft"].append(tm["ttft"])
        rec["decode_tok_s"].append(n_dec / tm["decode"] if n_dec > 0 and tm["decode"] > 0 else float("nan"))
        rec["e2e"].append(tm["total"])
    st = {k: _median(v) for k, v in rec.items()}
    row = Row("pllava-engine", frames, frames * 144, st, frames / st["e2e"], peak_rss_mb())
    if engine.device.type == "cuda":
        row.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20
    return row


class _PooledProjector(torch.nn.Module):
    """HF's projector followed by PLLaVA's AdaptiveAvgPool3d, returning one image of T'·h'·w' tokens."""

    def __init__(self, proj, grid: int):
        super().__init__()
        self.proj, self.grid, self.pooling_shape = proj, grid, (16, 12, 12)

    def forward(self, feats):  # (T, g*g, c)
        h = self.proj(feats)
        t, _, d = h.shape
        v = h.reshape(t, self.grid, self.grid, d).permute(3, 0, 1, 2).unsqueeze(0)
        v = torch.nn.functional.adaptive_avg_pool3d(v, self.pooling_shape)
        return v[0].permute(1, 2, 3, 0).reshape(1, -1, d)


def load_baseline(base_dir: str, adapter_dir: str, device, dtype, alpha: float = 4.0):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    ad = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    with torch.no_grad():
        for k, a in ad.items():
            if ".lora_A." not in k:
                continue
            b = ad[k.replace("lora_A", "lora_B")]
            layer, proj = int(k.split(".layers.")[1].split(".")[0]), k.split(".self_attn.")[1].split(".")[0]
            lin = getattr(m.model.language_model.layers[layer].self_attn, proj)
            lin.weight += (alpha / a.shape[0] * (b.float() @ a.float())).to(lin.weight.dtype).to(device)
    grid = m.config.vision_config.image_size // m.config.vision_config.patch_size
    m.model.multi_modal_projector = _PooledProjector(m.model.multi_modal_projector, grid)
    return m, AutoTokenizer.from_pretrained(base_dir), CLIPImageProcessor.from_pretrained(base_dir)


def bench_baseline(bl, video: str, frames: int, new_tokens: int, runs: int, device) -> Row:
    from transformers.video_utils import load_video

    from .prompt import build_prompt

    m, tok, proc = bl
    m.model.multi_modal_projector.pooling_shape = (frames, 12, 12)
    clock = Clock(torch.device(device))
    n_vis = frames * 144
    text = build_prompt(PROMPT, "plain").replace("<image>", "<image>" * n_vis)
    ids = tok(text, return_tensors="pt")["input_ids"].to(device)
    spans = {}

    def timer(name):
        def pre(_m, _a):
            spans[name + "_t0"] = clock()

        def post(_m, _a, _o):
            spans[name] = clock() - spans[name + "_t0"]
        return pre, post

    hooks = []
    for name, mod in (("vision", m.model.vision_tower), ("projector", m.model.multi_modal_projector)):
        pre, post = timer(name)
        hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    rec = {k: [] for k in STAGES}
    gen_kw = dict(do_sample=False, min_new_tokens=0, pad_token_id=tok.pad_token_id)

    class Stamps:  # a transformers streamer that only notes when each put() comes: the prompt, then each token
        def __init__(self):
            self.t = []

        def put(self, _value):
            self.t.append(clock())

        def end(self):
            pass

    def once(n):
        t0 = clock()
        vid, _meta = load_video(video, num_frames=frames, backend="pyav")
        t1 = clock()
        px = proc(images=list(vid), return_tensors="pt")["pixel_values"].to(device, m.dtype)
        t2 = clock()
        stamps = Stamps()
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                             max_new_tokens=n, streamer=stamps, **gen_kw)
        t3 = clock()
        n_new = out.shape[1] - ids.shape[1]
        # token decode: from the first new token to the last, inside this one call (a difference of two calls'
        # totals went negative under noise at a few tokens)
        dec_s = stamps.t[-1] - stamps.t[1] if n_new > 1 and len(stamps.t) == n_new + 1 else float("nan")
        return t1 - t0, t2 - t1, t3 - t2, n_new, dec_s

    try:
        once(2)  # warm-up
        reset_peak_rss()
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(runs):
            dec, pre, gen1, _, _ = once(1)
            vis, proj = spans["vision"], spans["projector"]
            _, _, gen_n, n, dec_s = once(new_tokens)
            rec["decode"].append(dec)
            rec["preprocess"].append(pre)
            rec["vision"].append(vis)
            rec["projector"].append(proj)
            rec["prefill"].append(gen1 - vis - proj)
            rec["ttft"].append(dec + pre + gen1)
            rec["decode_tok_s"].append((n - 1) / dec_s if dec_s > 0 else float("nan"))
            rec["e2e"].append(dec + pre + gen_n)
    finally:
        for h in hooks:
            h.remove()
    st = {k: _median(v) for k, v in rec.items()}
    row = Row("transformers", frames, n_vis, st, frames / st["e2e"], peak_rss_mb())
    if torch.device(device).type == "cuda":
        row.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20
    return row


# ---------------------------------------------------------------------------------------------- reporting
STAGE_LABELS = {"decode": "video decode ms", "preprocess": "preprocess ms", "vision": "vision ms",
                "projector": "pool-projector ms", "prefill": "prefill ms", "ttft": "TTFT ms",
                "decode_tok_s": "token decode tok/s", "e2e": "end-to-end ms"}


def say(msg: str):
    """Progress on stderr as the bench goes (the table itself goes to stdout)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def warn_runs(runs: int):
    if runs < 3:
        say(f"warning: --runs {runs}: a median of fewer than 3 runs is noisy (a shared machine varies run to run); "
            "use --runs 3 or more for numbers to quote")


def table(rows: list[Row]) -> str:
    def fmt(k, v):
        return f"{v:.1f}" if k == "decode_tok_s" else f"{v * 1000:.1f}"

    head = ("| system | frames | visual tokens | " + " | ".join(STAGE_LABELS[k] for k in STAGES)
            + " | frames/s | peak host MB | peak CUDA MB |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r.system} | {r.frames} | {r.visual_tokens} | "
                     + " | ".join(fmt(k, r.stages[k]) for k in STAGES)
                     + f" | {r.frames_per_s:.2f} | {r.peak_host_mb:.0f} | {r.peak_cuda_mb:.0f} |")
    eng = {r.frames: r for r in rows if r.system == "pllava-engine"}
    base = {r.frames: r for r in rows if r.system == "transformers"}
    common = sorted(set(eng) & set(base))
    if common:
        lines += ["", "ratio engine / transformers (times; for token decode tok/s: transformers / engine; < 1 = "
                  "engine faster):", "", "| frames | " + " | ".join(STAGE_LABELS[k].rsplit(" ", 1)[0] for k in STAGES)
                  + " |", "|" + "---|" * (len(STAGES) + 1)]
        for f in common:
            e, b = eng[f].stages, base[f].stages
            cells = []
            for k in STAGES:
                num, den = (b[k], e[k]) if k == "decode_tok_s" else (e[k], b[k])
                cells.append(f"{num / den:.2f}" if den and den == den and num == num else "-")
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error naming the extra (checked before a run starts)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("pllava bench draws its plots with matplotlib, which is not installed (it comes with "
                          "pllava-engine): pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(rows: list[Row], out_dir: str, title: str) -> list[str]:
    plt = pyplot()

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for system in ("pllava-engine", "transformers"):
        rs = sorted((r for r in rows if r.system == system), key=lambda r: r.frames)
        if rs:
            ax.plot([r.frames for r in rs], [r.frames_per_s for r in rs], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("frames per request (pooling T' = T, 12x12)")
    ax.set_ylabel("frames / s, end to end")
    ax.set_title(f"throughput per frame count\n{title}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    p = os.path.join(out_dir, "throughput_vs_frames.png")
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    at = [r for r in rows if r.frames == 16] or [r for r in rows if r.frames == max(x.frames for x in rows)]
    fig, ax = plt.subplots(figsize=(6, 4))
    parts = ("decode", "preprocess", "vision", "projector", "prefill", "generation")
    for i, r in enumerate(at):
        gen = max(r.stages["e2e"] - sum(r.stages[k] for k in parts[:-1]), 0.0)
        vals = [r.stages[k] for k in parts[:-1]] + [gen]
        bottom = 0.0
        for k, v in zip(parts, vals):
            ax.bar(i, v * 1000, bottom=bottom, label=k if i == 0 else None,
                   color=plt.cm.tab10(parts.index(k)))
            bottom += v * 1000
    ax.set_xticks(range(len(at)), [r.system for r in at])
    ax.set_ylabel("ms")
    ax.set_title(f"latency breakdown at {at[0].frames} frames\n{title}" if at else "", fontsize=9)
    ax.legend(fontsize=8)
    p = os.path.join(out_dir, "latency_breakdown.png")
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def bench_setup(preset, device, dtype, video, out_dir, quantize=None):
    """-> (device, dtype, base_dir, adapter_dir, video, engine): the preset's checkpoint (written once), the clip,
    and an engine with the prefix cache off (every run pays for its video: the same clip repeats)."""
    from .runtime import Engine

    device = resolve_device(device)
    dt = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    base, adapter = make_preset_checkpoint(preset, dtype=dt, device="cuda" if device.type == "cuda" else "cpu")
    if video is None:
        say("preparing the benchmark clip")
        video = bench_video()
    os.makedirs(out_dir, exist_ok=True)
    say(f"loading pllava-engine ({preset}, {device}, {str(dt).split('.')[-1]}{', ' + quantize if quantize else ''})")
    engine = Engine.from_pretrained(adapter, device=device, dtype=dt, quantize=quantize)
    engine.prefix_cache = False
    return device, dt, base, adapter, video, engine


# the CPU features a CPU number depends on: the GEMV's AVX-512, bf16 GEMMs (avx512_bf16; AMX tiles in oneDNN)
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'<model name>, N cores, <flags of _CPU_FLAGS it has>': sessions land on different CPUs (a Zen4 without
    AMX, a Xeon with it), and a CPU figure means little without saying which."""
    model, flags = ops.cpu_info(cpuinfo)
    if not model and not flags:  # no /proc (macOS): the platform's own name
        import platform

        model = platform.processor()
    have = [f for f in _CPU_FLAGS if f in flags]
    return f"CPU {model or 'unknown'}, {os.cpu_count()} cores" + (f", {' '.join(have)}" if have else "")


def provenance() -> dict:
    """What a recorded figure was measured with: versions, and the source's commit where the package runs from a
    git checkout (an editable install), '+dirty' when it has uncommitted changes."""
    import subprocess

    import transformers

    here = os.path.dirname(os.path.abspath(__file__))
    commit = None
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            commit = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):  # no git here: the versions alone
        pass
    return {"torch": torch.__version__, "transformers": transformers.__version__, "commit": commit,
            "threads": torch.get_num_threads()}


def run_mode(dt, quantize, bdt, baseline: bool) -> str:
    """A sweep's mode for its title: 'bfloat16+int8', or 'engine bfloat16+int8, transformers float32' where a
    baseline ran in another dtype."""
    mode = str(dt).split('.')[-1] + (f"+{quantize}" if quantize else "")
    if baseline and (quantize or bdt != dt):
        mode = f"engine {mode}, transformers {str(bdt).split('.')[-1]}"
    return mode


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def run_bench(preset: str = "small", frames=(1, 4, 8, 16, 32, 64), new_tokens: int = 64, runs: int = 3,
              device=None, dtype=None, baseline: bool = True, video: str | None = None,
              out_dir: str = "benchmarks/results", quantize: str | None = None, baseline_dtype=None) -> dict:
    """Run the sweep; print and return {'rows', 'table', 'json', 'plots'}. `quantize` ('int8') loads the engine
    with int8 LLM linears; `baseline_dtype` runs transformers in another dtype (default: the engine's; float32
    when quantizing, the yardstick of the fast CPU mode)."""
    pyplot()  # fail before the measurements, not after them
    warn_runs(runs)
    device, dt, base, adapter, video, engine = bench_setup(preset, device, dtype, video, out_dir, quantize)
    bdt = baseline_dtype or (torch.float32 if quantize else dt)
    rows = []
    for f in frames:
        say(f"pllava-engine, {f} frames, {runs} runs")
        rows.append(bench_engine(engine, video, f, new_tokens, runs))
        log.info("engine %d frames: %s", f, rows[-1].stages)
    del engine
    if baseline:
        say(f"loading the transformers baseline ({str(bdt).split('.')[-1]})")
        bl = load_baseline(base, adapter, device, bdt)
        for f in frames:
            say(f"transformers, {f} frames, {runs} runs")
            rows.append(bench_baseline(bl, video, f, new_tokens, runs, device))
            log.info("baseline %d frames: %s", f, rows[-1].stages)
        del bl
    name = device_name(device)
    title = f"{preset}, {name}, {run_mode(dt, quantize, bdt, baseline)}, {new_tokens} new tokens"
    tbl = table(rows)
    js = os.path.join(out_dir, f"bench_{preset}.json")
    with open(js, "w") as f:
        json.dump({"preset": preset, "device": name, **provenance(), "dtype": str(dt), "quantize": quantize,
                   "baseline_dtype": str(bdt), "new_tokens": new_tokens, "runs": runs,
                   "rows": [asdict(r) for r in rows]}, f, indent=1)
    pngs = plots(rows, out_dir, title)
    print(f"\n### {title}\n\n{tbl}\n")
    say("wrote " + ", ".join([js] + pngs))
    return {"rows": rows, "table": tbl, "json": js, "plots": pngs}
