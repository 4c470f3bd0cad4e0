"""Offline, seed-reproducible training data for the demo model (easy-VQA shapes, drawn scenes,
rendered text for the OCR expert, drawn pictures for the tagger, text-only instructions).
``python -m train.recipes.demo_data --out data/demo --seed 0 [--scale 0.05]``

Everything is made on this machine from the ``easy-vqa`` package, Pillow and the Debian DejaVu
fonts; the same seed (and the same Pillow, FreeType and DejaVu versions, recorded in the manifest)
gives the same bytes. Every kind has a train and a held-out split; no held-out image is used in
train, and held-out OCR answers and instructions never occur in train.

Layout of ``--out`` (all image paths in the files are relative to ``--out``, the folder that holds
the files, which is where the training loader looks for them)::

    captions_{train,heldout}.tsv      url<TAB>caption, the official LLaMA-Adapter pretrain shape
    vqa_{train,heldout}.json          LLaVA conversations on easy-VQA images, short and sentence answers
    ocr_{train,heldout}.json          LLaVA conversations on rendered signs, labels, receipts, ...
    photos_{train,heldout}.json       drawn pictures with random ImageNet tags and both answers
    instructions_{train,heldout}.json Alpaca {instruction, input, output} and text-only conversations
    images/easyvqa/{train,heldout}/<easy-VQA id>.png, images/scenes/..., images/ocr/..., images/photos/...
    examples/*.png + examples/examples.json   images and questions for the app and README
    manifest.json                     seed, scale, counts, sha256 of every data file, version

Answer styles: an easy-VQA question with " Answer with one word." gets easy-VQA's one-word answer,
the plain question a short sentence (a yes/no one starting "Yes," or "No,"). An OCR question, asked
as people ask it, gets a sentence holding the exact text (e.g. ``$12.40``) or the text alone. A
photo question gets a sentence naming the top tag (with the tags in the prompt) or an honest "I
can't tell" (without). ``short_answer`` always holds the exact answer used for scoring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import features

from . import captions, easyvqa, instructions, ocr, photos
from .common import SPLITS, Settings, scaled, sha256_file, write_json
from .drawing import used_fonts
from .examples import build_examples

log = logging.getLogger(__name__)

GENERATOR = "train.recipes.demo_data"
VERSION = "2.0.0"

DEFAULT_COUNTS: dict[str, int] = {
    "captions_easyvqa_train": 3500,
    "captions_easyvqa_heldout": 400,
    "captions_scenes_train": 2500,
    "captions_scenes_heldout": 300,
    "vqa_train": 9000,
    "vqa_heldout": 800,
    "ocr_train": 800,
    "ocr_heldout": 200,
    "photos_train": 500,
    "photos_heldout": 50,
    "instructions_train": 600,
    "instructions_heldout": 100,
}
# Each kind is a module whose ``build(settings)`` returns its rows of both splits, written to
# ``<kind>_<split>.<format>``. A new kind: its module, an entry here, its counts above.
KINDS: dict[str, tuple[Callable[[Settings], dict[str, list[Any]]], str]] = {
    "captions": (captions.build, "tsv"),
    "vqa": (easyvqa.build, "json"),
    "ocr": (ocr.build, "json"),
    "photos": (photos.build, "json"),
    "instructions": (instructions.build, "json"),
}
WRITERS: dict[str, Callable[[Path, Any], None]] = {"tsv": captions.write_captions, "json": write_json}
DATA_FILES = tuple(f"{kind}_{split}.{suffix}" for kind, (_, suffix) in KINDS.items() for split in SPLITS)


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
    settings = Settings(out_dir, seed, {name: scaled(n, scale) for name, n in DEFAULT_COUNTS.items()})
    prepare_out_dir(out_dir)
    start = time.perf_counter()
    data = {kind: build(settings) for kind, (build, _) in KINDS.items()}
    examples = build_examples(out_dir, easyvqa.load_easy_vqa("heldout"), settings.rng("examples"))

    paths: dict[str, Path] = {}
    rows_per_file: dict[str, int] = {}
    for split in SPLITS:
        for kind, (_, suffix) in KINDS.items():
            path = out_dir / f"{kind}_{split}.{suffix}"
            WRITERS[suffix](path, data[kind][split])
            paths[f"{kind}_{split}"] = path
            rows_per_file[path.name] = len(data[kind][split])
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
