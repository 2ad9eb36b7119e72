"""CLIP ViT (pre-layernorm, quick_gelu, class token, learned positions), run only up to the layer PLLaVA reads.

Module names equal the checkpoint's after `vision_tower.vision_model.` (HF's `pre_layrnorm` spelling included).
post_layernorm and the layers after `vision_feature_layer` are never built: for ViT-L/14-336 with layer -2 that
skips 1 of 24 layers and the final norm.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import VisionConfig
from pllava.kernels.pool_projector import _ACTS


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The stride-p, kernel-p convolution of CLIP's patch embedding as one GEMM: (T, C, H, W) -> (T, H//p * W//p, D).

    Why not the module's own conv: on CUDA, torch runs an fp32 convolution through cuDNN in TF32 by default
    (`torch.backends.cudnn.allow_tf32` is True; 10 mantissa bits), while an fp32 matmul stays IEEE
    (`torch.backends.cuda.matmul.allow_tf32` is False). This was the one op of an fp32 engine on a GPU that was not
    fp32. As a GEMM it follows the matmul setting like every other layer, on every device. Cost on the CPU (2-core
    Zen 5, ViT-L/14-336, the CPU's 4-frame chunk, median of 7): the embeddings take 21.4 against 17.2 ms with the
    conv in fp32, where one of the tower's 23 layers takes 339 ms (0.05% of the tower); 4.2 against 5.0 ms in bf16.
    Pixels beyond g*p are dropped, as the conv drops them."""
    t, ch, h, w = pixels.shape
    d, _, p, _ = weight.shape
    gh, gw = h // p, w // p  # g, g for CLIP's square frames
    x = pixels[:, :, :gh * p, :gw * p].to(weight.dtype)
    x = x.reshape(t, ch, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(t * gh * gw, ch * p * p)  # (T*g*g, C*p*p)
    return (x @ weight.reshape(d, ch * p * p).t()).view(t, gh * gw, d)  # (T, g*g, D)


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        # a Conv2d for the checkpoint's key and (D, C, p, p) weight; forward runs it as a GEMM (patch_embed)
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.grid * c.grid + 1, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (T, 3, S, S)
        p = patch_embed(pixels, self.patch_embedding.weight)  # (T, g*g, D)
        cls = self.class_embedding.expand(p.shape[0], 1, -1)
        return torch.cat([cls, p], dim=1) + self.position_embedding.weight  # (T, 1+g*g, D)


class CLIPAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        d = c.hidden_size
        self.n_head = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (T, L, D)
        t, n, d = x.shape
        q, k, v = (p(x).view(t, n, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = ops.attention(q, k, v)  # (T, H, L, hd); no mask: CLIP's vision side is bidirectional
        return self.out_proj(o.transpose(1, 2).reshape(t, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.act = _ACTS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(num_layers))


CPU_FRAME_CHUNK = 4  # CLIPVisionTower.frame_chunk on the CPU (measured there)


class CLIPVisionTower(nn.Module):
    """Returns hidden_states[vision_feature_layer] with the CLS token dropped: (T, g*g, D)."""

    def __init__(self, c: VisionConfig, num_layers: int):
        super().__init__()
        self.config = c
        self.embeddings = CLIPEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = CLIPEncoder(c, num_layers)
        # frames a forward encodes at a time (None: all). The runtime sets CPU_FRAME_CHUNK on the CPU: 16 frames at
        # once make (16, 577, 4096) temporaries (75 MB in bf16 at ViT-L), each freshly mapped and page-faulted by
        # the allocator; 4 frames at a time took 230-261 against 311-328 ms a ViT-L layer in bf16 and 1074-1089
        # against 1135-1192 in fp32 (2-core Xeon, AMX; 3 layers, median of 3, two passes), with the same features
        # bit for bit (each frame's rows go through the same kernels whatever else is in the batch). A GPU
        # encodes all frames at once (its caching allocator keeps the memory)
        self.frame_chunk: int | None = None

    def forward(self, pixels: torch.Tensor, stop=None) -> torch.Tensor:  # (T, 3, S, S) -> (T, g*g, D)
        """`stop`: called before each layer (a request's cancel check; it raises to stop)."""
        c = self.frame_chunk
        if c and pixels.shape[0] > c:
            return torch.cat([self._encode(pixels[i:i + c], stop) for i in range(0, pixels.shape[0], c)])
        return self._encode(pixels, stop)

    def _encode(self, pixels: torch.Tensor, stop=None) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels))  # hidden_states[0]
        for layer in self.encoder.layers:
            if stop is not None:
                stop()
            x = layer(x)
        # (T, g*g, D): CLS dropped ("default" strategy). Contiguous, so that the projector's linear_1 runs one addmm
        # whatever T is: on a strided 3-D input torch's bf16 linear rounds the matmul before adding the bias (up to
        # 0.125 apart at T = 4), so a clip encoded frame by frame (T = 1 views are contiguous) and the same clip
        # encoded at once would give other features.
        return x[:, 1:].contiguous()
