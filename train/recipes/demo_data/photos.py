"""Pictures unlike the rest of the data (neither a shape on a plain background nor printed text),
for two behaviours on photos: with the ImageNet tagger's text in the prompt, a sentence that names
its top tag ("It looks like an espresso."); without it, an honest answer rather than a made-up
shape. The pictures are drawn here (noise fields, waves, blurred blobs, horizons), and the tags
are drawn at random from ImageNet's 1000 labels, so that what is learnt is to read the tag, not
to guess it from a picture. Real photos (scikit-image's) are for evaluation only."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from .common import Settings, png_digest, unique_image

QUESTIONS = ("What is in this picture?", "What is this?", "Describe this image.", "What do you see?",
             "What does the picture show?", "What is shown here?")  # fmt: skip
TAGGED = ("It looks like {thing}.", "The tagger suggests {thing}.", "This appears to be {thing}.",
          "It is probably {thing}.", "It looks like {thing}, going by the image tags.")  # fmt: skip
UNTAGGED = (
    "I can't tell what this picture shows. It is not a simple shape or printed text, which is what I "
    "can recognise; the tagger could suggest what it is.",
    "I am not sure what this is: it does not look like a simple shape or a sign. Try turning on the tagger.",
    "I cannot say what this picture shows. I recognise simple shapes and printed text, and this is neither.",
)


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names, as the tagger writes them (torchvision ships them offline)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def random_tags(rng: random.Random, labels: tuple[str, ...]) -> list[tuple[str, float]]:
    """A top label and two runners-up, with probabilities as the tagger gives them on photos (from
    a few per cent when it is unsure to nearly all when it is sure)."""
    names = rng.sample(labels, 3)
    top = rng.uniform(0.05, 0.99)
    second = rng.uniform(0.0, min(top, 1 - top))
    third = rng.uniform(0.0, min(second, 1 - top - second))
    return [(name, p) for name, p in zip(names, (top, second, third))]


def with_article(label: str) -> str:
    return f"{'an' if label[0].lower() in 'aeiou' else 'a'} {label}"


def _palette(rng: random.Random, n: int) -> np.ndarray:
    return np.array([[rng.randint(0, 255) for _ in range(3)] for _ in range(n)], dtype=np.float32)


def _colourise(field: np.ndarray, rng: random.Random) -> np.ndarray:
    """A field in [0, 1] through a random palette of 2-4 colours, interpolated."""
    colours = _palette(rng, rng.randint(2, 4))
    x = field * (len(colours) - 1)
    lo = np.clip(np.floor(x).astype(int), 0, len(colours) - 2)
    t = (x - lo)[..., None]
    return colours[lo] * (1 - t) + colours[lo + 1] * t


def noise_field(size: tuple[int, int], rng: random.Random) -> np.ndarray:
    """Fractal value noise: random grids of rising resolution, smoothly upsampled and summed."""
    w, h = size
    np_rng = np.random.default_rng(rng.getrandbits(64))
    total = np.zeros((h, w), dtype=np.float32)
    for octave in range(rng.randint(3, 6)):
        cells = 2 + 2**octave
        grid = Image.fromarray((np_rng.random((cells, cells)) * 255).astype(np.uint8))
        total += np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255 / 2**octave
    return (total - total.min()) / max(float(total.max() - total.min()), 1e-6)


def noise_picture(size: tuple[int, int], rng: random.Random) -> Image.Image:
    return Image.fromarray(_colourise(noise_field(size, rng), rng).astype(np.uint8))


def wave_picture(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.02, 0.2)
    phase = np.sin((x * np.cos(angle) + y * np.sin(angle)) * freq) * 0.5 + 0.5
    warp = noise_field(size, rng)
    field = np.clip(0.6 * phase + 0.4 * warp, 0, 1)
    return Image.fromarray(_colourise(field, rng).astype(np.uint8))


def blob_picture(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Many soft, overlapping blobs of colour, like an out-of-focus photo."""
    w, h = size
    image = Image.fromarray(_colourise(noise_field(size, rng), rng).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(15, 60)):
        r = rng.uniform(0.02, 0.15) * max(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(3, 10)))


def horizon_picture(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A sky gradient over textured ground, the horizon at a random height."""
    w, h = size
    sky_top, sky_low = _palette(rng, 2)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = np.broadcast_to(sky_top * (1 - t) + sky_low * t, (h, w, 3))
    ground = _colourise(noise_field(size, rng), rng)
    line = int(h * rng.uniform(0.3, 0.7))
    pixels = np.concatenate([sky[:line], ground[line:]], axis=0)
    return Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2)))


PICTURES: tuple[Callable[[tuple[int, int], random.Random], Image.Image], ...] = (
    noise_picture,
    wave_picture,
    blob_picture,
    horizon_picture,
)


def random_picture(rng: random.Random) -> tuple[Image.Image, None]:
    size = (rng.randint(160, 400), rng.randint(160, 400))
    image = rng.choice(PICTURES)(size, rng)
    grain = np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(1, 6), (size[1], size[0], 1))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8)), None


def build_photos(settings: Settings, split: str, taken: set[str]) -> tuple[list[dict[str, Any]], set[str]]:
    """Pictures under images/photos/<split>/, each with random tags, a question, the answer with
    the tags in the prompt and the honest one without."""
    rng, labels = settings.rng(f"photos-{split}"), imagenet_labels()
    folder = settings.out_dir / "images" / "photos" / split
    folder.mkdir(parents=True, exist_ok=True)
    items, digests = [], set()
    for i in tqdm(range(settings.counts[f"photos_{split}"]), desc=f"photos {split}", unit="img", disable=None):
        image, _ = unique_image(lambda: random_picture(rng), taken)
        name = f"images/photos/{split}/{i:05d}.png"
        image.save(settings.out_dir / name, format="PNG")
        digests.add(png_digest(image))
        tags = random_tags(rng, labels)
        items.append(
            {
                "id": f"photo-{split}-{i:05d}",
                "image": name,
                "tags": [[label, round(p, 4)] for label, p in tags],
                "question": rng.choice(QUESTIONS),
                "answer_with_tags": rng.choice(TAGGED).format(thing=with_article(tags[0][0])),
                "answer_without_tags": rng.choice(UNTAGGED),
                "short_answer": tags[0][0],
                "source": "photo",
            }
        )
    return items, digests


def build(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Photo items of both splits; no held-out picture has the pixels of a train picture."""
    train, digests = build_photos(settings, "train", set())
    heldout, _ = build_photos(settings, "heldout", digests)
    return {"train": train, "heldout": heldout}
