"""easy-VQA: its questions parsed into what they ask, and VQA items on its images, each question
asked twice: with " Answer with one word." (easy-VQA's own answer) and plain (a short sentence)."""

from __future__ import annotations

import itertools
import random
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import easy_vqa  # never `import test`: easy-vqa also installs an unrelated top-level package by that name
from tqdm import tqdm

from .common import COLORS, SHAPES, SPLITS, Settings, T, round_robin

SHORT_SUFFIX = " Answer with one word."

_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_WHAT_SHAPE = re.compile(r"what shape (?:is in the image|does the image contain|is present)\?")
_WHAT_COLORED_SHAPE = re.compile(rf"what is the (?P<color>{_C}) shape\?")
_WHAT_COLOR = re.compile(rf"what (?:color is|is the color of) the (?P<shape>shape|{_S})\?")
_YES_NO = re.compile(
    r"(?P<lead>does the image contain a|does the image not contain a|is there a|is there not a|is a|is no) "
    rf"(?:(?P<color>{_C}) shape|(?P<shape>{_S}))(?: in the image| present)?\?"
)
_NEGATED_LEADS = {"does the image not contain a", "is there not a", "is no"}


@dataclass(frozen=True)
class Question:
    """One easy-VQA question, parsed: ``kind`` is what_shape, what_color or yes_no; ``subject`` is
    the colour or shape the question names (None for "the shape")."""

    text: str
    answer: str
    image_id: int
    kind: str
    subject: str | None
    negated: bool = False

    @property
    def subject_is_color(self) -> bool:
        return self.subject in COLORS

    @property
    def present(self) -> bool:
        """Whether the yes/no question's subject is in the image."""
        return (self.answer == "yes") != self.negated


def parse_question(text: str, answer: str, image_id: int) -> Question:
    """Every easy-VQA question matches one of its 24 templates; anything else is an error, so that a
    changed data set cannot produce wrong sentence answers silently."""
    if _WHAT_SHAPE.fullmatch(text):
        return Question(text, answer, image_id, "what_shape", None)
    if m := _WHAT_COLORED_SHAPE.fullmatch(text):
        return Question(text, answer, image_id, "what_shape", m["color"])
    if m := _WHAT_COLOR.fullmatch(text):
        return Question(text, answer, image_id, "what_color", None if m["shape"] == "shape" else m["shape"])
    if m := _YES_NO.fullmatch(text):
        return Question(text, answer, image_id, "yes_no", m["color"] or m["shape"], m["lead"] in _NEGATED_LEADS)
    raise ValueError(f"unknown easy-VQA question template: {text!r}")


@dataclass
class EasyVqaSplit:
    questions: list[Question]
    image_paths: dict[int, Path]


@cache
def load_easy_vqa(split: str) -> EasyVqaSplit:
    """easy-VQA's train split becomes ours; its test split becomes held-out (read once per process)."""
    texts, answers, ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    questions = [parse_question(t, a, i) for t, a, i in zip(texts, answers, ids)]
    return EasyVqaSplit(questions, {i: Path(p) for i, p in sorted(paths.items())})


def image_attributes(questions: Sequence[Question]) -> dict[int, tuple[str, str]]:
    """(colour, shape) of each image whose questions pin both down. Each easy-VQA image holds one
    shape; a what-question names it outright, a yes/no question says it is or is not some value,
    and a value is also known when every other one has been ruled out. Images whose questions
    leave either open are left out (captions must never guess)."""
    facts: dict[int, dict[str, dict[str, set[bool]]]] = {}
    for q in questions:
        known = facts.setdefault(q.image_id, {"color": {}, "shape": {}})

        def note(kind: str, value: str, present: bool, known: dict = known) -> None:
            known[kind].setdefault(value, set()).add(present)

        if q.kind == "what_shape":
            note("shape", q.answer, True)
            if q.subject:
                note("color", q.subject, True)
        elif q.kind == "what_color":
            note("color", q.answer, True)
            if q.subject:
                note("shape", q.subject, True)
        else:
            note("color" if q.subject_is_color else "shape", q.subject, q.present)
    result = {}
    for image_id, known in sorted(facts.items()):
        values = []
        for kind, vocabulary in (("color", list(COLORS)), ("shape", list(SHAPES))):
            if any(len(seen) > 1 for seen in known[kind].values()):
                raise ValueError(f"easy-VQA image {image_id}: its answers contradict each other about its {kind}")
            present = [v for v, seen in known[kind].items() if True in seen]
            if not present:
                present = [v for v in vocabulary if v not in known[kind]]
            values.append(present[0] if len(present) == 1 else None)
        if None not in values:
            result[image_id] = (values[0], values[1])
    return result


def sentence_answer(q: Question, rng: random.Random) -> str:
    """A short sentence that says the same as easy-VQA's one-word answer, in the question's terms."""
    if q.kind == "what_shape":
        options = [f"It is a {q.answer}.", f"The shape is a {q.answer}.", f"The image contains a {q.answer}."]
        if q.subject:
            options.append(f"The {q.subject} shape is a {q.answer}.")
        return rng.choice(options)
    if q.kind == "what_color":
        thing = q.subject or "shape"
        return rng.choice([f"The {thing} is {q.answer}.", f"It is {q.answer}."])
    yes = "Yes" if q.answer == "yes" else "No"
    if q.subject_is_color:
        options = (
            [f"the shape is {q.subject}", f"there is a {q.subject} shape"]
            if q.present
            else [f"the shape is not {q.subject}", f"there is no {q.subject} shape"]
        )
    else:
        options = (
            [f"there is a {q.subject}", f"the image contains a {q.subject}"]
            if q.present
            else [f"there is no {q.subject}", f"it is not a {q.subject}"]
        )
    return f"{yes}, {rng.choice(options)}."


def question_group(q: Question) -> tuple[str, tuple[Any, ...]]:
    """(category, answer group) used to balance the sample: what-shape, what-colour and yes/no get
    equal shares, and inside each every answer (for yes/no: subject kind, negation, answer) too."""
    if q.kind == "yes_no":
        return q.kind, (q.subject_is_color, q.negated, q.answer)
    return q.kind, (q.answer,)


def balanced_sample(items: Sequence[T], key: Callable[[T], tuple[str, tuple]], n: int, rng: random.Random) -> list[T]:
    groups: dict[str, dict[tuple, list[T]]] = {}
    for item in items:
        category, group = key(item)
        groups.setdefault(category, {}).setdefault(group, []).append(item)
    for by_group in groups.values():
        for members in by_group.values():
            rng.shuffle(members)
    streams = [
        round_robin([iter(groups[category][g]) for g in sorted(groups[category])]) for category in sorted(groups)
    ]
    return list(itertools.islice(round_robin(streams), n))


def evqa_image_path(split: str, image_id: int) -> str:
    return f"images/easyvqa/{split}/{image_id}.png"


def build_vqa(data: EasyVqaSplit, split: str, n_items: int, rng: random.Random) -> list[dict[str, Any]]:
    """LLaVA-style items: each sampled question twice, with a one-word and with a sentence answer."""
    chosen = balanced_sample(data.questions, question_group, max(1, n_items // 2), rng)
    items = []
    for q in chosen:
        question = q.text[0].upper() + q.text[1:]
        for prompt, reply in ((question + SHORT_SUFFIX, q.answer), (question, sentence_answer(q, rng))):
            items.append(
                {
                    "image": evqa_image_path(split, q.image_id),
                    "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}],
                    "short_answer": q.answer,
                    "source": "easy-vqa",
                }
            )
    rng.shuffle(items)
    return [{"id": f"vqa-{split}-{i:05d}", **item} for i, item in enumerate(items)]


def copy_images(out_dir: Path, data: EasyVqaSplit, split: str, image_ids: Iterable[int]) -> None:
    folder = out_dir / "images" / "easyvqa" / split
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in tqdm(sorted(set(image_ids)), desc=f"easy-VQA {split}", unit="img", disable=None):
        shutil.copyfile(data.image_paths[image_id], folder / f"{image_id}.png")


def build(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """VQA items of both splits, their easy-VQA images copied under images/easyvqa/<split>/."""
    items = {}
    for split in SPLITS:
        data = load_easy_vqa(split)
        items[split] = build_vqa(data, split, settings.counts[f"vqa_{split}"], settings.rng(f"vqa-{split}"))
        copy_images(settings.out_dir, data, split, (int(Path(item["image"]).stem) for item in items[split]))
    return items
