"""Per-image time of each expert on CPU, images scaled to 640 px on the longer side.

Five images: three scikit-image photos (chelsea, coffee, astronaut), its scanned page, and a
rendered street sign. Each expert loads and warms up on the first image (reported apart), then
every image is described ``--repeats`` times with the cache bypassed; the best time is kept, so
other load on the machine inflates the figures as little as possible. Without CoCa weights the
CoCa row times the same architecture with random weights, which never emit the end token: it is
held to 12 tokens, the length of a typical COCO caption. The model's own caption
(``caption-adapter``) is timed on the pipeline `python app.py` loads on CPU: the shipped demo
adapter at its default precision (int8 weights).

    python -m benchmarks.experts [--size 640] [--repeats 3] [--threads 2] [--experts ocr-easyocr,tagger]
"""

from __future__ import annotations

import argparse
import os
import time

import skimage.data
import torch
from PIL import Image, ImageDraw, ImageFont

import llama_adapter
from experts import AdapterCaptioner, CocaCaptioner, Expert, default_registry, registry_for

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def street_sign() -> Image.Image:
    img = Image.new("RGB", (1280, 720), (30, 90, 40))
    draw = ImageDraw.Draw(img)
    draw.text((80, 200), "Platform 4", font=ImageFont.truetype(FONT, 120), fill="white")
    draw.text((80, 400), "Trains to Harbour Street", font=ImageFont.truetype(FONT, 80), fill="white")
    return img


def images(size: int) -> dict[str, Image.Image]:
    raw = {
        "chelsea": Image.fromarray(skimage.data.chelsea()),
        "coffee": Image.fromarray(skimage.data.coffee()),
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "page": Image.fromarray(skimage.data.page()).convert("RGB"),
        "sign": street_sign(),
    }
    out = {}
    for name, img in raw.items():
        scale = size / max(img.size)
        out[name] = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    return out


def experts_to_time(names: list[str] | None) -> list[Expert]:
    own = not names or AdapterCaptioner.name in names
    registry = registry_for(llama_adapter.load()) if own else default_registry()
    chosen = [registry.get(n) for n in names] if names else list(registry)
    out = []
    for expert in chosen:
        status = expert.availability()
        if status.available:
            out.append(expert)
        elif isinstance(expert, CocaCaptioner):
            out.append(CocaCaptioner(expert.model_name, expert.tag, random_weights=True, max_tokens=12))
        else:
            print(f"skipping {expert.name}: {status}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=640, help="longer image side in pixels (default: 640)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per image; the best is kept (default: 3)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--experts", help="comma-separated expert names (default: every available one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pictures = images(args.size)
    chosen = experts_to_time(args.experts.split(",") if args.experts else None)
    print(f"torch threads {args.threads}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"images at {args.size} px: " + ", ".join(f"{n} {im.width}×{im.height}" for n, im in pictures.items()))
    header = f"{'expert':22} {'load+1st':>9} " + " ".join(f"{n:>9}" for n in pictures) + f" {'mean':>9}"
    print(header)
    for expert in chosen:
        first = next(iter(pictures.values()))
        started = time.perf_counter()
        expert.describe(first)
        warmup = time.perf_counter() - started
        times = []
        for img in pictures.values():
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                expert.describe(img)
                best = min(best, time.perf_counter() - started)
            times.append(best)
        cells = " ".join(f"{t:9.3f}" for t in times)
        print(f"{expert.name:22} {warmup:9.2f} {cells} {sum(times) / len(times):9.3f}", flush=True)
    print("seconds per image; load+1st = model load and first call on the first image")


if __name__ == "__main__":
    main()
