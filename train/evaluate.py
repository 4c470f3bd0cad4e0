"""Evaluation of a trained adapter.

* ``python -m train.evaluate vqa --data questions.json --adapter A`` — VQA accuracy of free-form
  replies to the questions as typed, judged from their words (:func:`judge`), per answer kind
  (yes, no, shape, colour, text) with the balanced yes/no accuracy; ``--judge exact`` scores the
  normalised exact match instead (one-word answers). VQAv2's min(#matching humans / 3, 1) when a
  question has several answers. Reads easy-VQA's ``[question, answer, image_id]`` rows,
  ``{image, question, answer(s)}`` dicts or one-turn LLaVA conversations.
* ``python -m train.evaluate perplexity --data held_out.json --adapter A`` — perplexity over the
  answer tokens of held-out instructions, through the training data pipeline (same prompts).
* ``python -m train.evaluate mme --mme-dir MME_Benchmark_release_version --out results/`` — one
  ``<subtask>.txt`` per MME subtask with ``image\\tquestion\\tground truth\\tanswer`` lines, as the
  official ``util/evaluate_mme.py`` writes them for MME's ``eval_tool/calculation.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llama_adapter.build import build_pipeline, load
from llama_adapter.config import TINY_BASES
from llama_adapter.pipeline import Pipeline
from llama_adapter.tiny import random_base
from llama_adapter.weights import read_adapter, read_adapter_metadata

from .config import DataConfig, SourceConfig, TrainConfig
from .data import IGNORE, Collate, ImageTransform, PromptEncoder, TrainingData, conversation_messages, load_source

log = logging.getLogger(__name__)

# The official MME prompt: Alpaca with "using a single word or phrase"; as a system message it
# replaces Alpaca's first line, and leads a chat template's conversation.
MME_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request using a single word or phrase."
)
MME_SUBTASKS = (
    "artwork",
    "celebrity",
    "color",
    "count",
    "existence",
    "OCR",
    "position",
    "posters",
    "scene",
    "code_reasoning",
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "landmark",
)
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")

# -- answer normalisation (after the official VQA evaluation) ----------------------------------------

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "dont": "don't",
    "doesnt": "doesn't",
    "isnt": "isn't",
    "arent": "aren't",
    "cant": "can't",
    "wont": "won't",
    "im": "i'm",
    "ive": "i've",
    "youre": "you're",
    "whats": "what's",
    "thats": "that's",
}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")


def normalize_answer(text: str) -> str:
    """Lower case; drop punctuation, articles and a final period; number words → digits."""
    text = text.strip().lower().replace("\n", " ").replace("\t", " ")
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"\.(?!\d)", " ", text)  # periods, but not decimal points ("costs $1.99." ends in one)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


# -- judging a free-form reply -----------------------------------------------------------------------
#
# People type a question and read a sentence back ("Yes, the shape is brown."), so a reply is
# judged from its words, after normalize_answer:
# * yes/no questions by the reply's first word ("Yes, ..." / "No, ...");
# * every other answer by the reference appearing in the reply as whole words. A word also matches
#   its plural (+s, +es) and the synonyms below. A reference from a closed set (the colours, the
#   shapes) must be the only member of its set that the reply names: "red or blue" answers nothing.

YES_NO = ("yes", "no")
ANSWER_SETS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "black", "white", "gray", "teal", "brown", "yellow", "orange", "purple", "pink"),
    "shape": ("circle", "rectangle", "triangle"),
}
SYNONYMS: dict[str, tuple[str, ...]] = {"gray": ("grey",)}
JUDGES = ("free", "exact")


def answer_kind(reference: str) -> str:
    """``yes``, ``no``, ``colour``, ``shape`` (a closed set above) or ``text`` (anything else)."""
    ref = normalize_answer(reference)
    if ref in YES_NO:
        return ref
    return next((kind for kind, words in ANSWER_SETS.items() if ref in words), "text")


def _forms(word: str) -> set[str]:
    return {word, word + "s", word + "es", *SYNONYMS.get(word, ())}


def names(reply: str, answer: str) -> bool:
    """Whether the normalised ``answer`` appears in the ``reply`` as whole words (its last word also
    as a plural or synonym)."""
    said, wanted = normalize_answer(reply).split(), normalize_answer(answer).split()
    if not wanted:
        return False
    n = len(wanted)
    return any(
        said[i : i + n - 1] == wanted[:-1] and said[i + n - 1] in _forms(wanted[-1]) for i in range(len(said) - n + 1)
    )


_DENIALS = {"not", "no", "neither", "nor", "never", "cannot"}
_CLAUSE_END = re.compile(r"[.;:,!?]|\bbut\b", re.IGNORECASE)


def claims(reply: str, answer: str) -> bool:
    """Whether the ``reply`` names ``answer`` (as :func:`names`) as something there, not in denial:
    "It is neither a simple shape nor a red circle." names a circle but claims none. A clause
    (up to a comma, full stop or "but") denies what follows a "not", "no", "neither", "nor" or "n't"."""
    for clause in _CLAUSE_END.split(reply):
        words = normalize_answer(clause).split()
        denial = next((i for i, w in enumerate(words) if w in _DENIALS or w.endswith("n't")), len(words))
        if names(" ".join(words[:denial]), answer):
            return True
    return False


def judge(reply: str, reference: str) -> bool:
    """A free-form ``reply`` is right for ``reference`` (see the rules above)."""
    kind = answer_kind(reference)
    if kind in YES_NO:
        words = normalize_answer(reply).split()
        return bool(words) and words[0] == kind
    if not names(reply, reference):
        return False
    others = [w for w in ANSWER_SETS.get(kind, ()) if w != normalize_answer(reference)]
    return not any(names(reply, w) for w in others)


def exact_match(reply: str, reference: str) -> bool:
    """The normalised reply is the normalised reference (one-word answers)."""
    return normalize_answer(reply) == normalize_answer(reference)


def vqa_score(prediction: str, answers: list[str], judge_name: str = "free") -> float:
    match = judge if judge_name == "free" else exact_match
    matches = sum(match(prediction, a) for a in answers)
    if len(answers) >= 3:  # several human answers (VQAv2): 3 agreeing humans give full credit
        return min(1.0, matches / 3)
    return float(matches > 0)


def accuracy_by_kind(kinds: list[str], scores: list[float]) -> dict[str, Any]:
    """Mean score overall and per answer kind, and the balanced yes/no accuracy (the mean of the
    yes and no accuracies: a model that always says "yes" gets 50 %)."""
    by_kind: dict[str, list[float]] = {}
    for kind, score in zip(kinds, scores):
        by_kind.setdefault(kind, []).append(score)
    result: dict[str, Any] = {
        "accuracy": sum(scores) / len(scores) if scores else float("nan"),
        "items": len(scores),
        "by_kind": {k: {"accuracy": sum(v) / len(v), "items": len(v)} for k, v in sorted(by_kind.items())},
    }
    if "yes" in by_kind and "no" in by_kind:
        result["balanced_yes_no"] = (result["by_kind"]["yes"]["accuracy"] + result["by_kind"]["no"]["accuracy"]) / 2
    return result


# -- loading ------------------------------------------------------------------------------------------


def load_pipeline(base: str | None, adapter: str | None, *, device: str = "cpu", dtype: str | None = None) -> Pipeline:
    """A :class:`Pipeline` for an adapter; also for adapters trained on the random tiny bases (with
    the base seed, and the random encoder, of their training)."""
    base = base or (read_adapter_metadata(Path(adapter)).get("base") if adapter else None)
    if base not in TINY_BASES:
        return load(base, adapter, device=device, dtype=dtype)
    weights = read_adapter(Path(adapter)) if adapter else None
    training = weights.metadata.get("training", {}) if weights else {}
    tiny = random_base(base, training.get("base_seed", 0))
    with torch.random.fork_rng(devices=[]):
        # The trainer builds under its seed: a random-init encoder comes out the same here.
        torch.manual_seed(training.get("seed", 0))
        pipe = build_pipeline(
            tiny, weights, device=device, dtype=dtype, pretrained_encoder=training.get("pretrained_encoder", True)
        )
    pipe.info["base"] = base
    return pipe


# -- VQA ----------------------------------------------------------------------------------------------


def read_vqa(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """``{image, question, answers}`` rows of a VQA-style JSON file: easy-VQA's
    ``[question, answer, image_id]``, ``{image, question, answer | answers}``, or a one-turn LLaVA
    conversation ``{image, conversations, short_answer?}`` (the short answer is the reference)."""
    path = Path(path)
    rows = []
    for row in json.loads(path.read_text()):
        if isinstance(row, (list, tuple)):
            question, answers, image = row[0], [row[1]], f"images/{row[2]}.png"
        elif "conversations" in row:
            turns = conversation_messages(row["conversations"])
            question = next(t["content"] for t in turns if t["role"] == "user")
            answers = [row.get("short_answer") or next(t["content"] for t in turns if t["role"] == "assistant")]
            image = row["image"]
        else:
            question, image = row["question"], row["image"]
            raw = row.get("answers") or [row["answer"]]
            answers = [a["answer"] if isinstance(a, dict) else a for a in raw]
        image = image if Path(image).is_absolute() else path.parent / image
        rows.append({"image": str(image), "question": question, "answers": answers})
        if limit and len(rows) >= limit:
            break
    return rows


def per_kind_sample(rows: list[dict[str, Any]], per_kind: int, seed: int = 0) -> list[dict[str, Any]]:
    """``per_kind`` rows of each answer kind (:func:`answer_kind`; all of a kind that has fewer),
    drawn with ``seed``: yes and no in equal numbers, so a model that answers from the question
    alone cannot score above chance on them."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(answer_kind(row["answers"][0]), []).append(row)
    rng = random.Random(seed)
    return [row for kind in sorted(by_kind) for row in rng.sample(by_kind[kind], min(per_kind, len(by_kind[kind])))]


def expert_context(expert: Any, text: str) -> str:
    """The prompt text ``expert`` gives when it reads ``text``, exactly as the app writes it."""
    from experts import ExpertReport, ExpertResult

    return ExpertReport([ExpertResult(expert.name, expert.name, expert.context_label, "ok", text=text)]).context or ""


def with_own_caption(pipe: Pipeline, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the caption ``pipe`` writes of each image (what :class:`experts.AdapterCaptioner`
    over it answers, greedy) as the caption expert's text in the prompt, before a row's own expert
    text (as the app puts them when the own caption is on and another expert is ticked)."""
    from experts import AdapterCaptioner

    captioner = AdapterCaptioner(pipe)
    images = sorted({r["image"] for r in rows})
    written = pipe.generate_batch(
        [captioner.instruction] * len(images), images, max_new_tokens=captioner.max_new_tokens, temperature=0.0
    )
    contexts = {i: expert_context(captioner, c.strip()) for i, c in zip(images, written)}
    return [{**r, "context": "\n".join(filter(None, [contexts[r["image"]], r.get("context")]))} for r in rows]


def evaluate_vqa(
    pipe: Pipeline,
    rows: list[dict[str, Any]],
    *,
    prompt: str = "{question}",
    judge: str = "free",
    with_images: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Greedy replies to every row (without its image if not ``with_images``: the blind
    baseline; with a row's ``context``, expert text, in the prompt as the app puts it), judged
    free-form or by exact match; returns the accuracy overall and per answer kind
    (:func:`accuracy_by_kind`), and every reply."""
    if judge not in JUDGES:
        raise ValueError(f"judge must be one of {', '.join(JUDGES)}; got {judge!r}")

    def message(row: dict[str, Any]) -> list[dict[str, str]]:
        user = {"role": "user", "content": prompt.format(question=row["question"])}
        return [{**user, "context": row["context"]} if row.get("context") else user]

    predictions = []
    for i in tqdm(range(0, len(rows), batch_size), desc="vqa", unit="batch", mininterval=5):
        chunk = rows[i : i + batch_size]
        answers = pipe.generate_batch(
            [message(r) for r in chunk],
            [r["image"] for r in chunk] if with_images else None,
            max_new_tokens=max_new_tokens,
        )
        for row, answer in zip(chunk, answers):
            score = vqa_score(answer, row["answers"], judge)
            predictions.append({**row, "prediction": answer.strip(), "score": score})
    kinds = [answer_kind(p["answers"][0]) for p in predictions]
    return {
        **accuracy_by_kind(kinds, [p["score"] for p in predictions]),
        "judge": judge,
        "count": len(predictions),
        "predictions": predictions,
    }


# -- perplexity ---------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_perplexity(
    pipe: Pipeline, data: str | Path | list[dict[str, Any]], *, batch_size: int = 8, max_len: int | None = None
) -> dict[str, Any]:
    """Perplexity over the answer tokens of instruction rows (a file or a list of sample dicts),
    tokenised exactly as in training (no augmentation)."""
    model = pipe.model
    spec = SourceConfig(path=str(data)) if isinstance(data, (str, Path)) else SourceConfig(samples=data)
    cfg = TrainConfig(stage="finetune", data=DataConfig(sources=[spec], max_len=max_len))
    source = load_source(spec, cfg, model.config.max_seq_len)
    acfg = model.adapter_config
    transform = ImageTransform(acfg.image_encoder, acfg.channel_order, augment=False) if acfg.image_encoder else None
    encoder = PromptEncoder(pipe.tokenizer, pipe.template, pipe.system_prompt)
    dataset = TrainingData([source], encoder, transform, "", seed=0)
    collate = Collate(pipe.tokenizer.pad_id)
    nll, tokens, skipped = 0.0, 0, 0
    for has_image in (False, True):
        rows = [r for r in range(len(source)) if bool(source.has_image[r]) == has_image]
        for i in tqdm(range(0, len(rows), batch_size), desc="perplexity", unit="batch", disable=not rows):
            batch = collate([dataset[(0, r, 0, r)] for r in rows[i : i + batch_size]])
            skipped += len(batch.skipped)
            if batch.input_ids is None:
                continue
            images = None
            if batch.images is not None:
                images = batch.images.to(pipe.device, next(model.image_encoder.parameters()).dtype)
            logits = model(batch.input_ids.to(pipe.device), images).float()
            targets = batch.labels[:, 1:].to(pipe.device)
            predicted = logits[:, :-1].reshape(-1, logits.shape[-1])
            nll += F.cross_entropy(predicted, targets.reshape(-1), ignore_index=IGNORE, reduction="sum").item()
            tokens += int((targets != IGNORE).sum())
    return {
        "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "nll_per_token": nll / tokens if tokens else float("nan"),
        "answer_tokens": tokens,
        "skipped": skipped,
    }


# -- MME ----------------------------------------------------------------------------------------------


def read_mme_subtask(root: Path, name: str) -> list[dict[str, str]]:
    """Questions of one MME subtask, in either of the release's two folder layouts."""
    folder = root / name
    if (folder / "questions_answers_YN").is_dir():
        pairs = [(q, folder / "images") for q in sorted((folder / "questions_answers_YN").glob("*.txt"))]
    else:
        pairs = [(q, folder) for q in sorted(folder.glob("*.txt"))]
    rows = []
    for question_file, image_dir in pairs:
        candidates = (image_dir / (question_file.stem + suffix) for suffix in IMAGE_SUFFIXES)
        image = next((c for c in candidates if c.is_file()), None)
        if image is None:
            log.warning("MME %s: no image for %s", name, question_file.name)
            continue
        for line in question_file.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 2:
                rows.append({"image": str(image), "question": parts[0], "answer": parts[1]})
    return rows


def write_mme_answers(
    pipe: Pipeline, mme_dir: str | Path, out_dir: str | Path, *, batch_size: int = 8, max_new_tokens: int = 30
) -> dict[str, int]:
    """Answer every MME subtask found in ``mme_dir``; returns the questions answered per subtask."""
    mme_dir, out_dir = Path(mme_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in MME_SUBTASKS:
        if not (mme_dir / name).is_dir():
            continue
        rows = read_mme_subtask(mme_dir, name)
        lines = []
        for i in tqdm(range(0, len(rows), batch_size), desc=name, unit="batch"):
            chunk = rows[i : i + batch_size]
            system = {"role": "system", "content": MME_SYSTEM}
            prompts = [[system, {"role": "user", "content": r["question"]}] for r in chunk]
            answers = pipe.generate_batch(prompts, [r["image"] for r in chunk], max_new_tokens=max_new_tokens)
            for row, answer in zip(chunk, answers):
                clean = " ".join(answer.split())  # the results file is tab-separated, one line per question
                lines.append(f"{Path(row['image']).name}\t{row['question']}\t{row['answer']}\t{clean}")
        (out_dir / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written[name] = len(lines)
    if not written:
        raise FileNotFoundError(f"No MME subtask folders ({', '.join(MME_SUBTASKS[:3])}, …) in {mme_dir}")
    return written


# -- command line -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--adapter", help="adapter file (its base is read from it)")
    shared.add_argument("--base", help="base model (default: the one the adapter names)")
    shared.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    shared.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16/fp16 on GPU, fp32 on CPU")
    shared.add_argument("--batch-size", type=int, default=8)
    vqa = commands.add_parser("vqa", parents=[shared], help="VQA accuracy of free-form replies, per answer kind")
    vqa.add_argument("--data", required=True, help="VQA-style JSON (easy-VQA questions.json or dicts)")
    vqa.add_argument("--limit", type=int, help="first N questions only")
    vqa.add_argument("--per-kind", type=int, help="N questions of each answer kind (yes, no, shape, colour, text)")
    vqa.add_argument("--seed", type=int, default=0, help="which questions --per-kind draws (default 0)")
    vqa.add_argument("--prompt", default="{question}", help="prompt template around {question}")
    vqa.add_argument("--judge", choices=JUDGES, default="free", help="free: judged from the words (default); exact")
    vqa.add_argument("--no-image", action="store_true", help="ask without the images (the blind baseline)")
    vqa.add_argument(
        "--own-caption",
        action="store_true",
        help="the model's own caption of each image in the prompt (caption expert)",
    )
    vqa.add_argument("--max-new-tokens", type=int, default=24)
    vqa.add_argument("--out", help="write every prediction to this JSONL file")
    ppl = commands.add_parser("perplexity", parents=[shared], help="perplexity on held-out instructions")
    ppl.add_argument("--data", required=True, help="instruction JSON/JSONL (or a caption CSV)")
    ppl.add_argument("--max-len", type=int, help="token limit per sample (default per source type)")
    mme = commands.add_parser("mme", parents=[shared], help="MME answer files for eval_tool/calculation.py")
    mme.add_argument("--mme-dir", required=True, help="MME_Benchmark_release_version folder")
    mme.add_argument("--out", required=True, help="folder for <subtask>.txt answer files")
    mme.add_argument("--max-new-tokens", type=int, default=30)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "vqa" and args.own_caption and args.no_image:
        parser.error("--own-caption captions the images: it needs them (drop --no-image)")
    pipe = load_pipeline(args.base, args.adapter, device=args.device, dtype=args.dtype)
    if args.command == "vqa":
        rows = read_vqa(args.data, args.limit)
        rows = per_kind_sample(rows, args.per_kind, args.seed) if args.per_kind else rows
        result = evaluate_vqa(
            pipe,
            with_own_caption(pipe, rows) if args.own_caption else rows,
            prompt=args.prompt,
            judge=args.judge,
            with_images=not args.no_image,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        if args.out:
            Path(args.out).write_text("".join(json.dumps(p) + "\n" for p in result["predictions"]))
        print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))
    elif args.command == "perplexity":
        print(json.dumps(evaluate_perplexity(pipe, args.data, batch_size=args.batch_size, max_len=args.max_len)))
    else:
        written = write_mme_answers(
            pipe, args.mme_dir, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
        )
        print(json.dumps({"written": written, "next": f"python eval_tool/calculation.py --results_dir {args.out}"}))


if __name__ == "__main__":
    main()
