"""A CPU prefill's large temporaries written in place or into reused buffers (fresh ones are page-faulted at each
call): every such path must give the bits of the plain out-of-place formula, written here with torch's own ops,
leave its inputs as they were, and keep the out-of-place form where in place would change the result (grad
enabled, a promoting dtype)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pllava.model import quant
from pllava.model.llm import MLP, RMSNorm, _residual_add, apply_rope
from pllava.model.quant import DECODE_ROWS, Int8Linear

ROWS = 2 * (DECODE_ROWS + 5)  # (2, 21) rows: a prefill's, past the decode rows' bound


def _rand(shape, g, dtype=torch.float32):
    return torch.randn(shape, generator=g).to(dtype)


def _ref_rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


@pytest.mark.parametrize("x_dt,cos_dt", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                         (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=str)
def test_rope_is_the_reference_bit_for_bit(x_dt, cos_dt):
    g = torch.Generator().manual_seed(1)
    x = _rand((1, 21, 3, 16), g, x_dt).transpose(1, 2)  # (B, H, L, hd) as the attention's view: not contiguous
    cos, sin = _rand((21, 16), g, cos_dt), _rand((21, 16), g, cos_dt)
    x0 = x.clone()
    want = _ref_rope(x, cos, sin)
    with torch.no_grad():
        got = apply_rope(x, cos, sin)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(x, x0)
    assert torch.equal(apply_rope(x, cos, sin), want)  # grad enabled: the out-of-place form, the same bits


@pytest.mark.parametrize("x_dt,w_dt,out_dt", [
    (torch.float32, torch.float32, torch.bfloat16),  # the engine's bf16 + int8: fp32 residual and norm weights
    (torch.bfloat16, torch.bfloat16, None),  # plain bf16
    (torch.bfloat16, torch.float32, torch.bfloat16),  # fp32 norm weights over a bf16 residual: promotes
    (torch.float32, torch.float32, None),  # fp32
    (torch.float32, torch.bfloat16, None),  # a bf16 weight over an fp32 residual
], ids=str)
def test_rms_norm_is_the_reference_bit_for_bit(x_dt, w_dt, out_dt):
    g = torch.Generator().manual_seed(2)
    n = RMSNorm(24, 1e-5)
    n.weight.data = _rand((24,), g, w_dt)
    n.out_dtype = out_dt
    x = _rand((1, ROWS, 24), g, x_dt) * 3
    x0 = x.clone()
    x32 = x.float()
    want = (n.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x_dt)).to(out_dt or w_dt)
    with torch.no_grad():
        got = n(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(x, x0)
    assert torch.equal(n(x).detach(), want)  # grad enabled


@pytest.mark.parametrize("h_dt,m_dt", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                       (torch.bfloat16, torch.bfloat16)], ids=str)
def test_residual_add_is_the_reference_and_in_place_only_where_the_same(h_dt, m_dt):
    g = torch.Generator().manual_seed(4)
    h, m = _rand((1, ROWS, 8), g, h_dt), _rand((1, ROWS, 8), g, m_dt)
    want = h + m
    with torch.no_grad():
        got = _residual_add(h, m)
    assert got.dtype == want.dtype and torch.equal(got, want)
    # in place exactly where the sum stays in h's dtype (a bf16 h plus an fp32 decode row's output promotes)
    assert (got.data_ptr() == h.data_ptr()) == (want.dtype == h_dt)


def _int8_ref(x, lin):
    q, s = lin.qweight, lin.qscale
    if x.dtype == torch.bfloat16:  # quant.int8_linear's prefill form: the GEMM on q, then the scale
        return F.linear(x, q.to(x.dtype)) * s
    return F.linear(x, q.to(x.dtype) * s.to(x.dtype)[:, None])


@pytest.mark.parametrize("kind", ["int8-bf16", "int8-fp32", "linear-bf16", "linear-bf16-bias", "linear-fp32"])
def test_mlp_prefill_rows_use_reused_buffers_with_the_reference_bits(kind):
    """Prefill rows' gate and up products go into this thread's two reused buffers (quant.scratch): the MLP's
    output has the reference's bits, a second call (other inputs) leaves the first's output as it was, and the
    buffers are the ones used (they exist, sized to the rows)."""
    g = torch.Generator().manual_seed(5)
    dt = torch.float32 if kind.endswith("fp32") else torch.bfloat16
    m = MLP(SimpleNamespace(hidden_size=24, intermediate_size=40, mlp_bias=kind.endswith("bias"))).to(dt)
    for p in m.parameters():
        p.data.copy_(_rand(p.shape, g) * 0.3)
    if kind.startswith("int8"):
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(m, name, Int8Linear(getattr(m, name)))

        def lin(x, mod):
            return _int8_ref(x, mod)
    else:
        def lin(x, mod):
            return F.linear(x, mod.weight, mod.bias)
    for name in ("mlp.gate", "mlp.up"):
        quant._SCRATCH.__dict__.pop(name, None)
    outs = []
    for seed in (6, 7):
        x = _rand((2, ROWS // 2, 24), torch.Generator().manual_seed(seed), dt)
        want = lin(F.silu(lin(x, m.gate_proj)) * lin(x, m.up_proj), m.down_proj)
        with torch.no_grad():
            got = m(x)
        assert got.dtype == dt and torch.equal(got, want), seed
        outs.append((got, want))
    assert all(torch.equal(got, want) for got, want in outs)  # the first output is no view of a reused buffer
    for name in ("mlp.gate", "mlp.up"):
        buf = quant._SCRATCH.__dict__[name]
        assert buf.dtype == dt and buf.numel() == ROWS * 40


def test_mlp_decode_rows_and_grad_keep_the_plain_path():
    """At most DECODE_ROWS rows, or with grad enabled, gate and up are plain calls (no reused buffer)."""
    g = torch.Generator().manual_seed(8)
    m = MLP(SimpleNamespace(hidden_size=24, intermediate_size=40, mlp_bias=False))
    for p in m.parameters():
        p.data.copy_(_rand(p.shape, g))
    for name in ("mlp.gate", "mlp.up"):
        quant._SCRATCH.__dict__.pop(name, None)
    with torch.no_grad():
        m(_rand((1, DECODE_ROWS, 24), g))
    m(_rand((1, ROWS, 24), g)).sum().backward()
    assert "mlp.gate" not in quant._SCRATCH.__dict__ and "mlp.up" not in quant._SCRATCH.__dict__
    assert m.gate_proj.weight.grad is not None


def test_int8_linear_out_is_refused_outside_cpu_prefill_rows():
    g = torch.Generator().manual_seed(9)
    lin = Int8Linear(torch.nn.Linear(24, 40, bias=False))
    x = _rand((DECODE_ROWS, 24), g)
    with pytest.raises(ValueError, match="prefill rows"):
        quant.int8_linear(x, lin.qweight, lin.qscale, None, out=torch.empty(DECODE_ROWS, 40))
    x = _rand((ROWS, 24), g, torch.bfloat16)
    with pytest.raises(ValueError, match="x's dtype"):
        quant.int8_linear(x, lin.qweight, lin.qscale, None, out=torch.empty(ROWS, 40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_in_place_swiglu_is_the_reference_bit_for_bit_and_keeps_autograd(dtype):
    """MLP.forward computes silu(gate) * up in place under no_grad (fresh prefill temporaries cost page faults):
    the same bits as the out-of-place formula written here with torch's own ops, and with grad enabled the
    out-of-place path still backpropagates."""
    g = torch.Generator().manual_seed(3)
    m = MLP(SimpleNamespace(hidden_size=24, intermediate_size=40, mlp_bias=True)).to(dtype)  # what MLP reads
    for p in m.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 7, 24, generator=g).to(dtype)
    with torch.no_grad():
        want = F.linear(F.silu(F.linear(x, m.gate_proj.weight, m.gate_proj.bias))
                        * F.linear(x, m.up_proj.weight, m.up_proj.bias), m.down_proj.weight, m.down_proj.bias)
        got = m(x)
    assert got.dtype == dtype and torch.equal(got, want)
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    assert torch.equal(y.detach(), want)
    y.float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad.float()).all()
