"""The demo model's report and README tables are generated from the recipe's JSON, never typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from train.recipes import demo_report

ROOT = Path(__file__).resolve().parent.parent


def result(accuracy: float, by_kind: dict[str, float], balanced: float | None = None) -> dict:
    r = {"accuracy": accuracy, "items": 8, "by_kind": {k: {"accuracy": v, "items": 2} for k, v in by_kind.items()}}
    if balanced is not None:
        r["balanced_yes_no"] = balanced
    return {**r, "samples": [{"question": "Is there a red shape?", "reply": "No, it is | blue.", "reference": "no"}]}


@pytest.fixture
def metrics() -> dict:
    kinds = {"yes": 1.0, "no": 0.5, "shape": 1.0, "colour": 0.75}
    return {
        "easy_vqa": {
            "free": result(0.8125, kinds, 0.75),
            "free_without_image": result(0.25, {"yes": 0.5, "no": 0.5, "shape": 0.0, "colour": 0.0}, 0.5),
            "majority": {"answer": "yes", **result(0.25, {"yes": 1.0, "no": 0.0, "shape": 0.0, "colour": 0.0}, 0.5)},
            "one_word": result(0.875, kinds),
        },
        "ocr": {"with_expert": result(0.8, {"text": 0.8}), "without_expert": result(0.05, {"text": 0.05})},
        "photos": {
            "items": 10,
            "question": "What is in this picture?",
            "with_tagger": {"named_top_tag": 9, "accuracy": 0.9},
            "without_tagger": {"made_up_shape": 1},
            "samples": [
                {"photo": "coffee", "top_tag": "espresso", "with_tagger": "An espresso.", "without_tagger": "?"}
            ],
        },
        "perplexity": 1.9,
        "perplexity_base": 3.9,
        "timings": {"total": {"wall_s": 5000, "cpu_s": 9000}},
        "loss_curve": [
            {"step": s, "stage": stage, "loss": 2 / s, "by_kind": {"pretrain/image": 2 / s, "finetune/text": 1 / s}}
            for s, stage in ((10, 0), (20, 0), (30, 1))
        ],
        "accuracy_curve": [
            {
                "step": s,
                "easy_vqa": kinds,
                "balanced_yes_no": 0.75,
                "balanced_yes_no_own_caption": 0.9,
                "ocr_with_expert": 0.5,
            }
            for s in (100, 200)
        ],
    }


def test_tables_show_the_json_numbers(metrics):
    block = demo_report.readme_block(metrics, None)
    assert "| easy-VQA, 8 questions (yes, no, shape, colour in equal shares) | 81.2 % |" in block
    assert "| – answer no (2) | 50.0 % | without the image 50.0 % | ≥ 85.0 % |" in block
    assert "| – balanced yes/no (mean of the yes and no accuracies) | 75.0 % | without the image 50.0 %" in block
    assert 'majority answer "yes" 25.0 %' in block and "| 9 of 10 |" in block
    assert "with the OCR expert 80.0 % | without 5.0 %" in block
    assert "| total | 5,000 s | 9,000 s | 4,500 s |" in block
    assert "Ablations" not in block  # none given


def test_the_own_caption_row_shows_its_numbers_and_only_when_measured(metrics):
    assert "own caption" not in demo_report.readme_block(metrics, None)
    metrics["easy_vqa"]["free_with_own_caption"] = result(0.9375, {"yes": 1.0, "no": 0.75, "shape": 1.0}, 0.875)
    block = demo_report.readme_block(metrics, None)
    assert "measured_defaults`) | 93.8 % | the same questions bare 81.2 % | ≥ 90.0 % |" in block
    assert "| – answer no, own caption | 75.0 % | bare 50.0 % | ≥ 85.0 % |" in block
    assert "| – balanced yes/no, own caption | 87.5 % | bare 75.0 % | ≥ 90.0 % |" in block
    assert demo_report.headline(metrics)["own_caption_balanced_yes_no"] == 0.875


def test_photos_with_the_own_caption_show_their_numbers_and_replies_only_when_measured(metrics, tmp_path):
    assert "own caption on too" not in demo_report.readme_block(metrics, None)
    photos = metrics["photos"]
    photos["with_tagger_and_own_caption"] = {"named_top_tag": 8, "accuracy": 0.8}
    photos["with_own_caption"] = {"made_up_shape": 0}
    photos["samples"][0] |= {
        "own_caption": "Not a shape.",
        "with_own_caption": "I can't tell.",
        "with_tagger_and_own_caption": "It looks like an espresso.",
    }
    block = demo_report.readme_block(metrics, None)
    assert "| – the same with the model's own caption on too | 8 of 10 " in block
    assert "own caption on: a made-up shape in 0 of 10 |" in block
    page = demo_report.write_report(metrics, None, tmp_path / "report").read_text()
    row = "| coffee | espresso | An espresso. | ? | Not a shape. | I can't tell. | It looks like an espresso. |"
    assert row in page
    assert demo_report.headline(metrics)["photos_made_up_own_caption"] == 0


def test_ablations_in_the_old_format_are_left_out(metrics):
    old = {"reference": {"easy_vqa": {"accuracy": 0.4}, "ocr": {}, "perplexity": 2.6}}
    assert not demo_report.is_current(old) and "Ablations" not in demo_report.readme_block(metrics, old)
    new = {"reference": {k: metrics[k] for k in ("easy_vqa", "ocr", "perplexity")}}
    assert "| reference | 81.2 % | 75.0 % | 50.0 % | 87.5 % | 80.0 % | 5.0 % | 1.90 |" in demo_report.readme_block(
        metrics, new
    )


def test_readme_block_is_replaced_between_its_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{demo_report.BEGIN}\nold table\n{demo_report.END}\nafter\n")
    demo_report.update_readme(readme, "new table")
    assert readme.read_text() == f"# Title\n\nbefore\n{demo_report.BEGIN}\nnew table\n{demo_report.END}\nafter\n"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="demo-metrics"):
        demo_report.update_readme(readme, "x")
    assert readme.read_text() == "# no markers\n"  # nothing lost


def test_report_page_and_plots(metrics, tmp_path):
    ablations = {"reference": {k: metrics[k] for k in ("easy_vqa", "ocr", "perplexity")}}
    page = demo_report.write_report(metrics, ablations, tmp_path / "report")
    text = page.read_text()
    for name in ("loss.png", "accuracy.png", "experts.png", "ablations.png"):
        assert f"]({name})" in text
        with Image.open(tmp_path / "report" / name) as image:
            assert image.format == "PNG" and image.width >= 400
    assert "No, it is \\| blue." in text  # a reply cannot break the table
    again = demo_report.write_report(metrics, ablations, tmp_path / "again")
    assert (tmp_path / "again" / "loss.png").read_bytes() == (tmp_path / "report" / "loss.png").read_bytes()
    assert again.read_text() == text


def test_the_readme_tables_are_the_shipped_metrics():
    """The README's demo-model tables are exactly what the shipped JSON generates."""
    metrics = json.loads((ROOT / "assets" / "demo-metrics.json").read_text())
    ablations_file = ROOT / "assets" / "demo-ablations.json"
    ablations = json.loads(ablations_file.read_text()) if ablations_file.is_file() else None
    readme = (ROOT / "README.md").read_text()
    block = readme.split(demo_report.BEGIN)[1].split(demo_report.END)[0]
    assert block.strip() == demo_report.readme_block(metrics, ablations).strip()
