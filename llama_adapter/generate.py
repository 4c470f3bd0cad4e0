"""Generation: sampling, a KV-cached decode loop (batched, left-padded), streaming text,
stop strings, cancellation, and chat sessions that reuse their KV cache across turns."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

from .errors import InputError
from .model import KVCache, LlamaAdapter
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        rules = {
            "max_new_tokens": (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer ≥ 1"),
            "temperature": (_finite(self.temperature) and self.temperature >= 0, "a number ≥ 0"),
            "top_p": (_finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            "top_k": (_is_int(self.top_k) and self.top_k >= 0, "an integer ≥ 0"),
            "repetition_penalty": (_finite(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
            "seed": (self.seed is None or _is_int(self.seed), "an integer"),
        }
        for name, (ok, requirement) in rules.items():
            if not ok:
                raise InputError(f"{name} must be {requirement} (got {getattr(self, name)!r})")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Sampling:
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise InputError(f"Unknown sampling option(s) {sorted(unknown)}; known: {sorted(known)}")
        if "stop" in kwargs and kwargs["stop"] is not None:
            kwargs["stop"] = (kwargs["stop"],) if isinstance(kwargs["stop"], str) else tuple(kwargs["stop"])
        return cls(**{k: v for k, v in kwargs.items() if v is not None})


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sample_next(
    logits: torch.Tensor, params: Sampling, generator: torch.Generator | None, history: torch.Tensor | None = None
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None:
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class TextStream:
    """Turns one row's tokens into text pieces: holds back incomplete UTF-8 and anything that
    could be the start of a stop string, and cuts the text at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        for s in self.stop:
            cut = full.find(s)
            if cut >= 0:
                self.stopped = True
                return self._emit(full[:cut])
        if full.endswith("\ufffd"):
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        return self._emit(full[: len(full) - hold])

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        piece, self.text = upto[len(self.text) :], upto
        return piece


@torch.inference_mode()
def decode_tokens(
    model: LlamaAdapter,
    prompts: list[list[int]],
    params: Sampling,
    stop_ids: set[int],
    *,
    visual_prompt: torch.Tensor | None = None,
    cache: KVCache | None = None,
    cancel: threading.Event | None = None,
    pad_id: int = 0,
) -> Iterator[list[int | None]]:
    """Yield, per step, the next token of every row: a stop id ends the row, which then yields
    ``None``.

    Prompts are left-padded into one batch. With a ``cache`` (batch 1) the prompt continues the
    cached tokens. Stops at the token limit, when every row has hit a stop id, or on ``cancel``.
    Closing the iterator stops generation too.
    """
    device = model.tok_embeddings.weight.device
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    if cache is None:
        cache = model.new_cache(batch)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    history = ids if params.repetition_penalty != 1.0 else None

    logits = model(
        ids, visual_prompt=visual_prompt, attention_mask=mask if batch > 1 else None, cache=cache, last_only=True
    )[:, -1]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    for step in range(params.max_new_tokens):
        token = sample_next(logits, params, generator, history)
        finished_before = done
        token = torch.where(done, torch.full_like(token, pad_id), token)
        done = done | torch.isin(token, stop)
        yield [None if f else t for t, f in zip(token.tolist(), finished_before.tolist())]
        if bool(done.all()) or (cancel is not None and cancel.is_set()) or step == params.max_new_tokens - 1:
            return
        if history is not None:
            history = torch.cat([history, token.unsqueeze(1)], 1)
        logits = model(token.unsqueeze(1), visual_prompt=visual_prompt, cache=cache)[:, -1]
