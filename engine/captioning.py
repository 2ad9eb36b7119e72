"""Captioning at scale: inputs (files, URLs, folders, globs, list files) -> JSONL records, resumable.

`caption_to_jsonl` drives `Engine.generate_iter` (the continuous-batching scheduler; no loop of its own): clips
are decoded and preprocessed ahead by media workers while the model runs, and each record is written as one
`os.write` of one whole line on an O_APPEND descriptor, so a killed run leaves whole lines only (a tail without
its newline, from a crash of the machine itself, is cut off by the next `--resume`). `pllava.distributed` runs
the same records through Ray Data.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

from .config import DEFAULT_LORA_ALPHA
from .errors import InputError

log = logging.getLogger("pllava")

VIDEO_EXTS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts",
                        ".mts", ".m2ts", ".3gp", ".ogv", ".gif"})
LIST_EXTS = frozenset({".txt", ".jsonl", ".csv"})
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class Item:
    video: str  # path or URL, as the record names it
    extra: dict = field(default_factory=dict)  # fields a .jsonl / .csv list carried along
    listed_in: str | None = None  # the list file that named it


# ---------------------------------------------------------------------------------------------- inputs
def _from_list(path: str) -> list[Item]:
    ext = os.path.splitext(path)[1].lower()
    base = os.path.dirname(os.path.abspath(path))

    def resolve(v: str) -> str:  # a relative path in a list is relative to the list file
        return v if URL_RE.match(v) or os.path.isabs(v) else os.path.normpath(os.path.join(base, v))

    out = []
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8", Notepad) is not part of the first field or path
        with open(path, encoding="utf-8-sig", newline="") as f:
            if ext == ".txt":
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        out.append(Item(resolve(line), listed_in=path))
            elif ext == ".jsonl":
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("video"), str) or not rec["video"]:
                        raise InputError(f"{path}:{n}: each line must be an object with a 'video' string")
                    out.append(Item(resolve(rec["video"]), {k: v for k, v in rec.items() if k != "video"}, path))
            else:
                rows = csv.DictReader(f)
                if rows.fieldnames is None or "video" not in rows.fieldnames:
                    raise InputError(f"{path}: a CSV list needs a 'video' column (header: {rows.fieldnames})")
                for n, row in enumerate(rows, 2):
                    v = (row.get("video") or "").strip()
                    if not v:
                        raise InputError(f"{path}:{n}: empty 'video' field")
                    out.append(Item(resolve(v), {k: x for k, x in row.items() if k != "video" and k is not None}, path))
    except UnicodeDecodeError:
        raise InputError(f"{path}: a list file must be UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    return out


def _walk(d: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(d):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in VIDEO_EXTS]
    return found


def expand_inputs(inputs, dedupe: bool = True) -> list[Item]:
    """Video files, URLs, directories (recursive, video extensions only), globs and list files (.txt: a path or
    URL a line; .jsonl / .csv: a `video` field, the other fields carried along) -> items, first occurrence
    kept. An input that names nothing is an InputError naming it."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    items: list[Item] = []
    for raw in inputs:
        s = os.fspath(raw)
        if URL_RE.match(s):
            items.append(Item(s))
        elif os.path.isdir(s):
            vids = _walk(s)
            if not vids:
                log.warning("%s: a folder with no video files (%s)", s, ", ".join(sorted(VIDEO_EXTS)))
            items += [Item(v) for v in vids]
        elif os.path.isfile(s):
            ext = os.path.splitext(s)[1].lower()
            items += _from_list(s) if ext in LIST_EXTS else [Item(s)]
        elif glob.has_magic(s):
            hits = sorted(glob.glob(s, recursive=True))
            if not hits:
                raise InputError(f"{s}: the pattern matches nothing")
            for h in hits:
                if os.path.isdir(h):
                    items += [Item(v) for v in _walk(h)]
                elif os.path.splitext(h)[1].lower() in VIDEO_EXTS:
                    items.append(Item(h))
        else:
            raise InputError(f"{s}: no such file or directory")
    if not dedupe:
        return items
    seen, out = set(), []
    for it in items:
        if it.video not in seen:
            seen.add(it.video)
            out.append(it)
    return out


# ---------------------------------------------------------------------------------------------- output
def json_line(record: dict) -> str:
    """One record as a line of JSON, non-ASCII text as it is; a record holding a lone surrogate (a file name that
    is not UTF-8, which os.walk gives as '\\udce9'; a list's "\\ud800" escape) is written with ASCII escapes, the
    same JSON value (json.loads gives the same string back, so --resume matches it). Written as it was, it
    raised UnicodeEncodeError and ended the run."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True)
    return line


class JsonlWriter:
    """Appends one JSON record a line; each line goes out in one os.write on an O_APPEND descriptor (a signal
    cannot split it, and nothing sits in a Python buffer when the process dies)."""

    def __init__(self, path: str):
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise InputError(f"{path}: the output folder {d} does not exist")
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"{path}: cannot open for writing: {e.strerror or e}") from None
        self.path = path

    def write(self, record: dict):
        data = (json_line(record) + "\n").encode("utf-8")
        n = os.write(self.fd, data)
        if n != len(data):  # a full disk: say so rather than leave half a line unexplained
            raise OSError(f"{self.path}: short write ({n} of {len(data)} bytes; disk full?)")

    def close(self):
        os.close(self.fd)


def read_done(path: str, expect: dict | None = None) -> set[str]:
    """Videos that already have a text record in `path`, read a line at a time (a million-clip output is ~600 MB;
    it was read whole). A last line without its newline (a machine crash mid-write) is cut off, so the next record
    starts on a line of its own. `expect`: this run's settings (`record_settings`; a None value is not known here
    and not compared); a text record made under another value of one of them is an InputError naming the line,
    the field and both values, since skipping its clip would leave the output captioned two ways without a word
    (a record without the field, from an older version, is not compared on it)."""
    done: set[str] = set()
    if not os.path.exists(path):
        return done
    expect = {k: v for k, v in (expect or {}).items() if v is not None}
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size and (f.seek(size - 1), f.read(1))[1] != b"\n":
            cut, pos = 0, size  # just past the last newline, found from the end a block at a time
            while pos > 0:
                step = min(1 << 16, pos)
                pos -= step
                f.seek(pos)
                i = f.read(step).rfind(b"\n")
                if i >= 0:
                    cut = pos + i + 1
                    break
            log.warning("%s: a torn last line (%d bytes) is dropped", path, size - cut)
            f.truncate(cut)
        f.seek(0)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise InputError(f"{path}:{n}: not a JSON record; is this the output of pllava caption?") from None
            if isinstance(rec, dict) and isinstance(rec.get("video"), str) and isinstance(rec.get("text"), str):
                for k, v in expect.items():
                    if k in rec and rec[k] != v:  # as JSON values: alpha 4 is 4.0
                        raise InputError(
                            f"{path}:{n}: {_short(rec['video'])} was captioned with {k}={_short(rec[k])}, this run "
                            f"has {k}={_short(v)}; --resume continues a run with the same settings: run with "
                            f"{k}={_short(rec[k])}, write to another output, or pass --allow-mixed-settings "
                            "(allow_mixed_settings=True) to skip the clips it holds whatever their settings")
                done.add(rec["video"])
    return done


def _short(v, limit: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} characters)"


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class CaptionSettings:
    prompt: str
    max_new_tokens: int = 256
    lora_alpha: float | None = None
    model: str = ""

    def request(self, video: str) -> dict:
        return dict(video=video, prompt=self.prompt, max_new_tokens=self.max_new_tokens, lora_alpha=self.lora_alpha)


def record_settings(settings: CaptionSettings, engine=None, num_frames: int | None = None,
                    conv_mode: str | None = None) -> dict:
    """The settings a record names, which shape its text. Without an engine (Ray's driver) what the engine would
    decide is None unless given (num_frames and conv_mode come from the checkpoint)."""
    alpha = settings.lora_alpha
    if alpha is None:
        alpha = engine.lora_alpha if engine is not None else DEFAULT_LORA_ALPHA
    return dict(model=settings.model, prompt=settings.prompt,
                num_frames=engine.config.num_frames if engine is not None else num_frames,
                lora_alpha=alpha, max_new_tokens=settings.max_new_tokens,
                conv_mode=engine.conv_mode if engine is not None else conv_mode)


def make_record(item: Item, out, settings: CaptionSettings, engine, warned: set | None = None) -> dict:
    shaped = record_settings(settings, engine)
    if out.finish_reason == "error":
        rec = {"video": item.video, "error": out.error}  # error_line: typed, one line
    else:
        rec = {"video": item.video, "text": out.text, "num_prompt_tokens": out.num_prompt_tokens,
               "num_new_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
               "timings": {k: round(v, 4) for k, v in out.timings.items() if isinstance(v, (int, float))}}
    rec.update(shaped)
    return carry(rec, item.extra, warned)


# every key a record of this module may hold, in either form (text or error)
RECORD_KEYS = frozenset({"video", "text", "error", "num_prompt_tokens", "num_new_tokens", "finish_reason", "timings",
                         "model", "prompt", "num_frames", "lora_alpha", "max_new_tokens", "conv_mode"})


def carry(rec: dict, extra: dict, warned: set | None = None) -> dict:
    """Copy a list's other fields into `rec`. One whose name a record uses is kept as `input_<name>`: a dataset's
    own `text` column copied as `text` would sit beside a failed clip's `error` (and --resume would take it for
    a caption, skipping the clip for good), or be lost under a new caption. Each renamed field is logged once
    per `warned` set (a run's)."""
    for k, v in extra.items():
        name = k
        while name in RECORD_KEYS or (name != k and name in extra):
            name = "input_" + name
        if name != k and (warned is None or k not in warned):
            if warned is not None:
                warned.add(k)
            log.warning("the list's field %r is carried as %r: records have their own %r", k, name, k)
        rec.setdefault(name, v)
    return rec


@dataclass
class Summary:
    captioned: int = 0
    failed: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0
    model_wait_s: float = 0.0
    interrupted: bool = False

    def count(self, record: dict):
        if "error" in record:
            self.failed += 1
        else:
            self.captioned += 1

    @property
    def clips_per_s(self) -> float:
        return self.captioned / self.elapsed_s if self.elapsed_s else 0.0

    def line(self) -> str:
        wait = self.model_wait_s / self.elapsed_s * 100 if self.elapsed_s else 0.0
        return (f"{'interrupted: ' if self.interrupted else ''}captioned {self.captioned}, failed {self.failed}, "
                f"skipped {self.skipped}, {self.clips_per_s:.2f} clips/s, elapsed {self.elapsed_s:.1f} s, "
                f"model waited on decoding {wait:.0f} % of the time")


def plan_output(inputs, output: str, resume: bool, overwrite: bool, expect: dict | None = None) -> tuple[list[Item], int]:
    """-> (items still to caption, how many the output already has). Refuses to append to a non-empty output
    unless resuming (no duplicate records) or told to overwrite it; resuming, refuses an output captioned under
    other `expect` settings (read_done)."""
    items = inputs if isinstance(inputs, list) and all(isinstance(x, Item) for x in inputs) else expand_inputs(inputs)
    if os.path.exists(output):  # --overwrite would empty it; --resume would append records to a list or a clip
        # list files by identity (a few stats); clips by path only: a million stats would cost minutes on a
        # network file system
        out = {os.path.abspath(output), os.path.realpath(output)}
        lists = {it.listed_in for it in items if it.listed_in}
        for src in sorted(lists) + [it.video for it in items if not URL_RE.match(it.video)]:
            if (os.path.samefile(src, output) if src in lists else os.path.abspath(src) in out):
                raise InputError(f"{output}: the output is one of the inputs ({src}); name another output file")
    exists = os.path.exists(output) and os.path.getsize(output) > 0
    if exists and not (resume or overwrite):
        raise InputError(f"{output} already holds records: pass --resume to skip the clips it has, or "
                         "--overwrite to start it again")
    if overwrite and not resume and os.path.exists(output):
        os.truncate(output, 0)
    done = read_done(output, expect) if resume else set()
    todo = [it for it in items if it.video not in done]
    return todo, len(items) - len(todo)


def caption_to_jsonl(engine, inputs, output: str, settings: CaptionSettings, *, batch_size: int = 8,
                     resume: bool = False, overwrite: bool = False, progress: bool = True,
                     decode_workers: int = 4, allow_mixed_settings: bool = False) -> Summary:
    """Caption every input into `output` (JSONL) and return the summary. Ctrl-C ends the run cleanly: the records
    of finished clips are written, in-flight ones dropped (--resume redoes them), summary.interrupted is set.
    Resuming an output whose captions were made under other settings is refused unless `allow_mixed_settings`."""
    expect = None if allow_mixed_settings else record_settings(settings, engine)
    todo, skipped = plan_output(inputs, output, resume, overwrite, expect)
    summary = Summary(skipped=skipped)
    writer = JsonlWriter(output)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="clip", desc="caption", dynamic_ncols=True)
    stats: dict = {}
    warned: set = set()
    t0 = time.perf_counter()
    try:
        for i, out in engine.generate_iter((settings.request(it.video) for it in todo), batch_size,
                                           media_workers=decode_workers, stats=stats):
            rec = make_record(todo[i], out, settings, engine, warned)
            writer.write(rec)
            summary.count(rec)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.elapsed_s = time.perf_counter() - t0
        summary.model_wait_s = stats.get("model_wait_s", 0.0)
        writer.close()
        if bar is not None:
            bar.close()
    return summary
