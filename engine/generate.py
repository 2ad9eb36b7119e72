"""The generation loop as small free functions: prefill, decode_one_token, sample, and a text streamer that
detokenizes incrementally and watches for stop strings without decoding the whole text every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import ops
from .errors import InputError, NumericalError


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # new tokens only; ends with EOS when generation stopped on EOS
    num_prompt_tokens: int
    timings: dict = field(default_factory=dict)  # seconds per stage
    finish_reason: str = "length"  # 'stop' (EOS, stop token or stop string), 'length', 'cancelled' or 'error'
    error: str | None = None  # generate_many(return_errors=True): why this request failed ("VideoError: ...")
    logprobs: list | None = None  # with logprobs=k: a TokenLogprob per token of token_ids


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's own distribution (log_softmax of its fp32 logits,
    before logit_bias, penalties, temperature, top-k / top-p: vLLM's default "raw" logprobs), and the `top`
    k most likely tokens of that distribution, most likely first."""
    token_id: int
    logprob: float
    top: list  # [(token_id, logprob)]


# OpenAI's and vLLM's bound on top_logprobs: each costs a topk over the vocabulary a token
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    frequency_penalty: float = 0.0  # OpenAI's: a logit minus this x the times its token is in the output so far
    presence_penalty: float = 0.0  # OpenAI's: minus this once its token is in the output
    logit_bias: dict | None = None  # {token id: added to its logit}, before every other processor
    logprobs: int | None = None  # None: off; k in [0, 20]: each token's logprob and the k most likely (TokenLogprob)

    def validate(self):
        def bad(name, why):
            raise InputError(f"{name}: {why}, got {getattr(self, name)!r:.200}")

        for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad(name, "must be a number")
            if isinstance(v, int) and abs(v) > 1e308 or not math.isfinite(v):  # an int past a float's range
                bad(name, "must be finite")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not (self.temperature >= 0):
            bad("temperature", "must be >= 0")
        if not (0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0")
        if not (self.repetition_penalty > 0):
            bad("repetition_penalty", "must be > 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(_has_surrogate(s) for s in self.stop):
            bad("stop", "holds a lone surrogate (not encodable as UTF-8)")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise InputError(f"stop: a stop string of {longest} characters is over the limit of {MAX_STOP_CHARS}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 63):
            bad("seed", "must be an integer in [0, 2**63)")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of token ids (integers >= 0)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be a dict {token id: bias}")
            for t, b in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise InputError(f"logit_bias: keys must be token ids (integers >= 0), got {t!r:.60}")
                if isinstance(b, bool) or not isinstance(b, (int, float)) or abs(b) > 1e308 or not math.isfinite(b):
                    raise InputError(f"logit_bias[{t}]: must be a finite number, got {b!r:.60}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")


# A stop string longer than this is refused: no answer of a few thousand tokens could end with it, and each one
# costs its length in setup (TextStreamer's matchers) for every request that sends it.
MAX_STOP_CHARS = 4096


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class StopRequested(Exception):
    """Control flow, never a user's error: a request's cancel event was seen at a stop point (between layers of
    the vision tower or of a prefill, between decoded frames) before its first token; it ends 'cancelled'."""


def stop_check(cancel=None):
    """-> the callable the model calls at its stop points for one request: raises StopRequested once `cancel` (an
    Event, or anything with is_set) is set, and ops.Abandoned once the caller of this model-thread job stopped
    waiting. A 2350-token prefill of a 7B model takes ~27 s on 2 CPU cores (~0.15 s on a GPU) and the vision
    tower ~10 s: without these, a disconnected client or a Ctrl-C held the engine that long. The check is a
    Python call per layer, no device sync."""
    def check():
        if ops.abandoned():
            raise ops.Abandoned("its caller stopped waiting")
        if cancel is not None and cancel.is_set():
            raise StopRequested()
    return check


@torch.no_grad()
def prefill(lm, embeds: torch.Tensor, start: int = 0, split: int = 0, stop=None) -> torch.Tensor:
    """embeds (1, L, D) at positions start.. -> logits (1, 1, V) of the last position; fills the KV cache.
    start > 0 continues after a cached prefix (the video part of an earlier request). `split` (prompt.prefix_split),
    when inside (start, start + L): prefill [start, split) first, then continue from split, so the bits are the
    same whether the prefix was just computed or cached. `stop` (stop_check) is called between layers."""
    if start < split < start + embeds.shape[1]:
        prefill(lm, embeds[:, :split - start], start, stop=stop)
        embeds, start = embeds[:, split - start:], split
    pos = torch.arange(start, start + embeds.shape[1], device=embeds.device)
    return lm(embeds, pos, start=start, kv_len=start + embeds.shape[1] if start else None, stop=stop)


@torch.no_grad()
def decode_one_token(lm, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
    """token (1, 1) at input_pos (1,) -> logits (1, 1, V); kv_len: positions in use (eager steps only)."""
    return lm(lm.embed(token), input_pos, kv_len=kv_len)


class DecodeStep:
    """decode_one_token over static input buffers, optionally captured once as a CUDA graph and replayed each
    step ("compile the step, not the program"): the step has no host sync (device-side positions and mask, the
    LoRA scale read on the device), so a replay launches the whole layer stack at once.

    The warm-up and capture runs write the cache's last slot (max_len - 1), which no request reads before its
    own decode writes it (the mask hides a slot until its position is reached), so a cached video prefix
    survives a (re)capture. The graph is tied to the cache tensors: a reallocated cache is captured again.
    """

    def __init__(self, lm, use_graph: bool, use_compile: bool = False):
        self.lm, self.use_graph, self.use_compile = lm, use_graph, use_compile
        self.key = None
        self.graph = None
        self.tok = self.pos = self.out = None
        # torch.compile of the step (fullgraph, static shapes: the whole cache under the device-side mask). The
        # LoRA scale stays a tensor the graph reads (Dynamo lifts module tensors to graph inputs; nothing is
        # frozen), so set_lora_alpha's in-place fill reaches the compiled step with no recompile.
        self.compiled = torch.compile(decode_one_token, fullgraph=True, dynamic=False) if use_compile else None

    def _buffers(self, device):
        self.tok = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.pos = torch.full((1,), self.lm.max_len - 1, dtype=torch.long, device=device)

    def _capture(self, device):
        self._buffers(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy inits (cuBLAS handles, Triton kernels) happen outside the capture
                decode_one_token(self.lm, self.tok, self.pos)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = decode_one_token(self.lm, self.tok, self.pos)

    @torch.no_grad()
    def __call__(self, token: int, pos: int, device) -> torch.Tensor:
        key = (self.lm.cache_generation, self.lm.max_len)
        if key != self.key:
            if self.use_graph:
                self._capture(device)
            else:
                self._buffers(device)
            self.key = key
        self.tok.fill_(token)
        self.pos.fill_(pos)
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.compiled is not None:
            return self.compiled(self.lm, self.tok, self.pos)
        return decode_one_token(self.lm, self.tok, self.pos, kv_len=pos + 1)


def sample(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None, gen: torch.Generator | None,
           bias: tuple | None = None, counts: torch.Tensor | None = None) -> int:
    """logits (V,) -> next token id, with vLLM's processor order: logit_bias (`bias`: ids, values), then the
    penalties (repetition over prompt + output `seen`, as transformers'; frequency and presence over the output's
    token `counts` (V,), as OpenAI's), then temperature, top-k, top-p."""
    logits = logits.float()
    top = int(logits.argmax())  # NaN and +inf win the argmax: one reduction (the greedy one) finds garbage
    if not math.isfinite(float(logits[top])):  # never sample from a NaN / inf the model produced
        n_bad = int((~torch.isfinite(logits)).sum())
        raise NumericalError(f"the model produced {n_bad} non-finite logits (NaN or inf) of {logits.numel()}")
    changed = False
    if bias is not None:
        logits = logits.index_add(0, bias[0], bias[1])
        changed = True
    if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
        s = logits.gather(0, seen)
        logits = logits.scatter(0, seen, torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty))
        changed = True
    if counts is not None and (p.frequency_penalty or p.presence_penalty):
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        changed = True
    if p.temperature == 0:
        return int(logits.argmax()) if changed else top
    # shifted by the maximum first: softmax((l - max) / T) = softmax(l / T), and a temperature as small as 1e-30
    # can no longer overflow to inf - inf = NaN (the top token gets 0, the others large negatives or -inf)
    logits = (logits - logits.max()) / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - p.top_p)
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, idx, remove), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def greedy_rows(logits: torch.Tensor) -> list[int | None]:
    """logits (B, V) -> each row's argmax, as sample() of a plain greedy row gives it, with one device sync for
    all rows (sample() syncs twice a row); None for a row whose best logit is not finite (sample() says why)."""
    logits = logits.float()
    top = logits.argmax(-1)  # (B,): sample()'s own reduction, a row at a time; NaN and +inf win it
    best = logits.gather(-1, top[:, None])[:, 0]
    return [t if math.isfinite(v) else None for t, v in zip(top.tolist(), best.tolist())]


class _StopMatcher:
    """Knuth-Morris-Pratt over text that only grows: `matched` is the longest prefix of `s` the text ends with,
    updated in amortised O(1) a character. (Recomputing that from the whole text each token cost O(len(s)^2): a
    1 MB stop string held the scheduler thread, every request with it, for minutes.)"""

    def __init__(self, s: str):
        self.s, self.matched = s, 0
        fail = [0] * len(s)  # fail[i]: the longest proper prefix of s[:i + 1] that is also its suffix
        k = 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        self.fail = fail

    def feed(self, text: str, start: int) -> int | None:
        """Advance over text[start:]; -> where the first occurrence completed there begins, or None."""
        s, fail, k = self.s, self.fail, self.matched
        for i in range(start, len(text)):
            c = text[i]
            while k and c != s[k]:
                k = fail[k - 1]
            if c == s[k]:
                k += 1
            if k == len(s):
                self.matched = k
                return i + 1 - k
        self.matched = k
        return None


class TextStreamer:
    """Incremental detokenization (prefix/read offsets, so multi-token characters come out whole) with stop
    strings. Text that could still be the start of a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.matchers = [_StopMatcher(s) for s in stop]
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all text decoded so far
        self.emitted = 0  # chars of self.text handed out
        self.stopped = False

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now safe to emit."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        old = len(self.text)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.matchers:
            # a stop string completes only in the new text (one completed before would have stopped us); of
            # those that complete in it, the earliest-starting one cuts
            hits = [i for i in (m.feed(self.text, old) for m in self.matchers) if i is not None]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._flush()
            return self._take(len(self.text) - max(m.matched for m in self.matchers))
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out

    def _flush(self) -> str:
        return self._take(len(self.text))

    def finish(self) -> str:
        """At the end: the whole text is decoded once more (so nothing incremental decoding held is lost)."""
        if not self.stopped:
            full = self._decode(self.ids)
            if full.startswith(self.text[:self.emitted]):
                self.text = full
        return self._flush()


@dataclass
class StepEvent:
    token_id: int
    text: str  # text newly safe to emit (may be "")
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs


class SequenceState:
    """One sequence's sampling and end-of-generation rules, shared by generate_tokens (one request) and the
    batch scheduler (many): its own generator (a seeded request gives the same tokens whatever else runs),
    repetition-penalty history, incremental text, stop strings / tokens, max_new_tokens and cancellation."""

    def __init__(self, params: SamplingParams, tokenizer, eos_ids: set[int], prompt_ids: torch.Tensor | None,
                 device, cancel=None):
        self.params, self.device, self.cancel = params, device, cancel
        self.gen = None
        if params.seed is not None:
            self.gen = torch.Generator(device=device).manual_seed(int(params.seed))
        self.streamer = TextStreamer(tokenizer, params.stop)
        self.stop_ids = set(eos_ids) | set(params.stop_token_ids)
        self.seen = prompt_ids.to(device) if (prompt_ids is not None and params.repetition_penalty != 1.0) else None
        self.bias = None
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            self.bias = (torch.tensor(ids, device=device),
                         torch.tensor([float(params.logit_bias[t]) for t in ids], device=device))
        self.counts = None  # (V,) times each token was generated, for the frequency / presence penalties
        self.penalise_output = bool(params.frequency_penalty or params.presence_penalty)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._logprob: TokenLogprob | None = None
        self.n = 0
        self.finish: str | None = None  # set when the sequence is done: 'stop', 'length' or 'cancelled'

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no processor and no logprobs: the token is the argmax, which the batch scheduler takes for
        all such rows of a step at once (greedy_rows)."""
        p = self.params
        return (p.temperature == 0 and self.seen is None and self.bias is None and not self.penalise_output
                and self.logprobs is None)

    def sample(self, logits: torch.Tensor) -> int:
        """logits (V,) of this sequence's last position -> its next token."""
        if self.penalise_output and self.counts is None:
            self.counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
        tok = sample(logits, self.params, self.seen, self.gen, self.bias, self.counts)
        if self.logprobs is not None:  # after sample(), which refused non-finite logits
            lp = torch.log_softmax(logits.float(), -1)
            k = self.params.logprobs
            top = torch.topk(lp, k) if k else None
            self._logprob = TokenLogprob(tok, float(lp[tok]), [] if top is None else
                                         list(zip(top.indices.tolist(), top.values.tolist())))
        return tok

    def accept(self, tok: int) -> StepEvent:
        """Take a sampled token: the event to emit; afterwards `finish` says whether the sequence has ended."""
        self.n += 1
        lp, self._logprob = self._logprob, None
        if self.logprobs is not None:
            self.logprobs.append(lp)
        if self.counts is not None:
            self.counts[tok] += 1
        text = self.streamer.add(tok)
        if tok in self.stop_ids:
            self.finish = "stop"
            return StepEvent(tok, text + self.streamer.finish(), lp)
        if self.streamer.stopped:
            self.finish = "stop"
            return StepEvent(tok, text, lp)
        if self.n >= self.params.max_new_tokens:
            self.finish = "length"
            return StepEvent(tok, text + self.streamer.finish(), lp)
        if self.seen is not None:
            self.seen = torch.cat([self.seen, torch.tensor([tok], device=self.device)])
        return StepEvent(tok, text, lp)

    def cancelled(self) -> bool:
        """Checked after each emitted token: a set `cancel` event ends the sequence before the next step."""
        if self.finish is None and self.cancel is not None and self.cancel.is_set():
            self.finish = "cancelled"
        return self.finish == "cancelled"


def generate_tokens(lm, embeds: torch.Tensor, params: SamplingParams, tokenizer, eos_ids: set[int],
                    prompt_ids: torch.Tensor | None, timings: dict, clock, cancel=None,
                    start: int = 0, step: DecodeStep | None = None,
                    split: int = 0, stop=None) -> Iterator[StepEvent]:
    """Prefill (split at `split` as `prefill` says) then decode one token a step; yields each token with its text.
    Sets timings['prefill'] and timings['decode'], and leaves the finish reason in timings['_finish'] ('stop',
    'length' or 'cancelled' when the `cancel` event - e.g. a disconnected client - is set). `stop` (stop_check)
    is called between the prefill's layers: StopRequested comes out of here when it fires there."""
    device = embeds.device
    step = step if step is not None else DecodeStep(lm, use_graph=False)
    seq = SequenceState(params, tokenizer, eos_ids, prompt_ids, device, cancel)
    t0 = clock()
    logits = prefill(lm, embeds, start, split, stop)
    pos = start + embeds.shape[1]
    tok = seq.sample(logits[0, -1])
    timings["prefill"] = clock() - t0
    t1 = clock()
    while True:
        yield seq.accept(tok)
        if seq.finish is not None or seq.cancelled():
            break
        logits = step(tok, pos, device)
        pos += 1
        tok = seq.sample(logits[0, -1])
    timings["decode"] = clock() - t1
    timings["decode_tokens"] = seq.n
    timings["_finish"] = seq.finish
    timings["_text"] = seq.streamer.text
    timings["_logprobs"] = seq.logprobs
