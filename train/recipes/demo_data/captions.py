"""Captions (the pretrain data): easy-VQA images described from what their answers pin down, and
drawn scenes of one or two shapes described from what was drawn."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from .common import COLORS, RGB, SHAPES, SPLITS, Settings, png_digest, unique_image
from .easyvqa import EasyVqaSplit, copy_images, evqa_image_path, image_attributes, load_easy_vqa

log = logging.getLogger(__name__)

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


def build(settings: Settings) -> dict[str, list[tuple[str, str]]]:
    """(image, caption) rows of both splits, easy-VQA images and drawn scenes shuffled together;
    no held-out scene has the pixels of a train scene."""
    captions: dict[str, list[tuple[str, str]]] = {}
    train_scenes: set[str] = set()
    count = settings.counts
    for split in SPLITS:
        data = load_easy_vqa(split)
        rows, image_ids = evqa_captions(
            data, split, count[f"captions_easyvqa_{split}"], settings.rng(f"captions-{split}")
        )
        copy_images(settings.out_dir, data, split, image_ids)
        scenes, digests = build_scenes(
            settings.out_dir, split, count[f"captions_scenes_{split}"], settings.rng(f"scenes-{split}"), train_scenes
        )
        train_scenes |= digests
        captions[split] = rows + scenes
        settings.rng(f"caption-order-{split}").shuffle(captions[split])
    return captions
