"""The engine: one scheduler thread owns the model and decodes every active request together.

    engine = Engine(model, tokenizer, EngineConfig(max_batch=8))
    request = engine.submit(ids, Sampling(max_new_tokens=64))
    for piece in request:                     # text pieces, as they are decoded
        print(piece, end="")
    request.finish_reason, request.prompt_tokens, request.completion_tokens

Continuous batching over ``max_batch`` slots, the rows of one :class:`SlotCache`:

- A request waits in a queue (at most ``max_waiting``; more get :class:`EngineBusy` at once),
  takes a free slot, and is prefilled into its own batch-1 :class:`KVCache` (a conversation's
  cache, continued), ``prefill_chunk`` tokens at a time, by a second thread while the engine
  thread goes on decoding the others: a newcomer's prompt never holds them up. Prefill computes
  on one OpenMP thread, always (kernels may sum in another order with another thread count, and a
  prompt must give the same logits alone or among others): a decode step is mostly small ops that
  leave the second core idle, and with the two threads side by side the engine does ~1.7× the work
  per second it did prefilling and decoding in turn on both cores.
- While a prompt is being prefilled, decode steps compute on one OpenMP thread (a second one
  would spin on the prefill's core), and while every slot is taken, a step of fewer rows
  than half the slots waits (at most :data:`PREFILL_HOLD_SECONDS`) for that prompt to join: a
  step reads every weight whatever its rows, so under load fuller steps answer more requests per
  second, and the engine's idle core goes to the prefill and the app (20 users on 2 cores, one
  sitting: 411 → 524 answers in 2 minutes, ``benchmarks/load.py``). With a slot free nobody is
  held up.
- A fresh conversation's opening (``prefix`` of :meth:`Engine.submit`: the system prompt and the
  template's first tokens, which the pipeline finds) is prefilled on its own, and its keys and
  values are kept, the last :data:`PREFIXES_KEPT`, by its tokens and visual prompt (an image
  prompts every layer of the demo model, so the opening's keys depend on it): the next prompt
  that opens alike copies them and prefills only the rest. It is prefilled on its own even when
  nothing is kept yet, so that a prompt's logits never depend on what came before it.
- Prefilled, its keys and values (and its adapter prompts' keys and values: each row has its
  own visual prompt) are copied into the lowest row not decoding, and it joins the next decode
  step. When a request leaves below others, the highest decoding row moves down into its row.
- A step decodes the first rows of the slots, up to the highest decoding one, rounded up to a *row
  count* (1, 2, 4, … ``max_batch``) that keeps answers batch-invariant: matmul kernels pick
  their blocking by the number of rows, so a row's logits may change in the last bits with it.
  At start the engine decodes the same probe rows at every count and keeps the counts whose
  rows are bitwise those of a full step on this machine (weight-only int8 here: 1, 2, 4 and 8;
  float32: 8 for the demo model), so a request's answer is the same alone or in a batch, and a lone request
  pays for as few rows as that allows. Free rows inside the count decode a dummy token.
- Each request samples with its own settings and its own ``torch.Generator`` (seeded), stops at
  an end token, a stop string or its token limit, and leaves at once; a cancelled request
  (Stop, a client that went away) leaves before the next step. A conversation's cache gets its
  row back when the request ends, so its next turn prefills only the new tokens.

The model runs only in the engine's two threads: the prefill thread on the batch-1 caches of the
requests it holds until it hands them back, the engine thread on the slots (and, while
:meth:`Engine.compile_in_background` compiles, in that thread, through a shallow copy whose
decode step is the compiled one). Image encoding and experts happen before a request is
submitted, in the caller's thread, which then gives back its OpenMP workers
(:func:`release_openmp_workers`), as the engine thread does when it falls idle: with more OpenMP
threads than cores, every small parallel op of a step would wait for its workers to wake.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import functools
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from .errors import EngineBusy, GenerationError, InputError
from .generate import Sampling, TextStream, sample_next
from .model import KVCache, LlamaAdapter, computing_prompt_tokens
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]

PREFIXES_KEPT = 8
"""Shared prompt openings whose keys and values the engine keeps (~3 MB each for the demo model)."""


class Kept:
    """The last values put, by key, shared between threads: least recently used first out. How
    many is read at each ``put``, so a module's setting (e.g. :data:`PREFIXES_KEPT`) applies as set."""

    def __init__(self) -> None:
        self._values: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
            return value

    def put(self, key: Any, value: Any, keep: int) -> None:
        with self._lock:
            self._values[key] = value
            while len(self._values) > keep:
                self._values.popitem(last=False)


PREFILL_HOLD_SECONDS = 0.1
"""Under load, the longest a decode step of few rows waits for the prompt being prefilled
(see the module docstring): about one prompt's prefill on the demo model's CPU path."""


@dataclass(frozen=True)
class EngineConfig:
    """How many requests decode together and how many may wait."""

    max_batch: int = 8
    """Slots: requests decoded in one step. Each step computes all of them, busy or free."""
    max_waiting: int = 32
    """Requests that may wait for a slot; beyond, :meth:`Engine.submit` raises :class:`EngineBusy`."""
    prefill_chunk: int = 128
    """Prompt tokens prefilled in one forward pass (a cancelled request stops between two)."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_waiting", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")


class SlotCache(KVCache):
    """A :class:`KVCache` whose rows are independent sequences: row ``b`` holds its tokens in
    buffer columns ``0 … next_position[b] - 1`` (no padding), so a row can be emptied and refilled
    while the other rows go on decoding. A decode step writes each row's new token at its own
    column. Free rows decode a dummy token at column 0 and do not advance."""

    def __init__(self, model: LlamaAdapter, batch: int) -> None:
        ref = model.new_cache(batch)
        super().__init__(len(ref.keys), batch, ref.shape[1], ref.shape[3], ref.device, ref.dtype)
        self.active = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.rows = torch.arange(batch, device=self.device)
        self.prompts_ready = True  # every row's adapter prompts are copied in with its tokens

    def load(self, row: int, cache: KVCache) -> None:
        """Put the sequence of a batch-1 ``cache`` (no padding) into ``row``, which starts decoding."""
        n = cache.length
        self.reserve(max(0, n - self.length))
        for store, source in ((self.keys, cache.keys), (self.values, cache.values)):
            for layer, src in enumerate(source):
                store[layer][row, :, :n] = src[0, :, :n]
        self.key_valid[row] = False
        self.key_valid[row, :n] = True
        for layer, kv in enumerate(cache.prompt_kv):
            if kv is None:
                continue
            if self.prompt_kv[layer] is None:
                b = self.shape[0]
                self.prompt_kv[layer] = tuple(torch.zeros(b, *t.shape[1:], device=t.device, dtype=t.dtype) for t in kv)
            for dst, src in zip(self.prompt_kv[layer], kv):
                dst[row] = src[0]
        self.next_position[row] = n
        self.active[row] = 1
        self.length = max(self.length, n)

    def save(self, row: int, cache: KVCache) -> None:
        """Copy ``row``'s sequence back into a batch-1 ``cache`` (a conversation's, for its next turn)."""
        n = int(self.next_position[row])
        cache.truncate(0)
        cache.reserve(n)
        for store, target in ((self.keys, cache.keys), (self.values, cache.values)):
            for layer, dst in enumerate(target):
                dst[0, :, :n] = store[layer][row, :, :n]
        cache.key_valid[0, :n] = True
        cache.length = n
        cache.next_position[0] = n

    def move(self, source: int, target: int) -> None:
        """Move ``source``'s sequence into the free row ``target``, which decodes it from now on;
        ``source`` is freed."""
        n = int(self.next_position[source])
        for store in (self.keys, self.values):
            for buffer in store:
                buffer[target, :, :n] = buffer[source, :, :n]
        self.key_valid[target] = self.key_valid[source]
        for kv in self.prompt_kv:
            for tensor in kv or ():
                tensor[target] = tensor[source]
        self.next_position[target] = n
        self.active[target] = 1
        self.release(source)

    def release(self, row: int) -> None:
        """Free ``row``. When the longest rows have left, the buffers shrink back: every step reads
        all rows to the full capacity, so one long conversation must not leave it large."""
        self.active[row] = 0
        self.next_position[row] = 0
        self.length = int(self.next_position.max())
        fitting = max(64, 2 * self.length)
        if self.capacity > 2 * fitting:
            # Fresh strides, as the compiled step was traced with: a one-row slice keeps the wide
            # row's stride through a plain clone, and that stride alone recompiled the step mid-answer.
            contiguous = torch.contiguous_format
            for store in (self.keys, self.values):
                for layer, buffer in enumerate(store):
                    store[layer] = buffer[:, :, :fitting].clone(memory_format=contiguous)
            self.key_valid = self.key_valid[:, :fitting].clone(memory_format=contiguous)

    def append_valid(self, n: int, valid: torch.Tensor | None) -> torch.Tensor:
        if n != 1 or valid is not None:
            raise ValueError("a SlotCache takes one token per row, in a decode step")
        self.reserve(1)
        self.write_at = self.next_position.clone()
        self.key_valid[self.rows, self.write_at] = True
        self.next_position += self.active
        return self.key_valid

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new key and value ([B, H, 1, D]) at that row's own column."""
        index = self.write_at.view(-1, 1, 1, 1).expand_as(k)
        self.keys[layer].scatter_(2, index, k)
        self.values[layer].scatter_(2, index, v)
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        self.length = int(self.next_position.max())

    def first(self, rows: int) -> SlotCache:
        """The first ``rows`` rows as a cache of their own, sharing this one's tensors: a decode
        step through it writes here. Reserve room for the step here first (a view cannot grow)."""
        if rows == self.shape[0]:
            return self
        view = copy.copy(self)
        view.shape = (rows, *self.shape[1:])
        view.keys = [buffer[:rows] for buffer in self.keys]
        view.values = [buffer[:rows] for buffer in self.values]
        view.prompt_kv = [None if kv is None else (kv[0][:rows], kv[1][:rows]) for kv in self.prompt_kv]
        for name in ("key_valid", "next_position", "active", "rows"):
            setattr(view, name, getattr(self, name)[:rows])
        return view


_END = object()


class Request:
    """One generation submitted to an :class:`Engine`. Iterate it for the answer's text pieces
    (a failure of the model raises :class:`GenerationError`); :meth:`cancel` or :meth:`close` to
    stop it. Afterwards ``finish_reason`` is ``"stop"`` (an end token or stop string),
    ``"length"`` (the token limit), ``"cancelled"`` or ``"error"``."""

    _ids = itertools.count()

    def __init__(
        self,
        ids: list[int],
        params: Sampling,
        visual_prompt: torch.Tensor | None,
        cache: KVCache | None,
        cancel: threading.Event | None,
        stream: TextStream,
        device: torch.device,
        wake: Callable[[], None],
    ) -> None:
        self.id = next(self._ids)
        self.ids, self.params, self.visual_prompt = ids, params, visual_prompt
        self.cache = cache
        self.cancelled = cancel or threading.Event()
        self.stream = stream
        self.generated: list[int] = []
        self.prompt_tokens = len(ids) + (cache.length if cache is not None else 0)
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        self.history = torch.tensor([ids], device=device) if params.repetition_penalty != 1.0 else None
        self.prefilled = 0
        self.prefix = 0
        """Of ``ids``, the shared opening prefilled on its own (see :meth:`Engine.submit`)."""
        self.decoding = False
        """Prefilled and in its slot's row: it takes part in decode steps."""
        self.slot: int | None = None
        self.last_token = 0
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._notify: Callable[[], None] | None = None
        self._done = threading.Event()
        self._wake = wake

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request; it leaves its slot before the next step."""
        self.cancelled.set()
        self._wake()

    def close(self) -> None:
        """Stop the request and wait until the engine has let go of it (and of its cache)."""
        if not self._done.is_set():
            self.cancel()
            self._done.wait()

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._events.get()
                if item is _END or self.cancelled.is_set():
                    break
                yield item
            self._raise_failure()
        finally:
            self.close()

    async def __aiter__(self):
        """The same pieces for asyncio code, without holding a thread while waiting."""
        import asyncio

        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._notify = lambda: loop.call_soon_threadsafe(ready.set)
        try:
            while True:
                try:
                    item = self._events.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    ready.clear()
                    continue
                if item is _END or self.cancelled.is_set():
                    break
                yield item
            self._raise_failure()
        finally:
            self._notify = None
            if not self.done:
                self.cancel()

    def _raise_failure(self) -> None:
        if self.error is not None:
            e = self.error
            message = f"The model failed while writing the answer ({type(e).__name__}: {e}). Try again."
            raise GenerationError(message) from e

    # -- engine side --

    def post(self, item: object) -> None:
        self._events.put(item)
        notify = self._notify
        if notify is not None:
            try:
                notify()
            except RuntimeError:  # the consumer's event loop has closed: nobody is listening
                pass


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_engines() -> None:
    """Stop every engine's thread before the interpreter tears down: a thread still inside torch
    then aborts the process ("terminate called without an active exception")."""
    for engine in list(_engines):
        engine.close()


class Engine:
    """The scheduler: owns ``model`` (no one else may run it while the engine lives) and decodes
    every submitted request in one batch of ``config.max_batch`` slots. See the module docstring."""

    def __init__(self, model: LlamaAdapter, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config or EngineConfig()
        self.device = model.tok_embeddings.weight.device
        self._rows: list[Request | None] = [None] * self.config.max_batch
        self._waiting: deque[Request] = deque()
        self._to_prefill: deque[Request] = deque()
        """Requests holding a slot whose prompt the prefill thread computes (in this order)."""
        self._prefilled: deque[tuple[Request, torch.Tensor | BaseException | None]] = deque()
        """Back from the prefill thread: the last position's logits, the failure, or None if cancelled."""
        self._prefixes = Kept()
        """The prefill thread's kept prefixes: (tokens, id of the visual prompt) → (that visual
        prompt, held so that its id stays its own, and the prefix's cache), least recent first."""
        self._running = 0
        self._closed = False
        self._cond = threading.Condition()
        self._compiled: tuple[Callable, tuple[int, ...]] | None = None  # a decode step and its row counts
        self.row_counts: tuple[int, ...] = (self.config.max_batch,)
        """How many rows a decode step may compute (see the module docstring); set at start."""
        self.compile_state: Literal["eager", "compiling", "compiled"] = (
            "compiled" if "decode_step" in vars(model) else "eager"
        )
        with torch.inference_mode():
            self.slots = SlotCache(model, self.config.max_batch)
            self._warm_up()
        release_openmp_workers()
        self._threads = torch.get_num_threads()
        self._prefill_thread = threading.Thread(target=self._prefill_loop, name="llama-adapter-prefill", daemon=True)
        self._prefill_thread.start()
        self._thread = threading.Thread(target=self._loop, name="llama-adapter-engine", daemon=True)
        self._thread.start()
        _engines.add(self)

    @property
    def running(self) -> int:
        """Requests submitted and not yet finished: waiting or holding a slot."""
        return self._running

    @property
    def active(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return sum(r is not None for r in self._rows)

    def submit(
        self,
        ids: list[int],
        params: Sampling,
        *,
        visual_prompt: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cancel: threading.Event | None = None,
        prefix: int = 0,
    ) -> Request:
        """Queue a generation from prompt token ``ids`` (continuing a batch-1 ``cache`` that holds
        the conversation so far, if given; the engine writes the finished turn back into it).
        ``prefix``: the first tokens of a fresh conversation that others share (a system prompt and
        the template's opening); they are prefilled on their own, and their keys and values are
        kept for the next prompt that opens with them and the same visual prompt."""
        release_openmp_workers()  # this thread may have encoded the image; the engine thread computes now
        if not ids:
            raise InputError("The prompt has no tokens.")
        past = cache.length if cache is not None else 0
        if not 0 <= prefix < len(ids) or (prefix and past):
            raise ValueError(f"a prefix of {prefix} tokens for a prompt of {len(ids)} after {past} cached")
        longest = past + len(ids) + params.max_new_tokens - 1
        if longest > self.model.config.max_seq_len:
            raise InputError(
                f"The prompt ({past + len(ids):,} tokens) and the answer ({params.max_new_tokens:,}) do not fit "
                f"this model's context of {self.model.config.max_seq_len:,} tokens."
            )
        stream = TextStream(self.tokenizer, params.stop)
        request = Request(ids, params, visual_prompt, cache, cancel, stream, self.device, self._wake)
        request.prefix = prefix
        with self._cond:
            if self._closed:
                raise GenerationError("The engine has been closed.")
            self._drop_cancelled_waiting()
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineBusy(
                    f"The server is busy: {self.active} answers are being written and {len(self._waiting)} "
                    "requests are waiting. Try again in a moment."
                )
            self._waiting.append(request)
            self._running += 1
            self._cond.notify_all()
        return request

    def close(self, wait: bool = True) -> None:
        """Stop the scheduler; requests still waiting or decoding end as cancelled. ``wait``:
        until its thread has ended."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the loop ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if self._idle():
                        release_openmp_workers()  # while idle, another thread (an encoder, an engine) computes
                    while self._idle():
                        self._cond.wait()
                    if self._closed:
                        break
                    if self._compiled is not None and not any(self._rows):
                        self._switch_to_compiled()
                try:
                    self._iterate()
                except Exception as e:  # a bug of ours, not the model's: end what is running, keep serving
                    for request in self._rows:
                        if request is not None and request.decoding:
                            self._fail(request, e)
            self._prefill_thread.join()
            for request in [*self._waiting, *self._rows]:
                if request is not None:
                    self._finish(request, "cancelled")

    def _idle(self) -> bool:
        """Nothing for the engine thread to do: no slot to fill, nothing prefilled to take in,
        nothing to decode or to let go."""
        if self._closed or self._prefilled or any(r.cancelled.is_set() for r in self._waiting):
            return False
        if any(r is not None and r.decoding for r in self._rows):
            return False
        if self._compiled is not None:
            return any(self._rows)  # the switch waits for the slots to empty
        return not (self._waiting and None in self._rows)

    def _iterate(self) -> None:
        """Admit waiting requests to free slots (the prefill thread takes them from there), take
        in the prefilled ones, let cancelled ones go, decode one step. While a compiled step waits
        to take over, nobody new is admitted: the answers under way finish eager, and the switch
        comes when the slots are empty (under a steady load they would never all be free at once)."""
        with self._cond:
            self._drop_cancelled_waiting()
            if self._compiled is None:
                self._admit()
            prefilled = list(self._prefilled)
            self._prefilled.clear()
        for request, outcome in prefilled:
            self._join(request, outcome)
        for request in self._rows:
            if request is not None and request.decoding and request.cancelled.is_set():
                self._finish(request, "cancelled")
        self._hold_for_prefill()
        self._decode_step()

    def _hold_for_prefill(self) -> None:
        """With every slot taken (the app's queue admits as many answers as there are slots, so a
        full engine is a busy server), a step of fewer rows than half the slots first waits, at
        most :data:`PREFILL_HOLD_SECONDS`, for the prompt being prefilled to join."""
        decoding = sum(r is not None and r.decoding for r in self._rows)
        with self._cond:
            busy = self._waiting or None not in self._rows
            if busy and self._to_prefill and 0 < decoding < self.config.max_batch // 2:
                self._cond.wait_for(lambda: self._prefilled or self._closed, timeout=PREFILL_HOLD_SECONDS)

    def _drop_cancelled_waiting(self) -> None:
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            self._finish(request, "cancelled")

    def _admit(self) -> None:
        """Give free slots to waiting requests, in order, and hand them to the prefill thread
        (called holding ``_cond``)."""
        for slot, holder in enumerate(self._rows):
            if holder is None and self._waiting:
                request = self._waiting.popleft()
                request.slot = slot
                if request.cache is None:
                    request.cache = self.model.new_cache(1)
                self._rows[slot] = request
                self._to_prefill.append(request)
                self._cond.notify_all()

    def _join(self, request: Request, outcome: torch.Tensor | BaseException | None) -> None:
        """A request back from the prefill thread: into its slot's row, with its first token."""
        if outcome is None:
            self._finish(request, "cancelled")
            return
        if isinstance(outcome, BaseException):
            self._fail(request, outcome)
            return
        try:
            # Into the lowest row not decoding: the slot of another prompt still prefilling holds no data yet.
            lowest = next(s for s, holder in enumerate(self._rows) if holder is None or not holder.decoding)
            if lowest < request.slot:
                self._swap_slots(lowest, request.slot)
            self.slots.load(request.slot, request.cache)
            request.decoding = True
            self._accept(request, self._sample(request, outcome))
        except Exception as e:
            self._fail(request, e)

    def _swap_slots(self, a: int, b: int) -> None:
        self._rows[a], self._rows[b] = self._rows[b], self._rows[a]
        for slot in (a, b):
            if self._rows[slot] is not None:
                self._rows[slot].slot = slot

    def _pack_rows(self) -> None:
        """Move the highest decoding rows down into lower rows not decoding (free, or held by a
        prompt still prefilling), so that a step's rows, which run up to the highest decoding one,
        are few when few decode."""
        while True:
            idle = [s for s, holder in enumerate(self._rows) if holder is None or not holder.decoding]
            decoding = [s for s, holder in enumerate(self._rows) if holder is not None and holder.decoding]
            if not idle or not decoding or idle[0] > decoding[-1]:
                return
            self.slots.move(decoding[-1], idle[0])
            self._swap_slots(decoding[-1], idle[0])

    # -- the prefill thread ------------------------------------------------------------------------

    def _prefill_loop(self) -> None:
        with torch.inference_mode(), openmp_threads(1):
            while True:
                with self._cond:
                    while not (self._closed or self._to_prefill):
                        self._cond.wait()
                    if self._closed:
                        return
                    request = self._to_prefill[0]
                outcome = self._prefill(request)
                with self._cond:
                    self._to_prefill.popleft()
                    self._prefilled.append((request, outcome))
                    self._cond.notify_all()

    def _prefill(self, request: Request) -> torch.Tensor | BaseException | None:
        """``request``'s prompt into its own cache: its shared opening (kept, or computed and
        kept), then the rest a chunk at a time. Returns the last position's logits, or the failure
        (out of memory, a device error: this request ends, the others go on), or None if it was
        cancelled (or the engine closed) on the way. The opening is computed on its own even when
        it is not kept yet, so that a prompt's logits are the same whether it was or not."""
        try:
            if request.prefix and not request.prefilled:
                key = (tuple(request.ids[: request.prefix]), id(request.visual_prompt))
                kept = self._prefixes.get(key)
                if kept is not None and kept[0] is request.visual_prompt:
                    kept[1].copy_into(request.cache)
                    request.prefilled = request.prefix
                else:
                    if self._prefill_until(request, request.prefix) is None:
                        return None
                    snapshot = self.model.new_cache(1)
                    request.cache.copy_into(snapshot)
                    self._prefixes.put(key, (request.visual_prompt, snapshot), PREFIXES_KEPT)
            logits = self._prefill_until(request, len(request.ids))
        except Exception as e:
            return e
        return None if logits is None else logits[:, -1]

    def _prefill_until(self, request: Request, end: int) -> torch.Tensor | None:
        """Prefill ``request``'s tokens up to ``end``, a chunk at a time: the last chunk's logits, or
        None if it was cancelled (or the engine closed) on the way."""
        logits = None
        while request.prefilled < end:
            if request.cancelled.is_set() or self._closed:
                return None
            chunk = request.ids[request.prefilled : min(end, request.prefilled + self.config.prefill_chunk)]
            x = torch.tensor([chunk], device=self.device)
            # Prompt tokens even when a chunk is one token: the compiled step is the engine thread's
            # (called from here, on one OpenMP thread, it would fail its guards and compile anew).
            with computing_prompt_tokens():
                logits = self.model(x, visual_prompt=request.visual_prompt, cache=request.cache, last_only=True)
            request.prefilled += len(chunk)
        return logits

    # -- the engine thread, again ------------------------------------------------------------------

    def _decode_step(self) -> None:
        self._pack_rows()
        decoding = [r for r in self._rows if r is not None and r.decoding]
        if not decoding:
            return
        highest = max(r.slot for r in decoding)
        tokens = torch.zeros(next(n for n in self.row_counts if n > highest), 1, dtype=torch.long)
        for r in decoding:
            tokens[r.slot, 0] = r.last_token
        try:
            with openmp_threads(1 if self._to_prefill else self._threads):
                logits = decode_rows(self.model, self.slots, tokens.to(self.device))
        except Exception as e:  # a half-done step has written into every row: all of them end
            for r in decoding:
                self._fail(r, e)
            return
        for r in decoding:
            try:
                self._accept(r, self._sample(r, logits[r.slot : r.slot + 1]))
            except Exception as e:
                self._fail(r, e)

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        return int(sample_next(logits, request.params, request.generator, request.history))

    def _accept(self, request: Request, token: int) -> None:
        """Record a sampled token: send its text, and end the request if it is done."""
        request.generated.append(token)
        if token in self.tokenizer.stop_ids:
            self._finish(request, "stop")
            return
        piece = request.stream.push(token)
        if piece:
            request.post(piece)
        if request.stream.stopped:
            self._finish(request, "stop")
        elif len(request.generated) >= request.params.max_new_tokens:
            self._finish(request, "length")
        else:
            request.last_token = token
            if request.history is not None:
                request.history = torch.cat([request.history, torch.tensor([[token]], device=self.device)], 1)

    def _fail(self, request: Request, error: BaseException) -> None:
        log.error("Generation failed: %s: %s", type(error).__name__, error, exc_info=error)
        request.error = error
        self._finish(request, "error")

    def _finish(self, request: Request, reason: FinishReason) -> None:
        """End ``request``: its last text, its cache written back (a conversation's next turn
        reuses it), its slot freed, and whoever waits on it told."""
        if request.done:
            return
        request.finish_reason = reason
        slot = request.slot
        try:
            if reason in ("stop", "length"):
                tail = request.stream.finish()
                if tail:
                    request.post(tail)
            if slot is not None and reason != "error" and request.decoding:
                self.slots.save(slot, request.cache)
        except Exception as e:  # keep the engine alive; the request still ends
            log.exception("Could not finish a request cleanly")
            request.error, request.finish_reason = e, "error"
        finally:
            if slot is not None:
                self.slots.release(slot)
                self._rows[slot] = None
            with self._cond:
                self._running -= 1
            request.post(_END)
            request._done.set()

    def _warm_up(self) -> None:
        """Find the row counts before serving; a compiled decode step compiles here, for each
        count (the cache length left dynamic), not in the first user's answer. If that compile
        fails, decoding stays eager (slower, same answers)."""
        if "decode_step" in vars(self.model):  # compiled (LlamaAdapter.compile_decoding)
            log.info("Compiling the decode step for batches of up to %d", self.config.max_batch)
            try:
                self.row_counts = self._batch_invariant_row_counts(self.model, compile=True)
                return
            except Exception as e:  # inductor's failures are many and version-specific
                log.warning("Could not compile the batched decode step (%s); decoding stays eager", e)
                del self.model.decode_step
                self.compile_state = "eager"
        self.row_counts = self._batch_invariant_row_counts(self.model)

    def _batch_invariant_row_counts(self, model: LlamaAdapter, compile: bool = False) -> tuple[int, ...]:
        """The row counts (powers of two below ``max_batch``, and ``max_batch``) at which a decode
        step gives each row bitwise the logits a full step gives it, on probe rows of different
        tokens and lengths. Kernels choose their order of summation by shape, not by values, so
        one probe that agrees in every logit shows the same order. The probes' lengths differ and
        reach past 64 positions: attention kernels block their work by length too (SDPA's CPU
        kernel on two threads agreed on 2-4-token probes and differed on longer rows).
        ``compile``: each count's first step through ``model``'s (``torch.compile``-wrapped)
        decode step compiles it."""
        full = self.config.max_batch
        config = self.model.config
        probes = []
        for row in range(full):
            cache = model.new_cache(1)
            length = min(2 + row * 37 % 80, config.max_seq_len // 2)
            ids = [(row * 7 + i * 13) % config.vocab_size for i in range(length)]
            model(torch.tensor([ids], device=self.device), cache=cache)
            probes.append(cache)

        def step(rows: int) -> torch.Tensor:
            slots = SlotCache(model, full)
            for row, cache in enumerate(probes):
                slots.load(row, cache)
            tokens = torch.arange(1, rows + 1, device=self.device).unsqueeze(1)
            return decode_rows(model, slots, tokens, mark_dynamic=compile)

        reference = step(full)
        counts = [n for n in _powers_of_two_below(full) if torch.equal(step(n), reference[:n])]
        sizes = ", ".join(map(str, counts)) + (" or " if counts else "") + str(full)
        log.info("Decode steps compute %s rows: the counts whose rows are bitwise a full step's here", sizes)
        return (*counts, full)

    def compile_in_background(self) -> threading.Thread:
        """Compile the decode step for this engine's batch in another thread while the engine
        serves eager answers, and switch to it at the first step boundary where no answer is half
        written (compiled and eager logits agree within 1e-4; each answer keeps one of them from
        start to end). ``compile_state`` goes "compiling", then "compiled", or back to "eager"
        with a warning if compiling fails. Inductor caches on disk: the next start takes seconds.

        Call it before serving: it first compiles a one-op function in the caller's thread
        (:func:`initialise_inductor`)."""
        if self.compile_state != "eager":
            raise RuntimeError(f"The decode step is already {self.compile_state}.")
        try:
            initialise_inductor(self.device)
        except Exception:  # the decode step's compile then fails too, and says why (below)
            log.debug("Inductor's set-up failed", exc_info=True)
        self.compile_state = "compiling"
        thread = threading.Thread(target=self._compile_aside, name="llama-adapter-compile", daemon=True)
        thread.start()
        return thread

    def _compile_aside(self) -> None:
        started = time.perf_counter()
        log.info("Compiling the decode step in the background; answers are decoded eager meanwhile")
        try:
            with torch.inference_mode():
                shadow = copy.copy(self.model)  # the same modules and tensors; its own decode_step
                shadow.compile_decoding()  # its batch-1 graph too: a 1-token prefill chunk decodes through it
                row_counts = self._batch_invariant_row_counts(shadow, compile=True)
        except Exception as e:  # inductor's failures are many and version-specific
            log.warning("Could not compile the decode step (%s: %s); decoding stays eager", type(e).__name__, e)
            self.compile_state = "eager"
            return
        log.info(
            "Compiled the decode step in %.0f s; switching to it once the %d answers under way are done "
            "(newcomers wait until then)",
            time.perf_counter() - started,
            self.active,
        )
        with self._cond:
            self._compiled = (shadow.decode_step, row_counts)
            self._cond.notify_all()

    def _switch_to_compiled(self) -> None:
        self.model.decode_step, self.row_counts = self._compiled
        self._compiled = None
        self.compile_state = "compiled"
        log.info("Decoding with the compiled step")


def decode_rows(
    model: LlamaAdapter, slots: SlotCache, tokens: torch.Tensor, mark_dynamic: bool = False
) -> torch.Tensor:
    """One decode step of the first ``len(tokens)`` rows of ``slots`` (the others must be free):
    logits [rows, vocab]. ``mark_dynamic``: the cache length is dynamic for a step that compiles."""
    slots.reserve(1)
    cache = slots.first(len(tokens))
    if mark_dynamic:
        cache.mark_length_dynamic()
    logits = model(tokens, cache=cache)[:, -1]
    slots.advance(1)
    return logits


def initialise_inductor(device: torch.device) -> None:
    """Run inductor's one-time set-up for this process now, by compiling a one-op function.

    Inductor's first lowering in a process traces a function with ``torch.fx.symbolic_trace``,
    which patches ``nn.Module.__call__`` for every thread while it runs: a model called in another
    thread at that moment fails ("module is not installed as a submodule"). Seen under load as an
    answer failing while the decode step compiled in the background on a cold cache."""
    options = {"cpp_wrapper": True} if device.type == "cpu" else None
    with torch.inference_mode():
        torch.compile(_one_op, fullgraph=True, options=options)(torch.ones(4, device=device))


def _one_op(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def release_openmp_workers() -> None:
    """Let go of the OpenMP worker threads the calling thread holds (OpenMP keeps a team of them
    for each thread that has run a parallel region). Once a process holds more OpenMP threads than
    cores, libgomp stops spinning between parallel regions, and each of a decode step's hundreds of
    small regions waits ~100 µs for its workers to wake: on 2 cores the engine thread decoded at
    half speed as soon as the thread that loaded the model had run any torch op. So every thread
    but the engine's gives its workers back before the engine computes; the next torch op in that
    thread makes a new team. A no-op where the OpenMP runtime has no ``omp_pause_resource_all``."""
    pause = _openmp_call("omp_pause_resource_all")
    if pause is not None:
        pause(1)  # omp_pause_soft: the calling thread's idle workers end


@functools.cache
def _openmp_call(name: str) -> Callable | None:
    """``name`` of torch's OpenMP runtime (loaded with it), or None where it has no such call."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None


@contextlib.contextmanager
def openmp_threads(threads: int) -> Iterator[None]:
    """Inside, the calling thread's torch ops compute on ``threads`` threads: its own OpenMP and MKL
    settings, not the process default that ``torch.set_num_threads`` also changes and that threads
    yet to start would take. A no-op where the runtimes lack the calls."""
    setters = _thread_count_setters()
    before = torch.get_num_threads()
    if setters is None or threads == before:
        yield
        return
    set_openmp, set_mkl = setters
    set_openmp(threads)
    mkl_before = set_mkl(threads) if set_mkl is not None else None
    try:
        yield
    finally:
        set_openmp(before)
        if set_mkl is not None:
            set_mkl(mkl_before)


@functools.cache
def _thread_count_setters() -> tuple[Callable[[int], None], Callable[[int], int] | None] | None:
    """``omp_set_num_threads`` of torch's OpenMP runtime, and MKL's per-thread count from libtorch
    (MKL's products, e.g. attention's, keep their own setting)."""
    set_openmp = _openmp_call("omp_set_num_threads")
    if set_openmp is None:
        return None
    try:
        set_mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
        set_mkl.restype = ctypes.c_int
    except (AttributeError, OSError, TypeError):
        set_mkl = None
    return set_openmp, set_mkl


def _powers_of_two_below(n: int) -> list[int]:
    return [1 << k for k in range(n.bit_length()) if 1 << k < n]
