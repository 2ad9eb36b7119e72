"""Llama-family decoder (Llama / Vicuna / Yi; Mistral configs load too) with a static KV cache.

RMSNorm, RoPE (rope_scaling through transformers' init functions), GQA, SwiGLU, tied or untied head.
q_proj and v_proj carry PLLaVA's LoRA unmerged; its scale alpha/r lives in one 0-dim tensor shared by every
layer, so `set_lora_alpha` is a fill_ on the device: no recompile, no re-merge, CUDA-graph safe.
Module names equal the checkpoint's after `language_model.model.` (and `lm_head`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .. import ops
from ..memory import check_host_allocation
from .quant import DECODE_ROWS, Int8Linear, int8_linear, scratch


def _into_ok(t: torch.Tensor, other: torch.Tensor | None = None) -> bool:
    """Whether `t op other` may be written into t (or into a buffer this call reuses) as the same operation: eager
    (a compiled graph plans its own buffers), under no_grad (autograd keeps inputs), and with the result in t's
    dtype (tensors of one or more dimensions: promote_types is their result_type)."""
    return (not torch.compiler.is_compiling() and not torch.is_grad_enabled()
            and (other is None or torch.promote_types(t.dtype, other.dtype) == t.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        # Up to this many rows the output stays in fp32 (LlamaLM.set_fp32_rows: decode rows on the CPU under int8,
        # whose linears take fp32 activations at no cost); 0: always out_dtype
        self.fp32_rows = 0
        self.out_dtype: torch.dtype | None = None  # None: the weight's; set where the weight is held in fp32

    def forward(self, x):
        dt = x.dtype
        x32 = x.float()  # in fp32, as the reference: a bf16 variance loses ~3 digits
        if x.numel() <= self.fp32_rows * x.shape[-1]:
            return self.weight.float() * self._normed(x32)
        # in the next linear's input dtype (out_dtype, else the weight's): for an x in the weight's dtype that is the
        # reference's weight * x.to(dt); for an fp32 residual stream (LlamaLM.residual_dtype) one rounding, not two
        out = self.out_dtype or self.weight.dtype
        if not _into_ok(x32):
            return (self.weight * self._normed(x32).to(dt)).to(out)
        # The same operations, each product written over a temporary this call made: a prefill's (L, D) temporaries
        # are fresh allocations the allocator maps anew and page-faults (pllava-7b, L = 2350, fp32 residual: 5 of
        # them, 38 MB each in fp32, a norm; 3 in place)
        t = self._normed(x32, into_square=True).to(dt)
        if _into_ok(t, self.weight):
            return t.mul_(self.weight).to(out)  # weight * t: one IEEE product an element either way round
        return (self.weight * t).to(out)

    def _normed(self, x32, into_square: bool = False):
        """x32 * rsqrt(mean(x32^2) + eps) in fp32; written over the square's own buffer when into_square."""
        sq = x32.pow(2)
        r = torch.rsqrt(sq.mean(-1, keepdim=True) + self.eps)
        return torch.mul(x32, r, out=sq) if into_square else x32 * r


class KVCache(nn.Module):
    """Static cache (B, n_kv, S, hd) allocated once per request for prompt + max_new_tokens."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class SlotKVCache:
    """KV cache of `num_slots` independent sequences, each up to `slot_len` positions: per layer K and V of
    (slots, n_kv, S, hd). A slot is owned by one request at a time; what it held stays readable after the
    request ends (a later question about the same clip reuses its video prefix) but is never attended to by
    another request: attention reads a row's own positions [0, length) only."""

    def __init__(self, c: TextConfig, num_slots: int, slot_len: int, dtype, device):
        shape = (num_slots, c.num_key_value_heads, slot_len, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.num_slots, self.slot_len = num_slots, slot_len

    @staticmethod
    def bytes_per_token(c: TextConfig, dtype) -> int:
        """K and V of every layer for one position (PLLaVA-7B in bf16: 2 * 32 * 32 * 128 * 2 = 512 KiB)."""
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_prefix(self, src: int, dst: int, n: int, src_cache: "SlotKVCache | None" = None):
        """Positions [0, n) of slot src (of src_cache, default this cache) into slot dst: a video prefix held by a
        busy slot, or by the slots of an outgrown cache."""
        other = self if src_cache is None else src_cache
        for k, v, k_src, v_src in zip(self.k, self.v, other.k, other.v):
            k[dst, :, :n].copy_(k_src[src, :, :n])
            v[dst, :, :n].copy_(v_src[src, :, :n])


@dataclass
class SlotRows:
    """Which slot and positions each row of a batched forward uses. Decode: B rows of one token; prefill (or a
    chunk of one): one row of L tokens."""
    slots: list[int]  # cache slot of each row
    starts: list[int]  # position of each row's first new token
    pos_t: torch.Tensor  # (B, L) positions on the device
    slot_t: torch.Tensor  # (B,) slots on the device
    scale: torch.Tensor  # LoRA alpha/r: 0-dim (one row) or (B * L,)


class LoRALinear(nn.Module):
    """A linear with an optional unmerged LoRA (r = 0: a plain linear). lora_A (r, in), lora_B (out, r)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, r: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None
        self.r = r
        if r:
            self.lora_A = nn.Parameter(torch.empty(r, d_in))
            self.lora_B = nn.Parameter(torch.empty(d_out, r))
        self.scale: torch.Tensor | None = None  # set by the model: the shared 0-dim alpha/r tensor
        self.merged = False
        self.unmerge_fix = None  # merge_lora: what unmerge_lora restores exactly (model.pllava._unmerge_fix)
        self.kernel_path = "torch"
        # quantize="int8" (model/quant.py): the base weight as int8 + per-row scales (None buffers until then)
        self.register_buffer("qweight", None)
        self.register_buffer("qscale", None)
        self.act_int8 = False  # quantize="w8a8": a prefill's rows in int8 too (quant.int8_linear)

    def forward(self, x, scale: torch.Tensor | None = None):
        """`scale`: overrides the shared alpha/r for this call: 0-dim, or one per row of x (a batch of requests,
        each with its own alpha)."""
        if self.qweight is not None:  # int8 base weight, the LoRA unmerged at its live scale (fused on Triton)
            lora = (self.lora_A, self.lora_B, self.scale if scale is None else scale) if self.r else None
            return int8_linear(x, self.qweight, self.qscale, self.bias, lora, self.kernel_path,
                               act_int8=self.act_int8)
        if not self.r or self.merged:
            return F.linear(x, self.weight, self.bias)
        s = self.scale if scale is None else scale
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, s, path=self.kernel_path)


class Attention(nn.Module):
    def __init__(self, c: TextConfig, lora_r: int, lora_targets):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        d, qd, kvd = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        b = c.attention_bias

        def lin(name, i, o):
            return LoRALinear(i, o, b, lora_r if name in lora_targets else 0)

        self.q_proj, self.k_proj, self.v_proj = lin("q_proj", d, qd), lin("k_proj", d, kvd), lin("v_proj", d, kvd)
        self.o_proj = lin("o_proj", qd, d)
        self.kv_cache: KVCache | None = None
        self.window = c.sliding_window
        self.kernel_path = "torch"  # 'triton': decode attention by the slot kernel (batched, and graph steps)
        self.attn_backend = "sdpa"  # or flash_attn / xformers for the prefill (ops.check_attn_backend)

    def forward(self, x, cos, sin, input_pos, mask, kv_len: int | None = None):  # x (B, L, D)
        bsz, n, _ = x.shape
        q = self.q_proj(x).view(bsz, n, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(bsz, n, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, L, hd)
        v = self.v_proj(x).view(bsz, n, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_head
        if self.kv_cache is not None:
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            if kv_len is not None:  # read the used positions only, not the whole static cache
                k_all, v_all = k_all[:, :, :kv_len], v_all[:, :, :kv_len]
        if mask is None:  # a prefill from position 0 attends only to itself: causal, no padding to mask
            o = ops.causal_attention(q, k, v, self.attn_backend)
        elif kv_len is None and n == 1 and bsz == 1 and self.kernel_path == "triton" and k_all.dtype == q.dtype:
            # a CUDA-graph decode step (no host length): the slot kernel reads positions [0, pos] only, with pos on
            # the device, where the masked SDPA below would read the whole static cache (and 0 x NaN of a stale
            # slot is NaN); with a sliding window (Mistral) only (pos - window, pos]
            slot = torch.zeros(1, dtype=torch.long, device=q.device)
            o = ops.slot_decode_attention(q, k_all, v_all, slot, input_pos, self.window, self.attn_backend)
        elif (n == 1 and bsz == 1 and k_all.dtype in ops.CPU_KV_DTYPES and q.device.type == "cpu"
              and ops.native_decode_attention() is not None):
            # a CPU decode step (an fp32 or bf16 cache), eager or compiled: pllava._C's kernel reads exactly the
            # positions the mask below admits, [lo, pos], at twice SDPA's bandwidth (csrc/decode_attention.cpp). The
            # position comes from input_pos, so the compiled step's one static graph serves every length; eager
            # steps call the op's body directly (its dispatch: 7-12 us a layer)
            attend = torch.ops.pllava.decode_attention_cpu if torch.compiler.is_compiling() else ops.decode_attention_at
            o = attend(q.float(), k_all, v_all, input_pos, self.window or 0).to(q.dtype)
        else:
            o = None
            if n > 1 and bsz == 1 and kv_len is not None and (self.window is None or kv_len <= self.window):
                # a continued prefill (the question after a video prefix): the kernel of a whole bf16 prompt on
                # the CPU, over the used positions (the last n are this call's), so that a row's bits do not depend
                # on where its prompt was split (ops.cpu_attention_bf16; None elsewhere)
                o = ops.cpu_attention_bf16(q, k_all, v_all, causal=True)
            if o is None:  # decode / continued prefill: the whole static cache, future slots masked out. On the
                # CPU in fp32 whatever the cache holds (bf16 decode attention is 7x slower there: 1.67 ms against
                # 0.23 ms a layer at 2400 keys, 12 heads); elsewhere in the cache's dtype
                dt = torch.float32 if q.device.type == "cpu" else k_all.dtype
                o = F.scaled_dot_product_attention(q.to(dt), k_all.to(dt), v_all.to(dt), attn_mask=mask,
                                                   enable_gqa=gqa).to(q.dtype)
        return self.o_proj(o.transpose(1, 2).reshape(bsz, n, -1))

    def forward_slots(self, x, cos, sin, rows: "SlotRows", kc: torch.Tensor, vc: torch.Tensor, window):
        """x (B, L, D): L new tokens of each row, written into its cache slot at rows.starts[b].. and attending
        to that slot's positions [0, start + L) only (never to unused or stale positions of the slot)."""
        bsz, n, _ = x.shape
        q = self.q_proj(x, rows.scale).view(bsz, n, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(bsz, n, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, L, hd)
        v = self.v_proj(x, rows.scale).view(bsz, n, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kw, vw = k.to(kc.dtype), v.to(vc.dtype)  # as the cache holds them (fp32 under bf16 weights on the CPU)
        if n == 1 and self.kernel_path == "triton":
            # decode addressed by device tensors only (no host integers): one CUDA graph serves every length
            pos = rows.pos_t[:, 0]
            kc[rows.slot_t, :, pos] = kw[:, :, 0]
            vc[rows.slot_t, :, pos] = vw[:, :, 0]
            o = ops.slot_decode_attention(q, kc, vc, rows.slot_t, pos, window, self.attn_backend)
            return self.o_proj(o.transpose(1, 2).reshape(bsz, n, -1))
        if bsz == 1:
            s, a = rows.slots[0], rows.starts[0]
            kc[s, :, a:a + n].copy_(kw[0])
            vc[s, :, a:a + n].copy_(vw[0])
        else:  # decode: one token a row, each at its own position of its own slot
            kc[rows.slot_t, :, rows.pos_t[:, 0]] = kw[:, :, 0]
            vc[rows.slot_t, :, rows.pos_t[:, 0]] = vw[:, :, 0]
        if bsz == 1 and rows.starts[0] == 0 and not (window is not None and n > window):
            o = ops.causal_attention(q, k, v, self.attn_backend)  # a whole prompt: generate()'s path
        else:  # what reads the cache attends as generate()'s path does (in the dtype ops.slot_attention picks)
            o = ops.slot_attention(q, kc, vc, rows.slots, rows.starts, window)
        return self.o_proj(o.transpose(1, 2).reshape(bsz, n, -1))


class MLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        b = c.mlp_bias
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=b)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=b)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=b)

    def forward(self, x):
        g, u = self._gate_up(x)  # (B, L, inter) each
        if not _into_ok(g, u):  # autograd needs silu's input kept; a wider u promotes; compiled: its own buffers
            return self.down_proj(F.silu(g) * u)
        # in place, the same bits: a prefill's (L, inter) temporaries are fresh allocations the allocator maps anew
        # and page-faults as they are written (small preset, L = 2307, bf16: silu + product 2.6-35 ms a layer,
        # 1.7-4.6 in place; pllava-7b's are 52-103 MB, past glibc's 32 MB mmap threshold, so always fresh)
        return self.down_proj(F.silu(g, inplace=True).mul_(u))

    def _gate_up(self, x):
        """gate_proj(x), up_proj(x); for a CPU prefill's rows (eager, no_grad) written into this thread's two
        reused buffers (quant.scratch) by the same GEMMs: pllava-7b's are (2350, 11008), 52 MB each in bf16, past
        glibc's 32 MB mmap threshold, so fresh ones were mapped and page-faulted every layer (36 k faults for 2
        layers). Nothing holds them past forward: the SwiGLU runs in g, and down_proj's output is its own."""
        m = x.numel() // x.shape[-1]
        if x.device.type != "cpu" or m <= DECODE_ROWS or not x.is_contiguous() or not _into_ok(x):
            return self.gate_proj(x), self.up_proj(x)
        outs = []
        for name, lin in (("mlp.gate", self.gate_proj), ("mlp.up", self.up_proj)):
            if isinstance(lin, Int8Linear) and lin.kernel_path == "torch" and lin.bias is None:
                y = int8_linear(x, lin.qweight, lin.qscale, None, out=scratch(name, (m, lin.out_features), x.dtype),
                                act_int8=lin.act_int8)
            elif type(lin) is nn.Linear and lin.weight.dtype == x.dtype:  # F.linear's mm / addmm, out= form
                b, o = lin.bias, scratch(name, (m, lin.out_features), x.dtype)
                x2, w = x.reshape(m, -1), lin.weight.t()
                y = torch.mm(x2, w, out=o) if b is None else torch.addmm(b, x2, w, out=o)
            else:
                y = lin(x)
            outs.append(y.view(*x.shape[:-1], -1))
        return outs


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, lora_r: int, lora_targets):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, lora_r, lora_targets)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, input_pos, mask, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, kv_len)
        return _residual_add(x, self.mlp(self.post_attention_layernorm(x)))

    def forward_slots(self, x, cos, sin, rows, kc, vc, window):
        x = x + self.self_attn.forward_slots(self.input_layernorm(x), cos, sin, rows, kc, vc, window)
        return _residual_add(x, self.mlp(self.post_attention_layernorm(x)))


def _residual_add(h, m):
    """h + m, into h (the attention's residual sum, made by the layer) where that is the same operation: under
    no_grad, with the sum in h's dtype (an fp32 m, the CPU's int8 decode rows, promotes a bf16 h: then out of
    place). A prefill's residual is (L, D) fresh each add, 38 MB in fp32 for pllava-7b at L = 2350."""
    if not _into_ok(h, m):
        return h + m
    return h.add_(m)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x (B, H, L, hd); cos/sin (L, hd)
    if not _into_ok(x, cos):  # (a wider cos promotes: out of place)
        return x * cos + rotate_half(x) * sin
    # the same products and sum, the last two written over temporaries this call made (2 fresh (B, H, L, hd)
    # tensors fewer: pllava-7b's prefill q and k are 19 MB each in bf16)
    return (x * cos).add_(rotate_half(x).mul_(sin))


def rope_inv_freq(c: TextConfig) -> tuple[torch.Tensor, float]:
    """inv_freq (hd/2,) in fp32 and the attention scaling factor (1.0 but for yarn)."""
    rp = c.rope_parameters
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype == "default":
        theta = float(rp.get("rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # linear, llama3, yarn: transformers' math

    inv, scaling = ROPE_INIT_FUNCTIONS[rtype](c.hf, torch.device("cpu"))
    return inv.float(), float(scaling)


class LlamaLM(nn.Module):
    def __init__(self, c: TextConfig, lora_r: int = 0, lora_targets=("q_proj", "v_proj")):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, lora_r, lora_targets) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        self.max_len = 0
        self.cache_generation = 0
        # PLLaVA's modeling embeds every <image> id as pad_token_id before the lookup (the spliced one is then
        # replaced by the clip): an <image> the model generates is fed back as the pad embedding. None: as is.
        self.image_token_id: int | None = None
        self.pad_token_id: int | None = None
        # The residual stream's dtype (None: the embeddings'). The runtime sets fp32 under bf16/fp16 weights on the
        # CPU: every GEMM still takes bf16 inputs, but the sum of 2 x layers increments is not rounded to bf16 at
        # each add. benchmarks/bench_quality.py 1024, bf16 decode rows then: bf16 + int8 disagreed with fp32 at
        # 767 / 279 (prompt / decode) positions, 855 / 329 with a bf16 residual; the adds are (L, D) elementwise,
        # no cost the bench can see. (int8's decode rows are fp32 now, whose outputs promote the residual anyway.)
        self.residual_dtype: torch.dtype | None = None

    def set_fp32_rows(self, rows: int, dtype: torch.dtype | None = None):
        """Forwards of at most `rows` rows keep their activations in fp32 through the norms (quant.py: the CPU's
        int8 decode rows); the linears' outputs are then fp32 by their kernel, the residual by residual_dtype.
        Longer forwards (prefill) get the norms' output in `dtype` (default: the norm weight's), the next linear's
        input: the runtime holds these norms' weights in fp32 (as the checkpoint stores them) under int8."""
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.fp32_rows, m.out_dtype = rows, dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape) -> embeddings, <image> ids looked up as pad_token_id (graph-safe: no branch)."""
        if self.image_token_id is not None and self.pad_token_id is not None:
            ids = torch.where(ids == self.image_token_id, self.pad_token_id, ids)
        return self.embed_tokens(ids)

    def setup_rope(self, device):
        """(max_position_embeddings, hd) cos/sin tables in fp32; built once after the weights are loaded."""
        inv, scaling = rope_inv_freq(self.config)
        pos = torch.arange(self.config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv)  # fp32, the same products the reference forms
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos = (emb.cos() * scaling).to(device)
        self.rope_sin = (emb.sin() * scaling).to(device)

    CACHE_BUCKET = 256  # positions: sizes are rounded up so the next request usually fits without reallocating

    def setup_cache(self, batch: int, max_len: int, dtype, device, keep: int = 0) -> bool:
        """Make sure the cache holds max_len positions; returns True when it was (re)allocated. The first `keep`
        positions survive a reallocation (a cached video prefix)."""
        old = self.layers[0].self_attn.kv_cache
        if self.max_len >= max_len and old is not None and old.k_cache.shape[0] == batch and old.k_cache.dtype == dtype:
            return False  # reuse: every slot past the write position is masked out
        c = self.config
        size = min(-(-max_len // self.CACHE_BUCKET) * self.CACHE_BUCKET, max(max_len, c.max_position_embeddings))
        keep = keep if old is not None and old.k_cache.shape[0] == batch else 0  # (a dtype change keeps it, converted)
        held = 0 if old is None else 2 * old.k_cache.numel() * old.k_cache.element_size()  # one layer's K and V
        check_host_allocation(  # before any layer's cache is replaced, so a refusal leaves the old one whole; the
            # peak: every new layer while the last old one is still held
            SlotKVCache.bytes_per_token(c, dtype) * size * batch - held * (len(self.layers) - 1), device,
            f"a KV cache of {size} positions", "ask for fewer new tokens or a shorter prompt, or free memory")
        for layer in self.layers:
            prev = layer.self_attn.kv_cache
            new = KVCache(batch, c.num_key_value_heads, size, c.head_dim, dtype, device)
            if keep:
                new.k_cache[:, :, :keep].copy_(prev.k_cache[:, :, :keep])
                new.v_cache[:, :, :keep].copy_(prev.v_cache[:, :, :keep])
            layer.self_attn.kv_cache = new  # the old one is freed layer by layer: peak = one layer's extra
        self.max_len = size
        self.cache_generation += 1  # what a captured decode graph is tied to (ids of freed tensors get reused)
        return True

    def free_cache(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_len = 0

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, all_logits: bool = False,
                start: int | None = None, kv_len: int | None = None, stop=None) -> torch.Tensor:
        """embeds (B, L, D) at positions input_pos (L,) -> logits (B, L, V) or, by default, (B, 1, V) of the last.
        `start`: the first position as a host int when the caller knows it (prefill); start == 0 takes the plain
        causal path without reading input_pos back from the device. `kv_len`: positions in use after this call
        (a host int; eager steps): attention reads only those, not the whole cache (after one long request the
        next decoded 1.3-1.7x slower over the unused slots). A captured CUDA graph passes None. `stop`: called
        before each layer (a prefill's cancel check, generate.stop_check; it raises to stop)."""
        dt = embeds.dtype
        cos, sin = self.rope_cos[input_pos].to(dt), self.rope_sin[input_pos].to(dt)  # (L, hd)
        win = self.config.sliding_window
        windowed = win is not None and self.max_len > win  # Mistral: a key older than `win` positions is unseen
        if start == 0 and embeds.shape[1] > 1 and not windowed:
            mask = None
        else:
            kpos = torch.arange(self.max_len if kv_len is None else kv_len, device=embeds.device)[None, :]
            mask = kpos <= input_pos[:, None]  # (L, S)
            if windowed:
                mask = mask & (kpos > input_pos[:, None] - win)
        x = embeds if self.residual_dtype is None else embeds.to(self.residual_dtype)
        for layer in self.layers:
            if stop is not None:
                stop()
            x = layer(x, cos, sin, input_pos, mask, kv_len)
        if not all_logits:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def forward_slots(self, embeds: torch.Tensor, rows: SlotRows, cache: SlotKVCache, stop=None) -> torch.Tensor:
        """embeds (B, L, D) of the rows described by `rows` -> logits (B, 1, V) of each row's last position.
        `stop`: called before each layer (a prefill's cancel check)."""
        dt = embeds.dtype
        cos = self.rope_cos[rows.pos_t].to(dt)[:, None]  # (B, 1, L, hd)
        sin = self.rope_sin[rows.pos_t].to(dt)[:, None]
        x = embeds if self.residual_dtype is None else embeds.to(self.residual_dtype)
        for layer, kc, vc in zip(self.layers, cache.k, cache.v):
            if stop is not None:
                stop()
            x = layer.forward_slots(x, cos, sin, rows, kc, vc, self.config.sliding_window)
        h = self.norm(x[:, -1:])  # (B, 1, D)
        if h.device.type == "cpu" and h.shape[0] > 1 and isinstance(self.lm_head, nn.Linear):
            # CPU BLAS runs the (V, D) x (D, B) product of a skinny batch 1.7x faster than (B, D) x (D, V)
            # (small preset, 8 rows, fp32, 2 cores: 9.9 ms against 16.7 ms a decode step)
            return (self.lm_head.weight @ h[:, 0].T).T[:, None]
        return self.lm_head(h)
