"""PLLaVA's projector: linear_1 -> GELU (erf) -> linear_2, then AdaptiveAvgPool3d (T, h, w) -> pooling_shape.

The computation goes through pllava.ops.pool_projector, which runs the Triton kernel on CUDA (pool commuted
before linear_2) and plain torch elsewhere.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class PllavaProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, act: str, frame_shape, pooling_shape):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.linear_2 = nn.Linear(text_dim, text_dim)
        self.act = act
        self.frame_shape = tuple(frame_shape)
        self.pooling_shape = tuple(pooling_shape)
        self.kernel_path = "torch"

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (T, h*w, c) -> (T'*h'*w', d)
        return ops.pool_projector(feats, self.linear_1.weight, self.linear_1.bias, self.linear_2.weight,
                                  self.linear_2.bias, self.frame_shape, self.pooling_shape, self.act,
                                  path=self.kernel_path)
