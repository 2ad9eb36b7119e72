"""Randomised mixes through the scheduler (Engine.generate_many) against one-at-a-time Engine.generate().

Each trial draws 1-9 requests (a file, preprocessed frames or no video; a question, chat turns or a long prompt;
1-24 new tokens; their own alpha, sampler, repetition penalty and stop string), a batch size (fewer slots than
requests included) and a prefill chunk. Every request must get generate()'s tokens, text, finish reason and prompt
length. The fixed seeds make a failure reproducible: the report names the trial and request. Under bf16 a prefill
chunk is drawn only where pllava._C's bf16 prefill attention runs (AVX512-BF16): it attends a chunk over the cache
as it does a whole prompt; torch's SDPA does not (README, "Many requests at once"). Under bf16 + int8 none is: a
chunk of <= 16 rows goes through the fp32 int8 GEMV where a whole prompt's rows take the bf16 GEMM.
"""
import random

import pytest
import torch

import pllava
from pllava import ops

PROMPTS = ["hello", "What is happening in the video?", "Describe the video in details.", "a",
           [("user", "Who is there?"), ("assistant", "A man."), ("user", "What does he do?")], "x " * 40]


def draw_request(rng: random.Random, videos: list) -> dict:
    r = dict(video=rng.choice(videos), prompt=rng.choice(PROMPTS), max_new_tokens=rng.randint(1, 24))
    if rng.random() < 0.6:
        r["lora_alpha"] = rng.choice([0, 4, 20, 7.5])
    if rng.random() < 0.3:
        r.update(temperature=rng.choice([0.7, 1.3]), seed=rng.randint(0, 99), top_p=rng.choice([1.0, 0.9]),
                 top_k=rng.choice([0, 5]))
    if rng.random() < 0.2:
        r["repetition_penalty"] = 1.3
    if rng.random() < 0.2:
        r["stop"] = [rng.choice(["a", "e", "\n", "the"])]
    return r


def generate_alone(engine, r: dict):
    r = dict(r)
    saved = engine.lora_alpha
    engine.set_lora_alpha(r.pop("lora_alpha", saved))
    try:
        return engine.generate(r.pop("video"), r.pop("prompt"), **r)
    finally:
        engine.set_lora_alpha(saved)


def describe(r: dict) -> dict:
    return {k: (type(v).__name__ if k == "video" else v) for k, v in r.items()}


BF16_CHUNKS = (None, None, 7, 50) if ops.native_prefill_attention() is not None else (None,)


@pytest.mark.parametrize("dtype,quantize,chunks,trials", [
    (torch.float32, None, (None, None, 7, 50), 12),
    (torch.bfloat16, None, BF16_CHUNKS, 6),
    (torch.bfloat16, "int8", (None,), 10),
])
def test_random_mixes_equal_one_at_a_time(ckpts, video_path, dtype, quantize, chunks, trials):
    engine = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=dtype, quantize=quantize)
    s = engine.config.vision.image_size
    frames = [torch.randn(engine.config.num_frames, 3, s, s, generator=torch.Generator().manual_seed(100 + i))
              for i in range(3)]
    videos = [video_path, *frames, None]
    mismatches, n_reqs, lengths = [], 0, set()
    for trial in range(trials):
        rng = random.Random(trial)
        reqs = [draw_request(rng, videos) for _ in range(rng.randint(1, 9))]
        batch, chunk = rng.choice([None, 1, 2, 3, 5]), rng.choice(chunks)
        want = [generate_alone(engine, r) for r in reqs]
        got = engine.generate_many(reqs, max_batch_size=batch, prefill_chunk=chunk)
        n_reqs += len(reqs)
        for i, (a, b) in enumerate(zip(want, got)):
            lengths.add(len(b.token_ids))
            if (a.token_ids, a.text, a.finish_reason, a.num_prompt_tokens) != \
                    (b.token_ids, b.text, b.finish_reason, b.num_prompt_tokens):
                mismatches.append(f"trial {trial} request {i} (batch {batch}, chunk {chunk}) {describe(reqs[i])}: "
                                  f"alone {a.token_ids} {a.finish_reason}, batched {b.token_ids} {b.finish_reason}")
    assert not mismatches, "\n".join(mismatches)
    assert n_reqs >= 3 * trials and len(lengths) > 5  # the mixes really vary
