"""Answer one instruction about one image without experts and with each chosen combination.

``python -m experts.compare IMAGE "question" [--experts ocr,caption] [--experts ocr] [--explain DIR]``
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from llama_adapter.cli import add_model_arguments, check_environment_choices, load_from_arguments
from llama_adapter.errors import LlamaAdapterError
from llama_adapter.images import ImageInput, open_image

from .base import DEFAULT_CACHE, ExpertCache, ExpertReport, Registry, resolve_experts, run_experts
from .caption import AdapterCaptioner, registry_for
from .prompt import assemble

if TYPE_CHECKING:
    from PIL import Image

    from llama_adapter import Pipeline, Trace

log = logging.getLogger(__name__)

DEFAULT_COMBINATIONS: tuple[tuple[str, ...], ...] = (("ocr",), ("caption",), ("ocr", "caption"))


@dataclass
class Variant:
    """One answer: which experts were asked for, what the model read, what it said, how long it took."""

    label: str
    experts: list[str]
    prompt: str
    answer: str
    seconds: float
    report: ExpertReport

    @property
    def skipped(self) -> list[str]:
        return [r.name for r in self.report.skipped]


@dataclass
class Comparison:
    """The baseline (no experts) first, then one :class:`Variant` per combination; ``experts``
    holds every expert's text and first-run timing (each runs once per image)."""

    instruction: str
    seed: int
    image_to_model: bool
    experts: ExpertReport
    variants: list[Variant] = field(default_factory=list)
    image: Image.Image | None = field(default=None, repr=False)
    """The picture the model saw (``None`` for a text-only model)."""

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    def explain(self, pipeline: Pipeline, variant: int) -> Trace:
        """What the answer of ``variants[variant]`` drew on (:func:`llama_adapter.explain`), traced
        in one forward pass over what the model read for it and the answer it gave."""
        from llama_adapter import explain

        answered = self.variants[variant]
        built = assemble(self.instruction, answered.report, pipeline=pipeline)
        return explain(pipeline, built.messages, self.image, answer=answered.answer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "seed": self.seed,
            "image_to_model": self.image_to_model,
            "experts": [asdict(r) for r in self.experts],
            "variants": [
                {k: v for k, v in asdict(variant).items() if k != "report"} | {"skipped": variant.skipped}
                for variant in self.variants
            ],
        }


def compare(
    pipeline: Pipeline,
    instruction: str,
    image: ImageInput,
    combinations: Sequence[str | Sequence[str]] | None = None,
    *,
    seed: int = 0,
    registry: Registry | None = None,
    timeout_s: float | None = None,
    cache: ExpertCache | None = DEFAULT_CACHE,
    **sampling: Any,
) -> Comparison:
    """Answer ``instruction`` about ``image`` without experts, then with each combination of experts
    (names, kind aliases such as ``"ocr"``, or ``"ocr,caption"`` strings), all with the same ``seed``
    and ``sampling``. Each expert runs once; a skipped one is reported, the answer goes on without it.

    The image itself reaches the model only if the pipeline has an image encoder; a text-only
    model sees the image solely through the experts.
    """
    picture = open_image(image, max_pixels=pipeline.max_image_pixels)
    combos = [resolve_experts(c, registry) for c in (combinations or DEFAULT_COMBINATIONS)]
    union = list(dict.fromkeys(e for combo in combos for e in combo))
    experts = run_experts(picture, union, timeout_s=timeout_s, cache=cache)
    to_model = picture if pipeline.accepts_images else None
    result = Comparison(instruction, seed, to_model is not None, experts, image=to_model)
    for combo in [[], *combos]:
        report = ExpertReport([experts[e.name] for e in combo], experts.image_hash)
        built = assemble(instruction, report, pipeline=pipeline)
        started = time.perf_counter()
        answer = pipeline.generate(built.messages, image=to_model, seed=seed, **sampling)
        label = " + ".join(e.name for e in combo) or "no experts"
        result.variants.append(
            Variant(label, [e.name for e in combo], built.text, answer, time.perf_counter() - started, report)
        )
        log.info("Answered with %s in %.2f s", label, result.variants[-1].seconds)
    return result


# -- CLI ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experts.compare",
        description="Answer a question about an image without experts and with expert text in the prompt "
        "(same seed), and print the answers side by side.",
    )
    parser.add_argument("image", help="image file (PNG, JPEG, WebP, …)")
    parser.add_argument("question", help="the instruction or question about the image")
    parser.add_argument(
        "--experts",
        action="append",
        metavar="LIST",
        help="a comma-separated combination to compare, e.g. ocr,caption; repeat for several "
        "(default: ocr, caption, and ocr,caption). Names: ocr, caption, all, or an expert name "
        "(python -m experts --list)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed shared by every variant (default: 0)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default: 128)")
    parser.add_argument("--timeout", type=float, help="seconds each expert may take (default: its own limit)")
    parser.add_argument("--show-prompt", action="store_true", help="also print the exact prompt of each variant")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--explain",
        metavar="DIR",
        type=Path,
        help="also write what each answer drew on into DIR/<variant>/ (trace.json and PNGs; with experts, "
        "their text highlighted where the answer repeats it)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    add_model_arguments(parser)
    return parser


def explain_variants(pipeline: Pipeline, result: Comparison, directory: Path) -> None:
    """Trace each variant's answer (one forward pass each) and save it under ``directory/<variant>``."""
    for i, variant in enumerate(result.variants):
        folder = directory / re.sub(r"[^A-Za-z0-9]+", "-", variant.label).strip("-")
        result.explain(pipeline, i).save(folder)
        print(f"Wrote what the answer with {variant.label} drew on to {folder}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_environment_choices(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        picture = open_image(args.image)
        combos = args.experts or [",".join(c) for c in DEFAULT_COMBINATIONS]
        # A misspelt expert fails before the model loads; the model's own caption needs it loaded.
        resolve_experts([n for c in combos for n in c.split(",") if n.strip() not in ("", AdapterCaptioner.name)])
        pipeline = load_from_arguments(args)
        result = compare(
            pipeline,
            args.question,
            picture,
            combos,
            registry=registry_for(pipeline),
            seed=args.seed,
            timeout_s=args.timeout,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        )
        if args.explain is not None:
            explain_variants(pipeline, result, args.explain)
    except (LlamaAdapterError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return 0
    print(f"Question: {args.question}")
    if not result.image_to_model:
        print("The model is text-only: it sees the image only through the experts' text.")
    print("\nExperts:")
    for r in result.experts:
        print(f"  {r.summary()}")
        if r.used:
            print("    " + r.text.replace("\n", "\n    "))
    for variant in result.variants:
        skipped = f"; skipped: {', '.join(variant.skipped)}" if variant.skipped else ""
        print(f"\n=== {variant.label} ({variant.seconds:.2f} s{skipped}) ===")
        if args.show_prompt:
            print(f"--- prompt ---\n{variant.prompt}\n--- answer ---")
        print(variant.answer.strip() or "(empty answer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
