"""The whole PLLaVA model: vision tower -> projector + pooling -> Llama-family LLM with q/v LoRA."""
from __future__ import annotations

import torch
from torch import nn

from ..config import PllavaConfig
from .llm import LlamaLM, LoRALinear
from .projector import PllavaProjector
from .vision import CLIPVisionTower


class PllavaModel(nn.Module):
    def __init__(self, cfg: PllavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.vision_layers_run)
        self.multi_modal_projector = PllavaProjector(cfg.vision.hidden_size, cfg.text.hidden_size,
                                                     cfg.projector_hidden_act, cfg.frame_shape, cfg.pooling_shape)
        self.language_model = LlamaLM(cfg.text, cfg.lora.r, cfg.lora.target_modules)
        # 0-dim fp32 tensor shared by every LoRA linear: alpha/r, changed in place.
        self.register_buffer("lora_scale", torch.tensor(cfg.lora.scale, dtype=torch.float32), persistent=False)
        self.merged_scale: float | None = None  # merge_lora's alpha/r, which unmerge_lora takes back out

    def lora_linears(self):
        return [m for m in self.language_model.modules() if isinstance(m, LoRALinear) and m.r]

    def bind_lora_scale(self):
        for m in self.lora_linears():
            m.scale = self.lora_scale

    def set_kernel_path(self, path: str):
        self.multi_modal_projector.kernel_path = path
        for m in self.language_model.modules():
            if hasattr(m, "kernel_path"):  # LoRA linears (with r = 0 too: an int8 k/o_proj), int8 MLP linears
                m.kernel_path = path
        for layer in self.language_model.layers:
            layer.self_attn.kernel_path = path

    @torch.no_grad()
    def set_lora_alpha(self, alpha: float):
        if self.config.lora.r:
            self.lora_scale.fill_(self.config.lora.scale_for(alpha))

    def merge_lora(self):
        """Fold each LoRA into its weight at the current scale s (W + s·B·A), keeping what unmerge_lora needs to
        give the original weights back bit for bit."""
        from pllava.kernels import merge, unmerge

        s = float(self.lora_scale)
        for m in self.lora_linears():
            if not m.merged:
                w = m.weight.data
                merged = merge(w, m.lora_A.data, m.lora_B.data, s)
                m.unmerge_fix = _unmerge_fix(w, unmerge(merged, m.lora_A.data, m.lora_B.data, s))
                m.weight.data = merged
                m.merged = True
        self.merged_scale = s

    def unmerge_lora(self):
        """Undo merge_lora exactly. W + s·B·A - s·B·A is W only to rounding (in bf16 one weight in ~20 of a q/v
        layer came back different), so merge_lora kept those few originals (_unmerge_fix) and they are put back."""
        from pllava.kernels import unmerge

        for m in self.lora_linears():
            if m.merged:
                idx, vals = m.unmerge_fix
                if idx is None:  # a dense copy was the smaller record
                    w = vals
                else:
                    w = unmerge(m.weight.data, m.lora_A.data, m.lora_B.data, self.merged_scale)
                    w.view(-1)[idx.long()] = vals
                m.weight.data = w
                m.unmerge_fix = None
                m.merged = False


def _unmerge_fix(w: torch.Tensor, back: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What unmerge_lora writes back where unmerge(merge(w)) = `back` is not w: (flat int32 indices, the original
    values), or (None, a copy of w) where that would not be smaller. Measured on a 1024 x 1024 layer with random
    factors: 1 % (bf16) and 2 % (fp32) of the weights at PLLaVA's scale 4/128, 18 % and 22 % at 0.25, so ~0.06 and
    1.1 bytes a bf16 weight against 2 for a copy. unmerge is deterministic (the same kernels on the same inputs),
    so the same elements come back different when unmerge_lora runs it again."""
    idx = (back != w).view(-1).nonzero().view(-1)
    if w.numel() >= 2 ** 31 or idx.numel() * (4 + w.element_size()) >= w.numel() * w.element_size():
        return None, w.clone()
    idx = idx.to(torch.int32)
    return idx, w.view(-1)[idx].clone()
