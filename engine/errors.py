"""Typed errors. Every one is a ValueError subclass whose message names the file, key, field or limit at fault."""
import re


class PllavaError(ValueError):
    """Base class of the engine's input errors."""


class ConfigError(PllavaError):
    """config.json, preprocessor_config.json or adapter_config.json is missing a field or holds a bad value."""


class CheckpointError(PllavaError):
    """A weight file is unreadable, or a key is missing, unexpected, or has the wrong shape."""


class TokenizerError(PllavaError):
    """The tokenizer disagrees with the model config (e.g. it does not know the image token)."""


class PromptError(PllavaError):
    """A prompt without exactly one <image> token, an unknown conv_mode, or a prompt over the context."""


class VideoError(PllavaError):
    """A source that is not a decodable video (empty, truncated, audio-only, unsupported codec...)."""


class InputError(PllavaError):
    """A `video` argument of the wrong type, dtype or shape."""


class NumericalError(PllavaError):
    """The model produced non-finite logits (NaN or inf) for a request: it ends, typed, rather than sampling garbage."""


class MemoryBudgetError(PllavaError):
    """Memory cannot hold what was asked: a model's weights at load (more than the device has free), a KV slot, or
    a request longer than a slot; names the numbers."""


class DeviceMemoryError(MemoryBudgetError):
    """The device ran out of memory running one request (its clip's preprocessing, vision tower or prefill in a
    batch; any step of generate()): that request alone ends, named with the stage and the allocator's message; the
    server answers 503 (retry when the load is lower)."""

    @classmethod
    def of(cls, stage: str, err: BaseException, advice: str) -> "DeviceMemoryError":
        """From torch's error: its first line names the sizes (the rest is the allocator's advice, not ours)."""
        line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return cls(f"out of memory in {stage} ({line}); {advice}")


def error_line(e: BaseException) -> str:
    """A typed, one-line error: 'VideoError: clip.mp4: no such file' (no errno noise, no newlines)."""
    if isinstance(e, OSError) and e.strerror:
        msg = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        msg = str(e)
    msg = re.sub(r"\[Errno \d+\]\s*", "", msg)
    return f"{type(e).__name__}: {' '.join(msg.split())}"
