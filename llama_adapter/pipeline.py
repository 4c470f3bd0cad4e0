"""Serving a loaded model: :class:`Pipeline` (prompt → answer: generation, streaming, batches)
and :class:`ChatSession` (a conversation that keeps its KV cache). Models are built in
:mod:`llama_adapter.build` (``llama_adapter.load``)."""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from .engine import Engine, EngineConfig, Kept, Request, openmp_threads
from .errors import GenerationError, InputError
from .generate import Sampling
from .images import DEFAULT_MAX_PIXELS, ImageInput, image_to_tensor, open_image
from .model import LlamaAdapter, Recorder
from .prompts import (
    Message,
    Prompt,
    Template,
    as_messages,
    prompt_chars,
    render_checked,
    stop_strings,
    validate_history,
    validate_messages,
    with_system,
)
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

VISUAL_PROMPTS_KEPT = 32
"""Visual prompts a :class:`Pipeline` keeps, by image (23 kB each for the demo model)."""
OPENINGS_KEPT = 32
"""Prompt openings (their tokens) a :class:`Pipeline` keeps, by system prompt."""


@dataclass
class Limits:
    """What one request may ask of a :class:`Pipeline`; beyond these it gets an :class:`InputError`
    saying the limit. The model's context length bounds prompt and answer tokens on top of these."""

    max_image_pixels: int = DEFAULT_MAX_PIXELS
    """Width × height of an image, checked from its header before decoding."""
    max_prompt_chars: int = 50_000
    """Characters of a prompt (every message and expert context), checked before tokenising."""
    max_new_tokens: int | None = None
    """Largest ``max_new_tokens`` a request may ask for; ``None``: only the context bounds it."""


@dataclass
class Pipeline:
    """A loaded model ready to answer: ``generate``, ``stream``, ``generate_batch``, ``chat``.

    Every answer is written by one :class:`~llama_adapter.engine.Engine`, which decodes all the
    requests under way together (started on first use; :meth:`start_engine` to choose its batch
    size and queue). Calls from several threads at once are batched."""

    model: LlamaAdapter
    tokenizer: Tokenizer
    template: Template = "chat"
    info: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None  # used when a conversation has no system message
    limits: Limits = field(default_factory=Limits)
    _engine: Engine | None = field(default=None, init=False, repr=False, compare=False)
    _engine_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _visual_prompts: Kept = field(default_factory=Kept, init=False, repr=False, compare=False)
    _openings: Kept = field(default_factory=Kept, init=False, repr=False, compare=False)

    @property
    def max_image_pixels(self) -> int:
        return self.limits.max_image_pixels

    @property
    def running(self) -> int:
        """Generations under way now (waiting or decoding): neither finished, stopped, failed nor closed."""
        return self._engine.running if self._engine is not None else 0

    @property
    def engine(self) -> Engine:
        """The scheduler that writes every answer; started with the default settings on first use."""
        with self._engine_lock:
            if self._engine is None:
                self._start_engine(EngineConfig())
            return self._engine

    def start_engine(self, config: EngineConfig) -> Engine:
        """Start the engine with ``config`` (how many requests decode together, how many may wait),
        replacing the running one, whose requests end as cancelled."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.close()
            return self._start_engine(config)

    def _start_engine(self, config: EngineConfig) -> Engine:
        self._engine = Engine(self.model, self.tokenizer, config)
        # The engine's thread holds the model: a pipeline that is dropped stops it, and frees both.
        # At exit too, and joined: a thread still in torch while the interpreter tears down aborts it.
        weakref.finalize(self, self._engine.close)
        return self._engine

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def accepts_images(self) -> bool:
        return self.model.adapter_config.image_encoder is not None and self.model.image_encoder is not None

    @property
    def context_length(self) -> int:
        return self.model.config.max_seq_len

    # -- prompts and images ------------------------------------------------------------------------

    def render(self, prompt: Prompt, *, limit: bool = True) -> str:
        """The exact text the model reads for ``prompt`` (a string or a list of messages), checked
        by :meth:`check_length`. ``limit=False`` skips the check, for a conversation whose messages
        were checked as they came in (a :class:`ChatSession`'s)."""
        messages = with_system(as_messages(prompt), self.system_prompt)
        if limit:
            self.check_length(messages)
        return render_checked(messages, self.template, self.tokenizer)

    def check_length(self, messages: list[Message]) -> None:
        """Refuse a conversation longer than ``limits.max_prompt_chars`` before it is tokenised."""
        validate_messages(messages)
        chars = prompt_chars(messages)
        if chars > self.limits.max_prompt_chars:
            raise InputError(
                f"The prompt is {chars:,} characters; the limit is {self.limits.max_prompt_chars:,} (this model "
                f"reads at most {self.context_length:,} tokens). Shorten it."
            )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=self.template == "alpaca")

    def visual_prompt(self, image: ImageInput | None, record: Recorder | None = None) -> torch.Tensor | None:
        """The visual prompt of one image ([1, prompt_len, dim]), or ``None`` without an image. The
        last :data:`VISUAL_PROMPTS_KEPT` are kept: a pipeline serves fixed weights."""
        if image is None:
            return None
        if not self.accepts_images:
            raise InputError("This model has no image encoder: it answers text only. Load a visual adapter.")
        pixels = image_to_tensor(
            open_image(image, max_pixels=self.max_image_pixels),
            self.model.adapter_config.image_encoder,
            self.model.adapter_config.channel_order,
        )
        # Kept by the encoder's input pixels: another question about the same image (an API client
        # sends it again with every turn, a comparison asks twice) skips the encoder. A ``record``
        # wants to see inside the visual blocks, so it always runs them.
        key = hashlib.sha256(pixels.numpy().tobytes()).hexdigest() if record is None else None
        kept = self._visual_prompts.get(key) if key else None
        if kept is not None:
            return kept
        encoder_dtype = next(self.model.image_encoder.parameters()).dtype
        # While the engine computes, a second OpenMP thread here would spin on its cores.
        with torch.inference_mode(), openmp_threads(1 if self.running else torch.get_num_threads()):
            prompt = self.model.encode_image(pixels.unsqueeze(0).to(self.device, encoder_dtype), record=record)
        if key:
            self._visual_prompts.put(key, prompt, VISUAL_PROMPTS_KEPT)
        return prompt

    def shared_opening(self, prompt: Prompt, ids: list[int]) -> int:
        """How many of ``ids`` (``prompt``'s tokens) come before its first user message's text:
        the system prompt and the template's opening, the same for every fresh conversation with
        that system prompt. The engine prefills them on their own and keeps their keys and values
        (``prefix`` of :meth:`Engine.submit`)."""
        system = [m for m in with_system(as_messages(prompt), self.system_prompt) if m["role"] == "system"]
        key = tuple(m["content"] for m in system)
        opening = self._openings.get(key)
        if opening is None:
            # The tokens two conversations differing only in their user's text share.
            a, b = (
                self.encode(render_checked([*system, {"role": "user", "content": text}], self.template, self.tokenizer))
                for text in ("a", "b")
            )
            opening = a[: _common_prefix(a, b)]
            self._openings.put(key, opening, OPENINGS_KEPT)
        return min(_common_prefix(ids, opening), len(ids) - 1)

    def _prompt_ids(self, prompt: Prompt, params: Sampling) -> tuple[list[int], int, Sampling]:
        """``prompt``'s tokens, how many of them open it as they open others (see
        :meth:`shared_opening`), and ``params`` fitted to the context."""
        ids = self.encode(self.render(prompt))
        return ids, self.shared_opening(prompt, ids), self.fit_to_context(len(ids), params)

    def fit_to_context(self, n_prompt: int, params: Sampling) -> Sampling:
        """Refuse a prompt of ``n_prompt`` tokens that fills the context; otherwise ``params`` with
        ``max_new_tokens`` cut to the room left."""
        room = self.context_length - n_prompt
        if room < 1:
            raise InputError(
                f"The prompt is {n_prompt:,} tokens; this model reads at most {self.context_length:,}. Shorten it."
            )
        if params.max_new_tokens > room:
            params = Sampling(**{**params.__dict__, "max_new_tokens": room})
        return params

    def sampling_params(self, **kwargs: Any) -> Sampling:
        """The :class:`Sampling` of one request's keyword arguments, checked against the limits,
        with the template's stop strings added."""
        cap = self.limits.max_new_tokens
        if cap is not None and kwargs.get("max_new_tokens") is None:  # the default answer length fits the cap
            kwargs = {**kwargs, "max_new_tokens": min(Sampling.max_new_tokens, cap)}
        params = Sampling.from_kwargs(**kwargs)
        if cap is not None and params.max_new_tokens > cap:
            raise InputError(f"max_new_tokens is {params.max_new_tokens:,}; the limit here is {cap:,}.")
        extra = tuple(s for s in stop_strings(self.template) if s not in params.stop)
        return Sampling(**{**params.__dict__, "stop": params.stop + extra})

    # -- generation ------------------------------------------------------------------------------

    def submit(
        self, prompt: Prompt, image: ImageInput | None = None, *, cancel: threading.Event | None = None, **sampling: Any
    ) -> Request:
        """Queue one answer with the engine and return its :class:`~llama_adapter.engine.Request`:
        iterate it for the text pieces; it also tells the finish reason and the token counts. Bad
        input raises :class:`InputError` here, a full queue :class:`~llama_adapter.errors.EngineBusy`."""
        params = self.sampling_params(**sampling)
        ids, opening, params = self._prompt_ids(prompt, params)
        return self.engine.submit(ids, params, visual_prompt=self.visual_prompt(image), cancel=cancel, prefix=opening)

    def stream(
        self, prompt: Prompt, image: ImageInput | None = None, *, cancel: threading.Event | None = None, **sampling: Any
    ) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated."""
        yield from self.submit(prompt, image, cancel=cancel, **sampling)

    def generate(self, prompt: Prompt, image: ImageInput | None = None, **sampling: Any) -> str:
        """The whole answer to one prompt (a string or a list of messages)."""
        return "".join(self.stream(prompt, image, **sampling))

    def generate_batch(
        self, prompts: Sequence[Prompt], images: Sequence[ImageInput | None] | None = None, **sampling: Any
    ) -> list[str]:
        """Answers to several prompts (each with its own image, or none), decoded together by the
        engine, ``max_batch`` at a time: the same answers as one by one."""
        if images is not None and len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} images")
        params = self.sampling_params(**sampling)
        rows = [self._prompt_ids(p, params) for p in prompts]
        visuals = [self.visual_prompt(img) for img in images] if images is not None else [None] * len(prompts)
        answers: list[str] = [""] * len(prompts)
        pending = list(enumerate(zip(rows, visuals)))
        running: list[tuple[int, Request]] = []
        try:
            while pending or running:
                while pending and len(running) < self.engine.config.max_batch:
                    i, ((ids, opening, fitted), visual) = pending.pop(0)
                    running.append((i, self.engine.submit(ids, fitted, visual_prompt=visual, prefix=opening)))
                i, request = running.pop(0)
                answers[i] = "".join(request)
        finally:
            for _, request in running:
                request.close()
        return answers

    def chat(
        self, *, system: str | None = None, image: ImageInput | None = None, history: Sequence[Message] = ()
    ) -> ChatSession:
        """A multi-turn conversation that keeps its KV cache; any turn may bring an image (``image``
        here: the first turn's). ``history``: earlier messages to continue from."""
        return ChatSession(self, system=system, image=image, history=history)


class ChatSession:
    """A conversation whose KV cache survives between turns: each turn prefills only the tokens
    the cache does not already hold (``last_prefill_tokens`` tells how many).

    Any user turn may bring an image (``stream(text, image=...)``). Each user message keeps, as
    its ``"image"``, the image it was asked about: the one it brought, else the one in view. An
    image opens a visual context: the model reads the turns asked with no image in view and those
    about the image in view; turns about earlier images stay in ``messages`` (and come back into
    view if the turns after them are undone) but are not read. (Adapter models are trained on one
    image per conversation; given the answers about another picture, they repeat them.) A new
    image changes the visual prompt every position attends to, so its turn prefills the
    conversation it reads again; text turns after it continue the cache.

    On a model without an image encoder an image is refused, unless ``keep_unseen_images``: then
    it is kept (for experts to describe, their text given as ``context``) and the model reads only
    the text.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        system: str | None = None,
        image: ImageInput | None = None,
        history: Sequence[Message] = (),
        keep_unseen_images: bool = False,
    ) -> None:
        """``history``: earlier messages to continue from; a user message may carry the ``"image"``
        it brought (a path, bytes or PIL image), and the messages after it are about that image."""
        self.pipeline = pipeline
        self.keep_unseen_images = keep_unseen_images
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.pending_image: Image.Image | None = None
        """An image for the next turn (:meth:`set_image`), when that turn brings none of its own."""
        self._seen: tuple[Image.Image | None, torch.Tensor | None] = (None, None)  # an image and its visual prompt
        self._cache_image: Image.Image | None = None  # whose visual prompt the cache holds
        validate_history(list(history))
        for m in history:
            m = dict(m)
            if m["role"] == "user":
                m["image"] = self._open(m["image"]) if m.get("image") is not None else self.image
            self.messages.append(m)
        self.set_image(image)
        self.cache = pipeline.model.new_cache(1)
        self.cached_ids: list[int] = []
        self.last_prefill_tokens = 0
        self.dropped_turns = 0

    # -- the image in view -------------------------------------------------------------------------

    @property
    def image(self) -> Image.Image | None:
        """The image the conversation is about now: the last question's."""
        return next((m.get("image") for m in reversed(self.messages) if m["role"] == "user"), None)

    @property
    def image_to_model(self) -> bool:
        """Whether the model itself sees :attr:`image` (else only text about it, if any)."""
        return self.image is not None and self.pipeline.accepts_images

    @property
    def visual_prompt(self) -> torch.Tensor | None:
        """The visual prompt of the image in view (``None``: no image, or a text-only model)."""
        return self._visual_prompt(self.image)

    def read(self, messages: Sequence[Message] | None = None) -> list[Message]:
        """What the model reads of ``messages`` (default: the conversation) when answering its last
        question: the system prompt, the turns asked with no image, and those about the last
        question's image."""
        messages = self.messages if messages is None else messages
        image = next((m.get("image") for m in reversed(messages) if m["role"] == "user"), None)
        read, keep = [], True
        for m in messages:
            if m["role"] == "user":
                keep = m.get("image") is None or m["image"] is image
            if keep or m["role"] == "system":
                read.append(m)
        return read

    def set_image(self, image: ImageInput | None) -> None:
        """Give ``image`` to the next turn (one that brings no image of its own); ``None`` takes back
        one given earlier. Read and checked now: a bad image raises :class:`InputError`."""
        self.pending_image = self._open(image) if image is not None else None

    def _open(self, image: ImageInput) -> Image.Image:
        held = [m.get("image") for m in self.messages] + [self.pending_image, self._seen[0], self._cache_image]
        if any(image is known for known in held if known is not None):
            return image  # already ours: the same object keeps its KV cache (a retried or edited turn)
        picture = open_image(image, max_pixels=self.pipeline.max_image_pixels)
        if not self.pipeline.accepts_images and not self.keep_unseen_images:
            raise InputError("This model has no image encoder: it answers text only. Load a visual adapter.")
        return picture

    def _visual_prompt(self, image: Image.Image | None) -> torch.Tensor | None:
        if image is None or not self.pipeline.accepts_images:
            return None
        if self._seen[0] is not image:
            self._seen = (image, self.pipeline.visual_prompt(image))
        return self._seen[1]

    # -- turns -----------------------------------------------------------------------------------

    def set_system(self, system: str | None) -> None:
        """Use ``system`` as the system prompt from the next turn on (``None`` or blank: none). The
        cache is matched by prefix, so this costs one prefill of the conversation."""
        rest = [m for m in self.messages if m["role"] != "system"]
        system = (system or "").strip()
        self.messages[:] = ([{"role": "system", "content": system}] if system else []) + rest

    def reset_cache(self) -> None:
        self.cache = self.pipeline.model.new_cache(1)
        self.cached_ids = []
        self._cache_image = None

    def reset(self) -> None:
        """Forget the conversation: its turns and images (the system prompt stays)."""
        self.messages[:] = [m for m in self.messages if m["role"] == "system"]
        self.pending_image = None
        self.reset_cache()

    def undo(self) -> Message | None:
        """Drop the last question and its answer; returns the question's message, or ``None`` when
        there is none. An image it brought leaves view with it."""
        while self.messages and self.messages[-1]["role"] != "system":
            message = self.messages.pop()
            if message["role"] == "user":
                return message
        return None

    def retry(self, *, cancel: threading.Event | None = None, **sampling: Any) -> Iterator[str]:
        """Answer the last question again (same text, image and context) in place of its answer. If
        the new answer cannot be written (a refusal, a failure), the old one stays."""
        turns = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if not turns:
            raise InputError("There is no question to answer again yet.")
        removed = self.messages[turns[-1] :]
        question = removed[0]
        del self.messages[turns[-1] :]
        before = list(self.messages)
        extra = {k: question[k] for k in ("image", "context", "record") if question.get(k) is not None}
        pieces = self.stream(question["content"], cancel=cancel, **extra, **sampling)
        try:
            yield from pieces
        except BaseException:
            if _same(self.messages, before):
                self.messages.extend(removed)  # refused or failed: the old answer comes back
            raise
        finally:
            pieces.close()

    def stream(
        self,
        text: str,
        *,
        image: ImageInput | None = None,
        context: str | None = None,
        record: Any = None,
        cancel: threading.Event | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Ask ``text`` (bringing ``image``, with optional expert ``context``) and yield the answer
        in pieces. ``record``: anything the caller wants kept with the question (the model never
        reads it). The answer, even a cancelled one, is kept in ``messages``; a refused question
        (bad input, a full queue) or a model failing part-way (:class:`GenerationError`) leaves
        the conversation as it was."""
        user: Message = {"role": "user", "content": text}
        if context:
            user["context"] = context
        brought = image if image is not None else self.pending_image
        in_view = self._open(brought) if brought is not None else self.image
        if in_view is not None:
            user["image"] = in_view
        if record is not None:
            user["record"] = record
        # Only the new message is limited: the history is ours, and is cut to fit the context below.
        self.pipeline.check_length([m for m in self.messages if m["role"] == "system"] + [user])
        params = self.pipeline.sampling_params(**sampling)
        ids, kept, dropped = self._fit_turns(user, params)
        # A question too long for the context even alone is refused here, with the history untouched.
        params = self.pipeline.fit_to_context(len(ids), params)
        visual = self._visual_prompt(in_view)
        if visual is not None and in_view is not self._cache_image:
            self.reset_cache()  # every cached position attended to another image's adapter prompts
            self._cache_image = in_view
        reuse = _common_prefix(self.cached_ids, ids)
        reuse = min(reuse, len(ids) - 1, self.cache.length)
        self.cache.truncate(reuse)
        # The engine continues this conversation's cache and writes the finished turn back into it.
        # A refusal (a full queue) leaves the conversation as it was.
        opening = self.pipeline.shared_opening([*self.messages, user], ids) if reuse == 0 else 0
        request = self.pipeline.engine.submit(
            ids[reuse:], params, visual_prompt=visual, cache=self.cache, cancel=cancel, prefix=opening
        )
        self.last_prefill_tokens = len(ids) - reuse
        if dropped:
            self.messages[:] = kept
            self.dropped_turns += dropped
            log.info("Chat longer than the context: dropped the %d oldest turn(s) it read", dropped)
        self.pending_image = None
        self.messages.append(user)
        answer: list[str] = []
        failed = False
        try:
            for piece in request:
                answer.append(piece)
                yield piece
        except GenerationError:
            failed = True
            # A step that failed half-way may have left some layers' keys and values in the cache.
            self.messages[:] = [m for m in self.messages if m is not user]
            self.reset_cache()
            raise
        finally:
            request.close()  # stopped early: wait until the engine has let go of the cache
            if not failed:
                self.messages.append({"role": "assistant", "content": "".join(answer)})
                # The cache holds the prompt and the answer tokens fed back so far.
                self.cached_ids = (ids + request.generated)[: self.cache.length]

    def ask(self, text: str, *, image: ImageInput | None = None, context: str | None = None, **sampling: Any) -> str:
        return "".join(self.stream(text, image=image, context=context, **sampling))

    def _fit_turns(self, user: Message, params: Sampling) -> tuple[list[int], list[Message], int]:
        """Token ids of what the model reads of the conversation plus ``user``, the messages kept,
        and how many of the oldest turns it reads were left out to fit the context with room to answer."""
        budget = self.pipeline.context_length - min(params.max_new_tokens, self.pipeline.context_length // 4)
        kept, dropped = list(self.messages), 0
        while True:
            read = self.read([*kept, user])
            ids = self.pipeline.encode(self.pipeline.render(read, limit=False))
            turns = [i for i, m in enumerate(kept) if m["role"] == "user" and any(m is r for r in read)]
            if len(ids) <= budget or not turns:
                return ids, kept, dropped
            first = turns[0]
            end = next((i for i in range(first + 1, len(kept)) if kept[i]["role"] == "user"), len(kept))
            del kept[first:end]
            dropped += 1


def _same(a: list[Message], b: list[Message]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
