"""Held-out evaluation of a demo adapter, measured the way people use the demo: questions typed as
they are (no "Answer with one word."), replies judged from their words (:func:`train.evaluate.judge`),
accuracy per answer kind (yes, no, shape, colour) with the balanced yes/no accuracy, beside the
one-word form and the baselines (the same questions without the image; the majority answer).

* easy-VQA: its own test questions (never trained on), shape, colour, yes and no in equal shares;
* rendered text: held-out signs, labels, receipts, ... asked freely, with the OCR expert's text in
  the prompt (as the app puts it) and without;
* real photos (scikit-image's, never in the training data), "What is in this picture?" with the
  ImageNet tagger on: does the reply name the tagger's top label? And with it off: does the reply
  make up a shape?
* perplexity of held-out instructions.

The recipe evaluates in float32 (the precision it trains in). The CPU default of ``load()`` is
weight-only int8; its effect on these numbers is measured apart, beside the shipped float32 ones:

    python -m train.recipes.demo_eval --quantize int8 --out assets/demo-metrics-int8.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

import llama_adapter

from ..evaluate import (
    ANSWER_SETS,
    accuracy_by_kind,
    answer_kind,
    claims,
    evaluate_perplexity,
    evaluate_vqa,
    judge,
    names,
    with_own_caption,
)
from .demo_data.easyvqa import SHORT_SUFFIX

PRECISION = "fp32"
"""What the recipe evaluates in (``dtype`` for :func:`llama_adapter.load`)."""
KINDS = ("yes", "no", "shape", "colour")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "camera", "coins", "clock", "moon",
          "hubble_deep_field")  # fmt: skip
PHOTO_QUESTION = "What is in this picture?"
SAMPLES = 8  # replies kept in the metrics, per measure


@dataclass
class HeldOut:
    """What an evaluation asks: rows for :func:`train.evaluate.evaluate_vqa` (image, question,
    answers, optional expert context)."""

    vqa: list[dict[str, Any]]  # free-form, equal shares of KINDS
    ocr: list[dict[str, Any]]  # with the OCR expert's text as context
    majority: str  # the most common training answer
    instructions: Path

    def subset(self, per_kind: int, ocr: int) -> HeldOut:
        """The first ``per_kind`` questions of each kind and ``ocr`` rendered-text questions."""
        taken: collections.Counter[str] = collections.Counter()
        vqa = []
        for row in self.vqa:
            if taken[row["kind"]] < per_kind:
                taken[row["kind"]] += 1
                vqa.append(row)
        return HeldOut(vqa, self.ocr[:ocr], self.majority, self.instructions)


def held_out(data: dict[str, Any], per_kind: int | None, ocr_limit: int | None) -> HeldOut:
    """The held-out questions of the recipe's data (see :func:`train.recipes.demo.prepare_data`)."""
    d = data["dir"]
    rows = [
        {
            "image": str(d / item["image"]),
            "question": item["conversations"][0]["value"],
            "answers": [item["short_answer"]],
            "kind": item["kind"],
        }
        for item in data["vqa_heldout"]
        if item["form"] == "free"
    ]
    ocr = [
        {
            "image": str(d / item["image"]),
            "question": item["conversations"][0]["value"],
            "answers": [item["short_answer"]],
            "context": data["contexts"][item["image"]],
            "kind": "text",
        }
        for item in data["ocr"]["heldout"]
    ]
    majority = collections.Counter(i["short_answer"] for i in data["vqa_train"]).most_common(1)[0][0]
    full = HeldOut(rows, ocr, majority, data["instructions_heldout"])
    return full.subset(per_kind or len(rows), ocr_limit or len(ocr))


def scores(result: dict[str, Any], samples: int = SAMPLES) -> dict[str, Any]:
    """An :func:`evaluate_vqa` result without the full list of replies (a few kept as samples)."""
    kept = [
        {"question": p["question"], "reply": p["prediction"], "reference": p["answers"][0]}
        for p in result["predictions"][:samples]
    ]
    return {**{k: v for k, v in result.items() if k != "predictions"}, "samples": kept}


def majority_scores(rows: list[dict[str, Any]], answer: str) -> dict[str, Any]:
    """What always replying the majority answer would score."""
    return accuracy_by_kind(
        [answer_kind(r["answers"][0]) for r in rows], [judge(answer, r["answers"][0]) for r in rows]
    )


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo (shipped in the package: no download)."""
    from skimage import data

    pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return Image.fromarray(pixels).convert("RGB")


def names_label(reply: str, label: str) -> bool:
    """The reply names the tag: the whole label ("Egyptian cat"), or its last word ("cat")."""
    return names(reply, label) or names(reply, label.replace("-", " ").split()[-1])


def evaluate_photos(pipe: llama_adapter.Pipeline) -> dict[str, Any]:
    """Real photos, "What is in this picture?" with the experts as the app runs them: with the
    ImageNet tagger on (alone, and beside the model's own caption), does the reply name its top
    label? Without the tagger (bare, and with the own caption), does it make up a shape (name a
    circle, rectangle or triangle)?"""
    from experts import ExpertReport, registry_for, run_experts

    registry = registry_for(pipe)
    images = [photo(n) for n in PHOTOS]
    tagger = registry.get("tagger")  # the instance the reports use: its model loads once
    tags = [tagger.tags(image, 1)[0][0] for image in images]
    # Each expert reads each photo once; a measure's prompt holds the results it asks for, in its order.
    reports = [run_experts(image, ["caption-adapter", "tagger"], registry=registry, cache=None) for image in images]

    def replies(experts: list[str]) -> list[str]:
        contexts = [ExpertReport([report[name] for name in experts]).context for report in reports]
        messages = [[{"role": "user", "content": PHOTO_QUESTION, "context": c}] for c in contexts]
        return pipe.generate_batch(messages, images, max_new_tokens=32)

    asked = {"with_tagger": ["tagger"], "without_tagger": [], "with_own_caption": ["caption-adapter"]}
    asked["with_tagger_and_own_caption"] = ["caption-adapter", "tagger"]  # as ticked: the own caption is on first
    answers = {measure: replies(experts) for measure, experts in asked.items()}
    own_captions = [report.texts["caption-adapter"] for report in reports]

    def named(measure: str) -> dict[str, Any]:
        hits = sum(names_label(r, t) for r, t in zip(answers[measure], tags))
        return {"named_top_tag": hits, "accuracy": hits / len(images)}

    def made_up(measure: str) -> dict[str, int]:
        return {"made_up_shape": sum(any(claims(r, s) for s in ANSWER_SETS["shape"]) for r in answers[measure])}

    return {
        "items": len(images),
        "question": PHOTO_QUESTION,
        "with_tagger": named("with_tagger"),
        "with_tagger_and_own_caption": named("with_tagger_and_own_caption"),
        "without_tagger": made_up("without_tagger"),
        "with_own_caption": made_up("with_own_caption"),
        "samples": [
            {"photo": n, "top_tag": t, "own_caption": c, **{m: a[i] for m, a in answers.items()}}
            for i, (n, t, c) in enumerate(zip(PHOTOS, tags, own_captions))
        ],
    }


def evaluate(pipe: llama_adapter.Pipeline, heldout: HeldOut, *, photos: bool = True) -> dict[str, Any]:
    """Every held-out measure of one adapter (see the module docstring)."""
    started = time.perf_counter()
    vqa = heldout.vqa
    one_word = [{**r, "question": r["question"] + SHORT_SUFFIX} for r in vqa]
    ocr_without = [{k: v for k, v in r.items() if k != "context"} for r in heldout.ocr]
    metrics: dict[str, Any] = {
        "easy_vqa": {
            "free": scores(evaluate_vqa(pipe, vqa, max_new_tokens=24)),
            "free_without_image": scores(evaluate_vqa(pipe, vqa, with_images=False, max_new_tokens=24)),
            "free_with_own_caption": scores(evaluate_vqa(pipe, with_own_caption(pipe, vqa), max_new_tokens=24)),
            "majority": {"answer": heldout.majority, **majority_scores(vqa, heldout.majority)},
            "one_word": scores(evaluate_vqa(pipe, one_word, judge="exact", max_new_tokens=6)),
        },
        "ocr": {
            "with_expert": scores(evaluate_vqa(pipe, heldout.ocr, max_new_tokens=32)),
            "without_expert": scores(evaluate_vqa(pipe, ocr_without, max_new_tokens=32)),
            "with_expert_and_own_caption": scores(
                evaluate_vqa(pipe, with_own_caption(pipe, heldout.ocr), max_new_tokens=32)
            ),
        },
        "perplexity": evaluate_perplexity(pipe, heldout.instructions)["perplexity"],
    }
    if photos:
        metrics["photos"] = evaluate_photos(pipe)
    metrics["seconds"] = round(time.perf_counter() - started)
    return metrics


def trajectory_point(pipe: llama_adapter.Pipeline, heldout: HeldOut) -> dict[str, Any]:
    """The few numbers tracked through training: easy-VQA per kind (free-form), its balanced yes/no
    bare and with the model's own caption, rendered text with the expert."""
    vqa = evaluate_vqa(pipe, heldout.vqa, max_new_tokens=16)
    captioned = evaluate_vqa(pipe, with_own_caption(pipe, heldout.vqa), max_new_tokens=16)
    ocr = evaluate_vqa(pipe, heldout.ocr, max_new_tokens=32)
    return {
        "easy_vqa": {k: v["accuracy"] for k, v in vqa["by_kind"].items()},
        "balanced_yes_no": vqa.get("balanced_yes_no"),
        "balanced_yes_no_own_caption": captioned.get("balanced_yes_no"),
        "ocr_with_expert": ocr["accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    """Evaluate the shipped demo adapter at a precision and compare with its float32 metrics."""
    from . import demo, demo_report

    parser = argparse.ArgumentParser(prog="python -m train.recipes.demo_eval", description=main.__doc__)
    parser.add_argument("--quantize", choices=("int8", "none"), default="int8")
    parser.add_argument("--dtype", default=PRECISION, help="the base's dtype (default fp32)")
    parser.add_argument("--out", type=Path, help="write the metrics here (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    recipe = demo.Recipe()
    heldout = held_out(demo.prepare_data(recipe), recipe.eval_per_kind, recipe.eval_ocr)
    quantize = None if args.quantize == "none" else args.quantize
    pipe = llama_adapter.load(adapter=demo.ASSETS / "demo-adapter.safetensors", dtype=args.dtype, quantize=quantize)
    metrics = {"precision": {"dtype": args.dtype, "quantize": quantize}, **evaluate(pipe, heldout)}
    if args.out:
        args.out.write_text(json.dumps(metrics, indent=1) + "\n")
    shipped = json.loads((demo.ASSETS / "demo-metrics.json").read_text())
    print(f"shipped ({PRECISION}): {json.dumps(demo_report.headline(shipped))}")
    print(f"{args.dtype}, quantize={quantize}: {json.dumps(demo_report.headline(metrics))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
