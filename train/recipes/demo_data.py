"""Offline, seed-reproducible training data for the demo model (easy-VQA shapes, drawn scenes,
rendered text for the OCR expert, text-only instructions). ``python -m train.recipes.demo_data
--out data/demo --seed 0 [--scale 0.05]``

Everything is made on this machine from the ``easy-vqa`` package, Pillow and the Debian DejaVu
fonts; the same seed (and the same Pillow, FreeType and DejaVu versions, recorded in the manifest)
gives the same bytes. Every kind has a train and a held-out split; no held-out image is used in
train, and held-out OCR answers and instructions never occur in train.

Layout of ``--out`` (all image paths in the files are relative to ``--out``, the folder that holds
the files, which is where the training loader looks for them)::

    captions_{train,heldout}.tsv      url<TAB>caption, the official LLaMA-Adapter pretrain shape
    vqa_{train,heldout}.json          LLaVA conversations on easy-VQA images, short and sentence answers
    ocr_{train,heldout}.json          LLaVA conversations on rendered signs, labels, receipts, ...
    instructions_{train,heldout}.json Alpaca {instruction, input, output} and text-only conversations
    images/easyvqa/{train,heldout}/<easy-VQA id>.png, images/scenes/..., images/ocr/...
    examples/*.png + examples/examples.json   images and questions for the app and README
    manifest.json                     seed, scale, counts, sha256 of every data file, version

Answer styles: an easy-VQA question with " Answer with one word." gets easy-VQA's one-word answer,
the plain question a short sentence. An OCR question gets the exact text read (e.g. ``$12.40``);
with " Answer in a full sentence." it gets a sentence. ``short_answer`` always holds the exact
answer used for scoring.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import easy_vqa  # never `import test`: easy-vqa also installs an unrelated top-level package by that name
import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features
from tqdm import tqdm

log = logging.getLogger(__name__)

GENERATOR = "train.recipes.demo_data"
VERSION = "1.0.0"

T = TypeVar("T")
RGB = tuple[int, int, int]

DEFAULT_COUNTS: dict[str, int] = {
    "captions_easyvqa_train": 3500,
    "captions_easyvqa_heldout": 400,
    "captions_scenes_train": 2500,
    "captions_scenes_heldout": 300,
    "vqa_train": 6000,
    "vqa_heldout": 600,
    "ocr_train": 800,
    "ocr_heldout": 200,
    "instructions_train": 600,
    "instructions_heldout": 100,
}
SPLITS = ("train", "heldout")
DATA_FILES = tuple(
    f"{kind}_{split}.{'tsv' if kind == 'captions' else 'json'}"
    for kind in ("captions", "vqa", "ocr", "instructions")
    for split in SPLITS
)
SHORT_SUFFIX = " Answer with one word."
SENTENCE_SUFFIX = " Answer in a full sentence."

# easy-VQA's palette: the exact RGB values its images use (measured on its shapes), so drawn scenes
# look like easy-VQA and one colour word means one colour across both sources.
COLORS: dict[str, RGB] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
SHAPES = ("circle", "rectangle", "triangle")


# -- small helpers -------------------------------------------------------------------------------------


def sub_rng(seed: int, name: str) -> random.Random:
    """An independent stream per part: a change in one part's counts leaves the others' bytes alone.
    String seeds go through SHA-512, so they do not depend on PYTHONHASHSEED."""
    return random.Random(f"{seed}/{name}")


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def round_robin(streams: Sequence[Iterator[T]]) -> Iterator[T]:
    """One item from each stream in turn, dropping streams as they run out."""
    active = list(streams)
    while active:
        for stream in list(active):
            try:
                yield next(stream)
            except StopIteration:
                active.remove(stream)


def join_words(words: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def allocate(total: int, weights: dict[str, float], caps: dict[str, int]) -> dict[str, int]:
    """Split ``total`` over the keys by weight (largest remainders), never above a key's cap; a
    shortfall goes to the keys with room left, heaviest first."""
    exact = {k: total * w / sum(weights.values()) for k, w in weights.items()}
    quota = {k: min(caps[k], math.floor(v)) for k, v in exact.items()}
    by_remainder = sorted(weights, key=lambda k: (-(exact[k] - math.floor(exact[k])), k))
    by_weight = sorted(weights, key=lambda k: (-weights[k], k))
    for key in itertools.chain(by_remainder, itertools.cycle(by_weight)):
        left = total - sum(quota.values())
        if left <= 0 or all(quota[k] >= caps[k] for k in weights):
            break
        if quota[key] < caps[key]:
            quota[key] += 1
    return quota


def relative_luminance(color: RGB) -> float:
    def channel(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in color)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: RGB, b: RGB) -> float:
    """WCAG contrast ratio (1–21); 4.5 is the bar for readable body text."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def png_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def unique_image(make: Callable[[], tuple[Image.Image, T]], taken: set[str]) -> tuple[Image.Image, T]:
    """An (image, what it shows) from ``make`` whose pixels differ from every image in ``taken`` (the
    train split's), so that no held-out image also appears in train."""
    for _ in range(100):
        image, about = make()
        if png_digest(image) not in taken:
            return image, about
    raise RuntimeError("could not draw an image that differs from the train split's")


# -- easy-VQA ------------------------------------------------------------------------------------------

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


def load_easy_vqa(split: str) -> EasyVqaSplit:
    """easy-VQA's train split becomes ours; its test split becomes held-out."""
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


# -- captions: easy-VQA images and drawn scenes --------------------------------------------------------

SINGLE_CAPTIONS = (
    "A {thing} on a light background.",
    "An image of a {thing}.",
    "A simple picture of a {thing}.",
    "There is a {thing} in the image.",
    "A single {thing} on a plain background.",
    "A {thing} drawn on a plain, light background.",
)
SIDE_BY_SIDE = (
    "A {a} to the left of a {b}.",
    "A {b} to the right of a {a}.",
    "A {a} on the left and a {b} on the right.",
    "Two shapes: a {a} on the left and a {b} on the right.",
)
ONE_ABOVE_OTHER = (
    "A {a} above a {b}.",
    "A {b} below a {a}.",
    "A {a} at the top and a {b} at the bottom.",
    "Two shapes: a {a} at the top and a {b} at the bottom.",
)
TWINS = {
    "horizontal": ("Two {thing}s side by side.", "Two {thing}s next to each other."),
    "vertical": ("Two {thing}s, one above the other.", "Two {thing}s stacked one above the other."),
}


def evqa_captions(
    data: EasyVqaSplit, split: str, n: int, rng: random.Random
) -> tuple[list[tuple[str, str]], list[int]]:
    """Caption rows for ``n`` easy-VQA images whose colour and shape the answers pin down, and their ids."""
    attributes = image_attributes(data.questions)
    log.info(
        "easy-VQA %s: colour and shape known from the answers for %d of %d images",
        split,
        len(attributes),
        len(data.image_paths),
    )
    ids = sorted(rng.sample(sorted(attributes), min(n, len(attributes))))
    rows = []
    for image_id in ids:
        color, shape = attributes[image_id]
        rows.append((evqa_image_path(split, image_id), rng.choice(SINGLE_CAPTIONS).format(thing=f"{color} {shape}")))
    return rows, ids


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in output pixels


def shape_box(
    shape: str, cell: tuple[float, float, float, float], side: float, rng: random.Random
) -> tuple[float, float, float, float]:
    """A box for ``shape`` with its longer side ``side``, placed at random inside ``cell``.
    Rectangles keep an aspect of at most 0.8, so that no "rectangle" looks like a square."""
    if shape == "circle":
        w = h = side
    elif shape == "triangle":
        w, h = side, side * rng.uniform(0.8, 1.0)
    else:
        w, h = side, side * rng.uniform(0.45, 0.8)
        if rng.random() < 0.3:
            w, h = h, w
    x0 = rng.uniform(cell[0] + 2, cell[2] - 2 - w)
    y0 = rng.uniform(cell[1] + 2, cell[3] - 2 - h)
    return (x0, y0, x0 + w, y0 + h)


def draw_scene(shapes: Sequence[Shape], size: int, background: RGB) -> Image.Image:
    """Drawn at 4× and box-filtered down: smooth edges, a look that differs from easy-VQA's hard
    ones, so the adapter does not learn shapes from one rendering only."""
    k = 4
    image = Image.new("RGB", (size * k, size * k), background)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0, x1, y1 = (v * k for v in s.box)
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=COLORS[s.color])
        elif s.shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=COLORS[s.color])
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=COLORS[s.color])
    return image.reduce(k)


def random_scene(rng: random.Random) -> tuple[Image.Image, str]:
    """A 64–224 px scene of one or two shapes in easy-VQA's colours, and a caption of what was drawn.
    Two shapes go in the two halves of the image, so "left of"/"above" hold by construction."""
    size = rng.randint(64, 224)
    background = tuple(rng.randint(225, 255) for _ in range(3))
    if rng.random() < 0.6:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        frac = rng.uniform(0.22, 0.65)
        s = Shape(shape, color, shape_box(shape, (0, 0, size, size), frac * size, rng))
        size_word = ""
        if rng.random() < 0.5:
            size_word = "small " if frac < 0.3 else "large " if frac > 0.55 else ""
        caption = rng.choice(SINGLE_CAPTIONS).format(thing=f"{size_word}{color} {shape}")
        return draw_scene([s], size, background), caption
    arrangement = rng.choice(("horizontal", "vertical"))
    half = size / 2
    cells = (
        [(0, 0, half, size), (half, 0, size, size)]
        if arrangement == "horizontal"
        else [(0, 0, size, half), (0, half, size, size)]
    )
    shapes = []
    for cell in cells:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        shapes.append(Shape(shape, color, shape_box(shape, cell, rng.uniform(0.2, 0.42) * size, rng)))
    first, second = (f"{s.color} {s.shape}" for s in shapes)
    if first == second:
        caption = rng.choice(TWINS[arrangement]).format(thing=first)
    else:
        templates = SIDE_BY_SIDE if arrangement == "horizontal" else ONE_ABOVE_OTHER
        caption = rng.choice(templates).format(a=first, b=second)
    return draw_scene(shapes, size, background), caption


def build_scenes(
    out_dir: Path, split: str, n: int, rng: random.Random, taken: set[str]
) -> tuple[list[tuple[str, str]], set[str]]:
    """Scene images under images/scenes/<split>/ and their caption rows; returns the pixel digests."""
    folder = out_dir / "images" / "scenes" / split
    folder.mkdir(parents=True, exist_ok=True)
    rows, digests = [], set()
    for i in tqdm(range(n), desc=f"scenes {split}", unit="img", disable=None):
        image, caption = unique_image(lambda: random_scene(rng), taken)
        name = f"images/scenes/{split}/{i:05d}.png"
        image.save(out_dir / name, format="PNG")
        digests.add(png_digest(image))
        rows.append((name, caption))
    return rows, digests


def write_captions(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    for image, caption in rows:
        if any(c in image + caption for c in '\t\n\r"'):
            raise ValueError(f"caption row would break the TSV: {image!r} {caption!r}")
    lines = ["url\tcaption"] + [f"{image}\t{caption}" for image, caption in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- OCR: rendered text --------------------------------------------------------------------------------

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FAMILIES: dict[str, tuple[str, str]] = {
    "sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"),
    "sans-condensed": ("DejaVuSansCondensed.ttf", "DejaVuSansCondensed-Bold.ttf"),
    "sans-oblique": ("DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf"),
    "serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"),
    "serif-condensed": ("DejaVuSerifCondensed.ttf", "DejaVuSerifCondensed-Bold.ttf"),
    "serif-italic": ("DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf"),
    "mono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"),
}
MIN_FONT_PX = 20  # DejaVu capitals are 0.73 em tall: 20 px gives ≥ 14 px text
MIN_TEXT_PX = 14
MIN_CANVAS, MAX_CANVAS = 160, 480
MAX_ROTATION = 5.0


@cache
def load_font(family: str, bold: bool, size: int) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / FONT_FAMILIES[family][int(bold)]
    if not path.is_file():
        # Another font would change every rendered byte: better to stop than to differ silently.
        raise FileNotFoundError(f"{path} is missing: install the Debian package fonts-dejavu-core/-extra")
    font = ImageFont.truetype(str(path), size)
    left, top, right, bottom = font.getbbox("H")
    if bottom - top < MIN_TEXT_PX:
        raise ValueError(f"{path.name} at {size} px draws capitals {bottom - top} px tall, below {MIN_TEXT_PX}")
    return font


def used_fonts() -> dict[str, str]:
    return {name: sha256_file(FONT_DIR / name) for pair in FONT_FAMILIES.values() for name in pair}


@dataclass(frozen=True)
class Row:
    """One line of text: ``right`` is drawn flush right on the same line (a receipt's price)."""

    text: str
    right: str = ""
    scale: float = 1.0
    bold: bool = False
    align: str = "center"
    rule_above: bool = False

    @property
    def line(self) -> str:
        return f"{self.text} {self.right}" if self.right else self.text


@dataclass(frozen=True)
class Layout:
    """What a text image shows and the choices its look is drawn from. The first ``band_rows`` rows
    sit on a coloured band (a badge's "HELLO", a tag's "SALE")."""

    rows: tuple[Row, ...]
    families: tuple[str, ...]
    schemes: tuple[tuple[RGB, RGB], ...]  # (background, text) pairs
    sizes: tuple[int, int]
    band_rows: int = 0
    band_schemes: tuple[tuple[RGB, RGB], ...] = ()
    min_aspect: float = 0.0
    border: bool = True

    @property
    def text(self) -> str:
        return "\n".join(row.line for row in self.rows)


WHITE, NEAR_BLACK = (255, 255, 255), (20, 20, 20)
SIGN_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    ((0, 122, 61), WHITE),
    ((200, 16, 46), WHITE),
    ((0, 61, 165), WHITE),
    (WHITE, NEAR_BLACK),
    ((255, 205, 0), NEAR_BLACK),
    ((25, 25, 25), WHITE),
    ((110, 60, 30), WHITE),
    ((240, 120, 0), (0, 0, 0)),
    (WHITE, (190, 0, 0)),
    ((20, 40, 90), (255, 220, 0)),
)
LABEL_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    ((250, 240, 215), (60, 30, 10)),
    (WHITE, NEAR_BLACK),
    ((205, 170, 120), (30, 20, 10)),
    ((220, 235, 250), (10, 40, 90)),
    ((225, 245, 220), (20, 70, 20)),
    ((255, 230, 235), (130, 0, 30)),
    ((40, 40, 40), (250, 230, 160)),
)
PAPER_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    (WHITE, (30, 30, 30)),
    ((250, 248, 240), (45, 45, 45)),
    ((245, 245, 245), (60, 60, 70)),
)
TAG_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    (WHITE, NEAR_BLACK),
    ((255, 235, 60), NEAR_BLACK),
    ((255, 200, 150), (120, 0, 0)),
    ((210, 245, 210), (0, 50, 0)),
    (WHITE, (170, 0, 0)),
)
BAND_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    ((200, 16, 46), WHITE),
    ((0, 61, 165), WHITE),
    ((0, 110, 55), WHITE),
    ((100, 40, 140), WHITE),
    ((20, 20, 20), (255, 220, 0)),
)
PLATE_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    ((245, 245, 245), NEAR_BLACK),
    ((250, 210, 0), NEAR_BLACK),
    (WHITE, (10, 30, 110)),
)


def pick_scheme(schemes: Sequence[tuple[RGB, RGB]], rng: random.Random) -> tuple[RGB, RGB]:
    """A scheme with the background nudged a little for variety, kept only if the text still
    contrasts at least 4.5:1 with it."""
    background, text = rng.choice(schemes)
    nudged = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in background)
    if contrast(nudged, text) >= 4.5:
        return nudged, text
    if contrast(background, text) < 4.5:
        raise ValueError(f"colour scheme {background} on {text} is too faint to read")
    return background, text


@dataclass
class Measured:
    fonts: list[ImageFont.FreeTypeFont]
    heights: list[int]
    width: int
    height: int
    pad: int
    gap: int


def measure(layout: Layout, family: str, size: int) -> Measured:
    fonts = [load_font(family, row.bold, max(MIN_FONT_PX, round(size * row.scale))) for row in layout.rows]
    pad = round(0.6 * size)
    gap = round(0.3 * size)  # between rows
    widths, heights = [], []
    for row, font in zip(layout.rows, fonts):
        ascent, descent = font.getmetrics()
        heights.append(ascent + descent)
        width = font.getlength(row.text)
        if row.right:
            width += font.getlength("   ") + font.getlength(row.right)
        widths.append(math.ceil(width))
    width = max(widths) + 2 * pad
    height = sum(heights) + gap * (len(heights) - 1) + 2 * pad + (pad if layout.band_rows else 0)
    return Measured(fonts, heights, max(width, math.ceil(layout.min_aspect * height)), height, pad, gap)


def rotated_size(width: int, height: int, degrees: float) -> tuple[int, int]:
    a = math.radians(abs(degrees))
    return (
        math.ceil(width * math.cos(a) + height * math.sin(a)),
        math.ceil(width * math.sin(a) + height * math.cos(a)),
    )


def draw_panel(layout: Layout, m: Measured, rng: random.Random) -> Image.Image:
    background, ink = pick_scheme(layout.schemes, rng)
    panel = Image.new("RGBA", (m.width, m.height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(panel)
    radius = rng.choice((0, m.pad // 3, m.pad // 2))
    draw.rounded_rectangle((0, 0, m.width - 1, m.height - 1), radius=radius, fill=background)
    y = m.pad
    band_ink = ink
    if layout.band_rows:
        band_background, band_ink = pick_scheme(layout.band_schemes, rng)
        band_height = m.pad + sum(m.heights[: layout.band_rows]) + m.gap * (layout.band_rows - 1) + m.pad // 2
        draw.rounded_rectangle((0, 0, m.width - 1, band_height + radius), radius=radius, fill=band_background)
        draw.rectangle((0, band_height, m.width - 1, band_height + radius), fill=background)
    elif layout.border and rng.random() < 0.7:
        inset = max(3, m.pad // 4)
        draw.rounded_rectangle(
            (inset, inset, m.width - 1 - inset, m.height - 1 - inset),
            radius=max(0, radius - inset),
            outline=ink,
            width=max(2, m.pad // 6),
        )
    for i, (row, font, height) in enumerate(zip(layout.rows, m.fonts, m.heights)):
        if i == layout.band_rows and layout.band_rows:
            y += m.pad  # the band's lower padding and the gap below it
        color = band_ink if i < layout.band_rows else ink
        width = font.getlength(row.text)
        x = m.pad if row.align == "left" else (m.width - width) / 2
        if row.rule_above:
            rule_y = y - m.gap / 2
            for x0 in range(m.pad, m.width - m.pad, 8):
                draw.line((x0, rule_y, min(x0 + 4, m.width - m.pad), rule_y), fill=ink, width=2)
        draw.text((x, y), row.text, font=font, fill=color)
        if row.right:
            draw.text((m.width - m.pad - font.getlength(row.right), y), row.right, font=font, fill=color)
        y += height + m.gap
    return panel


def render_layout(layout: Layout, rng: random.Random) -> Image.Image:
    """The layout's text on a panel, turned by up to 5°, on a plain surface, with mild noise:
    160–480 px a side. The font shrinks (never below 20 px) until the panel fits."""
    family = rng.choice(layout.families)
    size = rng.randint(*layout.sizes)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    while True:
        m = measure(layout, family, size)
        turned = rotated_size(m.width, m.height, angle)
        if max(turned) + 16 <= MAX_CANVAS:
            break
        if size <= MIN_FONT_PX:
            raise ValueError(f"text too long for a {MAX_CANVAS} px image: {layout.text!r}")
        size = max(MIN_FONT_PX, int(size * 0.9))
    panel = draw_panel(layout, m, rng).rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    width = min(MAX_CANVAS, max(MIN_CANVAS, panel.width + 2 * rng.randint(8, 40)))
    height = min(MAX_CANVAS, max(MIN_CANVAS, panel.height + 2 * rng.randint(8, 40)))
    surface = tuple(rng.randint(40, 235) for _ in range(3))
    image = Image.new("RGB", (width, height), surface)
    image.paste(panel, (rng.randint(0, width - panel.width), rng.randint(0, height - panel.height)), panel)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    if rng.random() < 0.7:
        # One noise value per pixel for all three channels (luminance grain): it looks like sensor
        # noise and keeps the PNGs a third of the size of independent per-channel noise.
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(1.5, 4.0), (height, width, 1))
        pixels = np.asarray(image, dtype=np.float32) + noise
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image


# Word lists. Each list is split per seed into train (80 %) and held-out (20 %) words, so held-out
# images show words never seen in train and their answers cannot have been memorised.
SIGN_PHRASES = (
    "EXIT", "STOP", "OPEN", "CLOSED", "PUSH", "PULL", "ENTRANCE", "NO ENTRY", "NO PARKING", "KEEP OUT",
    "DANGER", "CAUTION", "WET FLOOR", "QUIET PLEASE", "TOILETS", "RECEPTION", "INFORMATION", "TICKETS",
    "PHARMACY", "LIBRARY", "MUSEUM", "HOSPITAL", "POLICE", "HOTEL", "TAXI", "BUS STOP", "PARKING", "ONE WAY",
    "GIVE WAY", "SLOW", "SCHOOL ZONE", "FIRE EXIT", "EMERGENCY EXIT", "STAFF ONLY", "PRIVATE", "LOADING ZONE",
    "NO SMOKING", "DO NOT ENTER", "WELCOME", "SALE", "SOLD OUT", "OPEN 24 HOURS", "BACK IN 5 MINUTES",
    "CASH ONLY", "FREE WIFI", "LIFT", "STAIRS", "ARRIVALS", "DEPARTURES", "BAGGAGE CLAIM", "CHECK IN",
    "LOST AND FOUND", "FIRST AID", "CAFE", "RESTAURANT", "GARDEN CENTRE", "PLAYGROUND", "BEACH", "ZOO",
    "POST OFFICE", "BANK", "CINEMA", "THEATRE", "STADIUM", "STATION", "AIRPORT", "HARBOUR", "TOWN HALL",
    "CAR WASH", "BARBER", "FLORIST", "BOOKSHOP", "PET SHOP", "GYM", "SWIMMING POOL", "CAMPSITE", "VIEWPOINT",
    "PICNIC AREA", "DEAD END", "ROAD CLOSED", "DETOUR", "KEEP LEFT", "KEEP RIGHT", "NO CYCLING",
    "DOGS ON LEADS", "MIND THE GAP", "PLEASE WAIT HERE", "NOW OPEN", "COMING SOON", "HOT FOOD", "FARM SHOP",
    "VISITOR CENTRE", "BOX OFFICE", "WAITING ROOM", "LEFT LUGGAGE", "NO DIVING", "SLIPPERY ROAD",
)  # fmt: skip
NUMBERED_SIGNS = (
    ("PLATFORM {n}", 1, 24), ("GATE {l}{n}", 1, 40), ("ROOM {n}", 100, 499), ("FLOOR {n}", 1, 15),
    ("EXIT {n}", 1, 60), ("AISLE {n}", 1, 30), ("BUS {n}", 1, 199), ("ROUTE {n}", 1, 99),
    ("SPEED LIMIT {n}", 2, 7),
)  # fmt: skip
STREET_NAMES = (
    "ELM", "OAK", "MAPLE", "CEDAR", "PINE", "BIRCH", "WILLOW", "CHESTNUT", "ASH", "HAZEL", "RIVER", "LAKE",
    "HILL", "PARK", "CHURCH", "MILL", "BRIDGE", "MARKET", "HIGH", "KING", "QUEEN", "VICTORIA", "SPRING",
    "MEADOW", "ORCHARD", "OCEAN", "FOREST", "VALLEY", "SUNSET", "ROSE", "LILY", "IVY", "FERN", "CLOVER",
    "WINDSOR", "YORK", "LINCOLN", "FRANKLIN", "WASHINGTON", "JEFFERSON", "MADISON", "HAMILTON", "CARTER",
    "BADGER", "HERON", "SPARROW", "JUNIPER", "POPLAR", "LAUREL", "WALNUT",
)  # fmt: skip
STREET_KINDS = (
    "STREET", "AVENUE", "ROAD", "LANE", "DRIVE", "WAY", "PLACE", "BOULEVARD", "COURT", "CLOSE", "TERRACE",
    "CRESCENT",
)  # fmt: skip
TOWNS = (
    "ASHFORD", "BRADFIELD", "CLAYTON", "DENTON", "EASTWOOD", "FAIRVIEW", "GLENMORE", "HALIFAX", "IRVINE",
    "KENDAL", "LANGLEY", "MARLOW", "NEWPORT", "OAKHAM", "PENRITH", "REDDING", "SALEM", "THORNBURY", "UPTON",
    "WESTBURY", "BARNSTON", "CROMWELL", "DOVER", "EVERTON", "FROME", "GRANTHAM", "HOLBROOK", "KESWICK",
    "LUDLOW", "MORPETH", "NORWICH", "PRESTON", "RIPON", "SELBY", "TAUNTON", "WHITBY",
)  # fmt: skip


@dataclass(frozen=True)
class Product:
    name: str
    plural: bool
    unit: str  # "g" or "ml": how its pack size is given

    @property
    def noun(self) -> str:
        return self.name.lower()

    def costs(self, price: str) -> str:
        return f"The {self.noun} {'cost' if self.plural else 'costs'} {price}"

    def cost_question(self) -> str:
        return f"How much {'do' if self.plural else 'does'} the {self.noun} cost?"


_SINGULAR_DRY = (
    "SUGAR", "FLOUR", "RICE", "SALT", "COFFEE", "TEA", "COCOA", "HONEY", "JAM", "PASTA", "BARLEY", "SEMOLINA",
    "COUSCOUS", "QUINOA", "BUTTER", "CHEESE", "YOGURT", "CEREAL", "GRANOLA", "MUESLI", "CINNAMON", "PAPRIKA",
    "CUMIN", "GINGER", "GARLIC", "BASIL", "OREGANO", "THYME", "ROSEMARY", "NUTMEG", "TURMERIC", "PEPPER",
    "CHOCOLATE", "FUDGE", "TOFFEE", "POPCORN", "BREAD", "RYE BREAD", "CHICKEN", "BEEF", "SALMON", "TUNA",
    "LETTUCE", "CABBAGE", "BROCCOLI", "SPINACH", "CELERY", "MAYONNAISE", "PEANUT BUTTER", "MARGARINE",
    "BAKING SODA", "YEAST", "OATMEAL", "MUSTARD", "CORNFLOUR", "PORRIDGE",
)  # fmt: skip
_PLURAL_DRY = (
    "OATS", "BEANS", "LENTILS", "PEAS", "RAISINS", "ALMONDS", "WALNUTS", "PEANUTS", "CASHEWS", "HAZELNUTS",
    "CHICKPEAS", "NOODLES", "CRACKERS", "COOKIES", "BISCUITS", "APPLES", "BANANAS", "ORANGES", "LEMONS",
    "LIMES", "PEARS", "PLUMS", "GRAPES", "CHERRIES", "PEACHES", "TOMATOES", "POTATOES", "CARROTS", "ONIONS",
    "MUSHROOMS", "EGGS", "SUNFLOWER SEEDS", "DATES", "FIGS", "PRUNES", "OLIVES", "PICKLES", "CRISPS",
)  # fmt: skip
_LIQUID = (
    "MILK", "OLIVE OIL", "VINEGAR", "SOY SAUCE", "ORANGE JUICE", "APPLE JUICE", "LEMONADE", "WATER", "CREAM",
    "KETCHUP", "SYRUP", "MAPLE SYRUP", "COCONUT MILK", "BROTH", "TOMATO SOUP", "SUNFLOWER OIL",
)  # fmt: skip
PRODUCTS = (
    tuple(Product(n, False, "g") for n in _SINGULAR_DRY)
    + tuple(Product(n, True, "g") for n in _PLURAL_DRY)
    + tuple(Product(n, False, "ml") for n in _LIQUID)
)
PACK_SIZES = {
    "g": ("100 g", "200 g", "250 g", "400 g", "500 g", "750 g", "1 kg", "1.5 kg", "2 kg", "5 kg"),
    "ml": ("250 ml", "330 ml", "500 ml", "750 ml", "1 L", "1.5 L", "2 L"),
}
LABEL_WORDS = ("ORGANIC", "PREMIUM", "CLASSIC", "NATURAL")
STORE_WORDS = (
    "SUNNY", "FRESH", "GOLDEN", "HAPPY", "CORNER", "RIVERSIDE", "HILLTOP", "CITY", "VILLAGE", "FAMILY",
    "BRIGHT", "BLUE SKY", "NORTHSIDE", "LUCKY", "SMART", "DAILY", "URBAN", "COUNTRY", "PARKSIDE", "SEASIDE",
    "LAKESIDE", "EVERGREEN", "HARVEST", "SUNRISE", "MOONLIGHT", "PRIMROSE", "GREENWAY", "STARLIGHT",
    "HOMETOWN", "BLUEBELL",
)  # fmt: skip
STORE_KINDS = ("MARKET", "GROCER", "MART", "STORE", "FOODS", "PANTRY", "DELI", "SHOP", "SUPERMARKET", "GROCERY")
PRICE_UNITS = ("each", "per kg", "per lb", "per pack")
FIRST_NAMES = (
    "Maria", "James", "Aisha", "Chen", "Olivia", "Mateo", "Priya", "Lukas", "Sofia", "Omar", "Hannah", "Kenji",
    "Fatima", "Diego", "Emma", "Noah", "Amara", "Ivan", "Chloe", "Ravi", "Yuki", "Elena", "Samuel", "Leila",
    "Marco", "Nadia", "Oscar", "Ingrid", "Tariq", "Grace", "Hugo", "Mei", "Daniel", "Zara", "Felix", "Anika",
    "Pablo", "Sara", "Tomas", "Keiko", "Liam", "Nina", "Arjun", "Clara", "Jonas", "Rosa", "Malik", "Julia",
    "Andre", "Freya", "Kofi", "Lena", "Mohammed", "Ana", "Victor", "Ines", "Sven", "Alice", "Ibrahim", "Lucia",
    "Ethan", "Maya", "Dmitri", "Eva", "Rahul", "Nora", "Carlos", "Isla", "Hassan", "Lara", "Peter", "Rina",
    "Adam", "Wanda", "Yusuf", "Greta", "Bruno", "Esther", "Kai", "Miriam",
)  # fmt: skip
LAST_NAMES = (
    "Lopez", "Smith", "Khan", "Wang", "Garcia", "Patel", "Rossi", "Kim", "Nguyen", "Okafor", "Silva", "Brown",
    "Tanaka", "Novak", "Cohen", "Dubois", "Jensen", "Haddad", "Mendes", "Kowalski", "Andersen", "Moreau",
    "Costa", "Fischer", "Yilmaz", "Murphy", "Schmidt", "Sato", "Reyes", "Torres", "Ahmed", "Das", "Lee",
    "Walker", "Young", "Hughes", "Bianchi", "Santos", "Petrov", "Larsen", "Nakamura", "Obi", "Mensah", "Kaur",
    "Singh", "Park", "Choi", "Hoffmann", "Weber", "Turner", "Ward", "Grant", "Ellis", "Romero", "Castillo",
    "Vargas", "Lindqvist", "Osei", "Becker", "Moretti",
)  # fmt: skip
ROLES = (
    "Engineer", "Teacher", "Nurse", "Designer", "Manager", "Volunteer", "Librarian", "Chef", "Pilot", "Doctor",
    "Cashier", "Tour Guide", "Editor", "Analyst", "Architect", "Pharmacist", "Technician", "Receptionist",
    "Photographer", "Musician", "Scientist", "Accountant", "Driver", "Gardener", "Baker", "Mechanic",
    "Electrician", "Translator", "Coach", "Curator",
)  # fmt: skip
BADGE_HEADERS = ("VISITOR", "STAFF", "GUEST", "SPEAKER", "VOLUNTEER", "PRESS", "CREW")
PLATE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: plates leave them out as they look like 1 and 0
PLATE_PATTERNS = ("LLL DDDD", "LL DD LLL", "DDD LLL", "LLL-DDD", "L DDD LL", "DLLL DDD")


@dataclass(frozen=True)
class OcrVocab:
    """One split's words."""

    signs: tuple[str, ...]
    streets: tuple[str, ...]
    towns: tuple[str, ...]
    products: tuple[Product, ...]
    stores: tuple[str, ...]
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    roles: tuple[str, ...]


def split_vocab(rng: random.Random, heldout_fraction: float = 0.2) -> dict[str, OcrVocab]:
    lists: dict[str, tuple] = {
        "signs": SIGN_PHRASES,
        "streets": STREET_NAMES,
        "towns": TOWNS,
        "products": PRODUCTS,
        "stores": STORE_WORDS,
        "first_names": FIRST_NAMES,
        "last_names": LAST_NAMES,
        "roles": ROLES,
    }
    parts: dict[str, dict[str, tuple]] = {"train": {}, "heldout": {}}
    for name, words in lists.items():
        order = list(words)
        rng.shuffle(order)
        cut = max(1, round(len(order) * heldout_fraction))
        parts["heldout"][name], parts["train"][name] = tuple(order[:cut]), tuple(order[cut:])
    return {split: OcrVocab(**parts[split]) for split in SPLITS}


QA = tuple[str, str, str]  # question, exact short answer, sentence answer


@dataclass(frozen=True)
class OcrContent:
    source: str
    layout: Layout
    qas: tuple[QA, ...]


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def wrap_sign(phrase: str, rng: random.Random) -> list[str]:
    """Long phrases go on two lines, broken where the halves are closest in length."""
    words = phrase.split()
    if len(words) < 2 or (len(phrase) <= 12 and rng.random() < 0.7):
        return [phrase]
    cut = min(range(1, len(words)), key=lambda k: abs(len(" ".join(words[:k])) - len(" ".join(words[k:]))))
    return [" ".join(words[:cut]), " ".join(words[cut:])]


def sign_content(lines: Sequence[str], qas: Sequence[QA], schemes: Sequence[tuple[RGB, RGB]] = SIGN_SCHEMES):
    layout = Layout(
        rows=tuple(Row(line, bold=True) for line in lines),
        families=("sans", "sans-condensed", "serif", "serif-condensed", "mono"),
        schemes=tuple(schemes),
        sizes=(30, 64),
    )
    return OcrContent("ocr-sign", layout, tuple(qas))


def sign_qas(text: str) -> list[QA]:
    return [
        ("What does the sign say?", text, f"The sign says {text}."),
        ("What is written on the sign?", text, f"The sign reads {text}."),
        ("What text is on the sign?", text, f"The sign says {text}."),
    ]


def random_sign(rng: random.Random, v: OcrVocab) -> OcrContent:
    r = rng.random()
    if r < 0.2:
        name = f"{rng.choice(v.streets)} {rng.choice(STREET_KINDS)}"
        if rng.random() < 0.4:
            name = name.title()
        qas = [
            ("What street is this?", name, f"This is {name}."),
            ("What is the street name on the sign?", name, f"The street name is {name}."),
        ]
        return sign_content([name], qas, SIGN_SCHEMES[:4])
    if r < 0.35:
        template, lo, hi = rng.choice(NUMBERED_SIGNS)
        n = rng.randint(lo, hi) * (10 if template.startswith("SPEED") else 1)
        text = template.format(n=n, l=rng.choice("ABCDEF"))
        return sign_content(wrap_sign(text, rng), sign_qas(text))
    if r < 0.45:
        town, km = rng.choice(v.towns), rng.randint(2, 150)
        lines = [town, f"{km} km"] if rng.random() < 0.6 else [f"{town} {km} km"]
        text = " ".join(lines)
        qas = [
            (f"How far is it to {town.title()}?", f"{km} km", f"It is {km} km to {town.title()}."),
            ("Which town does the sign point to?", town, f"The sign points to {town}."),
        ] + sign_qas(text)
        return sign_content(lines, qas, SIGN_SCHEMES[:4])
    phrase = rng.choice(v.signs)
    return sign_content(wrap_sign(phrase, rng), sign_qas(phrase))


def label_content(product: Product, word: str | None, pack: str | None) -> OcrContent:
    rows = ([Row(word, scale=0.6)] if word else []) + [Row(product.name, bold=True)]
    rows += [Row(pack, scale=0.7)] if pack else []
    full = " ".join(r.text for r in rows)
    qas = [
        ("What is written on the label?", full, f"The label says {full}."),
        ("What does the label say?", full, f"The label says {full}."),
        ("What product is named on the label?", product.name, f"The label is for {product.name}."),
    ]
    if pack:
        measure_word = "weight" if product.unit == "g" else "volume"
        qas.append((f"What {measure_word} is printed on the label?", pack, f"The label says {pack}."))
    layout = Layout(
        rows=tuple(rows),
        families=("serif", "serif-condensed", "sans", "sans-condensed", "serif-italic"),
        schemes=LABEL_SCHEMES,
        sizes=(30, 56),
    )
    return OcrContent("ocr-label", layout, tuple(qas))


def random_label(rng: random.Random, v: OcrVocab) -> OcrContent:
    product = rng.choice(v.products)
    word = rng.choice(LABEL_WORDS) if rng.random() < 0.35 else None
    pack = rng.choice(PACK_SIZES[product.unit]) if rng.random() < 0.6 else None
    return label_content(product, word, pack)


def receipt_content(store: str, items: Sequence[tuple[Product, int]]) -> OcrContent:
    total = money(sum(cents for _, cents in items))
    rows = [Row(store, scale=1.15, bold=True)]
    rows += [Row(p.name, money(cents), align="left") for p, cents in items]
    rows.append(Row("TOTAL", total, bold=True, align="left", rule_above=True))
    qas: list[QA] = [
        ("What is the total on the receipt?", total, f"The total is {total}."),
        ("How much is the total on the receipt?", total, f"The total on the receipt is {total}."),
        ("What is the name of the store on the receipt?", store, f"The receipt is from {store}."),
    ]
    for product, cents in items:
        qas.append((product.cost_question(), money(cents), f"{product.costs(money(cents))}."))
    layout = Layout(
        rows=tuple(rows),
        families=("mono", "sans-condensed", "mono"),  # mono twice: most till receipts are monospaced
        schemes=PAPER_SCHEMES,
        sizes=(20, 24),
        border=False,
    )
    return OcrContent("ocr-receipt", layout, tuple(qas))


def random_receipt(rng: random.Random, v: OcrVocab) -> OcrContent:
    store = f"{rng.choice(v.stores)} {rng.choice(STORE_KINDS)}"
    products = rng.sample(v.products, rng.randint(3, 5))
    return receipt_content(store, [(p, rng.randint(49, 1999)) for p in products])


def price_tag_content(product: Product, cents: int, unit: str | None, sale: bool) -> OcrContent:
    price = money(cents)
    rows = ([Row("SALE", bold=True)] if sale else []) + [Row(product.name, bold=True), Row(price, scale=1.6, bold=True)]
    rows += [Row(unit, scale=0.6)] if unit else []
    per = f" {unit}" if unit else ""
    qas = (
        ("What is the price on the tag?", price, f"The price is {price}{per}."),
        (product.cost_question(), price, f"{product.costs(price)}{per}."),
        ("What item is the price tag for?", product.name, f"The price tag is for {product.name}."),
    )
    layout = Layout(
        rows=tuple(rows),
        families=("sans", "sans-condensed", "serif", "mono"),
        schemes=TAG_SCHEMES,
        sizes=(24, 40),
        band_rows=int(sale),
        band_schemes=BAND_SCHEMES[:1],
    )
    return OcrContent("ocr-price", layout, qas)


def random_price_tag(rng: random.Random, v: OcrVocab) -> OcrContent:
    unit = rng.choice(PRICE_UNITS) if rng.random() < 0.5 else None
    return price_tag_content(rng.choice(v.products), rng.randint(29, 2999), unit, rng.random() < 0.25)


def badge_content(name: str, header: str | None = None, role: str | None = None) -> OcrContent:
    """A "HELLO my name is" sticker (header HELLO), or a name badge with an optional header band and role."""
    if header == "HELLO":
        rows = [Row("HELLO", scale=1.3, bold=True), Row("my name is", scale=0.6), Row(name, scale=1.4)]
        band_rows = 2
    else:
        rows = ([Row(header, bold=True)] if header else []) + [Row(name, scale=1.1, bold=True)]
        rows += [Row(role, scale=0.75)] if role else []
        band_rows = int(bool(header))
    qas: list[QA] = [
        ("What is the name on the badge?", name, f"The name on the badge is {name}."),
        ("According to the badge, what is this person's name?", name, f"The badge says the name is {name}."),
    ]
    if role:
        qas.append(("What job title is on the badge?", role, f"The job title on the badge is {role}."))
    layout = Layout(
        rows=tuple(rows),
        families=("sans", "sans-oblique", "serif", "serif-italic", "sans-condensed"),
        schemes=((WHITE, NEAR_BLACK), ((250, 250, 240), (10, 30, 110))),
        sizes=(24, 36),
        band_rows=band_rows,
        band_schemes=BAND_SCHEMES,
        border=False,
    )
    return OcrContent("ocr-badge", layout, tuple(qas))


def random_badge(rng: random.Random, v: OcrVocab) -> OcrContent:
    first = rng.choice(v.first_names)
    r = rng.random()
    if r < 0.35:
        return badge_content(first, "HELLO")
    name = f"{first} {rng.choice(v.last_names)}"
    if r < 0.7:
        return badge_content(name, role=rng.choice(v.roles))
    return badge_content(name, rng.choice(BADGE_HEADERS), rng.choice(v.roles) if rng.random() < 0.5 else None)


def plate_content(code: str) -> OcrContent:
    qas = (
        ("What is the licence plate number?", code, f"The licence plate number is {code}."),
        ("What is the license plate number?", code, f"The license plate number is {code}."),
        ("What does the number plate say?", code, f"The number plate says {code}."),
    )
    layout = Layout(
        rows=(Row(code, bold=True),),
        families=("mono", "sans-condensed", "sans"),
        schemes=PLATE_SCHEMES,
        sizes=(36, 60),
        min_aspect=3.2,
    )
    return OcrContent("ocr-plate", layout, qas)


def random_plate(rng: random.Random, v: OcrVocab) -> OcrContent:
    pattern = rng.choice(PLATE_PATTERNS)
    code = "".join(
        rng.choice(PLATE_LETTERS) if c == "L" else str(rng.randint(0, 9)) if c == "D" else c for c in pattern
    )
    return plate_content(code)


OCR_KINDS: dict[str, tuple[float, Callable[[random.Random, OcrVocab], OcrContent]]] = {
    "sign": (0.25, random_sign),
    "label": (0.15, random_label),
    "receipt": (0.20, random_receipt),
    "price": (0.15, random_price_tag),
    "badge": (0.13, random_badge),
    "plate": (0.12, random_plate),
}


def ocr_conversation(question: str, short: str, sentence: str, rng: random.Random) -> tuple[list[dict], str]:
    """Mostly the exact text (what reading is scored on), sometimes a sentence, asked for explicitly."""
    if rng.random() < 0.7:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": short}], short
    return [{"from": "human", "value": question + SENTENCE_SUFFIX}, {"from": "gpt", "value": sentence}], short


def build_ocr(
    out_dir: Path,
    split: str,
    n: int,
    vocab: OcrVocab,
    rng: random.Random,
    forbidden: set[str],
    taken: set[str],
) -> tuple[list[dict[str, Any]], set[str]]:
    """OCR items and images under images/ocr/<split>/. Questions whose answer (case aside) is in
    ``forbidden`` — the train answers, for held-out — are never asked. Returns the items and the
    pixel digests of their images."""
    folder = out_dir / "images" / "ocr" / split
    folder.mkdir(parents=True, exist_ok=True)
    kinds = sorted(OCR_KINDS)
    weights = [OCR_KINDS[k][0] for k in kinds]
    items, digests = [], set()
    for i in tqdm(range(n), desc=f"ocr {split}", unit="img", disable=None):
        for _ in range(200):
            content = OCR_KINDS[rng.choices(kinds, weights)[0]][1](rng, vocab)
            allowed = [qa for qa in content.qas if qa[1].casefold() not in forbidden]
            if allowed:
                break
        else:
            raise RuntimeError(f"no OCR question with an unseen answer after 200 tries ({split})")
        question, short, sentence = rng.choice(allowed)
        conversations, short = ocr_conversation(question, short, sentence, rng)
        image, _ = unique_image(lambda layout=content.layout: (render_layout(layout, rng), None), taken)
        name = f"images/ocr/{split}/{i:05d}.png"
        image.save(out_dir / name, format="PNG")
        digests.add(png_digest(image))
        items.append(
            {
                "id": f"ocr-{split}-{i:05d}",
                "image": name,
                "text": content.layout.text,
                "conversations": conversations,
                "short_answer": short,
                "source": content.source,
            }
        )
    return items, digests


# -- text-only instructions ----------------------------------------------------------------------------

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")  # fmt: skip
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth")  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
LIST_TOPICS: dict[str, tuple[str, ...]] = {
    "colours": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray"),
    "animals": ("dog", "cat", "horse", "cow", "sheep", "goat", "pig", "rabbit", "lion", "tiger", "elephant",
                "giraffe", "zebra", "monkey", "bear", "wolf", "fox", "deer", "kangaroo", "koala", "panda",
                "camel", "dolphin", "whale", "shark", "owl", "eagle", "penguin", "frog", "turtle"),
    "fruits": ("apple", "banana", "orange", "pear", "grape", "cherry", "strawberry", "lemon", "lime", "mango",
               "pineapple", "peach", "plum", "kiwi", "watermelon", "apricot", "raspberry", "blueberry",
               "coconut", "papaya", "fig"),
    "shapes": ("circle", "square", "triangle", "rectangle", "oval", "pentagon", "hexagon", "octagon", "star",
               "heart"),
}  # fmt: skip
WORDS = (
    "apple", "banana", "orange", "grape", "lemon", "cherry", "melon", "peach", "tiger", "zebra", "horse",
    "rabbit", "monkey", "turtle", "dolphin", "eagle", "garden", "window", "pencil", "paper", "school",
    "teacher", "yellow", "purple", "circle", "square", "triangle", "planet", "rocket", "river", "mountain",
    "forest", "island", "bridge", "castle", "kitchen", "bottle", "candle", "ladder", "basket", "button",
    "rainbow", "thunder", "winter", "summer", "autumn", "spring", "friend", "family", "doctor", "market",
    "letter", "number", "music", "guitar", "piano", "camera", "picture", "flower", "butter", "cookie",
    "sugar", "coffee", "jacket", "pocket", "blanket", "pillow", "mirror", "wallet", "ticket", "signal",
    "engine", "anchor", "puzzle", "shadow", "silver", "happy", "quiet", "simple", "travel",
)  # fmt: skip
SENTENCES = (
    "The cat sleeps on the warm mat.", "We walked to the park after lunch.",
    "My brother plays the guitar every evening.", "The red bus stops at the corner.",
    "Birds sing early in the morning.", "She reads a book before bed.", "The train leaves at nine in the morning.",
    "Paris is the capital of France.", "Please close the door quietly.",
    "The children built a sandcastle on the beach.", "Tom and Anna visited the museum.",
    "The blue whale is the largest animal.", "Water boils at one hundred degrees Celsius.",
    "We need milk, eggs and bread.", "The shop opens at eight.", "A triangle has three sides.",
    "The moon shines at night.", "He painted the fence green.", "Our teacher gave us a short test.",
    "The dog chased the ball across the garden.", "I like apples more than oranges.",
    "The library is next to the bank.", "Turn left at the traffic lights.", "The soup is too hot to eat.",
    "Grandma bakes bread on Sundays.", "The river flows into the sea.", "Sam found a coin under the sofa.",
    "The plane landed safely in Rome.", "Every spring the trees grow new leaves.",
    "Mia wrote a letter to her friend.", "The stars look bright tonight.",
    "Please wash your hands before dinner.", "The yellow taxi waited outside the hotel.",
    "Lucy counted ten ducks on the pond.", "The baker sells fresh bread every morning.",
    "Our team won the final match.", "The kitten is hiding under the bed.", "Dad fixed the old bicycle.",
    "Snow covered the quiet village.", "The museum opens on Monday.",
)  # fmt: skip
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("left", "right"), ("open", "closed"), ("fast", "slow"),
    ("happy", "sad"), ("day", "night"), ("tall", "short"), ("full", "empty"), ("wet", "dry"), ("hard", "soft"),
    ("early", "late"), ("in", "out"), ("on", "off"), ("yes", "no"), ("high", "low"), ("thick", "thin"),
    ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("clean", "dirty"), ("heavy", "light"),
    ("push", "pull"), ("buy", "sell"), ("win", "lose"), ("always", "never"), ("first", "last"),
    ("inside", "outside"), ("above", "below"), ("before", "after"), ("true", "false"), ("cheap", "expensive"),
    ("easy", "difficult"), ("question", "answer"), ("remember", "forget"), ("start", "finish"),
    ("top", "bottom"), ("front", "back"), ("near", "far"), ("north", "south"), ("east", "west"),
    ("asleep", "awake"), ("maximum", "minimum"), ("increase", "decrease"), ("give", "take"), ("laugh", "cry"),
    ("love", "hate"), ("arrive", "leave"), ("entrance", "exit"), ("young", "old"), ("wide", "narrow"),
)  # fmt: skip
DEFINITIONS = (
    ("a circle", "A circle is a round shape where every point on its edge is the same distance from the centre."),
    ("a triangle", "A triangle is a shape with three straight sides and three corners."),
    ("a square", "A square is a shape with four equal straight sides and four right angles."),
    ("a rectangle", "A rectangle is a shape with four straight sides and four right angles; its opposite sides "
     "are equal in length."),
    ("a pentagon", "A pentagon is a flat shape with five straight sides."),
    ("a hexagon", "A hexagon is a flat shape with six straight sides."),
    ("an octagon", "An octagon is a flat shape with eight straight sides, like a stop sign."),
    ("a noun", "A noun is a word that names a person, place, thing or idea."),
    ("a verb", "A verb is a word that describes an action or a state, such as run or be."),
    ("an adjective", "An adjective is a word that describes a noun, such as red or tall."),
    ("a planet", "A planet is a large body that moves around a star, as the Earth moves around the Sun."),
    ("a mammal", "A mammal is a warm-blooded animal with hair or fur that feeds its young with milk."),
    ("a reptile", "A reptile is a cold-blooded animal with scaly skin, such as a snake, a lizard or a turtle."),
    ("an insect", "An insect is a small animal with six legs and a body in three parts, such as an ant or a bee."),
    ("a thermometer", "A thermometer is a tool that measures temperature."),
    ("a calendar", "A calendar is a chart that shows the days, weeks and months of a year."),
    ("a dictionary", "A dictionary is a book that lists words in alphabetical order and explains their meanings."),
    ("a map", "A map is a drawing of an area that shows where places are."),
    ("a library", "A library is a place where books are kept for people to read or borrow."),
    ("a bridge", "A bridge is a structure that carries a road or path over a river, a road or a valley."),
    ("an island", "An island is a piece of land with water all around it."),
    ("a volcano", "A volcano is an opening in the Earth's surface where melted rock, ash and gas come out."),
    ("a desert", "A desert is a very dry area of land that gets little rain."),
    ("a rainbow", "A rainbow is an arc of colours in the sky, made when sunlight shines through raindrops."),
    ("a receipt", "A receipt is a piece of paper that shows what was bought and how much was paid."),
    ("a price tag", "A price tag is a small label on an item that shows how much it costs."),
    ("the alphabet", "The alphabet is the set of letters used to write a language; English has 26 letters."),
    ("a vowel", "A vowel is one of the letters a, e, i, o and u, and sometimes y."),
    ("a synonym", "A synonym is a word that means the same or nearly the same as another word, like big and large."),
    ("an antonym", "An antonym is a word that means the opposite of another word, like hot and cold."),
    ("an even number", "An even number is a whole number that can be divided by 2 with nothing left over, such as "
     "2, 4 or 6."),
    ("an odd number", "An odd number is a whole number that leaves 1 when divided by 2, such as 1, 3 or 5."),
    ("a sum", "A sum is the result of adding numbers together; the sum of 2 and 3 is 5."),
    ("a product in arithmetic", "A product is the result of multiplying numbers; the product of 3 and 4 is 12."),
    ("a minute", "A minute is a unit of time equal to 60 seconds."),
    ("an hour", "An hour is a unit of time equal to 60 minutes."),
    ("a week", "A week is a period of seven days."),
    ("a kilogram", "A kilogram is a unit of mass equal to 1,000 grams."),
    ("a kilometre", "A kilometre is a unit of length equal to 1,000 metres."),
    ("a litre", "A litre is a unit of volume equal to 1,000 millilitres."),
    ("a shadow", "A shadow is a dark area made when an object blocks light."),
    ("photosynthesis", "Photosynthesis is the process plants use to make food from sunlight, water and carbon "
     "dioxide, giving off oxygen."),
    ("a magnet", "A magnet is an object that pulls iron and steel towards it."),
    ("a telescope", "A telescope is an instrument that makes faraway objects, such as stars and planets, look "
     "closer."),
    ("a sentence", "A sentence is a group of words that expresses a complete thought."),
)  # fmt: skip
FACTS = (
    ("How many days are there in a week?", "There are seven days in a week."),
    ("How many months are there in a year?", "There are twelve months in a year."),
    ("How many hours are there in a day?", "There are 24 hours in a day."),
    ("How many minutes are there in an hour?", "There are 60 minutes in an hour."),
    ("How many seconds are there in a minute?", "There are 60 seconds in a minute."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("How many letters are there in the English alphabet?", "The English alphabet has 26 letters."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is London."),
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon."),
    ("What is the capital of Greece?", "The capital of Greece is Athens."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("What is the capital of Argentina?", "The capital of Argentina is Buenos Aires."),
    ("What is the capital of Ireland?", "The capital of Ireland is Dublin."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("How many planets are there in our solar system?", "There are eight planets in our solar system."),
    ("What is the star at the centre of our solar system?", "The Sun is the star at the centre of our solar system."),
    ("At what temperature does water freeze at sea level?", "Water freezes at 0 degrees Celsius (32 degrees "
     "Fahrenheit)."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius (212 degrees "
     "Fahrenheit)."),
    ("What gas do plants take in to make their food?", "Plants take in carbon dioxide to make their food."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What colour is fresh snow?", "Fresh snow is white."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
    ("What is the largest animal on Earth?", "The blue whale is the largest animal on Earth."),
    ("What do bees make?", "Bees make honey and wax."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many continents are there?", "There are seven continents."),
    ("What is H2O?", "H2O is the chemical formula for water."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("Which direction does the Sun rise in?", "The Sun rises in the east."),
)  # fmt: skip
SMALL_TALK = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to know?"),
    ("Good morning!", "Good morning! How can I help you today?"),
    ("Good afternoon.", "Good afternoon! What can I do for you?"),
    ("Good evening.", "Good evening! How can I help?"),
    ("How are you?", "I'm doing well, thank you for asking. How can I help you?"),
    ("Thank you!", "You're welcome! Let me know if you need anything else."),
    ("Thanks for your help.", "You're welcome. I'm glad I could help."),
    ("What can you do?", "I can describe pictures, answer questions about them, read text in images such as signs, "
     "labels and receipts, and help with simple questions like sums, spelling and facts."),
    ("Who are you?", "I am a helpful assistant. I can look at images, read the text in them and answer your "
     "questions."),
    ("Goodbye!", "Goodbye! Have a great day."),
    ("See you later.", "See you later! Take care."),
    ("Can you help me?", "Of course. What do you need help with?"),
    ("Tell me a fun fact.", "An octopus has three hearts."),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("I'm bored.", "You could read a book, go for a walk, draw a picture or learn a new word today."),
    ("Nice to meet you.", "Nice to meet you too! How can I help?"),
    ("Sorry, I made a mistake.", "No problem. Everyone makes mistakes. Shall we try again?"),
    ("Have a nice day!", "Thank you, you too!"),
    ("Good night.", "Good night! Sleep well."),
    ("Are you a robot?", "I am an AI assistant, a computer program rather than a person."),
    ("Can you see images?", "Yes. When you share an image, I can describe it, answer questions about it and read "
     "the text in it."),
    ("Can you read text in pictures?", "Yes. I can read printed text in an image, such as a sign, a label, a price "
     "tag or a receipt."),
    ("Do you speak English?", "Yes, I understand and write English."),
)  # fmt: skip
POLYGON_SIDES = {"triangle": 3, "square": 4, "rectangle": 4, "pentagon": 5, "hexagon": 6, "heptagon": 7, "octagon": 8}
PAINT_MIXES = (
    ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"), ("red", "white", "pink"),
    ("black", "white", "gray"),
)  # fmt: skip
COLOURED_THINGS = (
    ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("grass", "green"), ("coal", "black"),
    ("a lemon", "yellow"), ("a carrot", "orange"), ("a lime", "green"), ("milk", "white"),
)  # fmt: skip
PROBLEM_NAMES = ("Tom", "Anna", "Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Max", "Ella")
PROBLEM_THINGS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells", "balloons")

Candidate = tuple[str, dict[str, Any]]  # (content key, item): items with one key are one piece of content


def alpaca(instruction: str, output: str, input_text: str = "") -> dict[str, Any]:
    return {"instruction": instruction, "input": input_text, "output": output}


def chat(*turns: str) -> dict[str, Any]:
    roles = itertools.cycle(("human", "gpt"))
    return {"conversations": [{"from": role, "value": text} for role, text in zip(roles, turns)]}


def sample_unique(make: Callable[[random.Random], Candidate], want: int, rng: random.Random) -> list[Candidate]:
    """Up to ``want`` candidates with distinct keys from a random maker (stops after 20× tries)."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(want * 20):
        if len(seen) >= want:
            break
        key, item = make(rng)
        seen.setdefault(key, item)
    return list(seen.items())


def arithmetic(rng: random.Random) -> Candidate:
    op = rng.choice(("add", "sub", "mul", "story-add", "story-sub"))
    if op == "add":
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        q = rng.choice((f"What is {a} + {b}?", f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Calculate {a} + {b}."))
        return f"add:{a}:{b}", alpaca(q, f"{a} + {b} = {a + b}.")
    if op == "sub":
        a = rng.randint(1, 60)
        b = rng.randint(0, a)
        q = rng.choice((f"What is {a} - {b}?", f"What is {a} minus {b}?", f"Subtract {b} from {a}."))
        return f"sub:{a}:{b}", alpaca(q, f"{a} - {b} = {a - b}.")
    if op == "mul":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        q = rng.choice((f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"What is {a} multiplied by {b}?"))
        return f"mul:{a}:{b}", alpaca(q, f"{a} times {b} is {a * b}.")
    name, things = rng.choice(PROBLEM_NAMES), rng.choice(PROBLEM_THINGS)
    if op == "story-add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        q = f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?"
        return f"story-add:{a}:{b}:{things}", alpaca(
            q, f"{name} has {a + b} {things} now, because {a} + {b} = {a + b}."
        )
    a = rng.randint(4, 30)
    b = rng.randint(1, a - 2)  # at least 2 left, so the answer stays plural
    q = f"{name} has {a} {things} and gives away {b}. How many {things} are left?"
    return f"story-sub:{a}:{b}:{things}", alpaca(q, f"{a - b} {things} are left, because {a} - {b} = {a - b}.")


def counting(rng: random.Random) -> Candidate:
    kind = rng.choice(("up", "down", "letters", "words", "vowels", "items"))
    if kind in ("up", "down"):
        a = rng.randint(0, 30)
        b = a + rng.randint(3, 9)
        numbers = list(range(a, b + 1))
        if kind == "down":
            return f"down:{a}:{b}", alpaca(f"Count down from {b} to {a}.", ", ".join(map(str, numbers[::-1])) + ".")
        return f"up:{a}:{b}", alpaca(f"Count from {a} to {b}.", ", ".join(map(str, numbers)) + ".")
    if kind == "letters":
        w = rng.choice(WORDS)
        return f"letters:{w}", alpaca(
            f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.'
        )
    if kind == "vowels":
        w = rng.choice(WORDS)
        n = sum(c in "aeiou" for c in w)
        noun = "vowel" if n == 1 else "vowels"
        return f"vowels:{w}", alpaca(
            f'How many vowels (a, e, i, o, u) are in the word "{w}"?', f'The word "{w}" has {n} {noun}.'
        )
    if kind == "words":
        s = rng.choice(SENTENCES)
        return f"words:{s}", alpaca("How many words are in this sentence?", f"It has {len(s.split())} words.", s)
    topic = rng.choice(sorted(LIST_TOPICS))
    chosen = rng.sample(LIST_TOPICS[topic], rng.randint(2, 7))
    return f"items:{','.join(chosen)}", alpaca(
        "How many items are in this list?", f"There are {len(chosen)} items.", ", ".join(chosen)
    )


def spelling(rng: random.Random) -> Candidate:
    kind = rng.choice(("spell", "first", "last", "reverse", "after", "before", "sort"))
    w = rng.choice(WORDS)
    if kind == "spell":
        return f"spell:{w}", alpaca(f'Spell the word "{w}".', f'"{w}" is spelled {"-".join(w.upper())}.')
    if kind == "first":
        return f"first:{w}", alpaca(
            f'What is the first letter of "{w}"?', f'The first letter of "{w}" is {w[0].upper()}.'
        )
    if kind == "last":
        return f"last:{w}", alpaca(
            f'What is the last letter of "{w}"?', f'The last letter of "{w}" is {w[-1].upper()}.'
        )
    if kind == "reverse":
        return f"reverse:{w}", alpaca(f'Write the word "{w}" backwards.', w[::-1])
    if kind in ("after", "before"):
        i = rng.randint(0, 24) + (kind == "before")
        letter = chr(ord("A") + i)
        other = chr(ord(letter) + (1 if kind == "after" else -1))
        return f"{kind}:{letter}", alpaca(
            f"What letter comes {kind} {letter} in the alphabet?", f"{other} comes {kind} {letter} in the alphabet."
        )
    chosen = rng.sample(WORDS, rng.randint(3, 5))
    return f"sort:{','.join(sorted(chosen))}", alpaca(
        "Put these words in alphabetical order.", ", ".join(sorted(chosen)), ", ".join(chosen)
    )


def listing(rng: random.Random) -> Candidate:
    kind = rng.choice(("topic", "topic", "days", "months", "day-next", "month-next", "month-nth"))
    if kind == "topic":
        topic = rng.choice(sorted(LIST_TOPICS))
        n = rng.randint(2, 5)
        chosen = rng.sample(LIST_TOPICS[topic], n)
        verb = rng.choice(("List", "Name"))
        answer = join_words(chosen)
        return f"topic:{','.join(sorted(chosen))}", alpaca(
            f"{verb} {NUMBER_WORDS[n]} {topic}.", answer[0].upper() + answer[1:] + "."
        )
    if kind == "days":
        return "days", alpaca("List the days of the week.", join_words(DAYS) + ".")
    if kind == "months":
        return "months", alpaca("List the months of the year.", join_words(MONTHS) + ".")
    if kind == "day-next":
        i = rng.randrange(7)
        if rng.random() < 0.5:
            return f"day-after:{i}", alpaca(
                f"What day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
            )
        return f"day-before:{i}", alpaca(f"What day comes before {DAYS[i]}?", f"{DAYS[i - 1]} comes before {DAYS[i]}.")
    i = rng.randrange(12)
    if kind == "month-nth":
        return f"month-nth:{i}", alpaca(
            f"What is the {ORDINALS[i]} month of the year?", f"The {ORDINALS[i]} month of the year is {MONTHS[i]}."
        )
    if rng.random() < 0.5:
        return f"month-after:{i}", alpaca(
            f"Which month comes after {MONTHS[i]}?", f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}."
        )
    return f"month-before:{i}", alpaca(
        f"Which month comes before {MONTHS[i]}?", f"{MONTHS[i - 1]} comes before {MONTHS[i]}."
    )


def opposites(rng: random.Random) -> list[Candidate]:
    out = []
    for a, b in OPPOSITES:
        word, other = (a, b) if rng.random() < 0.5 else (b, a)
        q = rng.choice((f'What is the opposite of "{word}"?', f'Give the opposite of the word "{word}".'))
        out.append((f"opposite:{a}:{b}", alpaca(q, f'The opposite of "{word}" is "{other}".')))
    return out


def definitions(rng: random.Random) -> list[Candidate]:
    out = []
    for term, text in DEFINITIONS:
        q = rng.choice((f"What is {term}?", f"Explain in one sentence what {term} is.", f"Define {term}."))
        out.append((f"define:{term}", alpaca(q, text)))
    return out


def rewriting(rng: random.Random) -> list[Candidate]:
    out = []
    for s in SENTENCES:
        out.append((f"upper:{s}", alpaca("Rewrite this sentence in capital letters.", s.upper(), s)))
        out.append((f"lower:{s}", alpaca("Rewrite this sentence in lowercase letters.", s.lower(), s.upper())))
        out.append((f"title:{s}", alpaca("Capitalise the first letter of every word.", s.title(), s.lower())))
    return out


def facts(rng: random.Random) -> list[Candidate]:
    return [(f"fact:{q}", alpaca(q, a)) for q, a in FACTS]


def small_talk(rng: random.Random) -> list[Candidate]:
    return [(f"talk:{q}", alpaca(q, a)) for q, a in SMALL_TALK]


def shapes_and_colours(rng: random.Random) -> list[Candidate]:
    qas: list[tuple[str, str, str]] = []  # (key, question, answer)
    for shape, n in POLYGON_SIDES.items():
        qas.append((f"sides:{shape}", f"How many sides does a {shape} have?", f"A {shape} has {n} sides."))
        qas.append((f"corners:{shape}", f"How many corners does a {shape} have?", f"A {shape} has {n} corners."))
        qas.append((f"round:{shape}", f"Is a {shape} round?", f"No, a {shape} has straight sides and corners."))
    qas.append(("round:circle", "Is a circle round?", "Yes, a circle is round."))
    qas.append(
        ("sides:circle", "How many straight sides does a circle have?", "None: the edge of a circle is one curve.")
    )
    for n, name in ((3, "triangle"), (5, "pentagon"), (6, "hexagon"), (8, "octagon")):
        qas.append((f"named:{n}", f"What is a flat shape with {NUMBER_WORDS[n]} straight sides called?", f"A {name}."))
    polygons = sorted(POLYGON_SIDES.items(), key=lambda kv: (kv[1], kv[0]))
    for (a, na), (b, nb) in itertools.combinations(polygons, 2):
        if na != nb:
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            answer = f"A {b if nb > na else a} has more sides: a {a} has {na} and a {b} has {nb}."
            qas.append((f"more:{a}:{b}", f"Which has more sides, a {first} or a {second}?", answer))
    for a, b, mix in PAINT_MIXES:
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        qas.append((f"mix:{a}:{b}", f"What colour do you get when you mix {first} and {second} paint?", f"{mix}."))
    for thing, colour in COLOURED_THINGS:
        qas.append((f"colour-of:{thing}", f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for word in list(COLORS) + list(SHAPES):
        kind = "colour" if word in COLORS else "shape"
        qas.append((f"kind:{word}", f'Is "{word}" a colour or a shape?', f'"{word.capitalize()}" is a {kind}.'))
    qas.append(
        (
            "square-vs-rectangle",
            "What is the difference between a square and a rectangle?",
            "Both have four straight sides and four right angles, but all four sides of a square are the same "
            "length, while a rectangle's length and width can differ.",
        )
    )
    return [(key, alpaca(question, answer[0].upper() + answer[1:])) for key, question, answer in qas]


def multi_turn(rng: random.Random) -> Candidate:
    kind = rng.choice(("sum", "spell", "greet", "days", "case"))
    if kind == "sum":
        a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 20)
        return f"chat-sum:{a}:{b}:{c}", chat(
            f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"Now add {c} to that.", f"{a + b} + {c} = {a + b + c}."
        )
    if kind == "spell":
        w = rng.choice(WORDS)
        return f"chat-spell:{w}", chat(
            f'Spell "{w}".', "-".join(w.upper()) + ".", "How many letters is that?", f'"{w}" has {len(w)} letters.'
        )
    if kind == "greet":
        (hello, reply), (question, answer) = rng.choice(SMALL_TALK[:5]), rng.choice(FACTS)
        return f"chat-greet:{hello}:{question}", chat(hello, reply, question, answer)
    if kind == "days":
        i = rng.randrange(7)
        return f"chat-days:{i}", chat(
            f"What day comes after {DAYS[i]}?",
            f"{DAYS[(i + 1) % 7]}.",
            "And the day after that?",
            f"{DAYS[(i + 2) % 7]}.",
        )
    w = rng.choice(WORDS)
    return f"chat-case:{w}", chat(f'Write "{w}" in capital letters.', w.upper(), "Now in lowercase.", w)


INSTRUCTION_KINDS: dict[str, tuple[float, Callable[..., Any], bool]] = {
    # name: (share, maker, whether the maker draws one random candidate per call)
    "arithmetic": (0.18, arithmetic, True),
    "counting": (0.10, counting, True),
    "spelling": (0.10, spelling, True),
    "listing": (0.10, listing, True),
    "opposites": (0.07, opposites, False),
    "definitions": (0.07, definitions, False),
    "rewriting": (0.08, rewriting, False),
    "facts": (0.08, facts, False),
    "small-talk": (0.04, small_talk, False),
    "shapes-colours": (0.08, shapes_and_colours, False),
    "multi-turn": (0.10, multi_turn, True),
}


def signature(item: dict[str, Any]) -> str:
    """What makes two instruction items the same prompt (case and spacing aside)."""
    if "conversations" in item:
        text = "\n".join(turn["value"] for turn in item["conversations"] if turn["from"] == "human")
    else:
        text = f"{item['instruction']}\n{item['input']}"
    return " ".join(text.lower().split())


def build_instructions(n_train: int, n_heldout: int, rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    """Candidates from every kind, one per content key and prompt; each kind's share is split
    between the splits, so a piece of content (a sum, a word, a fact) is in one split only."""
    total = n_train + n_heldout
    pools: dict[str, list[Candidate]] = {}
    seen: set[str] = set()
    for kind, (share, maker, random_maker) in INSTRUCTION_KINDS.items():
        candidates = sample_unique(maker, 2 * math.ceil(share * total) + 4, rng) if random_maker else maker(rng)
        pools[kind] = []
        for key, item in candidates:
            if signature(item) not in seen:
                seen.add(signature(item))
                pools[kind].append((key, {**item, "source": f"text-{kind}"}))
        rng.shuffle(pools[kind])
    quota = allocate(total, {k: v[0] for k, v in INSTRUCTION_KINDS.items()}, {k: len(v) for k, v in pools.items()})
    held_quota = allocate(n_heldout, dict(quota), quota)  # each kind's own share of held-out
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    for kind, pool in pools.items():
        splits["heldout"] += [item for _, item in pool[: held_quota[kind]]]
        splits["train"] += [item for _, item in pool[held_quota[kind] : quota[kind]]]
    for split, items in splits.items():
        rng.shuffle(items)
        splits[split] = [{"id": f"text-{split}-{i:05d}", **item} for i, item in enumerate(items)]
    return splits


# -- examples for the app and README -------------------------------------------------------------------


def shape_area(path: Path) -> int:
    """Pixels of an easy-VQA image that differ from its background (its corner pixel)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - pixels[0, 0]).sum(axis=-1) > 30).sum())


def build_examples(out_dir: Path, heldout: EasyVqaSplit, rng: random.Random) -> list[dict[str, str]]:
    """easy-VQA held-out shapes (copied), one drawn scene and text images drawn by the same code as
    the OCR data, each with a question and its answer."""
    folder = out_dir / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    attributes = image_attributes(heldout.questions)
    by_area = sorted(attributes, key=lambda i: (-shape_area(heldout.image_paths[i]), i))
    large = set(by_area[: len(by_area) // 4])  # a small shape is hard to see in the app's preview
    for shape, question in (
        ("circle", "What shape is in the image?"),
        ("triangle", "What color is the triangle?"),
        ("rectangle", "Is there a circle in the image?"),
    ):
        image_id = rng.choice([i for i, (_, s) in attributes.items() if s == shape and i in large])
        shutil.copyfile(heldout.image_paths[image_id], folder / f"{shape}.png")
        answer = {"circle": "circle", "triangle": attributes[image_id][0], "rectangle": "no"}[shape]
        examples.append({"image": f"{shape}.png", "question": question, "answer": answer})
    scene = [Shape("circle", "red", (14, 40, 62, 88)), Shape("triangle", "blue", (80, 36, 136, 90))]
    draw_scene(scene, 150, (246, 244, 238)).save(folder / "two_shapes.png", format="PNG")
    examples.append(
        {
            "image": "two_shapes.png",
            "question": "Describe the image.",
            "answer": "A red circle to the left of a blue triangle.",
        }
    )
    products = {p.name: p for p in PRODUCTS}
    texts = [
        ("exit_sign.png", sign_content(["EXIT"], sign_qas("EXIT"), [SIGN_SCHEMES[0]]), 0),
        ("open_sign.png", sign_content(["OPEN", "24 HOURS"], sign_qas("OPEN 24 HOURS"), [SIGN_SCHEMES[1]]), 0),
        (
            "receipt.png",
            receipt_content(
                "CORNER MARKET",
                [(products["MILK"], 240), (products["BREAD"], 310), (products["EGGS"], 425), (products["COFFEE"], 680)],
            ),
            0,
        ),
        ("label.png", label_content(products["SUGAR"], None, "1 kg"), 0),
        ("price_tag.png", price_tag_content(products["APPLES"], 199, "per kg", False), 1),
        ("name_badge.png", badge_content("Maria", "HELLO"), 0),
        ("licence_plate.png", plate_content("KT 4821"), 0),
    ]
    for name, content, qa_index in texts:
        render_layout(content.layout, rng).save(folder / name, format="PNG")
        question, answer, _ = content.qas[qa_index]
        examples.append({"image": name, "question": question, "answer": answer})
    write_json(folder / "examples.json", examples)
    return examples


# -- the whole data set --------------------------------------------------------------------------------


def prepare_out_dir(out_dir: Path) -> None:
    """Start from an empty folder. A folder this generator wrote before (it has our manifest) is
    cleared first, so that no file of an earlier, larger run lingers; any other non-empty folder
    is left alone."""
    if out_dir.exists() and any(out_dir.iterdir()):
        manifest = out_dir / "manifest.json"
        ours = manifest.is_file() and json.loads(manifest.read_text()).get("generator") == GENERATOR
        if not ours:
            raise FileExistsError(f"{out_dir} is not empty and was not written by {GENERATOR}; choose another --out")
        for name in (*DATA_FILES, "manifest.json"):
            (out_dir / name).unlink(missing_ok=True)
        for name in ("images", "examples"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def images_digest(out_dir: Path) -> tuple[int, str]:
    """Number of images and one sha256 over their paths and bytes, in path order."""
    digest = hashlib.sha256()
    paths = sorted(p for folder in ("images", "examples") for p in (out_dir / folder).rglob("*.png"))
    for path in paths:
        digest.update(path.relative_to(out_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return len(paths), digest.hexdigest()


def generate(out_dir: Path, seed: int = 0, scale: float = 1.0) -> dict[str, Path]:
    """Write the demo data set into ``out_dir`` (see the module docstring) and return its files by
    name (``captions_train``, ..., ``examples``, ``manifest``). ``scale`` multiplies every count
    (at least one of each), e.g. 0.05 for a quick run."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out_dir = Path(out_dir)
    counts = {name: scaled(n, scale) for name, n in DEFAULT_COUNTS.items()}
    prepare_out_dir(out_dir)
    start = time.perf_counter()
    easy = {split: load_easy_vqa(split) for split in SPLITS}

    captions: dict[str, list[tuple[str, str]]] = {}
    vqa: dict[str, list[dict[str, Any]]] = {}
    scene_digests: set[str] = set()
    for split in SPLITS:
        rows, caption_ids = evqa_captions(
            easy[split], split, counts[f"captions_easyvqa_{split}"], sub_rng(seed, f"captions-{split}")
        )
        vqa[split] = build_vqa(easy[split], split, counts[f"vqa_{split}"], sub_rng(seed, f"vqa-{split}"))
        used = sorted(set(caption_ids) | {int(Path(item["image"]).stem) for item in vqa[split]})
        folder = out_dir / "images" / "easyvqa" / split
        folder.mkdir(parents=True, exist_ok=True)
        for image_id in tqdm(used, desc=f"easy-VQA {split}", unit="img", disable=None):
            shutil.copyfile(easy[split].image_paths[image_id], folder / f"{image_id}.png")
        taken = scene_digests if split == "heldout" else set()
        scene_rows, digests = build_scenes(
            out_dir, split, counts[f"captions_scenes_{split}"], sub_rng(seed, f"scenes-{split}"), taken
        )
        scene_digests |= digests
        mixed = rows + scene_rows
        sub_rng(seed, f"caption-order-{split}").shuffle(mixed)
        captions[split] = mixed

    vocab = split_vocab(sub_rng(seed, "ocr-vocab"))
    ocr_train, train_digests = build_ocr(
        out_dir, "train", counts["ocr_train"], vocab["train"], sub_rng(seed, "ocr-train"), set(), set()
    )
    train_answers = {item["short_answer"].casefold() for item in ocr_train}
    ocr_heldout, _ = build_ocr(
        out_dir,
        "heldout",
        counts["ocr_heldout"],
        vocab["heldout"],
        sub_rng(seed, "ocr-heldout"),
        train_answers,
        train_digests,
    )
    ocr = {"train": ocr_train, "heldout": ocr_heldout}
    instructions = build_instructions(
        counts["instructions_train"], counts["instructions_heldout"], sub_rng(seed, "instructions")
    )
    examples = build_examples(out_dir, easy["heldout"], sub_rng(seed, "examples"))

    paths: dict[str, Path] = {}
    rows_per_file: dict[str, int] = {}
    for split in SPLITS:
        for kind, data in (("captions", captions), ("vqa", vqa), ("ocr", ocr), ("instructions", instructions)):
            path = out_dir / f"{kind}_{split}.{'tsv' if kind == 'captions' else 'json'}"
            if kind == "captions":
                write_captions(path, data[split])
            else:
                write_json(path, data[split])
            paths[f"{kind}_{split}"] = path
            rows_per_file[path.name] = len(data[split])
    paths["examples"] = out_dir / "examples" / "examples.json"
    rows_per_file["examples/examples.json"] = len(examples)
    n_images, image_sha = images_digest(out_dir)
    manifest = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": seed,
        "scale": scale,
        "counts": rows_per_file,
        "sha256": {name: sha256_file(out_dir / name) for name in sorted(rows_per_file)},
        "images": {"count": n_images, "sha256": image_sha},
        # Rendered bytes depend on these; a different one can change images but not the text files.
        "environment": {
            "pillow": PIL.__version__,
            "freetype": features.version("freetype2"),
            "numpy": np.__version__,
            "fonts": used_fonts(),
        },
    }
    paths["manifest"] = out_dir / "manifest.json"
    write_json(paths["manifest"], manifest)
    log.info(
        "Wrote %s in %.1f s: %s; %d images",
        out_dir,
        time.perf_counter() - start,
        ", ".join(f"{k} {v}" for k, v in rows_per_file.items()),
        n_images,
    )
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.recipes.demo_data",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="folder to write (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every count by this, e.g. 0.05 for a quick run (default 1)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        stream=sys.stdout,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for name, path in generate(args.out, args.seed, args.scale).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
