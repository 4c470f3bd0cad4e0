"""The demo data generator (train/recipes/demo_data/) at a small scale: reproducible bytes, disjoint
splits, readable images, and answers that agree with what the images show."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.recipes import demo_data as dd
from train.recipes.demo_data.common import COLORS, SHAPES, SPLITS, scaled
from train.recipes.demo_data.easyvqa import SHORT_SUFFIX, parse_question
from train.recipes.demo_data.instructions import signature
from train.recipes.demo_data.photos import imagenet_labels

SCALE = 0.03
ROOT = Path(__file__).resolve().parent.parent


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path, kind: str, split: str) -> list:
    if kind == "captions":
        lines = (root / f"captions_{split}.tsv").read_text(encoding="utf-8").splitlines()
        assert lines[0] == "url\tcaption"
        return [tuple(line.split("\t")) for line in lines[1:]]
    return json.loads((root / f"{kind}_{split}.json").read_text(encoding="utf-8"))


def images_of(root: Path, split: str) -> set[str]:
    images = {url for url, _ in load(root, "captions", split)}
    for kind in ("vqa", "ocr", "photos"):
        images |= {item["image"] for item in load(root, kind, split)}
    return images


def pixel_counts(path: Path) -> collections.Counter:
    return collections.Counter(map(tuple, np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).tolist()))


def gpt_turns(item: dict) -> list[str]:
    return [turn["value"] for turn in item["conversations"] if turn["from"] == "gpt"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "out"
    paths = dd.generate(root, seed=0, scale=SCALE)
    assert set(paths) == {f"{k}_{s}" for k in ("captions", "vqa", "ocr", "photos", "instructions") for s in SPLITS} | {
        "examples",
        "manifest",
    }
    return root


def test_same_seed_same_bytes_in_a_fresh_process(data, tmp_path):
    """A second run in another interpreter, with another hash seed (so set and dict orders that
    depended on string hashes would change), writes identical files, images included."""
    other = tmp_path / "again"
    code = f"from train.recipes import demo_data; demo_data.generate({str(other)!r}, seed=0, scale={SCALE})"
    env = {**os.environ, "PYTHONHASHSEED": "4321"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, cwd=ROOT)
    assert tree(other) == tree(data)


def test_other_seed_other_data(data, tmp_path):
    other = tmp_path / "seed1"
    dd.generate(other, seed=1, scale=SCALE)
    for name in dd.DATA_FILES:
        assert sha(other / name) != sha(data / name), name
    assert json.loads((other / "manifest.json").read_text())["seed"] == 1


def test_manifest_matches_files(data):
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["version"] == dd.VERSION and manifest["seed"] == 0 and manifest["scale"] == SCALE
    assert set(manifest["sha256"]) == set(dd.DATA_FILES) | {"examples/examples.json"}
    for name, digest in manifest["sha256"].items():
        assert sha(data / name) == digest, name
    for name in dd.DATA_FILES:
        kind, split = name.split(".")[0].split("_")
        assert manifest["counts"][name] == len(load(data, kind, split)), name
    assert manifest["images"]["count"] == sum(1 for _ in data.rglob("*.png"))
    for split in SPLITS:
        wanted = {kind: scaled(dd.DEFAULT_COUNTS[f"{kind}_{split}"], SCALE) for kind in ("ocr", "instructions")}
        assert manifest["counts"][f"instructions_{split}.json"] == wanted["instructions"]
        # OCR counts images, each asked several questions
        ocr = load(data, "ocr", split)
        assert len({item["image"] for item in ocr}) == wanted["ocr"] < len(ocr)


def test_splits_share_no_image(data):
    train, heldout = images_of(data, "train"), images_of(data, "heldout")
    assert train and heldout and not train & heldout
    train_bytes = {sha(data / p) for p in train}
    assert not train_bytes & {sha(data / p) for p in heldout}


def test_every_image_exists_and_opens(data):
    for split in SPLITS:
        for rel in images_of(data, split):
            path = data / rel
            assert path.is_file() and not Path(rel).is_absolute(), rel
            with Image.open(path) as image:
                image.load()
                width, height = image.size
            if rel.startswith("images/ocr/"):
                assert 160 <= min(width, height) and max(width, height) <= 480, (rel, image.size)
            elif rel.startswith("images/scenes/"):
                assert 64 <= width == height <= 224, (rel, image.size)


def test_answers_are_never_empty(data):
    for split in SPLITS:
        assert all(caption.strip() for _, caption in load(data, "captions", split))
        for kind in ("vqa", "ocr"):
            for item in load(data, kind, split):
                assert item["short_answer"].strip() and all(t.strip() for t in gpt_turns(item)), item
        for item in load(data, "instructions", split):
            answers = gpt_turns(item) if "conversations" in item else [item["output"]]
            assert answers and all(a.strip() for a in answers), item


def test_easy_vqa_answers(data):
    import easy_vqa

    vocabulary = set(easy_vqa.get_answers())
    for split in SPLITS:
        items = load(data, "vqa", split)
        assert {item["source"] for item in items} == {"easy-vqa"}
        styles = collections.Counter()
        for item in items:
            assert item["short_answer"] in vocabulary
            question, answer = item["conversations"][0]["value"], item["conversations"][1]["value"]
            if question.endswith(SHORT_SUFFIX):
                styles["short", item["kind"]] += 1
                assert answer == item["short_answer"] and item["form"] == "one-word"
            else:
                styles["sentence", item["kind"]] += 1
                assert item["form"] == "free"
                if item["short_answer"] in ("yes", "no"):
                    assert item["kind"] == item["short_answer"]
                    assert answer.startswith(item["short_answer"].capitalize() + ",")
                else:
                    assert re.search(rf"\b{item['short_answer']}\b", answer), item
        kinds = ("yes", "no", "shape", "colour")
        assert all(styles["short", k] == styles["sentence", k] > 0 for k in kinds), styles
        if split == "heldout":  # easy-VQA's own test questions, the four answer kinds in equal shares
            assert max(styles["sentence", k] for k in kinds) - min(styles["sentence", k] for k in kinds) <= 1
        else:  # "Describe this image." is only asked as typed
            assert styles["sentence", "describe"] > 0 == styles["short", "describe"]


def attributes_from_pixels(path: Path) -> tuple[str, str] | None:
    """(colour, None) of an easy-VQA image by its most common non-background pixel."""
    counts = pixel_counts(path)
    del counts[tuple(Image.open(path).convert("RGB").getpixel((0, 0)))]
    rgb = counts.most_common(1)[0][0]
    return next((name for name, value in COLORS.items() if value == rgb), None)


def test_training_yes_no_questions_come_in_contrastive_pairs_balanced_per_subject(data):
    items = [i for i in load(data, "vqa", "train") if i["kind"] in ("yes", "no") and i["form"] == "free"]
    answers_per_question = collections.defaultdict(collections.Counter)
    for item in items:
        answers_per_question[item["conversations"][0]["value"]][item["kind"]] += 1
    # Every question text is asked of an image where the answer is yes and of one where it is no.
    assert all(c["yes"] == c["no"] > 0 for c in answers_per_question.values()), answers_per_question
    negated = [q for q in answers_per_question if re.search(r"\bnot\b|\bno\b", q)]
    assert 0.15 < len(negated) / len(answers_per_question) < 0.5
    # Each subject (a colour, a shape) is asked about with both answers equally often.
    per_subject = collections.defaultdict(collections.Counter)
    for item in items:
        words = set(re.findall(r"[a-z]+", item["conversations"][0]["value"].lower()))
        for subject in words & (set(COLORS) | set(SHAPES)):
            per_subject[subject][item["kind"]] += 1
    assert set(per_subject) == set(COLORS) | set(SHAPES)
    assert all(c["yes"] == c["no"] for c in per_subject.values()), per_subject


def test_training_colour_answers_match_the_pixels(data):
    for item in load(data, "vqa", "train"):
        if item["kind"] == "colour":
            assert attributes_from_pixels(data / item["image"]) == item["short_answer"], item
        elif item["kind"] in ("yes", "no") and item["form"] == "free":
            # The sentence says what the image shows: its colour, read here from the pixels.
            assert attributes_from_pixels(data / item["image"]) in item["conversations"][1]["value"], item


NEGATED = ("does the image not contain", "is there not", "is no ")


def test_captions_agree_with_easy_vqa_answers_and_pixels(data):
    import easy_vqa

    for split, questions in (("train", easy_vqa.get_train_questions()), ("heldout", easy_vqa.get_test_questions())):
        by_image = collections.defaultdict(list)
        for question, answer, image_id in zip(*questions):
            by_image[image_id].append((question, answer))
        rows = [(url, cap) for url, cap in load(data, "captions", split) if url.startswith("images/easyvqa/")]
        assert rows
        for url, caption in rows:
            words = set(re.findall(r"[a-z]+", caption.lower()))
            for question, answer in by_image[int(Path(url).stem)]:
                if question.startswith("what"):
                    assert answer in words, (url, caption, question, answer)
                else:
                    subject = next(w for w in re.findall(r"[a-z]+", question) if w in COLORS or w in SHAPES)
                    present = (answer == "yes") != question.startswith(NEGATED)
                    assert (subject in words) == present, (url, caption, question, answer)
            # Independently of the answers: the shape's pixels have the caption's colour.
            counts = pixel_counts(data / url)
            del counts[tuple(Image.open(data / url).convert("RGB").getpixel((0, 0)))]  # the background
            (color,) = [c for c in COLORS if c in words]
            assert counts.most_common(1)[0][0] == COLORS[color], (url, caption)


def test_scene_captions_name_colours_that_are_drawn(data):
    for split in SPLITS:
        rows = [(url, cap) for url, cap in load(data, "captions", split) if url.startswith("images/scenes/")]
        assert rows
        for url, caption in rows:
            words = re.findall(r"[a-z]+", caption.lower())
            colors = {w for w in words if w in COLORS}
            assert colors and any(w.rstrip("s") in SHAPES for w in words), caption
            pixels = pixel_counts(data / url)
            for color in colors:
                assert pixels[COLORS[color]] >= 20, (url, caption)


def test_heldout_ocr_answers_are_unseen(data):
    train = {item["short_answer"].casefold() for item in load(data, "ocr", "train")}
    heldout = {item["short_answer"].casefold() for item in load(data, "ocr", "heldout")}
    assert heldout and not train & heldout


def test_ocr_answers_can_be_read_off_the_image_text(data):
    sources = set()
    for split in SPLITS:
        for item in load(data, "ocr", split):
            sources.add(item["source"])
            assert item["short_answer"] in item["text"].replace("\n", " "), item
            # Asked freely; the reply holds the text exactly as printed.
            assert item["short_answer"] in item["conversations"][1]["value"], item
    assert {"ocr-sign", "ocr-receipt"} <= sources


def test_photos_answer_with_the_top_tag_or_honestly(data):
    labels = set(imagenet_labels())
    for split in SPLITS:
        items = load(data, "photos", split)
        assert items
        for item in items:
            tags = item["tags"]
            assert {label for label, _ in tags} <= labels and len({label for label, _ in tags}) == len(tags)
            assert [p for _, p in tags] == sorted((p for _, p in tags), reverse=True) and sum(p for _, p in tags) <= 1
            assert item["short_answer"] == tags[0][0] and tags[0][0] in item["answer_with_tags"]
            assert not any(word in item["answer_without_tags"] for word in (*SHAPES, *COLORS))


def test_receipt_totals_are_the_sums_of_their_items(data):
    receipts = [item for s in SPLITS for item in load(data, "ocr", s) if item["source"] == "ocr-receipt"]
    assert receipts
    for item in receipts:
        store, *lines, total_line = item["text"].split("\n")
        cents = [int(re.fullmatch(r"[A-Z ]+ \$(\d+)\.(\d\d)", line).expand(r"\1\2")) for line in lines]
        total = re.fullmatch(r"TOTAL \$(\d+)\.(\d\d)", total_line)
        assert 3 <= len(cents) <= 5 and int(total.expand(r"\1\2")) == sum(cents), item["text"]


def test_instructions_are_correct_and_disjoint(data):
    splits = {s: load(data, "instructions", s) for s in SPLITS}
    signatures = {s: [signature(item) for item in items] for s, items in splits.items()}
    for s in SPLITS:
        assert len(set(signatures[s])) == len(signatures[s]), s
    assert not set(signatures["train"]) & set(signatures["heldout"])
    for item in (i for items in splits.values() for i in items):
        text = " ".join(gpt_turns(item)) if "conversations" in item else item["output"]
        for a, op, b, result in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", text):
            assert int(a) + (1 if op == "+" else -1) * int(b) == int(result), text
        for a, b, result in re.findall(r"(\d+) times (\d+) is (\d+)", text):
            assert int(a) * int(b) == int(result), text
        for word, n in re.findall(r'"(\w+)" has (\d+) letters', text):
            assert len(word) == int(n), text


def test_examples(data):
    examples = json.loads((data / "examples" / "examples.json").read_text())
    assert 8 <= len(examples) <= 12
    names = {e["image"] for e in examples}
    assert {"circle.png", "exit_sign.png", "receipt.png", "label.png"} <= names
    for example in examples:
        assert example["question"].strip() and example["answer"].strip()
        with Image.open(data / "examples" / example["image"]) as image:
            image.load()
    by_name = {e["image"]: e for e in examples}
    assert by_name["exit_sign.png"]["answer"] == "EXIT" and by_name["receipt.png"]["answer"] == "$16.55"


def test_refuses_to_write_over_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        dd.generate(tmp_path, scale=SCALE)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unknown_easy_vqa_template_is_an_error():
    with pytest.raises(ValueError):
        parse_question("how many shapes are there?", "one", 0)


def test_the_reading_stage_finds_every_negated_yes_no_question_and_only_those():
    """The reading stage trains the negated questions once more (`demo.NEGATION`): it must find
    them as easy-VQA's template parser does, in its own questions and in ours."""
    import random

    import easy_vqa

    from train.recipes import demo
    from train.recipes.demo_data.easyvqa import Subject, yes_no_question

    texts, answers, ids = easy_vqa.get_test_questions()
    parsed = [parse_question(t, a, i) for t, a, i in zip(texts, answers, ids)]
    yes_no = [q for q in parsed if q.kind == "yes_no"]
    assert {bool(demo.NEGATION.search(q.text)) for q in yes_no if q.negated} == {True}
    assert not any(demo.NEGATION.search(q.text) for q in parsed if not q.negated)
    rng = random.Random(0)
    for subject in (Subject("red", "circle"), Subject("red", None), Subject(None, "circle")):
        for negated in (False, True):
            asked = {yes_no_question(subject, negated, rng) for _ in range(60)}
            assert {bool(demo.NEGATION.search(q)) for q in asked} == {negated}, asked
