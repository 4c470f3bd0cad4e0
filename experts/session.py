"""Conversations with images and experts: :class:`MultimodalChat` (multi-turn, an image in any turn)
and :func:`describe` (one shot).

Both record what the model saw: the exact prompt text and the expert report. The image reaches the
model only if the pipeline has an image encoder; a text-only model sees it solely through the experts::

    chat = MultimodalChat(pipe)
    chat.ask("Hi! Can you help me read a receipt?")
    answer = "".join(chat.stream("What is the total?", images=["receipt.png"], experts=["ocr"]))
    chat.last_turn.experts.texts, chat.last_turn.prompt   # what OCR read, the exact prompt
    chat.ask("And the date?", experts=["ocr"])      # same image: OCR's text is in the conversation already
    chat.ask("What shape is this?", images=["circle.png"])   # a new image from here on; the text stays
    chat.explain().save("out/")                     # what the last answer drew on (llama_adapter.explain)
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from PIL import Image

from llama_adapter.errors import InputError
from llama_adapter.explain import Trace, explain
from llama_adapter.images import ImageInput, open_image
from llama_adapter.pipeline import ChatSession
from llama_adapter.prompts import Message, validate_messages

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
from .prompt import _no_image_report, build_prompt

if TYPE_CHECKING:
    from llama_adapter import Pipeline


@dataclass
class Description:
    """One answer about one image: what the model said, the exact text it read, what the experts said,
    and how long the answer took (the experts' own timings are in ``report``)."""

    instruction: str
    answer: str
    prompt: str
    report: ExpertReport
    seconds: float
    image_to_model: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "answer": self.answer,
            "prompt": self.prompt,
            "experts": [asdict(r) for r in self.report],
            "seconds": self.seconds,
            "image_to_model": self.image_to_model,
        }


def describe(
    pipeline: Pipeline,
    image: ImageInput,
    instruction: str,
    experts: ExpertSpec = (),
    *,
    registry: Registry | None = None,
    timeout_s: float | None = None,
    cache: ExpertCache | None = DEFAULT_CACHE,
    **sampling: Any,
) -> Description:
    """Answer ``instruction`` about ``image`` once, with the text of the enabled ``experts`` in the prompt.

    Skipped experts are reported, never raised; an unreadable image or an empty instruction raises
    :class:`llama_adapter.InputError` before any expert runs.
    """
    picture = open_image(image, max_pixels=pipeline.max_image_pixels)
    _check_question(instruction)
    built = build_prompt(
        instruction, picture, experts, pipeline=pipeline, registry=registry, timeout_s=timeout_s, cache=cache
    )
    to_model = picture if pipeline.accepts_images else None
    started = time.perf_counter()
    answer = pipeline.generate(built.messages, image=to_model, **sampling)
    return Description(
        instruction, answer, built.text, built.report, time.perf_counter() - started, to_model is not None
    )


@dataclass
class Turn:
    """One question of a :class:`MultimodalChat` and how it was answered."""

    question: str
    attached: list[ImageInput]
    """The images the message carried, as given. The model takes one image per turn: the last."""
    image: Image.Image | None
    """The image this turn is about: the one it brought, or the conversation's latest (``None``: none yet)."""
    experts: ExpertReport
    """The experts run for this turn (on :attr:`image`): their text is this turn's context."""
    earlier: list[ExpertResult] = field(default_factory=list)
    """Chosen experts that read :attr:`image` in an earlier turn: their text is in the conversation already."""
    prompt: str = ""
    """The exact text the model read, up to this question."""
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    """Of the prompt's tokens, those computed for this turn (the others came from the KV cache)."""
    seconds: float = 0.0
    """Writing the answer."""

    @property
    def new_image(self) -> bool:
        return bool(self.attached)

    @property
    def unused(self) -> list[ImageInput]:
        """Images the message carried besides the one used."""
        return self.attached[:-1]


class MultimodalChat:
    """A conversation in which any message may bring an image, with experts chosen turn by turn.

    Wraps a :class:`llama_adapter.ChatSession`: a new image opens a visual context (the model reads
    the turns asked with no image and those about the image in view; turns about earlier images
    stay in the conversation, unread), and the KV cache carries over between the text turns about
    one image. The chosen experts read each new
    image once: in the turn that brings it, or in the first later turn they are chosen in; their
    text is that turn's context, and stays in the conversation. Each user message keeps its
    :class:`Turn` (``turns``), so undo, retry and edit keep the record straight.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        system: str | None = None,
        history: Sequence[Message] = (),
        registry: Registry | None = None,
        timeout_s: float | None = None,
        cache: ExpertCache | None = DEFAULT_CACHE,
    ) -> None:
        """``history``: earlier messages (``{"role", "content"}``; a user message may carry an
        ``"image"``) to continue from. A bad image in it raises :class:`llama_adapter.InputError`."""
        self.pipeline = pipeline
        self.registry = registry
        self.timeout_s = timeout_s
        self.cache = cache
        self.session: ChatSession = ChatSession(pipeline, system=system, history=history, keep_unseen_images=True)
        previous = None
        for m in self.session.messages:
            if m["role"] == "user":
                image = m.get("image")
                brought = [image] if image is not None and image is not previous else []
                m["record"] = Turn(m["content"], brought, image, ExpertReport())
                previous = image

    @property
    def messages(self) -> list[Message]:
        """The conversation (system, user, assistant). A user message may carry its ``"image"``, its
        expert ``"context"``, and its :class:`Turn` as ``"record"``."""
        return self.session.messages

    @property
    def turns(self) -> list[Turn]:
        return [m["record"] for m in self.session.messages if m["role"] == "user"]

    @property
    def last_turn(self) -> Turn | None:
        """The latest turn, also while its answer is written (from its first piece on)."""
        turns = self.turns
        return turns[-1] if turns else None

    @property
    def image(self) -> Image.Image | None:
        """The image the conversation is about now (the latest one a turn brought)."""
        return self.session.image

    @property
    def image_to_model(self) -> bool:
        """Whether the model itself sees :attr:`image` (else only the experts' text describes it)."""
        return self.session.image_to_model

    def stream(
        self,
        question: str,
        images: ImageInput | Sequence[ImageInput] = (),
        experts: ExpertSpec = (),
        *,
        cancel: threading.Event | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Ask ``question``, bringing ``images`` (the model takes the last one), with the text of
        ``experts`` about the image in view, and yield the answer in pieces. The answer, even a
        cancelled one, is kept. A bad question or image raises :class:`llama_adapter.InputError`
        before any expert runs, and the conversation is as it was."""
        attached = [images] if isinstance(images, (str, bytes, os.PathLike, Image.Image)) else list(images)
        _check_question(question)
        self.session.set_image(attached[-1] if attached else None)  # read and checked now
        return self._answer(question, attached, experts, cancel, sampling)

    def _answer(
        self,
        question: str,
        attached: list[ImageInput],
        experts: ExpertSpec,
        cancel: threading.Event | None,
        sampling: dict[str, Any],
    ) -> Iterator[str]:
        """The turn of ``question``, whose image (if it brings one) is the session's pending image."""
        picture = self.session.pending_image
        image = picture or self.image
        try:
            if picture is not None and not self.pipeline.accepts_images and not experts:
                raise InputError(
                    "This model has no image encoder, so it cannot see pictures itself. Turn on OCR or Caption: "
                    "their text about the image is what it will read."
                )
            earlier = self._earlier_results(image, experts) if image is not None else []
            to_run = [e for e in resolve_experts(experts, self.registry) if e.name not in {r.name for r in earlier}]
        except BaseException:
            self.session.set_image(None)
            raise
        if image is None:
            report = _no_image_report(to_run, self.registry)
        else:
            report = run_experts(image, to_run, registry=self.registry, timeout_s=self.timeout_s, cache=self.cache)
        turn = Turn(question, attached, image, report, earlier)
        started = time.perf_counter()
        pieces = self.session.stream(question, context=report.context, record=turn, cancel=cancel, **sampling)
        try:
            for piece in pieces:
                self._record(turn, started)
                yield piece
        finally:
            # Closed early (a stop), the session must still write the partial answer into the history.
            pieces.close()
        self._record(turn, started)  # an empty answer yields no piece

    def ask(
        self, question: str, images: ImageInput | Sequence[ImageInput] = (), experts: ExpertSpec = (), **sampling: Any
    ) -> str:
        return "".join(self.stream(question, images, experts, **sampling))

    def retry(
        self, experts: ExpertSpec = (), *, cancel: threading.Event | None = None, **sampling: Any
    ) -> Iterator[str]:
        """Answer the last question again (its images, the experts chosen now) in place of its answer."""
        return self.edit(None, experts, cancel=cancel, **sampling)

    def edit(
        self,
        question: str | None,
        experts: ExpertSpec = (),
        *,
        turn: int = -1,
        cancel: threading.Event | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Ask ``turn`` (default: the last) again as ``question`` (``None``: unchanged), with its
        images; the turns after it are dropped. If the new answer cannot be written (a refusal, a
        failure), the conversation is as it was."""
        turns = self.turns
        if not turns:
            raise InputError("There is no question to answer again yet.")
        old = turns[turn]
        question = old.question if question is None else question
        _check_question(question)
        start = [i for i, m in enumerate(self.messages) if m["role"] == "user"][turns.index(old)]
        removed = self.messages[start:]
        del self.messages[start:]
        before = list(self.messages)
        self.session.set_image(old.image if old.new_image else None)  # the same object: its cache is reused
        pieces = self._answer(question, old.attached, experts, cancel, sampling)
        try:
            yield from pieces
        except BaseException:
            if len(self.messages) == len(before) and all(a is b for a, b in zip(self.messages, before)):
                self.messages.extend(removed)  # refused or failed: the conversation is as it was
            raise
        finally:
            pieces.close()

    def undo(self) -> Turn | None:
        """Drop the last question and its answer (an image it brought leaves view); returns its turn."""
        dropped = self.session.undo()
        return dropped["record"] if dropped is not None else None

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.session.reset()

    def set_system(self, system: str | None) -> None:
        self.session.set_system(system)

    def explain(self, turn: int = -1) -> Trace:
        """What the answer to ``turn`` (default: the last) drew on (:func:`llama_adapter.explain`):
        traced in one forward pass over what the model read for it and the answer it gave, so the
        answer itself paid nothing. Raises :class:`llama_adapter.InputError` when there is no answer."""
        turns = self.turns
        if not turns:
            raise InputError("There is no answer to look inside yet: ask something first.")
        record = turns[turn]
        messages = self.messages
        asked = next(i for i, m in enumerate(messages) if m.get("record") is record)
        answer = messages[asked + 1]["content"] if asked + 1 < len(messages) else ""
        if not answer.strip():
            raise InputError("This question has no answer to look inside.")
        image = record.image if self.pipeline.accepts_images else None
        return explain(self.pipeline, self.session.read(messages[: asked + 1]), image, answer=answer)

    def _earlier_results(self, image: Image.Image, experts: ExpertSpec) -> list[ExpertResult]:
        """Results of the chosen ``experts`` on ``image`` whose text is in the conversation already."""
        chosen = {e.name for e in resolve_experts(experts, self.registry)} if experts else set()
        found: dict[str, ExpertResult] = {}
        for turn in self.turns:
            if turn.image is not image:
                continue
            for r in turn.experts:
                if r.name in chosen and r.status == "ok":
                    found.setdefault(r.name, r)
        return list(found.values())

    def _record(self, turn: Turn, started: float) -> None:
        if not turn.prompt:
            # The session may have dropped old turns to fit the context: render what it kept, up to
            # the question just asked.
            messages = self.session.messages
            asked = next(i for i, m in enumerate(messages) if m.get("record") is turn)
            turn.prompt = self.pipeline.render(self.session.read(messages[: asked + 1]), limit=False)
            turn.prompt_tokens = len(self.pipeline.encode(turn.prompt))
            turn.prefill_tokens = self.session.last_prefill_tokens
        turn.seconds = time.perf_counter() - started


def _check_question(question: str) -> None:
    """Refuse an empty question before the experts spend seconds on the image."""
    validate_messages([{"role": "user", "content": question}])
