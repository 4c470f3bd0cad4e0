"""A small synthetic data set in the official file layouts — coloured shapes with captions (TSV),
Alpaca instructions and LLaVA conversations (JSON), a data YAML — for smoke tests and the CPU
example. ``python -m train.synthetic DIR [--rows N] [--bad-rows]``."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, color: str, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    lo, hi = size // 5, size - size // 5
    if shape == "circle":
        d.ellipse((lo, lo, hi, hi), fill=COLORS[color])
    elif shape == "square":
        d.rectangle((lo, lo, hi, hi), fill=COLORS[color])
    else:
        d.polygon([(size // 2, lo), (lo, hi), (hi, hi)], fill=COLORS[color])
    return img


def write_synthetic(root: str | Path, rows: int = 24, bad_rows: bool = False, seed: int = 0) -> dict[str, Path]:
    """Write the data set into ``root``; returns the paths of its files. With ``bad_rows``, the
    files also hold a missing image, a corrupt image and an empty answer of each type."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, conversations = [], []
    for i in range(rows):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        name = f"images/{i:04d}.png"
        draw_shape(shape, color).save(root / name)
        captions.append((name, f"A {color} {shape} on a white background."))
        conversations.append(
            {
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat shape is in the picture?"},
                    {"from": "gpt", "value": f"A {shape}."},
                    {"from": "human", "value": "What colour is it?"},
                    {"from": "gpt", "value": color.capitalize() + "."},
                ],
            }
        )
    instructions = [
        {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}."}
        for a, b in ((rng.randrange(10), rng.randrange(10)) for _ in range(rows))
    ]
    instructions += [
        {"instruction": "Name the colour.", "input": word, "output": word.capitalize()} for word in list(COLORS)
    ]
    if bad_rows:
        (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        captions += [("images/missing.png", "A lost picture."), ("images/corrupt.png", "A broken picture.")]
        captions.append(("images/0000.png", ""))
        conversations.append({"image": "images/missing.png", "conversations": conversations[0]["conversations"]})
        instructions.append({"instruction": "Say nothing.", "input": "", "output": "   "})
    paths = {
        "captions": root / "captions.csv",
        "instructions": root / "instructions.json",
        "conversations": root / "conversations.json",
        "pretrain_yaml": root / "pretrain.yaml",
        "finetune_yaml": root / "finetune.yaml",
    }
    lines = ["url\tcaption"] + [f"{img}\t{cap}" for img, cap in captions]
    paths["captions"].write_text("\n".join(lines) + "\n")
    paths["instructions"].write_text(json.dumps(instructions, indent=1))
    paths["conversations"].write_text(json.dumps(conversations, indent=1))
    # The official data YAML shape: a META list of files.
    paths["pretrain_yaml"].write_text("META:\n  - captions.csv\n")
    paths["finetune_yaml"].write_text("META:\n  - instructions.json\n  - conversations.json\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.synthetic", description=__doc__.split("``")[0].strip())
    parser.add_argument("dir", help="folder to write into")
    parser.add_argument("--rows", type=int, default=24, help="images (and instructions) to make")
    parser.add_argument("--bad-rows", action="store_true", help="add a missing image, a corrupt one, empty answers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_synthetic(args.dir, args.rows, args.bad_rows, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
