"""A conversation about one clip, as the PLLaVA demo's ChatPllava holds it.

`upload_video` makes the clip its own first user message; each `ask` adds the question, renders the whole
conversation with get_prompt's rules (prompt.render_chat with demo_flow=True, so even the first question has the
clip in its own message, as in the demo) and appends the answer to the history. The clip's KV (everything up to
the end of the video message) is the same prompt head every turn, so follow-ups reuse it through the engine's
prefix cache (a path or bytes clip) instead of decoding and encoding the video again.
"""
from __future__ import annotations

from .errors import PromptError
from .prompt import check_turns, default_conv_mode, render_chat, resolve


class Chat:
    """`engine.chat(video, conv_mode=None, system=None, history=None, **generate_kw)`; `ask(question, **kw)`.

    conv_mode None is the demo: its template (plain; eval_vcg_llavanext for ChatML tokenizers, as the demo
    script suggests for 34B) with its system textbox (`prompt.DEMO_SYSTEM`). Any template or recipe name works;
    `system` replaces the template's system prompt as ChatPllava.ask does. The history holds the answers as the
    engine decoded them (ChatPllava also rstrips the characters of the closing separator, which eats a
    trailing 's' of '</s>'; that is not copied)."""

    def __init__(self, engine, video, conv_mode: str | None = None, system: str | None = None,
                 history=None, **generate_kw):
        if conv_mode is None:
            conv_mode = "demo_llavanext" if default_conv_mode(engine.tokenizer) != "plain" else "demo"
        resolve(conv_mode)  # unknown names fail here
        if conv_mode == "raw":
            raise PromptError("a chat needs a template or recipe name, not conv_mode 'raw'")
        self.engine, self.video, self.conv_mode, self.system = engine, video, conv_mode, system
        self.history: list[tuple[str, str]] = []
        if history:
            check_turns(list(history) + [("user", "")], system)
            self.history = [tuple(t) for t in history]
        self.generate_kw = generate_kw

    def prompt(self, question: str) -> str:
        """The full prompt the next ask(question) sends."""
        turns = self.history + [("user", question)]
        check_turns(turns, self.system)
        return render_chat(turns, self.conv_mode, self.system, demo_flow=True)

    def ask(self, question: str, **kw):
        """Answer `question` about the clip; the question and the answer join the history. Returns the
        GenerationOutput; keywords are generate()'s and override the chat's."""
        text = self.prompt(question)
        out = self.engine.generate(self.video, text, conv_mode="raw", **{**self.generate_kw, **kw})
        self.history += [("user", question), ("assistant", out.text)]
        return out

    def reset(self):
        self.history = []
