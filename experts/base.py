"""The expert interface, the registry, and :func:`run_experts` (cache, time limits, failure isolation).

An expert turns a PIL image into text (OCR, a caption, tags). The answer must never depend on an
expert behaving: every call runs in its own worker thread with a time limit, and a failure, a
timeout or a missing model only marks that expert as skipped in the :class:`ExpertReport`.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Sequence, Union

from PIL import Image

log = logging.getLogger(__name__)

KINDS = ("ocr", "caption")
"""Expert kinds; each kind name is also an alias for the preferred available expert of that kind."""

Status = Literal["ok", "failed", "timeout", "unavailable"]

MAX_CONTEXT_CHARS = 2000
"""Longest expert text put into a prompt (about 500 tokens): a page of small print must not push
the question out of the model's context. The report keeps the full text."""


@dataclass(frozen=True)
class Availability:
    """Whether an expert can run now; if not, ``reason`` says why and ``fix`` how to make it so."""

    available: bool
    reason: str = ""
    fix: str = ""

    def __bool__(self) -> bool:
        return self.available

    def __str__(self) -> str:
        if self.available:
            return f"available{f' ({self.reason})' if self.reason else ''}"
        return " ".join(part for part in (self.reason, self.fix) if part)


class Expert(abc.ABC):
    """Something that describes an image in words.

    Subclasses set ``name`` (unique in a registry), ``kind`` (one of :data:`KINDS`), ``label``
    (shown in the UI) and ``context_label`` (how its text is introduced to the model).
    ``describe`` may be slow and may raise; :func:`run_experts` contains both.
    """

    name: str
    kind: str
    label: str
    context_label: str
    timeout_s: float = 60.0

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Cheap check (no model loading) of whether :meth:`describe` can work."""

    @abc.abstractmethod
    def describe(self, image: Image.Image) -> str:
        """The text for one RGB image ("" when there is nothing to say, e.g. no text found)."""

    @property
    def cache_key(self) -> str:
        """Identifies this expert's output for the cache; include every setting that changes the text."""
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


@dataclass
class ExpertResult:
    """One expert's outcome for one image."""

    name: str
    label: str
    context_label: str
    status: Status
    text: str = ""
    reason: str = ""
    seconds: float = 0.0
    cached: bool = False

    @property
    def used(self) -> bool:
        """Whether this result adds text to the prompt."""
        return self.status == "ok" and bool(self.text.strip())

    @property
    def skipped(self) -> bool:
        return self.status != "ok"

    def context_line(self) -> str:
        text = self.text.strip()
        if len(text) > MAX_CONTEXT_CHARS:
            text = text[:MAX_CONTEXT_CHARS].rsplit(maxsplit=1)[0] + " […]"
        return f"{self.context_label}:\n{text}" if "\n" in text else f"{self.context_label}: {text}"

    def summary(self) -> str:
        """One line for a UI or a log."""
        if self.status == "ok":
            how = "cached" if self.cached else f"{self.seconds:.2f} s"
            return f"{self.name}: {'no text' if not self.text.strip() else 'ok'} ({how})"
        return f"{self.name}: skipped ({self.status}) — {self.reason}"


@dataclass
class ExpertReport:
    """The results of a set of experts on one image, in the order they were asked for."""

    results: list[ExpertResult] = field(default_factory=list)
    image_hash: str | None = None

    def __iter__(self) -> Iterator[ExpertResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, name: str) -> ExpertResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"No result for expert {name!r}; have {[r.name for r in self.results]}")

    @property
    def texts(self) -> dict[str, str]:
        return {r.name: r.text for r in self.results if r.status == "ok"}

    @property
    def skipped(self) -> list[ExpertResult]:
        return [r for r in self.results if r.skipped]

    @property
    def context(self) -> str | None:
        """The expert text for the prompt, or ``None`` when no expert had anything to add."""
        lines = [r.context_line() for r in self.results if r.used]
        return "\n".join(lines) if lines else None


def image_hash(image: Image.Image) -> str:
    """sha256 of the pixels (with mode and size): equal images hash equal whatever file they came from."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class ExpertCache:
    """A thread-safe in-memory LRU of expert texts keyed by (expert cache key, image hash)."""

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> str | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: tuple[str, str], text: str) -> None:
        with self._lock:
            self._items[key] = text
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


DEFAULT_CACHE = ExpertCache()


class Registry:
    """The experts a program offers, by name; kind names (``"ocr"``, ``"caption"``) resolve to the
    first available expert of that kind in registration order, ``"all"`` to one per kind."""

    def __init__(self, experts: Iterable[Expert] = ()) -> None:
        self._experts: dict[str, Expert] = {}
        for e in experts:
            self.register(e)

    def register(self, expert: Expert, *, first: bool = False, replace: bool = False) -> Expert:
        """Add ``expert``; ``first=True`` makes it the preferred one of its kind."""
        if expert.kind not in KINDS:
            raise ValueError(f"Expert {expert.name!r} has kind {expert.kind!r}; use one of {KINDS}")
        if expert.name in KINDS or expert.name == "all":
            raise ValueError(f"{expert.name!r} is reserved as an alias; give the expert another name")
        if expert.name in self._experts and not replace:
            raise ValueError(f"An expert named {expert.name!r} is already registered (pass replace=True)")
        if first:
            self._experts.pop(expert.name, None)
            self._experts = {expert.name: expert, **self._experts}
        else:
            self._experts[expert.name] = expert  # a replaced expert keeps its place in the preference order
        return expert

    def __iter__(self) -> Iterator[Expert]:
        return iter(list(self._experts.values()))

    def names(self) -> list[str]:
        return list(self._experts)

    def get(self, name: str) -> Expert:
        """The expert called ``name``, a kind alias resolved, or a ``KeyError`` listing the choices."""
        if name in self._experts:
            return self._experts[name]
        if name in KINDS:
            of_kind = [e for e in self._experts.values() if e.kind == name]
            if not of_kind:
                raise KeyError(f"No {name} expert is registered")
            # An unavailable one is still returned so that the report can say why it was skipped.
            return next((e for e in of_kind if _safe_availability(e)), of_kind[0])
        raise KeyError(f"Unknown expert {name!r}; choose from {', '.join([*KINDS, 'all', *self._experts])}")

    def resolve(self, spec: str | Expert | Sequence[str | Expert]) -> list[Expert]:
        """Experts from names, aliases, ``"all"``, a comma-separated string, or Expert objects; no duplicates."""
        items: list[str | Expert] = [spec] if isinstance(spec, (str, Expert)) else list(spec)
        out: list[Expert] = []
        for item in items:
            if isinstance(item, Expert):
                found = [item]
            else:
                names = [n.strip() for n in item.split(",") if n.strip()]
                found = [
                    self.get(k)
                    for n in names
                    for k in (
                        [k for k in KINDS if any(e.kind == k for e in self._experts.values())] if n == "all" else [n]
                    )
                ]
            out.extend(e for e in found if e not in out)
        return out


ExpertSpec = Union[str, Expert, Sequence[Union[str, Expert]]]


def _safe_availability(expert: Expert) -> Availability:
    try:
        return expert.availability()
    except Exception as e:  # an availability check must not break the answer either
        log.warning("Availability check of expert %s failed: %s", expert.name, e)
        return Availability(False, f"its availability check failed ({type(e).__name__}: {e}).")


def _cache_key(expert: Expert, image: Image.Image, digest: str | None) -> tuple[str, str] | None:
    try:
        return expert.cache_key, digest or image_hash(image)
    except Exception as e:  # e.g. a settings lookup that needs a missing package: run uncached
        log.warning("Expert %s has no cache key (%s: %s); running it uncached", expert.name, type(e).__name__, e)
        return None


_busy_locks: weakref.WeakKeyDictionary[Expert, threading.Lock] = weakref.WeakKeyDictionary()
_busy_locks_guard = threading.Lock()


def _busy_lock(expert: Expert) -> threading.Lock:
    """One call at a time per expert: models are not all thread-safe, and an abandoned (timed-out)
    call keeps the expert busy so later calls wait for it instead of piling up threads."""
    with _busy_locks_guard:
        lock = _busy_locks.get(expert)
        if lock is None:
            lock = _busy_locks[expert] = threading.Lock()
        return lock


def run_expert(
    expert: Expert,
    image: Image.Image,
    *,
    timeout_s: float | None = None,
    cache: ExpertCache | None = DEFAULT_CACHE,
    digest: str | None = None,
) -> ExpertResult:
    """Run one expert on an RGB image with its time limit; never raises for the expert's faults."""
    result = ExpertResult(expert.name, expert.label, expert.context_label, "ok")
    started = time.perf_counter()
    key = _cache_key(expert, image, digest) if cache is not None else None
    if key is not None:
        hit = cache.get(key)
        if hit is not None:
            result.text, result.cached = hit, True
            result.seconds = time.perf_counter() - started
            return result
    availability = _safe_availability(expert)
    if not availability:
        result.status, result.reason = "unavailable", str(availability)
        return result

    limit = expert.timeout_s if timeout_s is None else timeout_s
    done = threading.Event()
    abandoned = threading.Event()
    began = threading.Event()
    box: dict[str, object] = {}

    def work() -> None:
        try:
            with _busy_lock(expert):
                if abandoned.is_set():
                    return
                began.set()
                text = expert.describe(image)
                if not isinstance(text, str):
                    raise TypeError(f"describe() returned {type(text).__name__}, not str")
                box["text"] = text
                if key is not None:
                    # Also when the caller gave up: a slow first call (model loading) still fills the cache.
                    cache.put(key, text)
        except BaseException as e:  # noqa: B036 - anything the expert raises is reported, not propagated
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name=f"expert-{expert.name}", daemon=True).start()
    finished = done.wait(limit)
    result.seconds = time.perf_counter() - started
    if not finished:
        abandoned.set()
        result.status = "timeout"
        result.reason = f"no answer within its {limit:g} s limit" + (
            "" if began.is_set() else " (still busy with an earlier call that timed out)"
        )
        log.warning("Expert %s skipped: %s", expert.name, result.reason)
    elif "error" in box:
        error = box["error"]
        result.status = "failed"
        result.reason = f"{type(error).__name__}: {error}"
        log.warning("Expert %s failed: %s", expert.name, result.reason, exc_info=error)  # type: ignore[arg-type]
    else:
        result.text = box["text"]  # type: ignore[assignment]
    return result


def run_experts(
    image: Image.Image,
    experts: ExpertSpec,
    *,
    registry: Registry | None = None,
    timeout_s: float | None = None,
    cache: ExpertCache | None = DEFAULT_CACHE,
) -> ExpertReport:
    """Run ``experts`` (names, aliases or objects) one after another on an RGB PIL image.

    Sequential on purpose: experts are CPU/GPU-bound and would only slow each other down. Each
    gets its own time limit (``timeout_s`` overrides every expert's ``timeout_s``); pass
    ``cache=None`` to bypass the cache.
    """
    chosen = resolve_experts(experts, registry)
    report = ExpertReport(image_hash=image_hash(image) if chosen else None)
    for expert in chosen:
        report.results.append(run_expert(expert, image, timeout_s=timeout_s, cache=cache, digest=report.image_hash))
    return report


def resolve_experts(spec: ExpertSpec, registry: Registry | None = None) -> list[Expert]:
    """``spec`` as Expert objects, looked up in ``registry`` (default: :func:`default_registry`)."""
    only_objects = isinstance(spec, Expert) or (not isinstance(spec, str) and all(isinstance(e, Expert) for e in spec))
    if registry is None:
        # Expert objects need no lookup: don't build (and import) the default registry for them.
        registry = Registry() if only_objects else default_registry()
    return registry.resolve(spec)


_default: Registry | None = None
_default_guard = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry (models load once per process): OCR engines easyocr and
    tesseract, then the captioners CoCa and the ImageNet tagger. Register a LLaMA-Adapter caption
    adapter with ``default_registry().register(AdapterCaptioner(pipe), first=True)``."""
    global _default
    with _default_guard:
        if _default is None:
            from .caption import CocaCaptioner, ImageNetTagger
            from .ocr import OcrExpert

            _default = Registry(
                [
                    OcrExpert("easyocr"),
                    OcrExpert("tesseract"),
                    CocaCaptioner(),
                    ImageNetTagger(),
                ]
            )
        return _default
