"""Training data: sources (caption CSV, instruction JSON/JSONL, VQA JSON, in-memory samples),
the data config, tokenisation with a loss on answer tokens only, image preprocessing, and the
collation of batches. A bad row is skipped and counted; it never stops an epoch.

Accepted rows (a source holds one type; ``format: auto`` tells them apart):

* captions: CSV/TSV with columns ``url`` (image path or URL) and ``caption``, or dicts with
  ``image``/``url`` and ``caption`` (a string, or a list: one is drawn per use).
* instructions: Alpaca ``{"instruction", "input", "output", "image"?}``; LLaVA
  ``{"image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}`` (the ``<image>``
  placeholder is dropped: the image reaches the model through the adapter); or our own
  ``{"image"?, "messages": [{"role", "content"}, ...]}``. Every answer turn is trained.
* vqa: ``{"image", "question", "answer" | "answers"}`` dicts, or easy-VQA's ``[question, answer,
  image_id]`` rows with images at ``images/<id>.png`` beside the JSON.
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import re
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import yaml
from PIL import Image

from llama_adapter.config import IMAGE_ENCODERS
from llama_adapter.errors import InputError
from llama_adapter.images import image_to_tensor, open_image
from llama_adapter.prompts import render, with_system
from llama_adapter.tokenizer import Tokenizer

from .config import MAX_LEN_DEFAULTS, SourceConfig, TrainConfig

log = logging.getLogger(__name__)

IGNORE = -100
SKIP_REASONS = ("image_missing", "image_unreadable", "empty_answer", "malformed", "no_answer_tokens")
FORMATS = ("captions", "instructions", "vqa")
IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# csv's default field limit (128 KiB) is below some long captions and conversations.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class BadRow(Exception):
    """A row that cannot become a training sample; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Source:
    """Rows of one file (or in-memory list), read once; turned into samples lazily."""

    name: str
    format: str
    rows: Sequence[Any]
    has_image: np.ndarray
    group: str
    weight: float
    max_len: int
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)


# -- reading sources --------------------------------------------------------------------------------


def read_data_config(path: str | Path) -> list[SourceConfig]:
    """Sources of a data YAML: the official ``META: [paths]`` (entries may also be
    ``{path, weight, ...}`` mappings) or ``sources: [...]``. Relative paths start at the YAML's
    folder when the file is there."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("sources", data.get("META")) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} needs a list under META (official layout) or sources")
    sources = []
    for entry in entries:
        spec = {"path": entry} if isinstance(entry, str) else dict(entry)
        candidate = path.parent / spec["path"]
        if not Path(spec["path"]).is_absolute() and candidate.exists():
            spec["path"] = str(candidate)
        sources.append(SourceConfig(**spec))
    return sources


def load_sources(cfg: TrainConfig, model_max_len: int) -> list[Source]:
    specs = (read_data_config(cfg.data.config) if cfg.data.config else []) + list(cfg.data.sources)
    if not specs:
        raise ValueError("No training data: set data.config (a YAML listing files) or data.sources")
    sources = [load_source(s, cfg, model_max_len) for s in specs]
    names = [s.name for s in sources]
    for i, s in enumerate(sources):
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{i}"
    return sources


def load_source(spec: SourceConfig, cfg: TrainConfig, model_max_len: int) -> Source:
    root = Path(spec.image_root) if spec.image_root else None
    if spec.samples is not None:
        rows = spec.samples if isinstance(spec.samples, list) else [spec.samples[i] for i in range(len(spec.samples))]
        name = spec.name or "samples"
        fmt = spec.format if spec.format != "auto" else detect_format(rows, name)
    else:
        path = Path(spec.path)
        if not path.is_file():
            raise FileNotFoundError(f"Data file not found: {path}")
        name = spec.name or path.name
        root = root or path.parent
        if path.suffix.lower() in (".csv", ".tsv"):
            rows, fmt = read_caption_table(path), "captions"
        elif path.suffix.lower() in (".json", ".jsonl"):
            rows = read_json_rows(path)
            fmt = spec.format if spec.format != "auto" else detect_format(rows, name)
        else:
            raise ValueError(f"{path}: expected a .csv/.tsv (captions) or .json/.jsonl (instructions, VQA) file")
    if fmt not in FORMATS:
        raise ValueError(f"Source {name}: format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if cfg.stage in ("joint", "all"):
        group = spec.group or ("pretrain" if fmt == "captions" else "finetune")
    else:
        group = cfg.stage
    max_len = spec.max_len or cfg.data.max_len or MAX_LEN_DEFAULTS["captions" if fmt == "captions" else "instructions"]
    has_image = np.fromiter((row_has_image(r, fmt) for r in rows), dtype=bool, count=len(rows))
    source = Source(name, fmt, rows, has_image, group, spec.weight, min(max_len, model_max_len), root)
    log.info(
        "Data %s: %d %s rows (%d with an image), weight %g, group %s, max %d tokens",
        name,
        len(rows),
        fmt,
        int(has_image.sum()),
        spec.weight,
        group,
        source.max_len,
    )
    return source


def read_caption_table(path: Path) -> list[tuple[str, Any]]:
    """(image, caption) pairs of the official tab-separated file (comma-separated also works).
    A row missing a field becomes ``(None, None)``: it is skipped, and counted, when drawn."""
    with open(path, newline="", encoding="utf-8") as f:
        header_line = f.readline()
        f.seek(0)
        reader = csv.reader(f, delimiter="\t" if "\t" in header_line else ",")
        header = [h.strip().lower() for h in next(reader, [])]
        image_col = _column(header, ("url", "image", "image_path", "path"), path)
        caption_col = _column(header, ("caption", "text"), path)
        rows: list[tuple[str, Any]] = []
        for record in reader:
            if not record:
                continue
            if len(record) <= max(image_col, caption_col):
                rows.append((None, None))
            else:
                rows.append((record[image_col], record[caption_col]))
    return rows


def _column(header: list[str], names: tuple[str, ...], path: Path) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise ValueError(f"{path}: no column named {' or '.join(names)} in the header {header}")


def read_json_rows(path: Path) -> list[Any]:
    """A JSON list, or JSON Lines (a line that is not JSON becomes ``None``: skipped when drawn)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows: list[Any] = []
        for line in text.splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(None)
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); each row can go on its own line in a .jsonl file") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of samples")
    return data


def detect_format(rows: Sequence[Any], name: str) -> str:
    for row in rows:
        if isinstance(row, (list, tuple)):
            return "vqa"
        if isinstance(row, dict):
            if "question" in row:
                return "vqa"
            if "caption" in row:
                return "captions"
            return "instructions"
    raise ValueError(f"Source {name} has no readable rows")


def row_has_image(row: Any, fmt: str) -> bool:
    if fmt == "captions":
        return True
    if fmt == "vqa" and isinstance(row, (list, tuple)):
        return True
    return isinstance(row, dict) and bool(row.get("image"))


# -- rows → conversations ---------------------------------------------------------------------------


def row_to_example(row: Any, source: Source, caption_prompt: str, rng: np.random.Generator) -> tuple[list, Any]:
    """(messages, image reference or None) of one row; raises :class:`BadRow`."""
    if source.format == "captions":
        image, caption = (row.get("image") or row.get("url"), row.get("caption")) if isinstance(row, dict) else row
        if isinstance(caption, (list, tuple)):
            caption = caption[int(rng.integers(len(caption)))] if caption else None
        if image is None and caption is None:
            raise BadRow("malformed", "row without image and caption")
        messages = [{"role": "user", "content": caption_prompt}, {"role": "assistant", "content": _text(caption)}]
        return messages, image or None
    if source.format == "vqa":
        if isinstance(row, (list, tuple)) and len(row) >= 3:
            question, answer, image = row[0], row[1], f"images/{row[2]}.png"
        elif isinstance(row, dict):
            question, answer, image = row.get("question"), vqa_answer(row), row.get("image")
        else:
            raise BadRow("malformed", f"not a VQA row: {str(row)[:80]}")
        messages = [{"role": "user", "content": _text(question)}, {"role": "assistant", "content": _text(answer)}]
        return messages, image
    if not isinstance(row, dict):
        raise BadRow("malformed", f"not an instruction row: {str(row)[:80]}")
    if "conversations" in row or "messages" in row:
        return conversation_messages(row.get("conversations", row.get("messages"))), row.get("image")
    if "instruction" in row and "output" in row:
        user: dict[str, Any] = {"role": "user", "content": _text(row["instruction"])}
        if _text(row.get("input")):
            user["context"] = _text(row["input"])
        return [user, {"role": "assistant", "content": _text(row["output"])}], row.get("image")
    raise BadRow("malformed", f"row has neither conversations/messages nor instruction/output: {sorted(row)[:6]}")


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def vqa_answer(row: dict[str, Any]) -> str | None:
    """The answer of a VQA row: ``answer``, else the most common of ``answers`` (VQAv2 dicts or strings)."""
    if row.get("answer") is not None:
        return row["answer"]
    answers = [a.get("answer") if isinstance(a, dict) else a for a in row.get("answers") or []]
    answers = [a for a in answers if a]
    return collections.Counter(answers).most_common(1)[0][0] if answers else None


def conversation_messages(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise BadRow("malformed", "conversation is empty or not a list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRow("malformed", "conversation turn is not a mapping")
        role = ROLES.get(str(turn.get("from", turn.get("role"))).lower())
        if role is None:
            raise BadRow("malformed", f"unknown speaker {turn.get('from', turn.get('role'))!r}")
        content = IMAGE_PLACEHOLDER.sub(" ", _text(turn.get("value", turn.get("content")))).strip()
        messages.append({"role": role, "content": content})
    return messages


# -- tokenisation ---------------------------------------------------------------------------------


class PromptEncoder:
    """Token ids and loss labels of a conversation. The prompt part is the exact text inference
    renders (``llama_adapter.prompts.render``); each answer is followed by the token that ends an
    answer at inference (ChatML's ``<|im_end|>``, EOS for Alpaca)."""

    def __init__(self, tokenizer: Tokenizer, template: str, system_prompt: str | None = None) -> None:
        self.tokenizer, self.template, self.system_prompt = tokenizer, template, system_prompt
        self.bos = template == "alpaca"  # as Pipeline.encode: chat templates write their own start
        question, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
        probe = [question, answer, question]
        first = render(probe[:1], template, tokenizer)
        full = render(probe, template, tokenizer)
        if not full.startswith(first + "a"):
            raise ValueError(f"The {template!r} template does not extend a conversation turn by turn: cannot train")
        after = tokenizer.encode(full[len(first) + 1 :], bos=False)
        self.end_in_template = bool(after) and after[0] in tokenizer.stop_ids
        self.end_id = after[0] if self.end_in_template else tokenizer.eos_id

    def encode(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        messages = with_system(messages, self.system_prompt)
        ids: list[int] = []
        labels: list[int] = []
        covered: str | None = None
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if not message["content"]:
                raise BadRow("empty_answer", f"answer {i} is empty")
            try:
                prompt = render(messages[:i], self.template, self.tokenizer)
            except InputError as e:
                raise BadRow("malformed", str(e)) from e
            if covered is None:
                segment = self.tokenizer.encode(prompt, bos=self.bos)
            else:
                if not prompt.startswith(covered):
                    raise BadRow("malformed", "the template rewrites earlier turns")
                segment = self.tokenizer.encode(prompt[len(covered) :], bos=False)
                if self.end_in_template and segment[:1] == [self.end_id]:
                    segment = segment[1:]  # already added after the previous answer
            answer = self.tokenizer.encode(message["content"], bos=False) + [self.end_id]
            ids += segment + answer
            labels += [IGNORE] * len(segment) + answer
            covered = prompt + message["content"]
        if covered is None:
            raise BadRow("empty_answer", "no answer in the conversation")
        return ids, labels


# -- images -----------------------------------------------------------------------------------------


class ImageTransform:
    """The encoder's preprocessing. Training augmentation is the official one: random resized crop
    (scale 0.9-1, ratio 3/4-4/3, bicubic), drawn from a per-sample seed so that the data is the
    same whatever the worker, process count or resume point."""

    def __init__(self, encoder: str, channel_order: str, augment: bool) -> None:
        self.encoder, self.channel_order, self.augment = encoder, channel_order, augment
        spec = IMAGE_ENCODERS[encoder]
        self.size = spec.image_size
        self.mean = torch.tensor(spec.mean).view(3, 1, 1)
        self.std = torch.tensor(spec.std).view(3, 1, 1)

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        if not self.augment:
            return image_to_tensor(img, self.encoder, self.channel_order)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, h, w = T.RandomResizedCrop.get_params(img, scale=(0.9, 1.0), ratio=(0.75, 4 / 3))
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], T.InterpolationMode.BICUBIC)
        x = TF.to_tensor(img)
        if self.channel_order == "BGR":
            x = x.flip(0)
        return (x - self.mean) / self.std


def load_image(ref: Any, root: Path | None) -> Image.Image:
    """Open an image reference (path, URL, bytes, PIL image); raises :class:`BadRow`."""
    if isinstance(ref, str) and ref.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(ref, timeout=20) as response:
                ref = response.read()
        except OSError as e:
            raise BadRow("image_missing", f"download failed: {ref} ({e})") from e
    elif isinstance(ref, (str, Path)):
        path = Path(ref).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            raise BadRow("image_missing", f"not found: {path}")
        ref = path
    try:
        return open_image(ref)
    except InputError as e:
        raise BadRow("image_unreadable", f"{str(ref)[:200]}: {e}") from e


# -- dataset and batches ----------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence((seed, epoch, position)).generate_state(1, np.uint32)[0])


class TrainingData(torch.utils.data.Dataset):
    """Samples keyed by ``(source, row, epoch, position)``: the key fixes the caption drawn and
    the crop, so a sample is the same in any process and after a resume."""

    def __init__(
        self,
        sources: list[Source],
        encoder: PromptEncoder,
        transform: ImageTransform | None,
        caption_prompt: str,
        seed: int,
    ) -> None:
        self.sources, self.encoder, self.transform = sources, encoder, transform
        self.caption_prompt, self.seed = caption_prompt, seed

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict[str, Any]:
        src, row, epoch, position = key
        source = self.sources[src]
        has_image = bool(source.has_image[row])
        item: dict[str, Any] = {"kind": (source.group, has_image), "source": source.name, "row": row}
        seed = sample_seed(self.seed, epoch, position)
        try:
            messages, image_ref = row_to_example(
                source.rows[row], source, self.caption_prompt, np.random.default_rng(seed)
            )
            ids, labels = self.encoder.encode(messages)
            image = None
            if has_image:
                if self.transform is None:
                    raise BadRow("malformed", "row has an image but the model has no image encoder")
                if image_ref is None:
                    raise BadRow("image_missing", "no image given")
                image = self.transform(load_image(image_ref, source.root), seed)
        except BadRow as e:
            return {**item, "skip": e.reason, "detail": str(e)}
        except Exception as e:  # a row no rule foresaw must not end an epoch either; the log names it
            return {**item, "skip": "malformed", "detail": f"{type(e).__name__}: {e}"}
        cut = max(0, len(ids) - source.max_len)
        if cut:
            ids, labels = ids[: source.max_len], labels[: source.max_len]
        if all(label == IGNORE for label in labels[1:]):
            return {**item, "skip": "no_answer_tokens", "detail": f"the prompt fills all {source.max_len} tokens"}
        return {**item, "input_ids": ids, "labels": labels, "image": image, "cut": cut}


@dataclass
class Batch:
    """A micro-batch of one kind. ``input_ids`` is ``None`` when every row was skipped."""

    kind: tuple[str, bool]
    input_ids: torch.Tensor | None
    labels: torch.Tensor | None
    images: torch.Tensor | None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0  # real (not padding) tokens
    truncated: int = 0
    truncated_tokens: int = 0


class Collate:
    """Right-pads a list of samples into a :class:`Batch` (causal attention needs no mask there;
    the padded positions carry no loss)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        good = [it for it in items if "skip" not in it]
        skipped = [{k: it[k] for k in ("source", "row", "skip", "detail")} for it in items if "skip" in it]
        batch = Batch(items[0]["kind"], None, None, None, skipped)
        if not good:
            return batch
        width = max(len(it["input_ids"]) for it in good)
        batch.input_ids = torch.full((len(good), width), self.pad_id, dtype=torch.long)
        batch.labels = torch.full((len(good), width), IGNORE, dtype=torch.long)
        for i, it in enumerate(good):
            batch.input_ids[i, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
            batch.labels[i, : len(it["labels"])] = torch.tensor(it["labels"])
        if batch.kind[1]:
            batch.images = torch.stack([it["image"] for it in good])
        batch.tokens = sum(len(it["input_ids"]) for it in good)
        batch.truncated = sum(1 for it in good if it["cut"])
        batch.truncated_tokens = sum(it["cut"] for it in good)
        return batch
