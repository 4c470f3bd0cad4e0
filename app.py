"""The LLaMA-Adapter V2 demo: one chat in which any message may bring an image, OCR and caption
experts shown as steps, pictures of what the last answer drew on (on request), and a
with/without-experts comparison.

    python app.py                                     # the shipped demo model, offline, http://127.0.0.1:7860
    python app.py --base /path/to/llama_dir --adapter BIAS-7B --device cuda --share

Layout and wiring only: the conversation is an ``experts.MultimodalChat`` (images per turn, retry,
undo, edit, system prompt, the experts' per-turn report); every action calls one library function
(``MultimodalChat.stream``, ``MultimodalChat.explain``, ``experts.compare``, ``experts.describe``,
``Pipeline.stream``). One model
per process is shared by every session; each session keeps its own conversation (and its KV cache)
in ``gr.State``. Named API endpoints for ``gradio_client``: ``/chat``, ``/chat_multimodal``,
``/describe_image``, ``/compare``; and on the same port the OpenAI-compatible
``/v1/chat/completions`` and ``/v1/models`` (``llama_adapter.serve``). Every answer, from any door,
is written by the pipeline's engine, which decodes all the requests under way together.
"""

from __future__ import annotations

import os

# Before torch is imported. OpenMP workers spin this long for the next parallel region before they
# sleep: a decode step runs hundreds of regions back to back, and waking sleeping workers for each
# made a lone user's answer 3.3× slower (OMP_WAIT_POLICY=PASSIVE, which this replaces); libgomp's
# default spins 3× longer, which under 20 users took CPU the other threads needed (README,
# "Generation speed").
os.environ.setdefault("GOMP_SPINCOUNT", "100000")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator, Sequence, TypeVar  # noqa: E402

import gradio as gr  # noqa: E402
from fastapi import APIRouter  # noqa: E402
from gradio import FileData  # noqa: E402

from experts import (  # noqa: E402
    AdapterCaptioner,
    Comparison,
    MultimodalChat,
    Registry,
    Turn,
    compare,
    describe,
    measured_defaults,
    registry_for,
    run_experts,
)
from llama_adapter import LlamaAdapterError, Pipeline, Trace, pictures, serve  # noqa: E402
from llama_adapter.cli import (  # noqa: E402
    add_model_arguments,
    add_positive_int_flags,
    add_server_arguments,
    check_environment_choices,
    load_for_serving,
)
from llama_adapter.engine import EngineConfig  # noqa: E402
from llama_adapter.pipeline import Limits  # noqa: E402

log = logging.getLogger("app")

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
QUEUE_SIZE = EngineConfig.max_waiting
"""Waiting requests beyond this are turned away at once rather than left to wait for many minutes."""
MAX_NEW_TOKENS = 1024
"""Longest answer a request may ask for (the sliders' maximum)."""
MAX_MESSAGE_CHARS = 8000
"""Longest message typed (longer text is not turned into a file); the library still refuses a prompt
longer than the model's context."""
MAX_FILE_SIZE = "25mb"
DEFAULT_QUESTION = "Describe the image."
"""The question of a message that brings images and no text."""
CHAT_EXAMPLES = [
    "Name three colours.",
    "Write a haiku about autumn.",
    "Explain in one sentence why the sky is blue.",
    "Give me three tips for learning a new language.",
]
CSS = """
#chatbot [data-testid=user] img { max-height: 180px; width: auto; object-fit: contain; }
#chatbot .message-row.bot-row { min-width: min(36rem, calc(100% - 60px)); }
"""
"""Pictures in the conversation as thumbnails (the one in view is shown beside it), and room for the
steps' titles."""
NO_IMAGE = "_No image yet: attach, paste or drop one with your message._"
INSIDE = (
    "_Press the button to see what the last answer drew on: where the model looked on the image, the "
    "adapter gates per layer, and how much each answer token leaned on the adapter prompts (traced on "
    "request: normal answers pay nothing)._"
)
INSIDE_PICTURES = {
    "looked": "Where it looked (visual queries over the image encoder's grid)",
    "gates": "Gates per layer and head, tanh(gate)",
    "adapter_share": "How much each answer token leaned on the adapter prompts",
    "repeated": "Expert text the answer repeats",
}
COMPARE_INSIDE = "_Press the button to see what each of the two answers drew on, side by side (traced on request)._"
NOT_COMPARED = "_Press **Compare** to answer the question without and with the chosen experts, same seed._"
F = TypeVar("F", bound=Callable[..., Any])

try:
    import spaces

    gpu: Callable[[F], F] = spaces.GPU
except ImportError:

    def gpu(fn: F) -> F:
        """Without the ``spaces`` package (anywhere but Hugging Face Spaces) there is no GPU to request."""
        return fn


@dataclass(eq=False)
class Conversation:
    """One browser session's chat, the switch that stops its answer, and a lock held while an answer
    is written, so that Undo or Clear wait until a stopped answer is in the history."""

    chat: MultimodalChat
    cancel: threading.Event = field(default_factory=threading.Event)
    busy: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def turn(self) -> Iterator[threading.Event]:
        with self.busy:
            self.cancel = threading.Event()
            yield self.cancel

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the answer being written, if any, and hold the conversation still."""
        self.cancel.set()
        if not self.busy.acquire(timeout=30):
            raise gr.Error("The previous answer is still being written. Try again in a moment.")
        try:
            yield
        finally:
            self.busy.release()


# -- presentation -----------------------------------------------------------------------------------------


def file_name(image: Any) -> str:
    return Path(image).name if isinstance(image, (str, os.PathLike)) else "an image"


def step(title: str, content: str, *, log: str | None = None, duration: float | None = None) -> dict[str, Any]:
    """A collapsed step before an answer (Gradio shows a message with a title as a foldable "thought")."""
    metadata: dict[str, Any] = {"title": title, "status": "done"}
    if log:
        metadata["log"] = log
    if duration is not None:
        metadata["duration"] = round(duration, 2)
    return {"role": "assistant", "content": content, "metadata": metadata}


def fenced(text: str) -> str:
    return "```text\n" + text.replace("```", "ʼʼʼ") + "\n```"


def image_step(turn: Turn, number: int, in_view: bool, sees_images: bool) -> dict[str, Any]:
    """Which image a turn brought, whether it is still the one in view, and those it left unread."""
    title = f"Image {number}: {file_name(turn.attached[-1])}"
    title += " · in view" if in_view else " · replaced by a later image"
    lines = []
    if turn.unused:
        title += f" (the last of {len(turn.attached)} attached)"
        unread = ", ".join(file_name(i) for i in turn.unused)
        lines.append(f"The model takes one image per turn: it uses the last one attached. Not read: {unread}.")
    if not sees_images:
        lines.append("This model cannot see pictures: it reads only the experts' text about this one.")
    elif in_view:
        lines.append(
            "The model sees this image from this turn on. It reads the turns asked with no image and those "
            "about this one; turns about earlier images stay here, unread."
        )
    else:
        lines.append("A later image replaced it: the model no longer reads the turns about it.")
    return step(title, "\n\n".join(lines))


def expert_steps(turn: Turn) -> list[dict[str, Any]]:
    """One step per expert that ran for this turn (its text, time or "cached", or why it was skipped),
    and one for those whose text about this image is in an earlier turn."""
    steps = []
    for r in turn.experts:
        if r.status != "ok":
            steps.append(step(f"{r.label}: skipped", r.reason, log=r.status))
            continue
        text = fenced(r.text.strip()) if r.text.strip() else "_No text found._"
        steps.append(step(r.label, text, log="cached" if r.cached else None, duration=None if r.cached else r.seconds))
    if turn.earlier:
        labels = ", ".join(r.label for r in turn.earlier)
        steps.append(step(f"{labels}: read this image already", "Their text is in an earlier turn of this image."))
    return steps


def prompt_step(turn: Turn) -> dict[str, Any]:
    cached = turn.prompt_tokens - turn.prefill_tokens
    log = f"{turn.prompt_tokens:,} tokens" + (f", {cached:,} of them from the KV cache" if cached else "")
    return step("The exact prompt", fenced(turn.prompt), log=log)


def question_messages(question: str, files: Sequence[Any]) -> list[dict[str, Any]]:
    """A question as Gradio shows a multimodal message: its text, then each picture it brought. (Gradio
    6.31 offers Edit on a message that ends in text, and its edit fails on a picture: so a question
    with pictures is not editable, and one without is.)"""
    shown = [{"role": "user", "content": {"path": str(f)}} for f in files if isinstance(f, (str, os.PathLike))]
    return [{"role": "user", "content": question}, *shown]


def asked_before(messages: list[dict[str, Any]], index: int) -> int:
    """How many questions come before the shown message at ``index`` (its turn's number)."""
    return sum(m["role"] == "user" and isinstance(m["content"], str) for m in messages[:index])


def conversation(
    chat: MultimodalChat, answering: str | None = None, *, turns: int | None = None
) -> list[dict[str, Any]]:
    """The chat as Gradio messages: each question with its images, then the steps that led to its
    answer (the image it brought, the experts, the exact prompt), then the answer. ``answering``:
    the answer being written to the last question; ``turns``: only the first so many turns."""
    messages: list[dict[str, Any]] = []
    images = asked = 0
    for m in chat.messages:
        if m["role"] == "user":
            asked += 1
            if turns is not None and asked > turns:
                break
        if m["role"] == "assistant":
            messages.append({"role": "assistant", "content": m["content"] or "_(no answer)_"})
        elif m["role"] == "user":
            turn: Turn = m["record"]
            messages += question_messages(turn.question, turn.attached)
            if turn.new_image:
                images += 1
                in_view = turn.image is chat.image
                messages.append(image_step(turn, images, in_view, chat.pipeline.accepts_images))
            messages += expert_steps(turn)
            if turn.prompt:
                messages.append(prompt_step(turn))
    if answering is not None:
        messages.append({"role": "assistant", "content": answering})
    return messages


def pending(
    chat: MultimodalChat, question: str, files: list[str], names: list[str], before: list[dict] | None = None
) -> list[dict[str, Any]]:
    """The chat (or ``before``) with a question just asked, and the experts ``names`` reading its image."""
    reading = []
    if names and (files or chat.image is not None):
        title = f"Reading the image: {', '.join(names)}…"
        reading = [{"role": "assistant", "content": "", "metadata": {"title": title, "status": "pending"}}]
    return [*(conversation(chat) if before is None else before), *question_messages(question, files), *reading]


def image_in_view(chat: MultimodalChat) -> tuple[Any, str]:
    """The image the model sees now (as the file it came from, where there is one) and a line about it."""
    image = chat.image
    if image is None:
        return None, NO_IMAGE
    turns = chat.turns
    how = "The model sees it" if chat.image_to_model else "The experts read it (this model cannot see images)"
    brought = next((i for i, t in enumerate(turns) if t.image is image and t.new_image), None)
    if brought is None:  # its turn was dropped to fit the context
        return image, f"**The image in view**. {how}; a new image replaces it."
    number = sum(t.new_image for t in turns[: brought + 1])
    source = turns[brought].attached[-1]
    shown = source if isinstance(source, (str, os.PathLike)) else image
    return shown, f"**Image {number}** ({file_name(source)}). {how}; a new image replaces it."


def inside_summary(question: str, trace: Trace) -> str:
    """A line above the pictures: which answer they show."""
    line = f"**Inside the answer to** _{question}_: {len(trace.tokens)} tokens, traced over what the model read."
    if trace.grid is not None:
        line += f" Where it looked: the image encoder's {'×'.join(map(str, trace.grid.shape))} grid."
    return line


def plot_box(title: str, elem_id: str) -> gr.Plot:
    """An empty, hidden place for one picture of an answer's trace."""
    return gr.Plot(label=title, show_label=False, visible=False, format="png", elem_id=elem_id)


def drawn(trace: Trace, plots: dict[str, gr.Plot]) -> dict[gr.Plot, gr.Plot]:
    """The ``plots`` (by :data:`INSIDE_PICTURES` name) showing ``trace``'s pictures; those it has none for hidden."""
    figures = pictures.draw(trace)
    return {plot: gr.Plot(figures.get(name), visible=name in figures) for name, plot in plots.items()}


def header_markdown(pipe: Pipeline, queue_size: int = QUEUE_SIZE) -> str:
    info = pipe.info
    adapter = Path(info["adapter"]).name if info.get("adapter") else "none (plain base model)"
    precision = info["dtype"] + (f", {info['quantize']} weights" if info.get("quantize") else "")
    sight = f"sees images through {info['image_encoder']}" if pipe.accepts_images else "text only"
    return (
        "# LLaMA-Adapter V2\n"
        f"**Base** `{info['base']}` · **adapter** `{adapter}` · **precision** {precision} on `{info['device']}` "
        f"· {sight}\n\n"
        f"A parameter-efficient visual instruction model. Up to {pipe.engine.config.max_batch} answers are "
        f"written together; others wait in a queue of up to {queue_size}."
    )


def plain(error: Exception) -> str:
    """The sentence of a library error (a KeyError's message is its first argument, unquoted)."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def sampling(temperature: Any, top_p: Any, max_new_tokens: Any, seed: Any) -> dict[str, Any]:
    """Sampling settings from UI or API values; one that is not a number gets a plain error (the
    library checks the ranges)."""

    def number(name: str, value: Any, kind: type) -> Any:
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            return kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError, OverflowError):
            raise gr.Error(f"{name} must be a number (got {value!r:.40})", print_exception=False) from None

    seed = None if seed is None else number("seed", seed, int)
    return {
        "temperature": number("temperature", temperature, float),
        "top_p": number("top_p", top_p, float),
        "max_new_tokens": number("max_new_tokens", max_new_tokens, int),
        "seed": None if seed is None or seed < 0 else seed,
    }


UPLOAD_REQUIRED = (
    "Upload the image with the request (e.g. gradio_client.handle_file('photo.jpg'), or the upload button): "
    "this server does not open files or URLs named by a client."
)


def client_may_name(path: str, roots: Sequence[Path], allow_urls: bool = False) -> bool:
    """Whether a request may name ``path``: a file under one of ``roots`` (Gradio's upload folder, the
    shipped examples, folders the operator allows), or an http(s) URL when the operator allows those."""
    if path.startswith(("http://", "https://")):
        return allow_urls
    resolved = Path(path).resolve()  # a relative path resolves against the working directory: refused
    return any(resolved.is_relative_to(root) for root in roots)


def client_roots(allowed_dirs: Sequence[str | Path] = ()) -> list[Path]:
    """Where the files a client may name live: its uploads, Gradio's static paths (the examples), and
    ``allowed_dirs``."""
    from gradio.data_classes import _StaticFiles

    roots = [gr.utils.get_upload_folder(), *_StaticFiles.all_paths, *allowed_dirs]
    return [Path(r).resolve() for r in roots]


def named_paths(value: Any) -> Iterator[str]:
    """The ``path`` of every dict in a request body (how Gradio's ``FileData`` names a file)."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str):
            yield value["path"]
        for item in value.values():
            yield from named_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from named_paths(item)


class UploadsOnly:
    """ASGI middleware on the Gradio server: a call (``/gradio_api/queue/join``, ``/call``, ``/run``, any
    JSON POST) that names a file the client did not upload is refused before Gradio reads, copies or
    fetches anything. Gradio itself refuses local paths outside its upload folder, but with no message,
    and fetches public URLs; this refusal says what to do (status 422, Gradio's validation shape, which
    ``gradio_client`` raises as a ``ValidationError``) and is logged."""

    MAX_BODY = 64 * 2**20
    UNINSPECTED = ("/upload", "/process_recording")  # multipart uploads: the way files are meant to arrive

    def __init__(self, app: Any, allowed_dirs: Sequence[str | Path] = (), allow_urls: bool = False) -> None:
        self.app, self.allowed_dirs, self.allow_urls = app, allowed_dirs, allow_urls

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or "/gradio_api/" not in path:
            return await self.app(scope, receive, send)
        if path.rstrip("/").endswith(self.UNINSPECTED):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.MAX_BODY:
                return await self._respond(scope, receive, send, 413, {"detail": "Request body too large."})
        refused = self._refused(body)
        if refused:
            client = scope.get("client") or ("?", 0)
            log.warning("Refused a request to %s naming %s (not uploaded; from %s)", path, refused, client[0])
            return await self._respond(scope, receive, send, 422, self._validation_errors(body))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _refused(self, body: bytes) -> list[str]:
        try:
            data = json.loads(body)
        except ValueError:
            return []  # not JSON: Gradio refuses it on its own
        roots = client_roots(self.allowed_dirs)
        return [p for p in named_paths(data) if not client_may_name(p, roots, self.allow_urls)]

    def _validation_errors(self, body: bytes) -> dict[str, Any]:
        data = json.loads(body)
        inputs = data.get("data") if isinstance(data, dict) and isinstance(data.get("data"), list) else [data]
        roots = client_roots(self.allowed_dirs)
        detail = [
            {"__type__": "validate", "is_valid": False, "message": UPLOAD_REQUIRED}
            if any(not client_may_name(p, roots, self.allow_urls) for p in named_paths(value))
            else {"__type__": "validate", "is_valid": True, "message": ""}
            for value in inputs
        ]
        return {"detail": detail, "error": UPLOAD_REQUIRED}

    @staticmethod
    async def _respond(scope: dict, receive: Callable, send: Callable, status: int, content: dict) -> None:
        from starlette.responses import JSONResponse

        await JSONResponse(content, status_code=status)(scope, receive, send)


def upload_path(image: FileData | dict | None, allowed_dirs: Sequence[Path] = ()) -> str | None:
    """The server-side path of an uploaded image: Gradio hands it over unprocessed (``preprocess=False``)
    so that a corrupt or huge file reaches ``open_image`` and gets a plain answer instead of a crash.

    The door is :class:`UploadsOnly`, which refuses a request naming any other file before Gradio
    touches it; this check repeats its rule for calls that did not come through it (the app launched
    some other way, or called in-process)."""
    if image is None:
        return None
    if isinstance(image, FileData):
        path = image.path
    elif isinstance(image, dict) and isinstance(image.get("path"), str) and image["path"]:
        path = image["path"]
    else:
        raise gr.Error("Send the image as a file, e.g. gradio_client.handle_file('photo.jpg').", print_exception=False)
    if not client_may_name(path, client_roots(allowed_dirs)):
        log.warning("Refused an image path outside the upload folder: %r", path)
        raise gr.Error(UPLOAD_REQUIRED, print_exception=False)
    return path


def load_examples(directory: Path) -> list[list[str]]:
    """``[image path, question]`` rows from ``directory/examples.json``; none when it is missing."""
    index = directory / "examples.json"
    if not index.is_file():
        log.info("No example images (%s not found)", index)
        return []
    try:
        items = json.loads(index.read_text())
        rows = [[str(directory / item["image"]), str(item["question"])] for item in items]
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.warning("Ignoring unreadable examples index %s: %s", index, e)
        return []
    return [row for row in rows if Path(row[0]).is_file()]


def expert_choices(registry: Registry) -> list[tuple[str, str]]:
    """(label, kind) of the preferred expert of each kind, e.g. ("OCR (easyocr)", "ocr"), then
    (label, name) of the model's own caption when it is registered and not already the preferred."""
    choices, preferred = [], {}
    for kind in ("ocr", "caption"):
        try:
            preferred[kind] = registry.get(kind)
            choices.append((preferred[kind].label, kind))
        except KeyError:
            log.info("No %s expert registered", kind)
    own = AdapterCaptioner.name
    if own in registry.names() and registry.get(own) is not preferred.get("caption"):
        choices.append((registry.get(own).label, own))
    return choices


def message_parts(text: Any, files: list[str]) -> str:
    """The question of a message: its text, or :data:`DEFAULT_QUESTION` when it brings only images."""
    if text is not None and not isinstance(text, str):
        raise gr.Error(f"The message text must be a string; got {type(text).__name__}", print_exception=False)
    return DEFAULT_QUESTION if files and not (text or "").strip() else text or ""


def api_files(files: Any, allowed_dirs: Sequence[Path] = ()) -> list[str]:
    """The server paths of the images a client uploaded with a message (``handle_file`` values)."""
    if files is None:
        return []
    if not isinstance(files, list):
        raise gr.Error("files must be a list, e.g. [gradio_client.handle_file('photo.jpg')].", print_exception=False)
    return [upload_path(f, allowed_dirs) for f in files]


def api_history(history: Any, allowed_dirs: Sequence[Path] = ()) -> list[dict[str, Any]]:
    """``/chat_multimodal``'s history as library messages: each ``{"role", "content"}`` with, on a user
    message, the ``"files"`` it brought (its last image is the one the model saw)."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise gr.Error('history must be a list of {"role", "content", "files"} messages.', print_exception=False)
    messages = []
    for m in history:
        if isinstance(m, dict) and "files" in m:
            files = api_files(m["files"], allowed_dirs)
            m = {k: v for k, v in m.items() if k != "files"}
            if files:
                m["image"] = files[-1]
        messages.append(m)
    return messages


@dataclass
class Page:
    """The components the handlers write to."""

    state: gr.State
    chatbot: gr.Chatbot
    box: gr.MultimodalTextbox
    in_view: gr.Image
    in_view_note: gr.Markdown
    compare_image: gr.Image
    compare_question: gr.Textbox
    compare_panes: dict[str, tuple[gr.Markdown, gr.Markdown, gr.Code]]
    """"without" and "with": title, answer, prompt."""
    compared: gr.State
    """The last :class:`experts.Comparison` of this browser session."""
    inside_note: gr.Markdown
    inside: dict[str, gr.Plot]
    """The pictures of the last answer, by :data:`INSIDE_PICTURES` name."""
    compare_inside_note: gr.Markdown
    compare_inside: dict[str, dict[str, gr.Plot]]
    """"without" and "with": the pictures of that answer, by :data:`INSIDE_PICTURES` name."""


class Handlers:
    """The page's event handlers and the API endpoints, bound to one pipeline. UI handlers return
    dicts keyed by the components of ``page``; every answer comes from one library call."""

    def __init__(self, pipe: Pipeline, registry: Registry, page: Page, allowed_dirs: Sequence[Path] = ()) -> None:
        self.pipe, self.registry, self.page, self.allowed_dirs = pipe, registry, page, allowed_dirs
        self.labels = dict((kind, label) for label, kind in expert_choices(registry))
        self.most_tokens = pipe.limits.max_new_tokens or MAX_NEW_TOKENS

    def new(self) -> Conversation:
        return Conversation(MultimodalChat(self.pipe, registry=self.registry))

    def view(self, conv: Conversation) -> dict[gr.components.Component, Any]:
        image, note = image_in_view(conv.chat)
        p = self.page
        return {p.chatbot: conversation(conv.chat), p.in_view: image, p.in_view_note: note, p.state: conv}

    def stream(
        self,
        conv: Conversation,
        system: str | None,
        shown: Callable[[], list[dict[str, Any]]],
        start: Callable[[threading.Event], Iterator[str]],
        restore: Any = None,
    ) -> Iterator[dict[gr.components.Component, Any]]:
        """One answer streamed into the chat: ``shown`` while the experts read, then the answer as
        it grows. A question the library refuses goes back into the box (``restore``) with a
        warning saying why; the conversation is as it was."""
        p = self.page
        with conv.turn() as cancel:
            conv.chat.set_system(system)
            yield {p.chatbot: shown(), p.box: None if restore is not None else gr.skip(), p.state: conv}
            answer, pieces = "", None
            try:
                pieces = start(cancel)
                for piece in pieces:
                    answer += piece
                    yield {p.chatbot: conversation(conv.chat, answer)}
            except (LlamaAdapterError, KeyError) as e:
                gr.Warning(plain(e))
                yield {**self.view(conv), p.box: restore if restore is not None else gr.skip()}
                return
            finally:
                if pieces is not None:
                    pieces.close()
            # The chat's own record, sent while the lock is held so that an Undo waiting for it
            # cannot be overtaken by it.
            yield self.view(conv)

    def reading(self, experts: list[str] | None) -> list[str]:
        return [self.labels.get(kind, kind) for kind in experts or ()]

    # -- chat --

    @gpu
    def send(
        self,
        message: dict | None,
        conv: Conversation | None,
        system: str,
        experts: list[str],
        temperature: float,
        top_p: float,
        tokens: float,
        seed: float,
    ) -> Iterator[dict[gr.components.Component, Any]]:
        conv = conv or self.new()
        message = message or {}
        files = [upload_path({"path": f}, self.allowed_dirs) for f in message.get("files") or ()]
        question = message_parts(message.get("text"), files)
        params = sampling(temperature, top_p, tokens, seed)
        yield from self.stream(
            conv,
            system,
            lambda: pending(conv.chat, question, files, self.reading(experts)),
            lambda cancel: conv.chat.stream(question, files, experts, cancel=cancel, **params),
            restore=message,
        )

    @gpu
    def retry(
        self,
        conv: Conversation | None,
        system: str,
        experts: list[str],
        temperature: float,
        top_p: float,
        tokens: float,
        seed: float,
    ) -> Iterator[dict[gr.components.Component, Any]]:
        if conv is None or not conv.chat.turns:
            gr.Warning("There is no question to answer again yet.")
            return
        yield from self.ask_again(conv, None, None, system, experts, temperature, top_p, tokens, seed)

    @gpu
    def edit(
        self,
        edited: gr.EditData,
        conv: Conversation | None,
        system: str,
        experts: list[str],
        temperature: float,
        top_p: float,
        tokens: float,
        seed: float,
    ) -> Iterator[dict[gr.components.Component, Any]]:
        if conv is None or not conv.chat.turns:
            return
        index = edited.index if isinstance(edited.index, int) else edited.index[0]
        turn = asked_before(conversation(conv.chat), index)
        text = (
            edited.value
            if isinstance(edited.value, str)
            else next((v for v in edited.value or () if isinstance(v, str)), None)
        )
        yield from self.ask_again(conv, turn, text, system, experts, temperature, top_p, tokens, seed)

    def ask_again(
        self, conv: Conversation, turn: int | None, question: str | None, system: str, experts: list[str], *values: Any
    ) -> Iterator[dict[gr.components.Component, Any]]:
        """Turn number ``turn`` (``None``: the last) asked again as ``question`` (``None``: unchanged),
        the turns after it dropped."""
        params = sampling(*values)
        number = -1 if turn is None else turn

        def shown() -> list[dict[str, Any]]:
            turns = conv.chat.turns
            if not turns:
                return conversation(conv.chat)
            old = turns[number]
            files = [str(f) for f in old.attached if isinstance(f, (str, os.PathLike))]
            kept = conversation(conv.chat, turns=turns.index(old))
            asked = old.question if question is None else question
            return pending(conv.chat, asked, files, self.reading(experts), before=kept)

        yield from self.stream(
            conv,
            system,
            shown,
            lambda cancel: conv.chat.edit(question, experts, turn=number, cancel=cancel, **params),
        )

    def undo(self, conv: Conversation | None) -> dict[gr.components.Component, Any]:
        """The last turn taken back; its question and images go back into the box, as Gradio's chat does."""
        conv = conv or self.new()
        with conv.paused():
            turn = conv.chat.undo()
        box = gr.skip()
        if turn is not None:
            box = {"text": turn.question, "files": [str(f) for f in turn.attached if isinstance(f, (str, os.PathLike))]}
        return {**self.view(conv), self.page.box: box}

    def clear(self, conv: Conversation | None) -> dict[gr.components.Component, Any]:
        if conv is not None:
            conv.cancel.set()
        return self.view(self.new())

    def stop(self, conv: Conversation | None) -> dict[gr.components.Component, Any]:
        """The answer being written stopped where it is, and kept (the image it was about stays in view)."""
        conv = conv or self.new()
        with conv.paused():
            return self.view(conv)

    @gpu
    def look_inside(self, conv: Conversation | None) -> dict[gr.components.Component, Any]:
        """The pictures of what the last answer drew on, drawn on request (``MultimodalChat.explain``)."""
        if conv is None:
            gr.Warning("There is no answer to look inside yet: ask something first.")
            return {}
        try:
            with conv.busy:  # the answer being written, if any, first
                trace = conv.chat.explain()
                question = conv.chat.last_turn.question
        except LlamaAdapterError as e:
            gr.Warning(plain(e))
            return {}
        return {self.page.inside_note: inside_summary(question, trace), **drawn(trace, self.page.inside)}

    @gpu
    def look_inside_compared(self, compared: Comparison | None) -> dict[gr.components.Component, Any]:
        """The pictures of both compared answers, side by side (``Comparison.explain``)."""
        if compared is None:
            gr.Warning("There are no answers to look inside yet: press Compare first.")
            return {}
        p = self.page
        shown: dict[gr.components.Component, Any] = {}
        try:
            for i, side in enumerate(("without", "with")):
                shown |= drawn(compared.explain(self.pipe, i), p.compare_inside[side])
        except LlamaAdapterError as e:
            gr.Warning(plain(e))
            return {}
        note = f"**Inside both answers to** _{compared.instruction}_: without experts left, with them right."
        return {p.compare_inside_note: note, **shown}

    # -- compare --

    def show_compare(self, conv: Conversation | None, question: str) -> dict[gr.components.Component, Any]:
        """The Compare tab opened: the chat's image in view, and its last question if none is typed."""
        chat = conv.chat if conv else None
        image = image_in_view(chat)[0] if chat else None
        asked = chat.turns[-1].question if chat and chat.turns else ""
        return {self.page.compare_image: image, self.page.compare_question: (question or "").strip() or asked}

    @gpu
    def compare_side_by_side(
        self,
        question: str,
        conv: Conversation | None,
        experts: list[str],
        temperature: float,
        top_p: float,
        tokens: float,
        seed: float,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects progress through this default
    ) -> dict[gr.components.Component, Any]:
        image = conv.chat.image if conv else None
        if image is None:
            gr.Warning("There is no image in the chat yet: attach one to a message first.")
            return {}
        if not experts:
            gr.Warning("Choose OCR or Caption (or both) in the side panel to compare against.")
            return {}
        params = sampling(temperature, top_p, tokens, seed)
        params["seed"] = 0 if params["seed"] is None else params["seed"]  # both answers need the same seed
        progress(0, desc="Running the experts, then answering twice…")
        try:
            result = compare(self.pipe, question, image, [experts], registry=self.registry, **params)
        except (LlamaAdapterError, KeyError) as e:
            gr.Warning(plain(e))
            return {}
        shown: dict[gr.components.Component, Any] = {}
        for side, variant in zip(("without", "with"), result.variants):
            title_box, answer_box, prompt_box = self.page.compare_panes[side]
            title = "Without experts" if not variant.experts else "With " + " + ".join(r.label for r in variant.report)
            skipped = f" (skipped: {', '.join(variant.skipped)})" if variant.skipped else ""
            shown[title_box] = f"#### {title} · {variant.seconds:.2f} s{skipped}"
            shown[answer_box] = variant.answer.strip() or "_(empty answer)_"
            shown[prompt_box] = variant.prompt
        shown[self.page.compared] = result
        return shown

    # -- API endpoints (plain data in and out, for gradio_client) --

    @gpu
    def chat_api(
        self,
        message: str,
        history: list[dict] | None = None,
        system: str = "",
        max_new_tokens: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Answer `message` after `history` (a list of {"role", "content"} messages, default none);
        streams the answer as it grows. `max_new_tokens` defaults to 256 (or the server's limit)."""
        messages = [*([{"role": "system", "content": system}] if system else []), *(history or [])]
        messages.append({"role": "user", "content": message})
        tokens = min(256, self.most_tokens) if max_new_tokens is None else max_new_tokens
        answer = None
        try:
            for piece in self.pipe.stream(messages, **sampling(temperature, top_p, tokens, seed)):
                answer = (answer or "") + piece
                yield answer
        except LlamaAdapterError as e:
            raise gr.Error(plain(e), print_exception=False) from e
        if answer is None:
            yield ""

    @gpu
    def chat_multimodal_api(
        self,
        message: dict,
        history: list[dict] | None = None,
        system: str = "",
        experts: list[str] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Answer `message` ({"text": ..., "files": [handle_file(...)]}, as the chat's box gives it) after
        `history` ({"role", "content"} messages; a user message may carry the "files" it brought: the
        model sees the last image of the conversation). `experts` ("ocr", "caption") read that image.
        Streams the answer as it grows. `max_new_tokens` defaults to 256 (or the server's limit)."""
        if not isinstance(message, dict):
            raise gr.Error('The message must be {"text": ..., "files": [...]}.', print_exception=False)
        files = api_files(message.get("files"), self.allowed_dirs)
        question = message_parts(message.get("text"), files)
        tokens = min(256, self.most_tokens) if max_new_tokens is None else max_new_tokens
        params = sampling(temperature, top_p, tokens, seed)
        answer = None
        try:
            chat = MultimodalChat(
                self.pipe,
                system=system or None,
                history=api_history(history, self.allowed_dirs),
                registry=self.registry,
            )
            for piece in chat.stream(question, files, experts or (), **params):
                answer = (answer or "") + piece
                yield answer
        except (LlamaAdapterError, KeyError) as e:
            raise gr.Error(plain(e), print_exception=False) from e
        if answer is None:
            yield ""

    @gpu
    def describe_image_api(
        self,
        image: FileData,
        instruction: str,
        experts: list[str] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
    ) -> dict:
        """Answer `instruction` about `image` with the text of `experts` ("ocr", "caption") in the prompt.
        Returns the answer, the exact prompt, each expert's text and status, and the answer's seconds.
        `max_new_tokens` defaults to 128 (or the server's limit)."""
        tokens = min(128, self.most_tokens) if max_new_tokens is None else max_new_tokens
        try:
            result = describe(
                self.pipe,
                upload_path(image, self.allowed_dirs),
                instruction,
                experts or (),
                registry=self.registry,
                **sampling(temperature, top_p, tokens, seed),
            )
        except (LlamaAdapterError, KeyError) as e:
            raise gr.Error(plain(e), print_exception=False) from e
        return result.to_dict()

    @gpu
    def compare_api(
        self,
        image: FileData,
        instruction: str,
        experts: list[str],
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> dict:
        """Answer `instruction` about `image` without experts and with `experts`, same seed. Returns
        "variants" (no experts first), each with its label, prompt, answer and seconds, and the experts'
        texts. `max_new_tokens` defaults to 128 (or the server's limit)."""
        if not experts:
            raise gr.Error('Name at least one expert to compare with, e.g. ["ocr"].', print_exception=False)
        tokens = min(128, self.most_tokens) if max_new_tokens is None else max_new_tokens
        params = sampling(temperature, top_p, tokens, seed)
        params["seed"] = 0 if params["seed"] is None else params["seed"]  # both answers need the same seed
        try:
            path = upload_path(image, self.allowed_dirs)
            result = compare(self.pipe, instruction, path, [experts], registry=self.registry, **params)
        except (LlamaAdapterError, KeyError) as e:
            raise gr.Error(plain(e), print_exception=False) from e
        return result.to_dict()


# -- the app ----------------------------------------------------------------------------------------------


def build_demo(
    pipe: Pipeline,
    *,
    registry: Registry | None = None,
    examples_dir: Path = EXAMPLES_DIR,
    queue_size: int = QUEUE_SIZE,
    allowed_dirs: Sequence[Path] = (),
) -> gr.Blocks:
    """The whole app around one loaded pipeline; ``registry`` chooses the experts (default:
    :func:`experts.registry_for` the pipeline).
    The pipeline's ``limits`` are the app's; ``queue_size`` requests may wait, more are turned away.
    Clients may name files in their uploads, the examples and ``allowed_dirs`` only (see :class:`UploadsOnly`)."""
    registry = registry or registry_for(pipe)
    ticked, why_ticked = measured_defaults(pipe, registry)
    image_examples = load_examples(examples_dir)
    if image_examples:
        gr.set_static_paths([examples_dir])
    most_tokens = pipe.limits.max_new_tokens or MAX_NEW_TOKENS
    # Every event and API shares the engine's slots: as many run at once as it decodes together.
    model = {"concurrency_id": "model", "concurrency_limit": pipe.engine.config.max_batch}
    instant = {"queue": False, "api_visibility": "private"}

    with gr.Blocks(title="LLaMA-Adapter V2") as demo:
        gr.Markdown("\n\n".join(filter(None, [header_markdown(pipe, queue_size), why_ticked])), elem_id="header")
        state = gr.State(None)

        with gr.Sidebar(elem_id="side-panel"):
            experts = gr.CheckboxGroup(
                choices=expert_choices(registry),
                value=ticked,
                label="Experts",
                info="They read each new image; their text joins the prompt and shows as a step in the chat.",
                elem_id="experts",
            )
            system = gr.Textbox(
                "",
                label="System prompt",
                placeholder="e.g. You are a concise assistant.",
                lines=2,
                max_length=MAX_MESSAGE_CHARS,
                elem_id="system",
            )
            with gr.Accordion("Sampling", open=True, elem_id="sampling"):
                temperature = gr.Slider(
                    0.0, 1.5, value=0.7, step=0.05, label="Temperature", info="0 = greedy", elem_id="temperature"
                )
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                tokens = gr.Slider(
                    1, most_tokens, value=min(256, most_tokens), step=1, label="Max new tokens", elem_id="max-tokens"
                )
                seed = gr.Number(value=-1, precision=0, minimum=-1, label="Seed", info="-1 = random")
        settings = [system, experts, temperature, top_p, tokens, seed]

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                if not pipe.accepts_images:
                    gr.Markdown(
                        "This model has no image encoder, so it cannot see pictures itself. Turn on **OCR** or "
                        "**Caption** in the side panel: their text about an image is what it will read.",
                        elem_id="text-only-note",
                    )
                with gr.Row():
                    chatbot = gr.Chatbot(
                        height=560,
                        label="Conversation",
                        buttons=["copy"],
                        editable="user",
                        placeholder="Ask anything, and attach a picture to ask about it. A later picture starts a "
                        "new visual context; the conversation goes on.",
                        elem_id="chatbot",
                        scale=4,
                    )
                    with gr.Column(scale=1, min_width=200):
                        in_view = gr.Image(
                            label="Image in view", interactive=False, height=200, buttons=[], elem_id="in-view"
                        )
                        in_view_note = gr.Markdown(NO_IMAGE, elem_id="in-view-note")
                box = gr.MultimodalTextbox(
                    placeholder="Type a message; attach, paste or drop images (the model takes one per message)",
                    file_types=["image"],
                    file_count="multiple",
                    sources=["upload"],
                    max_plain_text_length=MAX_MESSAGE_CHARS,
                    show_label=False,
                    autofocus=True,
                    elem_id="chat-input",
                )
                with gr.Row():
                    stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="chat-stop")
                    retry_btn = gr.Button("Retry", size="sm", elem_id="chat-retry")
                    undo_btn = gr.Button("Undo", size="sm", elem_id="chat-undo")
                    clear_btn = gr.Button("Clear", size="sm", elem_id="chat-clear")
                with gr.Accordion("Inside this answer", open=False, elem_id="inside"):
                    inside_note = gr.Markdown(INSIDE, elem_id="inside-note")
                    inside_btn = gr.Button("Look inside the last answer", size="sm", elem_id="inside-btn")
                    inside = {name: plot_box(title, f"inside-{name}") for name, title in INSIDE_PICTURES.items()}
                if image_examples:
                    gr.Examples(
                        [[{"text": question, "files": [image]}] for image, question in image_examples],
                        inputs=[box],
                        label="Ask about a picture (for the signs, labels and receipts, turn on OCR)",
                        examples_per_page=6,
                        elem_id="image-examples",
                    )
                gr.Examples([[{"text": q, "files": []}] for q in CHAT_EXAMPLES], inputs=[box], label="Or just chat")

            with gr.Tab("Compare", id="compare") as compare_tab:
                gr.Markdown(
                    "The same question about the chat's image in view, answered without and with the experts "
                    "chosen in the side panel, with the same seed."
                )
                with gr.Row():
                    compare_image = gr.Image(
                        label="The chat's image in view", interactive=False, height=200, elem_id="compare-image"
                    )
                    with gr.Column(scale=3):
                        compare_question = gr.Textbox(
                            label="Question", max_length=MAX_MESSAGE_CHARS, elem_id="compare-question"
                        )
                        compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                panes = {}
                with gr.Row(elem_id="compare-row"):
                    for side, title in (("without", "Without experts"), ("with", "With experts")):
                        with gr.Column():
                            panes[side] = (
                                gr.Markdown(f"#### {title}", elem_id=f"compare-{side}-title"),
                                gr.Markdown(NOT_COMPARED, elem_id=f"compare-{side}"),
                                gr.Code(
                                    label="Prompt",
                                    language=None,
                                    wrap_lines=True,
                                    show_line_numbers=False,
                                    interactive=False,
                                ),
                            )
                with gr.Accordion("Inside these answers", open=False, elem_id="compare-inside"):
                    compare_inside_note = gr.Markdown(COMPARE_INSIDE, elem_id="compare-inside-note")
                    compare_inside_btn = gr.Button("Look inside both answers", size="sm", elem_id="compare-inside-btn")
                    compare_inside = {}
                    with gr.Row():
                        for side in ("without", "with"):
                            with gr.Column():
                                compare_inside[side] = {
                                    name: plot_box(title, f"compare-inside-{side}-{name}")
                                    for name, title in INSIDE_PICTURES.items()
                                }

        compared = gr.State()
        page = Page(
            state,
            chatbot,
            box,
            in_view,
            in_view_note,
            compare_image,
            compare_question,
            panes,
            compared,
            inside_note,
            inside,
            compare_inside_note,
            compare_inside,
        )
        on = Handlers(pipe, registry, page, allowed_dirs)
        chat_outputs = [state, chatbot, box, in_view, in_view_note]
        sent = box.submit(on.send, [box, state, *settings], chat_outputs, api_visibility="private", **model)
        retried = gr.on(
            [retry_btn.click, chatbot.retry],
            on.retry,
            [state, *settings],
            chat_outputs,
            api_visibility="private",
            **model,
        )
        edited = chatbot.edit(on.edit, [state, *settings], chat_outputs, api_visibility="private", **model)
        # Stop, Undo and Clear run at once, outside the queue, and also stop the answer being written.
        # The browser cancels before it calls their handler: a cancel listed on the handler's own
        # event would go out after the handler's reply, and could catch a message sent meanwhile.
        stops = {"stop": [stop_btn.click], "undo": [undo_btn.click, chatbot.undo]}
        stops["clear"] = [clear_btn.click, chatbot.clear]
        for name, triggers in stops.items():
            gr.on(triggers, None, cancels=[sent, retried, edited], **instant)
            gr.on(triggers, getattr(on, name), [state], chat_outputs, **instant)

        inside_btn.click(on.look_inside, [state], [inside_note, *inside.values()], api_visibility="private", **model)
        compare_tab.select(on.show_compare, [state, compare_question], [compare_image, compare_question], **instant)
        compare_btn.click(
            on.compare_side_by_side,
            [compare_question, state, experts, temperature, top_p, tokens, seed],
            [*(box for pane in panes.values() for box in pane), compared],
            show_progress_on=[panes["without"][1], panes["with"][1]],
            api_visibility="private",
            **model,
        )
        compare_inside_btn.click(
            on.look_inside_compared,
            [compared],
            [compare_inside_note, *(plot for plots in compare_inside.values() for plot in plots.values())],
            api_visibility="private",
            **model,
        )

        gr.api(on.chat_api, api_name="chat", **model)
        gr.api(on.chat_multimodal_api, api_name="chat_multimodal", **model)
        gr.api(on.describe_image_api, api_name="describe_image", **model)
        gr.api(on.compare_api, api_name="compare", **model)

    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    return demo


def launch(
    demo: gr.Blocks,
    *,
    host: str | None = None,
    port: int | None = None,
    allowed_dirs: Sequence[Path] = (),
    allow_urls: bool = False,
    api: APIRouter | None = None,
    **kwargs: Any,
) -> Any:
    """``demo.launch`` with the app's theme and css, upload limit and :class:`UploadsOnly` door (Gradio 6 takes
    the theme here, not in Blocks), and the ``api`` routes (the OpenAI-compatible ``/v1``, which
    check their own images) on the same server, ahead of Gradio's own."""
    from starlette.middleware import Middleware

    door = Middleware(UploadsOnly, allowed_dirs=allowed_dirs, allow_urls=allow_urls)
    return demo.launch(
        server_name=host,
        server_port=port,
        theme=gr.themes.Soft(primary_hue="indigo"),
        css=CSS,
        max_file_size=MAX_FILE_SIZE,
        app_kwargs={"middleware": [door], "routes": list(api.routes) if api is not None else []},
        **kwargs,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Serve the LLaMA-Adapter V2 demo. With no --base and no --adapter, the shipped demo model is "
        "used, offline. Each flag has an environment variable, for Hugging Face Spaces.",
    )
    add_model_arguments(p, template=False, server=True)
    add_server_arguments(p, port=7860, host_env="GRADIO_SERVER_NAME", port_env="GRADIO_SERVER_PORT", share=True)
    limits = p.add_argument_group("limits", "what a request may ask: beyond, a plain refusal")
    add_positive_int_flags(
        limits,
        ("max-image-pixels", Limits.max_image_pixels, "width × height of an image"),
        ("max-prompt-chars", Limits.max_prompt_chars, "characters of a prompt with its history"),
        ("max-new-tokens", MAX_NEW_TOKENS, "length of an answer, in tokens"),
    )
    serve.add_api_arguments(p)
    args = p.parse_args(argv)
    check_environment_choices(p, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info(
        "Loading the model: base %s, adapter %s, on %s…", args.base or "default", args.adapter or "default", args.device
    )
    limits = Limits(args.max_image_pixels, args.max_prompt_chars, args.max_new_tokens)
    try:
        pipe = load_for_serving(args, limits=limits)
    except LlamaAdapterError as e:
        log.error("Could not load the model: %s", e)
        return 2
    log.info(
        "Loaded in %.1f s: %s; %s, %d answers together, queue of %d",
        pipe.info["load_seconds"],
        pipe.info,
        limits,
        args.max_batch,
        args.queue_size,
    )
    # The same folders and URL rule, and the same experts, for the /v1 door as for Gradio's.
    registry = registry_for(pipe)
    runner = functools.partial(run_experts, registry=registry)
    api = serve.api_router(pipe, serve.api_config(args, runner, measured_defaults(pipe, registry)[0]))
    launch(
        build_demo(pipe, registry=registry, queue_size=args.queue_size, allowed_dirs=args.allow_local_dir),
        host=args.host,
        port=args.port,
        share=args.share,
        allowed_dirs=args.allow_local_dir,
        allow_urls=args.allow_remote_images,
        api=api,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
