"""Serving a loaded model: :class:`Pipeline` (prompt → answer: generation, streaming, batches)
and :class:`ChatSession` (a conversation that keeps its KV cache). Models are built in
:mod:`llama_adapter.build` (``llama_adapter.load``)."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .errors import GenerationError, InputError, LlamaAdapterError
from .generate import Sampling, TextStream, decode_tokens
from .images import DEFAULT_MAX_PIXELS, ImageInput, image_to_tensor, open_image
from .model import KVCache, LlamaAdapter
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
    """A loaded model ready to answer: ``generate``, ``stream``, ``generate_batch``, ``chat``."""

    model: LlamaAdapter
    tokenizer: Tokenizer
    template: Template = "chat"
    info: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None  # used when a conversation has no system message
    limits: Limits = field(default_factory=Limits)
    _running: int = field(default=0, init=False, repr=False, compare=False)
    _running_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def max_image_pixels(self) -> int:
        return self.limits.max_image_pixels

    @property
    def running(self) -> int:
        """Generations under way now: started and neither finished, stopped, failed nor closed."""
        return self._running

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

    def visual_prompt(self, image: ImageInput | None) -> torch.Tensor | None:
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
            return self.model.encode_image(pixels.unsqueeze(0).to(self.device, encoder_dtype))

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

    def stream(
        self, prompt: Prompt, image: ImageInput | None = None, *, cancel: threading.Event | None = None, **sampling: Any
    ) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated."""
        params = self.sampling_params(**sampling)
        ids, params = self._prompt_ids(prompt, params)
        yield from self.stream_ids(ids, self.visual_prompt(image), params, cancel=cancel)

    def generate(self, prompt: Prompt, image: ImageInput | None = None, **sampling: Any) -> str:
        """The whole answer to one prompt (a string or a list of messages)."""
        return "".join(self.stream(prompt, image, **sampling))

    def generate_batch(
        self, prompts: Sequence[Prompt], images: Sequence[ImageInput | None] | None = None, **sampling: Any
    ) -> list[str]:
        """Answers to several prompts in one left-padded batch (same result as one by one, greedy)."""
        if not prompts:
            return []
        params = self.sampling_params(**sampling)
        rows = [self.encode(self.render(p)) for p in prompts]
        params = self.fit_to_context(max(len(r) for r in rows), params)
        visual = None
        if images is not None:
            if len(images) != len(prompts):
                raise InputError(f"{len(prompts)} prompts but {len(images)} images")
            if any(img is None for img in images):
                raise InputError("In a batch, give every prompt an image or none")
            visual = torch.cat([self.visual_prompt(img) for img in images])
        streams = [TextStream(self.tokenizer, params.stop) for _ in rows]
        finished = [False] * len(rows)
        tokens = decode_tokens(
            self.model, rows, params, self.tokenizer.stop_ids, visual_prompt=visual, pad_id=self.tokenizer.pad_id
        )
        with self._generating(tokens):
            for step in tokens:
                for i, t in enumerate(step):
                    if finished[i] or t is None:
                        continue
                    if t in self.tokenizer.stop_ids:
                        finished[i] = True
                    else:
                        streams[i].push(t)
                        finished[i] = streams[i].stopped
                if all(finished):
                    break
            for s in streams:
                s.finish()
        return [s.text for s in streams]

    @contextmanager
    def _generating(self, tokens: Iterator[Any]) -> Iterator[None]:
        """Count a generation as running, close its decode loop however it ends, and turn a failure
        of the model into a :class:`GenerationError` (the original stays as its ``__cause__``)."""
        with self._running_lock:
            self._running += 1
        try:
            yield
        except LlamaAdapterError:
            raise
        except Exception as e:  # out of memory, a device error, a broken tokenizer: any of them ends the answer
            log.exception("Generation failed")
            raise GenerationError(
                f"The model failed while writing the answer ({type(e).__name__}: {e}). Try again."
            ) from e
        finally:
            tokens.close()
            with self._running_lock:
                self._running -= 1

    def stream_ids(
        self,
        ids: list[int],
        visual_prompt: torch.Tensor | None,
        params: Sampling,
        *,
        cache: KVCache | None = None,
        cancel: threading.Event | None = None,
        stream: TextStream | None = None,
    ) -> Iterator[str]:
        """Yield the answer to the token ids ``ids`` as text pieces. With a ``cache`` they continue
        the tokens it holds; ``stream`` collects the answer's text and ids."""
        stream = stream or TextStream(self.tokenizer, params.stop)
        tokens = decode_tokens(
            self.model,
            [ids],
            params,
            self.tokenizer.stop_ids,
            visual_prompt=visual_prompt,
            cache=cache,
            cancel=cancel,
            pad_id=self.tokenizer.pad_id,
        )
        with self._generating(tokens):
            for (token,) in tokens:
                if token is None or token in self.tokenizer.stop_ids:
                    break
                piece = stream.push(token)
                if piece:
                    yield piece
                if stream.stopped:
                    break
            tail = stream.finish()
            if tail:
                yield tail

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
        if dropped:
            self.messages[:] = kept
            self.dropped_turns += dropped
            log.info("Chat longer than the context: dropped the %d oldest turn(s)", dropped)
        self.messages.append(user)
        reuse = _common_prefix(self.cached_ids, ids)
        reuse = min(reuse, len(ids) - 1, self.cache.length)
        self.cache.truncate(reuse)
        self.last_prefill_tokens = len(ids) - reuse
        stream = TextStream(self.pipeline.tokenizer, params.stop)
        failed = False
        try:
            yield from self.pipeline.stream_ids(
                ids[reuse:], self.visual_prompt, params, cache=self.cache, cancel=cancel, stream=stream
            )
        except GenerationError:
            failed = True
            # A step that failed half-way may have left some layers' keys and values in the cache.
            self.messages[:] = [m for m in self.messages if m is not user]
            self.reset_cache()
            raise
        finally:
            if not failed:
                self.messages.append({"role": "assistant", "content": stream.text})
                # The cache holds the prompt and the answer tokens fed back so far.
                self.cached_ids = (ids + stream.ids)[: self.cache.length]

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
