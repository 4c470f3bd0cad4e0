"""``train.evaluate``: answer normalisation, VQA accuracy, perplexity, MME answer files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama_adapter.images import open_image
from llama_adapter.tiny import random_base
from train import fit, setup
from train.evaluate import (
    accuracy_by_kind,
    answer_kind,
    claims,
    evaluate_perplexity,
    evaluate_vqa,
    judge,
    load_pipeline,
    main,
    normalize_answer,
    per_kind_sample,
    read_vqa,
    vqa_score,
    write_mme_answers,
)
from train.synthetic import draw_shape


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def easy_vqa(tmp_path_factory):
    """easy-VQA's layout: questions.json rows [question, answer, image_id], images/<id>.png."""
    root = tmp_path_factory.mktemp("easy_vqa")
    (root / "images").mkdir()
    rows = []
    for i, (shape, color) in enumerate([("circle", "red"), ("square", "blue"), ("triangle", "green")]):
        draw_shape(shape, color).save(root / "images" / f"{i}.png")
        rows += [["what shape is this?", shape, i], ["what color is the shape?", color, i]]
    (root / "questions.json").write_text(json.dumps(rows))
    return root / "questions.json"


@pytest.fixture(scope="module")
def adapter(trained):
    return trained[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, easy_vqa):
    out = tmp_path_factory.mktemp("run")
    cfg = {
        "stage": "finetune",
        "output_dir": str(out),
        "model": {
            "base": "tiny",
            "base_seed": 7,
            "pretrained_encoder": False,
            "adapter": {"image_encoder": "efficientnet-lite0", "visual_dim": 32, "visual_depth": 1, "visual_heads": 2},
        },
        "data": {"sources": [{"path": str(easy_vqa)}], "batch_size": 2, "max_len": 256},
        "optim": {"max_steps": 2, "lr": 1e-2},
        "log": {"report_to": ["none"]},
    }
    state = setup(cfg)
    path = fit(state)
    encoder = {k: v.clone() for k, v in state.unwrapped.image_encoder.state_dict().items()}
    return path, encoder


def test_normalisation_and_vqa_score():
    assert normalize_answer("  The Red Circle. ") == "red circle"
    assert normalize_answer("Two!") == "2" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("dont know") == "don't know"
    assert vqa_score("A circle", ["circle"]) == 1.0 and vqa_score("square", ["circle"]) == 0.0
    assert vqa_score("yes", ["yes", "yes", "no", "no"]) == pytest.approx(2 / 3)
    assert vqa_score("yes", ["yes"] * 3 + ["no"]) == 1.0


@pytest.mark.parametrize(
    "reply, reference, right",
    [
        ("Yes, the shape is brown.", "yes", True),
        ("yes", "yes", True),
        ("No, it is a green circle.", "yes", False),
        ("No, there is no red shape.", "no", True),
        ("The answer is yes.", "yes", False),  # yes/no: the first word decides
        ("The circle is grey.", "gray", True),  # an explicit synonym
        ("It is gray.", "grey", False),  # synonyms belong to the reference word only
        ("It is red or blue.", "red", False),  # two colours answer nothing
        ("The red shape is a circle.", "circle", True),  # other sets' words are fine
        ("It is reddish.", "red", False),  # whole words only
        ("Two triangles.", "triangle", True),  # plurals
        ("The trains go to LEEDS.", "Leeds", True),
        ("The total is $18.56.", "$18.56", True),
        ("It costs $1.9.", "$1.99", False),
        ("Platform 9.", "PLATFORM 9", True),
        ("", "circle", False),
    ],
)
def test_free_form_replies_are_judged_from_their_words(reply, reference, right):
    assert judge(reply, reference) is right


@pytest.mark.parametrize(
    "reply, shape, claimed",
    [
        ("It is a picture of a circle.", "circle", True),
        ("It looks like a picture with a tree and a circle.", "circle", True),
        ("Two triangles.", "triangle", True),
        # the demo model's int8 reply for the coffee cup: a circle named, none claimed
        ("It is probably a picture that is neither a simple shape nor a red circle.", "circle", False),
        ("It is not a circle, it is a triangle.", "circle", False),
        ("It is not a circle, it is a triangle.", "triangle", True),
        ("This is not a rectangle but a circle.", "circle", True),
        ("This is not a rectangle but a circle.", "rectangle", False),
        ("There are no circles here.", "circle", False),
        ("It isn't a triangle.", "triangle", False),
        ("I cannot tell; it is not a simple shape.", "rectangle", False),
    ],
)
def test_a_shape_named_in_denial_is_not_claimed(reply, shape, claimed):
    assert claims(reply, shape) is claimed


def test_a_model_that_always_says_yes_scores_half_balanced():
    references = ["yes"] * 30 + ["no"] * 10 + ["circle"] * 10
    kinds = [answer_kind(r) for r in references]
    assert kinds == ["yes"] * 30 + ["no"] * 10 + ["shape"] * 10
    result = accuracy_by_kind(kinds, [float(judge("Yes, it is.", r)) for r in references])
    assert result["accuracy"] == pytest.approx(30 / 50) and result["balanced_yes_no"] == pytest.approx(0.5)
    assert result["by_kind"] == {
        "no": {"accuracy": 0.0, "items": 10},
        "shape": {"accuracy": 0.0, "items": 10},
        "yes": {"accuracy": 1.0, "items": 30},
    }


def test_tiny_adapter_loads_with_its_random_base_and_encoder(trained):
    adapter, encoder = trained
    pipe = load_pipeline(None, str(adapter))
    assert pipe.info["base"] == "tiny" and pipe.template == "alpaca" and pipe.accepts_images
    # Same base seed as in training: the base weights are the trained-on ones.
    assert torch.equal(pipe.model.tok_embeddings.weight, random_base("tiny", 7).state_dict["tok_embeddings.weight"])
    # A random-init encoder (tests) is rebuilt from the training seed.
    assert all(torch.equal(v, encoder[k]) for k, v in pipe.model.image_encoder.state_dict().items())


def test_vqa_accuracy_on_easy_vqa_layout(adapter, easy_vqa, tmp_path):
    rows = read_vqa(easy_vqa, limit=4)
    assert rows[0] == {
        "image": str(easy_vqa.parent / "images" / "0.png"),
        "question": "what shape is this?",
        "answers": ["circle"],
    }
    llava = easy_vqa.parent / "llava.json"
    turns = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A circle."}]
    llava.write_text(json.dumps([{"image": "images/0.png", "conversations": turns, "short_answer": "circle"}]))
    assert read_vqa(llava) == [{"image": rows[0]["image"], "question": "What shape?", "answers": ["circle"]}]
    result = evaluate_vqa(load_pipeline(None, str(adapter)), rows, batch_size=2, max_new_tokens=3)
    assert result["count"] == 4 and 0.0 <= result["accuracy"] <= 1.0 and result["judge"] == "free"
    assert all(p["score"] == vqa_score(p["prediction"], p["answers"]) for p in result["predictions"])
    # "square" is not one of the closed shape set (easy-VQA has none): judged as text
    assert set(result["by_kind"]) == {"shape", "colour", "text"} and "balanced_yes_no" not in result
    exact = evaluate_vqa(load_pipeline(None, str(adapter)), rows, judge="exact", batch_size=2, max_new_tokens=3)
    assert all(p["score"] == vqa_score(p["prediction"], p["answers"], "exact") for p in exact["predictions"])
    with pytest.raises(ValueError, match="judge"):
        evaluate_vqa(load_pipeline(None, str(adapter)), rows, judge="loose")
    out = tmp_path / "preds.jsonl"
    main(
        [
            "vqa",
            "--adapter",
            str(adapter),
            "--data",
            str(easy_vqa),
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--out",
            str(out),
        ]
    )
    assert len(out.read_text().splitlines()) == 2


def test_perplexity_counts_answer_tokens(adapter):
    pipe = load_pipeline(None, str(adapter))
    samples = [
        {"instruction": "Say hi.", "output": "Hi."},
        {"instruction": "Count.", "output": "1 2 3"},
        {"instruction": "x", "output": ""},
    ]
    result = evaluate_perplexity(pipe, samples, batch_size=2)
    # Byte tokens of each answer plus its EOS; the empty answer is skipped.
    assert result["answer_tokens"] == len("Hi.") + 1 + len("1 2 3") + 1 and result["skipped"] == 1
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1.0
    assert result["perplexity"] == pytest.approx(math.exp(result["nll_per_token"]))


def test_mme_answer_files_in_the_official_layout(adapter, tmp_path):
    mme = tmp_path / "MME_Benchmark_release_version"
    # Layout 1 (images/ + questions_answers_YN/) and layout 2 (files side by side).
    (mme / "color" / "images").mkdir(parents=True)
    (mme / "color" / "questions_answers_YN").mkdir()
    draw_shape("circle", "red").convert("RGB").save(mme / "color" / "images" / "001.jpg")
    (mme / "color" / "questions_answers_YN" / "001.txt").write_text(
        "Is the circle red? Please answer yes or no.\tYes\nIs the circle blue? Please answer yes or no.\tNo\n"
    )
    (mme / "code_reasoning").mkdir()
    draw_shape("square", "blue").save(mme / "code_reasoning" / "0020.png")
    (mme / "code_reasoning" / "0020.txt").write_text("Is it a square?\tYes\nIs it a circle?\tNo\n")
    written = write_mme_answers(load_pipeline(None, str(adapter)), mme, tmp_path / "results", max_new_tokens=3)
    assert written == {"color": 2, "code_reasoning": 2}
    lines = (tmp_path / "results" / "color.txt").read_text().splitlines()
    assert len(lines) == 2
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 4 for f in fields)
    assert [f[0] for f in fields] == ["001.jpg", "001.jpg"] and [f[2] for f in fields] == ["Yes", "No"]


def test_a_per_kind_sample_holds_as_many_yes_as_no():
    answers = ["yes"] * 30 + ["no"] * 6 + ["red"] * 9
    rows = [{"question": f"q{i}", "answers": [a], "image": "x.png"} for i, a in enumerate(answers)]
    sample = per_kind_sample(rows, 5, seed=1)
    kinds = [answer_kind(r["answers"][0]) for r in sample]
    assert sorted(kinds) == ["colour"] * 5 + ["no"] * 5 + ["yes"] * 5
    assert sample == per_kind_sample(rows, 5, seed=1) and sample != per_kind_sample(rows, 5, seed=2)
    assert len(per_kind_sample(rows, 8)) == 8 + 6 + 8  # all six "no" rows: there are no more


def test_own_caption_puts_the_caption_the_app_gets_in_each_prompt(easy_vqa, tmp_path):
    from experts import AdapterCaptioner, run_experts
    from llama_adapter.build import DEFAULT_ADAPTER

    out = tmp_path / "preds.jsonl"
    argv = ["vqa", "--adapter", str(DEFAULT_ADAPTER), "--data", str(easy_vqa), "--limit", "2", "--max-new-tokens", "4"]
    main([*argv, "--own-caption", "--out", str(out)])
    pipe = load_pipeline(None, str(DEFAULT_ADAPTER))
    for row in map(json.loads, out.read_text().splitlines()):
        app_context = run_experts(open_image(row["image"]), [AdapterCaptioner(pipe)], cache=None).context
        assert app_context and row["context"] == app_context
    with pytest.raises(SystemExit):
        main([*argv, "--own-caption", "--no-image"])
