"""Choose tesseract's preprocessing (experts.ocr.tesseract_input) on rendered images that the
tests never score: ``python tests/tune_tesseract.py``. The renderer is the test's
(test_experts_ocr.render_text_image); the tuning seeds are TUNING_SEEDS, the test scores seeds
0–5 (held out). Prints the word recall of each candidate over the tuning set."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

from PIL import Image, ImageFilter, ImageOps

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from test_experts_ocr import RENDERED_SEEDS, recall_over, render_text_image  # noqa: E402

from experts.ocr import OcrExpert  # noqa: E402

TUNING_SEEDS = range(1000, 1040)
assert not set(TUNING_SEEDS) & set(RENDERED_SEEDS)


def autocontrast(cutoff: float, median: int = 0):
    def preprocess(image: Image.Image) -> Image.Image:
        grey = image.convert("L")
        return ImageOps.autocontrast(grey.filter(ImageFilter.MedianFilter(median)) if median else grey, cutoff=cutoff)

    return preprocess


CANDIDATES = {
    "as given (RGB)": lambda image: image,
    "grey": lambda image: image.convert("L"),
    "grey, autocontrast 0 %": autocontrast(0),
    "grey, autocontrast 1 %": autocontrast(1),
    "grey, autocontrast 2 %": autocontrast(2),
    "grey, autocontrast 5 %": autocontrast(5),
    "grey, median 3": lambda image: image.convert("L").filter(ImageFilter.MedianFilter(3)),
    "grey, median 3, autocontrast 0 %": autocontrast(0, median=3),
    "grey, median 3, autocontrast 1 %": autocontrast(1, median=3),
    "grey, median 5, autocontrast 1 %": autocontrast(1, median=5),
    "grey, autocontrast 1 %, ×2": lambda image: autocontrast(1)(image).resize(
        (image.width * 2, image.height * 2), Image.BICUBIC
    ),
}


def main(only: list[str]) -> None:
    images = [render_text_image(seed) for seed in TUNING_SEEDS]
    expert = OcrExpert("tesseract")
    assert expert.availability().available, str(expert.availability())
    for name, preprocess in CANDIDATES.items():
        if only and not any(word in name for word in only):
            continue
        with mock.patch("experts.ocr.tesseract_input", preprocess):
            recall, misses = recall_over(expert, images)
        print(f"{recall:6.1%}  {name}  ({len(misses)} images with a miss)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])  # words picking candidates by name, e.g. "median"
