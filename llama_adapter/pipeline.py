"""``load()``: one entry point that reads a base and an adapter and returns a ready
:class:`Pipeline` (model + tokenizer + prompt template + generation + chat sessions)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .config import AdapterConfig, LlamaConfig
from .encoders import build_image_encoder
from .errors import CheckpointError, GenerationError, InputError, LlamaAdapterError
from .generate import Sampling, TextStream, decode_tokens
from .images import DEFAULT_MAX_PIXELS, ImageInput, image_to_tensor, open_image
from .model import KVCache, LlamaAdapter, adapter_state_dict, parameter_group
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
from .quantize import can_pack, pack_linears, quantize_model
from .tokenizer import Tokenizer
from .weights import AdapterWeights, BaseWeights, check_keys, load_adapter, load_base, read_adapter_metadata

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_ADAPTER = ASSETS / "demo-adapter.safetensors"
DEFAULT_BASE = "smollm2-135m"


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


def plain_adapter_config() -> AdapterConfig:
    """No adapter at all: the model computes exactly the base LLaMA."""
    return AdapterConfig(adapter_layers=0, visual_layers=0, bias_targets=(), scale=False, image_encoder=None)


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load(
    base: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    compile: bool = False,
    clip_weights: str | None = "openai",
    template: Template | None = None,
    limits: Limits | None = None,
) -> Pipeline:
    """Load a base model and (optionally) an adapter; return a :class:`Pipeline`.

    With neither, the shipped demo model (``assets/``) is used, or plain ``smollm2-135m`` when
    it is absent. ``adapter`` is an official name (``BIAS-7B``, ``LORA-BIAS-7B``,
    ``LORA-BIAS-7B-v21``, ``CAPTION-7B``), an official ``.pth`` or one of our ``.safetensors``;
    our adapters name their base, so ``base`` may be left out. ``quantize="int8"`` stores the
    base's linear weights in 8 bits (bitsandbytes on CUDA, weight-only int8 on CPU).
    ``compile=True`` compiles the one-token decode step with ``torch.compile`` before returning:
    1.1-1.4× faster decoding on CPU (``benchmarks/generate.py``), for 1-3 minutes of compiling
    the first time on a small CPU and seconds afterwards (inductor's cache on disk); if it cannot
    compile it warns and decodes eager.
    """
    started = time.perf_counter()
    device = torch.device(device)
    dtype = _parse_dtype(dtype) or default_dtype(device)
    if base is None and adapter is None:
        adapter = DEFAULT_ADAPTER if DEFAULT_ADAPTER.is_file() else None
        base = None if adapter else DEFAULT_BASE
    ours = adapter is not None and str(adapter).endswith(".safetensors")
    meta = read_adapter_metadata(Path(adapter)) if ours else {}
    if base is None:
        base = meta.get("base") if ours else None
        if base is None:
            raise CheckpointError(
                f"Adapter {adapter} needs a base model: pass base=<path to LLaMA-7B> (official adapters "
                "were trained on LLaMA-7B)."
            )

    base_weights = load_base(base)
    adapter_weights = load_adapter(adapter, base_weights.config) if adapter is not None else None
    if adapter_weights is not None and ours:
        _check_our_base(adapter_weights, base_weights)
    model = build_model(base_weights, adapter_weights, device=device, dtype=dtype, clip_weights=clip_weights)
    model.fuse()
    if quantize:
        quantize_model(model, quantize)
    elif can_pack(device, dtype) and not compile:  # inductor cannot take oneDNN's packed weights
        pack_linears(model)
    model.eval()
    compiled = compile and _compile_decoding(model)

    tokenizer = base_weights.tokenizer
    if template is None:
        template = _default_template(adapter_weights, tokenizer)
    info = {
        "base": str(base),
        "base_fingerprint": base_weights.fingerprint,
        "adapter": str(adapter) if adapter is not None else None,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quantize": quantize,
        "compiled": compiled,
        "template": template,
        "image_encoder": model.adapter_config.image_encoder,
        "load_seconds": round(time.perf_counter() - started, 2),
    }
    log.info("Loaded %s", info)
    system_prompt = adapter_weights.metadata.get("system_prompt") if adapter_weights is not None else None
    return Pipeline(
        model, tokenizer, template=template, info=info, system_prompt=system_prompt, limits=limits or Limits()
    )


def _compile_decoding(model: LlamaAdapter) -> bool:
    """Compile the model's decode step; on failure say why and keep decoding eager (slower, same
    answers) rather than refuse to serve. Returns whether it compiled."""
    device = model.tok_embeddings.weight.device
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        log.warning("compile=True needs a C++ compiler on CPU (apt install g++); decoding stays eager")
        return False
    started = time.perf_counter()
    log.info("Compiling the decode step (1-3 min the first time on a small CPU, seconds once cached)")
    try:
        model.compile_decoding()
    except Exception as e:  # inductor's failures are many and version-specific
        log.warning("Could not compile the decode step (%s: %s); decoding stays eager", type(e).__name__, e)
        return False
    log.info("Compiled the decode step in %.1f s", time.perf_counter() - started)
    return True


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def _default_template(adapter: AdapterWeights | None, tokenizer: Tokenizer) -> Template:
    if adapter is not None and adapter.metadata.get("prompt_template"):
        return adapter.metadata["prompt_template"]
    if adapter is not None and adapter.config.wiring == "official":
        return "alpaca"
    return "chat" if tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) else "alpaca"


def _check_our_base(adapter: AdapterWeights, base: BaseWeights) -> None:
    expected = LlamaConfig(**adapter.metadata["base_config"])
    got = base.config
    shape = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")
    if any(getattr(expected, k) != getattr(got, k) for k in shape):
        raise CheckpointError(
            f"Adapter {adapter.source} was trained on {adapter.metadata.get('base')!r} "
            f"(width {expected.dim}, {expected.n_layers} layers, vocabulary {expected.vocab_size}), but the base "
            f"you loaded has width {got.dim}, {got.n_layers} layers, vocabulary {got.vocab_size}: load it with "
            f"base={adapter.metadata.get('base')!r}."
        )
    if adapter.metadata.get("base_fingerprint") not in (None, base.fingerprint):
        warnings.warn(
            f"Adapter {adapter.source} was trained on a base with fingerprint {adapter.metadata['base_fingerprint']}; "
            f"this base has {base.fingerprint}. Same shapes, different weights: answers may be off.",
            stacklevel=3,
        )


def build_model(
    base: BaseWeights,
    adapter: AdapterWeights | None,
    *,
    adapter_config: AdapterConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_weights: str | None = "openai",
    pretrained_encoder: bool = True,
) -> LlamaAdapter:
    """Assemble the model: built on the meta device, base tensors assigned without copies, the
    rest initialised as a fresh adapter, then the adapter file read key-exactly."""
    acfg = adapter.config if adapter is not None else adapter_config or plain_adapter_config()
    with torch.device("meta"):
        model = LlamaAdapter(base.config, acfg)
    expected_base = {
        n: p.shape
        for n, p in model.named_parameters()
        if parameter_group(model, n) is None or n.endswith("norm.weight") and n.split(".")[0] in ("layers", "norm")
    }
    check_keys(expected_base, base.state_dict, f"Base model {base.source}")
    model.load_state_dict(base.state_dict, strict=False, assign=True)
    model.materialize("cpu")
    if adapter is not None:
        load_adapter_into(model, adapter)
    if acfg.image_encoder is not None:
        model.image_encoder = build_image_encoder(
            acfg.image_encoder, pretrained=pretrained_encoder, clip_weights=clip_weights
        )
    cast_base(model, dtype)
    return model.to(device)


def load_adapter_into(model: LlamaAdapter, adapter: AdapterWeights) -> None:
    """Copy adapter tensors into ``model``: every key must map to an adapter parameter of the
    same shape and every adapter parameter must be filled."""
    params = adapter_state_dict(model)
    check_keys({n: p.shape for n, p in params.items()}, adapter.state_dict, f"Adapter {adapter.source}")
    with torch.no_grad():
        for name, tensor in adapter.state_dict.items():
            params[name].copy_(tensor)


def cast_base(model: LlamaAdapter, dtype: torch.dtype) -> None:
    """Cast the frozen base (and image encoder) to ``dtype``; adapter tensors stay float32."""
    for name, param in model.named_parameters():
        if parameter_group(model, name) is None and param.dtype.is_floating_point:
            param.data = param.data.to(dtype)
    if model.image_encoder is not None:
        model.image_encoder.to(dtype)


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

    def render(self, prompt: Prompt) -> str:
        """The exact text the model reads for ``prompt`` (a string or a list of messages)."""
        messages = with_system(as_messages(prompt), self.system_prompt)
        self.check_length(messages)
        return render(messages, self.template, self.tokenizer)

    def _render_unlimited(self, messages: list[Message]) -> str:
        """:meth:`render` without the length limit, for a conversation whose history is ours."""
        return render(with_system(messages, self.system_prompt), self.template, self.tokenizer)

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
        return ids, self._fit(len(ids), params)

    def _fit(self, n_prompt: int, params: Sampling) -> Sampling:
        room = self.context_length - n_prompt
        if room < 1:
            raise InputError(
                f"The prompt is {n_prompt:,} tokens; this model reads at most {self.context_length:,}. Shorten it."
            )
        if params.max_new_tokens > room:
            params = Sampling(**{**params.__dict__, "max_new_tokens": room})
        return params

    def _sampling(self, kwargs: dict[str, Any]) -> Sampling:
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
        params = self._sampling(sampling)
        ids, params = self._prompt_ids(prompt, params)
        yield from self._stream_ids(ids, self.visual_prompt(image), params, None, cancel)

    def generate(self, prompt: Prompt, image: ImageInput | None = None, **sampling: Any) -> str:
        """The whole answer to one prompt (a string or a list of messages)."""
        return "".join(self.stream(prompt, image, **sampling))

    def generate_batch(
        self, prompts: Sequence[Prompt], images: Sequence[ImageInput | None] | None = None, **sampling: Any
    ) -> list[str]:
        """Answers to several prompts in one left-padded batch (same result as one by one, greedy)."""
        if not prompts:
            return []
        params = self._sampling(sampling)
        rows = [self.encode(self.render(p)) for p in prompts]
        params = self._fit(max(len(r) for r in rows), params)
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

    def _stream_ids(
        self,
        ids: list[int],
        visual_prompt: torch.Tensor | None,
        params: Sampling,
        cache: KVCache | None,
        cancel: threading.Event | None,
        stream: TextStream | None = None,
    ) -> Iterator[str]:
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
        params = self.pipeline._sampling(sampling)
        ids, kept, dropped = self._fit_turns(user, params)
        # A question too long for the context even alone is refused here, with the history untouched.
        params = self.pipeline._fit(len(ids), params)
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
            yield from self.pipeline._stream_ids(ids[reuse:], self.visual_prompt, params, self.cache, cancel, stream)
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
            ids = self.pipeline.encode(self.pipeline._render_unlimited([*kept, user]))
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
