"""Every kernel in every config compiles for sm_90 and sm_80 without a GPU (triton.compile with a GPUTarget), and
triton's bundled cuobjdump shows no spills to local memory. Registers and shared memory are printed.

Runs pllava.kernels.compile_check in a subprocess without TRITON_INTERPRET (the rest of the suite interprets)."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pllava.kernels.compile_check", "--json"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    return json.loads(r.stdout)


def test_every_kernel_and_config_compiles_for_sm90_and_sm80(rows):
    from pllava.kernels import lora_linear as _  # noqa: F401
    import importlib

    pp = importlib.import_module("pllava.kernels.pool_projector")
    ll = importlib.import_module("pllava.kernels.lora_linear")
    n_pool = sum(len(pp.CONFIGS[a]) for a in ("sm90", "sm80")) * 2  # bf16, fp16
    n_lora = sum(len(c) for a in ("sm90", "sm80") for c in ll.CONFIGS[a].values()) * 2  # per_row off/on
    assert len([r for r in rows if r["kernel"] == "pool_gelu"]) == n_pool
    assert len([r for r in rows if r["kernel"].startswith("lora_linear")]) == n_lora
    assert len([r for r in rows if r["kernel"].startswith("slot_decode")]) == 2 * 2 * 2  # 7b/34b, dtypes, archs
    assert {r["arch"] for r in rows} == {"sm90", "sm80"}
    for r in rows:
        print(f"{r['kernel']:<22}{r['arch']:<6}{r['dtype']:<6}{str(r['config']):<28}{r['reg']:>4} regs "
              f"{r['shared']:>7} B shared, local {r['local']}")


def test_no_config_spills(rows):
    spills = [r for r in rows if r["local"] or r["stack"]]
    assert not spills, "spilling configs:\n" + "\n".join(json.dumps(r) for r in spills)
    assert all(r["reg"] <= 255 for r in rows)
