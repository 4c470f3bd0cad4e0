"""What every kind of demo data shares: the run's settings and seeded streams, easy-VQA's
palette and shapes, and small helpers for counts, JSON and unique images."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

T = TypeVar("T")
RGB = tuple[int, int, int]

SPLITS = ("train", "heldout")

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


@dataclass(frozen=True)
class Settings:
    """One run of the generator: the folder it writes, its seed and its (scaled) counts."""

    out_dir: Path
    seed: int
    counts: dict[str, int]

    def rng(self, name: str) -> random.Random:
        return sub_rng(self.seed, name)


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
