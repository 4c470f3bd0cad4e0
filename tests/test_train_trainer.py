"""Training acceptance on the random tiny base: overfitting, frozen base, parameter groups, joint
training's per-group updates, exact resume, bad rows, checkpoints, CLI and Python API."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from conftest import random_hf_model, write_hf_dir
from PIL import Image

import llama_adapter
from llama_adapter.model import adapter_state_dict, parameter_group
from llama_adapter.weights import read_adapter
from train import fit, run, setup
from train.checkpoint import list_checkpoints, resolve_resume
from train.cli import main as cli_main
from train.metrics import MetricsWriter
from train.step import activate, loss_sum, train_step
from train.synthetic import draw_shape, write_synthetic
from train.trainer import data_loader

VISUAL = {"image_encoder": "efficientnet-lite0", "visual_dim": 32, "visual_depth": 1, "visual_heads": 2}
WORDS = ["apple pie", "blue sky", "cold tea", "dark night", "easy win", "fast car", "green leaf", "hot sun"]


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on a shared 2-core machine are many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("data"), rows=6, bad_rows=True)


def tiny_config(out: Path, stage: str, sources: list, **sections) -> dict:
    cfg = {
        "stage": stage,
        "output_dir": str(out),
        "model": {"base": "tiny", "pretrained_encoder": False, "adapter": dict(VISUAL)},
        "data": {"sources": sources, "batch_size": 2, "max_len": 256},
        "optim": {"epochs": 1, "warmup_epochs": 0.25, "lr": 1e-2},
        "checkpoint": {"every_epochs": None},
        "log": {"every_steps": 1, "report_to": ["none"]},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def joint_sources(data: dict[str, Path]) -> list[dict]:
    return [{"path": str(data["captions"])}, {"path": str(data["instructions"])}, {"path": str(data["conversations"])}]


def base_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if parameter_group(model, n) is None}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overfits_eight_samples_and_base_stays_bit_identical(tmp_path):
    samples = [{"instruction": f"Name item {i}.", "input": "", "output": w} for i, w in enumerate(WORDS)]
    cfg = tiny_config(
        tmp_path,
        "finetune",
        [{"samples": samples}],
        model={"adapter": {"image_encoder": None}},
        data={"batch_size": 8},
        optim={"epochs": 150, "warmup_epochs": 0, "lr": 3e-2, "weight_decay": 0.0},
    )
    state = setup(cfg)
    before = base_tensors(state.unwrapped)
    adapter = fit(state)
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 150
    assert losses[-1] < 0.1 * losses[0], f"loss fell only from {losses[0]:.3f} to {losses[-1]:.3f}"
    after = base_tensors(state.unwrapped)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    saved = read_adapter(adapter)
    assert saved.metadata["prompt_template"] == "alpaca"
    assert set(saved.state_dict) == set(adapter_state_dict(state.unwrapped))


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "joint"])
def test_groups_are_disjoint_and_cover_every_trainable_parameter(tmp_path, data, stage):
    sources = [{"path": str(data["captions"])}] if stage == "pretrain" else [{"path": str(data["instructions"])}]
    if stage == "joint":
        sources = joint_sources(data)
    state = setup(tiny_config(tmp_path, stage, sources))
    model = state.unwrapped
    groups = {g: {n for n, _ in ps} for g, ps in state.groups.items()}
    assert set(groups) == ({"pretrain", "finetune"} if stage == "joint" else {stage})
    if stage == "joint":
        assert not groups["pretrain"] & groups["finetune"]
        assert groups["pretrain"] | groups["finetune"] == set(adapter_state_dict(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set().union(*groups.values())
    optimised = {state.names[p] for g in state.optimizer.param_groups for p in g["params"]}
    assert optimised == trainable
    # The paper wiring: the visual branch and early gate are pretrain, the rest of the adapter finetune.
    if stage in ("pretrain", "joint"):
        assert {"clip_proj.weight", "visual_query.weight", "layers.0.attention.gate"} <= groups["pretrain"]
    if stage in ("finetune", "joint"):
        assert {"adapter_query.weight", "norm.weight", "layers.3.attention.gate"} <= groups["finetune"]
        assert {"layers.0.feed_forward.w2.bias", "layers.1.attention.wq.scale"} <= groups["finetune"]


def test_joint_batch_touches_only_its_own_group(tmp_path, data):
    state = setup(tiny_config(tmp_path, "joint", joint_sources(data), optim={"warmup_epochs": 0}))
    model = state.unwrapped
    seen: dict[str, list] = {}
    for micro in data_loader(state, 0, state.plan.steps_per_epoch):
        if micro.input_ids is not None:
            seen.setdefault(micro.kind[0], [micro])
    assert set(seen) == {"pretrain", "finetune"}
    for group, micro in seen.items():
        other = "finetune" if group == "pretrain" else "pretrain"
        activate(state.groups, group)
        loss_sum(state, micro[0]).backward()
        own = [p.grad for _, p in state.groups[group]]
        assert all(g is not None for g in own) and any(bool(g.abs().sum() > 0) for g in own)
        assert all(p.grad is None for _, p in state.groups[other])
        model.zero_grad(set_to_none=True)
        # A whole optimiser step: only the batch's own group moves.
        before = {n: p.detach().clone() for n, p in adapter_state_dict(model).items()}
        train_step(state, micro)
        changed = {n for n, p in adapter_state_dict(model).items() if not torch.equal(before[n], p)}
        own_names = {n for n, _ in state.groups[group]}
        assert changed and changed <= own_names


def test_all_stage_batch_updates_both_groups(tmp_path, data):
    """The ablation baseline: without disjoint groups, a caption batch moves the language side too."""
    state = setup(tiny_config(tmp_path, "all", joint_sources(data), optim={"warmup_epochs": 0}))
    micro = next(m for m in data_loader(state, 0, state.plan.steps_per_epoch) if m.input_ids is not None)
    before = {n: p.detach().clone() for n, p in adapter_state_dict(state.unwrapped).items()}
    train_step(state, [micro])
    changed = {n for n, p in adapter_state_dict(state.unwrapped).items() if not torch.equal(before[n], p)}
    for group in ("pretrain", "finetune"):
        assert changed & {n for n, _ in state.groups[group]}


def test_resumed_run_is_bit_identical(tmp_path, data):
    sources = joint_sources(data)
    full = run(tiny_config(tmp_path / "full", "joint", sources, optim={"epochs": 0.5}))
    steps = read_adapter(full).metadata["training"]["step"]
    assert steps >= 4
    part = tiny_config(tmp_path / "part", "joint", sources, optim={"epochs": 0.5, "max_steps": 3})
    run(part)
    assert [c.name for c in list_checkpoints(tmp_path / "part")] == ["step-00000003"]
    resumed = run({**part, "resume": "auto", "optim": {**part["optim"], "max_steps": None}})
    a, b = read_adapter(full).state_dict, read_adapter(resumed).state_dict
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Same losses after the resume point too (the data order continued where it stopped).
    tail = [r["loss"] for r in metrics(tmp_path / "part")][3:]
    assert tail == [r["loss"] for r in metrics(tmp_path / "full")][3:]


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, data, caplog):
    cfg = tiny_config(tmp_path, "joint", joint_sources(data), data={"batch_size": 1})  # every row, once
    with caplog.at_level(logging.INFO, logger="train"):
        run(cfg)
    counts = json.loads((tmp_path / "data_report.json").read_text())["counts"]
    # captions: a missing, a corrupt image and an empty caption; conversations: a missing image;
    # instructions: an empty output.
    assert counts["image_missing"] == 2
    assert counts["image_unreadable"] == 1
    assert counts["empty_answer"] == 2
    assert metrics(tmp_path)[-1]["skipped"]["image_missing"] == 2
    text = caplog.text
    assert "missing.png" in text and "corrupt.png" in text
    assert "rows skipped {'image_missing': 2, 'image_unreadable': 1, 'empty_answer': 2}" in text


def test_checkpoints_keep_last_and_ignore_partial_ones(tmp_path, data):
    cfg = tiny_config(
        tmp_path,
        "finetune",
        [{"path": str(data["instructions"])}],
        model={"adapter": {"image_encoder": None}},
        checkpoint={"every_steps": 1, "keep_last": 2},
        optim={"max_steps": 4},
    )
    run(cfg)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    root = tmp_path / "checkpoints"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    (root / ".tmp-step-00000009").mkdir()  # a save cut short
    (root / "step-00000009").mkdir()  # no state file: incomplete
    assert resolve_resume("auto", tmp_path).name == "step-00000004"
    files = {p.name for p in (root / "step-00000004").iterdir()}
    assert files == {"adapter.safetensors", "optimizer.safetensors", "trainer_state.json", "rng_states.json"}


def test_python_api_with_in_memory_samples(tmp_path):
    img = draw_shape("circle", "red")
    samples = [
        {
            "image": img,
            "conversations": [{"from": "human", "value": "<image>\nShape?"}, {"from": "gpt", "value": "A circle."}],
        },
        {
            "image": draw_shape("square", "blue"),
            "messages": [{"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "A square."}],
        },
        {"instruction": "Say hi.", "output": "Hi."},
        {"instruction": "Say bye.", "input": "politely", "output": "Goodbye."},
    ]
    assert isinstance(img, Image.Image)
    path = run(tiny_config(tmp_path, "finetune", [{"samples": samples, "name": "demo"}], optim={"max_steps": 2}))
    assert path == tmp_path / "adapter.safetensors"
    assert read_adapter(path).metadata["training"]["stage"] == "finetune"
    assert json.loads((tmp_path / "trainable_parameters.json").read_text()).keys() == {"finetune"}


def test_cli_help_and_print_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["joint", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for words in ("clip_proj", "adapter_query", "optim.blr", "data.sources[].weight", "--resume"):
        assert words in help_text
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  base: tiny\ndata:\n  batch_size: 3\n")
    cli_main(["pretrain", "data.max_len=64", "--config", str(config), "--print-config", "optim.blr=2e-4"])
    printed = capsys.readouterr().out
    assert "stage: pretrain" in printed and "batch_size: 3" in printed
    assert "max_len: 64" in printed and "blr: 0.0002" in printed


def test_cli_trains_on_a_hugging_face_llama_folder(tmp_path, tiny_spm, capsys):
    """``--base PATH`` (over the config's base) trains on a transformers Llama checkpoint, and the
    adapter loads on it: it answers what it was trained to, which the base alone does not."""
    base = write_hf_dir(random_hf_model("tiny"), tmp_path / "hf-llama", tiny_spm)
    sample = {"instruction": "Name the shape.", "output": "A red circle."}
    (tmp_path / "sample.json").write_text(json.dumps([sample]))
    config = {
        "model": {"base": "tiny", "adapter": {"image_encoder": None}},  # --base wins
        "data": {"sources": [{"path": str(tmp_path / "sample.json")}], "batch_size": 1},
        "optim": {"epochs": 24, "warmup_epochs": 0, "lr": 3e-2, "min_lr": 3e-2, "weight_decay": 0.0},
        "checkpoint": {"every_epochs": None},
        "log": {"report_to": ["none"]},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    cli_main(["finetune", "--config", str(tmp_path / "config.yaml"), "--base", str(base), "--output-dir", str(out)])
    assert f"Adapter: {out / 'adapter.safetensors'}" in capsys.readouterr().out
    assert read_adapter(out / "adapter.safetensors").metadata["base"] == str(base)
    trained = llama_adapter.load(base=base, adapter=out / "adapter.safetensors")
    assert trained.generate(sample["instruction"], max_new_tokens=12) == sample["output"]
    assert llama_adapter.load(base=base).generate(sample["instruction"], max_new_tokens=12) != sample["output"]


def test_a_step_with_every_row_skipped_leaves_the_weights_alone(tmp_path):
    captions = [{"image": str(tmp_path / f"gone{i}.png"), "caption": "Lost."} for i in range(2)]
    text = [{"instruction": "Hi.", "output": "Hello."}, {"instruction": "Bye.", "output": "Goodbye."}]
    cfg = tiny_config(tmp_path, "joint", [{"samples": captions}, {"samples": text}], optim={"epochs": 2})
    state = setup(cfg)
    before = {n: p.detach().clone() for n, p in adapter_state_dict(state.unwrapped).items()}
    fit(state)
    after = adapter_state_dict(state.unwrapped)
    pretrain = {n for n, _ in state.groups["pretrain"]}
    assert all(torch.equal(before[n], after[n]) for n in pretrain)
    assert not all(torch.equal(before[n], after[n]) for n in before.keys() - pretrain)
    records = metrics(tmp_path)
    assert [r["loss"] is None for r in records] == [r["kinds"] == {"pretrain/image": 1} for r in records]


def test_bf16_autocast_with_a_bf16_frozen_base(tmp_path, data):
    cfg = tiny_config(
        tmp_path,
        "joint",
        joint_sources(data),
        engine={"mixed_precision": "bf16"},
        model={"base_dtype": "bf16"},
        optim={"max_steps": 3},
    )
    # accelerate fixes the precision once per process; this test needs another one.
    AcceleratorState._reset_state()
    try:
        state = setup(cfg)
        path = fit(state)
    finally:
        AcceleratorState._reset_state()
    assert state.unwrapped.layers[0].attention.wq.base.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in read_adapter(path).state_dict.values())
    assert all(r["loss"] > 0 for r in metrics(tmp_path))


def test_dataloader_workers_do_not_change_the_result(tmp_path, data):
    def adapter(workers: int) -> dict[str, torch.Tensor]:
        cfg = tiny_config(tmp_path / str(workers), "joint", joint_sources(data), optim={"max_steps": 3})
        cfg["data"]["num_workers"] = workers
        return read_adapter(run(cfg)).state_dict

    a, b = adapter(0), adapter(2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path, monkeypatch):
    import sys
    import types

    scalars = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    writer = MetricsWriter(tmp_path, ["tensorboard"], {}, "project", append=False)
    writer.write({"step": 3, "loss": 1.5, "lr": {"finetune/decay": 0.1}, "kinds": {"finetune/text": 1}})
    writer.close()
    assert ("loss", 1.5, 3) in scalars and ("lr/finetune/decay", 0.1, 3) in scalars and scalars[-1] == "closed"
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.5
