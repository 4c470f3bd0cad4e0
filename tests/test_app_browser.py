"""The app in a real browser (Playwright driving Debian's chromium): a text chat with streaming, Stop,
Undo and Retry; an image attached to a message, a text follow-up about it, a second image in a later
turn (each answer about the image in view), Edit; the OCR expert as a step with the exact prompt;
Compare on the chat's image; the pictures inside an answer; a corrupt upload; an example.
Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest
from test_app import ROOT, SIGN_TEXT, Served, serve
from test_image_chat import CIRCLE, TRIANGLE

from experts.base import DEFAULT_CACHE

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")  # as .ci/run looks for it (command -v chromium)
ARTIFACTS = ROOT / "test-artifacts"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ANSWERS = "#chatbot [data-testid=bot]:not(:has(.thought-group))"
QUESTIONS = "#chatbot [data-testid=user]"
STEP = "#chatbot [data-testid=bot]:has(.thought-group)"  # a foldable step before an answer
STEPS = f"{STEP} .title"


@pytest.fixture(scope="module")
def served() -> Served:
    return serve()


@pytest.fixture(scope="module")
def page(served: Served) -> Iterator:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        # Not "networkidle": a Gradio page keeps a connection open, so it never comes.
        page.goto(served.url, wait_until="domcontentloaded")
        page.wait_for_selector(".gradio-container")
        page.wait_for_selector("#chat-input textarea")
        yield page
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"app-{name}.png"), full_page=True)


def texts(page, selector: str) -> list[str]:
    return page.locator(selector).all_inner_texts()


def questions(page) -> list[str]:
    return [t for t in texts(page, QUESTIONS) if t.strip()]  # a picture's own bubble has no text


def wait_until(condition, timeout: float = 180, every: float = 0.1):
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def set_number(page, elem_id: str, value: float) -> None:
    """Type a slider's value into its number box until it stays (a value typed while the sidebar is
    still mounting can be reset)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.wait_for(state="visible")
    for _ in range(5):
        box.fill(str(value))
        box.press("Enter")
        page.wait_for_timeout(500)
        if float(box.input_value()) == value:
            return
    raise AssertionError(f"{elem_id} stays at {box.input_value()}")


def stable_answer(page, count: int, quiet: float = 3.0, timeout: float = 180) -> str:
    """Wait until there are ``count`` answers and the last one has stopped changing; return it."""
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = texts(page, ANSWERS)
        now = found[-1] if len(found) == count else None
        if now != last:
            last, since = now, time.monotonic()
        elif now is not None and now.strip() and time.monotonic() - since > quiet:
            return now
        time.sleep(0.1)
    raise AssertionError(f"no settled answer number {count}: {texts(page, ANSWERS)!r}")


def attach(page, *files: Path) -> None:
    for f in files:
        with page.expect_response(lambda r: "/upload" in r.url):
            page.set_input_files("#chat-input input[type=file]", str(f))
    wait_until(lambda: page.locator("#chat-input .thumbnail-item, #chat-input img").count() >= len(files), 30)


def ask(page, question: str, *files: Path) -> str:
    """Send ``question`` with ``files`` as a person does, and return the settled answer."""
    before = len(texts(page, ANSWERS))
    if files:
        attach(page, *files)
    page.fill("#chat-input textarea", question)
    page.press("#chat-input textarea", "Enter")
    return stable_answer(page, before + 1)


def clear(page) -> None:
    page.click("#chat-clear")
    wait_until(lambda: not texts(page, ANSWERS) and not texts(page, QUESTIONS))


def test_text_chat_streams_and_stop_undo_retry_work(page):
    clear(page)
    set_number(page, "max-tokens", 48)
    page.fill("#system textarea", "You are a concise assistant.")
    page.fill("#chat-input textarea", "Name three colours.")
    page.press("#chat-input textarea", "Enter")
    wait_until(lambda: any(t.strip() for t in texts(page, ANSWERS)))
    shot(page, "chat-streaming")
    answer = stable_answer(page, 1)
    assert answer.strip() and questions(page) == ["Name three colours."]
    shot(page, "chat-answered")

    story = "Write a story about a dragon who learns to bake bread."
    page.fill("#chat-input textarea", story)
    page.press("#chat-input textarea", "Enter")
    # A long answer, watched as it grows: it streams (a short one may finish between two looks).
    lengths: set[int] = set()

    def growing() -> bool:
        found = texts(page, ANSWERS)
        if len(found) == 2 and found[-1].strip():
            lengths.add(len(found[-1]))
        return len(lengths) >= 3

    wait_until(growing)
    page.click("#chat-stop")
    stopped = stable_answer(page, 2, quiet=2.0)
    assert stopped.strip()
    shot(page, "chat-stopped")

    page.click("#chat-undo")  # the question goes back into the box, as in Gradio's own chat
    wait_until(lambda: len(texts(page, ANSWERS)) == 1)
    assert texts(page, ANSWERS) == [answer] and page.input_value("#chat-input textarea") == story

    page.fill("#chat-input textarea", "")
    page.click("#chat-retry")  # the first question, answered again
    wait_until(lambda: texts(page, ANSWERS) != [answer])
    again = stable_answer(page, 1)
    assert again.strip() and questions(page) == ["Name three colours."]
    shot(page, "chat-retried")


def test_images_in_later_turns_each_answer_about_the_image_in_view(page):
    """text → circle → text → triangle → text, greedy: the answers name the shape in view, the chat
    marks which image is in view, and Edit asks the last question again."""
    clear(page)
    page.fill("#system textarea", "")
    set_number(page, "temperature", 0)
    set_number(page, "max-tokens", 16)
    assert ask(page, "Name three colours.").strip()
    assert page.inner_text("#in-view-note").startswith("No image yet")

    assert "circle" in ask(page, "What shape is in the image?", CIRCLE).lower()
    assert "Image 1: circle.png · in view" in texts(page, STEPS)
    wait_until(lambda: page.inner_text("#in-view-note").startswith("Image 1 (circle.png)"))
    assert page.locator("#in-view img").count() == 1
    shot(page, "image-attached")
    assert "circle" in ask(page, "What shape is it?").lower()
    shot(page, "image-follow-up")

    assert "triangle" in ask(page, "What shape is in the image?", TRIANGLE).lower()
    steps = texts(page, STEPS)
    assert "Image 1: circle.png · replaced by a later image" in steps and "Image 2: triangle.png · in view" in steps
    wait_until(lambda: page.inner_text("#in-view-note").startswith("Image 2 (triangle.png)"))
    follow_up = ask(page, "What shape is it?")
    assert "triangle" in follow_up.lower() and "circle" not in follow_up.lower()
    assert questions(page) == [
        "Name three colours.",
        "What shape is in the image?",
        "What shape is it?",
        "What shape is in the image?",
        "What shape is it?",
    ]
    shot(page, "second-image")

    last = page.locator(QUESTIONS).last
    last.hover()
    page.locator("#chatbot button[aria-label=Edit]").last.click()
    editor = page.locator("#chatbot textarea").last
    editor.fill("What shape do you see?")
    page.locator("#chatbot button[aria-label=Submit]").last.click()
    wait_until(lambda: questions(page)[-1] == "What shape do you see?")
    edited = stable_answer(page, 5)
    assert "triangle" in edited.lower() and len(questions(page)) == 5
    shot(page, "edited")


def example(served: Served) -> tuple[Path, str, str]:
    """An example image with text (image, question, expected answer) from the app's examples."""
    items = json.loads((served.examples / "examples.json").read_text())
    item = next((i for i in items if "sign" in i["image"] and "OPEN" in i["answer"]), None)
    if item is None:
        return served.sign, "What does the sign say?", SIGN_TEXT
    return served.examples / item["image"], item["question"], item["answer"]


def test_the_ocr_expert_shows_as_a_step_with_the_exact_prompt(page, served):
    DEFAULT_CACHE.clear()  # earlier tests in this process may have read the same image: this one times a fresh read
    clear(page)
    image, question, expected = example(served)
    page.check("#experts input[name=ocr]")
    attach(page, image)
    page.fill("#chat-input textarea", question)
    page.press("#chat-input textarea", "Enter")
    try:
        wait_until(lambda: any("Reading the image: OCR" in t for t in texts(page, STEPS)), timeout=60)
        shot(page, "experts-reading")
    except AssertionError:
        pass  # the experts may finish between two looks
    stable_answer(page, 1)
    ocr = page.locator(STEPS).filter(has_text="OCR (easyocr)").first
    assert re.search(r"\(\d+(\.\d+)?s\)", ocr.inner_text())  # its timing, as Gradio shows a step's duration
    ocr.click()
    step = page.locator(STEP).filter(has_text="OCR (easyocr)").first
    wait_until(lambda: all(word in step.inner_text() for word in expected.split()))
    page.locator(STEPS).filter(has_text="The exact prompt").first.click()
    prompt = page.locator(STEP).filter(has_text="The exact prompt").first
    wait_until(lambda: "[Image context]" in prompt.inner_text())
    shot(page, "experts-step")

    ask(page, "Is it open at night?")  # a follow-up about the same image: OCR's text is in the chat already
    assert "OCR (easyocr): read this image already" in texts(page, STEPS)
    shot(page, "experts-follow-up")


def test_compare_answers_without_and_with_experts_on_the_chats_image(page):
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_selector("#compare-image img")
    wait_until(lambda: page.input_value("#compare-question textarea") == "Is it open at night?")
    page.fill("#compare-question textarea", "What does the sign say?")
    page.click("#compare-btn")
    with_title = wait_until(lambda: "·" in (t := page.inner_text("#compare-with-title")) and t)
    without_title = page.inner_text("#compare-without-title")
    assert without_title.startswith("Without experts ·") and with_title.startswith("With OCR")
    without, with_ocr = page.inner_text("#compare-without"), page.inner_text("#compare-with")
    assert without.strip() and with_ocr.strip() and "Compare" not in without + with_ocr
    shot(page, "compare")
    page.locator("#compare-inside button").first.click()  # open the accordion
    page.click("#compare-inside-btn")
    wait_until(lambda: "Inside both answers to" in page.inner_text("#compare-inside-note"))
    for side in ("without", "with"):
        for name in ("looked", "gates", "adapter_share"):
            picture = page.locator(f"#compare-inside-{side}-{name} img")
            picture.wait_for(state="visible")
            assert picture.evaluate("img => img.naturalWidth") > 100, (side, name)
    page.locator("#compare-inside").scroll_into_view_if_needed()
    shot(page, "compare-inside")
    page.get_by_role("tab", name="Chat").click()


def test_inside_this_answer_shows_three_pictures_for_an_image_answer(page):
    """The accordion under the chat, on request: where the model looked, the gates and each token's
    adapter share for the last answer (an answer without expert text has no fourth picture)."""
    clear(page)
    ask(page, "What shape is in the image?", CIRCLE)
    page.locator("#inside button").first.click()  # open the accordion
    page.click("#inside-btn")
    wait_until(lambda: "Inside the answer to" in page.inner_text("#inside-note"))
    for name in ("looked", "gates", "adapter_share"):
        page.locator(f"#inside-{name} img").wait_for(state="visible")
        assert page.locator(f"#inside-{name} img").evaluate("img => img.naturalWidth") > 100, name
    assert not page.locator("#inside-repeated").is_visible()
    page.locator("#inside").scroll_into_view_if_needed()
    shot(page, "inside-this-answer")


def test_a_corrupt_upload_is_refused_and_the_message_stays(page, tmp_path):
    clear(page)
    page.uncheck("#experts input[name=ocr]")
    bad = tmp_path / "notes.png"
    bad.write_text("these are notes, not a picture")
    attach(page, bad)
    page.fill("#chat-input textarea", "What is it?")
    page.press("#chat-input textarea", "Enter")
    wait_until(lambda: "not an image" in " ".join(texts(page, "[data-testid=toast-body]")), timeout=60)
    # The warning goes out first, the message back into the box with the handler's next update.
    wait_until(lambda: page.input_value("#chat-input textarea") == "What is it?", timeout=60)
    assert not texts(page, ANSWERS)
    shot(page, "corrupt-upload")

    page.locator("#image-examples .gallery-item").first.click()  # an example fills in the message
    question = wait_until(lambda: (q := page.input_value("#chat-input textarea")) != "What is it?" and q)
    page.press("#chat-input textarea", "Enter")
    answer = stable_answer(page, 1)
    assert questions(page) == [question] and answer.strip()
    assert any(t.startswith("Image 1:") for t in texts(page, STEPS))
