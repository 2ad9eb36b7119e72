"""Every kernel compiles for sm_90 and sm_80 without a GPU (triton.compile with a GPUTarget): every table config,
and pool_gelu / lora_linear / int8_linear / int4_linear / int4_dequant exactly as their launchers launch them (the
launcher's own LaunchSpec: config choice, arguments and the JIT's specialisation of them) at PLLaVA-7B/13B/34B
shapes, 1-64 frames and the paper's pooling shapes. Triton's bundled cuobjdump gives registers, shared memory and
spills; the checks per arch: no spills, shared memory within the limit (227 KB sm_90, 163 KB sm_80), decode grids
that cover the SMs.

Runs pllava.kernels.compile_check in a subprocess without TRITON_INTERPRET (the rest of the suite interprets)."""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pllava.kernels.compile_check", "--json"], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    return json.loads(r.stdout)


def test_every_table_config_compiles_for_sm90_and_sm80(report):
    import importlib

    rows = report["rows"]
    pp = importlib.import_module("pllava.kernels.pool_projector")
    ll = importlib.import_module("pllava.kernels.lora_linear")
    table = [r for r in rows if "ctas" not in r]
    n_pool = sum(len(pp.CONFIGS[a]) for a in ("sm90", "sm80")) * 2  # bf16, fp16
    n_lora = sum(len(c) for a in ("sm90", "sm80") for c in ll.CONFIGS[a].values()) * 2  # per_row off/on
    n_lora += sum(len(ll.CONFIGS[a]["decode"]) for a in ("sm90", "sm80")) * 2  # the fused design
    assert len([r for r in table if r["kernel"] == "pool_gelu"]) == n_pool
    assert len([r for r in table if r["kernel"].startswith("lora_linear")]) == n_lora
    assert len([r for r in table if r["kernel"].startswith("slot_decode")]) == 2 * 2 * 2  # 7b/34b, dtypes, archs
    il = importlib.import_module("pllava.kernels.int8_linear")
    n_int8 = sum(len(c) for a in ("sm90", "sm80") for c in il.CONFIGS[a].values()) * 2 * 2  # dtypes x LoRA on/off
    assert len([r for r in table if r["kernel"].startswith("int8_linear")]) == n_int8
    i4 = importlib.import_module("pllava.kernels.int4_linear")
    n_int4 = sum(len(i4.CONFIGS[a]) for a in ("sm90", "sm80")) * 2 * 2 * 2  # M in (1, 64) x dtypes x LoRA on/off
    assert len([r for r in table if r["kernel"] == "int4_linear"]) == n_int4
    assert len([r for r in table if r["kernel"] == "int4_dequant"]) == 2 * 3  # archs x bf16/fp16/fp32
    assert {r["arch"] for r in rows} == {"sm90", "sm80"}


def test_as_launched_covers_the_real_shapes(report):
    from pllava.kernels.compile_check import FRAMES, MODELS, pooling_shapes

    rows = [r for r in report["rows"] if "ctas" in r]
    pool = {(r["arch"], r["model"], r["frames"], tuple(r["pooling"])) for r in rows if r["kernel"] == "pool_gelu"}
    assert pool == {(a, m, t, p) for a in ("sm90", "sm80") for m in MODELS for t in FRAMES for p in pooling_shapes(t)}
    lora = [r for r in rows if r["kernel"].startswith("lora_linear")]
    assert len(lora) == 2 * len(MODELS) * 2 * 4  # archs x models x (q, v) x M in (1, 8, 16, 2400)
    int8 = [r for r in rows if r["kernel"].startswith("int8_linear")]
    # archs x models x ((q, v, o, gate, down) x M in (1, 8, 16, 2400) + lm_head's first pass x M in (1, 8, 16))
    assert len(int8) == 2 * len(MODELS) * (5 * 4 + 3)
    head = [r for r in int8 if r["model"].endswith("lm_head")]
    assert {r["n"] for r in head} == {m["vocab"] for m in MODELS.values()} and all(r["m"] <= 16 for r in head)
    dec = [r for r in int8 if r["kernel"] == "int8_linear/decode" and r["model"] == "pllava-7b q_proj"]
    assert dec and all(r["ctas"] >= r["sms"] for r in dec), dec
    # quantize="int4": archs x models x (q, v, o, gate, down) x (M in (1, 8, 16, 64) fused + a prefill's dequant)
    int4 = [r for r in rows if r["kernel"].startswith("int4_")]
    assert len(int4) == 2 * len(MODELS) * 5 * (4 + 1)
    assert {r["m"] for r in int4 if r["kernel"] == "int4_linear/decode"} == {1, 8, 16, 64}
    assert all(r["ctas"] >= r["sms"] for r in int4), [r for r in int4 if r["ctas"] < r["sms"]]
    for r in rows:
        print(f"{r['kernel']:<20}{r['arch']:<6}{r['model']:<20}{r.get('frames', r.get('m'))!s:>5} "
              f"{str(r.get('pooling', '')):<14}{str(r['config']):<20}{r['ctas']:>6} CTAs {r['reg']:>4} regs "
              f"{r['shared']:>7} B shared")


def test_no_faults_as_launched(report):
    """No spills, shared memory within each arch's limit, decode grids covering the SMs (where N has the tiles)."""
    assert not report["faults"], "\n".join(report["faults"])
    assert all(r["reg"] <= 255 for r in report["rows"])


def test_the_two_faults_stay_fixed(report):
    rows = [r for r in report["rows"] if "ctas" in r]
    # 64 frames -> (16, 12, 12): 4x2x2 windows; the table's BLOCK_P 32 took 240 KB of shared memory on sm_90
    p = [r for r in rows if r["kernel"] == "pool_gelu" and r["frames"] == 64 and r["pooling"] == [16, 12, 12]]
    assert p and all(r["shared"] <= r["shared_limit"] for r in p), p
    # the 7B q_proj decode (M = 1, N = 4096) ran 64 CTAs on 132 SMs
    q = [r for r in rows if r["kernel"] == "lora_linear/decode" and r["model"] == "pllava-7b q_proj" and r["m"] == 1]
    assert q and all(r["ctas"] >= r["sms"] for r in q), q
    # 34B's v_proj (N = 1024: 64 tiles of 16) splits K to cover the SMs, in both linears
    v = [r for r in rows if r["kernel"].endswith("/decode") and r["model"] == "pllava-34b v_proj" and r["m"] <= 16]
    assert len(v) == 2 * 3 * 3 and all(r["ctas"] >= r["sms"] and r["config"][3] > 1 for r in v), v


def test_launch_spec_on_meta_tensors_is_the_launchers_launch(monkeypatch):
    """compile_check builds the spec on meta tensors; the launcher builds it on real ones and launches it. The two
    must agree (grid, meta-parameters, every integer argument), or the check would compile something else."""
    import importlib

    _common = importlib.import_module("pllava.kernels._common")
    ll = importlib.import_module("pllava.kernels.lora_linear")
    pp = importlib.import_module("pllava.kernels.pool_projector")

    launched = []
    monkeypatch.setattr(_common.LaunchSpec, "launch", lambda self: launched.append(self))
    x, w1, b1 = torch.randn(8, 36, 24), torch.randn(40, 24), torch.randn(40)
    pp.pool_gelu(x, w1, b1, (6, 6), (4, 3, 3))
    m = dict(device="meta")
    meta_spec = pp.pool_gelu_spec(torch.empty(8 * 36, 24, **m), torch.empty(40, 24, **m), torch.empty(40, **m),
                                  torch.empty(36, 40, **m), 8, (6, 6), (4, 3, 3), None, "sm90")
    for xin in (torch.randn(1, 64), torch.randn(300, 64)):
        ll.lora_linear_triton(xin, torch.randn(72, 64), None, torch.randn(8, 64), torch.randn(72, 8), torch.tensor(0.5))
    lspecs = [ll.lora_linear_spec(torch.empty(n, 64, **m), torch.empty(72, 64, **m), None, torch.empty(8, 64, **m),
                                  torch.empty(72, 8, **m), torch.empty((), **m), torch.empty(n, 72, **m), None, "sm90")
              for n in (1, 300)]
    il = importlib.import_module("pllava.kernels.int8_linear")
    q8 = torch.zeros(72, 64, dtype=torch.int8)
    ispecs = []
    for n, lora in ((1, True), (300, False)):
        ab = (torch.randn(8, 64), torch.randn(72, 8), torch.tensor(0.5)) if lora else (None, None, None)
        il.int8_linear_triton(torch.randn(n, 64), q8, torch.ones(72), None, *ab)
        mab = (torch.empty(8, 64, **m), torch.empty(72, 8, **m), torch.empty((), **m)) if lora else (None, None, None)
        ispecs.append(il.int8_linear_spec(torch.empty(n, 64, **m), torch.empty(72, 64, device="meta", dtype=torch.int8),
                                          torch.empty(72, **m), None, *mab, torch.empty(n, 72, **m), None, "sm90"))
    i4 = importlib.import_module("pllava.kernels.int4_linear")
    q4, s4 = torch.zeros(72, 32, dtype=torch.uint8), torch.ones(72, 2)
    for n, lora in ((1, True), (40, False)):
        ab = (torch.randn(8, 64), torch.randn(72, 8), torch.tensor(0.5)) if lora else (None, None, None)
        i4.int4_linear_triton(torch.randn(n, 64), q4, s4, None, *ab)
        mab = (torch.empty(8, 64, **m), torch.empty(72, 8, **m), torch.empty((), **m)) if lora else (None, None, None)
        ispecs.append(i4.int4_linear_spec(torch.empty(n, 64, **m), torch.empty(72, 32, device="meta",
                                                                               dtype=torch.uint8),
                                          torch.empty(72, 2, **m), None, *mab, torch.empty(n, 72, **m), None, "sm90"))
    i4.int4_dequant_triton(q4, s4, torch.bfloat16)
    ispecs.append(i4.int4_dequant_spec(torch.empty(72, 32, device="meta", dtype=torch.uint8), torch.empty(72, 2, **m),
                                       torch.empty(72, 64, device="meta", dtype=torch.bfloat16)))
    ints = lambda s: {k: v for k, v in s.args.items() if isinstance(v, int)}  # noqa: E731
    assert len(launched) == 1 + len(lspecs) + len(ispecs)
    for real, fake in zip(launched, [meta_spec] + lspecs + ispecs):
        assert real.kernel is fake.kernel and real.grid == fake.grid and real.meta == fake.meta
        assert ints(real) == ints(fake) and (real.num_warps, real.num_stages) == (fake.num_warps, fake.num_stages)
