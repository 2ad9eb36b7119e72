"""PLLaVA's prompts, as the authors build them (magic-research/PLLaVA, tasks/eval/eval_utils.py and the scripts).

Three layers, each named as the authors name it:
- Templates (`TEMPLATES`, the keys of their `conv_templates`): a bare `Conversation`. `build_prompt(q, name)` is
  `conv.user_query(q, is_mm=True); conv.get_prompt()`, which is also what their `single_test` renders.
- Recipes (`RECIPES`): a benchmark script's whole prompt, a template plus the script's pre/post query prompts
  and pre-filled answer (`user_query(q, pre, post, is_mm=True); assistant_response(answer_prompt)`), with the
  script's generation settings (`sampling`) and answer post-processing (`Recipe.answer`).
- Chats: two or more turns render as the demo's `ChatPllava` does. The video is its own first user message
  (`upload_video` -> `user_query("", is_mm=True)`), then each question `user_query(text)` and each answer
  `assistant_response(text)`.

get_prompt's rules: the system prompt then the first role's separator (nothing when the system is ""); then
each message as role + text + its role's separator; the last message, if a user's, is followed by the assistant
role with no separator, and if the assistant's (a pre-filled answer) it gets no separator. MM_ALONE puts the
image token in a user message of its own; MM_INTERLEAF prefixes it to the query with a space.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

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
# The demo's system textbox (tasks/eval/demo/pllava_demo.py SYSTEM); ChatPllava.ask sets it on every question.
DEMO_SYSTEM = """You are a powerful Video Magic ChatBot, a large vision-language assistant. 
You are able to understand the video content that the user provides and assist the user in a video-language related task.
The user might provide you with the video and maybe some extra noisy information to help you out or ask you a question. Make use of the information in a proper way to be competent for the job.
### INSTRUCTIONS:
1. Follow the user's instruction.
2. Be critical yet believe in yourself.
"""
_VIDEOQA_PRE = ("The input consists of a sequence of key frames from a video. Answer the question concisely first and "
                "followed by significant events, characters, or objects that appear throughout the frames. Question:")
# pllava_recaption.py's fixed query (infer_recaption).
RECAPTION_QUERY = (
    "You are to assist me in accomplishing a task about the input video. Reply to me with a precise yet detailed "
    "response. For how you would succeed in the recaptioning task, read the following Instructions section and Then, "
    "make your response with a elaborate paragraph.\n"
    "# Instructions\n"
    "1. Avoid providing over detailed information such as color, counts of any objects as you are terrible regarding "
    "observing these details\n"
    "2. Instead, you should carefully go over the provided video and reason about key information about the overall "
    "video\n"
    "3. If you are not sure about something, do not include it in you response.\n"
    "# Task\n"
    "Describe the background, characters and the actions in the provided video.\n")
CAPTION_QUESTION = "Describe the video in details."  # single_test's question, and the demo's usual first one
_VICUNA = dict(roles=("USER: ", "ASSISTANT:"), sep=(" ", "</s>"), mm_token="<image>\n")
_CHATML = dict(roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep=("<|im_end|>\n", "<|im_end|>\n"),
               mm_token="<image>\n")


@dataclass(frozen=True)
class Template:
    """One of the authors' `Conversation`s, as far as get_prompt reads it. (Their eval_videoqa* ones also carry
    pre/post query and answer prompts that user_query never applies by itself; the videoqabench recipes hold them.)"""
    system: str
    roles: tuple
    sep: tuple
    mm_token: str
    mm_alone: bool  # MultiModalConvStyle.MM_ALONE; False: MM_INTERLEAF


@dataclass(frozen=True)
class Recipe:
    """A benchmark script's prompt: `template` with the script's pre/post query prompts and pre-filled answer.
    `query`: the script's fixed question (recaption), used when none is given. `sampling`: the script's generation
    settings as generate() keywords. `return_prompt`: what the script puts back in front of the answer."""
    template: str
    pre_query: str | None = None
    post_query: str | None = None
    answer_prompt: str | None = None
    return_prompt: str | None = None
    system: str | None = None  # None: the template's
    query: str | None = None
    strip_answer_newlines: bool = False  # videoqa splits on answer_prompt.strip("\n") and strips the result
    chat_flow: bool = False  # the demo: the clip is its own first user message even before a single question
    sampling: dict = field(default_factory=dict)
    source: str = ""

    def answer(self, text: str) -> str:
        """What the script records for a generated `text` (the new tokens, after the pre-filled answer):
        pllava_answer's strip of answer_prompt + text, the split on the answer prompt, the return prompt."""
        full = ((self.answer_prompt or "") + text).strip()
        if self.answer_prompt is not None:
            ap = self.answer_prompt.strip("\n") if self.strip_answer_newlines else self.answer_prompt
            full = "".join(full.split(ap)[1:])
            if self.strip_answer_newlines:
                full = full.strip()
        return (self.return_prompt or "") + full


TEMPLATES: dict[str, Template] = {
    "plain": Template("", ("USER:", "ASSISTANT:"), (" ", "</s>"), mm_token="<image>", mm_alone=False),
    "eval_vcgbench": Template(_VCG_SYSTEM, **_VICUNA, mm_alone=True),
    "eval_vcg_llavanext": Template(_VCG_SYSTEM, **_CHATML, mm_alone=True),
    "eval_mvbench": Template(_MVBENCH_SYSTEM, **_VICUNA, mm_alone=True),
    "eval_mvbench_llavanext": Template(_VCG_SYSTEM, **_CHATML, mm_alone=True),
    "eval_videoqabench": Template("", **_VICUNA, mm_alone=False),
    "eval_videoqa_llavanext": Template("<|im_start|>system\nAnswer the question.", **_CHATML, mm_alone=False),
    "eval_recaption": Template(_RECAPTION_SYSTEM, **_VICUNA, mm_alone=True),
    "eval_recaption_llavanext": Template(_RECAPTION_SYSTEM, **_CHATML, mm_alone=True),
}

_MVB = dict(post_query="\nOnly give the best option.", answer_prompt="Best option:(", return_prompt="(",
            sampling={"max_new_tokens": 100}, source="tasks/eval/mvbench/pllava_eval_mvbench.py")
_VCGB = dict(sampling={"max_new_tokens": 100, "stop": ["###", "USER"]},
             source="tasks/eval/vcgbench/pllava_eval_vcgbench.py")
_VQAB = dict(pre_query=_VIDEOQA_PRE, post_query="\n", answer_prompt="\nAnswer: In the video,",
             strip_answer_newlines=True, sampling={"max_new_tokens": 100},
             source="tasks/eval/videoqabench/pllava_eval_videoqabench.py")
_RECAP = dict(query=RECAPTION_QUERY, sampling={"max_new_tokens": 400},
              source="tasks/eval/recaption/pllava_recaption.py")
# Each script with the template scripts/eval.sh gives it (7B/13B), and with eval_yiprompt.sh's (34B, ChatML).
RECIPES: dict[str, Recipe] = {
    "mvbench": Recipe("eval_mvbench", **_MVB),
    "mvbench_llavanext": Recipe("eval_mvbench_llavanext", **_MVB),
    "vcgbench": Recipe("eval_vcgbench", **_VCGB),
    "vcgbench_llavanext": Recipe("eval_vcg_llavanext", **_VCGB),
    "videoqabench": Recipe("eval_videoqabench", **_VQAB),
    "videoqabench_llavanext": Recipe("eval_videoqa_llavanext", **_VQAB),
    "recaption": Recipe("eval_recaption", **_RECAP),
    "recaption_llavanext": Recipe("eval_recaption_llavanext", **_RECAP),
    # The gradio demo: its --conv_mode template (demo.sh: plain) with its system textbox.
    "demo": Recipe("plain", system=DEMO_SYSTEM, chat_flow=True, sampling={"max_new_tokens": 200},
                   source="tasks/eval/demo/pllava_demo.py"),
    "demo_llavanext": Recipe("eval_vcg_llavanext", system=DEMO_SYSTEM, chat_flow=True,
                             sampling={"max_new_tokens": 200},
                             source="tasks/eval/demo/pllava_demo.py"),
}
# Names earlier releases of this engine used, kept working (each renders what it rendered before).
ALIASES = {"vcg": "vcgbench", "videoqa": "videoqabench", "vcg_chatml": "vcgbench_llavanext",
           "mvbench_chatml": "mvbench_llavanext", "videoqa_chatml": "videoqabench_llavanext",
           "recaption_chatml": "recaption_llavanext"}
CONV_MODES = tuple(TEMPLATES) + tuple(RECIPES) + tuple(ALIASES) + ("raw",)


def resolve(conv_mode: str) -> tuple[Template, Recipe | None]:
    """A conv_mode name -> (its template, its recipe or None for a bare template)."""
    if not isinstance(conv_mode, str):
        raise PromptError(f"conv_mode must be a str, got {type(conv_mode).__name__}")
    name = ALIASES.get(conv_mode, conv_mode)
    if name in TEMPLATES:
        return TEMPLATES[name], None
    if name in RECIPES:
        r = RECIPES[name]
        return TEMPLATES[r.template], r
    raise PromptError(f"conv_mode {conv_mode!r} is unknown; choose one of {', '.join(CONV_MODES)}")


def recipe(conv_mode: str) -> Recipe | None:
    return resolve(conv_mode)[1]


class _Conv:
    """The authors' Conversation message list, built by their user_query / assistant_response rules."""

    def __init__(self, t: Template, system: str):
        self.t, self.system, self.messages = t, system, []

    def user_query(self, query: str, pre: str | None = None, post: str | None = None, is_mm: bool = False):
        if post is not None:
            query = f"{query} {post}"
        if pre is not None:
            query = f"{pre} {query}"
        user = self.t.roles[0]
        if is_mm:
            if self.t.mm_alone:
                self.messages.append((user, self.t.mm_token))
            elif self.t.mm_token not in query:
                query = f"{self.t.mm_token} {query}"
        self.messages.append((user, query))

    def assistant_response(self, text: str):
        self.messages.append((self.t.roles[1], text))

    def get_prompt(self) -> str:
        user, bot = self.t.roles
        sep = dict(zip(self.t.roles, self.t.sep))
        out = self.system + sep[user] if self.system != "" else ""
        for i, (role, msg) in enumerate(self.messages):
            if i + 1 == len(self.messages):
                out += role + msg + sep[role] + bot if role != bot else role + msg
            else:
                out += role + msg + sep[role]
        return out


def _conv(conv_mode: str, system: str | None) -> tuple[_Conv, Recipe | None]:
    t, r = resolve(conv_mode)
    if system is None:
        system = r.system if r is not None and r.system is not None else t.system
    return _Conv(t, system), r


def build_prompt(question: str, conv_mode: str = "plain", system: str | None = None, video: bool = True) -> str:
    """The full prompt for one question about the clip: a template renders user_query(question, is_mm=True), a
    recipe its script's whole prompt; conv_mode 'raw' takes `question` as the whole prompt. `system` replaces the
    template's system prompt (as ChatPllava.ask does). `video=False`: a text-only prompt, user_query(question)
    without the image token (the LLM alone answers)."""
    if not isinstance(question, str):
        raise PromptError(f"prompt must be a str, got {type(question).__name__}")
    if system is not None and not isinstance(system, str):
        raise PromptError(f"system must be a str or None, got {type(system).__name__}")
    if conv_mode == "raw":
        return question
    conv, r = _conv(conv_mode, system)
    if r is not None and r.chat_flow and video:
        return render_chat([("user", question)], conv_mode, system)
    if r is None:
        conv.user_query(question, is_mm=video)
    else:
        conv.user_query(question or r.query or "", r.pre_query, r.post_query, is_mm=video)
        if r.answer_prompt is not None:
            conv.assistant_response(r.answer_prompt)
    return conv.get_prompt()


def render_chat(turns: list[tuple[str, str]], conv_mode: str, system: str | None = None,
                demo_flow: bool | None = None, video: bool = True) -> str:
    """Chat turns [(role, text)], roles 'user' / 'assistant', ending with the user's. One user turn is one
    question (build_prompt); more render as the demo's ChatPllava: the clip its own first user message, each
    question user_query(text) (with a recipe's pre/post query prompts; the 'demo' recipes do this for one
    question too, and so does `demo_flow=True`), each answer assistant_response(text), and a recipe's answer
    prompt pre-filled after the last question. `video=False`: the same turns with no clip message at all."""
    conv, r = _conv(conv_mode, system)
    if demo_flow is None:
        demo_flow = len(turns) > 1 or (r is not None and r.chat_flow)
    if not demo_flow:
        return build_prompt(turns[0][1], conv_mode, system, video)
    if video:
        conv.user_query("", is_mm=True)  # upload_video
    pre, post = (r.pre_query, r.post_query) if r is not None else (None, None)
    for role, text in turns:
        if role == "user":
            conv.user_query(text, pre, post)
        else:
            conv.assistant_response(text)
    if r is not None and r.answer_prompt is not None:
        conv.assistant_response(r.answer_prompt)
    return conv.get_prompt()


def default_question(conv_mode: str | None) -> str:
    """The caption question for a mode: the recipe's fixed query (recaption), else single_test's question."""
    r = None if conv_mode in (None, "raw") else recipe(conv_mode)
    return r.query if r is not None and r.query else CAPTION_QUESTION


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


def build_chat_prompt(turns: list[tuple[str, str]], conv_mode: str, system: str | None = None,
                      video: bool = True) -> str:
    check_turns(turns, system)
    if conv_mode == "raw":
        raise PromptError("conv_mode 'raw' takes one full prompt string, not chat turns")
    return render_chat([tuple(t) for t in turns], conv_mode, system, video=video)


def default_conv_mode(tokenizer) -> str:
    """ChatML for tokenizers that know <|im_start|> (PLLaVA-34B / Yi: eval_vcg_llavanext, the template its demo
    and eval_yiprompt.sh use), PLLaVA's demo 'plain' otherwise."""
    return "eval_vcg_llavanext" if "<|im_start|>" in tokenizer.get_vocab() else "plain"
def check_image_token(tokenizer, image_token_index: int, where: str):
    """The tokenizer must map '<image>' to the config's image_token_index (PLLaVA issue #32)."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id or tid != image_token_index:
        raise TokenizerError(f"{where}: the tokenizer maps '{IMAGE_TOKEN}' to {tid!r} but config.json's "
                             f"'image_token_index' is {image_token_index}; the tokenizer and the model config "
                             "come from different checkpoints")


def tokenize(tokenizer, prompt: str, image_token_index: int, video: bool = True) -> tuple[torch.Tensor, int | None]:
    """Prompt text -> (input_ids (L,) int64, position of the single image token, or None for a text-only
    prompt, which must hold none)."""
    n = prompt.count(IMAGE_TOKEN)
    if not video:
        if n:
            raise PromptError(f"the prompt holds '{IMAGE_TOKEN}' but no video was given (video=None asks the LLM "
                              f"alone): {prompt[:200]!r}")
        ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
        if (ids == image_token_index).any():
            raise TokenizerError(f"the tokenized text-only prompt holds the image token (id {image_token_index})")
        return ids, None
    if n != 1:
        raise PromptError(f"the prompt must contain exactly one '{IMAGE_TOKEN}' token, found {n}: {prompt[:200]!r}")
    ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    where = (ids == image_token_index).nonzero().flatten()
    if where.numel() != 1:
        raise TokenizerError(f"the tokenized prompt holds {where.numel()} image tokens (id {image_token_index}), "
                             "expected 1")
    return ids, int(where[0])


def text_ids(ids: torch.Tensor, image_pos: int | None) -> torch.Tensor:
    """The prompt's ids without its <image> placeholder (image_pos None: a text-only prompt, as is): what stop
    strings and repetition see as the prompt's text."""
    return ids if image_pos is None else torch.cat([ids[:image_pos], ids[image_pos + 1:]])


def prefix_split(ids: torch.Tensor, image_pos: int | None, num_visual: int) -> int:
    """Where a prompt's prefill splits: the length of its video prefix (the head, then the visual tokens) when text
    follows the <image>, else 0 (a text-only prompt, or one that ends with the clip: nothing to split or reuse).
    generate() and the scheduler prefill [0, split) and [split, L) as two calls whether or not a cached prefix lets
    them skip the first, so a follow-up question gets the same bits as a fresh one: a whole prompt attends in one
    causal pass (in bf16 under bf16 weights), a continuation over the cache (in fp32 on the CPU), and under bf16 the
    two differed by up to 0.037 in the logits on the tests' checkpoint, enough to swap near-tied tokens. (Where
    pllava._C's bf16 prefill attention runs, both attend through it; the split stays for every other path, and for
    a question of <= 16 rows, which takes the fp32 decode-row path.)"""
    if image_pos is None or image_pos + 1 >= ids.numel():
        return 0
    return image_pos + num_visual


def splice(text_embeds: torch.Tensor, image_pos: int, visual: torch.Tensor) -> torch.Tensor:
    """Replace the one <image> embedding at image_pos by all visual embeddings: (L, d) -> (L - 1 + N, d)."""
    return torch.cat([text_embeds[:image_pos], visual.to(text_embeds.dtype), text_embeds[image_pos + 1:]], dim=0)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character that stands for each byte -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_bytes_table(tokenizer) -> list[bytes]:
    """The bytes of the text each token id stands for, exactly (OpenAI's logprobs `bytes`): a byte-fallback token
    '<0xE6>' is that one byte (one third of a character, which no decode of the token alone can give), a
    SentencePiece piece '▁the' is b' the' (Llama's decode of it alone drops the space), a byte-level BPE token is
    its bytes through GPT-2's alphabet, and a special / added token is its string."""
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in repr(backend.decoder)
    alphabet = _byte_level_alphabet() if byte_level else {}
    added = set(getattr(tokenizer, "get_added_vocab", dict)())
    table = [b""] * n
    for tok, i in vocab.items():
        m = _BYTE_TOKEN.fullmatch(tok)
        if m:  # before the added tokens: some vocabularies register their byte tokens as special
            table[i] = bytes([int(m.group(1), 16)])
        elif tok in added:
            table[i] = tok.encode("utf-8", "surrogatepass")
        elif byte_level and all(c in alphabet for c in tok):
            table[i] = bytes(alphabet[c] for c in tok)
        else:
            table[i] = tok.replace("\u2581", " ").encode("utf-8", "surrogatepass")
    return table
