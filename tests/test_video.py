"""The seek-based sampler returns exactly the frames a full sequential decode has at the same indices, for every
codec, frame-rate mode and size the tests can make with PyAV; and every bad input is a typed, named error."""
import http.server
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch

import pllava
from pllava.errors import VideoError
from pllava.testing import make_video
from pllava.live import live_windows
from pllava.video import DecodeLimits, decode_all, read_frames, stream_frames, uniform_indices

CLIPS = [  # (name, kwargs)
    ("h264_bframes.mp4", dict(codec="libx264", gop=10, bframes=2, num_frames=90, size=(96, 64))),
    ("h264_nob.mp4", dict(codec="libx264", gop=10, num_frames=70, size=(96, 64))),  # indexed from the header
    ("h264_vfr.mkv", dict(codec="libx264", gop=7, vfr=True, num_frames=60, size=(64, 48))),
    ("mpeg4_audio.mp4", dict(codec="mpeg4", gop=8, bframes=2, audio=True, num_frames=75, size=(97, 65))),
    ("mpeg4_vfr.mkv", dict(codec="mpeg4", gop=5, vfr=True, num_frames=40, size=(63, 47))),
    ("vp9.webm", dict(codec="libvpx-vp9", gop=12, num_frames=50, size=(66, 38))),
    ("one_frame.mp4", dict(codec="mpeg4", num_frames=1, size=(64, 48))),
]


def plain_decode(path) -> list:
    """Every frame, in order, by the plainest PyAV loop (nothing of pllava.video): the oracle of the sampler."""
    import av

    out = []
    with av.open(str(path)) as c:
        for packet in c.demux(video=0):
            try:
                out += [f.to_ndarray(format="rgb24") for f in packet.decode()]
            except av.error.InvalidDataError:
                continue  # a corrupt packet: skipped, as a player would
    return out


def pllava_index(num_frames: int, num_segments: int) -> list:
    """PLLaVA's get_index (tasks/eval/eval_utils.py, ChatPllava.get_index), typed from their code."""
    seg = float(num_frames - 1) / num_segments
    start = int(seg / 2)
    return [start + int(np.round(seg * i)) for i in range(num_segments)]


def test_pllava_index_literals():
    # pinned values of PLLaVA's formula, so the oracle itself cannot drift: 89/16 = 5.5625, start int(2.78) = 2
    assert pllava_index(90, 16) == [2, 8, 13, 19, 24, 30, 35, 41, 46, 52, 58, 63, 69, 74, 80, 85]
    assert pllava_index(30, 4) == [3, 10, 17, 25] and pllava_index(1, 5) == [0] * 5
    assert pllava_index(40, 64)[:10] == [0, 1, 1, 2, 2, 3, 4, 4, 5, 5]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {name: make_video(str(d / name), **kw) for name, kw in CLIPS}


@pytest.mark.parametrize("name", [c[0] for c in CLIPS])
@pytest.mark.parametrize("n", [16, 5])
def test_sampled_frames_equal_sequential_decode(clips, name, n):
    allf = plain_decode(clips[name])
    assert len(allf) == dict(CLIPS)[name]["num_frames"]
    got = read_frames(clips[name], n)
    want = pllava_index(len(allf), n)
    assert got.dtype == torch.uint8 and got.shape[0] == n
    for k, i in enumerate(want):
        assert np.array_equal(got[k].numpy(), allf[i]), f"{name}: frame {k} (index {i}) differs"


def test_mp4_without_b_frames_is_indexed_from_its_header(clips):
    from pllava.video import DEFAULT_LIMITS, PyAVBackend

    be = PyAVBackend()
    fast = be.probe(clips["h264_nob.mp4"], "x", DEFAULT_LIMITS)
    slow = be.probe(clips["h264_bframes.mp4"], "x", DEFAULT_LIMITS)
    assert fast.indexed_by == "index" and slow.indexed_by == "demux"
    assert fast.num_frames == 70 and len(fast.keyframe_pts) == 7


def test_fewer_frames_than_asked_repeat_like_pllava(clips):
    allf = plain_decode(clips["mpeg4_vfr.mkv"])  # 40 frames
    got = read_frames(clips["mpeg4_vfr.mkv"], 64)
    idx = pllava_index(40, 64)
    assert len(set(idx)) < 64 and got.shape[0] == 64
    assert all(np.array_equal(got[k].numpy(), allf[i]) for k, i in enumerate(idx))


def test_stream_frames_order_and_timestamps(clips):
    items = list(stream_frames(clips["h264_vfr.mkv"], 8))
    assert [i for i, _, _ in items] == uniform_indices(60, 8)
    ts = [t for _, t, _ in items]
    assert ts == sorted(ts) and ts[0] >= 0
    durations = (0.04, 0.09, 0.015, 0.2)  # the VFR clip's frame durations, cycling
    for i, t, _ in items:
        assert t == pytest.approx(sum(durations[k % 4] for k in range(i)), abs=2e-3)


def test_fps_sampler_and_time_range(clips):
    p = clips["h264_bframes.mp4"]  # 90 frames at 12 fps = 7.5 s
    allf = decode_all(p)
    items = list(stream_frames(p, 100, sampler="fps", fps=2))
    assert [i for i, _, _ in items] == list(range(0, 90, 6))
    assert all(np.array_equal(f, allf[i]) for i, _, f in items)
    capped = list(stream_frames(p, 4, sampler="fps", fps=2))
    assert len(capped) == 4
    rng = list(stream_frames(p, 4, start=2.0, end=4.0))  # frames 24..47
    assert [i for i, _, _ in rng] == [24 + i for i in uniform_indices(24, 4)]
    with pytest.raises(VideoError, match="holds no frame"):
        read_frames(p, 4, start=100.0)
    with pytest.raises(ValueError, match="fps"):
        read_frames(p, 4, sampler="fps")


def test_short_side_resizes_in_the_scaler(clips):
    got = read_frames(clips["h264_bframes.mp4"], 4, short_side=32)  # 96x64 -> 48x32
    assert tuple(got.shape) == (4, 32, 48, 3)
    full = read_frames(clips["h264_bframes.mp4"], 4)
    small = torch.nn.functional.interpolate(full.permute(0, 3, 1, 2).float(), size=(32, 48), mode="bicubic",
                                            antialias=True).permute(0, 2, 3, 1)
    assert (got.float() - small).abs().mean() < 6  # same picture (scalers differ in their taps)


def test_source_kinds_agree(clips):
    p = clips["vp9.webm"]
    ref = read_frames(p, 6)
    data = open(p, "rb").read()
    assert torch.equal(read_frames(data, 6), ref)
    with open(p, "rb") as f:
        assert torch.equal(read_frames(f, 6), ref)


def test_still_image_as_video(tmp_path):
    from PIL import Image

    img = (np.arange(40 * 30 * 3) % 251).astype(np.uint8).reshape(30, 40, 3)
    Image.fromarray(img).save(tmp_path / "still.png")
    got = read_frames(str(tmp_path / "still.png"), 16)
    assert got.shape == (16, 30, 40, 3) and all(np.array_equal(g.numpy(), img) for g in got)


def test_breaking_off_a_stream_stops_its_thread(clips):
    before = threading.active_count()
    it = stream_frames(clips["h264_bframes.mp4"], 16, prefetch=1)
    next(it)
    it.close()
    time.sleep(0.3)
    assert threading.active_count() <= before


# --------------------------------------------------------------------------------------- bad input
def test_not_a_video_zero_bytes_and_missing(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(os.urandom(5000))
    with pytest.raises(VideoError, match="junk.mp4"):
        read_frames(str(tmp_path / "junk.mp4"))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="zero bytes"):
        read_frames(str(tmp_path / "empty.mp4"))
    with pytest.raises(VideoError, match="zero bytes"):
        read_frames(b"")
    with pytest.raises(VideoError, match="no such file"):
        read_frames(str(tmp_path / "nope.mp4"))


def test_truncated_mp4(clips, tmp_path):
    data = open(clips["h264_bframes.mp4"], "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="cut.mp4"):
        read_frames(str(tmp_path / "cut.mp4"))


def test_truncated_stream_format_returns_what_is_there(tmp_path):
    p = make_video(str(tmp_path / "full.ts"), num_frames=60, codec="mpeg4", gop=6, container_format="mpegts")
    data = open(p, "rb").read()
    (tmp_path / "cut.ts").write_bytes(data[: len(data) // 2])
    got = read_frames(str(tmp_path / "cut.ts"), 8)
    there = plain_decode(tmp_path / "cut.ts")
    assert 0 < len(there) < 60 and got.shape[0] == 8
    for k, i in enumerate(pllava_index(len(there), 8)):  # PLLaVA's indices over the frames that are there
        assert np.array_equal(got[k].numpy(), there[i]), f"frame {k} (index {i})"


def _garbled_ts(tmp_path):
    """(a clean 60-frame MPEG-TS clip, a copy with payloads garbled a third of the way in, TS sync bytes kept)."""
    p = make_video(str(tmp_path / "c.ts"), num_frames=60, codec="mpeg4", gop=6, container_format="mpegts",
                   size=(96, 64))
    data = bytearray(open(p, "rb").read())
    rng = np.random.default_rng(0)
    for off in range(len(data) // 3, len(data) // 3 + 3000, 188):
        data[off + 8:off + 150] = rng.integers(0, 256, 142, dtype=np.uint8).tobytes()
    (tmp_path / "bad.ts").write_bytes(bytes(data))
    return p, str(tmp_path / "bad.ts")


def test_corrupt_packets_mid_stream_are_skipped(tmp_path):
    p, bad = _garbled_ts(tmp_path)
    got = read_frames(bad, 16)
    assert got.shape[0] == 16
    there = plain_decode(bad)  # what a decoder that skips the garbled packets shows
    clean = plain_decode(p)
    assert len(there) < 60
    for k, i in enumerate(pllava_index(len(there), 16)):
        assert np.array_equal(got[k].numpy(), there[i]), f"frame {k} (index {i})"
    assert np.array_equal(got[0].numpy(), clean[pllava_index(len(there), 16)[0]])  # before the damage: intact


def test_a_damaged_clip_gives_the_same_frames_every_time(tmp_path, monkeypatch, caplog):
    """FFmpeg's frame threads conceal damage by timing (this clip: another frame 6 in 8 of 300 reads under load,
    with no decode error raised), so at the first sign of damage the reader reopens the clip without frame threads
    and decodes again what it has not handed out; a clean clip keeps frame threads (13-15 % faster)."""
    import logging

    import pllava.video as V

    clean, bad = _garbled_ts(tmp_path)
    opened = []
    real = V._open_decoder
    monkeypatch.setattr(V, "_open_decoder", lambda be, src, what, threads: (opened.append(threads),
                                                                            real(be, src, what, threads))[1])
    read_frames(clean, 16)
    assert opened == ["AUTO"]
    opened.clear()
    with caplog.at_level(logging.INFO, logger="pllava"):
        first = read_frames(bad, 16)
    assert opened == ["AUTO", "SLICE"] and "without frame threads" in caplog.text
    there = plain_decode(bad)
    for k, i in enumerate(pllava_index(len(there), 16)):
        assert np.array_equal(first[k].numpy(), there[i]), f"frame {k} (index {i})"
    for run in range(20):
        assert torch.equal(read_frames(bad, 16), first), f"read {run + 2} differs"
    opened.clear()
    assert len(decode_all(bad)) == len(there) and opened == ["AUTO", "SLICE"]


def test_a_stream_that_changes_size_part_way_gives_frames_of_one_size(tmp_path, caplog):
    """Two MPEG-TS recordings of different sizes back to back (TS concatenates; the second part's SPS changes the
    size): the frames did not stack (an untyped ValueError from read_frames and from a live window). Every frame
    now comes out at the first frame's size, those of that size exactly as decoded, and the change is logged."""
    a = open(make_video(str(tmp_path / "a.ts"), num_frames=12, size=(64, 48), codec="libx264"), "rb").read()
    b = open(make_video(str(tmp_path / "b.ts"), num_frames=12, size=(96, 64), codec="libx264"), "rb").read()
    path = str(tmp_path / "ab.ts")
    with open(path, "wb") as f:
        f.write(a + b)
    plain = plain_decode(path)
    assert {x.shape for x in plain} == {(48, 64, 3), (64, 96, 3)}  # the clip does change size
    with caplog.at_level("WARNING", logger="pllava"):
        got = read_frames(path, 16)
    assert got.shape == (16, 48, 64, 3)
    first = [x for x in plain if x.shape == (48, 64, 3)]
    same = [g for g in got.numpy() if any(np.array_equal(g, x) for x in first)]
    assert 0 < len(same) < 16  # frames of both parts were sampled; those of the first size are exact
    assert "frames change size part-way (96x64 after 64x48)" in caplog.text
    with open(path, "rb") as f:
        wins = list(live_windows(f, 4, window_s=0.5, every_s=0.5, limits=DecodeLimits(timeout_s=0.5)))
    assert wins and all(w.frames.shape[1:] == (48, 64, 3) for w in wins)


def test_audio_only(tmp_path):
    import av

    p = str(tmp_path / "a.m4a")
    with av.open(p, "w") as c:
        s = c.add_stream("aac", rate=16000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        fr.sample_rate = 16000
        for pkt in list(s.encode(fr)) + list(s.encode()):
            c.mux(pkt)
    with pytest.raises(VideoError, match="no video stream"):
        read_frames(p)


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_a_title_that_is_not_utf8_does_not_stop_a_clip(tmp_path, ext):
    """Container metadata in another encoding (a Latin-1 title): PyAV < 19 raised UnicodeDecodeError at open unless
    told metadata_errors="ignore", and PyAV 19 refuses that argument (a TypeError on every clip), so the argument
    is passed by version. The clip's frames are those of the same clip with a UTF-8 title."""
    import av

    def clip(name, title):
        path = str(tmp_path / f"{name}.{ext}")
        with av.open(path, "w") as c:
            c.metadata["title"] = "QQQQQQQQ"
            st = c.add_stream("mpeg4", rate=10)
            st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
            for i in range(6):
                img = np.full((48, 64, 3), 30 * i, np.uint8)
                img[8 * i:8 * i + 8] = 255
                for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(pkt)
            for pkt in st.encode():
                c.mux(pkt)
        raw = open(path, "rb").read()
        assert raw.count(b"QQQQQQQQ") == 1
        open(path, "wb").write(raw.replace(b"QQQQQQQQ", title))
        return path

    title = "d\xe9j\xe0 vu".encode("latin-1").ljust(8)
    latin1, plain = clip("latin1", title), clip("plain", b"plain ok")
    with pytest.raises(UnicodeDecodeError):
        title.decode("utf-8")  # what a strict decoder of the title meets
    got, want = read_frames(latin1, 4), read_frames(plain, 4)
    assert got.shape == (4, 48, 64, 3) and torch.equal(torch.as_tensor(got), torch.as_tensor(want))


def test_a_fork_after_decoding_in_a_live_thread_does_not_hang(clips):
    """A process whose long-lived thread has decoded a clip (the engine's media workers) then starts a subprocess
    with a preexec_fn (as Ray starts its daemons) or forks. PyAV 19 keeps a threaded scaler per thread; the child
    freed it, joining threads a fork does not copy, and hung before exec (Python 3.12 / 3.13: the spawn below never
    returned). Run in its own process, with a deadline: a hang here is a failure, not a stuck suite."""
    import signal
    import subprocess
    import sys

    code = ("import subprocess, threading, queue\n"
            "from pllava.video import read_frames\n"
            "q = queue.Queue()\n"
            "def worker():\n"
            "    q.put(read_frames(CLIP, 8, short_side=32).shape)\n"
            "    threading.Event().wait()\n"
            "threading.Thread(target=worker, daemon=True).start()\n"
            "print(q.get(timeout=60), flush=True)\n"
            "print(subprocess.run(['true'], preexec_fn=lambda: None).returncode, flush=True)\n"
            ).replace("CLIP", repr(clips["h264_bframes.mp4"]))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the stuck child too
        p.communicate()
        pytest.fail("the subprocess started after decoding in a live thread hung")
    assert p.returncode == 0, err
    assert out.split("\n")[1] == "0", out


def test_unsupported_codec(clips, monkeypatch):
    import pllava.video as V

    monkeypatch.setattr(V, "_has_decoder", lambda name: False)
    with pytest.raises(VideoError, match="unsupported codec 'h264'"):
        read_frames(clips["h264_bframes.mp4"])


def test_a_stream_without_a_codec_context_is_a_video_error(clips, monkeypatch):
    """A fuzzed MP4 header gave a video stream with no codec context (AttributeError before)."""
    from types import SimpleNamespace

    import pllava.video as V

    fake = SimpleNamespace(streams=SimpleNamespace(video=[SimpleNamespace(codec_context=None)]), close=lambda: None)
    monkeypatch.setattr(V.PyAVBackend, "_open", lambda self, src, what: fake)
    with pytest.raises(VideoError, match=r"h264_nob\.mp4: the video stream's codec could not be read"):
        read_frames(clips["h264_nob.mp4"])


def test_an_ffmpeg_error_of_a_seek_is_a_video_error(clips, monkeypatch):
    """A fuzzed AVI made FFmpeg's seek fail with EPERM (av.error.PermissionError escaped untyped before)."""
    import av

    import pllava.video as V

    real = V._open_decoder

    class Container:  # the real container, but its seek fails as the fuzzed clip's did
        def __init__(self, c):
            self.c = c

        def __getattr__(self, name):
            return getattr(self.c, name)

        def seek(self, *a, **kw):
            raise av.error.PermissionError(1, "Operation not permitted")

    def opened(*a, **kw):
        c, st, damage = real(*a, **kw)
        return Container(c), st, damage

    monkeypatch.setattr(V, "_open_decoder", opened)
    path = clips["h264_nob.mp4"]
    with pytest.raises(VideoError, match="not decodable .*PermissionError: Operation not permitted") as e:
        read_frames(path, 4)
    assert path in str(e.value)


def test_a_decoded_frame_past_the_index_is_not_an_index_error(tmp_path, monkeypatch):
    """A fuzzed MKV decoded a frame whose pts lay past every indexed one (an IndexError before). Here the index is
    cut after 10 of 20 frames and ends in four timestamps no frame has: every wanted frame still comes out, the
    indexed ones exactly as decoded."""
    import pllava.video as V

    clip = make_video(str(tmp_path / "c.mp4"), num_frames=20, size=(64, 48), codec="mpeg4", gop=30)
    real = V.PyAVBackend.probe

    def probe(self, src, what, limits):
        info = real(self, src, what, limits)
        p = info.pts
        fake = [p[9] + (p[10] - p[9]) * j // 5 for j in range(1, 5)]
        assert p[9] < fake[0] < fake[-1] < p[10]
        info.pts = p[:10] + fake
        info.keyframe_pts = [k for k in info.keyframe_pts if k <= fake[-1]]
        return info

    monkeypatch.setattr(V.PyAVBackend, "probe", probe)
    got = list(stream_frames(clip, 14))  # (index, t, frame): PLLaVA's sampling of the 14 indexed frames
    plain = plain_decode(clip)
    assert len(got) == 14 and {i for i, _, _ in got} >= {10, 11}
    assert all(np.array_equal(f, plain[i]) for i, _, f in got if i < 10)
    assert all(any(np.array_equal(f, x) for x in plain) for i, _, f in got if i >= 10)


def test_limits_refuse_before_decoding(clips):
    with pytest.raises(VideoError, match="max_pixels=1000"):
        read_frames(clips["h264_bframes.mp4"], limits=DecodeLimits(max_pixels=1000))
    with pytest.raises(VideoError, match="max_duration_s"):
        read_frames(clips["h264_bframes.mp4"], limits=DecodeLimits(max_duration_s=1))
    with pytest.raises(VideoError, match="max_bytes"):
        read_frames(open(clips["h264_bframes.mp4"], "rb").read(), limits=DecodeLimits(max_bytes=100))
    with pytest.raises(ValueError, match="max_frames"):
        read_frames(clips["h264_bframes.mp4"], 5000)


# --------------------------------------------------------------------------------------- URLs (loopback only)
@pytest.fixture()
def http_dir(clips):
    root = os.path.dirname(clips["vp9.webm"])

    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=root, **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_url(clips, http_dir):
    assert torch.equal(read_frames(f"{http_dir}/vp9.webm", 6), read_frames(clips["vp9.webm"], 6))
    with pytest.raises(VideoError, match="missing.mp4: HTTP 404"):
        read_frames(f"{http_dir}/missing.mp4")
    with pytest.raises(VideoError, match="max_bytes"):
        read_frames(f"{http_dir}/vp9.webm", limits=DecodeLimits(max_bytes=10))


def test_unreachable_url_fails_fast():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(VideoError, match="unreachable"):
        read_frames(f"http://127.0.0.1:{port}/clip.mp4", limits=DecodeLimits(timeout_s=2))
    assert time.monotonic() - t0 < 5


@pytest.fixture
def trickle_server():
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from server_util import trickle_server as serve

    with serve(600) as where:
        yield where


def test_a_trickling_url_is_cut_at_the_overall_deadline(trickle_server):
    """Every read gets bytes within the socket timeout, yet the fetch as a whole must end at timeout_s."""
    url, _ = trickle_server
    t0 = time.monotonic()
    with pytest.raises(VideoError, match=r"timed out after 1 s \(the whole fetch\)"):
        read_frames(url, 4, limits=DecodeLimits(timeout_s=1))
    assert time.monotonic() - t0 < 3


def test_the_server_fetcher_has_the_same_deadline(trickle_server):
    from pllava.media import MediaError, fetch_http

    url, port = trickle_server
    t0 = time.monotonic()
    with pytest.raises(MediaError, match=r"fetch timed out after 1 s"):
        fetch_http(url, max_bytes=1 << 20, timeout_s=1, allowed_hosts=frozenset({f"127.0.0.1:{port}"}))
    assert time.monotonic() - t0 < 3


# --------------------------------------------------------------------------------------- live sources
def test_live_windows_keeps_its_public_spelling():
    """live.py holds it; pllava.video.live_windows (the README's spelling) is the same function."""
    import pllava.live
    import pllava.video

    assert pllava.video.live_windows is pllava.live.live_windows is live_windows
    assert pllava.video.LiveWindow is pllava.live.LiveWindow
    with pytest.raises(AttributeError, match="no_such_name"):
        pllava.video.no_such_name


def test_live_pipe_sliding_windows(tmp_path):
    p = make_video(str(tmp_path / "live.ts"), num_frames=72, fps=12, codec="mpeg4", gop=12, container_format="mpegts")
    data = open(p, "rb").read()
    r, w = os.pipe()

    def writer():
        with os.fdopen(w, "wb") as f:
            for k in range(0, len(data), 4096):
                f.write(data[k:k + 4096])
                f.flush()

    threading.Thread(target=writer, daemon=True).start()
    with os.fdopen(r, "rb") as f:
        wins = list(live_windows(f, 4, window_s=2.0, every_s=1.0, limits=DecodeLimits(timeout_s=3)))
    assert len(wins) >= 3  # 6 s of video: windows ending at 2, 3, 4, 5 s
    for wdw in wins:
        assert wdw.frames.shape[0] == 4 and wdw.timestamps == sorted(wdw.timestamps)
        assert wdw.end_time - wdw.timestamps[0] <= 2.0 + 1e-6
    assert [round(x.end_time) for x in wins[:3]] == [2, 3, 4]


def test_live_growing_file_and_a_source_that_stops(tmp_path):
    p = make_video(str(tmp_path / "src.ts"), num_frames=36, fps=12, codec="mpeg4", gop=12, container_format="mpegts")
    data = open(p, "rb").read()
    grow = tmp_path / "grow.ts"
    grow.write_bytes(data[:2000])

    def writer():
        with open(grow, "ab") as f:
            for k in range(2000, len(data), 3000):
                time.sleep(0.02)
                f.write(data[k:k + 3000])
                f.flush()

    threading.Thread(target=writer, daemon=True).start()
    wins = list(live_windows(str(grow), 4, window_s=1.0, every_s=1.0, growing=True,
                             limits=DecodeLimits(timeout_s=1.0)))
    assert len(wins) >= 2
    silent = tmp_path / "silent.ts"
    silent.write_bytes(b"")
    t0 = time.monotonic()
    with pytest.raises(VideoError, match="silent.ts"):
        list(live_windows(str(silent), 4, growing=True, limits=DecodeLimits(timeout_s=0.5)))
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------------------- engine
def test_engine_overlapped_decode_gives_the_same_answer(ckpts, clips):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    p = clips["h264_bframes.mp4"]
    a = eng.encode(p, overlap=True)
    b = eng.encode(p, overlap=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    out = eng.generate(p, "What happens?", max_new_tokens=6)
    assert {"video_decode", "preprocess", "vision", "projector", "prefill", "decode", "ttft"} <= set(out.timings)


@pytest.mark.parametrize("name", ["h264_bframes.mp4", "one_frame.mp4"])
def test_streamed_frame_groups_give_the_batch_features(ckpts, clips, name):
    """generate() encodes a file's frames in groups of the tower's frame_chunk (4 on the CPU) while the next ones
    decode: 10 frames (groups of 4, 4, 2) and a 1-frame clip sampled 10 times (one frame, encoded once) give
    the same bits as decoding everything first and encoding all 10 frames in one batch, and as a frame at a time."""
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], num_frames=10, pooling_shape=(10, 3, 3))
    assert eng.model.vision_tower.frame_chunk == 4
    p = clips[name]
    grouped = eng.encode(p, overlap=True)
    whole = eng.encode(p, overlap=False)
    eng.model.vision_tower.frame_chunk = None  # streamed a frame at a time, the batch in one forward
    one_by_one, unchunked = eng.encode(p, overlap=True), eng.encode(p, overlap=False)
    assert grouped.shape == (10 * 9, eng.config.text.hidden_size)
    assert torch.equal(grouped, whole) and torch.equal(grouped, one_by_one) and torch.equal(grouped, unchunked)


def test_engine_captions_a_live_pipe(ckpts, tmp_path):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    eng.limits = DecodeLimits(timeout_s=3)
    p = make_video(str(tmp_path / "live.ts"), num_frames=48, fps=12, codec="mpeg4", gop=12, container_format="mpegts")
    data = open(p, "rb").read()
    r, w = os.pipe()

    def writer():
        with os.fdopen(w, "wb") as f:
            f.write(data)

    threading.Thread(target=writer, daemon=True).start()
    with os.fdopen(r, "rb") as f:
        outs = list(eng.live(f, "What is happening?", window_s=1.0, every_s=1.0, max_new_tokens=4))
    assert [round(t) for t, _ in outs] == [1, 2, 3]
    assert all(len(o.token_ids) == 4 for _, o in outs)


def test_a_non_seekable_reader_is_read_once(video_path):
    """A reader that cannot seek (a pipe, a socket file, a stream wrapper): probe and decode both need the bytes,
    so it is buffered once; the frames equal those of the file."""
    import io

    import pllava

    class OneWay(io.RawIOBase):
        def __init__(self, data):
            self.b = io.BytesIO(data)

        def readable(self):
            return True

        def seekable(self):
            return False

        def readinto(self, buf):
            chunk = self.b.read(min(len(buf), 777))  # short reads, as a pipe gives
            buf[:len(chunk)] = chunk
            return len(chunk)

    data = open(video_path, "rb").read()
    want = pllava.read_frames(video_path, 4)
    got = pllava.read_frames(OneWay(data), 4)
    assert (got == want).all()
    with pytest.raises(pllava.VideoError, match="zero bytes"):
        pllava.read_frames(OneWay(b""), 4)
    with pytest.raises(pllava.VideoError, match="binary mode"):
        pllava.read_frames(io.StringIO("text"), 4)


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotated_videos_come_out_upright(tmp_path, rotation):
    """A display matrix (portrait phone video) is applied: the frames equal the stored ones rotated by it, so
    sampled, streamed and decode-everything paths agree and the model sees the picture upright."""
    from pllava.testing import make_video
    from pllava.video import decode_all

    plain = make_video(str(tmp_path / "p.mp4"), num_frames=10, size=(64, 32))
    rot = make_video(str(tmp_path / "r.mp4"), num_frames=10, size=(64, 32), rotation=rotation)
    want = torch.from_numpy(np.stack([np.rot90(f, rotation // 90 % 4) for f in decode_all(plain)]))
    from pllava.video import uniform_indices

    got = read_frames(rot, 6)
    assert tuple(got.shape[1:3]) == ((32, 64) if rotation == 180 else (64, 32))
    assert torch.equal(got, want[uniform_indices(10, 6)])
    assert torch.equal(torch.from_numpy(np.stack(decode_all(rot))), want)
