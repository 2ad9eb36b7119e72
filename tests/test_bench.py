"""The benchmark machinery end to end on the toy preset: both systems, every stage, the ratio table, JSON, plots."""
import json
import os

import pytest
import torch

import pllava


def test_run_bench_tiny(tmp_path, monkeypatch, video_path, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("PLLAVA_BENCH_CACHE", str(tmp_path / "cache"))
    from pllava.bench import STAGES, run_bench

    res = run_bench("tiny", frames=(1, 4), new_tokens=6, runs=1, video=video_path, out_dir=str(tmp_path / "out"))
    rows = res["rows"]
    assert {(r.system, r.frames) for r in rows} == {(s, f) for s in ("pllava-engine", "transformers") for f in (1, 4)}
    for r in rows:
        assert set(r.stages) == set(STAGES) and all(v >= 0 for v in r.stages.values())
        assert r.visual_tokens == r.frames * 144 and r.frames_per_s > 0
    assert "ratio engine / transformers" in res["table"] and "| 4 |" in res["table"]
    data = json.load(open(res["json"]))
    assert data["preset"] == "tiny" and len(data["rows"]) == 4
    assert data["torch"] == torch.__version__ and data["threads"] == torch.get_num_threads()
    assert data["device"].startswith("CPU ") and "commit" in data  # the commit: None outside a git checkout
    assert all(os.path.getsize(p) > 1000 for p in res["plots"])
    err = capsys.readouterr().err
    # progress while it works (the preset's weights are written first), where the files went, the noise warning
    assert "writing the tiny preset's seeded random weights" in err and "weights written" in err
    assert "pllava-engine, 4 frames" in err and "transformers, 1 frames" in err
    assert f"wrote {res['json']}" in err and all(p in err for p in res["plots"])
    assert "fewer than 3 runs is noisy" in err
    head = res["table"].splitlines()[0]
    assert "video decode ms" in head and "token decode tok/s" in head and "| decode" not in head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preset_shards_are_written_one_at_a_time_and_match_the_whole_dict_writer(tmp_path, monkeypatch, dtype):
    """A preset checkpoint is written a shard at a time (pllava-7b in fp32, 28 GB, held whole was OOM-killed on a
    24 GB machine): when a shard is saved, only its own tensors are alive. The oracle for the files: every tensor
    made first and handed to testing.save_sharded (the writer the bench used before) with the same shard count:
    the same bytes, file for file, and the same index."""
    import gc
    import weakref

    from pllava import bench
    from pllava.config import PRESETS
    from pllava.testing import save_sharded

    cfg = json.loads(json.dumps(PRESETS["tiny"]))
    specs = bench._preset_specs(cfg)
    whole = {k: bench._preset_tensor(k, v, dtype, "cpu") for k, v in specs.items()}
    nbytes = sum(t.numel() * t.element_size() for t in whole.values())
    monkeypatch.setattr(bench, "SHARD_BYTES", nbytes // 3 + 1)  # -> 3 shards
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_sharded(whole, str(tmp_path / "a"), shards=3)
    del whole
    gc.collect()

    live, peaks = [], []
    real_tensor, real_save = bench._preset_tensor, __import__("safetensors.torch").torch.save_file

    def tensor(*a):
        t = real_tensor(*a)
        live.append(weakref.ref(t))
        return t

    def save(tensors, path, metadata=None):
        gc.collect()
        alive = [r() for r in live if r() is not None]
        peaks.append((len(alive), len(tensors)))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(bench, "_preset_tensor", tensor)
    monkeypatch.setattr("safetensors.torch.save_file", save)
    bench._write_preset_shards(specs, str(tmp_path / "b"), dtype, "cpu")
    assert len(peaks) == 3 and all(alive == mine for alive, mine in peaks), peaks
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == sorted(os.listdir(tmp_path / "b")) and len(files) == 4  # 3 shards and the index
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_a_preset_too_large_for_the_disk_is_refused_before_a_shard_is_written(tmp_path, monkeypatch):
    """Writing a preset's weights (pllava-7b in fp32: 28 GB) checks the free disk first, counting an interrupted
    write's shards as space it will reuse: a clear error naming both sizes and PLLAVA_BENCH_CACHE, not a full disk
    with half a checkpoint on it. The size it must name: the tensors of the same preset written without a limit."""
    import collections

    from safetensors.torch import load_file

    from pllava import bench
    from pllava.memory import human_bytes as size

    written, _ = bench.make_preset_checkpoint("tiny", root=str(tmp_path / "free"), dtype=torch.float32)
    nbytes = sum(t.numel() * t.element_size() for t in load_file(os.path.join(written, "model.safetensors")).values())

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: usage(1 << 40, 0, nbytes // 2))
    with pytest.raises(pllava.ConfigError) as e:
        bench.make_preset_checkpoint("tiny", root=str(tmp_path / "full"), dtype=torch.float32)
    base = tmp_path / "full" / "tiny-float32"
    assert (f"needs {size(nbytes)} in {base}, but {size(nbytes // 2)} is free there; point PLLAVA_BENCH_CACHE"
            in str(e.value)), str(e.value)
    assert not [f for f in os.listdir(base) if f.endswith(".safetensors")] and not (base / "DONE").exists()
    (base / "model.safetensors").write_bytes(b"x" * (nbytes // 2 + 1))  # an interrupted write: its space is reused
    bench.make_preset_checkpoint("tiny", root=str(tmp_path / "full"), dtype=torch.float32)
    assert (base / "DONE").exists() and (base / "model.safetensors").stat().st_size > nbytes


def test_bench_quality_counts_both_kinds_of_position(tmp_path):
    """benchmarks/bench_quality.py on 2 clips: every mode scored at each prompt and each decode position, the
    paired counts consistent, transformers bf16 paired with itself discordant nowhere."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_quality.py")
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    bq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bq)
    res = bq.main(2, out_dir=str(tmp_path))
    assert res["positions"]["decode"] == 2 * bq.DECODE_STEPS and res["positions"]["prefill"] > 2 * bq.DECODE_STEPS
    for part, by_mode in res["stats"].items():
        n = res["positions"][part]
        hf = by_mode["transformers bf16"]
        assert hf["only_mode"] == hf["only_hf"] == 0
        for name, st in by_mode.items():  # a mode's agreement = transformers bf16's - only_hf + only_mode
            assert 0 <= st["agree"] <= n and st["agree"] == hf["agree"] - st["only_hf"] + st["only_mode"], name
        assert by_mode["pllava-engine bf16 + int8 (lm_head: Int8Head)"]["agree"] > 0.8 * n  # scored, not garbage
    assert json.load(open(tmp_path / "quality.json"))["positions"] == res["positions"]


def test_cpu_name_says_which_cpu_and_its_features(tmp_path):
    """Sessions land on different CPUs (a Zen4 without AMX, a Xeon with it): a bench title names the model and the
    features its figures depend on, read from /proc/cpuinfo (here a file written by the test)."""
    from pllava.bench import cpu_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n"
                    "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu\n")
    name = cpu_name(str(info))
    assert name.startswith("CPU AMD EPYC 9R14 96-Core Processor, ")
    assert name.endswith(", avx2 avx512f avx512_bf16") and "amx" not in name
    info.write_text("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx2 amx_int8 avx512f amx_bf16\n")
    assert cpu_name(str(info)).endswith(", avx2 avx512f amx_bf16 amx_int8")  # in _CPU_FLAGS' order
    assert cpu_name(str(tmp_path / "absent")).startswith("CPU ")  # no /proc: the platform's name, no error


def test_half_gemm_emulated_reads_the_bf16_and_fp16_flags(tmp_path, monkeypatch):
    import platform

    from pllava import ops

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    avx2 = tmp_path / "avx2"
    avx2.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("model name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512f avx512_bf16\n")
    spr = tmp_path / "spr"
    spr.write_text("model name\t: Intel(R) Xeon(R)\nflags\t\t: avx2 avx512f amx_bf16 amx_fp16 amx_tile\n")
    assert ops.half_gemm_emulated(torch.bfloat16, str(avx2)) and ops.half_gemm_emulated(torch.float16, str(avx2))
    assert not ops.half_gemm_emulated(torch.bfloat16, str(zen4)) and ops.half_gemm_emulated(torch.float16, str(zen4))
    assert not ops.half_gemm_emulated(torch.bfloat16, str(spr)) and not ops.half_gemm_emulated(torch.float16, str(spr))
    assert not ops.half_gemm_emulated(torch.float32, str(avx2))
    assert not ops.half_gemm_emulated(torch.bfloat16, str(tmp_path / "absent"))  # cannot tell: no warning
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not ops.half_gemm_emulated(torch.bfloat16, str(avx2))  # x86 flags mean nothing there


def test_a_bf16_cpu_engine_on_a_cpu_without_bf16_gemms_says_what_to_use(ckpts, monkeypatch, caplog):
    import platform

    import pllava
    from pllava import ops

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for flags, warned in (("avx2 fma", True), ("avx2 avx512f avx512_bf16", False)):
        monkeypatch.setattr(ops, "cpu_info", lambda path="/proc/cpuinfo", f=flags: ("Test CPU", frozenset(f.split())))
        caplog.clear()
        with caplog.at_level("WARNING", logger="pllava"):
            pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16)
        said = [r.getMessage() for r in caplog.records if "emulates bfloat16 GEMMs" in r.getMessage()]
        assert bool(said) == warned, (flags, said)
        if warned:
            assert "avx512_bf16 or amx_bf16 (Test CPU)" in said[0]
            assert "dtype=torch.float32 with quantize='int8'" in said[0]
    caplog.clear()
    monkeypatch.setattr(ops, "cpu_info", lambda path="/proc/cpuinfo": ("Test CPU", frozenset({"avx2"})))
    with caplog.at_level("WARNING", logger="pllava"):
        pllava.Engine.from_pretrained(ckpts["pllava"])  # float32: nothing to say
    assert not [r for r in caplog.records if "emulates" in r.getMessage()]
