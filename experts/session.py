"""Conversations about one image with experts: :class:`ImageChat` (multi-turn) and :func:`describe` (one shot).

Both record what the model saw: the exact prompt text and the expert report. The image reaches the
model only if the pipeline has an image encoder; a text-only model sees it solely through the experts::

    chat = ImageChat(pipe, "receipt.png")
    answer = "".join(chat.stream("What is the total?", experts=["ocr"]))
    chat.last_prompt, chat.last_report.texts
    chat.ask("And the date?", experts=["ocr"])       # OCR comes from the cache, the KV cache is reused
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator

from PIL import Image

from llama_adapter.errors import GenerationError, InputError
from llama_adapter.images import ImageInput, open_image
from llama_adapter.prompts import Message, validate_messages

from .base import DEFAULT_CACHE, ExpertCache, ExpertReport, ExpertSpec, Registry, run_experts
from .prompt import build_prompt

if TYPE_CHECKING:
    from llama_adapter import ChatSession, Pipeline


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


class ImageChat:
    """A multi-turn conversation about one image, with experts chosen turn by turn.

    Wraps a :class:`llama_adapter.ChatSession`, so the KV cache carries over between turns. Each
    turn runs the chosen experts (cached per image) and gives their text to that turn as context.
    After a turn, ``last_prompt`` is the exact text the model read and ``last_report`` what the
    experts said.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        image: ImageInput | None = None,
        *,
        system: str | None = None,
        registry: Registry | None = None,
        timeout_s: float | None = None,
        cache: ExpertCache | None = DEFAULT_CACHE,
    ) -> None:
        self.pipeline = pipeline
        self.registry = registry
        self.timeout_s = timeout_s
        self.cache = cache
        self.session: ChatSession = pipeline.chat(system=system)
        self.image: Image.Image | None = None
        self.last_prompt: str | None = None
        self.last_report: ExpertReport | None = None
        self.set_image(image)

    @property
    def messages(self) -> list[Message]:
        """The conversation (system, user, assistant); a user message may carry its expert ``context``."""
        return self.session.messages

    @property
    def image_to_model(self) -> bool:
        """Whether the model itself sees the image (else only the experts' text describes it)."""
        return self.image is not None and self.pipeline.accepts_images

    def set_image(self, image: ImageInput | None) -> None:
        """Talk about another image (or none): the conversation starts over. An unreadable image
        raises :class:`llama_adapter.InputError` and leaves the conversation as it was."""
        picture = open_image(image, max_pixels=self.pipeline.max_image_pixels) if image is not None else None
        self.session.set_image(picture if self.pipeline.accepts_images else None)
        self.image = picture
        self.reset()

    def stream(
        self,
        question: str,
        experts: ExpertSpec = (),
        *,
        cancel: threading.Event | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Ask ``question`` with the text of ``experts`` and yield the answer in pieces. The answer,
        even a cancelled one, is kept in ``messages``."""
        if self.image is None:
            raise InputError("There is no image yet: upload, paste or photograph one first.")
        _check_question(question)
        report = run_experts(self.image, experts, registry=self.registry, timeout_s=self.timeout_s, cache=self.cache)
        self.last_report, self.last_prompt = report, None
        pieces = self.session.stream(question, context=report.context, cancel=cancel, **sampling)
        try:
            for piece in pieces:
                self._record_prompt()
                yield piece
        except GenerationError:
            self.last_prompt = self.last_report = None  # the session took the question back
            raise
        finally:
            # Closed early (a stop), the session must still write the partial answer into the history.
            pieces.close()
        self._record_prompt()  # an empty answer yields no piece

    def ask(self, question: str, experts: ExpertSpec = (), **sampling: Any) -> str:
        return "".join(self.stream(question, experts, **sampling))

    def undo(self) -> None:
        """Drop the last question and its answer."""
        self.session.undo()
        self.last_prompt = self.last_report = None

    def reset(self) -> None:
        """Forget the conversation (the system prompt and the image stay)."""
        self.session.messages[:] = [m for m in self.session.messages if m["role"] == "system"]
        self.session.reset_cache()
        self.last_prompt = self.last_report = None

    def _record_prompt(self) -> None:
        if self.last_prompt is None:
            # The session may have dropped old turns to fit the context: render what it kept, up to
            # the question just asked.
            messages = self.session.messages
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            self.last_prompt = self.pipeline.render(messages[: last_user + 1])


def _check_question(question: str) -> None:
    """Refuse an empty question before the experts spend seconds on the image."""
    validate_messages([{"role": "user", "content": question}])
