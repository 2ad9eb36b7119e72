"""pllava: a low-latency single-GPU inference engine for PLLaVA video-language models."""
from .errors import (CheckpointError, ConfigError, DeviceMemoryError, InputError, MemoryBudgetError, NumericalError,
                     PllavaError, PromptError, TokenizerError, VideoError)
from .generate import TokenLogprob
from .preprocess import native_available, preprocess
from .runtime import Engine, GenerationOutput
from .sequence import Request
from .video import read_frames, stream_frames

__version__ = "0.1.0"
__all__ = ["Engine", "GenerationOutput", "TokenLogprob", "Request", "read_frames", "stream_frames", "preprocess",
           "native_available",
           "PllavaError", "ConfigError", "CheckpointError", "TokenizerError", "PromptError", "VideoError",
           "InputError", "MemoryBudgetError", "DeviceMemoryError", "NumericalError"]
