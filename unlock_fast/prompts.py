"""The paper's two prompt forms of a question, plain or inside a chat template.

``direct`` (the locked prompt p0) ends the question with "Answer:"; ``cot`` (the unlocked
prompt p1) with "Answer: Let's think step by step.". In a chat template the question is the
user turn and the answer prefix opens the assistant turn, so the two forms still differ only
in the text right before generation starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["STYLES", "format_prompts", "use_chat"]

# The text between the question and the model's answer, per prompt form.
STYLES = {"direct": "Answer:\n", "cot": "Answer: Let's think step by step.\n"}


def use_chat(tokenizer: Any, chat: bool | str = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template: True, False, or ``"auto"``
    (when the tokenizer has one)."""
    if chat not in (True, False, "auto"):
        raise ValueError(f"chat must be True, False or 'auto', got {chat!r}")
    has = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if chat is True and not has:
        raise ValueError("chat=True but the tokenizer has no chat template")
    return has if chat == "auto" else bool(chat)


def format_prompts(
    questions: Sequence[str],
    style: str = "direct",
    *,
    tokenizer: Any = None,
    chat: bool | str = False,
    instruction: str | None = None,
    system: str | None = None,
) -> list[str]:
    """The questions in the ``direct`` or ``cot`` form (module doc). ``tokenizer`` is needed
    for the chat form only; ``instruction`` goes before the question (in the user turn),
    ``system`` is the chat form's system message."""
    if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
        raise TypeError("questions must be a list of str")
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    prefix, chat_form = STYLES[style], use_chat(tokenizer, chat)
    bos = getattr(tokenizer, "bos_token", None) if chat_form else None
    if bos is not None and tokenizer("x").input_ids[:1] != [tokenizer.bos_token_id]:
        bos = None  # the tokenizer does not prepend it on its own
    out = []
    for q in questions:
        user = f"{instruction.strip()}\n\n{q.strip()}" if instruction else q.strip()
        if not chat_form:
            out.append(f"{user}\n\n{prefix}")
            continue
        messages = [{"role": "user", "content": user}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if bos and text.startswith(bos):  # the tokenizer adds it again when encoding
            text = text[len(bos) :]
        out.append(text + prefix)
    return out
