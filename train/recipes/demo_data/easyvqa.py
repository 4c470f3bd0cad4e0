"""easy-VQA: its questions parsed into what they ask, and VQA items on its images, each question
asked twice: with " Answer with one word." (easy-VQA's own answer) and plain (a short sentence).

Held-out items are easy-VQA's own test questions, in equal shares of four answer kinds (shape,
colour, yes, no). Training items are written from what each train image shows (its colour and
shape, pinned down by its easy-VQA answers), so that an answer can only come from looking:

* yes/no questions come in contrastive pairs — the same question about two images, one "yes" and
  one "no" — drawn in turn for every subject (each colour, each shape, each colour-and-shape), so
  every subject is asked as often with either answer; a third are negated ("Is there not a red
  shape?"), as easy-VQA's own templates are;
* a "no" in a sentence says what is there instead ("No, the shape is green.");
* what-shape, what-colour and "What is in this picture?" questions on the same images."""

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
    """(category, answer group) used to balance the sample: what-shape, what-colour, yes and no get
    equal shares, and inside each every answer (for yes/no: subject kind and negation) too."""
    if q.kind == "yes_no":
        return q.answer, (q.subject_is_color, q.negated)
    return q.kind, (q.answer,)


def answer_kind(q: Question) -> str:
    """What the answer is: ``yes``, ``no``, ``shape`` or ``colour`` (the recipe's per-kind scores)."""
    return q.answer if q.kind == "yes_no" else "shape" if q.kind == "what_shape" else "colour"


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


def vqa_item(image: str, question: str, reply: str, short: str, kind: str, form: str) -> dict[str, Any]:
    return {
        "image": image,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}],
        "short_answer": short,
        "kind": kind,
        "form": form,
        "source": "easy-vqa",
    }


def both_forms(image: str, question: str, short: str, sentence: str, kind: str) -> list[dict[str, Any]]:
    """The question with " Answer with one word." (the one-word answer) and as typed (a sentence)."""
    question = question[0].upper() + question[1:]
    return [
        vqa_item(image, question + SHORT_SUFFIX, short, short, kind, "one-word"),
        vqa_item(image, question, sentence, short, kind, "free"),
    ]


def build_vqa(data: EasyVqaSplit, split: str, n_items: int, rng: random.Random) -> list[dict[str, Any]]:
    """LLaVA-style items of easy-VQA's own questions, shape, colour, yes and no in equal shares:
    each sampled question twice, with a one-word and with a sentence answer."""
    chosen = balanced_sample(data.questions, question_group, max(1, n_items // 2), rng)
    items = [
        item
        for q in chosen
        for item in both_forms(
            evqa_image_path(split, q.image_id), q.text, q.answer, sentence_answer(q, rng), answer_kind(q)
        )
    ]
    rng.shuffle(items)
    return [{"id": f"vqa-{split}-{i:05d}", **item} for i, item in enumerate(items)]


# -- training questions written from what each image shows ------------------------------------------


@dataclass(frozen=True)
class Subject:
    """What a yes/no question asks about: a colour, a shape, or both ("a red circle")."""

    color: str | None
    shape: str | None

    def shown_in(self, attributes: tuple[str, str]) -> bool:
        color, shape = attributes
        return self.color in (None, color) and self.shape in (None, shape)

    @property
    def noun(self) -> str:
        """ "red shape", "circle", "red circle"."""
        return f"{self.color or ''} {self.shape or 'shape'}".strip()


SUBJECTS = (
    [Subject(c, None) for c in COLORS]
    + [Subject(None, s) for s in SHAPES]
    + [Subject(c, s) for c in COLORS for s in SHAPES]
)
ASKED = ("Is there a {noun}?", "Is there a {noun} in the image?", "Does the image contain a {noun}?",
         "Is a {noun} present?", "Do you see a {noun}?", "Is this a {noun}?")  # fmt: skip
ASKED_COLOR = ("Is the shape {color}?", "Is it {color}?")
ASKED_SHAPE = ("Is the shape a {shape}?", "Is it a {shape}?")
# Negated as easy-VQA's own templates are: "yes" when the subject is absent.
NEGATED = ("Is there not a {noun}?", "Does the image not contain a {noun}?", "Is no {noun} present?",
           "Is there no {noun}?")  # fmt: skip
WHAT_SHAPE = ("What shape is in the image?", "What shape does the image contain?", "What shape is present?",
              "What is the {color} shape?", "What shape is it?", "Which shape is this?")  # fmt: skip
WHAT_COLOR = ("What color is the {shape}?", "What is the color of the {shape}?", "What color is the shape?",
              "What colour is it?", "Which colour is the {shape}?")  # fmt: skip
DESCRIBE = ("What is in this picture?", "What is in the image?", "Describe this image.", "What do you see?",
            "What does the picture show?")  # fmt: skip


def yes_no_question(subject: Subject, negated: bool, rng: random.Random) -> str:
    templates = list(NEGATED if negated else ASKED)
    if not negated and subject.shape is None:
        templates += ASKED_COLOR
    if not negated and subject.color is None:
        templates += ASKED_SHAPE
    # "a": no colour or shape of easy-VQA starts with a vowel.
    return rng.choice(templates).format(noun=subject.noun, color=subject.color, shape=subject.shape)


def yes_no_sentence(subject: Subject, negated: bool, attributes: tuple[str, str], rng: random.Random) -> str:
    """Starts with the answer ("Yes"/"No"); a sentence that says what the image shows."""
    color, shape = attributes
    shown = subject.shown_in(attributes)
    answer = "Yes" if shown != negated else "No"
    thing = f"a {color} {shape}"
    if shown:
        detail = rng.choice([f"there is {thing}", f"it is {thing}", f"the image shows {thing}"])
    else:
        detail = rng.choice(
            [f"there is no {subject.noun}; it is {thing}", f"it is {thing}", f"the image shows {thing}"]
        )
    return f"{answer}, {detail}."


def contrastive_yes_no(
    attributes: dict[int, tuple[str, str]], n_pairs: int, rng: random.Random
) -> list[tuple[int, str, str, str]]:
    """``n_pairs`` pairs of (image, question, one-word answer, sentence): the same question about
    an image that shows its subject and one that does not, subjects taken in turn."""
    by_subject = {
        subject: (
            [i for i, a in attributes.items() if subject.shown_in(a)],
            [i for i, a in attributes.items() if not subject.shown_in(a)],
        )
        for subject in SUBJECTS
    }
    subjects = [s for s in SUBJECTS if all(by_subject[s])]
    rows = []
    for k in range(n_pairs):
        subject = subjects[k % len(subjects)]
        negated = rng.random() < 1 / 3
        question = yes_no_question(subject, negated, rng)
        for image_id in (rng.choice(by_subject[subject][0]), rng.choice(by_subject[subject][1])):
            shown = subject.shown_in(attributes[image_id])
            short = "yes" if shown != negated else "no"
            rows.append((image_id, question, short, yes_no_sentence(subject, negated, attributes[image_id], rng)))
    return rows


def what_questions(image_id: int, attributes: tuple[str, str], rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(question, one-word answer, sentence, kind): the image's shape, its colour, and what it shows."""
    color, shape = attributes
    what_shape = rng.choice(WHAT_SHAPE).format(color=color)
    what_color = rng.choice(WHAT_COLOR).format(shape=shape)
    shape_sentence = rng.choice([f"It is a {shape}.", f"The shape is a {shape}.", f"The {color} shape is a {shape}."])
    color_sentence = rng.choice([f"It is {color}.", f"The {shape} is {color}.", f"The shape is {color}."])
    thing = f"a {color} {shape}"
    describe = rng.choice(
        [f"{thing[0].upper()}{thing[1:]} on a plain background.", f"The image shows {thing}.", f"It is {thing}."]
    )
    return [
        (what_shape, shape, shape_sentence, "shape"),
        (what_color, color, color_sentence, "colour"),
        (rng.choice(DESCRIBE), shape, describe, "describe"),
    ]


def build_train_vqa(data: EasyVqaSplit, n_items: int, rng: random.Random) -> list[dict[str, Any]]:
    """About ``n_items`` training items (each question in both forms): half yes/no in contrastive
    pairs, the other half what-shape, what-colour and describe questions in equal shares, on the
    images those pairs use."""
    attributes = image_attributes(data.questions)
    pairs = contrastive_yes_no(attributes, max(1, n_items // 8), rng)
    items = []
    for image_id, question, short, sentence in pairs:
        items += both_forms(evqa_image_path("train", image_id), question, short, sentence, short)
    images = sorted({image_id for image_id, *_ in pairs})
    rng.shuffle(images)
    for k, image_id in enumerate(itertools.islice(itertools.cycle(images), max(1, n_items // 4))):
        question, short, sentence, kind = what_questions(image_id, attributes[image_id], rng)[k % 3]
        forms = both_forms(evqa_image_path("train", image_id), question, short, sentence, kind)
        items += forms[1:] if kind == "describe" else forms  # "Describe this image" wants no one word
    rng.shuffle(items)
    return [{"id": f"vqa-train-{i:05d}", **item} for i, item in enumerate(items)]


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
        count, rng = settings.counts[f"vqa_{split}"], settings.rng(f"vqa-{split}")
        items[split] = build_train_vqa(data, count, rng) if split == "train" else build_vqa(data, split, count, rng)
        copy_images(settings.out_dir, data, split, (int(Path(item["image"]).stem) for item in items[split]))
    return items
