"""Loading checks the memory first: the weights a load will hold are estimated on the meta device (bf16, fp32,
int8 and int4 forms) and a load that cannot fit is refused, before any weight is read, with the numbers and the settings that
would fit; one that barely fits is warned about; PLLAVA_SKIP_MEMORY_CHECK=1 loads anyway. The estimate is checked
against what loaded engines really hold (their parameters and int8 buffers), not against its own arithmetic."""
import logging

import pytest
import torch

import pllava
from pllava import loading, memory
from pllava.memory import human_bytes as hb
from triton_util import TRITON_DEVICE

DEVICES = sorted({"cpu", TRITON_DEVICE})  # and the GPU where there is one
MODES = [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8"), (torch.bfloat16, "int8")]
ALL_MODES = MODES + [(torch.float32, "int4"), (torch.bfloat16, "int4")]


def held_bytes(engine) -> int:
    """What a loaded engine's weights take: its parameters and the int8 weights and scales that replaced some."""
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    return params + sum(b.numel() * b.element_size() for n, b in engine.model.named_buffers()
                        if n.endswith(("qweight", "qscale", "rweight", "rscale")))


@pytest.fixture(scope="module")
def held(ckpts):
    return {m: held_bytes(pllava.Engine.from_pretrained(ckpts["pllava"], dtype=m[0], quantize=m[1]))
            for m in ALL_MODES}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["pllava", "adapter"])
def test_the_estimate_is_what_a_loaded_engine_holds(ckpts, held, layout, device, monkeypatch):
    """On the CPU (int8: fp32 decode rows, their norms in fp32) and on CUDA (the Triton int8 and int4 kernels)
    where there is one (benchmarks/gpu_tests.txt lists this module)."""
    seen = {}
    real = loading.check_weights_fit

    def spy(net, dt, quantize, device, where):
        seen[(dt, quantize)] = loading.weight_bytes(net, dt, quantize, device)
        return real(net, dt, quantize, device, where)

    monkeypatch.setattr(loading, "check_weights_fit", spy)
    for dt, q in ALL_MODES:
        engine = pllava.Engine.from_pretrained(ckpts[layout], device=device, dtype=dt, quantize=q)
        assert seen[(dt, q)] == held_bytes(engine), (layout, device, dt, q)
        if device == "cpu":
            assert seen[(dt, q)] == held[(dt, q)], (layout, dt, q)
    # bf16 halves the float weights; int8 shrinks either form, int4 more
    assert held[MODES[1]] == held[MODES[0]] // 2 and held[MODES[2]] < held[MODES[0]] and held[MODES[3]] < held[MODES[1]]
    assert held[ALL_MODES[4]] < held[MODES[2]] and held[ALL_MODES[5]] < held[MODES[3]]


def test_a_load_that_cannot_fit_is_refused_before_any_weight_is_read(ckpts, held, monkeypatch):
    need = held[(torch.float32, None)]
    have = (held[(torch.bfloat16, "int8")] + held[(torch.bfloat16, None)]) // 2  # only bf16 + int8 fits
    monkeypatch.setattr(memory, "available_bytes", lambda device: (have, "the test's memory"))
    monkeypatch.setattr(loading, "load_weights", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(pllava.MemoryBudgetError) as e:
        pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.float32)
    msg = str(e.value)
    assert ckpts["pllava"] in msg and f"need {hb(need)} on cpu as float32" in msg
    assert f"but {hb(have)} is free (the test's memory)" in msg
    assert f"dtype=bfloat16: {hb(held[(torch.bfloat16, None)])} (also too much)" in msg
    assert f"dtype=float32, quantize='int8': {hb(held[(torch.float32, 'int8')])} (also too much);" in msg
    assert f"dtype=bfloat16, quantize='int8': {hb(held[(torch.bfloat16, 'int8')])};" in msg
    # int4 is offered too: fp32 + int4's linears are small here, its fp32 rest is not
    assert f"dtype=float32, quantize='int4': {hb(held[(torch.float32, 'int4')])} (also too much);" in msg
    assert f"dtype=bfloat16, quantize='int4': {hb(held[(torch.bfloat16, 'int4')])} (CLI" in msg
    assert "PLLAVA_SKIP_MEMORY_CHECK=1" in msg
    with pytest.raises(pllava.MemoryBudgetError) as e:  # w8a8 asked for stays w8a8 (int8's bytes) in the offer
        pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.float32, quantize="w8a8")
    msg = str(e.value)
    assert f"need {hb(held[(torch.float32, 'int8')])} on cpu as float32 + w8a8" in msg and "'int8'" not in msg
    assert f"dtype=bfloat16, quantize='w8a8': {hb(held[(torch.bfloat16, 'int8')])};" in msg
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1000, "the test's memory"))
    with pytest.raises(pllava.MemoryBudgetError, match="as bfloat16 \\+ int8, but 1.0 kB is free") as e:
        pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int8")
    assert "quantize='int8':" not in str(e.value)  # nothing smaller to offer but int4, also too much
    assert "dtype=bfloat16, quantize='int4': " in str(e.value) and "(also too much) (CLI" in str(e.value)


def test_a_tight_fit_warns_and_the_skip_setting_loads_anyway(ckpts, held, monkeypatch, caplog):
    need = held[(torch.float32, None)]
    monkeypatch.setattr(memory, "available_bytes", lambda device: (int(need / 0.9), "the test's memory"))
    with caplog.at_level(logging.WARNING, logger="pllava"):
        pllava.Engine.from_pretrained(ckpts["pllava"])
    assert "little is left for the KV cache" in caplog.text
    monkeypatch.setattr(memory, "available_bytes", lambda device: (need // 2, "the test's memory"))
    monkeypatch.setenv("PLLAVA_SKIP_MEMORY_CHECK", "1")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pllava"):
        engine = pllava.Engine.from_pretrained(ckpts["pllava"])
    assert "loading anyway (PLLAVA_SKIP_MEMORY_CHECK=1)" in caplog.text
    assert held_bytes(engine) == need


def test_available_bytes_reads_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123 << 20, 80 << 30))
    assert memory.available_bytes("cuda:0") == (123 << 20, "free on cuda:0")
    monkeypatch.setattr(memory, "cgroup_available", lambda: None)  # a limited container: the next test
    have, source = memory.available_bytes("cpu")
    with open("/proc/meminfo") as f:
        meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    assert source == "available host memory (MemAvailable)"
    assert abs(have - meminfo["MemAvailable"]) < 512 << 20  # read moments apart on a shared machine


def _cgroup(tmp_path, proc_line: str, files: dict) -> tuple[str, str]:
    """A fake /sys/fs/cgroup tree and /proc/self/cgroup: files maps paths under the root to their text."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_line)
    return str(root), str(proc)


def test_a_memory_cgroup_limit_is_read_v2_and_v1(tmp_path):
    """What a container's limit still allows: the limit less its use, plus the page cache it can reclaim."""
    gib = 1 << 30
    v2 = _cgroup(tmp_path / "a", "0::/job\n", {"job/memory.max": f"{16 * gib}\n", "job/memory.current": f"{10 * gib}\n",
                                                 "job/memory.stat": f"anon {7 * gib}\nfile {3 * gib}\nkernel 1\n"})
    assert memory.cgroup_available(*v2) == (9 * gib, 16 * gib)
    v1 = _cgroup(tmp_path / "b", "12:pids:/x\n4:memory:/process_api/42\n0::/\n", {
        "memory/process_api/42/memory.limit_in_bytes": f"{8 * gib}\n",
        "memory/process_api/42/memory.usage_in_bytes": f"{6 * gib}\n",
        "memory/process_api/42/memory.stat": f"cache {gib}\ntotal_cache {2 * gib}\nrss 1\n"})
    assert memory.cgroup_available(*v1) == (4 * gib, 8 * gib)
    unlimited = [_cgroup(tmp_path / "c", "0::/\n", {"memory.max": "max\n", "memory.current": "5\n"}),
                 _cgroup(tmp_path / "d", "4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                                                          "memory/memory.usage_in_bytes": "5\n"}),
                 _cgroup(tmp_path / "e", "0::/\n", {}),  # a v1 host's unified tree without the memory controller
                 (str(tmp_path / "none"), str(tmp_path / "no_proc_file"))]
    assert [memory.cgroup_available(*u) for u in unlimited] == [None] * 4


def test_the_host_figure_is_the_lower_of_memavailable_and_the_cgroup(monkeypatch):
    have, _ = memory.available_bytes("cpu")
    monkeypatch.setattr(memory, "cgroup_available", lambda: (have // 4, 2 * have))
    assert memory.available_bytes("cpu") == (have // 4, f"this process's memory cgroup: its {2 * have / 1e9:.1f} GB "
                                                        "limit less what it uses")
    monkeypatch.setattr(memory, "cgroup_available", lambda: (have * 4, have * 8))
    assert memory.available_bytes("cpu")[1] == "available host memory (MemAvailable)"


def test_a_kv_cache_past_the_host_memory_is_refused_and_the_engine_stays_usable(engine, pxs, monkeypatch):
    """generate()'s KV cache grows with a longer request; where the growth exceeds the host's free memory (a
    torch.zeros that Linux would answer with an OOM kill as its pages are written) the request is refused with
    the numbers, the old cache is kept whole, and the next request runs as before."""
    lm = engine.model.language_model
    want = engine.generate(pxs[0], "hello", max_new_tokens=8).token_ids
    size, cache = lm.max_len, lm.layers[0].self_attn.kv_cache
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1000, "the test's memory"))
    with pytest.raises(pllava.MemoryBudgetError, match=r"a KV cache of 512 positions needs .* more of host "
                                                        r"memory, but 1.0 kB is free \(the test's memory\)") as e:
        engine.generate(pxs[1], "hello", max_new_tokens=300)
    assert lm.max_len == size and lm.layers[0].self_attn.kv_cache is cache  # nothing replaced
    assert engine.generate(pxs[0], "hello", max_new_tokens=8).token_ids == want  # fits the old cache: no check
    monkeypatch.undo()
    assert len(engine.generate(pxs[1], "hello", max_new_tokens=300).token_ids) > 8
    assert lm.max_len == 512

    def layer_bytes(c):
        return c.k_cache.numel() * c.k_cache.element_size() + c.v_cache.numel() * c.v_cache.element_size()

    old, new = layer_bytes(cache), layer_bytes(lm.layers[0].self_attn.kv_cache)
    peak = len(lm.layers) * (new - old) + old  # layer by layer: every new one and the last old one at once
    assert f"needs {hb(peak)} more" in str(e.value), str(e.value)


def test_int4_is_offered_only_where_it_runs(ckpts, monkeypatch):
    """The memory check's offers come from the settings the load accepts: int4 on the CPU and CUDA
    (loading.INT4_DEVICES), never on a device whose load would refuse it."""
    from pllava.config import load_config
    from pllava.model.pllava import PllavaModel

    with torch.device("meta"):
        net = PllavaModel(load_config(ckpts["pllava"]))
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1000, "the test's memory"))
    for dev, offered in (("cpu", True), ("mps", False), ("xpu", False)):
        with pytest.raises(pllava.MemoryBudgetError) as e:
            loading.check_weights_fit(net, torch.float32, None, torch.device(dev), "ckpt")
        assert ("quantize='int4'" in str(e.value)) == offered, (dev, str(e.value))
