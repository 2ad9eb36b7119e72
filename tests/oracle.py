"""The reference: transformers' LlavaForConditionalGeneration modules on the same tiny checkpoint, with PLLaVA's
pooling and the LoRA merged into q/v (W + (alpha/r)·B·A), run without a KV cache (every step recomputes)."""
from __future__ import annotations

import re

import torch
from safetensors import safe_open
from torch import nn

from pllava.testing import LAYOUTS  # noqa: F401  (layouts the factory writes)

_LORA = re.compile(r"layers\.(\d+)\.self_attn\.(q_proj|v_proj)\.lora_([AB])(?:\.default)?\.weight$")


def read_lora(files) -> dict:
    """{(layer, proj): {'A': tensor, 'B': tensor}} read straight from safetensors files."""
    out: dict = {}
    for fn in files:
        with safe_open(fn, "pt") as f:
            for k in f.keys():
                m = _LORA.search(k)
                if m:
                    out.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = f.get_tensor(k).double()
    return out


def load_oracle(current_dir: str, lora: dict | None = None, alpha: float = 4.0):
    from transformers import LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration.from_pretrained(current_dir, dtype=torch.float32).eval()
    if lora:
        with torch.no_grad():
            for (i, proj), ab in lora.items():
                lin = getattr(m.model.language_model.layers[i].self_attn, proj)
                r = ab["A"].shape[0]
                lin.weight += ((alpha / r) * ab["B"] @ ab["A"]).float()
    return m


@torch.no_grad()
def oracle_embeds(m, pixel_values, input_ids, image_token_index, pooling_shape, num_frames):
    vt = m.model.vision_tower(pixel_values, output_hidden_states=True)
    feats = vt.hidden_states[-2][:, 1:]  # (T, h*w, c)
    if feats.shape[0] < num_frames:  # PLLaVA's projector repeat
        feats = feats.repeat_interleave(num_frames // feats.shape[0] + 1, dim=0)[:num_frames]
    h = m.model.multi_modal_projector(feats)  # (T, h*w, d): linear_1 -> gelu -> linear_2
    t, hw, d = h.shape
    g = int(round(hw ** 0.5))
    video = h.reshape(t, g, g, d).permute(3, 0, 1, 2).unsqueeze(0)  # (1, d, T, h, w)
    pooled = nn.AdaptiveAvgPool3d(tuple(pooling_shape))(video)[0]  # (d, T', h', w')
    vis = pooled.permute(1, 2, 3, 0).reshape(-1, d)
    emb = m.model.language_model.embed_tokens(input_ids)
    pos = int((input_ids == image_token_index).nonzero()[0])
    return torch.cat([emb[:pos], vis, emb[pos + 1:]])


@torch.no_grad()
def oracle_logits(m, embeds):
    out = m.model.language_model(inputs_embeds=embeds[None])
    return m.lm_head(out.last_hidden_state)[0]  # (L, V)


@torch.no_grad()
def oracle_greedy(m, embeds, n: int, eos: set[int] = frozenset()):
    toks = []
    e = embeds
    for _ in range(n):
        t = int(oracle_logits(m, e)[-1].argmax())
        toks.append(t)
        if t in eos:
            break
        # PLLaVA's forward embeds an <image> id as pad_token_id (transformers' llava would not): the authors' rule,
        # read from the oracle's own config
        if t == m.config.image_token_index and m.config.pad_token_id is not None:
            t_in = m.config.pad_token_id
        else:
            t_in = t
        e = torch.cat([e, m.model.language_model.embed_tokens(torch.tensor([t_in], device=e.device))])
    return toks


PLAIN_QUESTION = "USER:<image> What is happening in the video? ASSISTANT:"  # conv_plain_v1, typed from PLLaVA


def oracle_inputs(model_dir: str, literal: str = PLAIN_QUESTION):
    """What the oracle needs, from transformers' own classes and nothing of the engine: the tokenizer's ids of the
    literal prompt, and image_token_index, pooling_shape, num_frames and the EOS ids from AutoConfig."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    ids = torch.tensor(tok(literal)["input_ids"])
    eos = cfg.text_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return ids, cfg.image_token_index, tuple(cfg.pooling_shape), cfg.num_frames, eos
