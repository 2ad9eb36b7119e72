"""Compile every kernel in every config for sm_90 and sm_80 without a GPU and report its resource usage.

`python -m pllava.kernels.compile_check [--json]` prints registers, shared memory and local memory (spills) per
kernel and config, from triton's bundled `cuobjdump --dump-resource-usage`. Run it with TRITON_INTERPRET unset:
the interpreter replaces @triton.jit functions by Python ones that cannot be compiled.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

ARCHS = {"sm90": 90, "sm80": 80}
DIV16 = [["tt.divisibility", 16]]


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    return dict(zip(("reg", "stack", "shared_static", "local"), map(int, m.groups())))


def _compile(fn, signature, constexprs, n_ptrs, cc, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs={(i,): DIV16 for i in range(n_ptrs)})
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    row = usage(k.asm["cubin"])
    row["shared"] = int(k.metadata.shared)
    return row


def pool_rows():
    pp = importlib.import_module("pllava.kernels.pool_projector")
    names = ["x_ptr", "w1_ptr", "b1_ptr", "out_ptr", "P", "K", "N", "T", "H", "W", "TO", "HO", "WO",
             "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_om", "stride_on"]
    meta = pp.kernel_meta((24, 24), (16, 12, 12), 16)  # PLLaVA-7B: 2x2 windows
    for arch, cc in ARCHS.items():
        for cfg in pp.CONFIGS[arch]:
            for dt in ("bf16", "fp16"):
                bp, bn, bk, nw, ns = cfg
                sig = {n: (f"*{dt}" if n.endswith("_ptr") else "i32") for n in names}
                const = dict(meta, BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bk, IEEE=False, UPCAST=False)
                sig.update({k: "constexpr" for k in const})
                row = _compile(pp._pool_gelu_kernel, sig, const, 4, cc, nw, ns)
                yield dict(kernel="pool_gelu", arch=arch, dtype=dt, config=list(cfg), **row)


def lora_rows():
    ll = importlib.import_module("pllava.kernels.lora_linear")
    names = ["x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "xa_ptr", "s_ptr", "y_ptr", "M", "N", "K", "R",
             "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ar", "stride_ak", "stride_bn", "stride_br",
             "stride_xam", "stride_xar", "stride_ym", "stride_yn"]
    for arch, cc in ARCHS.items():
        for mode, cfgs in ll.CONFIGS[arch].items():
            for cfg in cfgs:
                for per_row in (False, True):
                    bm, bn, bk, gm, nw, ns = cfg
                    sig = {n: ("*bf16" if n.endswith("_ptr") else "i32") for n in names}
                    sig["s_ptr"] = "*fp32"
                    const = dict(HAS_BIAS=True, PER_ROW=per_row, FUSE_SHRINK=mode == "decode", R_PAD=128,
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, IEEE=False, UPCAST=False)
                    sig.update({k: "constexpr" for k in const})
                    row = _compile(ll._lora_linear_kernel, sig, const, 8, cc, nw, ns)
                    yield dict(kernel=f"lora_linear/{mode}", arch=arch, dtype="bf16", config=list(cfg),
                               per_row=per_row, **row)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    rows = list(pool_rows()) + list(lora_rows())
    if "--json" in argv:
        print(json.dumps(rows))
    else:
        print(f"{'kernel':<22}{'arch':<6}{'dtype':<6}{'config':<28}{'regs':>5}{'shared B':>10}{'stack':>7}{'local':>7}")
        for r in rows:
            print(f"{r['kernel']:<22}{r['arch']:<6}{r['dtype']:<6}{str(r['config']):<28}{r['reg']:>5}"
                  f"{r['shared']:>10}{r['stack']:>7}{r['local']:>7}")
    return 1 if any(r["local"] or r["stack"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
