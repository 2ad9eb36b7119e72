"""The benchmark machinery end to end on the toy preset: both systems, every stage, the ratio table, JSON, plots."""
import json
import os

import pytest


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
    assert all(os.path.getsize(p) > 1000 for p in res["plots"])
    err = capsys.readouterr().err
    # progress while it works (the preset's weights are written first), where the files went, the noise warning
    assert "writing the tiny preset's seeded random weights" in err and "weights written" in err
    assert "pllava-engine, 4 frames" in err and "transformers, 1 frames" in err
    assert f"wrote {res['json']}" in err and all(p in err for p in res["plots"])
    assert "fewer than 3 runs is noisy" in err
    head = res["table"].splitlines()[0]
    assert "video decode ms" in head and "token decode tok/s" in head and "| decode" not in head
