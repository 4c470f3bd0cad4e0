"""Training data, data order, config and schedule: file formats, prompts and loss masks,
truncation, bad rows, image preprocessing, deterministic sharded plans, official hyperparameters."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from llama_adapter.config import IMAGE_ENCODERS
from llama_adapter.images import image_to_tensor
from llama_adapter.prompts import format_alpaca, render
from llama_adapter.tiny import ByteTokenizer
from train.builders import lr_factor
from train.config import DataConfig, SourceConfig, TrainConfig, load_config, parse_override
from train.data import (
    IGNORE,
    BadRow,
    Collate,
    ImageTransform,
    PromptEncoder,
    Source,
    TrainingData,
    load_image,
    load_source,
    read_caption_table,
    read_data_config,
    row_to_example,
)
from train.sampler import DataPlan, StepBatches
from train.synthetic import draw_shape, write_synthetic

RNG = np.random.default_rng(0)


def cfg_for(stage: str = "finetune", **data) -> TrainConfig:
    return TrainConfig(stage=stage, data=DataConfig(**data))


def source_of(rows: list, fmt: str, **kw) -> Source:
    has_image = np.array([isinstance(r, dict) and bool(r.get("image")) or fmt == "captions" for r in rows])
    return Source("s", fmt, rows, has_image, kw.get("group", "finetune"), 1.0, kw.get("max_len", 512))


# -- files -----------------------------------------------------------------------------------------


def test_official_caption_table_with_double_tabs(tmp_path):
    # The official docs show "url\t\tcaption"; a short row is kept and skipped when drawn.
    path = tmp_path / "cc.csv"
    path.write_text("url\t\tcaption\n/img/1.jpg\t\tA dog.\n/img/2.jpg\t\ttwo\ttabs\nbroken\n")
    assert read_caption_table(path) == [("/img/1.jpg", "A dog."), ("/img/2.jpg", "two"), (None, None)]
    comma = tmp_path / "c.csv"
    comma.write_text('image,caption\na.png,"A cat, sitting."\n')
    assert read_caption_table(comma) == [("a.png", "A cat, sitting.")]


def test_data_config_meta_list_and_weighted_sources(tmp_path):
    paths = write_synthetic(tmp_path, rows=3)
    assert [s.path for s in read_data_config(paths["finetune_yaml"])] == [
        str(paths["instructions"]),
        str(paths["conversations"]),
    ]
    own = tmp_path / "mix.yaml"
    own.write_text(
        "sources:\n  - path: captions.csv\n    weight: 0.5\n  - {path: instructions.json, group: pretrain}\n"
    )
    specs = read_data_config(own)
    assert [(s.weight, s.group) for s in specs] == [(0.5, None), (1.0, "pretrain")]
    joint = cfg_for("joint")
    assert load_source(specs[0], joint, 256).group == "pretrain"
    assert load_source(specs[1], joint, 256).group == "pretrain"
    assert load_source(SourceConfig(path=str(paths["instructions"])), joint, 256).group == "finetune"
    caps = load_source(SourceConfig(path=str(paths["captions"])), cfg_for("finetune"), 80)
    assert (caps.format, caps.group, caps.max_len, bool(caps.has_image.all())) == ("captions", "finetune", 80, True)


def test_row_formats_become_conversations(tmp_path):
    instr = source_of([], "instructions")
    messages, image = row_to_example(
        {
            "image": "x.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A cat."},
                {"from": "human", "value": "Colour?"},
                {"from": "gpt", "value": " Black. "},
            ],
        },
        instr,
        "",
        RNG,
    )
    assert image == "x.jpg"
    assert [m["content"] for m in messages] == ["What is it?", "A cat.", "Colour?", "Black."]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    alpaca, _ = row_to_example({"instruction": "Add.", "input": "2 and 3", "output": "5"}, instr, "", RNG)
    assert alpaca[0] == {"role": "user", "content": "Add.", "context": "2 and 3"}
    no_input, _ = row_to_example({"instruction": "Hi.", "input": "", "output": "Hello"}, instr, "", RNG)
    assert "context" not in no_input[0]
    vqa = source_of([], "vqa")
    easy, image = row_to_example(["what shape?", "circle", 7], vqa, "", RNG)
    assert (easy[1]["content"], image) == ("circle", "images/7.png")
    v2, _ = row_to_example(
        {"image": "i.jpg", "question": "q?", "answers": [{"answer": "no"}] * 2 + [{"answer": "yes"}]}, vqa, "", RNG
    )
    assert v2[1]["content"] == "no"
    caps = source_of([], "captions")
    cap, image = row_to_example(("a.png", ["one", "two"]), caps, "Describe.", np.random.default_rng(1))
    assert cap[0]["content"] == "Describe." and cap[1]["content"] in ("one", "two") and image == "a.png"
    with pytest.raises(BadRow) as bad:
        row_to_example({"text": "no fields"}, instr, "", RNG)
    assert bad.value.reason == "malformed"


# -- prompts and loss masks ---------------------------------------------------------------------------


def test_alpaca_loss_covers_only_answers_and_eos():
    tok = ByteTokenizer()
    enc = PromptEncoder(tok, "alpaca")
    assert enc.end_id == tok.eos_id and enc.bos
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, labels = enc.encode(messages)
    prompt = tok.encode(format_alpaca("Hi"), bos=True)  # the official prompt, as inference encodes it
    assert ids == prompt + tok.encode("Hello", bos=False) + [tok.eos_id]
    assert labels == [IGNORE] * len(prompt) + ids[len(prompt) :]
    two = [*messages, {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure"}]
    ids2, labels2 = enc.encode(two)
    answers = [tok.decode([i for i, lab in zip(ids2, labels2) if lab != IGNORE and i != tok.eos_id])]
    assert answers == ["HelloSure"] and labels2.count(tok.eos_id) == 2
    assert tok.decode(ids2).startswith(tok.decode(ids))
    with pytest.raises(BadRow) as bad:
        enc.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
    assert bad.value.reason == "empty_answer"


@pytest.mark.slow
def test_chat_template_prompt_matches_inference_and_ends_with_im_end():
    from llama_adapter.weights import load_base

    tok = load_base("smollm2-135m").tokenizer
    enc = PromptEncoder(tok, "chat")
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert enc.end_id == im_end and not enc.bos
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    ids, labels = enc.encode(messages)
    prompt = tok.encode(render(messages[:1], "chat", tok), bos=False)  # what Pipeline.encode gives
    assert ids[: len(prompt)] == prompt
    answer = tok.encode("Hello there.", bos=False) + [im_end]
    assert labels[len(prompt) : len(prompt) + len(answer)] == answer
    # The whole sequence is the chat template's own rendering of the conversation, one <|im_end|> per turn.
    full = render([*messages, {"role": "user", "content": "x"}], "chat", tok)
    assert full.startswith(tok.hf.decode(ids))


def test_truncation_is_counted_and_answerless_rows_skipped(tmp_path):
    tok = ByteTokenizer()
    rows = [{"instruction": "Hi", "output": "A long answer " * 5}, {"instruction": "x" * 300, "output": "cut"}]
    source = source_of(rows, "instructions", max_len=160)
    data = TrainingData([source], PromptEncoder(tok, "alpaca"), None, "", seed=0)
    first, second = data[(0, 0, 0, 0)], data[(0, 1, 0, 1)]
    assert len(first["input_ids"]) == 160 and first["cut"] > 0
    assert second["skip"] == "no_answer_tokens"
    batch = Collate(pad_id=0)([first, second])
    assert (batch.truncated, batch.truncated_tokens) == (1, first["cut"])
    assert [s["skip"] for s in batch.skipped] == ["no_answer_tokens"]
    assert batch.input_ids.shape == (1, 160) and batch.tokens == 160


def test_missing_and_corrupt_images_are_bad_rows_not_errors(tmp_path):
    paths = write_synthetic(tmp_path, rows=2, bad_rows=True)
    source = load_source(SourceConfig(path=str(paths["captions"])), cfg_for("pretrain", max_len=256), 256)
    data = TrainingData(
        [source], PromptEncoder(ByteTokenizer(), "alpaca"), ImageTransform("efficientnet-lite0", "RGB", True), "C", 0
    )
    items = [data[(0, i, 0, i)] for i in range(len(source))]
    assert [it.get("skip") for it in items] == [None, None, "image_missing", "image_unreadable", "empty_answer"]
    assert items[0]["image"].shape == (3, 224, 224)
    batch = Collate(pad_id=0)(items[2:])
    assert batch.input_ids is None and len(batch.skipped) == 3


# -- images -------------------------------------------------------------------------------------------


def test_image_transform_matches_encoder_and_is_seeded():
    img = draw_shape("circle", "red", size=300)
    spec = IMAGE_ENCODERS["clip-vit-l-14"]
    wide = img.resize((300, 200))
    plain = ImageTransform("clip-vit-l-14", "RGB", augment=False)(wide, 0)
    assert torch.equal(plain, image_to_tensor(wide, "clip-vit-l-14", "RGB"))
    aug = ImageTransform("clip-vit-l-14", "RGB", augment=True)
    a, b, c = aug(img, 1), aug(img, 1), aug(img, 2)
    assert a.shape == (3, 224, 224) and torch.equal(a, b) and not torch.equal(a, c)
    white = Image.new("RGB", (256, 256), "white")
    expected = (1 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(aug(white, 0)[:, 100, 100], expected, atol=1e-5)
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    rgb = ImageTransform("efficientnet-lite0", "RGB", True)(red, 0)
    bgr = ImageTransform("efficientnet-lite0", "BGR", True)(red, 0)
    assert torch.equal(rgb.flip(0), bgr) and rgb[0, 5, 5] > rgb[2, 5, 5]


# -- data order ---------------------------------------------------------------------------------------


def plan_sources() -> list[Source]:
    a = Source("a", "captions", list(range(10)), np.ones(10, bool), "pretrain", 0.5, 96)
    b = Source("b", "instructions", list(range(12)), np.arange(12) % 3 == 0, "finetune", 2.0, 512)
    return [a, b]


def test_plan_is_deterministic_weighted_and_homogeneous():
    plan = DataPlan(plan_sources(), global_batch=4, seed=3)
    # a: 5 of 10 (weight 0.5); b: 2 x (8 text + 4 image).
    assert plan.samples_per_kind == {("pretrain", True): 5, ("finetune", False): 16, ("finetune", True): 8}
    assert plan.steps_per_epoch == 1 + 4 + 2 and plan.dropped_per_epoch == 1
    for epoch in range(2):
        seen = []
        for i in range(plan.steps_per_epoch):
            kind, keys = plan.step(epoch, i)
            assert len(keys) == 4
            assert {(plan.sources[s].group, bool(plan.sources[s].has_image[r])) for s, r, _, _ in keys} == {kind}
            assert [p for *_, p in keys] == list(range(4 * i, 4 * i + 4))
            seen += [(s, r) for s, r, _, _ in keys]
        assert sum(1 for s, _ in seen if s == 1) == 24  # both copies of b, nothing dropped from it
    again = DataPlan(plan_sources(), global_batch=4, seed=3)
    assert [again.step(1, i) for i in range(7)] == [plan.step(1, i) for i in range(7)]
    rows = [[k[:2] for k in plan.step(epoch, i)[1]] for epoch in (0, 1) for i in range(7)]
    assert rows[:7] != rows[7:]  # a new order every epoch
    assert DataPlan(plan_sources(), 4, seed=4).fingerprint() != plan.fingerprint()


def test_ranks_and_accumulation_split_a_step_the_same_way():
    plan = DataPlan(plan_sources(), global_batch=4, seed=0)

    def batches(world, accum, rank):
        return list(StepBatches(plan, 2, 5, rank=rank, world=world, accum=accum, batch=2))

    one = batches(1, 2, 0)
    r0, r1 = batches(2, 1, 0), batches(2, 1, 1)
    assert one[0::2] == r0 and one[1::2] == r1
    assert len(one) == 6 and all(len(b) == 2 for b in one)
    with pytest.raises(ValueError, match="No full global batch"):
        DataPlan(plan_sources()[:1], global_batch=8, seed=0)


# -- config and schedule --------------------------------------------------------------------------------


def test_overrides_and_official_7b_hyperparameters(tmp_path):
    assert parse_override("optim.blr=1e-3") == (["optim", "blr"], 0.001)
    assert parse_override("data.sources=[{path: a.json}]")[1] == [{"path": "a.json"}]
    path = tmp_path / "c.yaml"
    path.write_text("stage: pretrain\noptim: {grad_accum: 2}\n")
    cfg = load_config(path, ["optim.clip_grad=1.0", "data.batch_size=4"])
    assert (cfg.stage, cfg.optim.grad_accum, cfg.optim.clip_grad, cfg.data.batch_size) == ("pretrain", 2, 1.0, 4)
    with pytest.raises(ValueError, match="optim.bogus"):
        load_config(None, ["optim.bogus=1"])
    eff = 4 * 8  # 8 GPUs x batch 4, as exps/*.sh
    pre = TrainConfig(stage="pretrain")
    assert pre.group_hparams("pretrain", eff) == pytest.approx((1.0e-4 * eff / 256, 0.05))
    assert (pre.stage_default("epochs"), pre.stage_default("warmup_epochs")) == (3.0, 0.1)
    fine = TrainConfig(stage="finetune")
    assert fine.group_hparams("finetune", eff) == pytest.approx((1.0e-3 * eff / 256, 0.02))
    joint = TrainConfig(stage="joint")
    assert joint.group_hparams("pretrain", eff) == pre.group_hparams("pretrain", eff)
    assert joint.group_hparams("finetune", eff) == fine.group_hparams("finetune", eff)
    tuned = load_config(None, ["stage=joint", "optim.groups={finetune: {lr: 0.01}}", "optim.weight_decay=0"])
    assert tuned.group_hparams("finetune", eff) == (0.01, 0.0)
    assert tuned.group_hparams("pretrain", eff) == pytest.approx((1.0e-4 * eff / 256, 0.0))


def test_schedule_is_official_warmup_then_half_cosine():
    f = {s: lr_factor(s, warmup=10, total=110, floor=0.0) for s in (0, 5, 10, 60, 110)}
    assert f == pytest.approx({0: 0.0, 5: 0.5, 10: 1.0, 60: 0.5, 110: 0.0})
    assert lr_factor(110, warmup=10, total=110, floor=0.1) == pytest.approx(0.1)
    official = 0.5 * (1 + math.cos(math.pi * (3.3 - 1) / (4 - 1)))  # lr_sched at fractional epoch 3.3 of 4
    assert lr_factor(33, warmup=10, total=40, floor=0.0) == pytest.approx(official)


def test_jsonl_instructions_with_a_broken_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{not json\n")
    source = load_source(SourceConfig(path=str(path)), cfg_for(), 256)
    data = TrainingData([source], PromptEncoder(ByteTokenizer(), "alpaca"), None, "", 0)
    assert "skip" not in data[(0, 0, 0, 0)] and data[(0, 1, 0, 1)]["skip"] == "malformed"

    def broken(messages):
        raise RuntimeError("unforeseen")

    data.encoder = SimpleNamespace(encode=broken)  # a row failing in a way no rule foresaw: skipped too
    assert data[(0, 0, 0, 0)]["skip"] == "malformed" and data[(0, 0, 0, 0)]["detail"] == "RuntimeError: unforeseen"


def test_image_urls_are_fetched_and_dead_links_skipped(tmp_path):
    import functools
    import http.server
    import threading

    draw_shape("square", "green").save(tmp_path / "sq.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert load_image(f"{url}/sq.png", None).size == (64, 64)
        with pytest.raises(BadRow) as bad:
            load_image(f"{url}/gone.png", None)
        assert bad.value.reason == "image_missing"
    finally:
        server.shutdown()
