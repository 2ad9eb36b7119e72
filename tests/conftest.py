"""Seeds everything and builds the tiny checkpoints once per session."""
import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No GPU here or in CI: Triton kernels run in Triton's interpreter on the CPU (set before triton is imported).
import torch as _torch  # noqa: E402

if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Tests are written for the CPU unless they name a device (tests/test_gpu.py, the kernel tests): on a GPU machine
# an engine's default would otherwise be CUDA in bf16, against oracles and tolerances of the fp32 CPU engine.
os.environ.setdefault("PLLAVA_DEVICE", "cpu")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """One tiny model (seed 0) in every layout, plus the current-layout copy the oracle loads."""
    from pllava.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {
        "pllava": make_tiny_checkpoint(str(root / "pllava"), "pllava", shards=2),
        "legacy": make_tiny_checkpoint(str(root / "legacy"), "legacy", shards=1),
        "current": make_tiny_checkpoint(str(root / "current"), "current", shards=3),
        "adapter": make_tiny_checkpoint(str(root / "adapter"), "adapter", shards=2),
    }


@pytest.fixture(scope="session")
def video_path(tmp_path_factory):
    from pllava.testing import make_video

    return make_video(str(tmp_path_factory.mktemp("vid") / "clip.mp4"), num_frames=30, size=(80, 60))


@pytest.fixture(scope="module")
def engine(ckpts):
    """The tiny PLLaVA checkpoint as an fp32 CPU engine, one per test module (a module may set its alpha, limits
    or flags without reaching another); a module that needs another engine defines its own `engine`."""
    import pllava

    return pllava.Engine.from_pretrained(ckpts["pllava"])


@pytest.fixture(scope="module")
def pxs(engine):
    """Four random clips of pixels in the engine's input shape (num_frames, 3, S, S)."""
    s = engine.config.vision.image_size
    return [torch.randn(engine.config.num_frames, 3, s, s, generator=torch.Generator().manual_seed(100 + i))
            for i in range(4)]


_ISAS = ("generic", "avx2", "avx512")  # pllava._C's CPU kernel paths, weakest first


@pytest.fixture(params=["avx512", "avx2", "generic"])
def native_isa(request):
    """Each vector path of pllava._C's CPU kernels this CPU runs (a cap lowers the best one: the AVX2 path runs on
    an AVX-512 CPU too); 'generic' is the portable loop, which the kernels' `generic` flag selects."""
    try:
        from pllava import _C
    except ImportError:
        pytest.skip("pllava._C is not built")
    if _ISAS.index(request.param) > _ISAS.index(_C.cpu_isa_supported()):
        pytest.skip(f"this CPU does not run {request.param} (best: {_C.cpu_isa_supported()})")
    _C.set_isa_cap("best" if request.param == "generic" else request.param)
    try:
        if request.param != "generic":
            assert _C.cpu_isa() == request.param
        yield request.param
    finally:
        _C.set_isa_cap("best")
