"""A request as `Engine.generate_many` takes it (`Request`), and as the scheduler holds it (`Sequence`): checked and
tokenized once by `prepare_sequence`, before any compute, with errors naming `requests[i]`."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch

from .config import check_lora_alpha
from .errors import InputError, PllavaError
from .generate import SamplingParams, SequenceState, StepEvent, stop_check
from .prompt import prefix_split


@dataclass
class Request:
    """One request of `Engine.generate_many` (a dict with these keys works too)."""
    video: Any = None
    prompt: Any = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Any = None
    stop_token_ids: Any = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Any = None
    logprobs: int | None = None
    conv_mode: str | None = None
    system: str | None = None
    video_key: Any = None
    lora_alpha: float | None = None  # None: the engine's current alpha
    cancel: Any = None  # a threading.Event: set it to stop this request at its next token

    @classmethod
    def coerce(cls, r, where: str) -> "Request":
        if isinstance(r, Request):
            return r
        if not isinstance(r, dict):
            raise InputError(f"{where}: a request is a dict or pllava.Request, got {type(r).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(r) - known)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown}; a request takes {sorted(known)}")
        return cls(**r)


class Sequence:
    """A request inside the scheduler: prompt, slot, sampler, tokens, timings and, at the end, its output."""

    def __init__(self, index, req: Request, params: SamplingParams, ids, img_pos: int, n_prompt: int, n_pre: int,
                 scale: float, key, on_event, on_done):
        self.index, self.req, self.params = index, req, params
        self.ids, self.img_pos, self.n_prompt = ids, img_pos, n_prompt
        self.scale, self.key = scale, key  # LoRA alpha/r of this request; its video-prefix key (or None)
        self.n_pre = n_pre  # positions of the video prefix (the prompt head + the visual tokens), where prefill splits
        self.on_event: Callable[["Sequence", StepEvent], None] | None = on_event
        self.on_done: Callable[["Sequence"], None] | None = on_done
        self.future: Future | None = None  # pixels, decoded and preprocessed by a media worker
        self.pixel_timings: dict = {}
        self.embeds: torch.Tensor | None = None  # (1, L, D) still to prefill
        self.prefilled = 0
        self.start = 0  # position of embeds[0]
        self.slot: int | None = None
        self.pos = 0  # position the next token is written at
        self.last = 0  # last sampled token
        self.state: SequenceState | None = None
        self.tokens: list[int] = []
        self.timings: dict = {}
        self.t_add = self.t_first = None
        self.error: Exception | None = None
        self.output = None
        self.done = threading.Event()
        # called at the stop points of this request's vision tower and prefill (between layers) and while its
        # clip decodes: a cancel set then ends it there, not at its first token (a 7B prefill is ~27 s on 2 CPU
        # cores, and every other request's decode waits behind it)
        self.stop = stop_check(req.cancel)

    @property
    def where(self) -> str:
        """How errors and log lines name this request (request_name)."""
        return request_name(self.index)


def request_name(index) -> str:
    """requests[i] for the i-th request of a generate_many call; 'request' for one alone (generate(), the server)."""
    return f"requests[{index}]" if index is not None else "request"


def prepare_sequence(engine, req: Request, index=None, on_event=None, on_done=None) -> Sequence:
    """Validate a request (typed errors naming `requests[index]`, before any compute) and tokenize its prompt,
    once. What depends on a scheduler's slots is checked by Scheduler.fit."""
    e = engine
    where = request_name(index)
    try:
        # by name: Request holds SamplingParams' fields under the same names (stop lists may be None there)
        params = SamplingParams(**{f.name: getattr(req, f.name) for f in fields(SamplingParams)})
        params = replace(params, stop=req.stop or [], stop_token_ids=req.stop_token_ids or [])
        e.check_params(params)
        alpha = e.lora_alpha if req.lora_alpha is None else check_lora_alpha(req.lora_alpha, InputError)
        if e.lora_merged and alpha != e.lora_alpha:
            raise InputError(f"lora_alpha={alpha:g} but the LoRA is merged at alpha {e.lora_alpha:g}; call "
                             "unmerge_lora() to vary alpha per request")
        ids, img_pos, n_prompt = e._prompt_ids(req.prompt, req.conv_mode, req.system, req.video is not None)
    except PllavaError as err:
        raise type(err)(f"{where}: {err}") from err
    except ValueError as err:
        raise InputError(f"{where}: {err}") from err
    key = None
    n_pre = prefix_split(ids, img_pos, e.config.num_visual_tokens)  # 0: text only, or nothing after the clip
    if n_pre:
        base = e._prefix_key(req.video, ids[:img_pos], req.video_key)
        key = None if base is None else (base, alpha)  # v_proj's LoRA shaped the cached values
    return Sequence(index, req, params, ids, img_pos, n_prompt, n_pre, e.config.lora.scale_for(alpha), key,
                    on_event, on_done)


def slot_len_for(engine, seqs: list[Sequence]) -> int:
    """Positions a slot needs for these requests: the longest prompt + max_new_tokens, rounded up to 256 (not the
    whole context: less memory, more slots)."""
    need = max([2] + [s.n_prompt + s.params.max_new_tokens for s in seqs])
    return min(engine.config.text.max_position_embeddings, -(-need // 256) * 256)
