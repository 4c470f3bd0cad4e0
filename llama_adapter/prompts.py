"""Prompt templates: the official Alpaca format and the base model's own chat template.

Messages are ``{"role": "system"|"user"|"assistant", "content": str}`` dicts. A user message
may carry ``"context"``: text from image experts (caption, OCR). It goes into the Alpaca
``### Input:`` block, or into a marked block ahead of the question in a chat template.
"""

from __future__ import annotations

import re
from typing import Literal, Union

from .errors import InputError
from .tokenizer import Tokenizer

Template = Literal["alpaca", "chat"]
Message = dict
Prompt = Union[str, list[Message]]

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
CONTEXT_BLOCK = "[Image context]\n{context}\n[End of image context]\n\n{content}"
ALPACA_STOP = ("### Instruction:", "\n### ")


def format_alpaca(instruction: str, input: str | None = None) -> str:
    """The official LLaMA-Adapter prompt (``input is None`` selects the short form, as upstream)."""
    if input is None:
        return ALPACA.format(instruction=instruction)
    return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)


# C0/C1 control characters other than tab and newline, and lone surrogates: they mean nothing to
# the model, and a lone surrogate cannot even be encoded to UTF-8 for the tokenizer.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_LINE_BREAK = re.compile(r"\r\n?")


def clean_text(text: str) -> str:
    """``text`` as the model reads it: line breaks as ``\\n``, control characters and lone surrogates
    dropped. Letters of every script, emoji and format characters (joiners, direction marks) stay."""
    return _UNPRINTABLE.sub("", _LINE_BREAK.sub("\n", text))


def as_messages(prompt: Prompt) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)):
        raise InputError(f"The prompt must be text or a list of messages; got {type(prompt).__name__}")
    return list(prompt)


def with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """``messages`` with ``system_prompt`` in front, unless they already hold a system message."""
    if not system_prompt or any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def validate_messages(messages: list[Message]) -> None:
    """A conversation ready to answer: well-formed messages, the last a non-empty user message."""
    if not messages:
        raise InputError("The conversation is empty: write a message first.")
    validate_history(messages)
    if messages[-1]["role"] != "user":
        raise InputError("The last message must be from the user.")
    if not clean_text(messages[-1]["content"]).strip():
        raise InputError("The message is empty: type a question or instruction.")


def validate_history(messages: list[Message]) -> None:
    """Each message a dict with a known role and text content (and text context, if any)."""
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"The history must be a list of messages; got {type(messages).__name__}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"Each message needs a role of system, user or assistant; got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise InputError(f"Message content must be text; got {type(m.get('content')).__name__}")
        if m.get("context") is not None and not isinstance(m["context"], str):
            raise InputError(f"Message context must be text; got {type(m['context']).__name__}")


def prompt_chars(messages: list[Message]) -> int:
    """Characters of a conversation's text (contents and expert contexts), template not counted."""
    return sum(len(m["content"]) + len(m.get("context") or "") for m in messages)


def render(messages: list[Message], template: Template, tokenizer: Tokenizer | None = None) -> str:
    """The exact text the model sees for a conversation, ending where the answer begins."""
    validate_messages(messages)
    return render_checked(messages, template, tokenizer)


def render_checked(messages: list[Message], template: Template, tokenizer: Tokenizer | None = None) -> str:
    """:func:`render` for messages that passed :func:`validate_messages` where they came in."""
    messages = [
        {
            **m,
            "content": clean_text(m["content"]),
            **({"context": clean_text(m["context"])} if m.get("context") else {}),
        }
        for m in messages
    ]
    if template == "alpaca":
        return _render_alpaca(messages)
    if template == "chat":
        if tokenizer is None:
            raise ValueError("the chat template needs the tokenizer")
        plain = [
            {"role": m["role"], "content": CONTEXT_BLOCK.format(context=m["context"], content=m["content"])}
            if m.get("context")
            else {"role": m["role"], "content": m["content"]}
            for m in messages
        ]
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True)
        if text is None:
            raise ValueError("this tokenizer has no chat template; use template='alpaca'")
        return text
    raise ValueError(f"Unknown template {template!r}; use 'alpaca' or 'chat'")


def _render_alpaca(messages: list[Message]) -> str:
    """Alpaca turns; a system message, if any, replaces the first line of the first turn."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    parts: list[str] = []
    for m in messages:
        if m["role"] == "user":
            turn = format_alpaca(m["content"], m.get("context"))
            if parts:
                turn = turn[turn.index("### Instruction:") :]
            elif system:
                turn = system.strip() + turn[turn.index("\n\n") :]
            parts.append(turn)
        elif m["role"] == "assistant" and parts:
            parts[-1] += m["content"]
    return "\n\n".join(parts)


def stop_strings(template: Template) -> tuple[str, ...]:
    """Text that ends an answer beyond the tokenizer's end tokens."""
    return ALPACA_STOP if template == "alpaca" else ()
