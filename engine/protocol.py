"""The OpenAI-compatible request shapes of `pllava serve`: server settings, request parsing and validation into a
Job, error bodies in vLLM's shape {"error": {"message", "type", "param", "code"}}, and the mapping of engine errors
to HTTP statuses. Nothing here touches the model or the network (vLLM's `protocol` vs `api_server` split).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from .errors import DeviceMemoryError, PllavaError, PromptError
from .media import MediaError

log = logging.getLogger("pllava.server")


@dataclass
class ServerConfig:
    model_name: str = "pllava"
    api_key: str | None = None
    max_num_seqs: int = 8  # requests decoding together in one batch (vLLM's --max-num-seqs)
    max_model_len: int | None = None  # positions of one KV slot (prompt + new tokens); None: the model's context
    prefill_chunk: int | None = None  # prefill long prompts this many tokens a step, between decode steps
    max_concurrency: int | None = None  # requests past admission (media + model); None: max_num_seqs
    max_queue: int = 16
    allowed_local_media_path: str | None = None
    max_video_bytes: int = 200 << 20
    max_frames: int = 64
    max_new_tokens_limit: int = 1024
    default_max_tokens: int = 256
    lora_alpha: float = 4.0
    fetch_timeout_s: float = 20.0
    allowed_fetch_hosts: frozenset = field(default_factory=frozenset)  # "host:port" an operator trusts


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, "BadRequestError", param, code)


def model_not_found(name) -> APIError:
    """vLLM's answer to a model it does not serve (and OpenAI's wording)."""
    return APIError(404, f"The model `{name!s:.200}` does not exist.", "NotFoundError", "model", "model_not_found")


def check_model(body: dict, served: str):
    """`model` may be omitted; given, it must be the served name."""
    m = body.get("model")
    if m is not None and m != served:
        if not isinstance(m, str):
            raise bad(f"'model' must be a string, got {type(m).__name__}", "model")
        raise model_not_found(m)


@dataclass
class Job:
    turns: list  # [(role, text)]
    system: str | None
    media: tuple[str, str] | None  # (kind, reference) kind: url | bytes
    media_bytes: bytes | None
    num_frames: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int | None
    lora_alpha: float
    return_frames: bool = False
    video_key: str | None = None
    n: int = 1  # choices (OpenAI's `n`): n sequences in the batch over one fetched clip
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None  # {token id: bias}
    logprobs: int | None = None  # None: off; k: each token's logprob and its k most likely alternatives

    def sampling(self) -> dict:
        """The engine Request's sampling keywords of this job (all but the seed, which differs per choice)."""
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, repetition_penalty=self.repetition_penalty, stop=self.stop,
                    frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                    logit_bias=self.logit_bias, logprobs=self.logprobs)


# The chat request's fields this server reads: OpenAI's, vLLM's extensions top_k / repetition_penalty, and its own
# num_frames / lora_alpha / return_frames (the page's sampled frames)
CHAT_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "stop", "seed", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty",
    "logit_bias", "top_k", "repetition_penalty", "num_frames", "lora_alpha", "return_frames"})
CAPTION_FIELDS = frozenset({"model", "url", "prompt", "max_tokens", "num_frames", "lora_alpha"})  # /v1/captions
# OpenAI's fields that do not change an answer (bookkeeping, caching hints): accepted and not used
INERT_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                          "prompt_cache_retention", "parallel_tool_calls"})
# OpenAI's fields this server does not implement, with the values that ask for nothing (accepted); any other value
# is a 400 naming the field, never a silently different answer
UNIMPLEMENTED_FIELDS = {"tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
                        "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (),
                        "prediction": (), "reasoning_effort": (), "web_search_options": (), "verbosity": ()}
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (each is one scatter element a token; OpenAI documents no bound)


def check_fields(body: dict, known=CHAT_FIELDS):
    """A field the server does not read is a 400 naming it (OpenAI's 'Unrecognized request argument'), not an
    answer that silently ignores what was asked; INERT_FIELDS pass."""
    for k, v in body.items():
        if k in known or k in INERT_FIELDS:
            continue
        if k in UNIMPLEMENTED_FIELDS:
            if v is None or v in UNIMPLEMENTED_FIELDS[k]:
                continue
            raise bad(f"'{k}' is not supported by this server (got {json.dumps(v)[:60]})", k, "unsupported_parameter")
        raise bad(f"unrecognized request argument supplied: {k!r:.60}; this server reads "
                  f"{', '.join(sorted(known))}", str(k)[:60], "unrecognized_argument")


def _logit_bias(body) -> dict | None:
    lb = body.get("logit_bias")
    if lb is None:
        return None
    if not isinstance(lb, dict):
        raise bad(f"'logit_bias' must be an object {{token id: bias}}, got {type(lb).__name__}", "logit_bias")
    if len(lb) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' has {len(lb)} entries, over the limit of {MAX_LOGIT_BIAS}", "logit_bias")
    out = {}
    for k, v in lb.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 9):
            raise bad(f"'logit_bias' keys must be token ids (decimal strings), got {k!r:.40}", "logit_bias")
        out[int(k)] = _bias(v, k)
    return out


def _bias(v, k) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
        raise bad(f"'logit_bias[{k}]' must be a number in [-100, 100], got {v!r:.40}", "logit_bias")
    return float(v)


def _logprobs(body) -> int | None:
    """OpenAI's logprobs (true/false) and top_logprobs (0-20, only with logprobs) -> None or k."""
    want = _flag(body, "logprobs")
    k = _number(body, "top_logprobs", 0, 20, None, True)
    if k is not None and not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (k or 0) if want else None


def _number(body, name, lo, hi, default, integer=False):
    v = body.get(name)
    if v is None:
        return default
    # an int is compared as it is: float() of one past 1e308 raises OverflowError (a 500 before this was checked)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            integer and isinstance(v, float) and not v.is_integer()):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r:.40}", name)
    if not (lo <= v <= hi):
        raise bad(f"'{name}' must be in [{lo}, {hi}], got {v!r:.40}", name)
    return int(v) if integer else float(v)


def logprob_content(lps, token_bytes) -> list[dict]:
    """TokenLogprobs -> OpenAI's logprobs.content entries: token (its text; a partial UTF-8 character shows as
    U+FFFD), logprob, bytes (exact: the byte of a byte-fallback token) and top_logprobs in the same shape."""
    def entry(tid, lp):
        b = token_bytes(tid)
        return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}

    return [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]} for x in lps]


def finish_reason(f: str) -> str:
    return {"stop": "stop", "length": "length"}.get(f, "stop")


def to_api(e: Exception) -> APIError:
    """An exception from parsing, media or the engine -> the API error to answer with (500 only for bugs)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, MediaError):
        return APIError(e.status, str(e), "BadRequestError" if e.status == 400 else "RequestTooLarge", e.param,
                        e.code)
    if isinstance(e, PromptError):
        return bad(str(e), "messages", "prompt_too_long" if "context" in str(e) or "KV slot" in str(e)
                   else "invalid_prompt")
    if isinstance(e, DeviceMemoryError):  # the device was short of memory for this request: the load, not its input
        return APIError(503, str(e), "ServiceUnavailableError", None, "out_of_memory", {"Retry-After": "1"})
    if isinstance(e, (PllavaError, ValueError)):
        return bad(str(e))
    log.exception("internal error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "InternalServerError", None, "internal")


def parse_json(raw: bytes):
    """A request body -> JSON; malformed, non-UTF-8 or nested past the recursion limit -> 400, never 500."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"invalid JSON: {e}") from None
    except ValueError as e:  # an integer literal past Python's 4300-digit limit for int(str)
        raise bad(f"invalid JSON: {str(e)[:120]}") from None
    except RecursionError:
        raise bad("invalid JSON: nested too deeply") from None


def parse_stream_flags(body) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage), each checked for its type."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise bad(f"'stream_options' must be an object, got {type(opts).__name__}", "stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad(f"'stream_options.include_usage' must be true or false, got {usage!r}",
                  "stream_options.include_usage")
    return stream, usage


def parse_chat(body: dict, cfg: ServerConfig) -> Job:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_fields(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    turns, system, media = [], None, None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        texts = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                p = f"messages[{i}].content[{j}]"
                t = part.get("type") if isinstance(part, dict) else None
                if t == "text":
                    if not isinstance(part.get("text"), str):
                        raise bad(f"{p}.text must be a string", p)
                    texts.append(part["text"])
                elif t in ("video_url", "image_url"):
                    ref = part.get(t)
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise bad(f"{p}.{t}.url must be a non-empty string", p)
                    if media is not None:
                        raise bad("only one video or image per request is supported", p)
                    if m["role"] != "user":
                        raise bad("media must be in a user message", p)
                    media = (t, url, p)
                else:
                    raise bad(f"{p}.type must be text, video_url or image_url, got {t!r:.60}", p)
        elif content is not None:
            raise bad(f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
        text = "\n".join(texts)
        if m["role"] == "system":
            system = text
        else:
            turns.append((m["role"], text))
    if not turns or turns[-1][0] != "user":
        raise bad("the last message must come from the user", "messages")
    # no video_url / image_url part: a text-only chat, answered by the LLM alone
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": mt}, "max_tokens", 1, cfg.max_new_tokens_limit, cfg.default_max_tokens, True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
        raise bad("'stop' must be a string or a list of up to 8 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise bad(f"'seed' must be an integer in [0, 2**63), got {seed!r}", "seed")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cfg.max_num_seqs:
        raise bad(f"'n' must be an integer in [1, {cfg.max_num_seqs}] (--max-num-seqs), got {n!r:.40}", "n")
    if n > 1 and body.get("stream") is True:
        raise bad("'n' > 1 is not supported with stream=true: send n requests, or stream=false for n choices", "n")
    return Job(turns=turns, system=system, media=None if media is None else (media[0], media[1]), media_bytes=None,
               n=n,
               num_frames=_number(body, "num_frames", 1, 10 ** 9, 0, True),
               max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0, 0.0),
               top_p=_number(body, "top_p", 1e-6, 1.0, 1.0), stop=stop, seed=seed,
               lora_alpha=_number(body, "lora_alpha", -1e4, 1e4, cfg.lora_alpha),
               return_frames=_flag(body, "return_frames"),
               top_k=_top_k(body), repetition_penalty=_number(body, "repetition_penalty", 1e-6, 10.0, 1.0),
               frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
               presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
               logit_bias=_logit_bias(body), logprobs=_logprobs(body))


def _top_k(body) -> int:
    """vLLM's top_k: -1 or 0 is off."""
    k = _number(body, "top_k", -1, 1 << 31, 0, True)
    return max(k, 0)


def _flag(body: dict, name: str) -> bool:
    """A true/false field: a string such as "false" is refused, never read as true."""
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, got {v!r:.40}", name)
    return v
