"""ImageChat (multi-turn about one image, experts per turn, KV cache reused) and describe (one shot),
on the shipped demo model (SmolLM2 with a visual adapter)."""

from __future__ import annotations

import functools
import json
import threading

import pytest
from PIL import Image, ImageDraw

import llama_adapter
from experts import Availability, Description, Expert, ExpertCache, ImageChat, Registry, build_prompt, describe
from llama_adapter import InputError, Pipeline

SHORT = {"max_new_tokens": 8}


@functools.cache
def visual_pipeline() -> Pipeline:
    """The shipped demo model, loaded once per test process (the app and demo-model tests share it)."""
    return llama_adapter.load()


class Says(Expert):
    """Says ``text`` about any image; counts its calls."""

    def __init__(self, name: str, text: str, kind: str = "ocr") -> None:
        self.name, self.text, self.kind = name, text, kind
        self.label, self.context_label = f"Says ({name})", f"Text ({name})"
        self.calls = 0

    def availability(self) -> Availability:
        return Availability(True)

    def describe(self, image: Image.Image) -> str:
        self.calls += 1
        return self.text


class Fails(Says):
    def describe(self, image: Image.Image) -> str:
        self.calls += 1
        raise RuntimeError("the model exploded")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return visual_pipeline()


@pytest.fixture
def sign() -> Says:
    return Says("sign", "OPEN 24 HOURS")


@pytest.fixture
def kw(sign: Says) -> dict:
    """Experts for ImageChat and describe, with a cache of their own so that each test counts its calls."""
    return {"registry": Registry([sign, Fails("broken", "", kind="caption")]), "cache": ExpertCache()}


@pytest.fixture
def picture() -> Image.Image:
    img = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(img).rectangle((20, 10, 70, 50), fill="red")
    return img


def test_turns_reuse_the_kv_cache_and_record_what_the_model_read(pipe, kw, sign, picture):
    chat = ImageChat(pipe, picture, **kw)
    assert chat.image_to_model and chat.session.visual_prompt is not None

    first = chat.ask("What does the sign say?", experts=["sign"], **SHORT)
    assert sign.calls == 1
    assert chat.last_report.texts == {"sign": "OPEN 24 HOURS"}
    assert chat.last_prompt == pipe.render(chat.messages[:-1])
    assert "[Image context]" in chat.last_prompt and "OPEN 24 HOURS" in chat.last_prompt
    # Exactly what generate gives for the recorded conversation and the image.
    assert first == pipe.generate(chat.messages[:-1], image=picture, **SHORT)

    second = chat.ask("Is it open at night?", experts=["sign"], **SHORT)
    assert sign.calls == 1  # same image: the expert's text comes from the cache
    full = len(pipe.encode(chat.last_prompt))
    assert 0 < chat.session.last_prefill_tokens < full // 2  # only the new turn was prefilled
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert second == pipe.generate(chat.messages[:-1], image=picture, **SHORT)


def test_each_turn_uses_the_experts_chosen_for_it(pipe, kw, picture):
    chat = ImageChat(pipe, picture, **kw)
    chat.ask("What does the sign say?", experts=["sign"], **SHORT)
    chat.ask("And now without help?", **SHORT)
    assert len(chat.last_report) == 0
    assert chat.last_prompt.count("[Image context]") == 1  # the first turn keeps its context
    assert "context" not in chat.messages[-2]


def test_a_failing_expert_is_reported_and_the_answer_goes_on(pipe, kw, picture):
    chat = ImageChat(pipe, picture, **kw)
    answer = chat.ask("Describe the image.", experts=["sign", "caption"], **SHORT)
    assert isinstance(answer, str)
    [skipped] = chat.last_report.skipped
    assert skipped.name == "broken" and skipped.status == "failed" and "exploded" in skipped.reason
    assert "OPEN 24 HOURS" in chat.last_prompt and "broken" not in chat.last_prompt


def test_empty_question_and_missing_image_are_refused_before_any_expert_runs(pipe, kw, sign, picture):
    chat = ImageChat(pipe, **kw)
    with pytest.raises(InputError, match="no image"):
        chat.ask("What is it?", experts=["sign"])
    chat.set_image(picture)
    with pytest.raises(InputError, match="empty"):
        chat.ask("   ", experts=["sign"])
    assert sign.calls == 0 and chat.messages == []


def test_a_new_image_starts_over_and_a_bad_one_changes_nothing(pipe, kw, picture, tmp_path):
    chat = ImageChat(pipe, picture, **kw)
    chat.ask("What colour is the square?", **SHORT)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError):
        chat.set_image(bad)
    assert len(chat.messages) == 2 and chat.image.size == picture.size
    chat.set_image(Image.new("RGB", (32, 32), "blue"))
    assert chat.messages == [] and chat.last_prompt is None and chat.session.cached_ids == []


def test_a_stopped_answer_stays_in_the_history(pipe, kw, picture):
    chat = ImageChat(pipe, picture, **kw)
    cancel = threading.Event()
    pieces = chat.stream("Count from one to fifty.", cancel=cancel, max_new_tokens=64)
    first = next(pieces)
    cancel.set()
    rest = "".join(pieces)
    assert chat.messages[-1] == {"role": "assistant", "content": first + rest}
    assert len(pipe.encode(rest)) <= 3 and chat.last_prompt is not None

    closed = chat.stream("Count from fifty to one.", max_new_tokens=64)
    piece = next(closed)
    closed.close()  # what the app's Stop button does to a running answer
    assert chat.messages[-1] == {"role": "assistant", "content": piece}
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_undo_cuts_the_cache_back_and_reset_starts_over(pipe, kw, picture):
    chat = ImageChat(pipe, picture, system="Answer in one word.", **kw)
    chat.ask("What colour is the square?", **SHORT)
    chat.ask("What shape is it?", **SHORT)
    chat.undo()
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"] and chat.last_prompt is None
    # The cache still holds the undone turn: it is cut back, and the next answer is generate's.
    after_undo = chat.ask("Is it a circle?", **SHORT)
    assert after_undo == pipe.generate(chat.messages[:-1], image=picture, **SHORT)
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Answer in one word."}]
    assert chat.image is not None  # the image stays
    again = chat.ask("What colour is the square?", **SHORT)
    assert again == pipe.generate(chat.messages[:-1], image=picture, **SHORT)


def test_a_text_only_model_sees_the_image_only_through_the_experts(smol, kw, picture):
    chat = ImageChat(smol, picture, **kw)
    assert not chat.image_to_model and chat.session.visual_prompt is None
    answer = chat.ask("What does the sign say?", experts=["sign"], **SHORT)
    assert answer == smol.generate(chat.messages[:-1], **SHORT)
    assert "OPEN 24 HOURS" in chat.last_prompt


def test_describe_answers_once_and_says_what_the_model_read(pipe, kw, sign, picture):
    result = describe(pipe, picture, "What does the sign say?", ["sign"], **kw, **SHORT)
    assert isinstance(result, Description) and result.image_to_model and result.seconds > 0
    built = build_prompt("What does the sign say?", picture, ["sign"], pipeline=pipe, **kw)
    assert result.prompt == built.text
    assert result.answer == pipe.generate(built.messages, image=picture, **SHORT)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["answer"] == result.answer and data["experts"][0]["text"] == "OPEN 24 HOURS"
    assert sign.calls == 1  # build_prompt above was served from the cache


def test_describe_refuses_bad_input_in_plain_words(pipe, kw, sign, picture, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        describe(pipe, bad, "What is it?", ["sign"], **kw)
    with pytest.raises(InputError, match="empty"):
        describe(pipe, picture, "", ["sign"], **kw)
    assert sign.calls == 0
    with pytest.raises(KeyError, match="Unknown expert"):
        describe(pipe, picture, "What is it?", ["telepathy"], **kw)
