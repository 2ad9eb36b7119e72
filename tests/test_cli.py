"""`pllava demo`, `pllava caption` and `pllava chat` on PyAV-made videos, as a user runs them."""
import json
import subprocess
import sys

import pytest


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pllava.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_runs_offline_and_says_weights_are_random():
    r = _run("demo", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stdout and "new tokens: 8" in r.stdout


def test_caption_json_over_several_files_with_one_bad(ckpts, video_path, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    r = _run("caption", video_path, str(bad), video_path, "--model", ckpts["pllava"], "--json",
             "--max-new-tokens", "6")
    assert r.returncode == 1, r.stderr  # one file failed, the batch went on
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [("error" in x) for x in rows] == [False, True, False]
    assert rows[0]["num_new_tokens"] == 6 and rows[0]["text"] == rows[2]["text"]
    assert "bad.mp4" in rows[1]["error"]
    # the records --output writes: the settings that shaped each, for a failed clip too
    for x in rows:
        assert (x["max_new_tokens"], x["lora_alpha"], x["num_frames"]) == (6, 4.0, 4), x


def test_caption_matches_engine_api(ckpts, video_path):
    import pllava

    want = pllava.Engine.from_pretrained(ckpts["pllava"], lora_alpha=20).caption(video_path, max_new_tokens=10)
    r = _run("caption", video_path, "--model", ckpts["pllava"], "--lora-alpha", "20", "--max-new-tokens", "10")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{video_path}: {want}\n"


def test_chat_streams_answer(ckpts, video_path):
    r = _run("chat", video_path, "What is happening?", "--model", ckpts["adapter"], "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and len(r.stdout) > 1


def test_bad_model_dir_is_a_clear_error(tmp_path, video_path):
    r = _run("caption", video_path, "--model", str(tmp_path))
    assert r.returncode == 2 and "config.json" in r.stderr


def test_live_from_stdin(ckpts, tmp_path):
    from pllava.testing import make_video

    p = make_video(str(tmp_path / "live.ts"), num_frames=36, fps=12, codec="mpeg4", gop=12, container_format="mpegts")
    with open(p, "rb") as f:
        r = subprocess.run([sys.executable, "-m", "pllava.cli", "live", "-", "--model", ckpts["pllava"], "--window", "1",
                            "--every", "1", "--timeout", "1", "--max-new-tokens", "3", "--json"], stdin=f,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [round(x["t"]) for x in rows] == [1, 2] and all(x["text"] is not None for x in rows)


def test_bench_cli_tiny(tmp_path, video_path):
    env = dict(__import__("os").environ, PLLAVA_BENCH_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "pllava.cli", "bench", "--preset", "tiny", "--frames", "1,2", "--runs", "1",
                        "--new-tokens", "3", "--video", video_path, "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| pllava-engine | 2 |" in r.stdout and "ratio engine / transformers" in r.stdout
    assert (tmp_path / "out" / "bench_tiny.json").exists() and (tmp_path / "out" / "latency_breakdown.png").exists()


def test_bench_batch_cli_runs_the_fast_cpu_mode(tmp_path, video_path):
    """`pllava bench --batch ... --dtype bfloat16 --quantize int8` sweeps the int8 engine against transformers in
    fp32 (the flag was once read by the frame sweep only, and the batch sweep ran the bf16 engine)."""
    env = dict(__import__("os").environ, PLLAVA_BENCH_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "pllava.cli", "bench", "--preset", "tiny", "--batch", "1,2", "--frames",
                        "4", "--runs", "1", "--new-tokens", "3", "--dtype", "bfloat16", "--quantize", "int8",
                        "--video", video_path, "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "engine bfloat16+int8, transformers float32" in r.stdout and "loading pllava-engine (tiny, cpu, bfloat16, int8)" in r.stderr
    data = json.load(open(tmp_path / "out" / "bench_batch_tiny.json"))
    assert data["quantize"] == "int8" and data["baseline_dtype"] == "torch.float32"
    assert {row["system"] for row in data["rows"]} == {"pllava-engine batched", "pllava-engine sequential",
                                                       "transformers batched"}


@pytest.mark.parametrize("mode,says", [("w8a8", "int8 x int8 GEMM (w8a8)"), ("int4", "int4 groups of 32")])
def test_caption_runs_w8a8_and_int4_and_says_so(ckpts, video_path, mode, says):
    """`--quantize w8a8` / `int4` reaches the engine (the log names the mode and its path) and captions as the
    engine API's engine in that mode does."""
    import pllava
    import torch

    want = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize=mode).caption(
        video_path, max_new_tokens=8)
    r = subprocess.run([sys.executable, "-m", "pllava.cli", "-v", "caption", video_path, "--model", ckpts["pllava"],
                        "--dtype", "bfloat16", "--quantize", mode, "--max-new-tokens", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"quantize={mode}" in r.stderr and says in r.stderr
    assert r.stdout == f"{video_path}: {want}\n"


def test_misconfigured_server_does_not_start(tmp_path):
    for flags, msg in ((["--lora-alpha", "nan"], "--lora-alpha: expected a finite number"),
                       (["--max-concurrency", "0"], "--max-concurrency: expected an integer >= 1"),
                       (["--max-num-seqs", "-3"], "--max-num-seqs: expected an integer >= 1"),
                       (["--max-model-len", "x"], "--max-model-len: expected an integer >= 1")):
        r = _run("serve", "--model", str(tmp_path), *flags, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, (flags, r.stderr)
    r = _run("caption", "x.mp4", "--model", str(tmp_path), "--lora-alpha", "inf", timeout=60)
    assert r.returncode == 2 and "finite" in r.stderr


def test_serve_and_bench_dependencies_come_with_the_base_install():
    """The installed distribution's own metadata: fastapi & co. and matplotlib are unconditional requirements."""
    import re
    from importlib.metadata import requires

    base = {re.split(r"[ ;<>=!\[]", r, maxsplit=1)[0].lower() for r in requires("pllava-engine") if "extra ==" not in r}
    assert {"fastapi", "starlette", "uvicorn", "python-multipart", "matplotlib"} <= base, base


def test_missing_modules_are_one_line(monkeypatch, tmp_path, capsys):
    """With a dependency pruned from the environment, `pllava serve` and `pllava bench` fail in one line naming
    what to install, before any model load or measurement (ray's case is in test_captioning)."""
    from pllava.cli import main

    monkeypatch.delitem(sys.modules, "pllava.server", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install fastapi" in err and "needs fastapi" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--preset", "tiny", "--frames", "1", "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and len(err.strip().splitlines()) == 1


def test_every_option_has_help_with_its_default():
    import argparse

    from pllava.cli import build_parser

    p = build_parser()
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sp in subs.choices.items():
        text = " ".join(sp.format_help().split())
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            h = " ".join(sp._get_formatter()._expand_help(a).split()) if a.help else ""
            if not h or h not in text:
                missing.append((name, a.dest, "help"))
            elif a.option_strings and not a.required and not isinstance(a, argparse._StoreTrueAction) \
                    and "default" not in h:
                missing.append((name, a.dest, "default"))
            elif a.default not in (None, False) and a.option_strings and str(a.default) not in h:
                missing.append((name, a.dest, f"default {a.default} not shown"))
    assert not missing, missing


def test_serve_says_where_it_serves(ckpts):
    """The real `pllava serve`: once loaded and warmed up it prints where to reach it, and answers there."""
    import httpx

    from server_util import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pllava.cli", "serve", "--model", ckpts["pllava"], "--port",
                             str(port), "--served-model-name", "tiny"], stderr=subprocess.PIPE, text=True)
    try:
        want = f"serving tiny at http://127.0.0.1:{port} (page at /)"
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if want in line:
                break
        assert any(want in x for x in lines), "".join(lines)[-2000:]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models/tiny", timeout=10).json()["id"] == "tiny"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_caption_plain_mode_has_no_control_bytes_and_names_a_bad_path_once(ckpts, video_path, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "caps.jsonl"
    r = _run("caption", video_path, str(bad), "--model", ckpts["pllava"], "--max-new-tokens", "3", "-o", str(out))
    assert r.returncode == 1, r.stderr
    for stream in (r.stdout, r.stderr):
        assert "\x1b" not in stream and "\r" not in stream  # not a terminal: no bar, no colour, no carriage return
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    err = next(x["error"] for x in recs if "error" in x)
    assert err.count(str(bad)) == 1 and "Errno" not in err, err
    assert "captioned 1, failed 1" in r.stderr, r.stderr
