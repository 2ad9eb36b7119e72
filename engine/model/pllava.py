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
