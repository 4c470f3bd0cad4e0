"""The app in a real browser (Playwright driving Debian's chromium): chat with streaming, Stop and Undo;
an example image with OCR, the panel of what the model saw, Compare; a corrupt upload. Screenshots
go to test-artifacts/."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest
from test_app import ROOT, SIGN_TEXT, Served, serve

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


def wait_until(condition, timeout: float = 120, every: float = 0.1):
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def set_max_tokens(page, tab: str, n: int) -> None:
    """Short answers keep the test fast. The accordion mounts its sliders as it opens, which can
    reset a value typed too early: type until it stays."""
    page.click(f"#{tab}-sampling button")
    box = page.locator(f"#{tab}-max-tokens input[type=number]")
    box.wait_for(state="visible")
    for _ in range(5):
        box.fill(str(n))
        box.press("Enter")
        page.wait_for_timeout(500)
        if box.input_value() == str(n):
            return
    raise AssertionError(f"Max new tokens stays at {box.input_value()}")


def stable_answer(page, selector: str, quiet: float = 3.0, timeout: float = 120) -> tuple[str, set[int]]:
    """Wait until the last message in ``selector`` stops changing; return it and every length seen on the way."""
    lengths: set[int] = set()
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = texts(page, selector)
        now = found[-1] if found else ""
        lengths.add(len(now))
        if now != last:
            last, since = now, time.monotonic()
        elif now.strip() and time.monotonic() - since > quiet:
            return now, lengths
        time.sleep(0.1)
    raise AssertionError(f"the answer did not settle: {last!r}")


def test_chat_streams_an_answer_and_stop_undo_retry_work(page):
    set_max_tokens(page, "chat", 48)
    page.click("#chat-system button")  # open the accordion
    page.fill("#chat-system textarea", "You are a concise assistant.")
    page.fill("#chat-input textarea", "Name three colours.")
    page.click("#chat-send")
    wait_until(lambda: any(t.strip() for t in texts(page, "#chatbot [data-testid=bot]")))
    shot(page, "chat-streaming")
    answer, _ = stable_answer(page, "#chatbot [data-testid=bot]")
    assert answer.strip() and texts(page, "#chatbot [data-testid=user]") == ["Name three colours."]
    shot(page, "chat-answered")

    page.fill("#chat-input textarea", "Write a story about a dragon who learns to bake bread.")
    page.click("#chat-send")
    # A long answer, watched as it grows: it streams (a short one may finish between two looks).
    lengths: set[int] = set()

    def growing() -> bool:
        bots = texts(page, "#chatbot [data-testid=bot]")
        if len(bots) == 2 and bots[-1].strip():
            lengths.add(len(bots[-1]))
        return len(lengths) >= 3

    wait_until(growing)
    page.click("#chat-stop")
    stopped, _ = stable_answer(page, "#chatbot [data-testid=bot]", quiet=2.0)
    assert stopped.strip()
    shot(page, "chat-stopped")

    page.click("#chat-undo")
    wait_until(lambda: len(texts(page, "#chatbot [data-testid=bot]")) == 1)
    assert texts(page, "#chatbot [data-testid=bot]") == [answer]

    page.click("#chat-retry")  # the first question, answered again
    wait_until(lambda: texts(page, "#chatbot [data-testid=bot]") != [answer])
    again, _ = stable_answer(page, "#chatbot [data-testid=bot]")
    assert again.strip() and texts(page, "#chatbot [data-testid=user]") == ["Name three colours."]
    shot(page, "chat-retried")


def example(served: Served) -> tuple[Path, str, str]:
    """An example image with text (image, question, expected answer) from the app's examples."""
    items = json.loads((served.examples / "examples.json").read_text())
    item = next((i for i in items if "sign" in i["image"] and "OPEN" in i["answer"]), None)
    if item is None:
        return served.sign, "What does the sign say?", SIGN_TEXT
    return served.examples / item["image"], item["question"], item["answer"]


def test_image_with_ocr_shows_what_the_model_saw_and_compare_shows_both_answers(page, served):
    DEFAULT_CACHE.clear()  # earlier tests in this process may have read the same image: this one times a fresh read
    image, question, expected = example(served)
    page.get_by_role("tab", name="Image").click()
    set_max_tokens(page, "image", 24)
    with page.expect_response(lambda r: "/upload" in r.url):
        page.set_input_files("#image-input input[type=file]", str(image))
    page.wait_for_selector("#image-input img")
    page.check("#experts input[name=ocr]")
    page.fill("#image-question textarea", question)
    page.click("#image-ask")

    try:
        panel = wait_until(lambda: "OCR" in (t := page.inner_text("#seen-experts")) and "s)" in t and t, timeout=180)
    except AssertionError:
        shot(page, "image-ocr-timeout")
        raise AssertionError(f"the panel says {page.inner_text('#seen-experts')!r}") from None
    assert all(word in panel for word in expected.split()), panel
    answer, _ = stable_answer(page, "#image-chatbot [data-testid=bot]")
    assert answer.strip()
    assert "[Image context]" in page.inner_text("#seen-prompt")
    shot(page, "image-ocr")

    page.fill("#image-question textarea", "Is it open at night?")  # a follow-up about the same image
    page.click("#image-ask")
    wait_until(lambda: "cached" in page.inner_text("#seen-experts"))  # OCR ran once for this image
    wait_until(lambda: len(texts(page, "#image-chatbot [data-testid=bot]")) == 2)
    stable_answer(page, "#image-chatbot [data-testid=bot]")
    assert page.inner_text("#seen-prompt").count("[Image context]") == 2
    shot(page, "image-follow-up")

    page.fill("#image-question textarea", question)
    page.click("#compare-btn")
    with_title = wait_until(lambda: "·" in (t := page.inner_text("#compare-with-title")) and t, timeout=180)
    without_title = page.inner_text("#compare-without-title")
    assert without_title.startswith("Without experts ·") and with_title.startswith("With OCR")
    without, with_ocr = page.inner_text("#compare-without"), page.inner_text("#compare-with")
    assert without.strip() and with_ocr.strip() and "Compare" not in without + with_ocr
    page.locator("#compare-row").scroll_into_view_if_needed()
    shot(page, "compare")


def test_a_corrupt_upload_gets_one_warning_and_the_page_goes_on(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("these are notes, not a picture")
    page.get_by_role("tab", name="Image").click()
    page.click("#image-clear")
    page.set_input_files("#image-input input[type=file]", str(bad))
    wait_until(lambda: "not an image" in " ".join(texts(page, "[data-testid=toast-body]")), timeout=60)
    page.wait_for_timeout(1500)
    assert " ".join(texts(page, "[data-testid=toast-body]")).count("not an image") == 1
    shot(page, "corrupt-upload")
    page.fill("#image-question textarea", "What is it?")
    page.click("#image-ask")
    wait_until(lambda: "no image" in " ".join(texts(page, "[data-testid=toast-body]")), timeout=60)

    page.locator("#image-examples .gallery-item").first.click()  # an example fills in image and question
    page.wait_for_selector("#image-input img")
    question = wait_until(lambda: page.input_value("#image-question textarea"))
    page.click("#image-ask")
    answer, _ = stable_answer(page, "#image-chatbot [data-testid=bot]")
    assert texts(page, "#image-chatbot [data-testid=user]") == [question] and answer.strip()
