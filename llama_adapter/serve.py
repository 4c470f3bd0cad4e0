"""An OpenAI-compatible HTTP API over a :class:`~llama_adapter.Pipeline`: ``/v1/chat/completions``
(text, images as ``image_url`` parts, streaming) and ``/v1/models``.

    python -m llama_adapter.serve                     # the shipped demo model, http://127.0.0.1:8000/v1
    python -m llama_adapter.serve --api-key KEY --allow-local-dir ./photos --port 8000

``python app.py`` serves the same routes beside the Gradio app (:func:`api_router`). The routes
only translate: every answer is written by the pipeline's engine, which decodes all requests
under way together. Images come as ``data:`` URLs (base64); local paths only under the
directories the operator allows, remote URLs only when the operator enables them.

Experts (``"experts": ["ocr"]``, an extra request field) are given to :class:`ApiConfig` as a
function, e.g. ``experts.run_experts``: this library never imports the ``experts`` package (it
depends on this one); only the command line looks for it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import functools
import json
import logging
import re
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Iterable, Literal, Protocol, Sequence, Union

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool

from .cli import add_model_arguments, add_server_arguments, check_environment_choices, env_value, load_for_serving
from .engine import Request as Generation
from .errors import EngineBusy, GenerationError, InputError, LlamaAdapterError
from .images import open_image
from .pipeline import Pipeline

log = logging.getLogger(__name__)

API_KEY_ENV = "LLAMA_ADAPTER_API_KEY"
MAX_IMAGE_BYTES = 20 * 2**20


class ExpertReport(Protocol):
    """What an experts runner returns (``experts.ExpertReport``): the text for the prompt, and
    one dataclass per expert (name, status, text, …) to report back."""

    context: str | None

    def __iter__(self) -> Iterable[Any]: ...


ExpertsRunner = Callable[[Image.Image, Sequence[str]], ExpertReport]


@dataclass
class ApiConfig:
    """What the API offers and allows, set by the operator."""

    model_name: str | None = None
    """The id ``/v1/models`` lists (default: the adapter's or base's name). Requests may name any model."""
    api_key: str | None = None
    """Bearer key every request must carry; ``None``: open (as the Gradio app is)."""
    allow_local_dirs: Sequence[Path] = ()
    """Directories whose images a request may name by path (``file://`` URL or plain path)."""
    allow_remote_images: bool = False
    """Whether the server fetches ``http(s)://`` image URLs (off: nothing is fetched)."""
    max_image_bytes: int = MAX_IMAGE_BYTES
    remote_timeout_s: float = 10.0
    experts: ExpertsRunner | None = None
    """Runs the experts a request names on one image (``experts.run_experts``); ``None``: no experts."""
    default_experts: Sequence[str] = ()
    """The experts a request with an image and no ``"experts"`` field gets (``"experts": []`` asks
    for none), e.g. what :func:`experts.measured_defaults` chose."""
    allowed_dirs: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        self.allowed_dirs = [Path(d).expanduser().resolve() for d in self.allow_local_dirs]


# -- the request, as OpenAI defines it (unknown fields are ignored, known ones are type-checked) --------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: Union[ImageURL, StrictStr]


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[Part], None] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: StrictInt | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: StrictInt = 1
    experts: list[StrictStr] | None = None


class ApiError(Exception):
    """An error answered the OpenAI way: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- from OpenAI messages to our prompt ----------------------------------------------------------------------


@dataclass
class Prepared:
    messages: list[dict[str, str]]
    image: Image.Image | None  # the one the model sees: the last one
    experts: list[dict[str, Any]] | None


def load_image_url(url: str, config: ApiConfig, param: str) -> bytes:
    """The bytes of an ``image_url``: a base64 ``data:`` URL, an allowed local file, or (when
    enabled) an http(s) URL."""
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise _bad("An image data URL must be base64: data:image/png;base64,<data>.", param)
        if len(data) > config.max_image_bytes * 4 // 3 + 4:
            raise _bad(f"The image is larger than {config.max_image_bytes:,} bytes.", param)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("The image data URL is not valid base64.", param) from None
    if re.match(r"https?://", url, re.IGNORECASE):
        if not config.allow_remote_images:
            raise _bad(
                "This server does not fetch image URLs: send the image as a data URL "
                "(data:image/png;base64,...), or start the server with --allow-remote-images.",
                param,
            )
        return _fetch(url, config, param)
    path = url.removeprefix("file://")
    if "://" in path:
        raise _bad("image_url must be a data: URL, an http(s) URL or a local path.", param)
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(d) for d in config.allowed_dirs):
        log.warning("Refused an image path outside the allowed directories: %r", url)
        raise _bad(
            "Local image paths are not allowed here: send the image as a data URL (data:image/png;base64,...)"
            + (", or a path under an allowed directory." if config.allowed_dirs else "."),
            param,
        )
    if not resolved.is_file():
        raise _bad(f"No image file at {path}.", param)
    if resolved.stat().st_size > config.max_image_bytes:
        raise _bad(f"The image is larger than {config.max_image_bytes:,} bytes.", param)
    return resolved.read_bytes()


def _fetch(url: str, config: ApiConfig, param: str) -> bytes:
    """GET a public image URL: no private, loopback or link-local address (the server's own
    network is not the client's to browse), no redirects, at most ``max_image_bytes``."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    import httpx

    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        raise _bad(f"Could not resolve the image URL's host {host!r}.", param) from None
    if any(not ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        raise _bad("Image URLs must point to a public address.", param)
    try:
        with httpx.stream("GET", url, timeout=config.remote_timeout_s, follow_redirects=False) as response:
            if response.is_redirect:
                raise _bad("The image URL redirects; give the final URL.", param)
            response.raise_for_status()
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > config.max_image_bytes:
                    raise _bad(f"The image is larger than {config.max_image_bytes:,} bytes.", param)
            return bytes(data)
    except httpx.HTTPError as e:
        raise _bad(f"Could not fetch the image ({type(e).__name__}: {e}).", param) from None


def prepare(req: ChatRequest, pipe: Pipeline, config: ApiConfig) -> Prepared:
    """Our messages (expert text as each user message's ``context``), the image the model sees,
    and the experts' report."""
    if req.experts and config.experts is None:
        raise _bad('This server has no experts; leave out "experts".', "experts")
    explicit = req.experts is not None
    chosen = req.experts if explicit else list(config.default_experts) if config.experts else []
    messages: list[dict[str, str]] = []
    image: Image.Image | None = None
    report: list[dict[str, Any]] = []
    images_seen = 0
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content or []
        texts, contexts = [], []
        for j, part in enumerate(parts):
            if isinstance(part, TextPart):
                texts.append(part.text)
                continue
            param = f"messages[{i}].content[{j}].image_url"
            if role != "user":
                raise _bad("Images may only be sent in user messages.", param)
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            try:
                picture = open_image(load_image_url(url, config, param), max_pixels=pipe.max_image_pixels)
            except InputError as e:
                raise _bad(str(e), param, "invalid_image") from None
            image = picture
            if chosen:
                context, results = _run_experts(config.experts, picture, chosen)
                report += [{"image": images_seen, **r} for r in results]
                if context:
                    contexts.append(context)
            images_seen += 1
        message = {"role": role, "content": "\n".join(texts)}
        if contexts:
            message["context"] = "\n".join(contexts)
        messages.append(message)
    if explicit and chosen and not images_seen:
        raise _bad("Experts describe images, and this request has none.", "experts")
    if image is not None and not pipe.accepts_images:
        if not chosen:
            raise _bad(
                'This model has no image encoder: it cannot see images. Ask for experts (e.g. "experts": ["ocr"]) '
                "to give it their text about the image.",
                "messages",
            )
        image = None  # a text-only model sees the image through the experts' text only
    return Prepared(messages, image, report if chosen and images_seen else None)


def _run_experts(runner: ExpertsRunner, image: Image.Image, names: Sequence[str]) -> tuple[str | None, list[dict]]:
    try:
        result = runner(image, list(names))
    except KeyError as e:  # an unknown expert name: the message says which exist
        raise _bad(str(e.args[0]) if e.args else str(e), "experts") from None
    return result.context, [asdict(r) for r in result]


def sampling(req: ChatRequest) -> dict[str, Any]:
    if req.n != 1:
        raise _bad("Only n=1 is supported.", "n")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    return {
        "max_new_tokens": req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,  # OpenAI's defaults
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "seed": req.seed,
        "stop": tuple(stop or ()),
    }


# -- the routes ----------------------------------------------------------------------------------------------


def model_id(pipe: Pipeline, config: ApiConfig) -> str:
    if config.model_name:
        return config.model_name
    source = pipe.info.get("adapter") or pipe.info.get("base") or "llama-adapter"
    return Path(str(source)).name.removesuffix(".safetensors")


def api_router(pipe: Pipeline, config: ApiConfig | None = None) -> APIRouter:
    """The ``/v1`` routes over ``pipe``, to include in any FastAPI app (Gradio's included)."""
    config = config or ApiConfig()
    router = APIRouter()
    name = model_id(pipe, config)
    started = int(time.time())

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    @router.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        try:
            check_key(request)
        except ApiError as e:
            return e.response()
        card = {"id": name, "object": "model", "created": started, "owned_by": "llama-adapter"}
        return JSONResponse({"object": "list", "data": [card]})

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            check_key(request)
            req = await _parse(request)
            params = sampling(req)
            prepared, generation = await run_in_threadpool(_start, req, params, pipe, config)
        except ApiError as e:
            return e.response()
        except Exception as e:
            return _unexpected(e).response()
        answer = _Answer(name, prepared, generation)
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(
                answer.events(include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            return JSONResponse(await answer.whole())
        except ApiError as e:
            return e.response()
        finally:
            watcher.cancel()

    return router


async def _parse(request: Request) -> ChatRequest:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise _bad("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"])
        raise _bad(f"Invalid value for '{param}': {first['msg']}.", param) from None


_FIELDS = {
    name
    for model in (ChatRequest, ChatMessage, TextPart, ImagePart, ImageURL, StreamOptions)
    for name in model.model_fields
}


def _param(loc: tuple) -> str:
    """``("messages", 0, "content", "str")`` as ``messages[0].content`` (pydantic's union labels left out)."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _FIELDS:
            param += f".{part}" if param else part
        else:
            break
    return param


def _start(req: ChatRequest, params: dict[str, Any], pipe: Pipeline, config: ApiConfig) -> tuple[Prepared, Generation]:
    """Images, experts, the visual prompt and the prompt's tokens (in a worker thread: they are
    slow), then the request joins the engine's queue."""
    try:
        prepared = prepare(req, pipe, config)
        return prepared, pipe.submit(prepared.messages, prepared.image, **params)
    except EngineBusy as e:
        raise ApiError(503, str(e), "server_error", code="queue_full") from None
    except InputError as e:
        raise _bad(str(e), code="invalid_request") from None


def _unexpected(error: Exception) -> ApiError:
    if isinstance(error, GenerationError):
        return ApiError(500, str(error), "server_error")
    if isinstance(error, LlamaAdapterError):
        return _bad(str(error))
    log.error("Unexpected error in /v1/chat/completions", exc_info=error)
    return ApiError(500, f"Internal error ({type(error).__name__}); the server goes on.", "server_error")


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """A client that hung up before its (non-streamed) answer frees its slot."""
    while not generation.done:
        if await request.is_disconnected():
            generation.cancel()
            return
        await asyncio.sleep(0.25)


class _Answer:
    """One completion's response, whole or as server-sent events."""

    def __init__(self, model: str, prepared: Prepared, generation: Generation) -> None:
        self.model, self.prepared, self.generation = model, prepared, generation
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _base(self, kind: str) -> dict[str, Any]:
        base = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if self.prepared.experts is not None:
            base["experts"] = self.prepared.experts
        return base

    def usage(self) -> dict[str, int]:
        g = self.generation
        return {
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens,
        }

    def finish_reason(self) -> str:
        return "length" if self.generation.finish_reason == "length" else "stop"

    async def whole(self) -> dict[str, Any]:
        try:
            text = "".join([piece async for piece in self.generation])
        except GenerationError as e:
            raise ApiError(500, str(e), "server_error") from None
        message = {"role": "assistant", "content": text}
        return {
            **self._base("chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason(), "logprobs": None}],
            "usage": self.usage(),
        }

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict[str, str], finish: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = {**self._base("chat.completion.chunk"), "choices": [choice], **extra}
            if include_usage:
                body.setdefault("usage", None)
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for piece in self.generation:
                yield chunk({"content": piece})
            yield chunk({}, self.finish_reason())
            if include_usage:
                body = {**self._base("chat.completion.chunk"), "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(body)}\n\n"
        except GenerationError as e:
            error = {"message": str(e), "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            if not self.generation.done:
                self.generation.cancel()  # a client gone mid-stream: its slot is freed before the next step
        yield "data: [DONE]\n\n"


def create_app(pipe: Pipeline, config: ApiConfig | None = None) -> FastAPI:
    """A FastAPI app serving only the ``/v1`` routes."""
    app = FastAPI(title="LLaMA-Adapter V2 (OpenAI-compatible)", docs_url=None, redoc_url=None)
    app.include_router(api_router(pipe, config))
    return app


# -- command line --------------------------------------------------------------------------------------------


def add_api_arguments(p: argparse.ArgumentParser) -> None:
    """The API's own flags, shared with ``app.py``."""
    group = p.add_argument_group("OpenAI-compatible API (/v1)")
    group.add_argument(
        "--api-key", default=env_value(API_KEY_ENV), help=f"bearer key required by /v1 (env {API_KEY_ENV})"
    )
    group.add_argument(
        "--model-name",
        default=env_value("LLAMA_ADAPTER_MODEL_NAME"),
        help="the model id /v1/models lists (default: the adapter's file name; env LLAMA_ADAPTER_MODEL_NAME)",
    )


def api_config(
    args: argparse.Namespace, experts: ExpertsRunner | None, default_experts: Sequence[str] = ()
) -> ApiConfig:
    return ApiConfig(
        model_name=args.model_name,
        api_key=args.api_key or None,
        allow_local_dirs=args.allow_local_dir,
        allow_remote_images=args.allow_remote_images,
        experts=experts,
        default_experts=default_experts,
    )


def _installed_experts(pipe: Pipeline) -> tuple[ExpertsRunner | None, list[str]]:
    """``experts.run_experts`` over the experts for ``pipe`` (:func:`experts.registry_for`) and the
    ones measured to help it (:func:`experts.measured_defaults`), when the repository's ``experts``
    package is importable. Only this command line looks: the library takes experts as a function
    (``ApiConfig.experts``)."""
    try:
        from experts import measured_defaults, registry_for, run_experts
    except ImportError:
        log.info("No experts package: requests that ask for experts get a 400")
        return None, []
    registry = registry_for(pipe)
    chosen, why = measured_defaults(pipe, registry)
    if why:
        log.info('%s Requests with an image and no "experts" field get it.', why)
    return functools.partial(run_experts, registry=registry), chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_adapter.serve", description="Serve a model over the OpenAI chat completions API."
    )
    add_model_arguments(p, server=True)
    add_server_arguments(p, port=8000, host_env="LLAMA_ADAPTER_HOST", port_env="LLAMA_ADAPTER_PORT")
    add_api_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_environment_choices(p, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        pipe = load_for_serving(args)
    except (LlamaAdapterError, ValueError) as e:
        log.error("Could not load the model: %s", e)
        return 2
    import uvicorn

    config = api_config(args, *_installed_experts(pipe))
    log.info("Serving %s at http://%s:%d/v1", model_id(pipe, config), args.host, args.port)
    app = create_app(pipe, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
