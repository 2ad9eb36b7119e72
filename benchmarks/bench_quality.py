"""What each precision mode costs in agreement: `python benchmarks/bench_quality.py [clips]` (default 512).

The issue's quality bar for quantize="int8": top-1 agreement with the fp32 model on teacher-forced positions at
least transformers' own bf16 agreement. The fp32 model is transformers' LlavaForConditionalGeneration with
PLLaVA's pooling and the LoRA merged at alpha 4 (tests/oracle.py), on the tests' tiny checkpoint (seed 0); each
clip is random pixels, and every position of its prompt is a teacher-forced position (59 a clip).

Why the tiny checkpoint and many clips: on the small preset the 2304 visual positions of one clip flip together
(random weights, near-tied logits), so a handful of clips swings the count by 70 of 4654 with a 1-ulp change of
the scales; 512 short clips are 512 independent draws. Rows: transformers bf16; the engine in bf16 and its lm_head
without rescoring (model/head.py); bf16 + int8 and its ablations (lm_head in bf16 without rescoring, or in plain
int8; the residual stream in bf16). Each row is also paired
with transformers bf16 position by position (McNemar): the excess of its disagreements and that excess's
standard error. Writes
benchmarks/results/quality.json.
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
from pllava.model.quant import Int8Linear  # noqa: E402
from pllava.testing import make_tiny_checkpoint  # noqa: E402

Q = "What is happening in the video?"


def main(clips=512):
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

    def hf_top1(m, px):
        with torch.no_grad():
            e = oracle_embeds(m, px.to(next(m.parameters()).dtype), ids, image_token, pooling, frames)
            return oracle_logits(m, e).argmax(-1)

    f32, b16 = hf(torch.float32), hf(torch.bfloat16)
    def engine(quantize=None, head=None):
        e = pllava.Engine.from_pretrained(ck, dtype=torch.bfloat16, quantize=quantize)
        if head is not None:
            e.model.language_model.lm_head = head
        return e

    bf16 = engine()  # lm_head: a HalfHead
    plain = torch.nn.Linear(1, 1, bias=False)  # the bf16 head without rescoring (bf16 logits)
    plain.weight = bf16.model.language_model.lm_head.weight
    resid16 = engine("int8")
    resid16.model.language_model.residual_dtype = None
    modes = {
        "transformers bf16": lambda px: hf_top1(b16, px),
        "pllava-engine bf16 (lm_head: HalfHead)": bf16,
        "  ablation: lm_head not rescored (bf16 logits)": engine(head=plain),
        "pllava-engine bf16 + int8 (lm_head: Int8Head)": engine("int8"),
        "  ablation: lm_head in bf16, not rescored": engine("int8", plain),
        "  ablation: lm_head in plain int8": engine("int8", Int8Linear(plain)),
        "  ablation: residual stream in bf16": resid16,
    }
    agree = dict.fromkeys(modes, 0)
    only_mode, only_hf = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0)  # paired: right where the other is wrong
    total = 0
    for c in range(clips):
        px = torch.randn(frames, 3, 42, 42, generator=torch.Generator().manual_seed(1000 + c))
        ref = hf_top1(f32, px)
        total += ref.numel()
        right = {}
        for name, m in modes.items():
            got = m(px) if callable(m) and not isinstance(m, pllava.Engine) else m.prompt_logits(px, Q).argmax(-1)
            right[name] = got == ref
            agree[name] += int(right[name].sum())
        for name in modes:
            only_mode[name] += int((right[name] & ~right["transformers bf16"]).sum())
            only_hf[name] += int((~right[name] & right["transformers bf16"]).sum())
    print(f"top-1 agreement with transformers fp32: tiny checkpoint, {clips} clips, {total} teacher-forced positions")
    print("paired with transformers bf16 (McNemar): the excess of its disagreements over transformers bf16's, and "
          "the standard error of that excess, sqrt(discordant positions)")
    print("| mode | agree | disagree | excess over transformers bf16 | its standard error |\n|---|---:|---:|---:|---:|")
    for name, a in agree.items():
        d = only_hf[name] + only_mode[name]
        print(f"| {name} | {a} | {total - a} | {only_hf[name] - only_mode[name]:+d} | {d ** 0.5:.1f} |")
    out = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(dict(clips=clips, positions=total, agree=agree, right_only_mode=only_mode,
                       right_only_transformers_bf16=only_hf), f, indent=1)
    print(f"wrote {os.path.join(out, 'quality.json')}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
