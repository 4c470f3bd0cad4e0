"""The shipped demo model (assets/demo-adapter.safetensors) behaves as people use it: it is what
loads by default, and the app opens with its own caption on; held-out easy-VQA yes/no questions
are answered both ways, and right with the model's own caption in the prompt; a sign and a price
are read with the OCR expert and not without; a real photo is named from the tagger's text, and
its own caption makes up no shape. Replies are judged from their words (train.evaluate.judge),
never by exact free text."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
from test_image_chat import visual_pipeline as demo

from experts import AdapterCaptioner, ImageNetTagger, MultimodalChat, measured_defaults, registry_for, run_experts
from llama_adapter.build import DEFAULT_ADAPTER
from llama_adapter.images import open_image
from llama_adapter.weights import read_adapter, read_adapter_metadata
from train.evaluate import ANSWER_SETS, claims, judge, with_own_caption
from train.recipes.demo_data.drawing import render_layout
from train.recipes.demo_data.easyvqa import load_easy_vqa
from train.recipes.demo_data.ocr import SIGN_SCHEMES, sign_content
from train.recipes.demo_eval import PHOTO_QUESTION, names_label, photo

pytestmark = pytest.mark.slow

ROOT = DEFAULT_ADAPTER.parent.parent
EXAMPLES = ROOT / "assets" / "examples"


def test_the_shipped_adapter_is_the_default_and_says_where_it_came_from():
    assert DEFAULT_ADAPTER.is_file(), "assets/demo-adapter.safetensors is missing: python -m train.recipes.demo"
    assert DEFAULT_ADAPTER.stat().st_size <= 20 * 2**20
    meta = read_adapter_metadata(DEFAULT_ADAPTER)
    assert meta["base"] == "smollm2-135m" and meta["base_fingerprint"]
    recipe = meta["recipe"]
    assert recipe["command"] == "python -m train.recipes.demo" and recipe["data_seed"] == 0
    assert len(recipe["commit"]) == 40, recipe["commit"]  # a commit, not one with uncommitted changes ("+dirty")
    vqa = meta["metrics"]["easy_vqa"]
    assert vqa["free"]["accuracy"] > vqa["majority"]["accuracy"]
    # Bare yes/no is at chance (README, The demo model), as likely under as over the blind
    # baseline; with the own caption the app opens with, it is well above it.
    assert vqa["free_with_own_caption"]["balanced_yes_no"] > vqa["free_without_image"]["balanced_yes_no"] + 0.2
    pipe = demo()
    assert pipe.info["adapter"] == str(DEFAULT_ADAPTER) and pipe.model.visual_layers
    assert pipe.model.adapter_config.visual_positions == 49  # the queries attend over the 7x7 grid, placed


def heldout_yes_no(n: int) -> list[tuple[str, str, str]]:
    """``n`` easy-VQA test questions (never trained on) answered "yes" and ``n`` answered "no",
    typed as a person would: (question, image, answer)."""
    split = load_easy_vqa("heldout")
    rng = random.Random(14)
    picked = []
    for answer in ("yes", "no"):
        questions = [q for q in split.questions if q.kind == "yes_no" and q.answer == answer]
        picked += rng.sample(questions, n)
    return [(q.text[0].upper() + q.text[1:], str(split.image_paths[q.image_id]), q.answer) for q in picked]


def test_heldout_yes_no_questions_are_answered_from_the_image_both_ways():
    items = heldout_yes_no(8)
    replies = demo().generate_batch([q for q, _, _ in items], [img for _, img, _ in items], max_new_tokens=16)
    right = {"yes": 0, "no": 0}
    for (_, _, answer), reply in zip(items, replies):
        right[answer] += judge(reply, answer)
    report = [(q, r, a) for (q, _, a), r in zip(items, replies)]
    # Saying "Yes" to everything gets 8 and 0, "No" 0 and 8: asked bare, the answers must go both
    # ways. Bare yes/no is at chance (the recipe's held-out balanced yes/no without an expert:
    # README, The demo model), so more is not asked of it here; with the model's own caption it is
    # (the next test).
    assert right["no"] >= 3 and right["yes"] >= 3, (right, report)


def test_heldout_yes_no_questions_are_answered_both_ways_with_the_model_s_own_caption():
    """As `python app.py` answers with the model's own caption ticked: its caption of each new
    image joins the prompt, then the question."""
    pipe = demo()
    registry = registry_for(pipe)
    items = heldout_yes_no(8)
    right, report = {"yes": 0, "no": 0}, []
    for question, image, answer in items:
        chat = MultimodalChat(pipe, registry=registry)
        reply = chat.ask(question, [image], ["caption-adapter"], max_new_tokens=16)
        right[answer] += judge(reply, answer)
        report.append((question, chat.last_turn.prompt[-160:], reply, answer))
    # A constant answer gets 8 of one kind and 0 of the other.
    assert right["no"] >= 6 and right["yes"] >= 6, (right, report)


def test_the_recipe_scores_with_the_caption_the_app_gets_from_the_model():
    pipe = demo()
    question, image, answer = heldout_yes_no(1)[0]
    [row] = with_own_caption(pipe, [{"image": image, "question": question, "answers": [answer]}])
    assert row["context"] == run_experts(open_image(image), [AdapterCaptioner(pipe)], cache=None).context


def test_a_sign_is_read_when_asked_freely_with_the_ocr_expert_and_not_without(tmp_path):
    """The issue's platform sign, asked as a person would, beside the same sign to another city.
    Without the expert a reply may still name a city the language model thinks likely (this
    model's bare guess is "Leeds"), so it is asked of both signs: a model that does not read
    cannot name each sign's own city."""
    replies = {}
    for city in ("Leeds", "York"):
        content = sign_content(["PLATFORM 9", f"Trains to {city}"], [], SIGN_SCHEMES[:1])
        image = tmp_path / f"{city}.png"
        render_layout(content.layout, random.Random(0)).save(image)
        chat = MultimodalChat(demo())
        reply = chat.ask("Where do the trains go?", [image], ["ocr"], max_new_tokens=24)
        assert judge(reply, city), (reply, chat.last_turn.prompt)
        replies[city] = demo().generate("Where do the trains go?", image=image, max_new_tokens=24)

    def names_only(reply: str, city: str) -> bool:
        return judge(reply, city) and not any(judge(reply, other) for other in replies if other != city)

    assert not all(names_only(reply, city) for city, reply in replies.items()), replies


def test_a_price_is_read_with_the_ocr_expert_and_not_without():
    question = "How much are the apples?"
    chat = MultimodalChat(demo())
    with_ocr = chat.ask(question, [EXAMPLES / "price_tag.png"], ["ocr"], max_new_tokens=24)
    # The price as OCR reads it: easyocr reads this label's "$" as "S", and the model repeats what it read.
    assert "1.99" in with_ocr, (with_ocr, chat.last_turn.prompt)
    without = demo().generate(question, image=EXAMPLES / "price_tag.png", max_new_tokens=24)
    assert "1.99" not in without, without


def test_a_real_photo_is_named_from_the_tagger():
    """scikit-image's coffee cup (never in the training data): the tagger says espresso."""
    image = photo("coffee")
    top = ImageNetTagger().tags(image, 1)[0][0]
    chat = MultimodalChat(demo())
    reply = chat.ask(PHOTO_QUESTION, [image], ["tagger"], max_new_tokens=32)
    assert names_label(reply, top), (top, reply, chat.last_turn.prompt)


def test_a_real_photo_gets_no_made_up_shape_from_the_model_s_own_caption_and_is_named_beside_the_tagger():
    """The experts `python app.py` opens with (the own caption), then with the tagger ticked too:
    the own caption of a picture unlike the shapes it learnt says so instead of making one up."""
    pipe = demo()
    registry = registry_for(pipe)
    image = photo("coffee")
    top = ImageNetTagger().tags(image, 1)[0][0]
    chat = MultimodalChat(pipe, registry=registry)
    reply = chat.ask(PHOTO_QUESTION, [image], ["caption-adapter"], max_new_tokens=32)
    assert not any(claims(reply, shape) for shape in ANSWER_SETS["shape"]), (reply, chat.last_turn.prompt)
    chat = MultimodalChat(pipe, registry=registry)
    reply = chat.ask(PHOTO_QUESTION, [image], ["caption-adapter", "tagger"], max_new_tokens=32)
    assert names_label(reply, top), (top, reply, chat.last_turn.prompt)


def test_the_app_opens_with_the_model_s_own_caption_on_as_its_metadata_measured():
    pipe = demo()
    chosen, why = measured_defaults(pipe, registry_for(pipe))
    assert chosen == ["caption-adapter"], why


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
    # The reading stage starts from the joint stage's adapter and trains the language side only:
    # the visual branch (the paper's pretrain group) is the joint stage's, tensor for tensor.
    joint = read_adapter(tmp_path / "quick" / "adapter.safetensors").state_dict
    reading = read_adapter(tmp_path / "quick-reading" / "adapter.safetensors").state_dict
    assert joint.keys() == reading.keys()
    visual = [k for k in joint if k.startswith("visual_")]
    changed = [k for k in joint if not torch.equal(joint[k], reading[k])]
    assert visual and not set(visual) & set(changed)
    assert any(k.endswith(".bias") for k in changed) and any(k.endswith(".scale") for k in changed), changed
