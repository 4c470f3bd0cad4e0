"""The Gradio app through its API, as gradio_client sees it: streamed chat, multi-turn history,
a multimodal chat with images turn by turn, describe_image with OCR, compare, plain error messages;
the page's shape and wiring, how a conversation is shown, flags and ``python app.py``."""

from __future__ import annotations

import atexit
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw, ImageFont
from test_image_chat import CIRCLE, TRIANGLE, visual_pipeline

import app
import llama_adapter.cli
import llama_adapter.engine
from experts import (
    Availability,
    Expert,
    MultimodalChat,
    Registry,
    compare,
    default_registry,
    measured_defaults,
    registry_for,
    run_experts,
)
from llama_adapter import CheckpointError, Pipeline
from llama_adapter import serve as openai_api
from llama_adapter.build import DEFAULT_ADAPTER
from llama_adapter.engine import EngineConfig
from llama_adapter.pipeline import Limits

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
SIGN_TEXT = "OPEN 24 HOURS"
FAST = {"max_new_tokens": 16, "temperature": 0.0}


class Flaky(Expert):
    """A captioner that always fails, for the "an expert fails, the answer goes on" path."""

    name, kind, label, context_label = "flaky", "caption", "Flaky captioner", "Caption (flaky)"

    def availability(self) -> Availability:
        return Availability(True)

    def describe(self, image: Image.Image) -> str:
        raise RuntimeError("the captioner crashed")


@dataclass
class Served:
    url: str
    demo: gr.Blocks
    pipe: Pipeline
    examples: Path
    sign: Path
    registry: Registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_sign(path: Path, text: str = SIGN_TEXT) -> Path:
    img = Image.new("RGB", (640, 200), "white")
    ImageDraw.Draw(img).text((40, 60), text, font=ImageFont.truetype(FONT, 56), fill="black")
    img.save(path)
    return path


def example_dir(workdir: Path) -> Path:
    """The shipped examples, else the generated demo data's, else two rendered here."""
    for directory in (app.EXAMPLES_DIR, ROOT / "data" / "demo" / "examples"):
        if (directory / "examples.json").is_file():
            return directory
    directory = workdir / "examples"
    directory.mkdir()
    render_sign(directory / "open_sign.png")
    shape = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(shape).ellipse((24, 24, 104, 104), fill="red")
    shape.save(directory / "circle.png")
    items = [
        {"image": "open_sign.png", "question": "What does the sign say?", "answer": SIGN_TEXT},
        {"image": "circle.png", "question": "What shape is in the image?", "answer": "circle"},
    ]
    (directory / "examples.json").write_text(json.dumps(items))
    return directory


@functools.cache
def serve() -> Served:
    """One app per test process on 127.0.0.1, shared with the browser tests. It serves the demo model
    in exact float32: these tests compare answers with oracles computed another way (a fresh
    generate of the whole conversation, the library's chat), which agree with a continued
    conversation to ~1e-7 in float32; int8's bfloat16 activations round such differences up far
    enough to flip a greedy token now and then. test_demo_model.py checks the int8 default."""
    workdir = Path(tempfile.mkdtemp(prefix="app-test-"))
    pipe = visual_pipeline("fp32")
    registry = Registry([*default_registry(), Flaky()])
    examples = example_dir(workdir)
    demo = app.build_demo(pipe, registry=registry, examples_dir=examples)
    api = openai_api.api_router(pipe, openai_api.ApiConfig(experts=functools.partial(run_experts, registry=registry)))
    port = free_port()
    app.launch(demo, host="127.0.0.1", port=port, api=api, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    atexit.register(demo.close)
    return Served(f"http://127.0.0.1:{port}/", demo, pipe, examples, render_sign(workdir / "sign.png"), registry)


@pytest.fixture(scope="module")
def served() -> Served:
    return serve()


@pytest.fixture(scope="module")
def client(served: Served) -> Client:
    return Client(served.url, verbose=False)


# -- the API ---------------------------------------------------------------------------------------------


def test_the_api_has_four_named_endpoints(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == {"/chat", "/chat_multimodal", "/describe_image", "/compare"}  # UI events are private
    assert [p["parameter_name"] for p in endpoints["/describe_image"]["parameters"]][:3] == [
        "image",
        "instruction",
        "experts",
    ]
    for name in ("/chat", "/chat_multimodal"):
        message, history = endpoints[name]["parameters"][:2]
        assert (message["parameter_name"], history["parameter_name"]) == ("message", "history")
        assert not message["parameter_has_default"] and history["parameter_has_default"]


def test_the_page_is_one_multimodal_chat_and_a_compare_tab(served):
    config = served.demo.get_config_file()
    kinds = [c["type"] for c in config["components"]]
    assert kinds.count("multimodaltextbox") == 1 and kinds.count("chatbot") == 1
    tabs = [c["props"]["label"] for c in config["components"] if c["type"] == "tabitem"]
    assert tabs == ["Chat", "Compare"]
    # No image input of its own: images come with messages (the Image components only show the one in view).
    assert all(not c["props"].get("interactive") for c in config["components"] if c["type"] == "image")
    [box] = [c for c in config["components"] if c["type"] == "multimodaltextbox"]
    assert box["props"]["file_types"] == ["image"] and box["props"]["sources"] == ["upload"]
    [chatbot] = [c for c in config["components"] if c["type"] == "chatbot"]
    assert chatbot["props"]["editable"] == "user"


def test_chat_streams_the_answer_in_several_pieces(client, served):
    job = client.submit("Name three colours.", [], max_new_tokens=24, temperature=0.0, api_name="/chat")
    answer = job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) >= 3
    assert all(later.startswith(earlier) for earlier, later in zip(outputs, outputs[1:]))
    assert answer == outputs[-1] == served.pipe.generate("Name three colours.", max_new_tokens=24)


def test_a_second_turn_sees_the_first(client, served):
    said = "My name is Ada and my favourite colour is green."
    first = client.predict(said, [], **FAST, api_name="/chat")
    history = [{"role": "user", "content": said}, {"role": "assistant", "content": first}]
    second = client.predict("What is my name?", history, **FAST, api_name="/chat")
    alone = client.predict("What is my name?", [], **FAST, api_name="/chat")
    conversation = [*history, {"role": "user", "content": "What is my name?"}]
    assert second == served.pipe.generate(conversation, max_new_tokens=16)
    assert second != alone


def page_event(served: Served, name: str):
    """The function behind one of the page's events (they are private: no API endpoint reaches them)."""
    return next(fn.fn for fn in served.demo.fns.values() if fn.name == name)


def test_chat_answers_after_retry_undo_and_a_new_system_prompt_equal_a_fresh_generate(served):
    """The chat's Send, Retry and Undo and its system prompt box, as the page calls them: each answer
    after the session's cache was cut back is exactly generate's for what the model read."""
    send, retry, undo = (page_event(served, name) for name in ("send", "retry", "undo"))
    settings = ([], 0.0, 1.0, 12, 0)  # experts, temperature, top_p, max new tokens, seed

    def answered(events) -> tuple[app.Conversation, str]:
        *_, last = events
        conv = next(v for v in last.values() if isinstance(v, app.Conversation))
        shown = next(v for c, v in last.items() if isinstance(c, gr.Chatbot))
        assert shown[-1]["content"] == conv.chat.messages[-1]["content"]
        return conv, shown[-1]["content"]

    def fresh(conv: app.Conversation) -> str:
        return served.pipe.generate(conv.chat.session.read()[:-1], max_new_tokens=12)

    def message(text: str) -> dict:
        return {"text": text, "files": []}

    system = "You are terse."
    conv, _ = answered(send(message("Name three colours."), None, system, *settings))
    conv, _ = answered(send(message("What shape is a wheel?"), conv, system, *settings))
    conv, answer = answered(retry(conv, system, *settings))
    assert answer == fresh(conv), "after Retry"
    undo(conv)
    conv, answer = answered(send(message("Count to five."), conv, system, *settings))
    assert answer == fresh(conv), "after Undo"
    conv, answer = answered(send(message("And to six?"), conv, "Answer in French.", *settings))
    assert conv.chat.messages[0] == {"role": "system", "content": "Answer in French."}
    assert answer == fresh(conv), "after a new system prompt"


def test_chat_history_is_optional(client, served):
    assert client.predict("Say hi.", max_new_tokens=4, temperature=0.0, api_name="/chat") == served.pipe.generate(
        "Say hi.", max_new_tokens=4
    )


def test_chat_multimodal_turn_by_turn_as_the_browser_does(client, served):
    """text → circle → text → triangle → text through gradio_client: each answer is about the image in
    view, and is what the library's MultimodalChat answers for the same conversation."""
    history: list[dict] = []
    chat = MultimodalChat(served.pipe, registry=served.registry)
    steps = [
        ("Name three colours.", [], None),
        ("What shape is in the image?", [CIRCLE], "circle"),
        ("What shape is it?", [], "circle"),
        ("What shape is in the image?", [TRIANGLE], "triangle"),
        ("What shape is it?", [], "triangle"),
    ]
    for text, files, shape in steps:
        message = {"text": text, "files": [handle_file(f) for f in files]}
        answer = client.predict(message, history, max_new_tokens=12, temperature=0.0, api_name="/chat_multimodal")
        assert answer == chat.ask(text, [str(f) for f in files], max_new_tokens=12, temperature=0.0), text
        if shape:
            other = "triangle" if shape == "circle" else "circle"
            assert shape in answer.lower() and other not in answer.lower(), (text, answer)
        history += [
            {"role": "user", "content": text, "files": [handle_file(f) for f in files]},
            {"role": "assistant", "content": answer},
        ]


def test_chat_multimodal_with_experts_and_images_only(client, served):
    sign = {"text": "What does the sign say?", "files": [handle_file(served.sign)]}
    answer = client.predict(sign, [], experts=["ocr"], **FAST, api_name="/chat_multimodal")
    chat = MultimodalChat(served.pipe, registry=served.registry)
    assert answer == chat.ask("What does the sign say?", [str(served.sign)], ["ocr"], **FAST)
    assert "24 HOURS" in chat.last_turn.prompt
    # A message with an image and no text asks the default question.
    described = client.predict({"text": "", "files": [handle_file(CIRCLE)]}, **FAST, api_name="/chat_multimodal")
    assert described == served.pipe.generate(app.DEFAULT_QUESTION, image=CIRCLE, **FAST)


def test_describe_image_with_ocr_returns_the_expert_text_and_an_answer(client, served):
    result = client.predict(
        handle_file(served.sign), "What does the sign say?", ["ocr"], **FAST, api_name="/describe_image"
    )
    [ocr] = result["experts"]
    assert ocr["status"] == "ok" and " ".join(ocr["text"].split()) == SIGN_TEXT
    assert result["answer"].strip() and result["image_to_model"]
    assert "[Image context]" in result["prompt"] and "24 HOURS" in result["prompt"]


def test_compare_returns_the_answers_without_and_with_experts(client, served):
    question = "What does the sign say?"
    result = client.predict(handle_file(served.sign), question, ["ocr"], **FAST, api_name="/compare")
    without, with_ocr = result["variants"]
    assert without["experts"] == [] and with_ocr["experts"] == ["ocr-easyocr"]
    assert "24 HOURS" not in without["prompt"] and "24 HOURS" in with_ocr["prompt"]
    assert without["seconds"] > 0 and with_ocr["seconds"] > 0
    # Same answers as describe_image gives for each prompt (greedy, same seed).
    for variant, experts in ((without, []), (with_ocr, ["ocr"])):
        alone = client.predict(handle_file(served.sign), question, experts, **FAST, api_name="/describe_image")
        assert variant["answer"] == alone["answer"] and variant["prompt"] == alone["prompt"]


def test_a_failing_expert_is_reported_and_the_answer_goes_on(client, served):
    result = client.predict(
        handle_file(served.sign), "What does the sign say?", ["ocr", "flaky"], **FAST, api_name="/describe_image"
    )
    ocr, flaky = result["experts"]
    assert ocr["status"] == "ok" and flaky["status"] == "failed" and "crashed" in flaky["reason"]
    assert result["answer"].strip() and "24 HOURS" in result["prompt"] and "flaky" not in result["prompt"]


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.png").write_text("these are notes, not a picture")
    good = d / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    (d / "truncated.png").write_bytes(good.read_bytes()[:60])
    Image.new("L", (8000, 6000)).save(d / "huge.png")  # 48 Mpx: over the 40 Mpx limit, 50 kB on disk
    return {p.stem: p for p in d.iterdir()}


@pytest.mark.parametrize(
    ("endpoint", "args", "message"),
    [
        ("/describe_image", ("notes", "What is it?", ["ocr"]), "not an image Pillow can read"),
        ("/describe_image", ("truncated", "What is it?", []), "corrupt or truncated"),
        ("/describe_image", ("huge", "What is it?", []), "the limit is 40,000,000"),
        ("/describe_image", ("good", "   ", []), "message is empty"),
        ("/describe_image", ("good", "What is it?", ["telepathy"]), "Unknown expert 'telepathy'"),
        ("/compare", ("good", "What is it?", []), "at least one expert"),
        ("/chat", ("word " * 9000, []), "Shorten it"),
        ("/chat", ("", []), "message is empty"),
        ("/chat_multimodal", ("What is it?", []), "must be"),
        ("/chat_multimodal", ({"text": "What is it?", "files": ["notes"]}, []), "not an image Pillow can read"),
        ("/chat_multimodal", ({"text": "What is it?", "files": "notes"}, []), "files must be a list"),
        ("/chat_multimodal", ({"text": "", "files": []}, []), "message is empty"),
        ("/chat_multimodal", ({"text": "Hi"}, [{"role": "wizard", "content": "x"}]), "role of system, user"),
        ("/chat_multimodal", ({"text": "Hi", "files": ["good"]}, [], "", ["telepathy"]), "Unknown expert"),
    ],
)
def test_bad_input_gets_a_plain_message_and_the_app_goes_on(client, bad_images, endpoint, args, message):
    def upload(value):
        if isinstance(value, str) and value in bad_images:
            return handle_file(bad_images[value])
        if isinstance(value, dict) and isinstance(value.get("files"), list):
            return {**value, "files": [upload(f) for f in value["files"]]}
        return value

    args = tuple(upload(a) for a in args)
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name=endpoint)
    assert isinstance(client.predict("Say hi.", [], max_new_tokens=2, api_name="/chat"), str)  # still serving


def test_the_openai_api_answers_on_the_apps_port(served):
    """The same engine behind both doors: /v1 on the Gradio port, experts included."""
    import base64

    import openai

    api = openai.OpenAI(base_url=f"{served.url}v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list().data] == ["demo-adapter"]
    image = "data:image/png;base64," + base64.b64encode(served.sign.read_bytes()).decode()
    content = [{"type": "text", "text": "What does the sign say?"}, {"type": "image_url", "image_url": {"url": image}}]
    r = api.chat.completions.create(
        model="demo-adapter",
        messages=[{"role": "user", "content": content}],
        max_tokens=8,
        temperature=0,
        extra_body={"experts": ["flaky"]},
    )
    assert r.choices[0].message.content and r.model_extra["experts"][0]["status"] == "failed"
    assert httpx.get(served.url).status_code == 200  # and the app is still there


# -- wiring ----------------------------------------------------------------------------------------------


def test_model_events_share_one_queue_slot_and_the_queue_is_bounded(served):
    model_fns = {"send", "retry", "edit", "look_inside", "compare_side_by_side", "look_inside_compared"}
    model_fns |= {"chat_api", "chat_multimodal_api", "describe_image_api", "compare_api"}
    fns = [fn for fn in served.demo.fns.values() if fn.name in model_fns]
    assert {fn.name for fn in fns} == model_fns
    # As many model events run at once as the engine decodes together; the rest wait in Gradio's queue.
    slots = served.pipe.engine.config.max_batch
    assert all(fn.concurrency_id == "model" and fn.concurrency_limit == slots for fn in fns)
    instant = [fn for fn in served.demo.fns.values() if fn.name in ("stop", "undo", "clear", "show_compare")]
    assert len(instant) == 4 and not any(fn.queue for fn in instant)  # they do not wait behind answers
    assert served.demo._queue.max_size == app.QUEUE_SIZE


def test_the_chat_shows_images_experts_and_prompts_as_steps(served):
    """How a conversation is drawn: each image's step says whether it is in view, which of several
    attached was used; each expert's step its text and time (or "cached", or why it was skipped);
    the exact prompt one click away."""
    chat = MultimodalChat(served.pipe, registry=served.registry)
    chat.ask("What does the sign say?", [str(served.sign)], ["ocr", "flaky"], **FAST)
    chat.ask("Is it open at night?", experts=["ocr"], **FAST)
    chat.ask("What shape is in the image?", [str(served.sign), str(CIRCLE)], **FAST)
    shown = app.conversation(chat)
    titles = [m["metadata"]["title"] for m in shown if m.get("metadata")]
    ocr = next(r for r in chat.turns[0].experts if r.name == "ocr-easyocr")
    assert titles == [
        "Image 1: sign.png · replaced by a later image",
        ocr.label,
        "Flaky captioner: skipped",
        "The exact prompt",
        f"{ocr.label}: read this image already",
        "The exact prompt",
        "Image 2: circle.png · in view (the last of 2 attached)",
        "The exact prompt",
    ]
    steps = [m for m in shown if m.get("metadata")]
    assert "24 HOURS" in steps[1]["content"] and ("duration" in steps[1]["metadata"]) != ocr.cached
    assert "crashed" in steps[2]["content"] and steps[2]["metadata"]["log"] == "failed"
    assert "Not read: sign.png" in steps[6]["content"]
    assert steps[7]["content"] == app.fenced(chat.turns[2].prompt) and "sign" not in chat.turns[2].prompt
    users = [m["content"] for m in shown if m["role"] == "user"]
    assert users[3:] == ["What shape is in the image?", {"path": str(served.sign)}, {"path": str(CIRCLE)}]
    assert app.asked_before(shown, shown.index({"role": "user", "content": "What shape is in the image?"})) == 2
    answers = [m["content"] for m in shown if m["role"] == "assistant" and not m.get("metadata")]
    assert answers == [m["content"] for m in chat.messages if m["role"] == "assistant"]
    image, note = app.image_in_view(chat)
    assert image == str(CIRCLE) and note.startswith("**Image 2** (circle.png)")


def test_inside_this_answer_draws_the_last_answers_pictures_on_request(served):
    """The accordion's button: the pictures of the chat's last answer, as llama_adapter.explain traces
    it; a conversation with no answer gets a warning and nothing drawn."""
    [fn] = [fn for fn in served.demo.fns.values() if fn.name == "look_inside"]
    conv = app.Conversation(MultimodalChat(served.pipe, registry=served.registry))
    with pytest.warns(UserWarning, match="no answer to look inside"):
        assert fn.fn(conv) == {}
    conv.chat.ask("What shape is in the image?", [str(CIRCLE)], **FAST)
    conv.chat.ask("What colour is it?", **FAST)
    shown = fn.fn(conv)
    plots = {c.elem_id.removeprefix("inside-"): update for c, update in shown.items() if isinstance(c, gr.Plot)}
    assert {name for name, update in plots.items() if update.visible} == {"looked", "gates", "adapter_share"}
    note = next(v for c, v in shown.items() if c.elem_id == "inside-note")
    assert "What colour is it?" in note and "7×7 grid" in note
    trace = conv.chat.explain()
    assert trace.answer == conv.chat.messages[-1]["content"] and trace.prompt == conv.chat.last_turn.prompt


def test_inside_the_compared_answers_draws_both_answers_pictures_on_request(served):
    """Compare's accordion: each answer traced over the prompt it was given (the OCR text only on the
    right); before any comparison, a warning and nothing drawn."""
    [fn] = [fn for fn in served.demo.fns.values() if fn.name == "look_inside_compared"]
    with pytest.warns(UserWarning, match="press Compare first"):
        assert fn.fn(None) == {}
    question = "What does the sign say?"
    result = compare(served.pipe, question, str(served.sign), [["ocr"]], registry=served.registry, **FAST)
    shown = fn.fn(result)
    for side in ("without", "with"):
        plots = {
            c.elem_id.removeprefix(f"compare-inside-{side}-"): update
            for c, update in shown.items()
            if isinstance(c, gr.Plot) and c.elem_id.startswith(f"compare-inside-{side}-")
        }
        assert {"looked", "gates", "adapter_share"} <= {name for name, update in plots.items() if update.visible}
    note = next(v for c, v in shown.items() if c.elem_id == "compare-inside-note")
    assert question in note
    without, with_ocr = (result.explain(served.pipe, i) for i in (0, 1))
    assert (without.answer, with_ocr.answer) == tuple(v.answer for v in result.variants)
    assert "24 HOURS" not in without.prompt and "24 HOURS" in with_ocr.prompt
    assert without.grid is not None and without.grid.shape == (7, 7)


def test_the_header_names_base_adapter_and_precision(served):
    header = app.header_markdown(served.pipe)
    info = served.pipe.info
    assert info["base"] in header and Path(info["adapter"]).name in header
    assert info["dtype"] in header and "sees images" in header


def test_a_text_only_model_gets_a_polite_note_in_the_chat(smol):
    demo = app.build_demo(smol, registry=Registry([Flaky()]), examples_dir=Path("/nonexistent"))
    notes = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "text-only-note"]
    assert len(notes) == 1 and "cannot see pictures" in notes[0].value
    assert "text only" in app.header_markdown(smol)


def test_examples_come_from_the_index_and_are_skipped_when_missing(tmp_path):
    assert app.load_examples(tmp_path) == []
    (tmp_path / "examples.json").write_text("{not json")
    assert app.load_examples(tmp_path) == []
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "What?"}, {"image": "missing.png", "question": "Where?"}]
    (tmp_path / "examples.json").write_text(json.dumps(rows))
    assert app.load_examples(tmp_path) == [[str(tmp_path / "a.png"), "What?"]]


def test_flags_default_to_the_environment(monkeypatch):
    for name in ("LLAMA_ADAPTER_BASE", "LLAMA_ADAPTER_ADAPTER", "LLAMA_ADAPTER_DTYPE", "GRADIO_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LLAMA_ADAPTER_COMPILE")  # set to 0 for the suite (conftest.py)
    monkeypatch.setenv("LLAMA_ADAPTER_QUANTIZE", "int8")
    monkeypatch.setenv("LLAMA_ADAPTER_DEVICE", "cuda")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    args = app.parse_args([])
    assert (args.base, args.adapter, args.quantize, args.device, args.dtype) == (None, None, "int8", "cuda", None)
    assert (args.host, args.port, args.share, args.compile) == ("127.0.0.1", 7861, False, True)
    monkeypatch.setenv("LLAMA_ADAPTER_COMPILE", "0")
    assert not app.parse_args([]).compile
    monkeypatch.delenv("LLAMA_ADAPTER_COMPILE")
    args = app.parse_args(["--device", "cpu", "--dtype", "bf16", "--host", "0.0.0.0", "--port", "9000", "--share"])
    assert (args.device, args.dtype, args.host, args.port, args.share) == ("cpu", "bf16", "0.0.0.0", 9000, True)
    for name, wrong in (("LLAMA_ADAPTER_QUANTIZE", "int3"), ("LLAMA_ADAPTER_DTYPE", "fp8")):
        monkeypatch.setenv(name, wrong)
        with pytest.raises(SystemExit):
            app.parse_args([])
        monkeypatch.delenv(name)


def test_main_loads_once_and_launches(monkeypatch, served):
    monkeypatch.delenv("LLAMA_ADAPTER_COMPILE")  # the default, not the suite's eager setting (conftest.py)
    loads, launches = [], []
    monkeypatch.setattr(llama_adapter.cli, "load", lambda *a, **k: loads.append((a, k)) or served.pipe)
    monkeypatch.setattr(app, "launch", lambda demo, **k: launches.append((demo, k)))
    compiles = []
    monkeypatch.setattr(llama_adapter.engine.Engine, "compile_in_background", lambda engine: compiles.append(engine))
    assert app.main(["--adapter", "mine.safetensors", "--port", "9001"]) == 0
    limits = Limits(max_new_tokens=app.MAX_NEW_TOKENS)
    # By default the precision is load()'s choice, and the app serves at once, eager, and
    # compiles in the background.
    expected = {"device": "cpu", "dtype": None, "quantize": "auto", "compile": False, "template": None}
    expected |= {"force": False, "limits": limits}
    assert loads == [((None, "mine.safetensors"), expected)] and compiles == [served.pipe.engine]
    [(demo, kwargs)] = launches
    api = kwargs.pop("api")
    door = {"allowed_dirs": [], "allow_urls": False}
    assert isinstance(demo, gr.Blocks) and kwargs == {"host": "127.0.0.1", "port": 9001, "share": False, **door}
    assert {route.path for route in api.routes} == {"/v1/models", "/v1/chat/completions"}
    assert served.pipe.engine.config == EngineConfig(max_batch=8, max_waiting=app.QUEUE_SIZE)


def test_main_says_why_the_model_did_not_load(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise CheckpointError("Adapter x.safetensors not found.")

    monkeypatch.setattr(llama_adapter.cli, "load", refuse)
    assert app.main(["--adapter", "x.safetensors"]) == 2
    assert "Adapter x.safetensors not found." in caplog.text


def test_python_app_py_serves_the_default_model_offline(tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_PORT": str(port)}
    log = (tmp_path / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        while proc.poll() is None:  # until it answers, or exits (its log then says why)
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert proc.poll() is None, (tmp_path / "app.log").read_text()
        answer = Client(url, verbose=False).predict("Say hi.", [], max_new_tokens=4, api_name="/chat")
        assert isinstance(answer, str) and answer
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


class SeesImages:
    """A pipeline that takes images, as far as the experts ask."""

    accepts_images = True
    info = {"adapter": "/models/demo-adapter.safetensors", "base_fingerprint": "abc"}


def test_a_model_that_sees_is_offered_its_own_caption_beside_the_preferred_experts(smol):
    assert "caption-adapter" not in registry_for(smol).names()  # a text-only model writes no caption
    registry = registry_for(SeesImages())  # type: ignore[arg-type]
    offered = {value: label for label, value in app.expert_choices(registry)}
    assert offered["caption-adapter"] == "LLaMA-Adapter caption (demo-adapter.safetensors)"
    assert {"ocr", "caption"} <= set(offered) and registry.get("caption").name != "caption-adapter"
    assert "caption-adapter" not in default_registry().names()  # the process-wide registry is left as it was


def measured(tmp_path: Path, own: float, bare: float, made_up: int = 0) -> Path:
    """A copy of the shipped adapter whose metadata records easy-VQA accuracies with and without
    the model's own caption, and real photos (the own caption making up a shape ``made_up`` times
    of 10, bare once)."""
    from llama_adapter.weights import copy_adapter

    scores = {
        "free": {"accuracy": bare, "balanced_yes_no": 0.5},
        "free_with_own_caption": {"accuracy": own, "balanced_yes_no": 0.95},
    }
    photos = {
        "items": 10,
        "with_tagger": {"named_top_tag": 9},
        "with_tagger_and_own_caption": {"named_top_tag": 9},
        "without_tagger": {"made_up_shape": 1},
        "with_own_caption": {"made_up_shape": made_up},
    }
    return copy_adapter(
        DEFAULT_ADAPTER,
        tmp_path / f"measured-{own}-{made_up}.safetensors",
        extra={"metrics": {"easy_vqa": scores, "photos": photos}},
    )


def test_the_own_caption_is_ticked_when_the_adapter_measured_it_better(tmp_path):
    def ticked(adapter: Path | str) -> tuple[list[str], str]:
        pipe = SeesImages()
        pipe.info = {"adapter": str(adapter), "base_fingerprint": "abc"}
        return measured_defaults(pipe, registry_for(pipe))  # type: ignore[arg-type]

    chosen, why = ticked(measured(tmp_path, own=0.91, bare=0.77))
    assert chosen == ["caption-adapter"]
    assert "91%" in why and "77%" in why and "95%" in why and "50%" in why  # says what it chose, and why
    assert "shape 0 times (bare 1)" in why
    assert ticked(measured(tmp_path, own=0.70, bare=0.77)) == ([], "")  # measured worse: not ticked
    assert ticked(measured(tmp_path, own=0.91, bare=0.77, made_up=2)) == ([], "")  # makes up more on photos
    assert ticked(tmp_path / "official.pth") == ([], "")  # no metadata to go by
