"""The demo model's reproduction report, from the recipe's JSON (``assets/demo-metrics.json`` and
``assets/demo-ablations.json``): ``assets/report/`` (a markdown page and PNG plots) and the
README's tables, rewritten between their markers. ``python -m train.recipes.demo --report``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

KINDS = ("yes", "no", "shape", "colour")
BEGIN, END = "<!-- demo-metrics:begin -->", "<!-- demo-metrics:end -->"
# What the issue asks of the demo model (held-out, questions as typed).
TARGETS = {
    "easy_vqa": 0.90,
    "easy_vqa_no": 0.85,
    "balanced": 0.90,
    "blind_balanced_max": 0.55,
    "ocr_with": 0.75,
    "ocr_without_max": 0.10,
    "photos": 8,
    "perplexity_max": 1.96,
}


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a log line shows."""
    vqa = metrics["easy_vqa"]
    out = {
        "easy_vqa": round(vqa["free"]["accuracy"], 3),
        "balanced_yes_no": round(vqa["free"].get("balanced_yes_no", float("nan")), 3),
        "by_kind": {k: round(v["accuracy"], 3) for k, v in vqa["free"]["by_kind"].items()},
        "blind_balanced": round(vqa["free_without_image"].get("balanced_yes_no", float("nan")), 3),
        "one_word": round(vqa["one_word"]["accuracy"], 3),
        "ocr_with": round(metrics["ocr"]["with_expert"]["accuracy"], 3),
        "ocr_without": round(metrics["ocr"]["without_expert"]["accuracy"], 3),
        "perplexity": round(metrics["perplexity"], 3),
    }
    if "free_with_own_caption" in vqa:
        captioned = vqa["free_with_own_caption"]
        out["own_caption"] = round(captioned["accuracy"], 3)
        out["own_caption_balanced_yes_no"] = round(captioned.get("balanced_yes_no", float("nan")), 3)
    if "photos" in metrics:
        p = metrics["photos"]
        out["photos_named"] = p["with_tagger"]["named_top_tag"]
        if "with_own_caption" in p:
            out["photos_named_own_caption"] = p["with_tagger_and_own_caption"]["named_top_tag"]
            out["photos_made_up_own_caption"] = p["with_own_caption"]["made_up_shape"]
    return out


def _kind(result: dict[str, Any], kind: str) -> float | None:
    return result["by_kind"].get(kind, {}).get("accuracy")


def results_table(metrics: dict[str, Any]) -> str:
    vqa, ocr = metrics["easy_vqa"], metrics["ocr"]
    free, blind, majority = vqa["free"], vqa["free_without_image"], vqa["majority"]
    t = TARGETS
    rows = [
        "| measure (held-out, questions as typed) | demo model | baseline | target |",
        "|---|---:|---:|---:|",
        f"| easy-VQA, {free['items']} questions (yes, no, shape, colour in equal shares) | {pct(free['accuracy'])} "
        f'| without the image {pct(blind["accuracy"])}; majority answer "{majority["answer"]}" '
        f"{pct(majority['accuracy'])} | ≥ {pct(t['easy_vqa'])} |",
    ]
    for kind in KINDS:
        target = f"≥ {pct(t['easy_vqa_no'])}" if kind == "no" else ""
        rows.append(
            f"| – answer {kind} ({free['by_kind'].get(kind, {}).get('items', 0)}) | {pct(_kind(free, kind))} "
            f"| without the image {pct(_kind(blind, kind))} | {target} |"
        )
    rows += [
        f"| – balanced yes/no (mean of the yes and no accuracies) | {pct(free.get('balanced_yes_no'))} "
        f"| without the image {pct(blind.get('balanced_yes_no'))} (target ≤ {pct(t['blind_balanced_max'])}); "
        f"majority {pct(majority.get('balanced_yes_no'))} | ≥ {pct(t['balanced'])} |",
        f'| easy-VQA, the same questions + "Answer with one word." (exact match) | {pct(vqa["one_word"]["accuracy"])} '
        "| | |",
    ]
    captioned = vqa.get("free_with_own_caption")
    if captioned:
        rows.append(
            "| easy-VQA, the same questions with the model's own caption of the image in the prompt (the "
            "`caption-adapter` expert of `python app.py`; see `experts.measured_defaults`) "
            f"| {pct(captioned['accuracy'])} | the same questions bare {pct(free['accuracy'])} "
            f"| ≥ {pct(t['easy_vqa'])} |"
        )
        for kind in KINDS:
            target = f"≥ {pct(t['easy_vqa_no'])}" if kind == "no" else ""
            rows.append(
                f"| – answer {kind}, own caption | {pct(_kind(captioned, kind))} | bare {pct(_kind(free, kind))} "
                f"| {target} |"
            )
        rows.append(
            f"| – balanced yes/no, own caption | {pct(captioned.get('balanced_yes_no'))} "
            f"| bare {pct(free.get('balanced_yes_no'))} | ≥ {pct(t['balanced'])} |"
        )
    rows += [
        f"| rendered-text questions asked freely ({ocr['with_expert']['items']}) | with the OCR expert "
        f"{pct(ocr['with_expert']['accuracy'])} | without {pct(ocr['without_expert']['accuracy'])} "
        f"(target ≤ {pct(t['ocr_without_max'])}) | ≥ {pct(t['ocr_with'])} |",
    ]
    if "photos" in metrics:
        p = metrics["photos"]
        rows.append(
            f'| real photos (scikit-image, never trained on), "{p["question"]}", tagger on: the reply names its '
            f"top tag | {p['with_tagger']['named_top_tag']} of {p['items']} | tagger off: a made-up shape in "
            f"{p['without_tagger']['made_up_shape']} of {p['items']} | ≥ {t['photos']} of 10 |"
        )
        if "with_own_caption" in p:
            named = p["with_tagger_and_own_caption"]["named_top_tag"]
            rows.append(
                f"| – the same with the model's own caption on too | {named} of {p['items']} "
                f"| tagger off, own caption on: a made-up shape in "
                f"{p['with_own_caption']['made_up_shape']} of {p['items']} | ≥ {t['photos']} of 10 |"
            )
    base = metrics.get("perplexity_base")
    rows.append(
        f"| perplexity, held-out instructions | {metrics['perplexity']:.2f} | "
        f"{'base SmolLM2 ' + format(base, '.2f') if base else ''} | ≤ {t['perplexity_max']} |"
    )
    return "\n".join(rows)


def timings_table(metrics: dict[str, Any]) -> str:
    rows = ["| phase | wall | CPU (user + sys) | CPU / 2 cores |", "|---|---:|---:|---:|"]
    for phase, t in metrics.get("timings", {}).items():
        rows.append(f"| {phase} | {t['wall_s']:,} s | {t['cpu_s']:,} s | {t['cpu_s'] / 2:,.0f} s |")
    return "\n".join(rows)


def ablations_table(ablations: dict[str, Any]) -> str:
    rows = [
        "| variant | easy-VQA | balanced yes/no | balanced, no image | one-word | OCR with expert | OCR without "
        "| perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in ablations.items():
        v = m["easy_vqa"]
        rows.append(
            f"| {name} | {pct(v['free']['accuracy'])} | {pct(v['free'].get('balanced_yes_no'))} "
            f"| {pct(v['free_without_image'].get('balanced_yes_no'))} | {pct(v['one_word']['accuracy'])} "
            f"| {pct(m['ocr']['with_expert']['accuracy'])} | {pct(m['ocr']['without_expert']['accuracy'])} "
            f"| {m['perplexity']:.2f} |"
        )
    return "\n".join(rows)


def is_current(ablations: dict[str, Any] | None) -> bool:
    """Ablations measured the current way (free-form, per kind); older files lack the fields."""
    return bool(ablations) and all("free" in m.get("easy_vqa", {}) for m in ablations.values())


def readme_block(metrics: dict[str, Any], ablations: dict[str, Any] | None) -> str:
    """The README's demo-model tables (generated: never edit them by hand)."""
    parts = [
        "<!-- generated by `python -m train.recipes.demo --report` from assets/demo-metrics.json; do not edit -->",
        "",
        results_table(metrics),
        "",
        "Time of the recipe run that built it (`assets/demo-recipe.log`):",
        "",
        timings_table(metrics),
    ]
    if is_current(ablations):
        parts += ["", "Ablations (`assets/demo-ablations.json`):", "", ablations_table(ablations)]
    return "\n".join(parts)


def update_readme(readme: Path, block: str) -> None:
    """Replace what stands between the README's markers with ``block``."""
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"{readme} needs exactly one {BEGIN} … {END} block for the demo model's tables")
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text), encoding="utf-8")


# -- plots --------------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same data, the same bytes
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_loss(curve: list[dict[str, Any]], path: Path) -> None:
    """Training loss of each kind of batch: the pretrain group (image batches: captions, easy-VQA,
    pictures) and the finetune group (with images: OCR, tags, own captions; text: instructions),
    through the joint stage and the reading stage after it (``stage`` 1)."""
    fig, ax = _figure()
    kinds = sorted({k for row in curve for k in row["by_kind"]})
    for kind in kinds:
        points = [(row["step"], row["by_kind"][kind]) for row in curve if kind in row["by_kind"]]
        ax.plot(*zip(*points), label=kind)
    reading = [row["step"] for row in curve if row.get("stage", 0) == 1]
    if reading:
        ax.axvline(reading[0], color="grey", linestyle=":", label="reading stage from here")
    ax.set(xlabel="step", ylabel="loss (answer tokens)", title="Training loss by group and kind of batch")
    ax.legend()
    _save(fig, path)


def plot_accuracy(curve: list[dict[str, Any]], path: Path) -> None:
    fig, ax = _figure()
    steps = [p["step"] for p in curve]
    for kind in KINDS:
        ax.plot(
            steps, [100 * p["easy_vqa"].get(kind, float("nan")) for p in curve], marker="o", label=f"easy-VQA {kind}"
        )
    if all("balanced_yes_no_own_caption" in p for p in curve):
        own = [100 * (p["balanced_yes_no_own_caption"] or float("nan")) for p in curve]
        ax.plot(steps, own, marker="^", linestyle="--", label="yes/no balanced, own caption")
    ax.plot(steps, [100 * p["ocr_with_expert"] for p in curve], marker="s", linestyle="--", label="text, OCR on")
    ax.set(xlabel="step", ylabel="held-out accuracy (%)", ylim=(0, 100), title="Held-out accuracy through training")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_experts(metrics: dict[str, Any], path: Path) -> None:
    fig, ax = _figure()
    labels, on, off = (
        ["rendered text"],
        [metrics["ocr"]["with_expert"]["accuracy"]],
        [metrics["ocr"]["without_expert"]["accuracy"]],
    )
    if "free_with_own_caption" in metrics["easy_vqa"]:
        labels.append("easy-VQA: own caption")
        on.append(metrics["easy_vqa"]["free_with_own_caption"]["accuracy"])
        off.append(metrics["easy_vqa"]["free"]["accuracy"])
    if "photos" in metrics:
        p = metrics["photos"]
        labels.append("photos: names the top tag")
        on.append(p["with_tagger"]["accuracy"])
        off.append(0.0)  # without the tagger the reply has no tag to name
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [100 * v for v in on], 0.4, label="expert on")
    ax.bar([i + 0.2 for i in x], [100 * v for v in off], 0.4, label="expert off")
    ax.set_xticks(list(x), labels)
    ax.set(ylabel="held-out accuracy (%)", ylim=(0, 100), title="With and without the experts")
    ax.legend()
    _save(fig, path)


def plot_ablations(ablations: dict[str, Any], path: Path) -> None:
    fig, ax = _figure(8, 4)
    names = list(ablations)
    measures = {
        "easy-VQA": lambda m: m["easy_vqa"]["free"]["accuracy"],
        "balanced yes/no": lambda m: m["easy_vqa"]["free"].get("balanced_yes_no", 0.0),
        "no image, balanced": lambda m: m["easy_vqa"]["free_without_image"].get("balanced_yes_no", 0.0),
        "text, OCR on": lambda m: m["ocr"]["with_expert"]["accuracy"],
    }
    width = 0.8 / len(measures)
    for j, (label, get) in enumerate(measures.items()):
        ax.bar(
            [i + (j - 1.5) * width for i in range(len(names))],
            [100 * get(ablations[n]) for n in names],
            width,
            label=label,
        )
    ax.set_xticks(range(len(names)), [n.replace(", ", ",\n").replace(" into ", "\ninto ") for n in names], fontsize=7)
    ax.set(ylabel="held-out accuracy (%)", ylim=(0, 100), title="Ablations (one shared, smaller budget)")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_report(metrics: dict[str, Any], ablations: dict[str, Any] | None, out_dir: Path) -> Path:
    """``out_dir/README.md`` and its plots; returns the page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        "# Demo model: reproduction report",
        "",
        "Generated by `python -m train.recipes.demo --report` from `assets/demo-metrics.json`"
        + (" and `assets/demo-ablations.json`" if is_current(ablations) else "")
        + ". Replies to questions typed as people type them, judged from their words: yes/no by the "
        "first word, other answers by the answer word appearing (plurals and grey/gray accepted; a "
        "reply naming two colours or two shapes is wrong). See `train/evaluate.py`.",
        "",
        "## Results",
        "",
        results_table(metrics),
        "",
        "## Time",
        "",
        timings_table(metrics),
    ]
    if metrics.get("loss_curve"):
        plot_loss(metrics["loss_curve"], out_dir / "loss.png")
        sections += ["", "## Training loss", "", "![training loss](loss.png)"]
    if metrics.get("accuracy_curve"):
        plot_accuracy(metrics["accuracy_curve"], out_dir / "accuracy.png")
        sections += [
            "",
            "## Held-out accuracy through training",
            "",
            "Every checkpoint on a subset (12 easy-VQA questions per kind, 16 rendered-text questions):",
            "",
            "![accuracy through training](accuracy.png)",
        ]
    plot_experts(metrics, out_dir / "experts.png")
    sections += ["", "## With and without the experts", "", "![experts](experts.png)"]
    if is_current(ablations):
        plot_ablations(ablations, out_dir / "ablations.png")
        sections += ["", "## Ablations", "", ablations_table(ablations), "", "![ablations](ablations.png)"]
    sections += ["", "## Sample replies", ""]
    for title, samples in (
        ("easy-VQA, with the image", metrics["easy_vqa"]["free"]["samples"]),
        ("easy-VQA, without the image", metrics["easy_vqa"]["free_without_image"]["samples"]),
        ("rendered text, OCR on", metrics["ocr"]["with_expert"]["samples"]),
        ("rendered text, OCR off", metrics["ocr"]["without_expert"]["samples"]),
    ):
        sections += [f"**{title}**", "", "| question | reply | reference |", "|---|---|---|"]
        sections += [f"| {s['question']} | {_cell(s['reply'])} | {s['reference']} |" for s in samples]
        sections.append("")
    if "photos" in metrics:
        columns = [c for c in PHOTO_COLUMNS if c in metrics["photos"]["samples"][0]]
        sections += [
            "**real photos**",
            "",
            "| photo | top tag | " + " | ".join(PHOTO_COLUMNS[c] for c in columns) + " |",
            "|---|---|" + "---|" * len(columns),
        ]
        sections += [
            f"| {s['photo']} | {s['top_tag']} | " + " | ".join(_cell(s[c]) for c in columns) + " |"
            for s in metrics["photos"]["samples"]
        ]
    page = out_dir / "README.md"
    page.write_text("\n".join(sections) + "\n", encoding="utf-8")
    return page


PHOTO_COLUMNS = {
    "with_tagger": "tagger on",
    "without_tagger": "tagger off",
    "own_caption": "the model's own caption",
    "with_own_caption": "own caption on",
    "with_tagger_and_own_caption": "tagger and own caption on",
}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
