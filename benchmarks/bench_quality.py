"""What each precision mode costs in agreement: `python benchmarks/bench_quality.py [clips]` (default 512).

The issue's quality bar for quantize="int8": top-1 agreement with the fp32 model on teacher-forced positions at
least transformers' own bf16 agreement. The fp32 model is transformers' LlavaForConditionalGeneration with
PLLaVA's pooling and the LoRA merged at alpha 4 (tests/oracle.py), on the tests' tiny checkpoint (seed 0); each
clip is random pixels. Two kinds of teacher-forced positions, counted apart: every position of the prompt (59 a
clip, one prefill), and DECODE_STEPS random text tokens fed after it, one cached decode step each: the path
generation runs (int8 decode rows in fp32 through pllava._C's int8 GEMV, prefill rows through a bf16 GEMM).
Transformers (fp32 and bf16) get prompt + fed tokens in one forward.

Why the tiny checkpoint and many clips: on the small preset the 2304 visual positions of one clip flip together
(random weights, near-tied logits), so a handful of clips swings the count by 70 of 4654 with a 1-ulp change of
the scales; many short clips are independent draws. Rows: transformers bf16; the engine in bf16 and its lm_head
without rescoring (model/head.py); bf16 + int8 and its ablations (lm_head in bf16 without rescoring, or in plain
int8; the residual stream in bf16; the KV cache in fp32); fp32 + int8 (int8 weights, every activation in fp32);
bf16 + w8a8 and fp32 + w8a8 (quantize="w8a8": the prefill's rows quantized to int8 per row as well); bf16 + int4
and fp32 + int4 (quantize="int4": the decoder linears in int4 groups of 32), and bf16 + int4 with Q4_0's step alone
(no least-squares search for each group's scale). Each row is also paired with transformers bf16 position by
position (McNemar): the excess of its disagreements and that excess's standard error. Writes benchmarks/results/quality.json.
"""
import glob
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import pllava  # noqa: E402
from oracle import load_oracle, oracle_embeds, oracle_inputs, oracle_logits, read_lora  # noqa: E402
from pllava.generate import decode_one_token  # noqa: E402
from pllava.model import quant  # noqa: E402
from pllava.model.int4 import pack_int4  # noqa: E402
from pllava.model.quant import Int8Linear  # noqa: E402
from pllava.testing import make_tiny_checkpoint  # noqa: E402

Q = "What is happening in the video?"


class PlainHead(torch.nn.Linear):
    """A bf16 lm_head without rescoring: bf16 logits, from hidden states in any dtype (fp32 decode rows)."""

    def __init__(self, weight):
        super().__init__(1, 1, bias=False)
        self.weight = weight

    def forward(self, h):
        return super().forward(h.to(self.weight.dtype))


DECODE_STEPS = 16  # teacher-forced tokens a clip through the engine's cached decode steps


def q4_0(w, name="weight"):
    """int4 groups with llama.cpp's Q4_0 step alone, the ablation of the engine's search for each group's scale:
    s = bf16(-m / 8) for the group's weight m of largest magnitude (the positive one of a tie), q fitted to it."""
    n, k = w.shape
    g = w.float().reshape(n, k // 32, 32)
    a = g.abs().amax(-1)
    s = torch.where((g == a[..., None]).any(-1), -a, a) / 8
    s = torch.where(s == 0, torch.full_like(s, -1e-12), s).to(torch.bfloat16)
    return pack_int4(torch.round(g / s.float()[..., None]).clamp(-8, 7).to(torch.int8)), s


def main(clips=512, out_dir=None):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    root = tempfile.mkdtemp(prefix="pllava-quality-")
    ck, cur = make_tiny_checkpoint(root + "/pllava", "pllava", shards=2), make_tiny_checkpoint(root + "/cur", "current")
    lora = read_lora(sorted(glob.glob(os.path.join(ck, "*.safetensors"))))
    ids, image_token, pooling, frames, _ = oracle_inputs(cur)

    def hf(dtype):
        m = load_oracle(cur).to(dtype)
        with torch.no_grad():
            for (i, proj), ab in lora.items():
                lin = getattr(m.model.language_model.layers[i].self_attn, proj)
                lin.weight += ((4.0 / ab["A"].shape[0]) * ab["B"] @ ab["A"]).to(dtype)
        return m

    def hf_top1(m, px, feed):
        """(prompt positions, decode positions): the prompt alone, then prompt + fed tokens in one forward (the
        reference at the positions the engine reaches by cached decode steps)."""
        with torch.no_grad():
            e = oracle_embeds(m, px.to(next(m.parameters()).dtype), ids, image_token, pooling, frames)
            seq = torch.cat([e, m.model.language_model.embed_tokens(feed)])
            return oracle_logits(m, e).argmax(-1), oracle_logits(m, seq)[e.shape[0]:].argmax(-1)

    def engine_top1(eng, px, feed):
        lm, n = eng.model.language_model, ids.numel() + pooling[0] * pooling[1] * pooling[2] - 1
        lm.setup_cache(1, n + DECODE_STEPS, eng.kv_dtype, eng.device)  # generate()'s cache: prompt + steps
        with torch.no_grad():
            prompt = eng.prompt_logits(px, Q)
            assert prompt.shape[0] == n, (prompt.shape, n)
            steps = [decode_one_token(lm, t.view(1, 1), torch.tensor([n + i]), kv_len=n + i + 1)[0, -1]
                     for i, t in enumerate(feed)]
        return prompt.argmax(-1), torch.stack(steps).argmax(-1)

    f32, b16 = hf(torch.float32), hf(torch.bfloat16)

    def engine(quantize=None, head=None, dtype=torch.bfloat16):
        e = pllava.Engine.from_pretrained(ck, dtype=dtype, quantize=quantize)
        if head is not None:
            e.model.language_model.lm_head = head
        return e

    def q40_engine():  # the engine's int4 with q4_0's groups
        real = quant.quantize_weight_int4
        quant.quantize_weight_int4 = q4_0
        try:
            return engine("int4")
        finally:
            quant.quantize_weight_int4 = real

    bf16 = engine()  # lm_head: a HalfHead
    plain = PlainHead(bf16.model.language_model.lm_head.weight)  # the bf16 head without rescoring (bf16 logits)
    resid16 = engine("int8")
    resid16.model.language_model.residual_dtype = None
    kv32 = engine("int8")
    kv32.kv_dtype = torch.float32  # the KV cache before it was bf16 (Engine.kv_dtype on the CPU)
    modes = {
        "transformers bf16": lambda px, feed: hf_top1(b16, px, feed),
        "pllava-engine bf16 (lm_head: HalfHead)": bf16,
        "  ablation: lm_head not rescored (bf16 logits)": engine(head=plain),
        "pllava-engine bf16 + int8 (lm_head: Int8Head)": engine("int8"),
        "  ablation: lm_head in bf16, not rescored": engine("int8", plain),
        "  ablation: lm_head in plain int8": engine("int8", Int8Linear(plain)),
        "  ablation: residual stream in bf16": resid16,
        "  ablation: KV cache in fp32": kv32,
        "pllava-engine fp32 + int8 (lm_head: Int8Head)": engine("int8", dtype=torch.float32),
        "pllava-engine bf16 + w8a8 (prefill activations in int8)": engine("w8a8"),
        "pllava-engine fp32 + w8a8 (prefill activations in int8)": engine("w8a8", dtype=torch.float32),
        "pllava-engine bf16 + int4 (groups of 32)": engine("int4"),
        "  ablation: int4 with Q4_0's step alone (no search for the scale)": q40_engine(),
        "pllava-engine fp32 + int4 (groups of 32)": engine("int4", dtype=torch.float32),
    }
    parts = ("prefill", "decode")
    stats = {part: {name: dict(agree=0, only_mode=0, only_hf=0) for name in modes} for part in parts}
    total = dict.fromkeys(parts, 0)
    vocab = f32.config.text_config.vocab_size
    for c in range(clips):
        g = torch.Generator().manual_seed(1000 + c)
        px = torch.randn(frames, 3, 42, 42, generator=g)
        feed = torch.randint(0, vocab, (DECODE_STEPS,), generator=g)
        feed[feed == image_token] = 0  # text tokens only
        refs = hf_top1(f32, px, feed)
        got = {name: (m(px, feed) if not isinstance(m, pllava.Engine) else engine_top1(m, px, feed))
               for name, m in modes.items()}
        for k, part in enumerate(parts):
            total[part] += refs[k].numel()
            right = {name: got[name][k] == refs[k] for name in modes}
            for name in modes:  # paired with transformers bf16: right where the other is wrong
                st = stats[part][name]
                st["agree"] += int(right[name].sum())
                st["only_mode"] += int((right[name] & ~right["transformers bf16"]).sum())
                st["only_hf"] += int((~right[name] & right["transformers bf16"]).sum())
    print(f"top-1 agreement with transformers fp32: tiny checkpoint, {clips} clips; prompt positions by one "
          f"prefill, then {DECODE_STEPS} random text tokens a clip fed through the engine's cached decode steps")
    print("paired with transformers bf16 (McNemar): the excess of a mode's disagreements over transformers bf16's "
          "at the same positions, and its standard error, sqrt(discordant positions)")
    for part in parts:
        print(f"\n{part}: {total[part]} teacher-forced positions")
        print("| mode | agree | disagree | excess over transformers bf16 | its standard error |\n|---|---:|---:|---:|---:|")
        for name, st in stats[part].items():
            d = st["only_hf"] + st["only_mode"]
            print(f"| {name} | {st['agree']} | {total[part] - st['agree']} | {st['only_hf'] - st['only_mode']:+d} "
                  f"| {d ** 0.5:.1f} |")
    out = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(dict(clips=clips, decode_steps=DECODE_STEPS, positions=total, stats=stats), f, indent=1)
    print(f"wrote {os.path.join(out, 'quality.json')}")
    return dict(positions=total, stats=stats)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
