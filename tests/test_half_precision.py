"""bf16 and fp16 end to end against transformers in the same dtype, with the budget taken from transformers' own
low-precision error (flash-attention's rule: at most 2x the reference implementation's error against fp64).

The fp64 and half-precision oracles are transformers' modules on the same checkpoint (LoRA merged, PLLaVA's
pooling), fed the tokenizer's ids of the literal prompt and AutoConfig's pooling shape, frame count and image
token. Measured: the prompt's logits (prefill) and, teacher-forced on the fp64 greedy continuation, the logits of
the engine's cached decode steps. Runs on the CPU here and on CUDA in the GPU suite."""
import glob
import os

import pytest
import torch

import pllava
from oracle import PLAIN_QUESTION, load_oracle, oracle_embeds, oracle_greedy, oracle_inputs, oracle_logits, read_lora
from pllava.generate import decode_one_token
from triton_util import TRITON_DEVICE as DEVICE  # the GPU where there is one (one definition for the suite)

QUESTION = "What is happening in the video?"
STEPS = 12


def _rel(a, ref):
    return float((a.double() - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def refs(ckpts):
    lora = read_lora(sorted(glob.glob(os.path.join(ckpts["pllava"], "*.safetensors"))))
    base = load_oracle(ckpts["current"], lora, 4.0)
    ids, image_token, pooling, frames, eos = oracle_inputs(ckpts["current"], PLAIN_QUESTION)
    px = torch.randn(frames, 3, 42, 42, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        m64 = base.double()
        emb64 = oracle_embeds(m64, px.double(), ids, image_token, pooling, frames)
        cont = oracle_greedy(m64, emb64, STEPS)  # the fp64 continuation every system is teacher-forced on
        # as PLLaVA embeds a generated <image> id: as the pad token (the engine's decode does the same)
        feed = [base.config.pad_token_id if t == image_token else t for t in cont[:-1]]
        seq64 = torch.cat([emb64, m64.model.language_model.embed_tokens(torch.tensor(feed))])
        l64 = oracle_logits(m64, seq64)  # (L + STEPS - 1, V)
    return dict(ckpts=ckpts, lora=lora, px=px, ids=ids, image_token=image_token, pooling=pooling, frames=frames,
                cont=cont, feed=feed, l64=l64, n_prompt=emb64.shape[0])


def _hf_logits(r, dtype):
    m = load_oracle(r["ckpts"]["current"], r["lora"], 4.0).to(DEVICE, dtype)
    with torch.no_grad():
        emb = oracle_embeds(m, r["px"].to(DEVICE, dtype), r["ids"].to(DEVICE), r["image_token"], r["pooling"],
                            r["frames"])
        seq = torch.cat([emb, m.model.language_model.embed_tokens(torch.tensor(r["feed"], device=DEVICE))])
        return oracle_logits(m, seq).cpu()


def _engine_logits(r, dtype):
    eng = pllava.Engine.from_pretrained(r["ckpts"]["pllava"], device=DEVICE, dtype=dtype)
    assert eng.dtype == dtype
    lm = eng.model.language_model
    n = r["n_prompt"]
    lm.setup_cache(1, n + STEPS, eng.kv_dtype, eng.device)  # the cache generate() would use
    with torch.no_grad():
        prompt = eng.prompt_logits(r["px"], QUESTION)  # (n, V): the prefill
        steps = []
        for i, tok in enumerate(r["cont"][:-1]):  # cached decode, one token a step
            pos = torch.tensor([n + i], device=eng.device)
            steps.append(decode_one_token(lm, torch.tensor([[tok]], device=eng.device), pos, kv_len=n + i + 1)[0])
    return torch.cat([prompt] + steps).float().cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_within_twice_transformers_error(refs, dtype):
    l64, n = refs["l64"], refs["n_prompt"]
    hf, eng = _hf_logits(refs, dtype), _engine_logits(refs, dtype)
    assert eng.shape == hf.shape == l64.shape
    report = []
    for part, sl in (("prefill", slice(0, n)), ("decode", slice(n, None))):
        e_hf, e_eng = _rel(hf[sl], l64[sl]), _rel(eng[sl], l64[sl])
        report.append(f"{part}: engine {e_eng:.2e}, transformers {e_hf:.2e} (budget {2 * e_hf:.2e})")
        assert e_hf > 0, "the half-precision reference must differ from fp64, or the budget means nothing"
        assert e_eng <= 2 * e_hf, "; ".join(report)
    # top-1 agreement with fp64 over every measured position: at least transformers' own, less one position
    agree = lambda x: int((x.argmax(-1) == l64.argmax(-1)).sum())  # noqa: E731
    assert agree(eng) >= agree(hf), (agree(eng), agree(hf), l64.shape[0], report)
    print(f"\n{dtype}: " + "; ".join(report) + f"; top-1 agreement engine {agree(eng)}, transformers {agree(hf)} "
          f"of {l64.shape[0]}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_head_gives_fp32_logits_at_each_rows_best(dtype):
    """HalfHead against fp64 on the same half-precision weight: the rows' best logits exact to fp32, the rest
    within one rounding to `dtype`, the argmax exact, fp32 out. The weight is shared, never copied."""
    from pllava.model.head import HEAD_RESCORE, HalfHead

    g = torch.Generator().manual_seed(4)
    V, D = 2000, 80
    lin = torch.nn.Linear(D, V, bias=False).to(dtype).requires_grad_(False)
    lin.weight.copy_(torch.randn(V, D, generator=g) * 0.3)
    head = HalfHead(lin)
    assert head.weight is lin.weight
    eps = torch.finfo(dtype).eps / 2  # one rounding to nearest
    for rows in (1, 3, 130):  # a decode row, a small batch, past RESCORE_ROWS (chunked)
        h = torch.randn(rows, D, generator=g).to(dtype)
        got = head(h)
        assert got.dtype == torch.float32 and got.shape == (rows, V)
        exact = h.double() @ lin.weight.double().T
        err = (got.double() - exact).abs()
        tol_fp32 = 1e-6 * (h.double().abs() @ lin.weight.double().abs().T)  # fp32 accumulation over D = 80
        tol_half = eps * exact.abs() + tol_fp32
        assert bool((err <= tol_half).all()), f"{rows} rows: a first-pass logit off by more than one rounding"
        best = exact.topk(8, dim=-1).indices
        assert bool((err.gather(-1, best) <= tol_fp32.gather(-1, best)).all()), "a row's best 8 are not fp32-exact"
        assert int((err <= tol_fp32).sum()) >= rows * HEAD_RESCORE
        assert torch.equal(got.argmax(-1), exact.argmax(-1))
        plain = lin(h).double()  # what an unrescored head returns: not fp32-exact at the best (not vacuous)
        assert float((plain - exact).abs().gather(-1, best).max()) > 10 * float(tol_fp32.gather(-1, best).max())


def test_half_engine_uses_the_rescored_head(ckpts):
    from pllava.model.head import HalfHead

    eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16)
    assert isinstance(eng.model.language_model.lm_head, HalfHead)
    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(23))
    assert eng.prompt_logits(px, QUESTION).dtype == torch.float32
    fp32 = pllava.Engine.from_pretrained(ckpts["pllava"])
    assert isinstance(fp32.model.language_model.lm_head, torch.nn.Linear)  # fp32 logits already: no second pass
