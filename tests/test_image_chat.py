"""Conversations with images in any turn: ChatSession (an image per turn, its KV cache, retry, undo,
system prompt, history) and MultimodalChat (experts per turn, their report), and describe (one shot),
on the shipped demo model (SmolLM2 with a visual adapter). Cached turns are checked against the
same conversation computed from scratch; shapes against the example index's answers."""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import llama_adapter
from experts import Availability, Description, Expert, ExpertCache, MultimodalChat, Registry, build_prompt, describe
from llama_adapter import InputError, Pipeline
from llama_adapter.images import open_image

SHORT = {"max_new_tokens": 8}
EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
CIRCLE, TRIANGLE = EXAMPLES / "circle.png", EXAMPLES / "triangle.png"


@functools.cache
def visual_pipeline(dtype: str | None = None) -> Pipeline:
    """The shipped demo model, loaded once per test process and ``dtype``: by default as users get
    it (int8 weights on CPU); ``"fp32"`` for tests whose oracle is exact."""
    return llama_adapter.load(dtype=dtype)


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


@pytest.fixture(scope="module")
def exact_pipe() -> Pipeline:
    """fp32: on CPU int8 prefills through a bfloat16 copy and decodes on int8, so a cached turn
    and the same conversation prefilled from scratch may differ in the last bits there."""
    return visual_pipeline("fp32")


@pytest.fixture
def sign() -> Says:
    return Says("sign", "OPEN 24 HOURS")


@pytest.fixture
def kw(sign: Says) -> dict:
    """Experts for MultimodalChat and describe, with a cache of their own so that each test counts its calls."""
    return {"registry": Registry([sign, Fails("broken", "", kind="caption")]), "cache": ExpertCache()}


@pytest.fixture
def picture() -> Image.Image:
    img = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(img).rectangle((20, 10, 70, 50), fill="red")
    return img


def from_scratch(pipe: Pipeline, chat: MultimodalChat, **sampling) -> str:
    """The last answer as the model gives it for what the chat read, computed without any cache."""
    read = chat.session.read()
    image = chat.image if chat.image_to_model else None
    return pipe.generate(read[:-1], image=image, **sampling)


# -- ChatSession: images per turn ------------------------------------------------------------------------


def test_a_text_follow_up_prefills_only_its_own_tokens(pipe):
    chat = pipe.chat()
    chat.ask("What shape is in the image?", image=CIRCLE, **SHORT)
    image_turn = chat.last_prefill_tokens
    cached = list(chat.cached_ids)
    chat.ask("What colour is it?", **SHORT)
    full = pipe.encode(pipe.render(chat.messages[:-1]))
    assert image_turn == len(pipe.encode(pipe.render(chat.messages[:1])))  # the image's turn: all of it
    common = next((i for i, (a, b) in enumerate(zip(cached, full)) if a != b), min(len(cached), len(full)))
    new_turn = pipe.encode("<|im_start|>user\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n")
    assert chat.last_prefill_tokens == len(full) - common <= len(new_turn) + 3  # plus the end of the last answer
    assert chat.messages[-1]["content"] == pipe.generate(chat.messages[:-1], image=CIRCLE, **SHORT)


def test_text_then_two_images_each_answer_is_about_the_image_in_view(pipe):
    """text → circle → text → triangle → text: each answer names the shape in view, and equals the
    same conversation read from scratch with that turn's image."""
    chat = pipe.chat()
    steps = [
        ("Name three colours.", None, None),
        ("What shape is in the image?", CIRCLE, "circle"),
        ("What shape is it?", None, "circle"),
        ("What shape is in the image?", TRIANGLE, "triangle"),
        ("What shape is it?", None, "triangle"),
    ]
    for question, image, shape in steps:
        answer = chat.ask(question, image=image, max_new_tokens=12)
        read = chat.read()
        assert answer == pipe.generate(read[:-1], image=chat.image, max_new_tokens=12), question
        if shape:
            other = "triangle" if shape == "circle" else "circle"
            assert shape in answer.lower() and other not in answer.lower(), (question, answer)
        if image is not None:
            assert chat.last_prefill_tokens == len(pipe.encode(pipe.render(read[:-1])))  # a new visual prompt
        elif shape:
            assert chat.last_prefill_tokens < 20
    # The triangle's turns read the plain chat of turn 1, not the turns about the circle.
    read = [m["content"] for m in chat.read()]
    assert read[:2] == ["Name three colours.", chat.messages[1]["content"]] and len(read) == 6
    assert len(chat.messages) == 10 and chat.image is chat.messages[-2]["image"]
    assert chat.image.tobytes() == open_image(TRIANGLE).tobytes()


def test_undo_brings_the_earlier_image_back_into_view(pipe):
    chat = pipe.chat()
    chat.ask("What shape is in the image?", image=CIRCLE, **SHORT)
    circle = chat.image
    chat.ask("What shape is in the image?", image=TRIANGLE, **SHORT)
    dropped = chat.undo()
    assert dropped["image"] is not circle and chat.image is circle
    answer = chat.ask("What shape is it?", max_new_tokens=12)
    assert "circle" in answer.lower() and answer == pipe.generate(chat.read()[:-1], image=CIRCLE, max_new_tokens=12)


def test_retry_answers_again_from_the_cache_and_a_refused_retry_keeps_the_answer(pipe):
    chat = pipe.chat()
    chat.ask("What shape is in the image?", image=CIRCLE, **SHORT)
    first = [dict(m) for m in chat.messages]
    again = "".join(chat.retry(**SHORT))
    assert again == first[1]["content"] and chat.messages == first  # greedy: the same answer, in its place
    assert chat.last_prefill_tokens == 1  # the question came from the cache, same image object
    sampled = "".join(chat.retry(max_new_tokens=8, temperature=1.0, seed=3))
    assert chat.messages[-1]["content"] == sampled and len(chat.messages) == 2
    kept = list(chat.messages)
    with pytest.raises(InputError, match="temperature"):
        "".join(chat.retry(temperature=-1))
    assert all(a is b for a, b in zip(chat.messages, kept)) and len(chat.messages) == len(kept)


def test_a_system_prompt_change_applies_from_the_next_turn(pipe):
    chat = pipe.chat(system="Answer in one word.")
    chat.ask("What shape is in the image?", image=CIRCLE, **SHORT)
    chat.set_system("You are a poet.")
    answer = chat.ask("Describe it.", **SHORT)
    assert chat.messages[0] == {"role": "system", "content": "You are a poet."}
    assert answer == pipe.generate(chat.read()[:-1], image=CIRCLE, **SHORT)
    chat.set_system("  ")
    assert chat.messages[0]["role"] == "user"


def test_history_with_an_image_is_continued_as_if_asked_here(pipe):
    history = [
        {"role": "user", "content": "What shape is in the image?", "image": str(TRIANGLE)},
        {"role": "assistant", "content": "It is a triangle."},
    ]
    chat = pipe.chat(history=history)
    assert chat.image.tobytes() == open_image(TRIANGLE).tobytes()
    answer = chat.ask("What shape is it?", **SHORT)
    asked = [*history, {"role": "user", "content": "What shape is it?"}]
    assert answer == pipe.generate(asked, image=TRIANGLE, **SHORT)
    with pytest.raises(InputError, match="not an image"):
        pipe.chat(history=[{"role": "user", "content": "Hi", "image": b"not an image"}])


def test_a_text_only_model_refuses_an_image(smol):
    with pytest.raises(InputError, match="no image encoder"):
        smol.chat().ask("What is it?", image=CIRCLE)


# -- MultimodalChat: experts per turn ----------------------------------------------------------------------


def test_experts_read_each_new_image_once_and_report_it(exact_pipe, kw, sign, picture):
    pipe = exact_pipe
    chat = MultimodalChat(pipe, **kw)
    first = chat.ask("What does the sign say?", [picture], ["sign"], **SHORT)
    turn = chat.last_turn
    assert sign.calls == 1 and turn.experts.texts == {"sign": "OPEN 24 HOURS"} and turn.new_image
    assert turn.prompt == pipe.render(chat.messages[:-1]) and "[Image context]" in turn.prompt
    assert turn.prompt_tokens == len(pipe.encode(turn.prompt)) == turn.prefill_tokens and turn.seconds > 0
    assert first == pipe.generate(chat.messages[:-1], image=picture, **SHORT)

    second = chat.ask("Is it open at night?", experts=["sign"], **SHORT)
    turn = chat.last_turn
    assert sign.calls == 1 and len(turn.experts) == 0 and [r.name for r in turn.earlier] == ["sign"]
    assert turn.prompt.count("[Image context]") == 1 and 0 < turn.prefill_tokens < turn.prompt_tokens // 2
    assert second == from_scratch(pipe, chat, **SHORT)

    chat.ask("And this one?", [Image.new("RGB", (64, 64), "blue")], ["sign"], **SHORT)
    assert sign.calls == 2 and chat.last_turn.experts.texts == {"sign": "OPEN 24 HOURS"}
    assert chat.last_turn.prompt.count("[Image context]") == 1  # the first image's turns are not read


def test_an_expert_chosen_later_reads_the_image_in_view_then(pipe, kw, sign, picture):
    chat = MultimodalChat(pipe, **kw)
    chat.ask("What is this?", [picture], **SHORT)
    assert len(chat.last_turn.experts) == 0 and sign.calls == 0
    chat.ask("What does it say?", experts=["sign"], **SHORT)
    assert sign.calls == 1 and chat.last_turn.experts.texts == {"sign": "OPEN 24 HOURS"}
    assert chat.last_turn.image is chat.turns[0].image and not chat.last_turn.new_image


def test_experts_with_no_image_are_reported_as_skipped(pipe, kw, sign):
    chat = MultimodalChat(pipe, **kw)
    chat.ask("Name three colours.", experts=["sign"], **SHORT)
    [skipped] = chat.last_turn.experts
    assert skipped.status == "unavailable" and "no image" in skipped.reason and sign.calls == 0


def test_a_failing_expert_is_reported_and_the_answer_goes_on(pipe, kw, picture):
    chat = MultimodalChat(pipe, **kw)
    answer = chat.ask("Describe the image.", [picture], ["sign", "caption"], **SHORT)
    assert isinstance(answer, str)
    [skipped] = chat.last_turn.experts.skipped
    assert skipped.name == "broken" and skipped.status == "failed" and "exploded" in skipped.reason
    assert "OPEN 24 HOURS" in chat.last_turn.prompt and "broken" not in chat.last_turn.prompt


def test_several_images_in_one_message_the_last_is_used_and_the_others_are_kept(pipe, kw):
    chat = MultimodalChat(pipe, **kw)
    answer = chat.ask("What shape is in the image?", [str(CIRCLE), str(TRIANGLE)], max_new_tokens=12)
    turn = chat.last_turn
    assert turn.attached == [str(CIRCLE), str(TRIANGLE)] and turn.unused == [str(CIRCLE)]
    assert chat.image.tobytes() == open_image(TRIANGLE).tobytes() and "triangle" in answer.lower()


def test_bad_input_is_refused_before_any_expert_runs_and_changes_nothing(pipe, kw, sign, picture, tmp_path):
    chat = MultimodalChat(pipe, **kw)
    with pytest.raises(InputError, match="empty"):
        chat.ask("   ", [picture], ["sign"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    chat.ask("What colour is the square?", [picture], **SHORT)
    before = [dict(m) for m in chat.messages]
    with pytest.raises(InputError):
        chat.ask("And this?", [bad], ["sign"])
    assert sign.calls == 0 and chat.messages == before and chat.image is chat.turns[0].image


def test_retry_edit_and_undo_keep_the_record_straight(pipe, kw, sign, picture):
    chat = MultimodalChat(pipe, system="Answer in one word.", **kw)
    chat.ask("What colour is the square?", [picture], ["sign"], **SHORT)
    chat.ask("What shape is it?", **SHORT)
    chat.ask("Is it big?", **SHORT)
    "".join(chat.retry(**SHORT))
    assert [t.question for t in chat.turns] == ["What colour is the square?", "What shape is it?", "Is it big?"]
    assert chat.session.last_prefill_tokens <= 3  # the retried question came from the cache
    "".join(chat.edit("What colour is it?", turn=1, **SHORT))
    assert [t.question for t in chat.turns] == ["What colour is the square?", "What colour is it?"]
    assert chat.messages[-1]["content"] == from_scratch(pipe, chat, **SHORT)
    "".join(chat.edit("What is written on it?", ["sign"], turn=0, **SHORT))
    [turn] = chat.turns
    assert turn.new_image and turn.image is chat.image and sign.calls == 1  # the expert's text came from the cache
    assert turn.experts["sign"].cached and chat.messages[-1]["content"] == from_scratch(pipe, chat, **SHORT)
    undone = chat.undo()
    assert undone is turn and chat.messages == [{"role": "system", "content": "Answer in one word."}]
    assert chat.image is None
    with pytest.raises(InputError, match="no question"):
        "".join(chat.retry())


def test_a_stopped_answer_stays_in_the_history(pipe, kw, picture):
    chat = MultimodalChat(pipe, **kw)
    cancel = threading.Event()
    pieces = chat.stream("Count from one to fifty.", [picture], cancel=cancel, max_new_tokens=64)
    first = next(pieces)
    cancel.set()
    rest = "".join(pieces)
    assert chat.messages[-1] == {"role": "assistant", "content": first + rest}
    assert len(pipe.encode(rest)) <= 3 and chat.last_turn.prompt

    closed = chat.stream("Count from fifty to one.", max_new_tokens=64)
    piece = next(closed)
    closed.close()  # what the app's Stop button does to a running answer
    assert chat.messages[-1] == {"role": "assistant", "content": piece}
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_undo_cuts_the_cache_back_and_reset_starts_over(pipe, kw, picture):
    chat = MultimodalChat(pipe, system="Answer in one word.", **kw)
    chat.ask("What colour is the square?", [picture], **SHORT)
    chat.ask("What shape is it?", **SHORT)
    chat.undo()
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    # The cache still holds the undone turn: it is cut back, and the next answer is generate's.
    after_undo = chat.ask("Is it a circle?", **SHORT)
    assert after_undo == from_scratch(pipe, chat, **SHORT)
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Answer in one word."}]
    assert chat.image is None  # the conversation's pictures go with it
    again = chat.ask("What colour is the square?", [picture], **SHORT)
    assert again == pipe.generate(chat.session.read()[:-1], image=picture, **SHORT)


def test_a_text_only_model_sees_the_image_only_through_the_experts(smol, kw, picture):
    chat = MultimodalChat(smol, **kw)
    with pytest.raises(InputError, match="Turn on OCR or Caption"):
        chat.ask("What does the sign say?", [picture])
    answer = chat.ask("What does the sign say?", [picture], ["sign"], **SHORT)
    assert not chat.image_to_model and chat.session.visual_prompt is None and chat.image is not None
    assert answer == smol.generate(chat.messages[:-1], **SHORT) and "OPEN 24 HOURS" in chat.last_turn.prompt


def test_history_turns_get_their_record(pipe, kw):
    history = [
        {"role": "user", "content": "What shape is in the image?", "image": str(CIRCLE)},
        {"role": "assistant", "content": "It is a circle."},
        {"role": "user", "content": "What colour is it?"},
        {"role": "assistant", "content": "It is red."},
    ]
    chat = MultimodalChat(pipe, history=history, **kw)
    first, second = chat.turns
    assert first.new_image and not second.new_image and first.image is second.image is chat.image
    answer = chat.ask("What shape is it?", **SHORT)
    assert answer == from_scratch(pipe, chat, **SHORT)


def test_explain_traces_each_answer_with_what_the_model_read_for_it(pipe, kw, sign):
    """The last answer and an earlier one, traced as ``llama_adapter.explain`` traces the same prompt,
    image and answer given one by one; no answer yet is refused."""
    chat = MultimodalChat(pipe, **kw)
    with pytest.raises(InputError, match="no answer to look inside"):
        chat.explain()
    chat.ask("What does it say?", [CIRCLE], ["sign"], **SHORT)
    chat.ask("What shape is in the image?", [TRIANGLE], **SHORT)
    for turn, image in ((-1, TRIANGLE), (0, CIRCLE)):
        trace = chat.explain(turn)
        question = chat.turns[turn].question
        asked = [m for m in chat.messages if m["role"] == "user"][turn]
        answer = chat.messages[chat.messages.index(asked) + 1]["content"]
        alone = [{"role": "user", "content": question, "context": asked.get("context")}]
        oracle = llama_adapter.explain(pipe, alone, image, answer=answer)
        assert trace.prompt == oracle.prompt == chat.turns[turn].prompt and trace.answer == answer
        assert torch.equal(trace.grid, oracle.grid) and torch.allclose(trace.adapter_share, oracle.adapter_share)
        assert trace.context == oracle.context == asked.get("context")
    assert "OPEN 24 HOURS" in chat.explain(0).context and chat.explain().context is None


# -- describe ----------------------------------------------------------------------------------------------


def test_describe_answers_once_and_says_what_the_model_read(pipe, kw, sign, picture):
    result = describe(pipe, picture, "What does the sign say?", ["sign"], **kw, **SHORT)
    assert isinstance(result, Description) and result.image_to_model and result.seconds > 0
    built = build_prompt("What does the sign say?", picture, ["sign"], pipeline=pipe, **kw)
    assert result.prompt == built.text
    assert result.answer == pipe.generate(built.messages, image=picture, **SHORT)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["answer"] == result.answer and data["experts"][0]["text"] == "OPEN 24 HOURS"
    assert sign.calls == 1  # build_prompt above was served from the cache


def test_describe_reads_and_converts_the_image_once(pipe, kw, tmp_path, monkeypatch):
    """The image is checked where it comes in (describe); the experts, the prompt and the model are
    handed the checked picture and neither read the file nor convert it again."""
    path = tmp_path / "photo.png"
    Image.new("RGBA", (96, 64), (255, 0, 0, 128)).save(path)
    import llama_adapter.images as images

    calls = {"read": 0, "convert": 0}

    def count(name, real):
        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return counted

    monkeypatch.setattr(images, "_read_bytes", count("read", images._read_bytes))
    monkeypatch.setattr(images, "_to_rgb", count("convert", images._to_rgb))
    describe(pipe, str(path), "What does the sign say?", ["sign"], **kw, **SHORT)
    assert calls == {"read": 1, "convert": 1}
    checked = open_image(str(path))
    assert open_image(checked) is checked  # a checked picture passes as it is
    assert open_image(Image.new("RGB", (8, 8))) is not None and calls["convert"] == 3  # a new one is converted


def test_a_turn_checks_its_messages_once_however_long_the_chat(pipe, monkeypatch):
    """A chat's history was checked as each message came in: a turn checks only its new message
    (once), not the whole conversation again while fitting it to the context."""
    import llama_adapter.prompts as prompts

    checked: list[int] = []
    real = prompts.validate_history
    monkeypatch.setattr(prompts, "validate_history", lambda messages: checked.append(len(messages)) or real(messages))
    session = pipe.chat()
    for question in ("Hello.", "What is a circle?", "And a square?"):
        checked.clear()
        session.ask(question, **SHORT)
        assert len(checked) == 1, checked


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


# -- Pipeline: visual prompts kept by image ------------------------------------------------------------


class VisualRecord:
    def __init__(self) -> None:
        self.blocks = 0

    def adapter_attention(self, layer_id: int, tokens: torch.Tensor, prompt: torch.Tensor) -> None:
        pass

    def visual_attention(self, queries: torch.Tensor, keys: torch.Tensor) -> None:
        self.blocks += 1


def test_an_image_asked_about_again_is_not_encoded_again(monkeypatch, picture):
    """Kept by pixels (another object, or the same picture as PNG bytes, hits), each image its own
    prompt (the encoder's output computed here), the oldest dropped past the limit, and a record
    always sees the visual blocks run."""
    import io

    from llama_adapter import pipeline as pipeline_module
    from llama_adapter.images import image_to_tensor

    pipe = llama_adapter.load(dtype="fp32")
    encode = pipe.model.encode_image
    calls = []
    monkeypatch.setattr(pipe.model, "encode_image", lambda *a, **k: calls.append(1) or encode(*a, **k))
    first = pipe.visual_prompt(picture)
    png = io.BytesIO()
    picture.save(png, format="PNG")
    assert torch.equal(pipe.visual_prompt(picture.copy()), first)
    assert torch.equal(pipe.visual_prompt(png.getvalue()), first)
    assert len(calls) == 1
    acfg = pipe.model.adapter_config
    with torch.inference_mode():
        direct = encode(image_to_tensor(picture, acfg.image_encoder, acfg.channel_order).unsqueeze(0))
    torch.testing.assert_close(first, direct, rtol=0, atol=1e-6)

    others = []
    for colour in ("blue", "green", "black"):
        other = picture.copy()
        ImageDraw.Draw(other).ellipse((30, 20, 60, 45), fill=colour)
        others.append(other)
    monkeypatch.setattr(pipeline_module, "VISUAL_PROMPTS_KEPT", 2)
    prompts = [pipe.visual_prompt(o) for o in others]
    assert len(calls) == 4 and not any(torch.equal(p, first) for p in prompts)
    assert torch.equal(pipe.visual_prompt(others[2]), prompts[2]) and len(calls) == 4
    pipe.visual_prompt(picture)  # dropped: the two newest are kept
    assert len(calls) == 5

    record = VisualRecord()
    pipe.visual_prompt(picture, record=record)
    assert len(calls) == 6 and record.blocks == len(pipe.model.visual_blocks)
