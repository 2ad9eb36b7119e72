"""Loading: a checkpoint directory (or hub id) -> the model, tokenizer, processor config and EOS ids an Engine holds.

Split from runtime.py so the Engine reads as what it does with a loaded model; `Engine.from_pretrained` is the
public entry and documents the arguments."""
from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import numpy as np
import torch

from . import memory, ops
from .memory import human_bytes
from .checkpoint import LAYOUT_NAMES, attach_adapter_config, load_weights, plan_adapter, plan_checkpoint
from .config import DEFAULT_LORA_ALPHA, PllavaConfig, load_config, read_json_object
from .errors import CheckpointError, ConfigError, MemoryBudgetError, PllavaError
from .model import PllavaModel
from .model.head import HEAD_RESCORE, HalfHead, RescoredHead
from .model.vision import CPU_FRAME_CHUNK
from .preprocess import clip_defaults, load_processor_config, preprocess
from .prompt import build_prompt, check_image_token, default_conv_mode

log = logging.getLogger("pllava")

QUANTIZE_MODES = (None, "int8", "w8a8", "int4")  # Engine.from_pretrained(quantize=...), CLI --quantize
INT4_DEVICES = ("cpu", "cuda")  # where quantize="int4" runs (pllava._C's GEMV; the Triton int4 kernel): the load
# refuses it elsewhere, and the memory check offers it nowhere else
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, device: torch.device, cfg_dtype: str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if str(dtype) not in _DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[str(dtype)]
    if device.type != "cuda":
        return torch.float32  # CPUs have no fast half-precision GEMM worth the accuracy loss
    return _DTYPES.get(str(cfg_dtype), torch.bfloat16) if cfg_dtype not in (None, "float32") else torch.bfloat16


def resolve_model_dir(model: str) -> str:
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ConfigError(f"{model}: not a directory (a model is a directory with config.json, or a hub repo id)")
    if not model or os.path.isabs(model) or model.startswith(("./", "../", "~")) or model.count("/") > 1:
        # a path (no hub id looks like this): asking the hub would only add its own complaint about the name
        raise ConfigError(f"{model or repr(model)}: no such model directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"{model}: not a local directory, and the hub repo could not be fetched: {e}") from e


class Loaded(NamedTuple):
    """What Engine.__init__ takes, in its order."""
    model: PllavaModel
    tokenizer: object
    processor_config: dict
    device: torch.device
    dtype: torch.dtype
    conv_mode: str
    model_dir: str
    eos_ids: set


def resolve_device(device) -> torch.device:
    """The device an engine runs on (None: $PLLAVA_DEVICE when set, else CUDA when available, else the CPU); a
    typed error where it cannot. PLLAVA_DEVICE=cpu keeps a GPU machine's defaults on the CPU (the test suite
    sets it: its tests are written for the CPU unless they name a device)."""
    where = "device"
    if device is None and os.environ.get("PLLAVA_DEVICE"):
        device, where = os.environ["PLLAVA_DEVICE"], "PLLAVA_DEVICE"
    try:
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{where} {device!r}: not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{where} {str(dev)!r}: CUDA is not available here (torch {torch.__version__}, "
                          f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA)")
    return dev


def load(model: str, device=None, dtype=None, num_frames=None, pooling_shape=None, lora_alpha=None, conv_mode=None,
         adapter: str | None = None, attn_backend: str = "sdpa", quantize: str | None = None) -> Loaded:
    """Engine.from_pretrained's work (its docstring says what each argument does)."""
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(os.fspath(model))
    if adapter is None and os.path.isfile(os.path.join(model_dir, "adapter_config.json")):
        adapter = model_dir
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            base = read_json_object(os.path.join(model_dir, "adapter_config.json")).get("base_model_name_or_path")
            if not isinstance(base, str) or not base:
                raise ConfigError(f"{model_dir}/adapter_config.json: no config.json beside it and no "
                                  "'base_model_name_or_path' to find the base model")
            model_dir = resolve_model_dir(base)
    device = resolve_device(device)
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be None, 'int8', 'w8a8' or 'int4', got {quantize!r}")
    if quantize == "w8a8" and device.type != "cpu":
        raise ConfigError(f"quantize='w8a8' runs on the CPU only (its int8 x int8 prefill GEMM is torch._int_mm's "
                          f"CPU kernel, not yet checked on {device.type}); use quantize='int8' there")
    if quantize == "int4" and device.type not in INT4_DEVICES:
        raise ConfigError(f"quantize='int4' runs on the CPU (pllava._C's int4 GEMV) and on CUDA (the Triton int4 "
                          f"kernel), not on {device.type}")
    cfg = load_config(model_dir).with_overrides(num_frames=num_frames, pooling_shape=pooling_shape,
                                                lora_alpha=DEFAULT_LORA_ALPHA if lora_alpha is None else lora_alpha)
    if cfg.model_type == "llava_next":
        log.info("%s: LLaVA-NeXT checkpoint run as a training-free PLLaVA: its anyres fields "
                 "(image_grid_pinpoints, image_newline) are not used; frames are pooled to %s", model_dir,
                 "x".join(map(str, cfg.pooling_shape)))
    dt = resolve_dtype(dtype, device, cfg.torch_dtype)
    if device.type == "cpu" and ops.half_gemm_emulated(dt):
        name = str(dt).split(".")[-1]
        log.warning("dtype=%s on a CPU without %s (%s): torch emulates %s GEMMs here, so the vision tower and the "
                    "prefill run several times slower than in float32 (a 2-core AVX2 EPYC, small preset: time to "
                    "first token 1.8 s against 0.3-0.5 s at 144 visual tokens); dtype=torch.float32 with "
                    "quantize='int8' (CLI --dtype float32 --quantize int8) decodes as fast there (12.7-15.1 against "
                    "13.3 ms a token) at float32's prefill speed", name, " or ".join(ops.NATIVE_HALF_GEMM[dt]), ops.cpu_info()[0] or "this CPU", name)
    attn_backend = ops.check_attn_backend(attn_backend, device, dt)
    plan = plan_checkpoint(model_dir, cfg)
    tensors = dict(plan.tensors)
    lcfg = None
    if adapter is not None:
        if plan.lora_r:
            raise CheckpointError(f"{model_dir}: the checkpoint already carries a LoRA (r={plan.lora_r}); "
                                  f"refusing to stack the adapter in {adapter} on it")
        a_tensors, lcfg, _ = plan_adapter(os.fspath(adapter))
        tensors.update(a_tensors)
    cfg = attach_adapter_config(cfg, plan, lcfg)

    from transformers import AutoTokenizer

    tok_dir = model_dir if os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")) or adapter is None \
        else os.fspath(adapter)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except Exception as e:  # noqa: BLE001 - typed here: a list or null in its JSON raised AttributeError /
        # TypeError inside transformers, a corrupt tokenizer.json a plain Exception from the tokenizers library
        for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(tok_dir, name)):  # the file at fault, named, where one is not an object
                read_json_object(os.path.join(tok_dir, name))
        raise ConfigError(f"{tok_dir}: cannot load the tokenizer ({type(e).__name__}): {str(e)[:300]}") from e
    check_image_token(tokenizer, cfg.image_token_index, tok_dir)
    if len(tokenizer) > cfg.text.vocab_size:
        raise ConfigError(f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens but text_config.vocab_size is "
                          f"{cfg.text.vocab_size}")

    with torch.device("meta"):
        net = PllavaModel(cfg)
    check_weights_fit(net, dt, quantize, device, model_dir)
    convert, pre = None, {}
    if quantize is not None:
        from .model.quant import (DECODE_ROWS, INT4_FUSED_MAX_M, int8_loader, native_int8_available, quantize_lm_int8_,
                                  quantized_bytes)

        fp32_rows = int8_fp32_rows(device, dt)
        convert = int8_loader(net.language_model, dt, device, fp32_rows, pre, int4=quantize == "int4")
    load_weights(net, tensors, plan.layout, dt, device, model_dir, convert)
    if quantize is not None:
        head8 = quantize_lm_int8_(net.language_model, pre, act_int8=quantize == "w8a8", int4=quantize == "int4")
        left = [n for n, t in net.named_parameters() if t.is_meta]
        if left:  # a target the loader took but quantize_lm_int8_ did not rebuild: never run on meta tensors
            raise CheckpointError(f"{model_dir}: quantize='{quantize}' left {len(left)} weights unloaded, e.g. "
                                  f"'{left[0]}'")
        nbytes = quantized_bytes(net.language_model)
        prefill = ("prefill rows quantized per row to int8 for an int8 x int8 GEMM (w8a8)" if quantize == "w8a8"
                   else "prefill rows by a GEMM of the dequantized weight in the engine's dtype" if quantize == "int4"
                   else "prefill rows by a GEMM in the weights' dtype")
        kind = "int4 groups of 32 + bf16 scales" if quantize == "int4" else "int8 + scales"
        if ops.kernel_path(device) == "triton" and quantize == "int4":
            how = (f"the Triton int4 kernel for up to {INT4_FUSED_MAX_M} rows, LoRA fused (pllava.kernels."
                   "int4_linear); longer prefills dequantize the weight by Triton for the unquantized GEMM; lm_head's "
                   "first pass by the Triton int8 kernel")
        elif ops.kernel_path(device) == "triton":
            how = "the Triton int8 kernel, LoRA fused (pllava.kernels.int8_linear)"
        elif fp32_rows:
            bits = "int4" if quantize == "int4" else "int8"
            how = f"decode rows in fp32 through pllava._C's {bits} GEMV (norm weights in fp32), {prefill}"
            net.language_model.set_fp32_rows(DECODE_ROWS, dt)
        elif device.type == "cpu":
            why = "is not built" if not native_int8_available() else "has no AVX-512 or AVX2 path here"
            how = f"torch._weight_int8pack_mm for decode rows (pllava._C {why}), {prefill}"
        else:
            how = (f"{'int4' if quantize == 'int4' else 'int8'} weights dequantized per call (triton cannot run here: "
                   "memory shrinks, speed does not)")
        head = "lm_head two-level int8" if head8 else "lm_head tied to the embedding: not quantized"
        log.info("quantize=%s: the LLM's linears hold %.1f MB as %s (%s); path: %s%s",
                 quantize, nbytes / 1e6, kind, head, how,
                 "" if dt != torch.float32 or device.type != "cpu" or native_int8_available(dt) else
                 "; with float32 activations this is slower than fp32: use dtype=torch.bfloat16")
    lm = net.language_model
    if dt in (torch.bfloat16, torch.float16) and isinstance(lm.lm_head, torch.nn.Linear):
        lm.lm_head = HalfHead(lm.lm_head)  # fp32 logits at each row's best (model/head.py)
    if isinstance(lm.lm_head, RescoredHead):
        log.info("lm_head: a first pass over the vocabulary, then each row's %d best logits in fp32",
                 HEAD_RESCORE)
    net.lora_scale = torch.tensor(cfg.lora.scale, dtype=torch.float32, device=device)
    net.bind_lora_scale()
    net.language_model.setup_rope(device)
    net.language_model.image_token_id, net.language_model.pad_token_id = cfg.image_token_index, cfg.pad_token_id
    net.eval()
    # the CPU encodes a clip's frames 4 at a time (model/vision.py: fewer page faults, the same features)
    net.vision_tower.frame_chunk = CPU_FRAME_CHUNK if device.type == "cpu" else None
    path = ops.log_kernel_path(device)
    net.set_kernel_path(path)
    for layer in net.language_model.layers:
        layer.self_attn.attn_backend = attn_backend

    pp = os.path.join(model_dir, "preprocessor_config.json")
    if os.path.isfile(pp):
        proc = load_processor_config(pp)
        try:  # one 2 x 2 frame through it now: a field it cannot use fails at load, not at the first clip
            shape = tuple(preprocess(np.zeros((1, 2, 2, 3), np.uint8), proc).shape[1:])
        except PllavaError as e:
            raise ConfigError(f"{pp}: {e}") from e
        if shape != (3, cfg.vision.image_size, cfg.vision.image_size):
            raise ConfigError(f"{pp}: produces {shape} frames but the vision tower takes (3, "
                              f"{cfg.vision.image_size}, {cfg.vision.image_size})")
    else:
        log.warning("%s: no preprocessor_config.json; using CLIP's defaults at %dpx", model_dir,
                    cfg.vision.image_size)
        proc = clip_defaults(cfg.vision.image_size)
    eos = _eos_ids(tokenizer, cfg, model_dir)
    mode = conv_mode or default_conv_mode(tokenizer)
    build_prompt("x <image>" if mode == "raw" else "x", mode)  # unknown conv_mode: fail at load, not later
    log.info("loaded %s (%s layout, LoRA r=%d alpha=%g) on %s as %s in %.2fs", model_dir,
             LAYOUT_NAMES[plan.layout], cfg.lora.r, cfg.lora.alpha, device, dt, time.perf_counter() - t0)
    return Loaded(net, tokenizer, proc, device, dt, mode, model_dir, eos)


def int8_fp32_rows(device: torch.device, dt: torch.dtype) -> bool:
    """Whether an int8 engine's decode rows run in fp32 (pllava._C's GEMV on the CPU; its LLM norms then in fp32)."""
    from .model.quant import native_int8_available

    return ops.kernel_path(device) != "triton" and device.type == "cpu" and native_int8_available(dt)


def weight_bytes(net: PllavaModel, dt: torch.dtype, quantize: str | None, device: torch.device) -> int:
    """Bytes the weights of `net` (built on the meta device) will hold once loaded in `dt`, quantized or not: every
    parameter in dt, but under int8 each decoder-layer linear at 1 byte a weight + a scale a row in dt, an untied
    lm_head at two int8 levels + a scale a row in dt and one in fp32, and (fp32 decode rows) the LLM's RMSNorm
    weights in fp32; under int4 the linears at half a byte a weight + a bf16 scale a group of 32. Buffers built
    after the load (RoPE tables, 4 MB at 7B) are not counted."""
    from .model.llm import RMSNorm
    from .model.quant import int8_targets

    size = dt.itemsize
    targets, norms = {}, set()
    if quantize is not None:
        targets = {"language_model." + n: k for n, k in int8_targets(net.language_model).items()}
        if dt != torch.float32 and int8_fp32_rows(device, dt):
            norms = {f"language_model.{n}.weight" for n, m in net.language_model.named_modules()
                     if isinstance(m, RMSNorm)}
    total = 0
    for name, p in net.named_parameters():
        kind, rows = targets.get(name), p.shape[0] if p.dim() else 1
        if kind == "linear" and quantize == "int4":  # half a byte a weight + a bf16 scale a group of 32
            total += p.numel() // 2 + p.numel() // 32 * 2
        elif kind == "linear":
            total += p.numel() + rows * size
        elif kind == "head":
            total += 2 * p.numel() + rows * (size + 4)
        else:
            total += p.numel() * (4 if name in norms else size)
    return total


_TIGHT = 0.85  # weights past this share of the free memory leave little for the KV cache and activations


def check_weights_fit(net: PllavaModel, dt: torch.dtype, quantize: str | None, device: torch.device, where: str):
    """Refuse, before any weight is read, a load whose weights alone exceed the memory free on `device` (on the
    host an OOM kill or heavy swapping otherwise, minutes into the load), naming the numbers and the settings that
    would fit; warn when they take most of it. PLLAVA_SKIP_MEMORY_CHECK=1 loads anyway (swap, or memory that will
    be freed meanwhile)."""
    need = weight_bytes(net, dt, quantize, device)
    have, source = memory.available_bytes(device)
    name = f"{str(dt).split('.')[-1]}{' + ' + quantize if quantize else ''}"
    if need <= _TIGHT * have:
        return
    if need <= have:
        log.warning("%s: the weights take %s of the %s %s as %s: little is left for the KV cache and activations",
                    where, human_bytes(need), human_bytes(have), source, name)
        return
    # the smaller settings to offer: bf16, int8, both, and int4 where it runs (never one that drops the quantization
    # already asked for; w8a8 asked for stays w8a8: the same bytes as int8)
    q8 = "int8" if quantize in (None, "int4") else quantize
    cands = [(torch.bfloat16, None), (dt, q8), (torch.bfloat16, q8)]
    if device.type in INT4_DEVICES:
        cands += [(dt, "int4"), (torch.bfloat16, "int4")]
    smaller = dict.fromkeys(m for m in cands if m != (dt, quantize) and (m[1] or not quantize))
    options = [(odt, oq, n) for odt, oq in smaller if (n := weight_bytes(net, odt, oq, device)) < need]
    msg = (f"{where}: its weights need {human_bytes(need)} on {device} as {name}, but {human_bytes(have)} is free "
           f"({source})")
    if options:
        msg += "; " + "; ".join(f"dtype={str(o).split('.')[-1]}{', quantize=' + repr(q) if q else ''}: "
                                f"{human_bytes(n)}{'' if n <= have else ' (also too much)'}" for o, q, n in options)
        msg += " (CLI --dtype, --quantize)"
    if os.environ.get("PLLAVA_SKIP_MEMORY_CHECK") == "1":
        log.warning("%s; loading anyway (PLLAVA_SKIP_MEMORY_CHECK=1)", msg)
        return
    raise MemoryBudgetError(msg + "; PLLAVA_SKIP_MEMORY_CHECK=1 loads anyway")


def _eos_ids(tokenizer, cfg: PllavaConfig, model_dir: str) -> set[int]:
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int) and not isinstance(v, bool):
            ids.add(v)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            ids.update(v)
        elif v is not None:
            raise ConfigError(f"{model_dir}: eos_token_id must be a token id or a list of them, got {v!r}")

    add(tokenizer.eos_token_id)
    add(cfg.text.eos_token_id)
    gc = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gc):
        add(read_json_object(gc).get("eos_token_id"))
    return ids
