"""The OpenAI-compatible API, driven by the real ``openai`` client against servers on 127.0.0.1:
text, an image as a data URL, experts, streaming with usage, stop strings, keys, bad input
answered the OpenAI way (and the next request still answered), a full queue, a client that
hangs up mid-stream, and the README's curl example run as written."""

from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import io
import json
import re
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
import uvicorn
from PIL import Image, ImageDraw
from test_app import free_port
from test_image_chat import Says, visual_pipeline

from experts import ExpertCache, Registry, run_experts
from llama_adapter import Pipeline, serve
from llama_adapter.engine import EngineConfig

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "Name three colours."}]


@contextmanager
def run_server(pipe: Pipeline, config: serve.ApiConfig) -> Iterator[str]:
    """``serve.create_app`` under uvicorn on a free port, in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(serve.create_app(pipe, config), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def circle(colour: str) -> Image.Image:
    img = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).ellipse((16, 16, 80, 80), fill=colour)
    return img


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return visual_pipeline()


@pytest.fixture(scope="module")
def url(pipe: Pipeline) -> Iterator[str]:
    experts = functools.partial(run_experts, registry=Registry([Says("sign", "OPEN 24 HOURS")]), cache=ExpertCache())
    with run_server(pipe, serve.ApiConfig(model_name="demo", experts=experts)) as base:
        yield base


@pytest.fixture
def slow(tiny_pipe) -> Iterator[Pipeline]:
    """The tiny model slowed to 50 ms a forward pass, behind its own engine: one slot, one waiting."""
    model = tiny_pipe.model
    real = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return real(*args, **kwargs)

    pipe = dataclasses.replace(tiny_pipe)
    pipe.start_engine(EngineConfig(max_batch=1, max_waiting=1))
    model.forward = forward
    try:
        yield pipe
    finally:
        pipe.engine.close()
        del model.forward


def test_models_lists_the_loaded_model(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_a_text_answer_with_usage_is_the_librarys_answer(url, pipe):
    api = client(url)
    story = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    for messages, limit, reason in ((story, 8, "length"), (QUESTION, 200, "stop")):
        response = api.chat.completions.create(model="demo", messages=messages, max_tokens=limit, temperature=0)
        expected = pipe.generate(messages, max_new_tokens=limit, temperature=0)
        choice = response.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == expected
        prompt_tokens = len(pipe.encode(pipe.render(messages)))
        assert response.usage.prompt_tokens == prompt_tokens
        assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
        assert choice.finish_reason == reason
        assert (
            response.usage.completion_tokens == limit
            if reason == "length"
            else response.usage.completion_tokens < limit
        )


def test_an_image_as_a_data_url_is_what_the_model_sees(url, pipe):
    question = "What color is the shape? Answer with one word."
    answers = {}
    for colour in ("red", "blue"):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": data_url(circle(colour))}},
                ],
            }
        ]
        response = client(url).chat.completions.create(model="demo", messages=messages, max_tokens=6, temperature=0)
        answers[colour] = response.choices[0].message.content
        assert answers[colour] == pipe.generate(question, image=circle(colour), max_new_tokens=6, temperature=0)
    assert answers["red"] != answers["blue"]


def test_experts_run_on_the_image_and_are_reported(url, pipe):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What does the sign say?"},
                {"type": "image_url", "image_url": {"url": data_url(circle("red"))}},
            ],
        }
    ]
    response = client(url).chat.completions.create(
        model="demo", messages=messages, max_tokens=8, temperature=0, extra_body={"experts": ["ocr"]}
    )
    [report] = response.model_extra["experts"]
    assert (report["name"], report["status"], report["text"], report["image"]) == ("sign", "ok", "OPEN 24 HOURS", 0)
    with_context = [{"role": "user", "content": "What does the sign say?", "context": "Text (sign): OPEN 24 HOURS"}]
    expected = pipe.generate(with_context, image=circle("red"), max_new_tokens=8, temperature=0)
    assert response.choices[0].message.content == expected


def test_a_request_that_names_no_experts_gets_the_servers_default_experts(pipe):
    """As `python app.py` serves the shipped model: its measured default experts run on a
    request's image unless the request names its own ("experts": [] for none)."""
    says = Says("sign", "OPEN 24 HOURS")
    runner = functools.partial(run_experts, registry=Registry([says]), cache=None)
    config = serve.ApiConfig(experts=runner, default_experts=["sign"])
    picture = {"type": "image_url", "image_url": {"url": data_url(circle("red"))}}

    def prepared(content: Any, **fields: Any) -> serve.Prepared:
        request = {"model": "demo", "messages": [{"role": "user", "content": content}], **fields}
        return serve.prepare(serve.ChatRequest.model_validate(request), pipe, config)

    by_default = prepared([{"type": "text", "text": "What does it say?"}, picture])
    assert by_default.messages[0]["context"] == "Text (sign): OPEN 24 HOURS"
    assert [r["name"] for r in by_default.experts] == ["sign"] and says.calls == 1
    asked_for_none = prepared([{"type": "text", "text": "What does it say?"}, picture], experts=[])
    assert "context" not in asked_for_none.messages[0] and asked_for_none.experts is None
    text_only = prepared("Name three colours.")
    assert "context" not in text_only.messages[0] and text_only.experts is None and says.calls == 1


def test_streaming_sends_the_same_answer_in_pieces_and_usage_last(url):
    api = client(url)
    whole = api.chat.completions.create(model="demo", messages=QUESTION, max_tokens=16, temperature=0)
    chunks = list(
        api.chat.completions.create(
            model="demo",
            messages=QUESTION,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_a_stop_string_cuts_the_answer(url):
    api = client(url)
    full = api.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = text.split()[2]
    cut = api.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_wrong_key_is_a_401_and_the_right_one_answers(tiny_pipe):
    with run_server(tiny_pipe, serve.ApiConfig(api_key="s3cret")) as url:
        for key in ("wrong", "none"):
            with pytest.raises(openai.AuthenticationError) as refused:
                client(url, key).chat.completions.create(model="x", messages=QUESTION, max_tokens=2)
            assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        answer = client(url, "s3cret").chat.completions.create(model="x", messages=QUESTION, max_tokens=2)
        assert answer.choices[0].message.content is not None


def image_message(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


@pytest.mark.parametrize(
    "change, message, param",
    [
        ({"messages": image_message("data:image/png;base64,not*base64!")}, "not valid base64", "image_url"),
        (
            {"messages": image_message("data:image/png;base64," + base64.b64encode(b"\x89PNG broken").decode())},
            "not an image",
            "image_url",
        ),
        ({"messages": image_message("data:image/png,raw")}, "must be base64", "image_url"),
        ({"messages": image_message("/etc/hostname")}, "Local image paths are not allowed", "image_url"),
        ({"messages": image_message("file:///etc/passwd")}, "Local image paths are not allowed", "image_url"),
        ({"messages": image_message("http://127.0.0.1:1/x.png")}, "does not fetch image URLs", "image_url"),
        ({"temperature": "hot"}, "valid number", "temperature"),
        ({"max_tokens": "5"}, "valid integer", "max_tokens"),
        ({"messages": [{"role": "user", "content": 5}]}, "Invalid value", "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "Invalid value", "messages[0].role"),
        ({"n": 2}, "Only n=1", "n"),
        ({"messages": [{"role": "user", "content": "word " * 60000}]}, "Shorten it", None),
        ({"max_tokens": 0}, "max_new_tokens must be", None),
        ({"experts": ["ocr"]}, "this request has none", "experts"),
        ({"experts": "ocr"}, "valid list", "experts"),
    ],
)
def test_bad_input_is_a_400_with_a_message_and_the_next_request_answers(url, change, message, param):
    body = {"model": "demo", "messages": QUESTION, "max_tokens": 2, **change}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert param is None or param in (error["param"] or "")
    assert "Traceback" not in response.text
    answer = client(url).chat.completions.create(model="demo", messages=QUESTION, max_tokens=2)
    assert answer.choices[0].message.content is not None


def test_a_corrupt_image_through_the_client_is_a_bad_request(url):
    with pytest.raises(openai.BadRequestError, match="not an image"):
        client(url).chat.completions.create(
            model="demo", messages=image_message("data:image/png;base64," + base64.b64encode(b"GIF89a?").decode())
        )


def test_a_local_image_under_an_allowed_directory_is_read(pipe, tmp_path):
    circle("blue").save(tmp_path / "blue.png")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    circle("blue").save(outside)
    with run_server(pipe, serve.ApiConfig(allow_local_dirs=[tmp_path])) as url:
        api = client(url)
        answer = api.chat.completions.create(
            model="x", messages=image_message(str(tmp_path / "blue.png")), max_tokens=4
        )
        assert answer.choices[0].message.content is not None
        for escape in (str(outside), f"{tmp_path}/../{outside.name}"):
            with pytest.raises(openai.BadRequestError, match="not allowed"):
                api.chat.completions.create(model="x", messages=image_message(escape), max_tokens=4)


def test_remote_images_when_enabled_never_reach_the_servers_own_network(tiny_pipe):
    with run_server(tiny_pipe, serve.ApiConfig(allow_remote_images=True)) as url:
        for target in (f"{url}/v1/models", "http://localhost:1/x.png", "http://10.0.0.1/x.png"):
            with pytest.raises(openai.BadRequestError, match="public address"):
                client(url).chat.completions.create(model="x", messages=image_message(target), max_tokens=2)


def test_a_full_queue_is_a_503_and_the_others_finish(slow):
    with run_server(slow, serve.ApiConfig()) as url:
        api = client(url)
        running = [
            api.chat.completions.create(model="x", messages=QUESTION, max_tokens=40, stream=True) for _ in range(2)
        ]
        next(iter(running[0]))  # decoding; the other waits for the only slot
        with pytest.raises(openai.InternalServerError) as refused:
            api.chat.completions.create(model="x", messages=QUESTION, max_tokens=40)
        assert refused.value.status_code == 503 and refused.value.code == "queue_full"
        assert "busy" in refused.value.message
        for stream in running:
            assert [c for c in stream][-1].choices[0].finish_reason in ("length", "stop")


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(slow, monkeypatch):
    """Without end tokens the answer can only end at its limit (~7 s at 50 ms a step) or by the
    hang-up: the tiny model's own answer stops after ~3 s, which a busy machine has outrun."""
    endless = copy.copy(slow.engine.tokenizer)
    endless.stop_ids = set()
    monkeypatch.setattr(slow.engine, "tokenizer", endless)
    submitted = []
    submit = slow.engine.submit

    def recording(*args: Any, **kwargs: Any) -> Any:
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    slow.engine.submit = recording
    with run_server(slow, serve.ApiConfig()) as url:
        body = {"model": "x", "messages": QUESTION, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        [gone] = submitted
        deadline = time.monotonic() + 60
        while not gone.done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone.finish_reason == "cancelled" and gone.completion_tokens < 200
        assert slow.running == 0
        answer = client(url).chat.completions.create(model="x", messages=QUESTION, max_tokens=3)
        assert answer.choices[0].message.content is not None


def readme_curl() -> str:
    text = (ROOT / "README.md").read_text()
    [block] = re.findall(r"```bash\n(curl [^`]*?/v1/chat/completions[^`]*?)```", text)
    return block


def test_the_readme_curl_example_runs_as_written(url):
    command = readme_curl().replace("http://127.0.0.1:7860", url)
    assert "image_url" in command and "base64" in command
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert isinstance(reply["choices"][0]["message"]["content"], str) and reply["usage"]["completion_tokens"] > 0
