"""Engine: ties decode -> preprocess -> vision -> projector -> prompt -> generation together, with timings."""
from __future__ import annotations

import itertools
import logging
import os
import time
import weakref
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from . import ops
from .config import PllavaConfig, check_lora_alpha
from .errors import ConfigError, DeviceMemoryError, InputError, NumericalError, PromptError
from .generate import (DecodeStep, GenerationOutput, SamplingParams, StopRequested, generate_tokens,
                       stop_check)
from .loading import load, resolve_device
from .model import PllavaModel
from .preprocess import preprocess
from .prompt import (CAPTION_QUESTION, build_chat_prompt, build_prompt, default_question, prefix_split, splice,
                     text_ids, token_bytes_table, tokenize)
from .video import DEFAULT_LIMITS, is_source, read_frames, stream_frames

log = logging.getLogger("pllava")

CAPTION_PROMPT = CAPTION_QUESTION  # PLLaVA's single_test question


class Engine:
    """A loaded PLLaVA model. Build with `Engine.from_pretrained`."""

    def __init__(self, model: PllavaModel, tokenizer, processor_config: dict, device: torch.device,
                 dtype: torch.dtype, conv_mode: str, model_dir: str, eos_ids: set[int]):
        self.model = model
        self.config: PllavaConfig = model.config
        self.tokenizer = tokenizer
        self.processor_config = processor_config
        self.device = device
        self.dtype = dtype
        self.conv_mode = conv_mode
        self.model_dir = model_dir
        self.eos_ids = eos_ids
        self.lora_alpha = self.config.lora.alpha
        self.limits = DEFAULT_LIMITS  # decode limits (pllava.video.DecodeLimits); replace to tighten
        self.prefix_cache = True  # reuse the video part of the KV cache for the next question on the same clip
        # decode steps as one CUDA graph replay; opt-in until measured on a GPU (PLLAVA_CUDA_GRAPHS=1)
        self.cuda_graphs = device.type == "cuda" and os.environ.get("PLLAVA_CUDA_GRAPHS", "0") == "1"
        # generate()'s and the scheduler's KV cache: the weights' dtype, but on the CPU under half weights. There a
        # bf16 engine's cache is bf16 where pllava._C's decode attention reads it (widened exactly, every sum in
        # fp32): prefill rows write bf16 K / V anyway (bf16 GEMMs), and batched decode at PLLaVA's prompt lengths is
        # bound by this read (README, "fast CPU mode"); else fp32, as the CPU's own bf16 attention is 7x slower in
        # decode than its fp32 one
        half_cpu = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
        native_bf16 = dtype == torch.bfloat16 and ops.native_decode_attention() is not None
        self.kv_dtype = (torch.bfloat16 if native_bf16 else torch.float32) if half_cpu else dtype
        if half_cpu:
            log.info("pllava KV cache: %s on the CPU under %s weights", self.kv_dtype, dtype)
        # and, there too, the LLM's residual stream in fp32 (GEMM inputs stay in the weights' dtype; see LlamaLM)
        model.language_model.residual_dtype = torch.float32 if half_cpu else None
        # torch.compile'd decode step (opt-in: PLLAVA_COMPILE=1 or engine.compile_decode = True); see README
        self.compile_decode = os.environ.get("PLLAVA_COMPILE", "0") == "1"
        self._step = None
        self._prefix = None  # (key, positions) of the prefix the KV cache holds
        self._sched = None  # the batch scheduler generate_many drives (kept: its slots keep their video prefixes)
        self._token_chars = None  # the tokenizer's longest token, in characters (_longest_token)
        self._token_bytes: list[bytes] | None = None  # each token id's bytes (token_bytes), built at its first call
        # on the CPU every generate / stream / generate_many / generate_iter runs on one thread whichever thread
        # calls (ops.ModelThread: one OpenMP team, not one a calling thread); it ends with the engine
        self._model_thread = ops.ModelThread() if device.type == "cpu" else None
        if self._model_thread is not None:
            weakref.finalize(self, self._model_thread.close)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str, device=None, dtype=None, num_frames=None, pooling_shape=None,
                        lora_alpha=None, conv_mode=None, adapter: str | None = None,
                        attn_backend: str = "sdpa", quantize: str | None = None) -> "Engine":
        """Load a PLLaVA checkpoint (any of the three key layouts) or a llava-hf one (training-free PLLaVA).

        `model` is a local directory or a hub repo id. A directory holding adapter_config.json is a PEFT adapter:
        its base is the same directory when it has config.json, else `base_model_name_or_path`. `adapter` names a
        separate adapter directory. lora_alpha defaults to 4 (PLLaVA's caption setting) whatever the adapter was
        trained with; the scale is alpha / r (alpha / sqrt(r) for rsLoRA). attn_backend: 'sdpa' (torch), or
        'flash_attn' / 'xformers' for the prefill when installed (CUDA, fp16/bf16). quantize: None, 'int8'
        (weight-only int8 LLM linears, LoRA unmerged at the live alpha; with dtype=torch.bfloat16 on the CPU), or
        'w8a8' (the CPU only: int8 as well, and a prefill's activations quantized per token for int8 x int8 GEMMs;
        README, "A fast CPU mode"), or 'int4' (the CPU and CUDA: the LLM's linears in int4 groups of 32, lm_head int8;
        on CUDA the Triton int4 kernel).
        """
        device = resolve_device(device)
        kw = dict(device=device, dtype=dtype, num_frames=num_frames, pooling_shape=pooling_shape,
                  lora_alpha=lora_alpha, conv_mode=conv_mode, adapter=adapter, attn_backend=attn_backend,
                  quantize=quantize)
        # on the CPU the load's parallel ops (casts, int8 packing) run on a thread that ends: a live thread that
        # has run one keeps an OpenMP team, and a second live team slows every decode step of the thread that
        # decodes (ops.in_fresh_thread), so loading here leaves the caller free to decode or to start a scheduler
        if device.type == "cpu":
            return cls(*ops.in_fresh_thread(load, model, **kw))
        return cls(*load(model, **kw))

    # ------------------------------------------------------------------------------------------ LoRA
    def set_lora_alpha(self, alpha: float):
        """Change the LoRA scale to alpha / r in place: no reload, no recompile (alpha 0 = the image LLM)."""
        alpha = check_lora_alpha(alpha, InputError)
        if self.lora_merged:
            raise InputError("lora_alpha cannot change while the LoRA is merged; call unmerge_lora() first")
        if float(alpha) != self.lora_alpha:
            self._prefix = None  # v_proj's LoRA shaped the cached values
        self.model.set_lora_alpha(float(alpha))
        self.lora_alpha = float(alpha)

    def set_frames(self, num_frames: int | None = None, pooling_shape=None):
        """Change how many frames are sampled and the pooling shape without reloading (both are free of weights)."""
        self._forget_prefixes()
        cfg = self.config.with_overrides(num_frames=num_frames, pooling_shape=pooling_shape)
        self.model.config = self.config = cfg
        self.model.multi_modal_projector.pooling_shape = tuple(cfg.pooling_shape)

    def merge_lora(self):
        """Fold the LoRA into q/v at the current alpha (W + s·B·A): zero LoRA cost for a fixed-alpha deployment.
        set_lora_alpha then fails until unmerge_lora(), which restores the weights bit for bit."""
        if any(m.qweight is not None for m in self.model.lora_linears()):
            raise InputError("merge_lora is not available with quantize='int8', 'w8a8' or 'int4' (the base weight is "
                             "quantized; the LoRA runs unmerged at the live alpha)")
        self._forget_prefixes()
        self.model.merge_lora()

    def unmerge_lora(self):
        """Undo merge_lora exactly: a later alpha gives what a freshly loaded engine gives."""
        self._forget_prefixes()
        self.model.unmerge_lora()

    def _forget_prefixes(self):
        self._prefix = None
        if self._sched is not None:
            self._sched.clear_prefixes()

    @property
    def lora_merged(self) -> bool:
        return any(m.merged for m in self.model.lora_linears())

    # ------------------------------------------------------------------------------------------ inputs
    def _clock(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def pixels(self, video, timings: dict | None = None) -> torch.Tensor:
        """Any accepted `video` -> preprocessed (T, 3, S, S) on the engine's device."""
        timings = {} if timings is None else timings
        t0 = self._clock()
        s = self.config.vision.image_size
        frames = None
        if is_source(video):
            frames = read_frames(video, self.config.num_frames, limits=self.limits)
            timings["video_decode"] = self._clock() - t0
        elif _is_pil(video):
            frames = _pil_frames([video])
        elif isinstance(video, (list, tuple)) and video and all(_is_pil(v) for v in video):
            frames = _pil_frames(list(video))
        elif isinstance(video, np.ndarray):
            frames = video
        elif isinstance(video, torch.Tensor):
            if video.is_floating_point():
                if video.dim() != 4 or tuple(video.shape[1:]) != (3, s, s):
                    raise InputError(f"video: a float tensor must be preprocessed frames (T, 3, {s}, {s}), "
                                     f"got {tuple(video.shape)}")
                if video.shape[0] > self.limits.max_frames:
                    raise InputError(f"video: {video.shape[0]} frames exceed max_frames={self.limits.max_frames}")
                if not bool(torch.isfinite(video).all()):
                    raise InputError(f"video: the preprocessed frames hold {int((~torch.isfinite(video)).sum())} "
                                     "NaN or inf values")
                return video.to(self.device, self.dtype)
            frames = video
        else:
            raise InputError(f"video: unsupported type {type(video).__name__}; pass a path, bytes, a uint8 array "
                             "(T, H, W, 3), PIL image(s), or preprocessed float frames (T, 3, S, S)")
        n_in = len(frames) if isinstance(frames, list) else (frames.shape[0] if frames.ndim else 1)
        if n_in > self.limits.max_frames:  # the same cap as for a decoded file
            raise InputError(f"video: {n_in} frames exceed max_frames={self.limits.max_frames}")
        t1 = self._clock()
        if isinstance(frames, list):  # PIL images of different sizes: one at a time
            px = torch.cat([preprocess(f, self.processor_config, dtype=self.dtype, device=self.device)
                            for f in frames])
        else:
            px = preprocess(frames, self.processor_config, dtype=self.dtype, device=self.device)
        timings["preprocess"] = self._clock() - t1
        return self._check_pixels(px)

    def _check_pixels(self, px: torch.Tensor) -> torch.Tensor:
        s = self.config.vision.image_size
        if tuple(px.shape[1:]) != (3, s, s):
            raise InputError(f"preprocessor_config.json produces {tuple(px.shape[1:])} frames but the vision tower "
                             f"takes (3, {s}, {s})")
        return px

    @torch.no_grad()
    def encode(self, video, timings: dict | None = None, overlap: bool = True, stop=None) -> torch.Tensor:
        """Visual embeddings (T'·h'·w', d) for `video`. With overlap, a file/bytes/URL source is decoded in a
        background thread while the vision tower encodes the frames already decoded (measured on 2 CPU cores,
        16 frames of 1080p, small preset: 1.59 s against 1.81 s decode-then-encode; on a GPU the tower and the
        decoder do not even share a processor). `stop` (generate.stop_check) is called between the tower's layers
        and between decoded frames."""
        timings = {} if timings is None else timings
        if is_source(video) and overlap:
            feats = self._encode_streaming(video, timings, stop)
        else:
            px = self.pixels(video, timings)
            t0 = self._clock()
            feats = self.model.vision_tower(px, stop)
            timings["vision"] = self._clock() - t0
        t1 = self._clock()
        n = self.config.num_frames
        if feats.shape[0] < n:
            feats = feats.repeat_interleave(n // feats.shape[0] + 1, dim=0)[:n]
        vis = self.model.multi_modal_projector(feats)
        timings["projector"] = self._clock() - t1
        return vis

    def _encode_streaming(self, video, timings: dict, stop=None) -> torch.Tensor:
        """Frames go through preprocess + vision tower while the next ones decode, in groups of the tower's
        frame_chunk (4 on the CPU, where a frame at a time ran the tower at 1/1.3 of its speed in groups: 16
        frames of a 720p clip, small preset, bf16, 2-core Xeon: ~500 ms to encode one by one while decoding, ~390
        decoding first, then 4 at a time); one at a time on a GPU. A repeated frame (a clip shorter than
        num_frames) is encoded once."""
        wait = prep = vis = 0.0
        by_index: dict[int, torch.Tensor] = {}  # frame index -> (1, g*g, D)
        order: list[int] = []
        group = self.model.vision_tower.frame_chunk or 1
        pending: list[tuple[int, torch.Tensor]] = []  # preprocessed frames not yet through the tower
        it = stream_frames(video, self.config.num_frames, limits=self.limits)
        t = self._clock()
        try:
            for item in itertools.chain(it, [None]):  # None: the end (encode what is pending)
                t1 = self._clock()
                wait += t1 - t
                if stop is not None:
                    stop()
                if item is not None:
                    idx, _ts, frame = item
                    order.append(idx)
                    if idx not in by_index and all(idx != i for i, _ in pending):
                        pending.append((idx, self._check_pixels(preprocess(frame, self.processor_config,
                                                                           dtype=self.dtype, device=self.device))))
                t2 = self._clock()
                prep += t2 - t1
                if pending and (item is None or len(pending) == group):
                    feats = self.model.vision_tower(torch.cat([px for _, px in pending]), stop)  # (n, g*g, D)
                    by_index.update((i, f) for (i, _), f in zip(pending, feats.split(1)))
                    pending = []
                    vis += self._clock() - t2
                t = self._clock()
        finally:
            it.close()  # stops its decoder thread now, also when a stop point or an error ends the loop
        timings.update(video_decode=wait, preprocess=prep, vision=vis)
        return torch.cat([by_index[i] for i in order])

    def _prefix_key(self, video, head_ids: torch.Tensor, video_key=None):
        """What identifies a reusable video prefix: the clip (a file by path, size and mtime; bytes by hash; or the
        caller's `video_key` for frames it decoded itself), the prompt tokens before <image>, and the sampling of
        frames. Other inputs are not cached."""
        if not self.prefix_cache:
            return None
        if video_key is not None:
            vid = ("key", str(video_key))
        elif isinstance(video, (str, os.PathLike)) and os.path.isfile(video):
            st = os.stat(video)
            vid = ("file", os.path.realpath(video), st.st_size, st.st_mtime_ns)
        elif isinstance(video, (bytes, bytearray, memoryview)):
            import hashlib

            vid = ("bytes", hashlib.blake2b(bytes(video), digest_size=16).hexdigest())
        else:
            return None
        return vid, tuple(head_ids.tolist()), self.config.num_frames, tuple(self.config.pooling_shape)

    def _prompt_ids(self, prompt, conv_mode: str | None, system: str | None, video: bool = True):
        """A question, a raw prompt or chat turns [(role, text)] -> (input_ids, image position, prompt length after
        splicing); a prompt that does not fit the context fails here, before any compute. video=False: a
        text-only prompt (image position None)."""
        mode = conv_mode or self.conv_mode
        text = build_chat_prompt(prompt, mode, system, video) if isinstance(prompt, list) else \
            build_prompt(prompt, mode, system, video)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"the prompt holds a character that is not valid UTF-8 (a lone surrogate at "
                              f"position {e.start})") from None
        ctx = self.config.text.max_position_embeddings
        bound = 4 * ctx * self._longest_token()
        if len(text) > bound:  # tokenizing 20 MB of text took 60 s (a server's event loop stalled with it)
            raise PromptError(f"the prompt is {len(text)} characters: over {bound}, 4 x the context ({ctx} tokens) x "
                              f"this tokenizer's longest token ({self._longest_token()} characters), so it cannot "
                              "fit; refused before tokenizing")
        ids, img_pos = tokenize(self.tokenizer, text, self.config.image_token_index, video)
        n = ids.numel() - 1 + self.config.num_visual_tokens if video else ids.numel()
        if n >= ctx:
            raise PromptError(f"the prompt is {n} tokens ({self.config.num_visual_tokens if video else 0} visual) "
                              "but the model's "
                              f"context (max_position_embeddings) is {ctx}")
        return ids, img_pos, n

    def _longest_token(self) -> int:
        """Characters of the tokenizer's longest vocabulary string: no token stands for more characters of text
        (a byte token's string, '<0x41>', is longer than the byte), so a text of over ctx x this many characters
        cannot fit; the 4 x margin covers normalizers that merge characters (NFKC's combining marks)."""
        if self._token_chars is None:
            self._token_chars = max([1] + [len(t) for t in self.tokenizer.get_vocab()])
        return self._token_chars

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of the text a token id stands for (a byte-fallback token is its one byte): what the server's
        logprobs report (prompt.token_bytes_table, built once)."""
        if self._token_bytes is None:
            self._token_bytes = token_bytes_table(self.tokenizer)
        return self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""

    @torch.no_grad()
    def prompt_logits(self, video, prompt: str, conv_mode: str | None = None, system: str | None = None):
        """Logits (L, V) of every position of the spliced prompt (for scoring options, and parity tests)."""
        ids, img_pos, n = self._prompt_ids(prompt, conv_mode, system)
        lm = self.model.language_model
        embeds = splice(lm.embed(ids.to(self.device)), img_pos, self.encode(video)).unsqueeze(0)
        lm.setup_cache(1, n, self.kv_dtype, self.device)
        self._prefix = None  # this overwrites the cache from position 0
        return lm(embeds, torch.arange(n, device=self.device), all_logits=True, start=0)[0]

    # ------------------------------------------------------------------------------------------ generation
    def check_params(self, params: SamplingParams):
        """SamplingParams.validate plus what needs the model: stop_token_ids inside the vocabulary."""
        params.validate()
        v = self.config.text.vocab_size
        if any(t >= v for t in params.stop_token_ids):
            raise InputError(f"stop_token_ids: {max(params.stop_token_ids)} is not a token id (vocabulary of {v})")
        if params.logit_bias and max(params.logit_bias) >= v:
            raise InputError(f"logit_bias: {max(params.logit_bias)} is not a token id (vocabulary of {v})")

    def _run(self, video, prompt, params: SamplingParams, conv_mode, system, timings, cancel=None, video_key=None):
        self.check_params(params)
        t_start = self._clock()
        ids, img_pos, n_prompt = self._prompt_ids(prompt, conv_mode, system, video is not None)
        ctx = self.config.text.max_position_embeddings
        if n_prompt + params.max_new_tokens > ctx:
            log.warning("max_new_tokens %d cut to %d to fit the %d-token context", params.max_new_tokens,
                        ctx - n_prompt, ctx)
            params = replace(params, max_new_tokens=ctx - n_prompt)
        lm = self.model.language_model
        # 0: no video (the LLM alone answers the text), or nothing after it: no prefix to split at or reuse
        n_pre = prefix_split(ids, img_pos, self.config.num_visual_tokens)
        key = self._prefix_key(video, ids[:img_pos], video_key) if n_pre else None
        hit = key is not None and self._prefix == (key, n_pre)
        if self._step is None or (self._step.use_graph, self._step.use_compile) != (self.cuda_graphs,
                                                                                    self.compile_decode):
            if self.cuda_graphs and self.device.type != "cuda":
                raise ConfigError("cuda_graphs needs a CUDA device")
            self._step = DecodeStep(lm, self.cuda_graphs, self.compile_decode and not self.cuda_graphs)
            log.info("pllava decode: %s", "CUDA graph replay" if self.cuda_graphs else
                     "torch.compile'd step" if self.compile_decode else "eager steps")
        stop = stop_check(cancel)
        first = True
        try:
            stop()  # cancelled while it waited for the model thread
            lm.setup_cache(1, n_prompt + params.max_new_tokens, self.kv_dtype, self.device, keep=n_pre if hit else 0)
            if hit:
                # the same clip and prompt head as the last request: its KV for [0, n_pre) is still in the cache
                # (later writes start at n_pre); only the question is prefilled, the video is not decoded or encoded
                timings["prefix_cache_hit"] = 1
                start, embeds = n_pre, lm.embed(ids[img_pos + 1:].to(self.device)).unsqueeze(0)
            elif img_pos is None:
                self._prefix = None
                start, embeds = 0, lm.embed(ids.to(self.device)).unsqueeze(0)  # (1, L, D)
            else:
                self._prefix = None
                vis = self.encode(video, timings, stop=stop)
                start = 0
                embeds = splice(lm.embed(ids.to(self.device)), img_pos, vis).unsqueeze(0)  # (1, L, D)
            prompt_text_ids = text_ids(ids, img_pos)
            for ev in generate_tokens(lm, embeds, params, self.tokenizer, self.eos_ids, prompt_text_ids, timings,
                                      self._clock, cancel, start, self._step, n_pre, stop):
                if first and key is not None:
                    self._prefix = (key, n_pre)  # the prefill has written the prefix
                if first:
                    timings["ttft"] = self._clock() - t_start
                    first = False
                yield ev
        except StopRequested:
            # cancelled before its first token, in the vision tower or between the prefill's layers: no token; a
            # prefix this request was writing is not marked reusable (_prefix is set at the first token)
            timings.update(_finish="cancelled", _text="", _logprobs=None if params.logprobs is None else [],
                           decode_tokens=0)
            log.info("generate: cancelled before its first token")
        except NumericalError:
            # the cache now holds non-finite K/V; a captured graph attends over masked slots too (0 x NaN = NaN),
            # so the next request gets a fresh cache rather than this one's leftovers
            self._prefix = None
            lm.free_cache()
            raise
        except Exception as err:
            if not ops.out_of_memory(err):
                raise
            # typed, as in a batch (scheduler.DeviceMemoryError). A prefix this request was writing is not marked
            # reusable (_prefix is set at the first token); a graph capture that failed is redone (its key is set
            # after the capture)
            raise DeviceMemoryError.of("generate()", err, "use fewer frames, a shorter prompt or max_new_tokens, "
                                       "or free device memory") from None
        timings["total"] = self._clock() - t_start
        timings["num_prompt_tokens"] = n_prompt

    def generate(self, video, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 stop=None, *, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_token_ids=None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 logit_bias: dict | None = None, logprobs: int | None = None, conv_mode: str | None = None,
                 system: str | None = None, cancel=None, video_key=None) -> GenerationOutput:
        """`prompt`: a question (rendered with conv_mode's template), a full prompt with conv_mode='raw', or chat
        turns [(role, text)]. `cancel`: a threading.Event that stops the request at its next stop point (the
        next decoded frame or layer of the vision tower or the prefill, then the next token): finish_reason
        'cancelled', with the tokens so far. `video_key`:
        an identity for frames the caller decoded (e.g. a content hash) so a follow-up question reuses the video's
        KV cache. `logprobs=k` (0-20): out.logprobs holds each new token's TokenLogprob (its log-probability under
        the model's distribution and the k most likely tokens)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed, stop=stop or [],
                                stop_token_ids=stop_token_ids or [], frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty, logit_bias=logit_bias, logprobs=logprobs)
        timings: dict = {}
        toks = self._on_model(lambda: [ev.token_id for ev in self._run(video, prompt, params, conv_mode, system,
                                                                        timings, _Cancel(cancel), video_key)])
        n_prompt = timings.pop("num_prompt_tokens")
        finish, text, lps = timings.pop("_finish"), timings.pop("_text"), timings.pop("_logprobs")
        return GenerationOutput(text, toks, n_prompt, timings, finish, logprobs=lps)

    def stream(self, video, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               stop=None, *, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop_token_ids=None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
               logit_bias: dict | None = None, conv_mode: str | None = None, system: str | None = None, cancel=None,
               video_key=None, timings: dict | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated (''.join(pieces) == generate(...).text); the arguments are
        generate's, and `timings` (a dict) is filled with its stage times."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed, stop=stop or [],
                                stop_token_ids=stop_token_ids or [], frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty, logit_bias=logit_bias)
        timings = {} if timings is None else timings
        for ev in self._model_iter(self._run, video, prompt, params, conv_mode, system, timings, _Cancel(cancel),
                                   video_key):
            if ev.text:
                yield ev.text

    def _on_model(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the engine's model thread (CPU), else here."""
        mt = self._model_thread
        return fn(*args, **kwargs) if mt is None else mt.call(fn, *args, **kwargs)

    def _model_iter(self, gen_fn, *args, **kwargs):
        """What gen_fn(*args, **kwargs) yields, the generator run on the engine's model thread (CPU), else here."""
        mt = self._model_thread
        return gen_fn(*args, **kwargs) if mt is None else mt.iterate(gen_fn, *args, **kwargs)

    # ------------------------------------------------------------------------------------------ batching
    def scheduler(self, max_num_seqs: int = 8, max_seq_len: int | None = None, kv_cache_bytes: int | None = None,
                  prefill_chunk: int | None = None, media_workers: int = 2):
        """A new continuous-batching scheduler over this engine (pllava.scheduler.Scheduler), as the server
        drives it. The slots' KV is sized from the memory budget (see plan_slots)."""
        from .scheduler import Scheduler

        return Scheduler(self, max_num_seqs, max_seq_len, kv_cache_bytes, prefill_chunk, media_workers)

    def generate_many(self, requests, max_batch_size: int | None = None, progress: bool = False, *,
                      return_errors: bool = False, prefill_chunk: int | None = None,
                      kv_cache_bytes: int | None = None) -> list[GenerationOutput]:
        """Generate for many requests at once with continuous batching; outputs in input order.

        A request is a dict or `pllava.Request`: `video`, `prompt`, any keyword of generate() and `lora_alpha`
        (default: the engine's alpha). Greedy results equal one-at-a-time generate() (fp32); a seeded sampled
        request gives the same tokens whatever else runs. Every request is validated before any compute (a typed
        error naming `requests[i]`). `max_batch_size`: the most requests decoding together (default: all of
        them, up to 16, as the KV memory budget allows). A request whose clip fails raises its typed error once
        the others are done, or, with return_errors=True, comes back with finish_reason 'error' and `error`.
        `prefill_chunk`: prefill long prompts in chunks of this many tokens between decode steps.
        """
        return self._on_model(self._generate_many, requests, max_batch_size, progress, return_errors, prefill_chunk,
                              kv_cache_bytes)

    def _generate_many(self, requests, max_batch_size, progress, return_errors, prefill_chunk, kv_cache_bytes):
        from .batch_driver import engine_scheduler
        from .sequence import Request, prepare_sequence, slot_len_for

        reqs = [Request.coerce(r, f"requests[{i}]") for i, r in enumerate(requests)]
        if not reqs:
            return []
        _check_batch_size(max_batch_size)
        n_seqs = max_batch_size if max_batch_size is not None else min(len(reqs), 16)
        seqs = [prepare_sequence(self, r, i) for i, r in enumerate(reqs)]  # all validated before any compute
        sched = engine_scheduler(self, min(n_seqs, len(reqs)), slot_len_for(self, seqs), prefill_chunk,
                                 kv_cache_bytes)
        sched.limit = n_seqs
        seqs = [sched.fit(s) for s in seqs]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), unit="req", desc="generate_many")
        try:
            sched.run(seqs, bar)
        finally:
            if bar is not None:
                bar.close()
        if not return_errors:
            for s in seqs:
                if s.error is not None:
                    raise type(s.error)(f"requests[{s.index}]: {s.error}") from s.error
        return [s.output for s in seqs]

    def generate_iter(self, requests, max_batch_size: int = 16, *, max_seq_len: int | None = None,
                      prefill_chunk: int | None = None, kv_cache_bytes: int | None = None,
                      media_workers: int = 2, stats: dict | None = None) -> Iterator[tuple[int, GenerationOutput]]:
        """Continuous batching over an iterable of requests of any length (a dataset): yields (index, output) as
        each request finishes, pulling new requests in as slots free up (a bounded look-ahead, so clips are
        decoded ahead by `media_workers` threads but never all at once). A request that fails (validation or
        its clip) yields an output with finish_reason 'error'. `max_seq_len`: positions of a KV slot (default:
        sized from the requests in the look-ahead; a later request that needs more waits for the batch to drain,
        then runs on longer slots, prefixes kept). `stats` (a dict) receives this call's counters at the end,
        among them `model_wait_s`, the time the model waited for a clip to be decoded, and the slots' number and
        length."""
        from .batch_driver import iter_outputs

        _check_batch_size(max_batch_size)
        yield from self._model_iter(iter_outputs, self, requests, max_batch_size, max_seq_len=max_seq_len,
                                    prefill_chunk=prefill_chunk, kv_cache_bytes=kv_cache_bytes,
                                    media_workers=media_workers, stats=stats)

    def live(self, source, prompt: str = CAPTION_PROMPT, *, window_s: float = 8.0, every_s: float = 2.0,
             growing: bool = False, **gen_kw) -> Iterator[tuple[float, GenerationOutput]]:
        """Caption a live source (pipe, growing file, RTSP/device URL): every `every_s` seconds of stream time, the
        model answers `prompt` about num_frames frames spread over the last `window_s` seconds.
        Yields (window end time in stream seconds, GenerationOutput)."""
        from .live import live_windows

        for win in live_windows(source, self.config.num_frames, window_s=window_s, every_s=every_s,
                                limits=self.limits, growing=growing):
            yield win.end_time, self.generate(win.frames, prompt, **gen_kw)

    def caption(self, video, max_new_tokens: int = 256, **kw) -> str:
        """The clip's caption: "Describe the video in details." (single_test's question), or the recipe's own query
        for a recipe that has one (conv_mode='recaption': pllava_recaption.py's)."""
        question = default_question(kw.get("conv_mode") or self.conv_mode)
        return self.generate(video, question, max_new_tokens=max_new_tokens, **kw).text

    def chat(self, video, conv_mode: str | None = None, system: str | None = None, history=None, **generate_kw):
        """A conversation about `video` as PLLaVA's demo holds it (pllava.chat.Chat): `chat.ask(question)`."""
        from .chat import Chat

        return Chat(self, video, conv_mode, system, history, **generate_kw)


class _Cancel:
    """A request's `cancel` event as generation reads it (is_set), also set once the caller of its model-thread job
    has stopped waiting (ops.abandoned: Ctrl-C in generate(), a stream closed early)."""

    def __init__(self, cancel):
        self.cancel = cancel

    def is_set(self) -> bool:
        return ops.abandoned() or (self.cancel is not None and self.cancel.is_set())


def _check_batch_size(n):
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"max_batch_size must be an integer >= 1 or None, got {n!r}")


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(x, Image.Image)


def _pil_frames(images: list):
    arrs = [np.asarray(im.convert("RGB")) for im in images]
    if len({a.shape for a in arrs}) == 1:
        return np.stack(arrs)
    return [a[None] for a in arrs]
