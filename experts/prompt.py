"""Prompt assembly: an instruction, an image and the enabled experts → the exact text the model reads."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

from llama_adapter.images import DEFAULT_MAX_PIXELS, ImageInput, open_image
from llama_adapter.prompts import Message, Template, render

from .base import (
    DEFAULT_CACHE,
    ExpertCache,
    ExpertReport,
    ExpertResult,
    ExpertSpec,
    Registry,
    resolve_experts,
    run_experts,
)

if TYPE_CHECKING:
    from llama_adapter import Pipeline
    from llama_adapter.tokenizer import Tokenizer


class BuiltPrompt(NamedTuple):
    """``messages`` for ``Pipeline.generate``, the exact ``text`` they render to, and the expert ``report``."""

    messages: list[Message]
    text: str
    report: ExpertReport


def build_prompt(
    instruction: str,
    image: ImageInput | None,
    experts: ExpertSpec = (),
    *,
    pipeline: Pipeline | None = None,
    template: Template | None = None,
    tokenizer: Tokenizer | None = None,
    history: Sequence[Message] = (),
    registry: Registry | None = None,
    timeout_s: float | None = None,
    cache: ExpertCache | None = DEFAULT_CACHE,
) -> BuiltPrompt:
    """Run the enabled ``experts`` on ``image`` and build the prompt for ``instruction``.

    Expert text becomes the user message's ``context``: the Alpaca ``### Input:`` block, or the
    marked ``[Image context]`` block of a chat template. The template is the pipeline's, else
    ``template`` (default ``"alpaca"``; ``"chat"`` needs ``tokenizer``). ``history`` holds earlier
    messages (system, user, assistant) of a conversation. Experts that fail, time out or are
    unavailable are left out of the prompt and listed in ``report.skipped``; an unreadable
    ``image`` raises :class:`llama_adapter.InputError`.
    """
    if image is None:
        report = _no_image_report(experts, registry)
    else:
        max_pixels = pipeline.max_image_pixels if pipeline is not None else DEFAULT_MAX_PIXELS
        picture = open_image(image, max_pixels=max_pixels)
        report = run_experts(picture, experts, registry=registry, timeout_s=timeout_s, cache=cache)
    return assemble(instruction, report, pipeline=pipeline, template=template, tokenizer=tokenizer, history=history)


def assemble(
    instruction: str,
    report: ExpertReport,
    *,
    pipeline: Pipeline | None = None,
    template: Template | None = None,
    tokenizer: Tokenizer | None = None,
    history: Sequence[Message] = (),
) -> BuiltPrompt:
    """The prompt for ``instruction`` with the text of an existing expert ``report``."""
    user: Message = {"role": "user", "content": instruction}
    if report.context:
        user["context"] = report.context
    messages = [dict(m) for m in history] + [user]
    if pipeline is not None:
        text = pipeline.render(messages)
    else:
        text = render(messages, template or "alpaca", tokenizer)
    return BuiltPrompt(messages, text, report)


def _no_image_report(experts: ExpertSpec, registry: Registry | None) -> ExpertReport:
    if not experts:
        return ExpertReport()
    return ExpertReport(
        [
            ExpertResult(e.name, e.label, e.context_label, "unavailable", reason="no image to describe")
            for e in resolve_experts(experts, registry)
        ]
    )
