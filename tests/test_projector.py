"""PLLaVA's projector + adaptive pooling against torch.nn.AdaptiveAvgPool3d, for shapes that do not divide."""
import pytest
import torch
from torch import nn

from pllava.kernels.pool_projector import pool_projector_reference, pool_projector_torch


def _literal(x, l1, l2, frame_shape, pooling_shape):
    """PllavaMultiModalProjector.forward, written with nn modules: (T, hw, c) -> (T'h'w', d)."""
    h = l2(nn.functional.gelu(l1(x)))
    t, _, d = h.shape
    v = h.reshape(t, *frame_shape, d).permute(3, 0, 1, 2).unsqueeze(0)  # (1, d, T, h, w)
    v = nn.AdaptiveAvgPool3d(pooling_shape)(v)[0]  # (d, T', h', w')
    return v.permute(1, 2, 3, 0).reshape(-1, d)


@pytest.mark.parametrize("t,frame,pool", [(16, (24, 24), (16, 12, 12)), (4, (24, 24), (4, 7, 7)),
                                          (32, (6, 6), (16, 3, 3)), (3, (5, 5), (3, 3, 3)), (1, (24, 24), (1, 12, 12)),
                                          (5, (6, 6), (2, 4, 5))])
def test_pool_projector_matches_adaptive_avg_pool3d(t, frame, pool):
    torch.manual_seed(0)
    c, d = 40, 72
    l1, l2 = nn.Linear(c, d).double(), nn.Linear(d, d).double()
    x = torch.randn(t, frame[0] * frame[1], c, dtype=torch.float64)
    want = _literal(x, l1, l2, frame, pool)
    args = (x, l1.weight, l1.bias, l2.weight, l2.bias, frame, pool)
    for fn in (pool_projector_reference, pool_projector_torch):
        got = fn(*args)
        assert got.shape == (pool[0] * pool[1] * pool[2], d)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_frame_major_order():
    """Row k of the output is frame k // (h'w'): pooling over space only keeps frames apart."""
    x = torch.zeros(3, 16, 2, dtype=torch.float64)
    for k in range(3):
        x[k] = k
    eye = torch.eye(2, dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    out = pool_projector_reference(x, eye, zero, eye, zero, (4, 4), (3, 2, 2), act="relu")
    assert out[:, 0].tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
