"""Images with a question and its answer for the app and the README: easy-VQA held-out shapes,
a drawn scene, and text images drawn by the same code as the OCR data."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .captions import Shape, draw_scene
from .common import write_json
from .drawing import render_layout
from .easyvqa import EasyVqaSplit, image_attributes
from .ocr import (
    PRODUCTS,
    SIGN_SCHEMES,
    badge_content,
    label_content,
    plate_content,
    price_tag_content,
    receipt_content,
    sign_content,
    sign_qas,
)


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
