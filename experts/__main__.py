"""``python -m experts IMAGE [--expert ocr|caption|all]``: print what each expert says about an image."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from llama_adapter.errors import LlamaAdapterError
from llama_adapter.images import open_image

from .base import KINDS, default_registry, resolve_experts, run_experts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experts",
        description="Describe an image with expert systems (OCR, caption, ImageNet tags) and print each one's text.",
        epilog="Experts that are unavailable, fail or time out are reported as skipped, with the reason.",
    )
    parser.add_argument("image", nargs="?", help="image file (PNG, JPEG, WebP, …)")
    parser.add_argument(
        "--expert",
        default="all",
        metavar="NAME",
        help=f"{', '.join(KINDS)} or all (default: all), or expert names, comma-separated (see --list)",
    )
    parser.add_argument("--coca-weights", metavar="FILE", help="CoCa weights file (else the usual places are searched)")
    parser.add_argument("--timeout", type=float, help="seconds each expert may take (default: its own limit)")
    parser.add_argument("--list", action="store_true", help="list the experts and whether each is available, then exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    registry = default_registry()
    if args.coca_weights:
        from .caption import CocaCaptioner

        registry.register(CocaCaptioner(weights=args.coca_weights), replace=True)
    if args.list:
        for expert in registry:
            print(f"{expert.name:16} {expert.kind:8} {expert.label}\n{'':26}{expert.availability()}")
        return 0
    if not args.image:
        parser.error("the image is required (or use --list)")
    try:
        image = open_image(args.image)
        experts = resolve_experts(args.expert, registry)
    except (LlamaAdapterError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    report = run_experts(image, experts, timeout_s=args.timeout)
    for result in report:
        if result.status == "ok":
            timing = "cached" if result.cached else f"{result.seconds:.2f} s"
            print(f"[{result.name}] {result.label} ({timing})")
            print(result.text if result.text.strip() else "(nothing found)")
        else:
            print(f"[{result.name}] skipped ({result.status}): {result.reason}")
    return 0 if any(r.status == "ok" for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
