"""Image input: open and validate user images, and turn them into encoder tensors."""

from __future__ import annotations

import io
import os
import warnings
import weakref
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import IMAGE_ENCODERS
from .errors import InputError

ImageInput = Union[str, os.PathLike, bytes, Image.Image]

DEFAULT_MAX_PIXELS = 40_000_000
"""Images larger than this are refused before decoding (a 20000×20000 upload, a decompression bomb)."""

_opened: weakref.WeakValueDictionary[int, Image.Image] = weakref.WeakValueDictionary()
"""The images :func:`open_image` returned, by ``id`` (PIL images are unhashable): passed on to inner
layers, they are taken as they are instead of being transposed and converted again."""


def open_image(image: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a path, raw bytes or PIL image as an upright RGB image, or raise :class:`InputError`.

    Handles EXIF rotation, palette, alpha (composited on white), 16-bit, CMYK and animated
    images (first frame). The pixel limit is checked from the header, before decoding; Pillow's
    own decompression-bomb limit (about 89 Mpx) applies as well.
    """
    if isinstance(image, Image.Image) and _opened.get(id(image)) is image:
        _check_pixels(image.size, max_pixels)  # the limits of layers may differ
        return image
    if isinstance(image, Image.Image):
        img = image
        _check_pixels(img.size, max_pixels)
    else:
        data = _read_bytes(image)
        if not data:
            raise InputError("The image file is empty (0 bytes).")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                _check_pixels(img.size, max_pixels)
                img.load()
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(
                f"The image has too many pixels to decode safely ({e}). Resize it to at most "
                f"{min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):,} pixels and try again."
            ) from e
        except UnidentifiedImageError as e:
            raise InputError("The file is not an image Pillow can read (PNG, JPEG, GIF, WebP, BMP, TIFF …).") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"The image is corrupt or truncated: {e}") from e
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img = _to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError) as e:  # a broken later frame, EXIF block or pixel mode
        raise InputError(f"The image cannot be converted to RGB: {e}") from e
    _opened[id(img)] = img
    return img


def _read_bytes(image: str | os.PathLike | bytes) -> bytes:
    if isinstance(image, bytes):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise InputError(f"An image must be a file path, bytes or a PIL image; got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():  # also keeps devices and pipes (/dev/zero, a FIFO) out
        raise InputError(f"Image file not found: {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"Cannot read the image file {path}: {e.strerror}") from e


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise InputError(f"The image has no pixels ({w}×{h}).")
    if w * h > max_pixels:
        raise InputError(
            f"The image is {w}×{h} = {w * h:,} pixels; the limit is {max_pixels:,}. Resize it and try again."
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr / top * 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def encoder_view(img: Image.Image, encoder: str) -> Image.Image:
    """The square the ``encoder`` sees: torchvision's ``Resize(S, bicubic)`` and ``CenterCrop(S)``,
    CLIP's own preprocessing, which the official checkpoints were trained with (the shorter side
    resized, the longer truncated, the crop centred with round-half-even)."""
    import torchvision.transforms.functional as TF  # here: seconds to import, and text-only use never needs it

    size = IMAGE_ENCODERS[encoder].image_size
    return TF.center_crop(TF.resize(img, size, TF.InterpolationMode.BICUBIC), size)


def image_to_tensor(img: Image.Image, encoder: str, channel_order: str = "RGB") -> torch.Tensor:
    """:func:`encoder_view`, normalised for ``encoder``: a [3, S, S] tensor.

    ``channel_order="BGR"`` swaps red and blue before normalising, as the official checkpoints
    saw their training images (read with OpenCV).
    """
    import torchvision.transforms.functional as TF

    spec = IMAGE_ENCODERS[encoder]
    x = TF.to_tensor(encoder_view(img, encoder))
    if channel_order == "BGR":
        x = x.flip(0)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (x - mean) / std
