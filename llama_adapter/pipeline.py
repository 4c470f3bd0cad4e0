"""Serving a loaded model: :class:`Pipeline` (prompt → answer: generation, streaming, batches)
and :class:`ChatSession` (a conversation that keeps its KV cache). Models are built in
:mod:`llama_adapter.build` (``llama_adapter.load``)."""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .engine import Engine, EngineConfig, Request
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
    render,
    stop_strings,
    validate_messages,
    with_system,
)
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


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
        """The exact text the model reads for ``prompt`` (a string or a list of messages).
        ``limit=False`` skips :meth:`check_length`, for a conversation whose history is ours."""
        messages = with_system(as_messages(prompt), self.system_prompt)
        if limit:
            self.check_length(messages)
        return render(messages, self.template, self.tokenizer)

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
        """The visual prompt of one image ([1, prompt_len, dim]), or ``None`` without an image."""
        if image is None:
            return None
        if not self.accepts_images:
            raise InputError("This model has no image encoder: it answers text only. Load a visual adapter.")
        pixels = image_to_tensor(
            open_image(image, max_pixels=self.max_image_pixels),
            self.model.adapter_config.image_encoder,
            self.model.adapter_config.channel_order,
        )
        encoder_dtype = next(self.model.image_encoder.parameters()).dtype
        with torch.inference_mode():
            return self.model.encode_image(pixels.unsqueeze(0).to(self.device, encoder_dtype), record=record)

    def _prompt_ids(self, prompt: Prompt, params: Sampling) -> tuple[list[int], Sampling]:
        ids = self.encode(self.render(prompt))
        return ids, self.fit_to_context(len(ids), params)

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
        ids, params = self._prompt_ids(prompt, params)
        return self.engine.submit(ids, params, visual_prompt=self.visual_prompt(image), cancel=cancel)

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
                    i, ((ids, fitted), visual) = pending.pop(0)
                    running.append((i, self.engine.submit(ids, fitted, visual_prompt=visual)))
                i, request = running.pop(0)
                answers[i] = "".join(request)
        finally:
            for _, request in running:
                request.close()
        return answers

    def chat(self, *, system: str | None = None, image: ImageInput | None = None) -> ChatSession:
        """A multi-turn conversation (optionally about one image) that keeps its KV cache."""
        return ChatSession(self, system=system, image=image)


class ChatSession:
    """A conversation whose KV cache survives between turns: each turn prefills only the tokens
    the cache does not already hold (``last_prefill_tokens`` tells how many)."""

    def __init__(self, pipeline: Pipeline, *, system: str | None = None, image: ImageInput | None = None) -> None:
        self.pipeline = pipeline
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.visual_prompt = pipeline.visual_prompt(image)
        self.cache = pipeline.model.new_cache(1)
        self.cached_ids: list[int] = []
        self.last_prefill_tokens = 0
        self.dropped_turns = 0

    def set_image(self, image: ImageInput | None) -> None:
        """Talk about another image (or none): the cache no longer applies."""
        self.visual_prompt = self.pipeline.visual_prompt(image)
        self.reset_cache()

    def reset_cache(self) -> None:
        self.cache = self.pipeline.model.new_cache(1)
        self.cached_ids = []

    def undo(self) -> None:
        """Drop the last question and its answer."""
        while self.messages and self.messages[-1]["role"] != "system":
            role = self.messages.pop()["role"]
            if role == "user":
                break

    def stream(
        self, text: str, *, context: str | None = None, cancel: threading.Event | None = None, **sampling: Any
    ) -> Iterator[str]:
        """Ask ``text`` (with optional expert ``context``) and yield the answer in pieces. The
        answer, even a cancelled one, is kept in ``messages``; if the model fails part-way
        (:class:`GenerationError`), the question is taken back and the conversation is as before."""
        user = {"role": "user", "content": text, **({"context": context} if context else {})}
        # Only the new message is limited: the history is ours, and is cut to fit the context below.
        self.pipeline.check_length([m for m in self.messages if m["role"] == "system"] + [user])
        params = self.pipeline.sampling_params(**sampling)
        ids, kept, dropped = self._fit_turns(user, params)
        # A question too long for the context even alone is refused here, with the history untouched.
        params = self.pipeline.fit_to_context(len(ids), params)
        reuse = _common_prefix(self.cached_ids, ids)
        reuse = min(reuse, len(ids) - 1, self.cache.length)
        self.cache.truncate(reuse)
        # The engine continues this conversation's cache and writes the finished turn back into it.
        # A refusal (a full queue) leaves the conversation as it was.
        request = self.pipeline.engine.submit(
            ids[reuse:], params, visual_prompt=self.visual_prompt, cache=self.cache, cancel=cancel
        )
        self.last_prefill_tokens = len(ids) - reuse
        if dropped:
            self.messages[:] = kept
            self.dropped_turns += dropped
            log.info("Chat longer than the context: dropped the %d oldest turn(s)", dropped)
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

    def ask(self, text: str, *, context: str | None = None, **sampling: Any) -> str:
        return "".join(self.stream(text, context=context, **sampling))

    def _fit_turns(self, user: dict[str, str], params: Sampling) -> tuple[list[int], list[Message], int]:
        """Token ids of the conversation plus ``user``, the messages they hold, and how many of the
        oldest turns were left out so that it fits the context with room to answer."""
        budget = self.pipeline.context_length - min(params.max_new_tokens, self.pipeline.context_length // 4)
        kept, dropped = list(self.messages), 0
        while True:
            ids = self.pipeline.encode(self.pipeline.render([*kept, user], limit=False))
            turns = [i for i, m in enumerate(kept) if m["role"] == "user"]
            if len(ids) <= budget or not turns:
                return ids, kept, dropped
            first = turns[0]
            end = turns[1] if len(turns) > 1 else len(kept)
            del kept[first:end]
            dropped += 1


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
