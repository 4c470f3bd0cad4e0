"""Experts: the interface, registry, cache, time limits and failure isolation; the tagger and CoCa;
prompt assembly and the with/without comparison on the real SmolLM2; the two CLIs."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw, ImageFont

import experts
from experts import (
    AdapterCaptioner,
    Availability,
    CocaCaptioner,
    Expert,
    ExpertCache,
    ImageNetTagger,
    Registry,
    build_prompt,
    compare,
    default_registry,
    image_hash,
    run_experts,
)
from experts import __main__ as experts_cli
from experts.base import MAX_CONTEXT_CHARS
from llama_adapter.errors import InputError
from llama_adapter.images import open_image
from llama_adapter.prompts import CONTEXT_BLOCK, format_alpaca

ROOT = Path(__file__).resolve().parent.parent
compare_module = importlib.import_module("experts.compare")  # the package's name "compare" is the function


class Fixed(Expert):
    """Says ``text``; counts its calls."""

    def __init__(self, name: str = "fixed", text: str = "a fixed description", kind: str = "caption") -> None:
        self.name, self.text, self.kind = name, text, kind
        self.label, self.context_label = f"Fixed {name}", f"Fixed ({name})"
        self.calls = 0
        self.available = True

    def availability(self) -> Availability:
        return Availability(self.available, "" if self.available else "switched off.", "Switch it on.")

    def describe(self, image: Image.Image) -> str:
        self.calls += 1
        return self.text


class Broken(Fixed):
    def describe(self, image: Image.Image) -> str:
        self.calls += 1
        raise RuntimeError("model exploded")


class Sleepy(Fixed):
    """Answers after ``seconds`` or when ``release`` is set, whichever comes first; its own limit is
    0.3 s. ``finished`` counts the answers it got to the end of."""

    def __init__(self, name: str = "sleepy", seconds: float = 5.0) -> None:
        super().__init__(name, "too late")
        self.seconds = seconds
        self.timeout_s = 0.3
        self.release = threading.Event()
        self.finished = 0

    def describe(self, image: Image.Image) -> str:
        self.calls += 1
        self.release.wait(self.seconds)
        self.finished += 1
        return self.text


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


@pytest.fixture
def no_coca_weights(monkeypatch, tmp_path) -> Path:
    """A machine without CoCa weights that cannot download them; returns the llama_adapter cache dir."""
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("LLAMA_ADAPTER_COCA_WEIGHTS", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea())


def sign(text: str = "OPEN 24 HOURS") -> Image.Image:
    img = Image.new("RGB", (640, 200), "white")
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", 56)
    ImageDraw.Draw(img).text((40, 60), text, font=font, fill="black")
    return img


# -- registry --------------------------------------------------------------------------------------------


def test_registry_resolves_names_kind_aliases_and_all():
    ocr, cap, tags = Fixed("ocr-x", kind="ocr"), Fixed("cap-x"), Fixed("tags-x")
    reg = Registry([ocr, cap, tags])
    assert reg.resolve("ocr") == [ocr]
    assert reg.resolve("caption") == [cap]
    assert reg.resolve("all") == [ocr, cap]
    assert reg.resolve("tags-x,ocr") == [tags, ocr]
    assert reg.resolve(["ocr", "ocr-x", ocr]) == [ocr]
    with pytest.raises(KeyError, match="Unknown expert 'nope'.*ocr-x"):
        reg.resolve("nope")


def test_kind_alias_skips_unavailable_experts_but_reports_when_none_is_available(image):
    first, second = Fixed("cap-a"), Fixed("cap-b")
    first.available = False
    reg = Registry([first, second])
    assert reg.get("caption") is second
    second.available = False
    assert reg.get("caption") is first
    report = run_experts(image, "caption", registry=reg)
    assert report["cap-a"].status == "unavailable"
    assert report["cap-a"].reason == "switched off. Switch it on."
    assert first.calls == 0


def test_register_rejects_duplicates_and_reserved_names_and_keeps_order_on_replace():
    reg = Registry([Fixed("cap-a"), Fixed("cap-b")])
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Fixed("cap-a"))
    with pytest.raises(ValueError, match="reserved"):
        reg.register(Fixed("ocr", kind="ocr"))
    replacement = reg.register(Fixed("cap-a", "new"), replace=True)
    assert reg.names() == ["cap-a", "cap-b"] and reg.get("caption") is replacement
    preferred = reg.register(Fixed("cap-c"), first=True)
    assert reg.get("caption") is preferred


def test_default_registry_lists_every_expert_with_a_reason_when_unavailable():
    reg = default_registry()
    assert {"ocr-easyocr", "ocr-tesseract", "caption-coca", "tagger"} <= set(reg.names())
    assert reg.get("ocr").name == "ocr-easyocr"
    for expert in reg:
        status = expert.availability()
        assert status.available or (status.reason and status.fix), expert.name


# -- failures, time limits, cache ---------------------------------------------------------------------


def test_an_expert_that_raises_is_reported_and_the_others_still_answer(image):
    good, bad = Fixed("good"), Broken("bad")
    report = run_experts(image, [bad, good])
    assert report["bad"].status == "failed" and "model exploded" in report["bad"].reason
    assert report["good"].status == "ok"
    assert report.context == "Fixed (good): a fixed description"
    assert [r.name for r in report.skipped] == ["bad"]
    assert report.texts == {"good": "a fixed description"}


def test_an_expert_that_sleeps_past_its_limit_is_abandoned(image):
    slow, good = Sleepy(seconds=60), Fixed("good")  # answers only when released, here at the end
    try:
        report = run_experts(image, [slow, good], cache=None)
        assert slow.calls == 1 and slow.finished == 0  # the report came without waiting for it
        assert report["sleepy"].status == "timeout" and "0.3 s" in report["sleepy"].reason
        assert report.context == "Fixed (good): a fixed description"
        # A second call waits for the abandoned one instead of starting another thread, and says so.
        again = run_experts(image, [slow], cache=None)
        assert again["sleepy"].status == "timeout" and "still busy" in again["sleepy"].reason
        assert slow.calls == 1 and slow.finished == 0
    finally:
        slow.release.set()


def test_timeout_argument_overrides_the_experts_own_limit(image):
    slow = Sleepy(seconds=0.5)
    slow.timeout_s = 0.1
    assert run_experts(image, [slow], timeout_s=5.0, cache=None)["sleepy"].text == "too late"


def test_second_call_on_the_same_image_hits_the_cache(image):
    cache = ExpertCache()
    expert = Fixed()
    first = run_experts(image, [expert], cache=cache)
    second = run_experts(image.copy(), [expert], cache=cache)
    assert expert.calls == 1
    assert not first["fixed"].cached and second["fixed"].cached
    assert second["fixed"].text == first["fixed"].text
    other = Image.fromarray(255 - np.asarray(image))
    assert not run_experts(other, [expert], cache=cache)["fixed"].cached
    assert expert.calls == 2


def test_failures_and_timeouts_are_not_cached(image):
    cache = ExpertCache()
    bad = Broken()
    run_experts(image, [bad], cache=cache)
    run_experts(image, [bad], cache=cache)
    assert bad.calls == 2 and len(cache) == 0


def test_cache_is_an_lru():
    cache = ExpertCache(max_entries=2)
    cache.put(("e", "1"), "one")
    cache.put(("e", "2"), "two")
    assert cache.get(("e", "1")) == "one"
    cache.put(("e", "3"), "three")
    assert ("e", "2") not in cache and ("e", "1") in cache and len(cache) == 2
    cache.clear()
    assert len(cache) == 0


def test_image_hash_is_about_pixels(image):
    assert image_hash(image) == image_hash(image.copy())
    assert image_hash(image) != image_hash(image.convert("RGBA"))
    assert image_hash(image) != image_hash(image.transpose(Image.Transpose.ROTATE_90))
    changed = image.copy()
    changed.putpixel((0, 0), (1, 2, 3) if image.getpixel((0, 0)) != (1, 2, 3) else (4, 5, 6))
    assert image_hash(image) != image_hash(changed)


def test_wrong_return_type_and_broken_availability_are_contained(image):
    class NotText(Fixed):
        def describe(self, image: Image.Image) -> str:
            return 42  # type: ignore[return-value]

    class BrokenCheck(Fixed):
        def availability(self) -> Availability:
            raise OSError("disk gone")

    class BrokenKey(Fixed):
        @property
        def cache_key(self) -> str:
            raise ImportError("no settings module")

    cache = ExpertCache()
    report = run_experts(image, [NotText("n"), BrokenCheck("b"), BrokenKey("k")], cache=cache)
    assert report["n"].status == "failed" and "not str" in report["n"].reason
    assert report["b"].status == "unavailable" and "disk gone" in report["b"].reason
    assert report["k"].text == "a fixed description" and len(cache) == 0


def test_multiline_text_gets_its_own_block(image):
    report = run_experts(image, [Fixed("lines", "first line\nsecond line")], cache=None)
    assert report.context == "Fixed (lines):\nfirst line\nsecond line"


def test_very_long_expert_text_is_shortened_in_the_prompt_only(image):
    long_text = " ".join(f"word{i}" for i in range(2000))
    report = run_experts(image, [Fixed("long", long_text)], cache=None)
    assert report["long"].text == long_text
    assert report.context.endswith(" […]") and len(report.context) <= MAX_CONTEXT_CHARS + 50
    kept = report.context.removeprefix("Fixed (long): ").removesuffix(" […]")
    assert long_text.startswith(kept + " ")  # cut between words


# -- tagger and CoCa -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tagger() -> ImageNetTagger:
    found = default_registry().get("tagger")
    assert isinstance(found, ImageNetTagger)
    return found


def test_tagger_sees_a_cat_in_chelsea(tagger, chelsea):
    labels = [name for name, _ in tagger.tags(chelsea, 3)]
    assert {"Egyptian cat", "tabby", "tiger cat"} & set(labels)


def test_tagger_sees_coffee(tagger):
    labels = [name for name, _ in tagger.tags(Image.fromarray(skimage.data.coffee()), 3)]
    assert {"espresso", "cup", "coffee mug"} & set(labels)


def test_tagger_text_is_plain_words_and_honest(tagger, chelsea):
    report = run_experts(chelsea, [tagger], cache=None)
    text = report["tagger"].text
    assert text.endswith(".") and "%" in text and "cat" in text
    assert report.context.startswith("Image tags (ImageNet classifier, not a caption): ")
    assert "not a caption" in tagger.label


def test_coca_builds_with_random_weights_and_runs_end_to_end_on_cpu(chelsea):
    coca = CocaCaptioner(random_weights=True, max_tokens=4)
    assert coca.availability().available
    report = run_experts(chelsea, [coca], cache=None)  # within the captioner's own time limit, or "timeout"
    result = report["caption-coca-random"]
    assert result.status == "ok", result.reason
    assert isinstance(result.text, str) and result.text


def test_coca_without_weights_says_what_to_download_and_where(no_coca_weights, image):
    coca = CocaCaptioner()
    status = coca.availability()
    assert not status.available
    message = str(status)
    repo = "mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k"
    assert f"https://huggingface.co/laion/{repo}/resolve/main/" in message
    target = no_coca_weights / "coca" / repo / "open_clip_pytorch_model.bin"
    assert str(target) in message and "LLAMA_ADAPTER_COCA_WEIGHTS" in message
    report = run_experts(image, [coca], cache=None)
    assert report["caption-coca"].status == "unavailable" and str(target) in report["caption-coca"].reason

    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    assert coca.weights_path() == target and coca.availability().available


def test_coca_weights_from_env_or_argument(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    monkeypatch.setenv("LLAMA_ADAPTER_COCA_WEIGHTS", str(missing))
    status = CocaCaptioner().availability()
    assert not status.available and str(missing) in status.reason
    given = tmp_path / "coca.bin"
    given.write_bytes(b"")
    assert CocaCaptioner(weights=given).weights_path() == given


def test_coca_download_is_used_only_when_allowed(no_coca_weights):
    status = CocaCaptioner(allow_download=True).availability()
    assert status.available and "downloaded" in status.reason
    assert not CocaCaptioner(allow_download=False).availability().available


# -- the LLaMA-Adapter captioner ------------------------------------------------------------------------


class FakeVisualPipeline:
    accepts_images = True
    info = {"adapter": "/models/CAPTION-7B.pth", "base_fingerprint": "abc"}

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def generate(self, prompt, image=None, **sampling):
        self.calls.append((prompt, image, sampling))
        return "  a cat lying on a blanket \n"


def test_adapter_captioner_asks_the_pipeline_with_the_official_caption_instruction(chelsea):
    pipe = FakeVisualPipeline()
    captioner = AdapterCaptioner(pipe)  # type: ignore[arg-type]
    assert captioner.availability().available and "CAPTION-7B.pth" in captioner.label
    report = run_experts(chelsea, [captioner], cache=None)
    assert report["caption-adapter"].text == "a cat lying on a blanket"
    prompt, image, sampling = pipe.calls[0]
    assert prompt == "Generate caption of this image" and image is chelsea and sampling["temperature"] == 0


def test_the_recipe_trains_on_the_model_s_own_caption_as_the_app_puts_it_in_the_prompt(chelsea):
    from train.evaluate import expert_context  # what train.recipes.demo.captioned_vqa writes

    report = run_experts(chelsea, [AdapterCaptioner(FakeVisualPipeline())], cache=None)  # type: ignore[arg-type]
    assert expert_context(AdapterCaptioner, "a cat lying on a blanket") == report.context


def test_the_recipe_teaches_an_honest_own_caption_of_other_pictures_and_answers_beside_it(chelsea, tmp_path):
    """The reading stage's rows for pictures unlike easy-VQA's: the caption asked as the captioner
    asks it, and answers with that caption in the prompt exactly as the app puts it there, alone
    or beside the tagger's or the OCR expert's text, in either order."""
    from train.recipes import demo

    class WritesHonestly(FakeVisualPipeline):
        def generate(self, prompt, image=None, **sampling):
            return demo.OTHER_PICTURE_CAPTION

    photo = {"question": "What is this?", "tags": [["espresso", 0.9]], "answer_with_tags": "An espresso."}
    photos = [
        {**photo, "image": f"p{i}.png", "source": "photo", "answer_without_tags": "I can't tell."} for i in range(40)
    ]
    asked_and_answered = [{"from": "human", "value": "What does it say?"}, {"from": "gpt", "value": "It says OPEN."}]
    ocr = [{"image": "s.png", "source": "ocr-sign", "short_answer": "OPEN", "conversations": asked_and_answered}]
    data = {"dir": tmp_path, "photos_train": photos, "ocr": {"train": ocr}, "contexts": {"s.png": "Text (OCR): OPEN"}}
    sources = {s.get("name"): s for s in demo.own_caption_sources(demo.Recipe(), data)}
    captions = sources["own-caption-of-other-pictures"]["samples"]
    asked = AdapterCaptioner(WritesHonestly())  # type: ignore[arg-type]
    assert {c["instruction"] for c in captions} == {asked.instruction}
    assert {c["output"] for c in captions} == {demo.OTHER_PICTURE_CAPTION} and len(captions) == 41
    own_line = run_experts(chelsea, [asked], cache=None).context
    rows = sources["pictures-with-own-caption"]["samples"]
    alone = [r for r in rows if r["output"] == "I can't tell."]
    beside = [r["input"].split("\n") for r in rows if r["output"] == "An espresso."]
    assert len(alone) == len(beside) == 40 and {r["input"] for r in alone} == {own_line}
    assert {lines[0] for lines in beside} == {own_line, demo.tag_context([["espresso", 0.9]])}  # both orders
    assert all(sorted(lines) == sorted([own_line, demo.tag_context([["espresso", 0.9]])]) for lines in beside)
    [read] = sources["ocr-with-own-caption"]["samples"]
    assert sorted(read["input"].split("\n")) == sorted([own_line, "Text (OCR): OPEN"])


def test_adapter_captioner_is_unavailable_on_a_text_only_model(smol):
    status = AdapterCaptioner(smol).availability()
    assert not status.available and "CAPTION-7B" in status.fix


# -- prompt assembly -----------------------------------------------------------------------------------


def test_alpaca_prompt_puts_expert_text_in_the_input_block(image):
    built = build_prompt(
        "What does it say?", image, [Fixed("ocr-f", "OPEN", kind="ocr")], template="alpaca", cache=None
    )
    assert built.text == format_alpaca("What does it say?", "Fixed (ocr-f): OPEN")
    assert "### Input:\nFixed (ocr-f): OPEN\n\n### Response:" in built.text
    assert built.messages[-1] == {"role": "user", "content": "What does it say?", "context": "Fixed (ocr-f): OPEN"}


def test_chat_prompt_marks_the_expert_context_and_is_what_the_model_reads(smol, chelsea, tagger):
    built = build_prompt("What animal is this?", chelsea, [tagger], pipeline=smol)
    assert built.text == smol.render(built.messages)
    context = built.report.context
    assert "Egyptian cat" in context or "tabby" in context
    assert CONTEXT_BLOCK.format(context=context, content="What animal is this?") in built.text


def test_prompt_without_working_experts_is_the_plain_prompt(smol, image):
    plain = smol.render("Describe the image.")
    built = build_prompt("Describe the image.", image, [Broken("bad"), Sleepy(seconds=2)], pipeline=smol, cache=None)
    assert built.text == plain
    assert {r.name: r.status for r in built.report.skipped} == {"bad": "failed", "sleepy": "timeout"}


def test_prompt_keeps_history_and_reports_experts_without_an_image(smol):
    history = [{"role": "system", "content": "Be brief."}]
    built = build_prompt("Hi", None, [Fixed()], pipeline=smol, history=history)
    assert built.text == smol.render([*history, {"role": "user", "content": "Hi"}])
    assert built.report["fixed"].status == "unavailable" and "no image" in built.report["fixed"].reason


def test_prompt_rejects_an_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError):
        build_prompt("Hi", bad, [Fixed()])


# -- comparison ----------------------------------------------------------------------------------------


def test_compare_answers_without_and_with_each_combination_with_the_same_seed(smol):
    ocr = default_registry().get("ocr-easyocr")
    broken, fixed = Broken("broken"), Fixed("fixed", "a shop front at night")
    picture = sign()
    sampling = {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9}
    result = compare(smol, "What does the sign say?", picture, [[ocr], [ocr, broken], [fixed]], seed=7, **sampling)

    assert [v.label for v in result.variants] == [
        "no experts",
        "ocr-easyocr",
        "ocr-easyocr + broken",
        "fixed",
    ]
    assert not result.image_to_model  # SmolLM2 is text-only: the experts are its only view of the image
    assert fixed.calls == 1 and broken.calls == 1  # each expert runs once
    assert "OPEN 24 HOURS" in result.experts["ocr-easyocr"].text
    baseline, with_ocr, with_broken, with_fixed = result.variants
    assert baseline.prompt == smol.render("What does the sign say?")
    assert "[Image context]" in with_ocr.prompt and "OPEN 24 HOURS" in with_ocr.prompt
    assert with_broken.prompt == with_ocr.prompt and with_broken.skipped == ["broken"]
    assert "a shop front at night" in with_fixed.prompt
    for variant in result.variants:
        assert isinstance(variant.answer, str) and variant.seconds > 0
    # Same seed, same sampling: each answer is what generate gives for that prompt.
    assert baseline.answer == smol.generate("What does the sign say?", seed=7, **sampling)
    context = "Fixed (fixed): a shop front at night"
    messages = [{"role": "user", "content": "What does the sign say?", "context": context}]
    assert with_fixed.answer == smol.generate(messages, seed=7, **sampling)
    json.dumps(result.to_dict())


# -- CLIs ------------------------------------------------------------------------------------------------


def test_cli_prints_each_experts_text(tmp_path, capsys, chelsea, no_coca_weights):
    path = tmp_path / "chelsea.png"
    chelsea.save(path)
    assert experts_cli.main([str(path), "--expert", "caption"]) == 0
    out = capsys.readouterr().out
    # Offline, CoCa has no weights: the caption alias falls back to the tagger.
    assert "[tagger] ImageNet tagger" in out and "cat" in out


def test_cli_reports_skipped_experts(tmp_path, capsys, no_coca_weights):
    path = tmp_path / "sign.png"
    sign().save(path)
    assert experts_cli.main([str(path), "--expert", "ocr,caption-coca"]) == 0
    out = capsys.readouterr().out
    assert "[ocr-easyocr] OCR (easyocr)" in out and "OPEN 24 HOURS" in out
    assert "[caption-coca] skipped (unavailable): CoCa weights" in out


def test_cli_lists_experts(capsys):
    assert experts_cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in default_registry().names():
        assert name in out


@pytest.mark.parametrize(
    "args, message",
    [(["missing.png"], "error: Image file not found"), (["{image}", "--expert", "nope"], "error: Unknown expert")],
)
def test_cli_bad_input_exits_non_zero_with_one_line(args, message, tmp_path, capsys, image):
    path = tmp_path / "ok.png"
    image.save(path)
    assert experts_cli.main([a.format(image=path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_compare_cli_prints_every_variant(tmp_path, capsys, monkeypatch, smol):
    path = tmp_path / "sign.png"
    sign().save(path)
    monkeypatch.setattr("llama_adapter.cli.load", lambda *a, **k: smol)
    argv = [str(path), "What does the sign say?", "--experts", "ocr", "--max-new-tokens", "8", "--show-prompt"]
    assert compare_module.main(argv) == 0
    out = capsys.readouterr().out
    assert "=== no experts (" in out and "=== ocr-easyocr (" in out
    assert "text-only" in out and "OPEN 24 HOURS" in out and "--- prompt ---" in out


def test_compare_cli_json_and_bad_input(tmp_path, capsys, monkeypatch, smol):
    path = tmp_path / "sign.png"
    sign().save(path)
    monkeypatch.setattr("llama_adapter.cli.load", lambda *a, **k: smol)
    assert compare_module.main([str(path), "Hi", "--experts", "ocr", "--max-new-tokens", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [v["label"] for v in data["variants"]] == ["no experts", "ocr-easyocr"]
    assert compare_module.main([str(tmp_path / "missing.png"), "Hi"]) == 2
    assert capsys.readouterr().err.startswith("error: Image file not found")


def test_compare_cli_offers_a_seeing_model_its_own_caption(capsys, monkeypatch):
    from test_image_chat import CIRCLE, visual_pipeline

    pipe = visual_pipeline()
    monkeypatch.setattr("llama_adapter.cli.load", lambda *a, **k: pipe)
    argv = [str(CIRCLE), "Is there a circle?", "--experts", "caption-adapter", "--max-new-tokens", "8", "--json"]
    assert compare_module.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert [v["label"] for v in data["variants"]] == ["no experts", "caption-adapter"]
    written = AdapterCaptioner(pipe).describe(open_image(CIRCLE))  # asked apart, the same caption
    assert [e["text"] for e in data["experts"]] == [written] and written in data["variants"][1]["prompt"]


def test_compare_cli_explains_each_answer(tmp_path, capsys, monkeypatch, smol):
    """``--explain DIR``: each variant's trace and pictures; with OCR, its text cut where the answer repeats it."""
    path = tmp_path / "sign.png"
    sign().save(path)
    monkeypatch.setattr("llama_adapter.cli.load", lambda *a, **k: smol)
    out = tmp_path / "explained"
    argv = [str(path), "What does the sign say?", "--experts", "ocr", "--max-new-tokens", "12", "--explain", str(out)]
    assert compare_module.main(argv) == 0
    pictures = {"trace.json", "gates.png", "adapter_share.png"}
    assert {p.name for p in (out / "no-experts").iterdir()} == pictures
    assert {p.name for p in (out / "ocr-easyocr").iterdir()} == pictures | {"repeated.png"}
    data = json.loads((out / "ocr-easyocr" / "trace.json").read_text())
    assert "OPEN 24 HOURS" in data["context"] and "".join(t for t, _ in data["context_spans"]) == data["context"]
    assert "=== ocr-easyocr (" in capsys.readouterr().out and data["answer"]


def test_modules_run_as_scripts():
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    missing = run("-m", "experts", "missing.png")
    assert missing.returncode == 2 and missing.stderr.strip() == "error: Image file not found: missing.png"
    helped = run("-m", "experts.compare", "--help")
    # No runpy warning about experts.compare being imported by its own package first.
    assert helped.returncode == 0 and "--experts" in helped.stdout and "RuntimeWarning" not in helped.stderr


def test_public_api():
    assert experts.compare is compare and set(experts.__all__) >= {"build_prompt", "compare", "run_experts"}
    with pytest.raises(AttributeError):
        experts.nothing  # noqa: B018
