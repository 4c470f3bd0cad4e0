"""Text drawn as a photo of a printed thing: DejaVu fonts, a layout of rows on a panel in a
readable colour scheme, turned a little, on a surface, with mild blur and grain."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .common import RGB, sha256_file

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
