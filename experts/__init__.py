"""Expert systems that describe an image in words (OCR, captions, tags) for the prompt.

The paper's fourth idea: at inference, text from experts joins the prompt. Used by the app, the
CLIs and the training code alike::

    from experts import build_prompt, compare, default_registry, run_experts

    report = run_experts(image, "ocr,caption")           # cached, time-limited, never raises
    built = build_prompt("What does the sign say?", image, ["ocr"], pipeline=pipe)
    built.text                                           # exactly what the model reads

CLIs: ``python -m experts IMAGE`` and ``python -m experts.compare IMAGE "question"``.
"""

import importlib
from typing import Any

from .base import (
    DEFAULT_CACHE,
    KINDS,
    Availability,
    Expert,
    ExpertCache,
    ExpertReport,
    ExpertResult,
    Registry,
    default_registry,
    image_hash,
    run_expert,
    run_experts,
)
from .caption import AdapterCaptioner, CocaCaptioner, ImageNetTagger, measured_defaults, registry_for
from .ocr import ENGINES, OcrExpert, TextBox, reading_order
from .prompt import BuiltPrompt, build_prompt
from .session import Description, MultimodalChat, Turn, describe


def __getattr__(name: str) -> Any:
    # Imported on first use so that ``python -m experts.compare`` does not find the module already
    # imported by its own package (runpy warns about that).
    if name in ("Comparison", "Variant", "compare"):
        module = importlib.import_module(f"{__name__}.compare")
        # Importing the submodule bound the name "compare" to it; the public name is the function.
        globals().update(Comparison=module.Comparison, Variant=module.Variant, compare=module.compare)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_CACHE",
    "ENGINES",
    "KINDS",
    "AdapterCaptioner",
    "Availability",
    "BuiltPrompt",
    "CocaCaptioner",
    "Comparison",
    "Description",
    "Expert",
    "ExpertCache",
    "ExpertReport",
    "ExpertResult",
    "MultimodalChat",
    "ImageNetTagger",
    "OcrExpert",
    "Registry",
    "TextBox",
    "Turn",
    "Variant",
    "build_prompt",
    "compare",
    "default_registry",
    "describe",
    "image_hash",
    "reading_order",
    "measured_defaults",
    "registry_for",
    "run_expert",
    "run_experts",
]
