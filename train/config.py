"""Training configuration: nested dataclasses read from YAML, ``key.path=value`` overrides, and
the official LLaMA-Adapter V2 (7B) hyperparameters as each stage's defaults."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

# "all" is not the paper's: every batch updates both groups (the baseline of the joint ablation).
STAGES: tuple[str, ...] = ("pretrain", "finetune", "joint", "all")
GROUPS: tuple[str, ...] = ("pretrain", "finetune")

# The official multimodal-7B recipe (exps/pretrain.sh, exps/finetune.sh). Pretraining runs 150
# "epochs" of 1/50 of the data (split_epoch 50): 3 passes with a warmup of 5/50 of a pass.
STAGE_DEFAULTS: dict[str, dict[str, float]] = {
    "pretrain": {"epochs": 3.0, "warmup_epochs": 0.1, "blr": 1.0e-4, "weight_decay": 0.05},
    "finetune": {"epochs": 4.0, "warmup_epochs": 1.0, "blr": 1.0e-3, "weight_decay": 0.02},
    # Joint: each parameter group keeps its own stage's blr and weight decay.
    "joint": {"epochs": 4.0, "warmup_epochs": 1.0},
    "all": {"epochs": 4.0, "warmup_epochs": 1.0},
}
# Official max_words: captions 96 tokens, instructions 512.
MAX_LEN_DEFAULTS: dict[str, int] = {"captions": 96, "instructions": 512}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    base: str = _help(
        "base model: a folder (HF or Meta), a .gguf, a hub id, 'smollm2-135m', or 'tiny'/'tiny-tied' "
        "(random-init test models with a byte tokenizer)",
        "smollm2-135m",
    )
    adapter: dict[str, Any] = _help(
        "AdapterConfig fields over AdapterConfig.paper(base), e.g. {visual_dim: 256}; {wiring: official} "
        "selects the released 7B wiring",
        factory=dict,
    )
    init_adapter: str | None = _help("start from this adapter file (e.g. the pretrain result); its config wins", None)
    template: str = _help("prompt template: alpaca, chat, or auto (chat when the tokenizer has one)", "auto")
    system_prompt: str | None = _help(
        "system message of samples that have none; saved in the adapter, inference uses it too", None
    )
    pretrained_encoder: bool = _help("load the image encoder's pretrained weights (false: random, for tests)", True)
    clip_weights: str | None = _help("CLIP weights: 'openai' (download) or a local file", "openai")
    base_dtype: str = _help("frozen base dtype: auto (the autocast dtype on GPU, else fp32), fp32, bf16, fp16", "auto")
    base_seed: int = _help("seed of the random tiny bases", 0)


@dataclass
class SourceConfig:
    path: str | None = _help("CSV (captions), JSON/JSONL (instructions, VQA) file", None)
    format: str = _help("captions, instructions, vqa, or auto (from the extension and first row)", "auto")
    weight: float = _help("rows drawn per epoch = weight x rows (0.5: a fresh half each epoch; 2: twice)", 1.0)
    group: str | None = _help("joint: the parameter group its batches train (captions→pretrain, else finetune)", None)
    image_root: str | None = _help("folder that relative image paths start from (default: the file's folder)", None)
    max_len: int | None = _help("token limit per sample (default: data.max_len, else captions 96 / others 512)", None)
    name: str | None = _help("name in logs (default: the file name)", None)
    samples: Any = _help("Python API only: a list (or map-style Dataset) of sample dicts instead of a file", None)


@dataclass
class DataConfig:
    config: str | None = _help("data YAML: the official {META: [paths]} or {sources: [{path, weight, ...}]}", None)
    sources: list[SourceConfig] = _help("data sources (added to those of data.config)", factory=list)
    batch_size: int = _help("samples per device per micro-batch", 4)
    max_len: int | None = _help("token limit for every source (default per source type)", None)
    num_workers: int = _help("DataLoader worker processes", 0)
    augment: bool = _help("random resized crop (scale 0.9-1, as official) instead of resize + centre crop", True)
    caption_prompt: str = _help("instruction that precedes each caption", "Generate caption of this image")


@dataclass
class GroupOptimConfig:
    blr: float | None = _help("base learning rate of this group", None)
    lr: float | None = _help("absolute learning rate of this group", None)
    weight_decay: float | None = _help("weight decay of this group", None)


@dataclass
class OptimConfig:
    epochs: float | None = _help("passes over the (weighted) data; default per stage", None)
    warmup_epochs: float | None = _help("linear warmup, in epochs; default per stage", None)
    blr: float | None = _help("base learning rate: lr = blr x effective batch / 256; default per stage", None)
    lr: float | None = _help("absolute learning rate (overrides blr)", None)
    min_lr: float = _help("floor of the cosine schedule", 0.0)
    weight_decay: float | None = _help("AdamW weight decay (not on 1-D tensors or biases); default per stage", None)
    betas: tuple[float, float] = _help("AdamW betas", (0.9, 0.95))
    eps: float = _help("AdamW epsilon", 1e-8)
    grad_accum: int = _help("micro-batches per optimiser step", 1)
    clip_grad: float | None = _help("clip the gradient norm to this (official: none)", None)
    max_steps: int | None = _help("stop (with a checkpoint) after this many steps; the schedule stays", None)
    groups: dict[str, GroupOptimConfig] = _help(
        "joint: per-group blr/lr/weight_decay; default pretrain {blr 1e-4, wd 0.05}, finetune {blr 1e-3, wd 0.02}",
        factory=dict,
    )


@dataclass
class EngineConfig:
    mixed_precision: str = _help("no, bf16, fp16, or auto (bf16 on a GPU that has it, else fp16; no on CPU)", "auto")
    cpu: bool = _help("train on CPU even when a GPU is present", False)


@dataclass
class CheckpointConfig:
    every_steps: int | None = _help("save every N optimiser steps (always at the end)", None)
    every_epochs: float | None = _help("save every N epochs", 1.0)
    keep_last: int = _help("checkpoints to keep (older ones are deleted)", 3)


@dataclass
class LogConfig:
    every_steps: int = _help("log loss / lr / tokens per second every N steps", 10)
    report_to: list[str] = _help("extra loggers: tensorboard, wandb, none; auto = installed", factory=lambda: ["auto"])
    wandb_project: str = _help("wandb project name", "llama-adapter-v2")


@dataclass
class TrainConfig:
    stage: str = _help("pretrain, finetune or joint", "finetune")
    output_dir: str = _help("where checkpoints, logs and the final adapter go", "runs/llama-adapter")
    seed: int = _help("seed of initialisation, data order and augmentation", 0)
    resume: str | None = _help("'auto' (latest checkpoint in output_dir) or a checkpoint folder", None)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {self.stage!r}")
        if self.data.batch_size < 1 or self.optim.grad_accum < 1:
            raise ValueError("data.batch_size and optim.grad_accum must be at least 1")
        unknown = set(self.optim.groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"optim.groups has unknown groups {sorted(unknown)}; use {', '.join(GROUPS)}")
        if self.engine.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(
                f"engine.mixed_precision must be auto, no, bf16 or fp16, not {self.engine.mixed_precision!r}"
            )
        if self.model.template not in ("auto", "alpaca", "chat"):
            raise ValueError(f"model.template must be auto, alpaca or chat; got {self.model.template!r}")
        for s in self.data.sources:
            if (s.path is None) == (s.samples is None):
                raise ValueError("each data source needs exactly one of path or samples")
            if not (s.weight >= 0 and math.isfinite(s.weight)):
                raise ValueError(f"source weight must be a finite number >= 0; got {s.weight}")
            if s.group is not None and s.group not in GROUPS:
                raise ValueError(f"source group must be pretrain or finetune; got {s.group!r}")

    # -- resolved hyperparameters ----------------------------------------------------------------

    def stage_default(self, key: str) -> float:
        value = getattr(self.optim, key)
        return STAGE_DEFAULTS[self.stage][key] if value is None else value

    def group_hparams(self, group: str, effective_batch: int) -> tuple[float, float]:
        """(learning rate, weight decay) of a parameter group: its own setting, else the stage-wide
        one, else the official value (in ``joint``, each group's own stage's value)."""
        own = self.optim.groups.get(group) or GroupOptimConfig()
        defaults = STAGE_DEFAULTS[group if self.stage in ("joint", "all") else self.stage]
        lr = _first(own.lr, self.optim.lr)
        if lr is None:
            lr = _first(own.blr, self.optim.blr, defaults["blr"]) * effective_batch / 256
        return lr, _first(own.weight_decay, self.optim.weight_decay, defaults["weight_decay"])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (in-memory samples are replaced by their count)."""
        d = dataclasses.asdict(self)
        for s in d["data"]["sources"]:
            if s["samples"] is not None:
                s["samples"] = f"<{len(s['samples'])} in-memory samples>"
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d


# -- reading ---------------------------------------------------------------------------------------


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build a (nested) config dataclass from a plain dict; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        keys = ", ".join(sorted(where + k for k in unknown))
        raise ValueError(f"Unknown config key(s) {keys}; known here: {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, f"{where}{k}.") for k, v in data.items()}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value or {}, where)
    if origin is Union:
        options = [a for a in get_args(tp) if a is not type(None)]
        return None if value is None else _convert(options[0], value, where)
    if origin is list and value is not None:
        (item,) = get_args(tp)
        values = value if isinstance(value, (list, tuple)) else [value]
        return [_convert(item, v, where) for v in values]
    if origin is dict and value is not None:
        _, item = get_args(tp)
        return {k: _convert(item, v, f"{where}{k}.") for k, v in value.items()}
    if origin is tuple and value is not None:
        return tuple(value)
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        return float(value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.blr=1e-3`` → (["optim", "blr"], 0.001); values are read as YAML."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} is not KEY=VALUE (e.g. optim.blr=1e-3)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML 1.1 reads 1e-3 (no dot) as a string; numbers are what users mean there.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def set_path(d: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
        if not isinstance(d, dict):
            raise ValueError(f"Cannot set {'.'.join(path)}: {key} is not a section")
    d[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    **fields: Any,
) -> TrainConfig:
    """Read a YAML config, apply ``base`` (dict), then ``KEY=VALUE`` overrides, then keyword fields."""
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of config sections")
        data = _merge(data, loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        set_path(data, key, value)
    for key, value in fields.items():
        if value is not None:
            data[key] = value
    return from_dict(TrainConfig, data)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def as_config(config: TrainConfig | dict[str, Any]) -> TrainConfig:
    return config if isinstance(config, TrainConfig) else from_dict(TrainConfig, config)


def describe_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every config field, for ``--help``."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, f"{prefix}{f.name}."))
            continue
        item = get_args(tp)[-1] if get_origin(tp) in (list, dict) else None
        if dataclasses.is_dataclass(item):
            rows.append((prefix + f.name, "", f.metadata.get("help", "")))
            sub = "[]." if get_origin(tp) is list else ".<name>."
            rows.extend(describe_fields(item, f"{prefix}{f.name}{sub}"))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        rows.append((prefix + f.name, "" if default in (None, {}, []) else str(default), f.metadata.get("help", "")))
    return rows
