"""End-to-end parity with the transformers oracle on tiny checkpoints in every layout (fp32, CPU)."""
import glob
import os

import pytest
import torch

import pllava
from oracle import load_oracle, oracle_embeds, oracle_greedy, oracle_inputs, oracle_logits, read_lora

QUESTION = "What is happening in the video?"


def _lora_files(layout, path):
    if layout == "adapter":
        return [os.path.join(path, "adapter_model.safetensors")]
    if layout == "pllava":
        return sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return []


def _pixels(engine, seed=0):
    s = engine.config.vision.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(engine.config.num_frames, 3, s, s, generator=g)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def oracles(ckpts):
    """Oracle models keyed by (layout, alpha), built lazily."""
    cache = {}

    def get(layout, alpha):
        lora = read_lora(_lora_files(layout, ckpts[layout]))
        key = (layout, alpha) if lora else (layout, None)
        if key not in cache:
            cache[key] = load_oracle(ckpts["current"], lora, alpha)
        return cache[key]

    return get


@pytest.mark.parametrize("layout,alpha", [("pllava", 0.0), ("pllava", 4.0), ("pllava", 32.0), ("legacy", None),
                                          ("current", None), ("adapter", 4.0), ("adapter", 32.0)])
def test_logits_and_greedy_match_oracle(ckpts, oracles, layout, alpha):
    eng = pllava.Engine.from_pretrained(ckpts[layout], lora_alpha=alpha)
    assert eng.config.lora.r == (8 if layout in ("pllava", "adapter") else 0)
    ref = oracles(layout, 4.0 if alpha is None else alpha)
    px = _pixels(eng)
    ids, image_token, pooling, frames, eos = oracle_inputs(ckpts["current"])
    ref_emb = oracle_embeds(ref, px, ids, image_token, pooling, frames)
    ref_logits = oracle_logits(ref, ref_emb)
    got = eng.prompt_logits(px, QUESTION)
    assert got.shape == ref_logits.shape
    assert _rel(got, ref_logits) <= 1e-4, f"relative logit error {_rel(got, ref_logits):.2e}"
    out = eng.generate(px, QUESTION, max_new_tokens=32)
    want = oracle_greedy(ref, ref_emb, 32, eos=eos)
    assert out.token_ids == want
    assert out.num_prompt_tokens == ref_emb.shape[0]


def test_set_lora_alpha_on_loaded_engine(ckpts, oracles):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])  # default alpha 4
    assert eng.lora_alpha == 4.0
    px = _pixels(eng, seed=1)
    ids, image_token, pooling, frames, eos = oracle_inputs(ckpts["current"])
    outs = {}
    for alpha in (32.0, 0.0, 4.0):
        eng.set_lora_alpha(alpha)
        ref = oracles("pllava", alpha)
        emb = oracle_embeds(ref, px, ids, image_token, pooling, frames)
        assert _rel(eng.prompt_logits(px, QUESTION), oracle_logits(ref, emb)) <= 1e-4
        outs[alpha] = eng.generate(px, QUESTION, max_new_tokens=32).token_ids
        assert outs[alpha] == oracle_greedy(ref, emb, 32, eos=eos)
    assert outs[0.0] != outs[32.0], "alpha must change the output of this checkpoint"


def test_alpha_zero_equals_image_llm(ckpts):
    """alpha 0 is the image model's LLM: the same logits as the checkpoint without its LoRA."""
    a = pllava.Engine.from_pretrained(ckpts["pllava"], lora_alpha=0)
    b = pllava.Engine.from_pretrained(ckpts["current"])
    px = _pixels(a, seed=2)
    torch.testing.assert_close(a.prompt_logits(px, QUESTION), b.prompt_logits(px, QUESTION), rtol=0, atol=1e-5)


def test_fewer_frames_repeat_like_pllava(ckpts, oracles):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    px = _pixels(eng, seed=3)[:1]  # a single image: fed as num_frames identical frames
    ref = oracles("pllava", 4.0)
    ids, image_token, pooling, frames, _ = oracle_inputs(ckpts["current"])
    emb = oracle_embeds(ref, px.repeat(frames, 1, 1, 1), ids, image_token, pooling, frames)
    assert _rel(eng.prompt_logits(px, QUESTION), oracle_logits(ref, emb)) <= 1e-4


def test_video_file_end_to_end_matches_oracle(ckpts, oracles, video_path):
    """Decode + preprocess + the model against an oracle that shares none of it: every frame decoded by a plain
    PyAV loop, PLLaVA's get_index for 30 frames and 4 segments typed as literals (seg = 29/4 = 7.25: int(3.625 +
    round(7.25 * i)) = 3, 10, 17, 25), transformers' CLIPImageProcessor, the tokenizer on the literal prompt."""
    import av
    from transformers import CLIPImageProcessor

    with av.open(video_path) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(every) == 30  # the fixture clip; the literal indices below are for 30 frames
    want_frames = torch.from_numpy(__import__("numpy").stack([every[i] for i in (3, 10, 17, 25)]))
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    assert torch.equal(pllava.read_frames(video_path, 4), want_frames)
    proc = CLIPImageProcessor.from_pretrained(ckpts["pllava"])
    px_ref = proc(images=list(want_frames.numpy()), return_tensors="pt")["pixel_values"]
    px = eng.pixels(want_frames)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    diff = ((px - px_ref) * std).abs()  # back in [0, 1] pixel units, before normalization
    assert diff.max() * 255 < 1e-3, f"max {diff.max() * 255:.4f}/255: not CLIPImageProcessor's pixels"
    ref = oracles("pllava", 4.0)
    ids, image_token, pooling, frames, eos = oracle_inputs(ckpts["current"])
    assert frames == 4
    emb = oracle_embeds(ref, px_ref, ids, image_token, pooling, frames)
    out = eng.generate(video_path, QUESTION, max_new_tokens=16)
    assert out.token_ids == oracle_greedy(ref, emb, 16, eos=eos)
    for k in ("video_decode", "preprocess", "vision", "projector", "prefill", "decode", "total", "ttft"):
        assert out.timings[k] >= 0


def test_cpu_vision_tower_in_frame_chunks_matches_oracle(ckpts, oracles):
    """On the CPU the tower encodes a clip 4 frames at a time (model/vision.py): 9 frames (chunks of 4, 4, 1) give
    transformers' CLIP features (hidden_states[-2], CLS dropped), and the same bits as one 9-frame batch, in fp32
    and in bf16."""
    from pllava.model.vision import CPU_FRAME_CHUNK

    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    vt = eng.model.vision_tower
    assert vt.frame_chunk == CPU_FRAME_CHUNK == 4
    s = eng.config.vision.image_size
    px = torch.randn(9, 3, s, s, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = vt(px)
        want = oracles("pllava", 4.0).model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert got.shape == want.shape and _rel(got, want) <= 1e-5
        for dtype in (torch.float32, torch.bfloat16):
            vt.to(dtype)
            chunked = vt(px.to(dtype))
            vt.frame_chunk = None
            whole = vt(px.to(dtype))
            vt.frame_chunk = CPU_FRAME_CHUNK
            assert torch.equal(chunked, whole), dtype
