"""The patch embedding as a GEMM (`model/vision.patch_embed`) against torch's convolution in fp64, and the fp32
engine's op trace: no convolution anywhere, so nothing of it reaches cuDNN's TF32 default on a GPU."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pllava
from pllava.model.vision import patch_embed
from triton_util import TRITON_DEVICE

DEVICES = sorted({"cpu", TRITON_DEVICE})  # and the GPU where there is one (benchmarks/gpu_tests.txt lists this module)

# (T, C, S, p, D): CLIP's (3 channels, S a multiple of p), a grey one, an S that leaves a remainder, odd sizes, and
# non-square frames (H, W) as the conv takes them
SHAPES = [(2, 3, 28, 14, 32), (1, 1, 10, 5, 7), (3, 3, 17, 4, 9), (2, 2, 9, 9, 5), (2, 3, (28, 45), 14, 6)]


def _conv_reference(px, w):  # fp64 conv, flattened as HF's CLIPVisionEmbeddings does: (T, g*g, D)
    return F.conv2d(px.double(), w.double(), stride=w.shape[-1]).flatten(2).transpose(1, 2)


def _case(shape, seed=0):
    t, c, s, p, d = shape
    h, w = s if isinstance(s, tuple) else (s, s)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, c, h, w, generator=g), torch.randn(d, c, p, p, generator=g) * 0.1


def _mismatch(got, ref):
    err = (got.double() - ref).abs()
    i = int(err.argmax())
    return f"max |err| {float(err.max()):.3e} at flat index {i} (got {float(got.flatten()[i]):.6f}, " \
           f"ref {float(ref.flatten()[i]):.6f})"


def _patches(px, p):  # (T, C, H, W) -> (T*gh*gw, C*p*p) in fp64, by unfold (not patch_embed's reshape)
    return F.unfold(px.double(), p, stride=p).transpose(1, 2).reshape(-1, px.shape[1] * p * p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_patch_embed_matches_conv_fp32(shape, device):
    """Within the standard bound of an fp32 sum of n products: |err| <= n * 2^-24 * sum |x_i * w_i|, per output.
    On a GPU this is what TF32 (10 mantissa bits, cuDNN's default for an fp32 conv) would break."""
    px, w = _case(shape)
    ref = _conv_reference(px, w)
    got = patch_embed(px.to(device), w.to(device)).cpu()
    assert got.shape == ref.shape and got.dtype == torch.float32
    n = w[0].numel()
    bound = n * 2.0 ** -24 * (_patches(px, w.shape[-1]).abs() @ w.double().reshape(len(w), -1).abs().t())
    err = (got.double() - ref).reshape(bound.shape).abs()
    assert bool((err <= bound).all()), _mismatch(got, ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_patch_embed_bf16_within_twice_torchs_own_conv_error(shape):
    """bf16: no worse than 2x torch's own bf16 convolution against fp64 (flash-attention's rule)."""
    px, w = _case(shape, seed=1)
    ref = _conv_reference(px, w)
    torch_bf16 = F.conv2d(px.bfloat16(), w.bfloat16(), stride=w.shape[-1]).flatten(2).transpose(1, 2)
    torch_err = float((torch_bf16.double() - ref).abs().max())
    got = patch_embed(px, w.bfloat16())
    assert got.dtype == torch.bfloat16 and torch_err > 0
    assert float((got.double() - ref).abs().max()) <= 2 * torch_err, _mismatch(got, ref)


def test_patch_embed_is_the_modules_conv_at_clip_shape():
    """The embeddings module keeps the checkpoint's Conv2d weight (key and shape) and its forward equals the conv."""
    from pllava.config import VisionConfig
    from pllava.model.vision import CLIPEmbeddings

    c = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     image_size=42, patch_size=14)
    emb = CLIPEmbeddings(c)
    for prm in emb.parameters():
        torch.nn.init.normal_(prm, std=0.1)
    assert tuple(emb.state_dict()["patch_embedding.weight"].shape) == (16, 3, 14, 14)
    px = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = emb.patch_embedding(px).flatten(2).transpose(1, 2)
        ref = torch.cat([emb.class_embedding.expand(2, 1, -1), ref], 1) + emb.position_embedding.weight
        torch.testing.assert_close(emb(px), ref, rtol=1e-5, atol=1e-5)


class _OpTrace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_fp32_engine_runs_no_convolution(ckpts):
    """On CUDA, torch sends fp32 convolutions to cuDNN in TF32 (torch.backends.cudnn.allow_tf32 defaults to True)
    while fp32 matmuls stay IEEE; an fp32 engine must therefore dispatch no convolution at all. The trace sees every
    aten op of the vision tower, projector and LLM prefill."""
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # the defaults this is for
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.float32)
    s = eng.config.vision.image_size
    px = torch.randn(eng.config.num_frames, 3, s, s, generator=torch.Generator().manual_seed(3))
    with _OpTrace() as trace:
        eng.prompt_logits(px, "hi")
    assert any("mm" in op for op in trace.ops), sorted(trace.ops)  # the trace saw the GEMMs
    conv = sorted(op for op in trace.ops if "conv" in op or "cudnn" in op)
    assert not conv, f"fp32 engine dispatched {conv}: on CUDA these run in TF32 by default"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quick_gelu_in_place_has_the_formulas_bits(dtype):
    """CLIP's activation with one temporary (no autograd) against x * sigmoid(1.702 x) as three ops, bit for bit;
    with autograd it still differentiates."""
    from pllava.kernels.pool_projector import _ACTS

    x = (torch.randn(3, 7, 257, generator=torch.Generator().manual_seed(5)) * 4).to(dtype)
    want = x * torch.sigmoid(1.702 * x)
    x0 = x.clone()
    with torch.no_grad():
        assert torch.equal(_ACTS["quick_gelu"](x), want) and torch.equal(x, x0)  # (its input left as it was)
    y = x.float().requires_grad_()
    _ACTS["quick_gelu"](y).sum().backward()
    s = torch.sigmoid(1.702 * y.detach())
    assert torch.allclose(y.grad, s + 1.702 * y.detach() * s * (1 - s), rtol=1e-5, atol=1e-6)
