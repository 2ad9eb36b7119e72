"""Compile every kernel in every config for sm_90 and sm_80 without a GPU and report its resource usage.

`python -m pllava.kernels.compile_check [--json]` prints registers, shared memory and local memory (spills) per
kernel and config, from triton's bundled `cuobjdump --dump-resource-usage`: every table config, and the kernels
as their launchers launch them (the same LaunchSpec: config choice, arguments and the JIT's specialisation) for
PLLaVA-7B/13B/34B at 1-64 frames and the paper's pooling shapes; it exits 1 on a fault (spills, shared memory over
the arch's limit, a decode grid leaving SMs idle). Run it with TRITON_INTERPRET unset:
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


def pool_rows():
    """Every table config of pool_gelu, forced through its launcher's LaunchSpec (PLLaVA-7B, 16 frames)."""
    import torch

    pp = importlib.import_module("pllava.kernels.pool_projector")
    for arch in ARCHS:
        for cfg in pp.CONFIGS[arch]:
            for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
                m = dict(device="meta", dtype=dt)
                spec = pp.pool_gelu_spec(torch.empty(16 * 576, 1024, **m), torch.empty(4096, 1024, **m),
                                         torch.empty(4096, **m), torch.empty(16 * 144, 4096, **m), 16, (24, 24),
                                         (16, 12, 12), cfg, arch)
                yield dict(kernel="pool_gelu", arch=arch, dtype=name, config=list(cfg), **compile_spec(spec, arch))


def lora_rows():
    """Every table config of lora_linear (and the fused design on the decode tiles), forced through its launcher's
    LaunchSpec at PLLaVA-7B's q_proj (M = 1 for decode, 2400 for prefill), scalar and per-row scales."""
    import torch

    ll = importlib.import_module("pllava.kernels.lora_linear")
    m = dict(device="meta", dtype=torch.bfloat16)
    w, a, b = torch.empty(4096, 4096, **m), torch.empty(128, 4096, **m), torch.empty(4096, 128, **m)
    for arch in ARCHS:
        modes = dict(ll.CONFIGS[arch], fused=ll.CONFIGS[arch]["decode"])
        for mode, cfgs in modes.items():
            rows = 2400 if mode == "prefill" else 1
            for cfg in cfgs:
                for per_row in (False, True):
                    scale = torch.empty(rows if per_row else (), device="meta", dtype=torch.float32)
                    spec = ll.lora_linear_spec(torch.empty(rows, 4096, **m), w, None, a, b, scale,
                                               torch.empty(rows, 4096, **m), (mode, cfg), arch)
                    yield dict(kernel=f"lora_linear/{mode}", arch=arch, dtype="bf16", config=list(cfg),
                               per_row=per_row, **compile_spec(spec, arch))


def int8_rows():
    """Every table config of int8_linear forced through its launcher's LaunchSpec at PLLaVA-7B's q_proj (M = 1 for
    decode, 2400 for prefill), with the fused LoRA and without it, bf16 and fp16."""
    import torch

    il = importlib.import_module("pllava.kernels.int8_linear")
    for arch in ARCHS:
        for mode, cfgs in il.CONFIGS[arch].items():
            rows = 2400 if mode == "prefill" else 1
            for cfg in cfgs:
                for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
                    for lora in (True, False):
                        spec = _int8_spec(il, rows, 4096, 4096, lora, dt, (mode, cfg), arch)
                        yield dict(kernel=f"int8_linear/{mode}", arch=arch, dtype=name, config=list(cfg), lora=lora,
                                   **compile_spec(spec, arch))


def int4_rows():
    """Every table config of int4_linear forced through its launcher's LaunchSpec at PLLaVA-7B's q_proj (M = 1 and
    FUSED_MAX_M), with the fused LoRA and without it, bf16 and fp16; and int4_dequant at 7B's MLP weight in each
    dtype it writes."""
    import torch

    i4 = importlib.import_module("pllava.kernels.int4_linear")
    for arch in ARCHS:
        for cfg in i4.CONFIGS[arch]:
            for m in (1, i4.FUSED_MAX_M):
                for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
                    for lora in (True, False):
                        spec = _int4_spec(i4, m, 4096, 4096, lora, dt, (cfg,), arch)
                        yield dict(kernel="int4_linear", arch=arch, dtype=name, config=list(cfg), lora=lora, m=m,
                                   **compile_spec(spec, arch))
        for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
            spec = _dequant_spec(i4, 11008, 4096, dt)
            yield dict(kernel="int4_dequant", arch=arch, dtype=name, config=list(i4.DEQUANT_BLOCK),
                       **compile_spec(spec, arch))


def _int4_spec(i4, m, k, n, lora: bool, dt, config, arch):
    import torch

    meta = dict(device="meta", dtype=dt)
    a = b = scale = None
    if lora:
        a, b = torch.empty(128, k, **meta), torch.empty(n, 128, **meta)
        scale = torch.empty(m if m > 1 else (), device="meta", dtype=torch.float32)
    return i4.int4_linear_spec(torch.empty(m, k, **meta), torch.empty(n, k // 2, device="meta", dtype=torch.uint8),
                               torch.empty(n, k // i4.GROUP, device="meta", dtype=torch.bfloat16), None, a, b, scale,
                               torch.empty(m, n, **meta), config, arch)


def _dequant_spec(i4, n, k, dt):
    import torch

    return i4.int4_dequant_spec(torch.empty(n, k // 2, device="meta", dtype=torch.uint8),
                                torch.empty(n, k // i4.GROUP, device="meta", dtype=torch.bfloat16),
                                torch.empty(n, k, device="meta", dtype=dt))


def _int8_spec(il, m, k, n, lora: bool, dt, config, arch):
    import torch

    meta = dict(device="meta", dtype=dt)
    a = b = scale = None
    if lora:
        a, b = torch.empty(128, k, **meta), torch.empty(n, 128, **meta)
        scale = torch.empty(m if 1 < m <= il.DECODE_MAX_M else (), device="meta", dtype=torch.float32)
    return il.int8_linear_spec(torch.empty(m, k, **meta), torch.empty(n, k, device="meta", dtype=torch.int8),
                               torch.empty(n, **meta), None, a, b, scale, torch.empty(m, n, **meta), config, arch)


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

    from pllava.kernels._common import LaunchSpec

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
            meta = dict(GROUP=h // kv, HEAD_DIM=d, BLOCK_H=bh, BLOCK_D=bd, BLOCK_N=sa.BLOCK_N, IEEE=False,
                        UPCAST=False)
            spec = LaunchSpec(fn, (8, kv), args, meta, sa.NUM_WARPS, sa.NUM_STAGES)
            for arch in ARCHS:
                yield dict(kernel=f"slot_decode/{model}", arch=arch, dtype={torch.bfloat16: "bf16", torch.float16: "fp16"}[dt],
                           config=[bh, bd, sa.BLOCK_N, sa.NUM_WARPS, sa.NUM_STAGES], **compile_spec(spec, arch))


# ------------------------------------------------------------------------------------------ as launched
# Real shapes: CLIP-L/14-336 features (c = 1024, 24x24 patches) into each LLM's hidden size; LoRA r = 128 on q_proj
# (N = hidden) and v_proj (N = kv heads x 128).
MODELS = {"pllava-7b": dict(hidden=4096, kv=4096, inter=11008, vocab=32064),
          "pllava-13b": dict(hidden=5120, kv=5120, inter=13824, vocab=32064),
          "pllava-34b": dict(hidden=7168, kv=1024, inter=20480, vocab=64064)}
FRAMES = (1, 4, 8, 16, 32, 64)


def pooling_shapes(t: int):
    """The paper's default (16, 12, 12) and its ablated spatial sizes, temporal capped at the frames there are."""
    tt = min(t, 16)
    return [(tt, 12, 12), (tt, 6, 6), (tt, 24, 24)]


_CACHE: dict = {}


def compile_spec(spec, arch: str) -> dict:
    """Compile a launcher's LaunchSpec for `arch` with the JIT's own specialisation of its arguments; the resource
    usage (cached per distinct compile: many shapes specialise alike)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.kernel
    sig, const, attrs = _jit_spec(fn, spec.args)
    sig.update({k: "constexpr" for k in spec.meta})
    const.update(spec.meta)
    key = (fn.__name__, arch, tuple(sorted(sig.items())), tuple(sorted(const.items())), tuple(sorted(attrs)),
           spec.num_warps, spec.num_stages)
    if key not in _CACHE:
        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        row = usage(k.asm["cubin"])
        row["shared"] = int(k.metadata.shared)
        _CACHE[key] = row
    return dict(_CACHE[key])


def launched_rows():
    """pool_gelu, lora_linear, int8_linear, int4_linear and int4_dequant exactly as their launchers launch them (same
    config choice, same arguments, on meta tensors), for the real shapes, with the checks each arch imposes."""
    import torch

    pp = importlib.import_module("pllava.kernels.pool_projector")
    ll = importlib.import_module("pllava.kernels.lora_linear")
    il = importlib.import_module("pllava.kernels.int8_linear")
    i4 = importlib.import_module("pllava.kernels.int4_linear")
    from pllava.kernels._common import SHARED_LIMIT, SMS

    meta = dict(device="meta", dtype=torch.bfloat16)
    for arch in ARCHS:
        for model, dims in MODELS.items():
            d = dims["hidden"]
            w1, b1 = torch.empty(d, 1024, **meta), torch.empty(d, **meta)
            for t in FRAMES:
                x2 = torch.empty(t * 576, 1024, **meta)
                for pool in pooling_shapes(t):
                    out = torch.empty(pool[0] * pool[1] * pool[2], d, **meta)
                    spec = pp.pool_gelu_spec(x2, w1, b1, out, t, (24, 24), pool, None, arch)
                    row = compile_spec(spec, arch)
                    yield dict(kernel="pool_gelu", arch=arch, dtype="bf16", model=model, frames=t, pooling=list(pool),
                               config=[spec.meta[k] for k in ("BLOCK_P", "BLOCK_N", "BLOCK_K")] + [spec.meta["WCH"]],
                               ctas=spec.ctas, shared_limit=SHARED_LIMIT[arch], sms=SMS[arch], **row)
            for proj, n in (("q_proj", d), ("v_proj", dims["kv"])):
                w, a, b = torch.empty(n, d, **meta), torch.empty(128, d, **meta), torch.empty(n, 128, **meta)
                for m, per_row in ((1, False), (8, True), (16, True), (2400, False)):
                    x2, y = torch.empty(m, d, **meta), torch.empty(m, n, **meta)
                    scale = torch.empty(m if per_row else (), device="meta", dtype=torch.float32)
                    spec = ll.lora_linear_spec(x2, w, None, a, b, scale, y, None, arch)
                    row = compile_spec(spec, arch)
                    mode = "decode" if m <= ll.FUSE_SHRINK_MAX_M else "prefill"
                    yield dict(kernel=f"lora_linear/{mode}", arch=arch, dtype="bf16", model=f"{model} {proj}", m=m,
                               n=n, config=[spec.meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")], ctas=spec.ctas,
                               shared_limit=SHARED_LIMIT[arch], sms=SMS[arch], **row)
            # quantize="int8": every LLM linear of a layer through int8_linear (q/v with the LoRA fused), and the
            # first pass of lm_head (an Int8Head: only decode rows, a prefill wants the last position's logits)
            inter = dims["inter"]
            for proj, k, n, lora in (("q_proj", d, d, True), ("v_proj", d, dims["kv"], True), ("o_proj", d, d, False),
                                     ("gate_proj", d, inter, False), ("down_proj", inter, d, False),
                                     ("lm_head", d, dims["vocab"], False)):
                for m in (1, 8, 16) if proj == "lm_head" else (1, 8, 16, 2400):
                    spec = _int8_spec(il, m, k, n, lora, torch.bfloat16, None, arch)
                    mode = "decode" if m <= il.DECODE_MAX_M else "prefill"
                    yield dict(kernel=f"int8_linear/{mode}", arch=arch, dtype="bf16", model=f"{model} {proj}", m=m,
                               n=n, config=[spec.meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")], ctas=spec.ctas,
                               shared_limit=SHARED_LIMIT[arch], sms=SMS[arch], **compile_spec(spec, arch))
                if proj == "lm_head":  # quantize="int4" keeps lm_head int8 (above)
                    continue
                # quantize="int4": the same decoder linears through int4_linear up to FUSED_MAX_M rows, and a
                # prefill's weight through int4_dequant (its GEMM is the unquantized engine's, checked above)
                for m in (1, 8, 16, i4.FUSED_MAX_M):
                    spec = _int4_spec(i4, m, k, n, lora, torch.bfloat16, None, arch)
                    yield dict(kernel="int4_linear/decode", arch=arch, dtype="bf16", model=f"{model} {proj}", m=m,
                               n=n, config=[spec.meta[k] for k in ("BLOCK_M", "BLOCK_N", "GROUPS", "SPLIT_K")],
                               ctas=spec.ctas, shared_limit=SHARED_LIMIT[arch], sms=SMS[arch],
                               **compile_spec(spec, arch))
                spec = _dequant_spec(i4, n, k, torch.bfloat16)
                yield dict(kernel="int4_dequant", arch=arch, dtype="bf16", model=f"{model} {proj}", m=2400, n=n,
                           config=list(i4.DEQUANT_BLOCK), ctas=spec.ctas, shared_limit=SHARED_LIMIT[arch],
                           sms=SMS[arch], **compile_spec(spec, arch))


def faults(rows) -> list[str]:
    """What would fail or waste the GPU: spills, shared memory over the arch's limit, a decode grid that leaves SMs
    idle (N's 16-wide tiles times the K split must cover them)."""
    out = []
    for r in rows:
        what = f"{r['kernel']} {r['arch']} {r.get('model', '')} {r.get('frames', r.get('m', ''))} {r['config']}"
        if r["local"] or r["stack"]:
            out.append(f"{what}: spills (local {r['local']} B, stack {r['stack']} B)")
        if "shared_limit" in r and r["shared"] > r["shared_limit"]:
            out.append(f"{what}: {r['shared']} B of shared memory > the {r['shared_limit']} B limit")
        if r["kernel"] in ("lora_linear/decode", "int8_linear/decode", "int4_linear/decode", "int4_dequant") \
                and "ctas" in r and r["ctas"] < r["sms"]:
            out.append(f"{what}: {r['ctas']} CTAs on {r['sms']} SMs")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    rows = (list(pool_rows()) + list(lora_rows()) + list(int8_rows()) + list(int4_rows()) + list(slot_rows())
            + list(launched_rows()))
    bad = faults(rows)
    if "--json" in argv:
        print(json.dumps({"rows": rows, "faults": bad}))
    else:
        print(f"{'kernel':<22}{'arch':<6}{'shape':<26}{'config':<22}{'CTAs':>6}{'regs':>5}{'shared B':>10}{'local':>7}")
        for r in rows:
            shape = f"{r.get('model', '')} {r.get('frames', r.get('m', ''))} {r.get('pooling', '')}".strip()
            print(f"{r['kernel']:<22}{r['arch']:<6}{shape[:25]:<26}{str(r['config']):<22}{r.get('ctas', ''):>6}"
                  f"{r['reg']:>5}{r['shared']:>10}{r['local']:>7}")
        print("\n".join(["", "faults:"] + bad) if bad else "\nno faults")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
