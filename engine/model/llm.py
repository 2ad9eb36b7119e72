"""Llama-family decoder (Llama / Vicuna / Yi; Mistral configs load too) with a static KV cache.

RMSNorm, RoPE (rope_scaling through transformers' init functions), GQA, SwiGLU, tied or untied head.
q_proj and v_proj carry PLLaVA's LoRA unmerged; its scale alpha/r lives in one 0-dim tensor shared by every
layer, so `set_lora_alpha` is a fill_ on the device: no recompile, no re-merge, CUDA-graph safe.
Module names equal the checkpoint's after `language_model.model.` (and `lm_head`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .. import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        dt = x.dtype
        x32 = x.float()  # in fp32, as the reference: a bf16 variance loses ~3 digits
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dt)


class KVCache(nn.Module):
    """Static cache (B, n_kv, S, hd) allocated once per request for prompt + max_new_tokens."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


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
        self.kernel_path = "torch"

    def forward(self, x):
        if not self.r or self.merged:
            return F.linear(x, self.weight, self.bias)
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale, path=self.kernel_path)


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
        self.attn_backend = "sdpa"  # or flash_attn / xformers for the prefill (ops.check_attn_backend)

    def forward(self, x, cos, sin, input_pos, mask):  # x (B, L, D)
        bsz, n, _ = x.shape
        q = self.q_proj(x).view(bsz, n, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(bsz, n, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, L, hd)
        v = self.v_proj(x).view(bsz, n, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_head
        if self.kv_cache is not None:
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
        if mask is None:  # a prefill from position 0 attends only to itself: causal, no padding to mask
            o = ops.causal_attention(q, k, v, self.attn_backend)
        else:  # decode / continued prefill: the whole static cache, future slots masked out
            o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(bsz, n, -1))


class MLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        b = c.mlp_bias
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=b)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=b)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, lora_r: int, lora_targets):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, lora_r, lora_targets)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, input_pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x (B, H, L, hd); cos/sin (L, hd)
    return x * cos + rotate_half(x) * sin


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
        if self.max_len >= max_len and old is not None and old.k_cache.shape[0] == batch:
            return False  # reuse: every slot past the write position is masked out
        c = self.config
        size = min(-(-max_len // self.CACHE_BUCKET) * self.CACHE_BUCKET, max(max_len, c.max_position_embeddings))
        keep = keep if old is not None and old.k_cache.shape[0] == batch else 0
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
                start: int | None = None) -> torch.Tensor:
        """embeds (B, L, D) at positions input_pos (L,) -> logits (B, L, V) or, by default, (B, 1, V) of the last.
        `start`: the first position as a host int when the caller knows it (prefill); start == 0 takes the plain
        causal path without reading input_pos back from the device."""
        dt = embeds.dtype
        cos, sin = self.rope_cos[input_pos].to(dt), self.rope_sin[input_pos].to(dt)  # (L, hd)
        win = self.config.sliding_window
        windowed = win is not None and self.max_len > win  # Mistral: a key older than `win` positions is unseen
        if start == 0 and embeds.shape[1] > 1 and not windowed:
            mask = None
        else:
            kpos = torch.arange(self.max_len, device=embeds.device)[None, :]
            mask = kpos <= input_pos[:, None]  # (L, S)
            if windowed:
                mask = mask & (kpos > input_pos[:, None] - win)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        if not all_logits:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))
