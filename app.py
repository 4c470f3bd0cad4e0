"""The LLaMA-Adapter V2 demo: chat, chat about an image with OCR and caption experts, and a with/without comparison.

    python app.py                                     # the shipped demo model, offline, http://127.0.0.1:7860
    python app.py --base /path/to/llama_dir --adapter BIAS-7B --device cuda --share

Layout and wiring only: every action calls one library function (``ChatSession.stream``,
``experts.ImageChat.stream``, ``experts.compare``, ``experts.describe``, …). One model per process
is shared by every session; each session keeps its own conversations (and their KV caches) in
``gr.State``. Named API endpoints for ``gradio_client``: ``/chat``, ``/describe_image``, ``/compare``;
and on the same port the OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``
(``llama_adapter.serve``). Every answer, from any door, is written by the pipeline's engine, which
decodes all the requests under way together.
"""

from __future__ import annotations

import os

# Before torch is imported: idle OpenMP threads sleep instead of spinning, which on a small shared
# CPU otherwise starves the very threads doing the work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator, Sequence, TypeVar, Union  # noqa: E402

import gradio as gr  # noqa: E402
from fastapi import APIRouter  # noqa: E402
from gradio import FileData  # noqa: E402

from experts import ExpertReport, ImageChat, Registry, compare, default_registry, describe, run_experts  # noqa: E402
from llama_adapter import ChatSession, LlamaAdapterError, Pipeline, serve  # noqa: E402
from llama_adapter.cli import (  # noqa: E402
    add_model_arguments,
    add_server_arguments,
    check_environment_choices,
    env_value,
    load_for_serving,
)
from llama_adapter.engine import EngineConfig  # noqa: E402
from llama_adapter.pipeline import Limits  # noqa: E402

log = logging.getLogger("app")

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
QUEUE_SIZE = 32
"""Waiting requests beyond this are turned away at once rather than left to wait for many minutes."""
MAX_NEW_TOKENS = 1024
"""Longest answer a request may ask for (the sliders' maximum)."""
MAX_MESSAGE_CHARS = 8000
"""Typing limit of the text boxes; the library still refuses a prompt longer than the model's context."""
MAX_FILE_SIZE = "25mb"
CHAT_EXAMPLES = [
    "Name three colours.",
    "Write a haiku about autumn.",
    "Explain in one sentence why the sky is blue.",
    "Give me three tips for learning a new language.",
]
NOT_COMPARED = "_Press **Compare** to answer the question without and with the chosen experts, same seed._"
NOTHING_SEEN = "_Ask a question about the image to see the experts' text and the exact prompt the model read._"

F = TypeVar("F", bound=Callable[..., Any])

try:
    import spaces

    gpu: Callable[[F], F] = spaces.GPU
except ImportError:

    def gpu(fn: F) -> F:
        """Without the ``spaces`` package (anywhere but Hugging Face Spaces) there is no GPU to request."""
        return fn


Session = Union[ChatSession, ImageChat]


@dataclass(eq=False)
class Conversation:
    """One browser session's conversation, the switch that stops its answer, and a lock held while
    an answer is written, so that Undo or Clear wait until a stopped answer is in the history."""

    session: Session
    cancel: threading.Event = field(default_factory=threading.Event)
    busy: threading.Lock = field(default_factory=threading.Lock)
    upload: str | None = None
    """The uploaded file the image tab was last given (accepted or not)."""

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


def display(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """A conversation as Gradio chat messages: no system prompt, no expert context."""
    return [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]


def report_markdown(chat: ImageChat) -> str:
    if chat.last_report is None:
        return NOTHING_SEEN
    if chat.image_to_model:
        lines = ["**Image**: given to the model as its visual prompt."]
    else:
        lines = ["**Image**: not seen by this text-only model; only the experts' text describes it."]
    if not len(chat.last_report):
        lines.append("**Experts**: none chosen.")
    for r in chat.last_report:
        if r.status != "ok":
            lines.append(f"**{r.label}**: skipped ({r.status}): {r.reason}")
            continue
        timing = "cached" if r.cached else f"{r.seconds:.2f} s"
        text = r.text.strip()
        lines.append(
            f"**{r.label}** ({timing}):\n```text\n{text}\n```" if text else f"**{r.label}** ({timing}): no text"
        )
    return "\n\n".join(lines)


def skipped_warnings(report: ExpertReport | None) -> None:
    for r in report.skipped if report is not None else []:
        gr.Warning(f"{r.label} was skipped ({r.reason}); the answer went on without it.")


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
    """(label, kind) of the preferred expert of each kind, e.g. ("OCR (easyocr)", "ocr")."""
    choices = []
    for kind in ("ocr", "caption"):
        try:
            choices.append((registry.get(kind).label, kind))
        except KeyError:
            log.info("No %s expert registered", kind)
    return choices


def sampling_controls(
    tab: str, temperature: float, top_p: float, max_new_tokens: int, seed: int, most: int = MAX_NEW_TOKENS
) -> list[gr.Component]:
    with gr.Accordion("Sampling", open=False, elem_id=f"{tab}-sampling"):
        with gr.Row():
            t = gr.Slider(0.0, 1.5, value=temperature, step=0.05, label="Temperature", info="0 = greedy")
            p = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="Top-p")
        with gr.Row():
            n = gr.Slider(
                1, most, value=min(max_new_tokens, most), step=1, label="Max new tokens", elem_id=f"{tab}-max-tokens"
            )
            s = gr.Number(value=seed, precision=0, minimum=-1, label="Seed", info="-1 = random")
    return [t, p, n, s]


# -- the app ----------------------------------------------------------------------------------------------


def build_demo(
    pipe: Pipeline,
    *,
    registry: Registry | None = None,
    examples_dir: Path = EXAMPLES_DIR,
    queue_size: int = QUEUE_SIZE,
    allowed_dirs: Sequence[Path] = (),
) -> gr.Blocks:
    """The whole app around one loaded pipeline; ``registry`` chooses the experts (default: all installed).
    The pipeline's ``limits`` are the app's; ``queue_size`` requests may wait, more are turned away.
    Clients may name files in their uploads, the examples and ``allowed_dirs`` only (see :class:`UploadsOnly`)."""
    registry = registry or default_registry()
    image_examples = load_examples(examples_dir)
    if image_examples:
        gr.set_static_paths([examples_dir])
    most_tokens = pipe.limits.max_new_tokens or MAX_NEW_TOKENS
    # Every tab and API shares the engine's slots: as many events run at once as it decodes together.
    model = {"concurrency_id": "model", "concurrency_limit": pipe.engine.config.max_batch}
    instant = {"queue": False, "api_visibility": "private"}

    def stream_turn(
        conv: Conversation, question: str, start: Callable[[threading.Event], Iterator[str]], waiting: str = ""
    ) -> Iterator[tuple[list[dict[str, str]], str]]:
        """Stream one answer into the chat: (messages, text box). A question the library refuses
        stays in the box with a warning saying why; the conversation is unchanged."""
        with conv.turn() as cancel:
            before = display(conv.session.messages)
            asked = {"role": "user", "content": question}
            yield [*before, asked, {"role": "assistant", "content": waiting}], ""
            answer = ""
            pieces = start(cancel)
            try:
                for piece in pieces:
                    answer += piece
                    yield [*before, asked, {"role": "assistant", "content": answer}], ""
            except (LlamaAdapterError, KeyError) as e:
                gr.Warning(plain(e))
                yield display(conv.session.messages), question
                return
            finally:
                pieces.close()
            # The session's own record (it may have dropped the oldest turns to fit the context), sent
            # while the lock is held so that an Undo waiting for it cannot be overtaken by it.
            yield display(conv.session.messages), ""

    # -- chat tab handlers --

    def new_chat(system: str | None) -> Conversation:
        return Conversation(pipe.chat(system=(system or "").strip() or None))

    def use_system(session: ChatSession, system: str | None) -> None:
        # The KV cache is matched by prefix, so editing the system prompt mid-conversation only costs a prefill.
        rest = [m for m in session.messages if m["role"] != "system"]
        system = (system or "").strip()
        session.messages[:] = ([{"role": "system", "content": system}] if system else []) + rest

    @gpu
    def chat_send(
        message: str,
        conv: Conversation | None,
        system: str | None,
        temperature: float,
        top_p: float,
        tokens: float,
        seed: float,
    ) -> Iterator[tuple[list[dict[str, str]], str, Conversation]]:
        conv = conv or new_chat(system)
        use_system(conv.session, system)
        params = sampling(temperature, top_p, tokens, seed)
        for messages, box in stream_turn(conv, message, lambda c: conv.session.stream(message, cancel=c, **params)):
            yield messages, box, conv

    @gpu
    def chat_retry(
        conv: Conversation | None, system: str | None, temperature: float, top_p: float, tokens: float, seed: float
    ) -> Iterator[tuple[list[dict[str, str]], str, Conversation | None]]:
        asked = [m["content"] for m in conv.session.messages if m["role"] == "user"] if conv else []
        if not asked:
            gr.Warning("There is no question to answer again yet.")
            yield display(conv.session.messages) if conv else [], "", conv
            return
        with conv.paused():
            conv.session.undo()
        yield from chat_send(asked[-1], conv, system, temperature, top_p, tokens, seed)

    def chat_undo(conv: Conversation | None) -> list[dict[str, str]]:
        if conv is None:
            return []
        with conv.paused():
            conv.session.undo()
        return display(conv.session.messages)

    def chat_clear(conv: Conversation | None, system: str | None) -> tuple[list[dict[str, str]], Conversation]:
        if conv is not None:
            conv.cancel.set()
        return [], new_chat(system)

    def stop(conv: Conversation | None) -> None:
        if conv is not None:
            conv.cancel.set()

    # -- image tab handlers --

    def new_image_chat() -> Conversation:
        return Conversation(ImageChat(pipe, registry=registry))

    def seen(conv: Conversation) -> tuple[str, str]:
        return report_markdown(conv.session), conv.session.last_prompt or ""

    def image_set(image: FileData | dict | None, conv: Conversation | None) -> tuple[Any, ...]:
        conv = conv or new_image_chat()
        path = upload_path(image, allowed_dirs)
        if path is not None and path == conv.upload:
            # Gradio's image fires a second change when a bad file replaces a good one: one warning is enough.
            return (gr.skip(),) * 5
        conv.upload = path
        rejected = False
        with conv.paused():
            try:
                conv.session.set_image(path)
            except LlamaAdapterError as e:
                gr.Warning(plain(e))
                conv.session.set_image(None)
                rejected = True
        # Clearing a rejected image fires this event again, with no image: the session follows.
        return [], *seen(conv), gr.update(value=None) if rejected else gr.update(), conv

    @gpu
    def image_ask(
        question: str,
        chosen: list[str],
        conv: Conversation | None,
        temperature: float,
        top_p: float,
        tokens: float,
        seed: float,
    ) -> Iterator[tuple[Any, ...]]:
        conv = conv or new_image_chat()
        params = sampling(temperature, top_p, tokens, seed)
        names = ", ".join(label for label, kind in expert_choices(registry) if kind in chosen)
        waiting = f"_Reading the image: {names}…_" if names else ""
        start = lambda c: conv.session.stream(question, chosen, cancel=c, **params)  # noqa: E731
        for messages, box in stream_turn(conv, question, start, waiting):
            yield messages, box, *seen(conv), conv
        skipped_warnings(conv.session.last_report)

    def image_undo(conv: Conversation | None) -> tuple[Any, ...]:
        conv = conv or new_image_chat()
        with conv.paused():
            conv.session.undo()
        return display(conv.session.messages), *seen(conv)

    def image_clear(conv: Conversation | None) -> tuple[Any, ...]:
        conv = conv or new_image_chat()
        with conv.paused():
            conv.session.reset()
        return [], *seen(conv)

    @gpu
    def image_compare(
        question: str,
        chosen: list[str],
        conv: Conversation | None,
        temperature: float,
        top_p: float,
        tokens: float,
        seed: float,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects progress through this default
    ) -> tuple[Any, ...]:
        unchanged = (gr.skip(),) * 6
        image = conv.session.image if conv else None
        asked = [m["content"] for m in conv.session.messages if m["role"] == "user"] if conv else []
        question = (question or "").strip() or (asked[-1] if asked else "")  # the box is emptied after Ask
        if image is None:
            gr.Warning("There is no image yet: upload, paste or photograph one first.")
            return unchanged
        if not chosen:
            gr.Warning("Choose OCR or Caption (or both) to compare against.")
            return unchanged
        params = sampling(temperature, top_p, tokens, seed)
        params["seed"] = 0 if params["seed"] is None else params["seed"]  # both answers need the same seed
        progress(0, desc="Running the experts, then answering twice…")
        try:
            result = compare(pipe, question, image, [chosen], registry=registry, **params)
        except (LlamaAdapterError, KeyError) as e:
            gr.Warning(plain(e))
            return unchanged
        skipped_warnings(result.experts)
        panes: list[str] = []
        for variant in result.variants:
            title = "Without experts" if not variant.experts else "With " + " + ".join(r.label for r in variant.report)
            skipped = f" (skipped: {', '.join(variant.skipped)})" if variant.skipped else ""
            panes += [f"#### {title} · {variant.seconds:.2f} s{skipped}", variant.answer.strip() or "_(empty answer)_"]
        return *panes, result.baseline.prompt, result.variants[1].prompt

    # -- API endpoints (plain data in and out, for gradio_client) --

    @gpu
    def chat_api(
        message: str,
        history: list[dict],
        system: str = "",
        max_new_tokens: int = min(256, most_tokens),
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Answer `message` after `history` (a list of {"role", "content"} messages); streams the answer as it grows."""
        messages = [*([{"role": "system", "content": system}] if system else []), *history]
        messages.append({"role": "user", "content": message})
        answer = None
        try:
            for piece in pipe.stream(messages, **sampling(temperature, top_p, max_new_tokens, seed)):
                answer = (answer or "") + piece
                yield answer
        except LlamaAdapterError as e:
            raise gr.Error(plain(e), print_exception=False) from e
        if answer is None:
            yield ""

    @gpu
    def describe_image_api(
        image: FileData,
        instruction: str,
        experts: list[str] | None = None,
        max_new_tokens: int = min(128, most_tokens),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
    ) -> dict:
        """Answer `instruction` about `image` with the text of `experts` ("ocr", "caption") in the prompt.
        Returns the answer, the exact prompt, each expert's text and status, and the answer's seconds."""
        try:
            result = describe(
                pipe,
                upload_path(image, allowed_dirs),
                instruction,
                experts or (),
                registry=registry,
                **sampling(temperature, top_p, max_new_tokens, seed),
            )
        except (LlamaAdapterError, KeyError) as e:
            raise gr.Error(plain(e), print_exception=False) from e
        return result.to_dict()

    @gpu
    def compare_api(
        image: FileData,
        instruction: str,
        experts: list[str],
        max_new_tokens: int = min(128, most_tokens),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> dict:
        """Answer `instruction` about `image` without experts and with `experts`, same seed. Returns
        "variants" (no experts first), each with its label, prompt, answer and seconds, and the experts' texts."""
        if not experts:
            raise gr.Error('Name at least one expert to compare with, e.g. ["ocr"].', print_exception=False)
        params = sampling(temperature, top_p, max_new_tokens, seed)
        params["seed"] = 0 if params["seed"] is None else params["seed"]  # both answers need the same seed
        try:
            path = upload_path(image, allowed_dirs)
            result = compare(pipe, instruction, path, [experts], registry=registry, **params)
        except (LlamaAdapterError, KeyError) as e:
            raise gr.Error(plain(e), print_exception=False) from e
        return result.to_dict()

    # -- layout and wiring --

    with gr.Blocks(title="LLaMA-Adapter V2") as demo:
        gr.Markdown(header_markdown(pipe, queue_size), elem_id="header")

        with gr.Tab("Chat", id="chat"):
            chat_state = gr.State(None)
            chatbot = gr.Chatbot(
                height=460,
                label="Conversation",
                buttons=["copy"],
                placeholder="Ask anything. Answers stream as they are written.",
                elem_id="chatbot",
            )
            with gr.Row():
                chat_box = gr.Textbox(
                    "",
                    placeholder="Type a message and press Enter",
                    show_label=False,
                    max_length=MAX_MESSAGE_CHARS,
                    scale=8,
                    autofocus=True,
                    elem_id="chat-input",
                )
                chat_send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            with gr.Row():
                chat_stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="chat-stop")
                chat_retry_btn = gr.Button("Retry", size="sm", elem_id="chat-retry")
                chat_undo_btn = gr.Button("Undo", size="sm", elem_id="chat-undo")
                chat_clear_btn = gr.Button("Clear", size="sm", elem_id="chat-clear")
            with gr.Accordion("System prompt", open=False, elem_id="chat-system"):
                system_box = gr.Textbox(
                    "",
                    placeholder="e.g. You are a concise assistant.",
                    show_label=False,
                    lines=2,
                    max_length=MAX_MESSAGE_CHARS,
                )
            chat_sampling = sampling_controls(
                "chat", temperature=0.7, top_p=0.9, max_new_tokens=256, seed=-1, most=most_tokens
            )
            gr.Examples(CHAT_EXAMPLES, inputs=[chat_box], label="Try")

        with gr.Tab("Image", id="image"):
            image_state = gr.State(None)
            if not pipe.accepts_images:
                gr.Markdown(
                    "ℹ️ This model has no image encoder, so it cannot see pictures itself. Turn on **OCR** or "
                    "**Caption**: their text about the image is what it will read.",
                    elem_id="text-only-note",
                )
            question = gr.Textbox(
                "",
                placeholder="Ask about the image and press Enter",
                show_label=False,
                max_length=MAX_MESSAGE_CHARS,
                elem_id="image-question",
                render=False,
            )
            with gr.Row():
                with gr.Column(scale=2):
                    image = gr.Image(
                        sources=["upload", "clipboard", "webcam"],
                        type="filepath",
                        label="Image (upload, paste or webcam)",
                        height=320,
                        elem_id="image-input",
                    )
                    chosen_experts = gr.CheckboxGroup(
                        choices=expert_choices(registry),
                        label="Experts",
                        info="Their text about the image joins the prompt.",
                        elem_id="experts",
                    )
                    if image_examples:
                        gr.Examples(
                            image_examples,
                            inputs=[image, question],
                            label="Examples: click one (for the ones with text, turn on OCR)",
                            examples_per_page=12,
                            visible_columns=[0],  # thumbnails only; a click also fills in its question
                            elem_id="image-examples",
                        )
                with gr.Column(scale=3):
                    image_chatbot = gr.Chatbot(
                        height=380,
                        label="Conversation about the image",
                        buttons=["copy"],
                        placeholder="Add an image, then ask about it. Follow-up questions are about the same image.",
                        elem_id="image-chatbot",
                    )
                    question.render()
                    with gr.Row():
                        ask_btn = gr.Button("Ask", variant="primary", elem_id="image-ask")
                        compare_btn = gr.Button("Compare without / with experts", elem_id="compare-btn")
                    with gr.Row():
                        image_stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="image-stop")
                        image_undo_btn = gr.Button("Undo", size="sm", elem_id="image-undo")
                        image_clear_btn = gr.Button("Clear", size="sm", elem_id="image-clear")
                    image_sampling = sampling_controls(
                        "image", temperature=0.0, top_p=1.0, max_new_tokens=128, seed=0, most=most_tokens
                    )
            with gr.Accordion("What the model saw", open=True):
                with gr.Row():
                    seen_experts = gr.Markdown(NOTHING_SEEN, elem_id="seen-experts")
                    seen_prompt = gr.Code(
                        label="The exact prompt text",
                        language=None,
                        wrap_lines=True,
                        show_line_numbers=False,
                        interactive=False,
                        elem_id="seen-prompt",
                    )
            with gr.Accordion("Compare: the same question without and with the chosen experts", open=True):
                with gr.Row(elem_id="compare-row"):
                    with gr.Column():
                        without_title = gr.Markdown("#### Without experts", elem_id="compare-without-title")
                        without_answer = gr.Markdown(NOT_COMPARED, elem_id="compare-without")
                        without_prompt = gr.Code(
                            label="Prompt", language=None, wrap_lines=True, show_line_numbers=False, interactive=False
                        )
                    with gr.Column():
                        with_title = gr.Markdown("#### With experts", elem_id="compare-with-title")
                        with_answer = gr.Markdown(NOT_COMPARED, elem_id="compare-with")
                        with_prompt = gr.Code(
                            label="Prompt", language=None, wrap_lines=True, show_line_numbers=False, interactive=False
                        )

        # Chat tab
        chat_event = gr.on(
            [chat_box.submit, chat_send_btn.click],
            chat_send,
            [chat_box, chat_state, system_box, *chat_sampling],
            [chatbot, chat_box, chat_state],
            api_visibility="private",
            **model,
        )
        retry_event = chat_retry_btn.click(
            chat_retry,
            [chat_state, system_box, *chat_sampling],
            [chatbot, chat_box, chat_state],
            api_visibility="private",
            **model,
        )
        # Stop, Undo and Clear run at once, outside the queue, and also stop the answer being written.
        chat_running = [chat_event, retry_event]
        chat_stop_btn.click(stop, [chat_state], None, cancels=chat_running, **instant)
        chat_undo_btn.click(chat_undo, [chat_state], [chatbot], cancels=chat_running, **instant)
        for clear in (chat_clear_btn.click, chatbot.clear):
            clear(chat_clear, [chat_state, system_box], [chatbot, chat_state], cancels=chat_running, **instant)

        # Image tab
        seen_outputs = [seen_experts, seen_prompt]
        ask_event = gr.on(
            [question.submit, ask_btn.click],
            image_ask,
            [question, chosen_experts, image_state, *image_sampling],
            [image_chatbot, question, *seen_outputs, image_state],
            api_visibility="private",
            **model,
        )
        compare_event = compare_btn.click(
            image_compare,
            [question, chosen_experts, image_state, *image_sampling],
            [without_title, without_answer, with_title, with_answer, without_prompt, with_prompt],
            show_progress_on=[without_answer, with_answer],
            api_visibility="private",
            **model,
        )
        image_running = [ask_event, compare_event]
        image.change(
            image_set,
            [image, image_state],
            [image_chatbot, *seen_outputs, image, image_state],
            preprocess=False,
            api_visibility="private",
            **model,
        )  # Queued, not cancelling: a question asked right after an upload must run after it, on the new image.
        image_stop_btn.click(stop, [image_state], None, cancels=image_running, **instant)
        image_undo_btn.click(
            image_undo, [image_state], [image_chatbot, *seen_outputs], cancels=image_running, **instant
        )
        for clear in (image_clear_btn.click, image_chatbot.clear):
            clear(image_clear, [image_state], [image_chatbot, *seen_outputs], cancels=image_running, **instant)

        gr.api(chat_api, api_name="chat", **model)
        gr.api(describe_image_api, api_name="describe_image", **model)
        gr.api(compare_api, api_name="compare", **model)

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
    """``demo.launch`` with the app's theme, upload limit and :class:`UploadsOnly` door (Gradio 6 takes
    the theme here, not in Blocks), and the ``api`` routes (the OpenAI-compatible ``/v1``, which
    check their own images) on the same server, ahead of Gradio's own."""
    from starlette.middleware import Middleware

    door = Middleware(UploadsOnly, allowed_dirs=allowed_dirs, allow_urls=allow_urls)
    return demo.launch(
        server_name=host,
        server_port=port,
        theme=gr.themes.Soft(primary_hue="indigo"),
        max_file_size=MAX_FILE_SIZE,
        app_kwargs={"middleware": [door], "routes": list(api.routes) if api is not None else []},
        **kwargs,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Serve the LLaMA-Adapter V2 demo. With no --base and no --adapter, the shipped demo model is "
        "used, offline. Each flag has an environment variable, for Hugging Face Spaces.",
    )
    add_model_arguments(p, template=False)
    add_server_arguments(p, port=7860, host_env="GRADIO_SERVER_NAME", port_env="GRADIO_SERVER_PORT", share=True)
    limits = p.add_argument_group("limits", "what a request may ask, and how many may wait: beyond, a plain refusal")
    for flag, default, text in (
        ("max-image-pixels", Limits.max_image_pixels, "width × height of an image"),
        ("max-prompt-chars", Limits.max_prompt_chars, "characters of a prompt with its history"),
        ("max-new-tokens", MAX_NEW_TOKENS, "length of an answer, in tokens"),
        ("queue-size", QUEUE_SIZE, "requests that may wait; more are turned away at once"),
        ("max-batch", EngineConfig.max_batch, "answers written together (each decode step computes them all)"),
    ):
        name = "LLAMA_ADAPTER_" + flag.upper().replace("-", "_")
        # argparse converts (and checks) a string default with ``type`` as if it came from the command line.
        limits.add_argument(
            f"--{flag}",
            type=_positive,
            default=env_value(name, str(default)),
            help=f"{text}; default {default:,} (env {name})",
        )
    serve.add_api_arguments(p)
    args = p.parse_args(argv)
    check_environment_choices(p, args)
    return args


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


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
    # The same folders and URL rule for the /v1 door as for Gradio's.
    api = serve.api_router(pipe, serve.api_config(args, experts=run_experts))
    launch(
        build_demo(pipe, queue_size=args.queue_size, allowed_dirs=args.allow_local_dir),
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
