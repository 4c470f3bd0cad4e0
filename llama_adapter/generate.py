"""Generation: sampling, a KV-cached decode loop (batched, left-padded), streaming text,
stop strings, cancellation, and chat sessions that reuse their KV cache across turns."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

from .errors import InputError
from .model import KVCache, LlamaAdapter, Recorder
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
        # The nucleus lies among the most likely tokens once they hold top_p of the mass: sort only
        # those (a shortlist that widens until it does), not the whole vocabulary, which cost ~6 ms
        # a row per token at SmolLM2's 49,152 ids.
        shortlist = 64
        while True:
            sorted_probs, order = probs.topk(min(shortlist, probs.shape[-1]), dim=-1)
            if shortlist >= probs.shape[-1] or bool((sorted_probs.sum(-1) >= params.top_p).all()):
                break
            shortlist *= 4
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        choice = torch.multinomial(sorted_probs.masked_fill(drop, 0.0), 1, generator=generator)
        return order.gather(1, choice).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class TextStream:
    """Turns one row's tokens into text pieces: holds back incomplete UTF-8 and anything that
    could be the start of a stop string, and cuts the text at the first stop string.

    Decoding is incremental, as in text-generation-inference: each token decodes only the few ids
    since the text was last complete (decoding them with the id before keeps SentencePiece's word
    boundaries right), so an answer of n tokens costs O(n), not O(n²) from decoding every id again.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.decoded = ""  # the text of ids[:read_at], complete characters only
        self.prefix_at = self.read_at = 0  # ids[prefix_at:read_at] is the context decoded again with new ids
        self.stopped = False
        self._longest_stop = max((len(s) for s in stop), default=0)

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.stopped:
            return ""
        searched = len(self.decoded)
        if not self._read(final=False):
            return ""
        cut = self._stop_at(searched)
        if cut is not None:
            self.stopped = True
            return self._emit(self.decoded[:cut])
        hold = max(
            (k for s in self.stop for k in range(1, len(s)) if self.decoded.endswith(s[:k])),
            default=0,
        )
        return self._emit(self.decoded[: len(self.decoded) - hold])

    def finish(self) -> str:
        if self.stopped:
            return ""
        searched = len(self.decoded)
        self._read(final=True)
        cut = self._stop_at(searched)
        return self._emit(self.decoded if cut is None else self.decoded[:cut])

    def _read(self, *, final: bool) -> bool:
        """Decode the ids since the last complete text; returns whether new text was added."""
        window = self.tokenizer.decode(self.ids[self.prefix_at :])
        if final:
            window = window.rstrip("\ufffd")
        elif window.endswith("\ufffd"):
            return False  # half a character: wait for the rest of its bytes
        context = self.tokenizer.decode(self.ids[self.prefix_at : self.read_at])
        if len(window) <= len(context):
            return False
        self.decoded += window[len(context) :]
        self.prefix_at, self.read_at = self.read_at, len(self.ids)
        return True

    def _stop_at(self, searched: int) -> int | None:
        """Where the earliest stop string starts, looking only where the new text could complete one."""
        start = max(0, searched - self._longest_stop + 1)
        found = [i for i in (self.decoded.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text):
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
    record: Recorder | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per step, the next token of every row: a stop id ends the row, which then yields
    ``None``.

    Prompts are left-padded into one batch. With a ``cache`` (batch 1) the prompt continues the
    cached tokens. Stops at the token limit, when every row has hit a stop id, or on ``cancel``.
    Closing the iterator stops generation too. A ``record`` sees every model call (eager); each
    yield follows the one call whose logits chose that step's tokens.
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
        ids,
        visual_prompt=visual_prompt,
        attention_mask=mask if batch > 1 else None,
        cache=cache,
        last_only=True,
        record=record,
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
        logits = model(token.unsqueeze(1), visual_prompt=visual_prompt, cache=cache, record=record)[:, -1]
