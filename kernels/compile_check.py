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


def _jit_spec(fn, args: dict):
    """Signature, constexprs and attrs exactly as the JIT specialises these launch arguments (ints equal to 1
    become constants, ints and pointers divisible by 16 get tt.divisibility), via triton's own specialize_impl."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name not in args:
            continue  # a constexpr meta-parameter, given by the caller
        ty, key = native_specialize_impl(BaseBackend, args[name], False, True, True)
        if ty == "constexpr":
            sig[name], const[name] = "constexpr", key
        else:
            sig[name] = ty
            if key == "D":
                attrs[(i,)] = DIV16
    return sig, const, attrs


def slot_rows():
    """The slot decode-attention kernel at PLLaVA-7B (MHA, hd 128) and -34B (GQA 56/8) shapes, 8 rows, 4096
    positions a slot, with the strides the launcher passes for contiguous q and cache tensors."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sa = importlib.import_module("pllava.kernels.slot_attention")
    fn = sa._slot_decode_kernel
    for model, (h, kv, d) in {"7b": (32, 32, 128), "34b": (56, 8, 128)}.items():
        S = 4096
        bh, bd = sa.block_sizes(h // kv, d)
        for dt in (torch.bfloat16, torch.float16):
            t = torch.empty(16, dtype=dt)
            i64 = torch.empty(16, dtype=torch.long)
            args = dict(q_ptr=t, k_ptr=t, v_ptr=t, slot_ptr=i64, pos_ptr=i64, o_ptr=t, qk_scale=0.1275, WINDOW=0,
                        stride_qb=h * d, stride_qh=d, stride_qd=1,
                        stride_ks=kv * S * d, stride_kh=S * d, stride_kn=d, stride_kd=1,
                        stride_vs=kv * S * d, stride_vh=S * d, stride_vn=d, stride_vd=1,
                        stride_ob=h * d, stride_oh=d, stride_od=1)
            sig, const, attrs = _jit_spec(fn, args)
            meta = dict(GROUP=h // kv, HEAD_DIM=d, BLOCK_H=bh, BLOCK_D=bd, BLOCK_N=sa.BLOCK_N, IEEE=False,
                        UPCAST=False)
            sig.update({k: "constexpr" for k in meta})
            const.update(meta)
            for arch, cc in ARCHS.items():
                src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
                k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": sa.NUM_WARPS, "num_stages": sa.NUM_STAGES})
                row = usage(k.asm["cubin"])
                row["shared"] = int(k.metadata.shared)
                yield dict(kernel=f"slot_decode/{model}", arch=arch, dtype={torch.bfloat16: "bf16", torch.float16: "fp16"}[dt],
                           config=[bh, bd, sa.BLOCK_N, sa.NUM_WARPS, sa.NUM_STAGES], **row)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    rows = list(pool_rows()) + list(lora_rows()) + list(slot_rows())
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
