"""PLLaVA's conversation templates (magic-research/PLLaVA tasks/eval/eval_utils.py) and <image> splicing.

The strings, separators and the two multimodal styles follow `Conversation.get_prompt` / `user_query` exactly:
MM_ALONE puts the image token in a message of its own (so the user role appears twice), MM_INTERLEAF prefixes it
to the question with a space. mvbench carries the post-query and answer prompt its eval script passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PromptError, TokenizerError

IMAGE_TOKEN = "<image>"

_VCG_SYSTEM = ("You are Video-ChatGPT, a large vision-language assistant. "
               "You are able to understand the video content that the user provides, and assist the user with a "
               "variety of tasks using natural language."
               "Follow the instructions carefully and explain your answers in detail based on the provided video.")
_MVBENCH_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
                   "movement of objects, and the action and pose of persons. Based on your observations, select the "
                   "best option that accurately addresses the question.\n")
_RECAPTION_SYSTEM = """You are a powerful Video Magic ChatBot, a large vision-language assistant. 
You are able to understand the video content that the user provides and assist the user in a video recaptioning task.
The user will provide you with the video and maybe some extra noisy information to help you out. Make use of the information in a proper way to be competent for the recaption job
### INSTRUCTIONS:
1. Follow the user's instruction.
2. Be critical yet believe in yourself.
"""
_VIDEOQA_PRE = ("The input consists of a sequence of key frames from a video. Answer the question concisely first and "
                "followed by significant events, characters, or objects that appear throughout the frames. Question:")
_VICUNA = dict(roles=("USER: ", "ASSISTANT:"), sep=(" ", "</s>"))
_CHATML = dict(roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep=("<|im_end|>\n", "<|im_end|>\n"))


@dataclass(frozen=True)
class Template:
    system: str
    roles: tuple
    sep: tuple
    mm_token: str = "<image>\n"
    mm_alone: bool = True  # MM_ALONE; False: MM_INTERLEAF
    pre_query: str | None = None
    post_query: str | None = None
    answer_prompt: str | None = None

    def render(self, question: str, system: str | None = None) -> str:
        """get_prompt() after user_query(question, pre, post, is_mm=True) [+ assistant_response(answer_prompt)]."""
        return render_chat(self, [("user", question)], system)


def render_chat(t: Template, turns: list[tuple[str, str]], system: str | None = None) -> str:
    """A multi-turn conversation [(role, text)] with role 'user' or 'assistant', the video attached to the first
    user turn (as user_query(is_mm=True) does), rendered by get_prompt's rules; it ends with the assistant role
    (or the template's answer prompt) so the model answers the last user turn."""
    user, bot = t.roles
    msgs: list[tuple[str, str]] = []
    first = True
    for role, text in turns:
        if role == "user":
            q = text
            if t.post_query is not None:
                q = f"{q} {t.post_query}"
            if t.pre_query is not None:
                q = f"{t.pre_query} {q}"
            if first:
                if t.mm_alone:
                    msgs.append((user, t.mm_token))
                elif t.mm_token not in q:
                    q = f"{t.mm_token} {q}"
                first = False
            msgs.append((user, q))
        else:
            msgs.append((bot, text))
    if first:
        raise PromptError("messages: no user turn to attach the video to")
    if msgs[-1][0] == user and t.answer_prompt is not None:
        msgs.append((bot, t.answer_prompt))
    sep = dict(zip(t.roles, t.sep))
    system = t.system if system is None else system
    out = system + sep[user] if system != "" else ""
    for i, (role, msg) in enumerate(msgs):
        if i + 1 == len(msgs):
            out += role + msg + sep[role] + bot if role != bot else role + msg
        else:
            out += role + msg + sep[role]
    return out


def check_turns(turns, system=None):
    """Chat turns must be (role, text) pairs, role 'user' or 'assistant', text a str, the last one the user's;
    `system` a str or None. Anything else is a PromptError naming the turn."""
    if not isinstance(turns, (list, tuple)) or not turns:
        raise PromptError("prompt: chat turns must be a non-empty list of (role, text) pairs")
    for i, t in enumerate(turns):
        if not isinstance(t, (list, tuple)) or len(t) != 2:
            raise PromptError(f"prompt[{i}]: a turn is a (role, text) pair, got {t!r:.80}")
        role, text = t
        if role not in ("user", "assistant"):
            raise PromptError(f"prompt[{i}]: role must be 'user' or 'assistant', got {role!r:.40}")
        if not isinstance(text, str):
            raise PromptError(f"prompt[{i}]: text must be a str, got {type(text).__name__}")
    if turns[-1][0] != "user":
        raise PromptError(f"prompt[{len(turns) - 1}]: the last turn must be the user's (the model answers it)")
    if system is not None and not isinstance(system, str):
        raise PromptError(f"system must be a str or None, got {type(system).__name__}")


def build_chat_prompt(turns: list[tuple[str, str]], conv_mode: str, system: str | None = None) -> str:
    check_turns(turns, system)
    name = ALIASES.get(conv_mode, conv_mode)
    if name not in TEMPLATES:
        raise PromptError(f"conv_mode {conv_mode!r} is unknown; choose one of {', '.join(CONV_MODES)}")
    return render_chat(TEMPLATES[name], turns, system)


TEMPLATES: dict[str, Template] = {
    "plain": Template("", ("USER:", "ASSISTANT:"), (" ", "</s>"), mm_token="<image>", mm_alone=False),
    "vcg": Template(_VCG_SYSTEM, **_VICUNA),
    "mvbench": Template(_MVBENCH_SYSTEM, **_VICUNA, post_query="\nOnly give the best option.",
                        answer_prompt="Best option:("),
    "videoqa": Template("", **_VICUNA, mm_alone=False, pre_query=_VIDEOQA_PRE, post_query="\n",
                        answer_prompt="\nAnswer: In the video,"),
    "recaption": Template(_RECAPTION_SYSTEM, **_VICUNA),
    "vcg_chatml": Template(_VCG_SYSTEM, **_CHATML),
    "mvbench_chatml": Template(_VCG_SYSTEM, **_CHATML, post_query="\nOnly give the best option.",
                               answer_prompt="Best option:("),
    "videoqa_chatml": Template("<|im_start|>system\nAnswer the question.", **_CHATML, mm_alone=False,
                               pre_query=_VIDEOQA_PRE, post_query="\n", answer_prompt="\nAnswer: In the video,"),
    "recaption_chatml": Template(_RECAPTION_SYSTEM, **_CHATML),
}
# PLLaVA's own names for the same templates.
ALIASES = {"eval_vcgbench": "vcg", "eval_mvbench": "mvbench", "eval_videoqabench": "videoqa",
           "eval_recaption": "recaption", "eval_vcg_llavanext": "vcg_chatml", "eval_mvbench_llavanext": "mvbench_chatml",
           "eval_videoqa_llavanext": "videoqa_chatml", "eval_recaption_llavanext": "recaption_chatml"}
CONV_MODES = tuple(TEMPLATES) + tuple(ALIASES) + ("raw",)


def build_prompt(question: str, conv_mode: str = "plain", system: str | None = None) -> str:
    """The full prompt text for `question`; conv_mode 'raw' takes `question` as the whole prompt."""
    if not isinstance(question, str):
        raise PromptError(f"prompt must be a str, got {type(question).__name__}")
    if system is not None and not isinstance(system, str):
        raise PromptError(f"system must be a str or None, got {type(system).__name__}")
    if not isinstance(conv_mode, str):
        raise PromptError(f"conv_mode must be a str, got {type(conv_mode).__name__}")
    if conv_mode == "raw":
        return question
    name = ALIASES.get(conv_mode, conv_mode)
    if name not in TEMPLATES:
        raise PromptError(f"conv_mode {conv_mode!r} is unknown; choose one of {', '.join(CONV_MODES)}")
    return TEMPLATES[name].render(question, system)


def default_conv_mode(tokenizer) -> str:
    """ChatML templates for tokenizers that know <|im_start|> (PLLaVA-34B / Yi), PLLaVA's demo 'plain' otherwise."""
    return "vcg_chatml" if "<|im_start|>" in tokenizer.get_vocab() else "plain"


def check_image_token(tokenizer, image_token_index: int, where: str):
    """The tokenizer must map '<image>' to the config's image_token_index (PLLaVA issue #32)."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id or tid != image_token_index:
        raise TokenizerError(f"{where}: the tokenizer maps '{IMAGE_TOKEN}' to {tid!r} but config.json's "
                             f"'image_token_index' is {image_token_index}; the tokenizer and the model config "
                             "come from different checkpoints")


def tokenize(tokenizer, prompt: str, image_token_index: int) -> tuple[torch.Tensor, int]:
    """Prompt text -> (input_ids (L,) int64, position of the single image token)."""
    n = prompt.count(IMAGE_TOKEN)
    if n != 1:
        raise PromptError(f"the prompt must contain exactly one '{IMAGE_TOKEN}' token, found {n}: {prompt[:200]!r}")
    ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    where = (ids == image_token_index).nonzero().flatten()
    if where.numel() != 1:
        raise TokenizerError(f"the tokenized prompt holds {where.numel()} image tokens (id {image_token_index}), "
                             "expected 1")
    return ids, int(where[0])


def splice(text_embeds: torch.Tensor, image_pos: int, visual: torch.Tensor) -> torch.Tensor:
    """Replace the one <image> embedding at image_pos by all visual embeddings: (L, d) -> (L - 1 + N, d)."""
    return torch.cat([text_embeds[:image_pos], visual.to(text_embeds.dtype), text_embeds[image_pos + 1:]], dim=0)
