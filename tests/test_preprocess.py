"""Native (pllava._C) and torch preprocessing against transformers' CLIPImageProcessor, pixel for pixel.

Bound (before normalization): max |diff| <= 1/255 and mean <= 0.1/255. Both paths reproduce PIL's fixed-point
arithmetic, so they are held to the same uint8 pixels: what remains (< 1e-3/255) is float rounding in the
rescale/normalize step."""
import os
import shutil

import numpy as np
import pytest
import torch

import pllava
from asan_util import run_under_asan
from pllava.errors import InputError
from pllava.preprocess import clip_defaults, native_params, preprocess, preprocess_torch

SIZES = [(720, 1280), (1080, 1920), (360, 640), (336, 336), (200, 300), (337, 501), (1001, 333), (17, 29)]
CFG = clip_defaults(336)
STD = torch.tensor(CFG["image_std"]).view(1, 3, 1, 1)
needs_native = pytest.mark.skipif(not pllava.native_available(), reason="pllava._C not built")


@pytest.fixture(scope="module")
def proc():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**CFG)


def _pixel_diff(a, b):
    d = ((a.float() - b.float()) * STD).abs() * 255  # back to 0..255 pixel units
    return float(d.max()), float(d.mean())


def _check(got, ref, what):
    mx, mean = _pixel_diff(got, ref)
    assert mx <= 1.0 + 1e-3 and mean <= 0.1, f"{what}: max {mx:.3f}/255, mean {mean:.4f}/255"
    return mx


@pytest.mark.parametrize("hw", SIZES)
def test_random_frames_match_clip_processor(proc, hw):
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    frames = rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    ref = proc(images=list(frames), return_tensors="pt")["pixel_values"]
    assert _check(preprocess_torch(frames, CFG), ref, f"torch {hw}") < 1e-3, "torch path: not PIL's pixels"
    if pllava.native_available():
        assert _check(preprocess(frames, CFG), ref, f"native {hw}") < 1e-3, "native path: not PIL's pixels"


def test_real_frames_match(proc, tmp_path):
    from pllava.testing import make_video

    sources = [make_video(str(tmp_path / "v.mp4"), num_frames=20, size=(1280, 720), codec="libx264")]
    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "videos")
    sources += [os.path.join(shared, f) for f in ("cooking.mp4", "jesse_dance.mp4")
                if os.path.exists(os.path.join(shared, f))]
    for src in sources:
        frames = pllava.read_frames(src, 4)
        ref = proc(images=list(frames.numpy()), return_tensors="pt")["pixel_values"]
        assert _check(preprocess_torch(frames, CFG), ref, f"torch {src}") < 1e-3
        if pllava.native_available():
            assert _check(preprocess(frames, CFG), ref, f"native {src}") < 1e-3


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_are_rounded_fp32(dtype):
    frames = np.random.default_rng(1).integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    assert torch.equal(preprocess(frames, CFG, dtype=dtype), preprocess(frames, CFG).to(dtype))


@needs_native
def test_one_frame_row_threads_equal_frame_threads():
    """A single frame is split across threads by rows; a batch by frames: the same pixels either way."""
    frames = np.random.default_rng(5).integers(0, 256, (4, 480, 854, 3), dtype=np.uint8)
    batch = preprocess(frames, CFG)
    for k in range(4):
        assert torch.equal(preprocess(frames[k], CFG)[0], batch[k])


@needs_native
def test_strided_inputs_and_out_buffer():
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, (4, 400, 700, 3), dtype=np.uint8)
    want = preprocess(np.ascontiguousarray(big[::2, ::-1, 50:650]), CFG)
    assert torch.equal(preprocess(big[::2, ::-1, 50:650], CFG), want)  # numpy view with a negative stride
    t = torch.from_numpy(np.ascontiguousarray(big.transpose(0, 2, 1, 3))).transpose(1, 2)  # strided tensor
    assert not t.is_contiguous()
    torch.testing.assert_close(preprocess(t, CFG), preprocess(big, CFG), rtol=0, atol=0)
    out = torch.full((2, 3, 336, 336), float("nan"))
    res = preprocess(np.ascontiguousarray(big[::2, ::-1, 50:650]), CFG, out=out)
    assert res is out and torch.equal(out, want)


def test_bad_inputs_name_the_argument():
    with pytest.raises(InputError, match="dtype must be uint8"):
        preprocess(np.zeros((1, 10, 10, 3), np.float32), CFG)
    with pytest.raises(InputError, match=r"shape must be \(T, H, W, 3\)"):
        preprocess(np.zeros((1, 10, 10, 4), np.uint8), CFG)
    with pytest.raises(InputError, match="zero-size"):
        preprocess(np.zeros((1, 0, 10, 3), np.uint8), CFG)
    with pytest.raises(InputError, match="out: expected shape"):
        preprocess(np.zeros((1, 10, 10, 3), np.uint8), CFG, out=torch.empty(1, 3, 300, 336))
    with pytest.raises(InputError, match="out: expected shape"):
        preprocess(np.zeros((1, 10, 10, 3), np.uint8), CFG, out=torch.empty(1, 3, 336, 336, dtype=torch.float16))
    with pytest.raises(InputError, match="dtype: expected"):
        preprocess(np.zeros((1, 10, 10, 3), np.uint8), CFG, dtype=torch.int32)
    with pytest.raises(InputError, match="frames: expected"):
        preprocess([[1, 2, 3]], CFG)


def test_uncovered_configs_take_the_torch_path_and_stay_right(proc):
    from transformers import CLIPImageProcessor

    cfg = dict(CFG, resample=2)  # bilinear: not the native path's filter
    assert native_params(cfg) is None
    frames = np.random.default_rng(3).integers(0, 256, (2, 300, 500, 3), dtype=np.uint8)
    ref = CLIPImageProcessor(**cfg)(images=list(frames), return_tensors="pt")["pixel_values"]
    assert _check(preprocess(frames, cfg), ref, "bilinear via torch") < 1e-3
    cfg = dict(CFG, do_center_crop=False)
    assert native_params(cfg) is None
    ref = CLIPImageProcessor(**cfg)(images=list(frames), return_tensors="pt")["pixel_values"]
    got = preprocess(frames, cfg)
    assert got.shape == ref.shape
    _check(got, ref, "no crop via torch")


def test_forcing_a_path(monkeypatch):
    frames = np.random.default_rng(4).integers(0, 256, (1, 100, 120, 3), dtype=np.uint8)
    monkeypatch.setenv("PLLAVA_PREPROCESS", "torch")
    a = preprocess(frames, CFG)
    torch.testing.assert_close(a, preprocess_torch(frames, CFG), rtol=0, atol=0)
    monkeypatch.setenv("PLLAVA_PREPROCESS", "native")
    if pllava.native_available():
        _check(preprocess(frames, CFG), a, "forced native")
        with pytest.raises(RuntimeError, match="does not cover"):
            preprocess(frames, dict(CFG, resample=2))
    else:
        with pytest.raises(RuntimeError, match="not built"):
            preprocess(frames, CFG)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_native_core_under_address_sanitizer(tmp_path):
    run_under_asan(tmp_path, "preprocess.cpp", "asan_driver.cpp", "asan driver: ok")
