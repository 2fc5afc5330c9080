"""The paper's two prompt forms, plain or inside a chat template.

- ``direct`` (the locked prompt p0): ``{question}\\n\\nAnswer:\\n``
- ``cot`` (the unlocked prompt p1): ``{question}\\n\\nAnswer: Let's think step by step.\\n``

With a chat template, the question is the user turn and the answer prefix ("Answer:" or
"Answer: Let's think step by step.") opens the assistant turn, so the two forms still differ
only in the text right before generation starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PromptStyle", "STYLES", "format_prompt", "format_prompts", "use_chat"]


@dataclass(frozen=True)
class PromptStyle:
    """A prompt form: the text between the question and the model's answer."""

    name: str
    answer_prefix: str  # opens the answer, e.g. "Answer:\n"

    def plain(self, question: str, instruction: str | None = None) -> str:
        head = f"{instruction.strip()}\n\n" if instruction else ""
        return f"{head}{question.strip()}\n\n{self.answer_prefix}"


STYLES: dict[str, PromptStyle] = {
    "direct": PromptStyle("direct", "Answer:\n"),
    "cot": PromptStyle("cot", "Answer: Let's think step by step.\n"),
}


def use_chat(tokenizer: Any, chat: bool | str = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template.

    ``chat`` is True, False or ``"auto"`` (use the template when the tokenizer has one).
    """
    if chat not in (True, False, "auto"):
        raise ValueError(f"chat must be True, False or 'auto', got {chat!r}")
    has = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if chat is True and not has:
        raise ValueError("chat=True but the tokenizer has no chat template")
    return has if chat == "auto" else bool(chat)


def _adds_bos(tokenizer: Any) -> str | None:
    """The BOS text the tokenizer prepends on its own, if it does."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos is None:
        return None
    ids = tokenizer("x").input_ids
    return bos if ids and ids[0] == tokenizer.bos_token_id else None


def format_prompt(
    question: str,
    style: str = "direct",
    *,
    tokenizer: Any = None,
    chat: bool | str = False,
    instruction: str | None = None,
    system: str | None = None,
) -> str:
    """One prompt in the ``direct`` or ``cot`` form (see the module doc).

    Args:
        tokenizer: needed only for the chat form.
        chat: True, False or ``"auto"`` (chat form when the tokenizer has a template).
        instruction: optional text put before the question (in the user turn for chat).
        system: optional system message for the chat form.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    st = STYLES[style]
    if not use_chat(tokenizer, chat):
        return st.plain(question, instruction)
    user = f"{instruction.strip()}\n\n{question.strip()}" if instruction else question.strip()
    messages = [{"role": "user", "content": user}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = _adds_bos(tokenizer)
    if bos and text.startswith(bos):  # the tokenizer adds it again when encoding
        text = text[len(bos) :]
    return text + st.answer_prefix


def format_prompts(
    questions: Sequence[str],
    style: str = "direct",
    *,
    tokenizer: Any = None,
    chat: bool | str = False,
    instruction: str | None = None,
    system: str | None = None,
) -> list[str]:
    """:func:`format_prompt` over a list of questions."""
    return [
        format_prompt(
            q, style, tokenizer=tokenizer, chat=chat, instruction=instruction, system=system
        )
        for q in questions
    ]
