"""The shipped demo model (assets/demo-adapter.safetensors) behaves: it is what loads by default,
it answers held-out easy-VQA questions from the image, and it reads a price with the OCR expert.
Answers are checked by their one-word content, never by exact free text."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_image_chat import visual_pipeline as demo

from experts import MultimodalChat
from llama_adapter.build import DEFAULT_ADAPTER
from llama_adapter.weights import read_adapter_metadata
from train.evaluate import normalize_answer
from train.recipes.demo_data.easyvqa import SHORT_SUFFIX, load_easy_vqa

pytestmark = pytest.mark.slow

ROOT = DEFAULT_ADAPTER.parent.parent
EXAMPLES = ROOT / "assets" / "examples"


def test_the_shipped_adapter_is_the_default_and_says_where_it_came_from():
    assert DEFAULT_ADAPTER.is_file(), "assets/demo-adapter.safetensors is missing: python -m train.recipes.demo"
    assert DEFAULT_ADAPTER.stat().st_size <= 20 * 2**20
    meta = read_adapter_metadata(DEFAULT_ADAPTER)
    assert meta["base"] == "smollm2-135m" and meta["base_fingerprint"]
    recipe = meta["recipe"]
    assert recipe["command"] == "python -m train.recipes.demo" and recipe["data_seed"] == 0 and recipe["commit"]
    assert meta["metrics"]["easy_vqa"]["accuracy"] > meta["metrics"]["easy_vqa"]["accuracy_majority"]
    pipe = demo()
    assert pipe.info["adapter"] == str(DEFAULT_ADAPTER) and pipe.model.visual_layers


def heldout_questions(n: int) -> list[tuple[str, str, str]]:
    """``n`` one-word easy-VQA test questions (never trained on), spread over the question kinds."""
    split = load_easy_vqa("test")
    by_kind: dict[str, list] = {}
    for q in split.questions[::97]:
        by_kind.setdefault(q.kind, []).append(q)
    picked = [q for i in range(n) for qs in by_kind.values() if i < len(qs) for q in [qs[i]]][:n]
    return [
        (q.text[0].upper() + q.text[1:] + SHORT_SUFFIX, str(split.image_paths[q.image_id]), q.answer) for q in picked
    ]


def test_heldout_easy_vqa_questions_are_answered_from_the_image():
    items = heldout_questions(12)
    answers = demo().generate_batch([q for q, _, _ in items], [img for _, img, _ in items], max_new_tokens=6)
    right = [normalize_answer(a) == normalize_answer(ref) for a, (_, _, ref) in zip(answers, items)]
    report = [(q, a, ref) for (q, _, ref), a in zip(items, answers)]
    assert sum(right) >= 10, report
    # Without the image the same questions are mostly guessed wrong: the answers come from the picture.
    blind = demo().generate_batch([q for q, _, _ in items], None, max_new_tokens=6)
    assert sum(normalize_answer(a) == normalize_answer(ref) for a, (_, _, ref) in zip(blind, items)) < sum(right)


def test_a_price_is_read_with_the_ocr_expert_and_not_without():
    question = "How much do the apples cost?"
    chat = MultimodalChat(demo())
    with_ocr = chat.ask(question, [EXAMPLES / "price_tag.png"], ["ocr"], max_new_tokens=16)
    assert "1.99" in with_ocr, (with_ocr, chat.last_turn.prompt)
    without = demo().generate(question, image=EXAMPLES / "price_tag.png", max_new_tokens=16)
    assert "1.99" not in without, without


def test_the_chat_cli_names_the_shape_in_an_example():
    command = ["llama_adapter.chat", "--image", str(EXAMPLES / "circle.png"), "--prompt", "What shape is this?"]
    run = subprocess.run(
        [sys.executable, "-m", *command],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert "circle" in run.stdout.lower(), run.stdout


def test_the_quick_recipe_trains_and_its_loss_falls(tmp_path):
    from train.recipes import demo as recipe

    assert recipe.main(["--quick", "--out", str(tmp_path)]) == 0
    first, last = recipe.loss_fell(tmp_path / "quick")
    assert last < first
    assert (tmp_path / "quick" / "adapter.safetensors").is_file()
