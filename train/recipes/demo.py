"""Rebuild the shipped demo model from nothing on a CPU: ``python -m train.recipes.demo``.

1. Generate the data (seeded, offline): captions, easy-VQA, rendered-text images, instructions.
2. Read every OCR image once with the OCR expert (cached next to the data), so that training
   sees the same expert text the app shows at inference.
3. Joint training with the paper's disjoint groups, on SmolLM2-135M-Instruct + EfficientNet-Lite0.
4. Evaluate on held-out data: easy-VQA (with the image, without it, and the majority answer),
   rendered text with and without the OCR expert, perplexity of held-out instructions (base vs
   adapted).
5. Write ``assets/demo-adapter.safetensors`` (its metadata: recipe commit, data seed, base
   fingerprint, metrics), ``assets/demo-metrics.json`` and ``assets/examples/``.

``--quick`` trains for a few minutes on a small subset and checks that the loss falls (CI).
``--ablations`` trains the paper's ablations with one shared, smaller budget and writes their table.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_adapter
from llama_adapter.images import open_image
from llama_adapter.weights import read_adapter, save_adapter

from ..evaluate import evaluate_perplexity, normalize_answer
from ..trainer import run
from . import demo_data

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
SYSTEM_PROMPT = "You are a helpful assistant. You can see the image the user shares."


@dataclass
class Recipe:
    """Everything that decides an adapter of this recipe; ``name`` labels an ablation."""

    name: str = "shipped"
    seed: int = 0
    scale: float = 1.0
    data_dir: Path = ROOT / "data" / "demo"
    out_dir: Path = ROOT / "runs" / "demo"
    steps: int = 700
    batch_size: int = 16
    visual_layers: int = 30  # fusion layers counted from the first; 30 = every layer of SmolLM2
    adapter_layers: int = 29  # static prompts in the last layers
    bias_scale: bool = True
    vqa_turns: int = 4  # easy-VQA questions per training conversation
    stage: str = "joint"
    lr: dict[str, float] = field(default_factory=lambda: {"pretrain": 1e-3, "finetune": 5e-4})
    ocr_limit: int | None = 300  # OCR items per split read with the expert (None: all)
    eval_limit: int | None = 200  # held-out items per evaluation (None: all)

    def adapter_config(self) -> dict[str, Any]:
        bias_scale: dict[str, Any] = {} if self.bias_scale else {"bias_targets": [], "scale": False}
        return {
            "image_encoder": "efficientnet-lite0",
            "visual_dim": 256,
            "visual_depth": 2,
            "visual_heads": 8,
            "prompt_len": 10,
            "visual_layers": self.visual_layers,
            "adapter_layers": self.adapter_layers,
            **bias_scale,
        }


# -- data ---------------------------------------------------------------------------------------------


def prepare_data(recipe: Recipe) -> dict[str, Any]:
    """The generated data (made once per seed and scale) with OCR expert text for the OCR items."""
    manifest = recipe.data_dir / "manifest.json"
    current = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if current.get("seed") != recipe.seed or current.get("scale") != recipe.scale:
        log.info("Generating the demo data in %s (seed %d, scale %g)", recipe.data_dir, recipe.seed, recipe.scale)
        demo_data.generate(recipe.data_dir, seed=recipe.seed, scale=recipe.scale)
    d = recipe.data_dir
    read = lambda name: json.loads((d / name).read_text())  # noqa: E731
    ocr = {split: read(f"ocr_{split}.json")[: recipe.ocr_limit] for split in ("train", "heldout")}
    contexts = ocr_contexts([item["image"] for items in ocr.values() for item in items], d)
    return {
        "dir": d,
        "vqa_heldout": read("vqa_heldout.json"),
        "vqa_train": read("vqa_train.json"),
        "ocr": ocr,
        "contexts": contexts,
        "instructions_heldout": d / "instructions_heldout.json",
    }


def ocr_contexts(images: list[str], data_dir: Path) -> dict[str, str]:
    """The OCR expert's prompt text for each image, cached in ``ocr_contexts.json`` by the data."""
    from experts import run_experts

    cache_file = data_dir / "ocr_contexts.json"
    cache: dict[str, str] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    todo = [i for i in images if i not in cache]
    for n, image in enumerate(_progress(todo, "OCR expert")):
        report = run_experts(open_image(data_dir / image), "ocr", timeout_s=120, cache=None)
        if report.skipped:
            raise RuntimeError(f"The OCR expert failed on {image}: {report.skipped[0].reason}")
        cache[image] = report.context or ""
        if n % 50 == 49 or n == len(todo) - 1:
            cache_file.write_text(json.dumps(cache, indent=0, sort_keys=True))
    return {i: cache[i] for i in images}


def _progress(items: list, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="image", mininterval=5)


def vqa_conversations(items: list[dict[str, Any]], turns: int, seed: int, root: Path) -> list[dict[str, Any]]:
    """easy-VQA questions grouped into conversations of up to ``turns`` questions about one image:
    an answer is one or a few tokens, so a step sees several per image for little more compute."""
    rng = random.Random(seed)
    by_image: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for item in items:
        by_image[item["image"]].append(item)
    conversations = []
    for image in sorted(by_image):
        questions = by_image[image][:]
        rng.shuffle(questions)
        for i in range(0, len(questions), turns):
            turns_ = [t for q in questions[i : i + turns] for t in q["conversations"]]
            conversations.append({"image": str(root / image), "conversations": turns_})
    return conversations


def training_sources(recipe: Recipe, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Captions and easy-VQA train the visual side (pretrain group); instructions and the OCR
    questions, answered from the expert's text, train the language side (finetune group)."""
    d = data["dir"]
    ocr_samples = [
        {
            "image": str(d / item["image"]),
            "instruction": item["conversations"][0]["value"],
            "input": data["contexts"][item["image"]],
            "output": item["conversations"][1]["value"],
        }
        for item in data["ocr"]["train"]
        if data["contexts"][item["image"]]
    ]
    return [
        {"path": str(d / "captions_train.tsv"), "group": "pretrain", "weight": 0.5},
        {
            "samples": vqa_conversations(data["vqa_train"], recipe.vqa_turns, recipe.seed, d),
            "group": "pretrain",
            "weight": 1.0,
            "name": "easy-vqa",
        },
        {"samples": ocr_samples, "group": "finetune", "weight": 1.0, "name": "ocr-with-expert"},
        {"path": str(d / "instructions_train.json"), "group": "finetune", "weight": 1.0},
    ]


def train_config(recipe: Recipe, data: dict[str, Any]) -> dict[str, Any]:
    sources = training_sources(recipe, data)
    rows = 0
    for s in sources:
        if "samples" in s:
            rows += len(s["samples"]) * s["weight"]
        else:
            path = Path(s["path"])
            text = path.read_text()
            count = len(text.splitlines()) - 1 if path.suffix == ".tsv" else len(json.loads(text))
            rows += count * s["weight"]
    epochs = recipe.steps * recipe.batch_size / rows
    return {
        "stage": recipe.stage,
        "output_dir": str(recipe.out_dir / recipe.name),
        "seed": recipe.seed,
        "model": {"base": "smollm2-135m", "adapter": recipe.adapter_config(), "system_prompt": SYSTEM_PROMPT},
        "data": {"sources": sources, "batch_size": recipe.batch_size, "max_len": 256},
        "optim": {
            "epochs": epochs,
            "warmup_epochs": epochs * 0.03,
            "groups": {g: {"lr": lr, "weight_decay": 0.0} for g, lr in recipe.lr.items()},
            "clip_grad": 1.0,
        },
        "engine": {"mixed_precision": "no"},
        "checkpoint": {"every_steps": 200, "every_epochs": None, "keep_last": 1},
        "log": {"every_steps": 10, "report_to": ["none"]},
    }


# -- evaluation ---------------------------------------------------------------------------------------


def _batched_answers(pipe: llama_adapter.Pipeline, prompts: list[str], images: list | None, desc: str) -> list[str]:
    from tqdm.auto import tqdm

    answers: list[str] = []
    for i in tqdm(range(0, len(prompts), 8), desc=desc, unit="batch", mininterval=5):
        chunk_images = images[i : i + 8] if images is not None else None
        answers += pipe.generate_batch(prompts[i : i + 8], chunk_images, max_new_tokens=24)
    return answers


def _contains(prediction: str, reference: str) -> bool:
    """The reference answer appears in the prediction as whole words (after VQA normalisation)."""
    pred, ref = f" {normalize_answer(prediction)} ", f" {normalize_answer(reference)} "
    return ref.strip() != "" and ref in pred


def evaluate(pipe: llama_adapter.Pipeline, data: dict[str, Any], limit: int | None) -> dict[str, Any]:
    d = data["dir"]
    short = [i for i in data["vqa_heldout"] if i["conversations"][0]["value"].endswith("Answer with one word.")]
    short = short[:limit]
    questions = [i["conversations"][0]["value"] for i in short]
    references = [i["short_answer"] for i in short]
    with_image = _batched_answers(pipe, questions, [str(d / i["image"]) for i in short], "easy-VQA")
    without_image = _batched_answers(pipe, questions, None, "easy-VQA, no image")
    train_answers = collections.Counter(i["short_answer"] for i in data["vqa_train"])
    majority = train_answers.most_common(1)[0][0]
    score = lambda preds: (
        sum(  # noqa: E731
            normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, references)
        )
        / max(len(references), 1)
    )

    ocr = data["ocr"]["heldout"][:limit]
    ocr_messages_with = [
        [{"role": "user", "content": i["conversations"][0]["value"], "context": data["contexts"][i["image"]]}]
        for i in ocr
    ]
    ocr_messages_without = [[{"role": "user", "content": i["conversations"][0]["value"]}] for i in ocr]
    ocr_images = [str(d / i["image"]) for i in ocr]
    with_expert = _batched_answers(pipe, ocr_messages_with, ocr_images, "OCR questions, expert on")
    without_expert = _batched_answers(pipe, ocr_messages_without, ocr_images, "OCR questions, expert off")
    ocr_score = lambda preds: (
        sum(  # noqa: E731
            _contains(p, i["short_answer"]) for p, i in zip(preds, ocr)
        )
        / max(len(ocr), 1)
    )

    return {
        "easy_vqa": {
            "items": len(short),
            "accuracy": score(with_image),
            "accuracy_without_image": score(without_image),
            "majority_answer": majority,
            "accuracy_majority": score([majority] * len(short)),
            "samples": [
                {"question": q, "answer": a, "reference": r}
                for q, a, r in list(zip(questions, with_image, references))[:10]
            ],
        },
        "ocr": {
            "items": len(ocr),
            "accuracy_with_expert": ocr_score(with_expert),
            "accuracy_without_expert": ocr_score(without_expert),
            "samples": [
                {
                    "question": i["conversations"][0]["value"],
                    "with_expert": a,
                    "without_expert": b,
                    "reference": i["short_answer"],
                }
                for i, a, b in list(zip(ocr, with_expert, without_expert))[:10]
            ],
        },
        "perplexity": evaluate_perplexity(pipe, data["instructions_heldout"])["perplexity"],
    }


# -- the whole recipe ---------------------------------------------------------------------------------


def train_and_evaluate(recipe: Recipe, data: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    started = time.perf_counter()
    adapter = run(train_config(recipe, data))
    trained = time.perf_counter()
    pipe = llama_adapter.load(adapter=adapter)
    metrics = evaluate(pipe, data, recipe.eval_limit)
    metrics["train_seconds"] = round(trained - started)
    metrics["eval_seconds"] = round(time.perf_counter() - trained)
    metrics["recipe"] = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(recipe).items()}
    log.info("%s: %s", recipe.name, json.dumps({k: v for k, v in metrics.items() if k != "recipe"}, default=str))
    return adapter, metrics


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ship(adapter: Path, metrics: dict[str, Any], recipe: Recipe, data: dict[str, Any], seconds: float) -> Path:
    """Copy the adapter into ``assets/`` with the recipe's provenance and metrics in its metadata."""
    weights = read_adapter(adapter)
    meta = weights.metadata
    from llama_adapter.config import LlamaConfig

    target = save_adapter(
        ASSETS / "demo-adapter.safetensors",
        weights.state_dict,
        weights.config,
        base=LlamaConfig(**meta["base_config"]),
        base_name=meta["base"],
        base_fingerprint=meta["base_fingerprint"],
        prompt_template=meta["prompt_template"],
        system_prompt=meta.get("system_prompt"),
        extra={
            "training": meta.get("training", {}),
            "recipe": {
                "command": "python -m train.recipes.demo",
                "commit": git_commit(),
                "data_seed": recipe.seed,
                "data_manifest_sha256": json.loads((data["dir"] / "manifest.json").read_text()).get("files", {}),
                "seconds": round(seconds),
            },
            "metrics": {k: v for k, v in metrics.items() if k not in ("recipe",)},
        },
    )
    (ASSETS / "demo-metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    examples = ASSETS / "examples"
    if examples.exists():
        shutil.rmtree(examples)
    shutil.copytree(data["dir"] / "examples", examples)
    return target


def loss_fell(output_dir: Path) -> tuple[float, float]:
    """Mean loss of the first and last fifth of the logged steps."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return first, last


ABLATIONS: dict[str, dict[str, Any]] = {
    "reference": {},
    "visual tokens into the early layers only": {"visual_layers": 2},
    "one stage, every batch trains everything": {"stage": "all"},
    "bias and scale off": {"bias_scale": False},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.recipes.demo",
        description="Rebuild the shipped demo adapter (assets/demo-adapter.safetensors) from nothing, offline, "
        "on a CPU. Generates the data, reads OCR images with the OCR expert, trains jointly, evaluates "
        "on held-out data and writes the adapter, its metrics and example images into assets/.",
    )
    parser.add_argument("--quick", action="store_true", help="a few minutes on a small subset; checks the loss falls")
    parser.add_argument("--ablations", action="store_true", help="the paper's ablations, one shared budget")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument(
        "--steps", type=int, help="optimiser steps (default: 700, --quick 24, --ablations 120 of batch 8)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo", help="training runs go here")
    parser.add_argument("--no-ship", action="store_true", help="do not write into assets/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    started = time.perf_counter()
    if args.quick:
        recipe = Recipe(
            name="quick", seed=args.seed, scale=0.02, data_dir=args.out / "quick-data", out_dir=args.out,
            steps=args.steps or 24, batch_size=4, ocr_limit=6, eval_limit=4,
        )  # fmt: skip
        data = prepare_data(recipe)
        adapter = run(train_config(recipe, data))
        first, last = loss_fell(recipe.out_dir / recipe.name)
        log.info("quick recipe: loss %.3f → %.3f; adapter %s", first, last, adapter)
        if not last < first:
            log.error("The loss did not fall")
            return 1
        return 0

    if args.ablations:
        base = Recipe(
            seed=args.seed, out_dir=args.out / "ablations", steps=args.steps or 120, batch_size=8, eval_limit=60
        )
        data = prepare_data(base)
        table = {}
        for name, change in ABLATIONS.items():
            _, metrics = train_and_evaluate(dataclasses.replace(base, name=name, **change), data)
            table[name] = metrics
        (ASSETS / "demo-ablations.json").write_text(json.dumps(table, indent=2, default=str) + "\n")
        return 0

    recipe = Recipe(seed=args.seed, out_dir=args.out, **({"steps": args.steps} if args.steps else {}))
    data = prepare_data(recipe)
    adapter, metrics = train_and_evaluate(recipe, data)
    base_pipe = llama_adapter.load("smollm2-135m")
    metrics["perplexity_base"] = evaluate_perplexity(base_pipe, data["instructions_heldout"])["perplexity"]
    if not args.no_ship:
        shipped = ship(adapter, metrics, recipe, data, time.perf_counter() - started)
        log.info("Wrote %s", shipped)
    log.info("Total %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
