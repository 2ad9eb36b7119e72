"""Captioning at scale: inputs of every kind, JSONL records written whole, resume without duplicates, failed clips
recorded and retried, a killed or interrupted run, and the Ray Data path giving the single-process records."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pllava.captioning import CaptionSettings, JsonlWriter, caption_to_jsonl, expand_inputs, read_done
from pllava.errors import InputError, PllavaError
from pllava.testing import make_video


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder tree: 3 clips (one in a subfolder), a text file that is not a video, and a corrupt .mp4."""
    d = tmp_path_factory.mktemp("data")
    (d / "sub").mkdir()
    clips = [make_video(str(d / "a.mp4"), num_frames=12, size=(64, 48)),
             make_video(str(d / "b.mkv"), num_frames=9, size=(48, 64), codec="libx264"),
             make_video(str(d / "sub" / "c.mp4"), num_frames=20, size=(80, 60), gop=5)]
    (d / "notes.txt").write_text("not a clip\n")
    bad = d / "sub" / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(500))
    return d, clips, str(bad)



def records(path):
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    assert raw == "" or raw.endswith("\n"), "a torn last line"
    return [json.loads(line) for line in raw.splitlines()]


# ------------------------------------------------------------------------------------------ inputs
def test_inputs_of_every_kind(data, tmp_path):
    d, clips, bad = data
    a, b, c = clips
    assert [i.video for i in expand_inputs([str(d)])] == [a, b, bad, c]  # recursive, videos only, sorted
    assert [i.video for i in expand_inputs([str(d / "*.mp4")])] == [a]
    assert [i.video for i in expand_inputs([str(d / "**" / "*.mp4")])] == [a, bad, c]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# clips\n{a}\n\nhttps://example.com/x.mp4\n{os.path.relpath(c, tmp_path)}\n")
    assert [i.video for i in expand_inputs([str(lst)])] == [a, "https://example.com/x.mp4", c]
    jl = tmp_path / "list.jsonl"
    jl.write_text(json.dumps({"video": b, "id": 7, "split": "val"}) + "\n\n" + json.dumps({"video": a}) + "\n")
    items = expand_inputs([str(jl), a])  # a appears twice: the first occurrence is kept
    assert [(i.video, i.extra) for i in items] == [(b, {"id": 7, "split": "val"}), (a, {})]
    cs = tmp_path / "list.csv"
    cs.write_text(f"video,caption_id\n{c},x1\n{a},x2\n")
    assert [(i.video, i.extra) for i in expand_inputs([str(cs)])] == [(c, {"caption_id": "x1"}),
                                                                      (a, {"caption_id": "x2"})]
    assert [i.video for i in expand_inputs([a, a], dedupe=False)] == [a, a]


def test_list_files_with_a_byte_order_mark(data, tmp_path):
    """Excel's "CSV UTF-8" and Notepad start a file with a BOM: it was read as part of the header ('a CSV list
    needs a video column'), of the first JSON line (not JSON) and of the first path (a path that is not there)."""
    _, (a, b, _), _ = data
    for name, text in (("l.csv", f"video,id\r\n{a},1\r\n{b},2\r\n"),
                       ("l.jsonl", json.dumps({"video": a, "id": "1"}) + "\n" + json.dumps({"video": b, "id": "2"})),
                       ("l.txt", f"{a}\n{b}\n")):
        p = tmp_path / name
        p.write_text(text, encoding="utf-8-sig")
        assert p.read_bytes()[:3] == b"\xef\xbb\xbf"
        items = expand_inputs([str(p)])
        assert [i.video for i in items] == [a, b], name
        assert [i.extra.get("id") for i in items] == ([None, None] if name == "l.txt" else ["1", "2"]), name


def test_bad_inputs_name_what_is_wrong(data, tmp_path):
    d, _, _ = data
    with pytest.raises(InputError, match=r"nope\.mp4: no such file or directory"):
        expand_inputs([str(d / "nope.mp4")])
    with pytest.raises(InputError, match="the pattern matches nothing"):
        expand_inputs([str(d / "*.webm")])
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"video": "a.mp4"}\n{"video": \n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not JSON"):
        expand_inputs([str(jl)])
    jl.write_text('{"path": "a.mp4"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:1: each line must be an object with a 'video' string"):
        expand_inputs([str(jl)])
    cs = tmp_path / "bad.csv"
    cs.write_text("path\na.mp4\n")
    with pytest.raises(InputError, match=r"bad\.csv: a CSV list needs a 'video' column"):
        expand_inputs([str(cs)])


# ------------------------------------------------------------------------------------------ records
def test_folder_to_jsonl_with_a_bad_clip_then_resume(engine, data, tmp_path):
    d, clips, bad = data
    out = str(tmp_path / "caps.jsonl")
    st = CaptionSettings("Describe the video in details.", max_new_tokens=12, model="tiny")
    s = caption_to_jsonl(engine, [str(d)], out, st, batch_size=2, progress=False)
    assert (s.captioned, s.failed, s.skipped, s.interrupted) == (3, 1, 0, False)
    recs = {r["video"]: r for r in records(out)}
    assert set(recs) == set(clips) | {bad}
    err = recs[bad]["error"]
    assert err.startswith("VideoError: ") and bad in err and "\n" not in err and "Errno" not in err
    for c in clips:  # each record is what generate() gives for that clip alone
        want = engine.generate(c, "Describe the video in details.", max_new_tokens=12)
        r = recs[c]
        assert (r["text"], r["num_new_tokens"], r["num_prompt_tokens"]) == (want.text, len(want.token_ids),
                                                                             want.num_prompt_tokens)
        assert (r["model"], r["prompt"], r["num_frames"], r["lora_alpha"]) == ("tiny", st.prompt, 4, 4.0)
        assert r["finish_reason"] in ("stop", "length") and r["timings"]["total"] > 0
    with pytest.raises(InputError, match="already holds records: pass --resume"):
        caption_to_jsonl(engine, [str(d)], out, st, progress=False)
    s2 = caption_to_jsonl(engine, [str(d)], out, st, resume=True, progress=False)
    assert (s2.captioned, s2.failed, s2.skipped) == (0, 1, 3)  # only the failed clip is tried again
    texts = [r["video"] for r in records(out) if "text" in r]
    assert sorted(texts) == sorted(clips)  # no duplicates
    s3 = caption_to_jsonl(engine, [str(d)], out, st, overwrite=True, progress=False)
    assert s3.captioned == 3 and len(records(out)) == 4


def test_a_lists_own_text_and_error_fields_are_kept_apart(engine, data, tmp_path, caplog):
    """Recaptioning a dataset whose list has its own `text` (and `error`) column: those are carried as
    `input_text` / `input_error`, so a failed clip's record holds no caption, and --resume tries it again."""
    d, clips, bad = data
    lst = tmp_path / "list.jsonl"
    lst.write_text("".join(json.dumps({"video": v, "text": f"old caption {i}", "error": "", "input_text": "x",
                                       "id": i}) + "\n" for i, v in enumerate([clips[0], bad])))
    out = str(tmp_path / "caps.jsonl")
    st = CaptionSettings("Describe the video in details.", max_new_tokens=6, model="tiny")
    with caplog.at_level("WARNING", logger="pllava"):
        s = caption_to_jsonl(engine, [str(lst)], out, st, batch_size=2, progress=False)
    assert (s.captioned, s.failed) == (1, 1)
    ok, failed = records(out) if records(out)[0]["video"] == clips[0] else records(out)[::-1]
    want = engine.generate(clips[0], "Describe the video in details.", max_new_tokens=6).text
    # a field that does not collide keeps its name; the renamed one steps past it
    assert (ok["text"], ok["input_input_text"], ok["input_text"], ok["input_error"], ok["id"]) == (
        want, "old caption 0", "x", "", 0) and "error" not in ok
    assert "text" not in failed and failed["error"].startswith("VideoError: ")
    assert (failed["input_input_text"], failed["input_error"], failed["id"]) == ("old caption 1", "", 1)
    assert read_done(out) == {clips[0]}  # the failed clip is not taken for done
    again = caption_to_jsonl(engine, [str(lst)], out, st, resume=True, progress=False)
    assert (again.skipped, again.failed) == (1, 1)
    assert "carried as 'input_input_text'" in caplog.text and "carried as 'input_error'" in caplog.text


def test_names_and_fields_that_are_not_utf8_are_written_and_resumed(engine, tmp_path):
    """A clip whose file name is not UTF-8 (os.walk gives b'caf\\xe9' as 'caf\\udce9') and a list field holding a
    "\\ud800" escape: their records raised UnicodeEncodeError in the writer, ending the run. They are written
    with ASCII escapes (the same JSON value), and --resume finds them done."""
    d = tmp_path / "clips"
    d.mkdir()
    made = make_video(str(d / "tmp.mp4"), num_frames=6, size=(32, 24))
    try:
        os.rename(os.fsencode(made), os.fsencode(str(d)) + b"/caf\xe9.mp4")
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    clip = os.path.join(str(d), "caf\udce9.mp4")
    lst = tmp_path / "list.jsonl"
    lst.write_text('{"video": "%s", "note": "\\ud800 x"}\n' % make_video(str(tmp_path / "b.mp4"), num_frames=6,
                                                                        size=(32, 24)))
    out = str(tmp_path / "caps.jsonl")
    st = CaptionSettings("Describe the video in details.", max_new_tokens=4, model="tiny")
    s = caption_to_jsonl(engine, [str(d), str(lst)], out, st, progress=False)
    assert (s.captioned, s.failed) == (2, 0)
    recs = {r["video"]: r for r in records(out)}
    assert clip in recs and recs[clip]["text"] == engine.generate(clip, st.prompt, max_new_tokens=4).text
    assert [r["note"] for r in recs.values() if "note" in r] == ["\ud800 x"]
    again = caption_to_jsonl(engine, [str(d), str(lst)], out, st, progress=False, resume=True)
    assert (again.skipped, again.captioned) == (2, 0)


def test_the_output_may_not_be_an_input(engine, data, tmp_path):
    """`caption list.jsonl -o list.jsonl --overwrite` would empty the list (and --resume append to it)."""
    d, clips, _ = data
    lst = tmp_path / "list.jsonl"
    lst.write_text(json.dumps({"video": clips[0]}) + "\n")
    st = CaptionSettings("Describe.", max_new_tokens=2)
    for kw in (dict(overwrite=True), dict(resume=True)):
        with pytest.raises(InputError, match="the output is one of the inputs"):
            caption_to_jsonl(engine, [str(lst)], str(lst), st, progress=False, **kw)
        assert lst.read_text() == json.dumps({"video": clips[0]}) + "\n"
    with pytest.raises(InputError, match="the output is one of the inputs"):
        caption_to_jsonl(engine, [clips[0]], clips[0], st, overwrite=True, progress=False)
    assert os.path.getsize(clips[0]) > 0


def test_a_torn_tail_is_cut_on_resume(tmp_path):
    p = tmp_path / "o.jsonl"
    w = JsonlWriter(str(p))
    w.write({"video": "a.mp4", "text": "x"})
    w.close()
    with open(p, "ab") as f:
        f.write(b'{"video": "b.mp4", "te')  # a machine crash mid-line
    assert read_done(str(p)) == {"a.mp4"}
    assert p.read_text() == '{"video": "a.mp4", "text": "x"}\n'
    p.write_text("garbage\n")
    with pytest.raises(InputError, match=r"o\.jsonl:1: not a JSON record"):
        read_done(str(p))
    p.write_bytes(b'{"video": "a.mp4", "text": "x"}\n{"video": "\xff"}\n')  # not UTF-8 (it was untyped)
    with pytest.raises(InputError, match=r"o\.jsonl:2: not a JSON record"):
        read_done(str(p))
    # torn tails longer than the 64 KiB block the newline is searched in, and a file that is one torn line
    good = b"".join(b'{"video": "v%d.mp4", "text": "t"}\n' % i for i in range(3000))
    for tail, keep in ((b'{"video": "z.mp4", "text": "' + b"y" * 70_000, good), (b'{"video": "z', b"")):
        p.write_bytes((good if keep else b"") + tail)
        assert read_done(str(p)) == ({f"v{i}.mp4" for i in range(3000)} if keep else set())
        assert p.read_bytes() == keep


def test_resume_refuses_an_output_captioned_under_other_settings(engine, data, tmp_path):
    """--resume skips the clips an output holds; if they were captioned under another prompt, alpha, model, frame
    count, token limit or template, skipping them would leave the file captioned two ways without a word. Refused
    before anything is captioned or written, naming the line, the field and both values; allow_mixed_settings
    skips them anyway; the same settings (alpha 4 written as 4.0, a record from before a field was written) resume."""
    d, clips, _ = data
    out = tmp_path / "caps.jsonl"
    st = CaptionSettings("Describe the video in details.", max_new_tokens=6, model="tiny")
    caption_to_jsonl(engine, clips[:2], str(out), st, progress=False)
    first = out.read_bytes()
    assert [(r["lora_alpha"], r["num_frames"], r["conv_mode"]) for r in records(out)] == [(4.0, 4, "plain")] * 2
    changed = {"prompt": dict(prompt="What happens?"), "max_new_tokens": dict(max_new_tokens=7),
               "lora_alpha": dict(lora_alpha=20.0), "model": dict(model="other")}
    for field, kw in changed.items():
        other = CaptionSettings(**{**dict(prompt=st.prompt, max_new_tokens=6, model="tiny"), **kw})
        with pytest.raises(InputError) as e:
            caption_to_jsonl(engine, clips, str(out), other, resume=True, progress=False)
        msg = str(e.value)
        assert msg.startswith(f"{out}:1: ") and f"{field}=" in msg and "--allow-mixed-settings" in msg, msg
        was = {"prompt": "'Describe the video in details.'", "max_new_tokens": "6", "lora_alpha": "4.0",
               "model": "'tiny'"}[field]
        assert f"captioned with {field}={was}, this run has {field}={kw[field]!r}" in msg, msg
        assert out.read_bytes() == first  # nothing captioned, nothing written
    # the engine's own settings: its frame count and template, and an alpha set on it
    template = engine.conv_mode
    try:
        engine.conv_mode = "eval_vcgbench"
        with pytest.raises(InputError, match=r"caps\.jsonl:1: .* conv_mode='plain', this run has conv_mode="):
            caption_to_jsonl(engine, clips, str(out), st, resume=True, progress=False)
    finally:
        engine.conv_mode = template
    try:
        engine.set_lora_alpha(10.0)
        with pytest.raises(InputError, match=r"caps\.jsonl:1: .* lora_alpha=4\.0, this run has lora_alpha=10\.0"):
            caption_to_jsonl(engine, clips, str(out), st, resume=True, progress=False)
    finally:
        engine.set_lora_alpha(4.0)
    assert out.read_bytes() == first
    # refused on any line, not only the first: a record (hand-written) made under another frame count
    rec = {**records(out)[0], "video": "elsewhere.mp4", "num_frames": 16}
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    with pytest.raises(InputError, match=r"caps\.jsonl:3: 'elsewhere\.mp4' was captioned with num_frames=16, "
                                         r"this run has num_frames=4"):
        caption_to_jsonl(engine, clips, str(out), st, resume=True, progress=False)
    mixed = caption_to_jsonl(engine, clips, str(out), CaptionSettings("What happens?", max_new_tokens=6, model="tiny"),
                             resume=True, progress=False, allow_mixed_settings=True)
    assert (mixed.skipped, mixed.captioned) == (2, 1)
    assert [r["prompt"] for r in records(out)][-1] == "What happens?"
    # the same settings resume: alpha written as an integer, fields an older version did not write, error records
    lines = [{**r, "lora_alpha": 4} for r in records(out)[:2]]
    for r in lines:
        r.pop("conv_mode")
    lines.append({"video": clips[2], "error": "VideoError: x", "prompt": "another"})
    out.write_text("".join(json.dumps(r) + "\n" for r in lines))
    again = caption_to_jsonl(engine, clips, str(out), st, resume=True, progress=False)
    assert (again.skipped, again.captioned) == (2, 1)


def test_read_done_compares_settings_as_json_values(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text(json.dumps({"video": "a.mp4", "text": "x", "lora_alpha": 4, "num_frames": 16}) + "\n")
    assert read_done(str(p), {"lora_alpha": 4.0, "num_frames": 16}) == {"a.mp4"}
    assert read_done(str(p), {"num_frames": None, "missing": 3}) == {"a.mp4"}  # unknown here / not in the record
    with pytest.raises(InputError, match="num_frames=16, this run has num_frames=8"):
        read_done(str(p), {"num_frames": 8})
    long = "q" * 5000
    with pytest.raises(InputError) as e:
        read_done(str(p), {"lora_alpha": long})
    assert len(str(e.value)) < 1000 and "(5002 characters)" in str(e.value)


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pllava.cli", "caption", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_records(path, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path).read().count("\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no records in time")


@pytest.fixture(scope="module")
def many(tmp_path_factory, data):
    """A list of 16 clips (the 3 clips, repeated under other names)."""
    d = tmp_path_factory.mktemp("many")
    _, clips, _ = data
    names = []
    for i in range(16):
        p = d / f"clip{i:02d}{os.path.splitext(clips[i % 3])[1]}"
        p.write_bytes(open(clips[i % 3], "rb").read())
        names.append(str(p))
    return d, names


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_killed_or_interrupted_run_leaves_whole_lines_and_resumes(ckpts, many, tmp_path, sig):
    d, names = many
    out = str(tmp_path / "caps.jsonl")
    args = [str(d), "--model", ckpts["pllava"], "--output", out, "--max-new-tokens", "40", "--batch-size", "2"]
    p = _cli(*args)
    _wait_for_records(out, 2, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert p.returncode == 130, err
        assert "Traceback" not in err and "interrupted: captioned" in err, err
    got = records(out)  # every line whole and JSON
    assert 2 <= len(got) < 16
    p = _cli(*args, "--resume")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert f"skipped {len(got)}" in err and "Traceback" not in err
    final = records(out)
    assert sorted(r["video"] for r in final) == sorted(names)  # each clip exactly once


def test_cli_folder_output_and_summary(ckpts, data, tmp_path):
    d, _, bad = data
    out = tmp_path / "o.jsonl"
    p = _cli(str(d), "--model", ckpts["pllava"], "-o", str(out), "--max-new-tokens", "5")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err  # one clip failed; the others were captioned
    assert "captioned 3, failed 1, skipped 0" in err and "clips/s" in err and "model waited" in err
    p = _cli(str(d), "--model", ckpts["pllava"], "-o", str(out))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "--resume" in err and "Traceback" not in err, err
    p = _cli(str(d / "missing"), "--model", ckpts["pllava"], "-o", str(tmp_path / "x.jsonl"))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "missing: no such file or directory" in err, (p.returncode, err)
    p = _cli(str(d), "--model", ckpts["pllava"], "-o", str(out), "--resume", "--max-new-tokens", "6")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "captioned with max_new_tokens=5, this run has max_new_tokens=6" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    p = _cli(str(d), "--model", ckpts["pllava"], "-o", str(out), "--allow-mixed-settings")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "--allow-mixed-settings goes with --resume" in err, err


# ------------------------------------------------------------------------------------------ Ray Data
def test_ray_missing_extra_is_one_line(monkeypatch, data, tmp_path):
    from pllava import distributed

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(PllavaError, match=r"pip install -e \"\.\[ray\]\""):
        distributed.caption_dataset([str(data[0])], str(tmp_path / "o.jsonl"), "unused")
    assert not (tmp_path / "o.jsonl").exists()  # refused before the output is touched


def test_ray_path_gives_the_single_process_records(ckpts, data, tmp_path, engine):
    pytest.importorskip("ray.data")
    from pllava.distributed import caption_dataset

    d, clips, bad = data
    lst = tmp_path / "list.jsonl"
    lst.write_text("".join(json.dumps({"video": v, "id": i, "text": f"old {i}"}) + "\n"
                           for i, v in enumerate(clips + [bad])))
    single, dist = str(tmp_path / "single.jsonl"), str(tmp_path / "ray.jsonl")
    st = CaptionSettings("Describe the video in details.", max_new_tokens=10, model=os.path.basename(ckpts["pllava"]))
    caption_to_jsonl(engine, [str(lst)], single, st, batch_size=2, progress=False)
    s = caption_dataset([str(lst)], dist, ckpts["pllava"], max_new_tokens=10, batch_size=2, num_replicas=2,
                        rows_per_task=1)
    assert (s.captioned, s.failed) == (3, 1)

    def key(r):
        return {k: v for k, v in r.items() if k != "timings"}

    a = sorted((key(r) for r in records(single)), key=lambda r: r["video"])
    b = sorted((key(r) for r in records(dist)), key=lambda r: r["video"])
    assert a == b and all("id" in r and r["input_text"].startswith("old ") for r in b)
    assert sum("text" in r for r in b) == 3  # the broken clip's record holds no caption
    again = caption_dataset([str(lst)], dist, ckpts["pllava"], max_new_tokens=10, resume=True, num_replicas=2)
    assert (again.skipped, again.captioned) == (3, 0)  # only the broken clip was tried again
    assert len(records(dist)) == 5
    before = open(dist, "rb").read()
    for kw, field in ((dict(lora_alpha=20.0), "lora_alpha=4.0"), (dict(num_frames=8), "num_frames=4"),
                      (dict(prompt="What?"), "prompt=")):
        with pytest.raises(InputError, match=f"captioned with {field}"):
            caption_dataset([str(lst)], dist, ckpts["pllava"], max_new_tokens=10, resume=True, **kw)
    assert open(dist, "rb").read() == before

