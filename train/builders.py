"""What a run is made of, one small builder each (the shape of accelerate's examples): the
accelerator, the model, its trainable groups, the data, and the optimiser with its schedule."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType, PartialState
from accelerate.utils import FullyShardedDataParallelPlugin

from llama_adapter import build
from llama_adapter.config import TINY_BASES, AdapterConfig
from llama_adapter.model import LlamaAdapter, parameter_groups, set_trainable
from llama_adapter.tiny import random_base
from llama_adapter.weights import BaseWeights, load_adapter, load_base

from .config import GROUPS, ModelConfig, TrainConfig
from .data import ImageTransform, PromptEncoder, TrainingData, load_sources
from .sampler import DataPlan

log = logging.getLogger(__name__)

Groups = dict[str, list[tuple[str, torch.nn.Parameter]]]


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=mixed_precision(cfg),
        # accelerate picks gloo DDP for torchrun-launched processes only when told it is on CPU.
        cpu=cfg.engine.cpu or not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.optim.grad_accum,
        # A step of one kind leaves the other kinds' parameters without gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        step_scheduler_with_optimizer=False,
    )
    fsdp_launch = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_launch:
        # accelerate turns an FSDP launch into DDP when its processes are CPUs (it shards on
        # accelerators only); FSDP2 itself shards over gloo, so the launch config is honoured.
        # Both states, as accelerate sets them for FSDP: AcceleratorState() copies PartialState's.
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # its settings: the launch config's
    if cfg.stage == "joint" and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "joint training needs steps that leave one parameter group untouched; DeepSpeed's ZeRO "
            "optimiser would still apply momentum and weight decay to it. Use DDP or FSDP for joint."
        )
    return accelerator


def mixed_precision(cfg: TrainConfig) -> str | None:
    choice = cfg.engine.mixed_precision
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # set by `accelerate launch` / its config file
    if torch.cuda.is_available() and not cfg.engine.cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# -- model ----------------------------------------------------------------------------------------


@dataclass
class BuiltModel:
    model: LlamaAdapter
    base: BaseWeights
    template: str


def build_adapter_config(overrides: dict[str, Any], base_cfg: Any) -> AdapterConfig:
    overrides = dict(overrides)
    if overrides.get("wiring") == "official":
        overrides.pop("wiring")
        official = AdapterConfig.official(base_cfg, lora_rank=overrides.pop("lora_rank", 0))
        return AdapterConfig.from_dict({**official.to_dict(), **overrides})
    if "bias_targets" in overrides:
        overrides["bias_targets"] = tuple(overrides["bias_targets"])
    return AdapterConfig.paper(base_cfg, **overrides)


def build_model(cfg: ModelConfig, accelerator: Accelerator) -> BuiltModel:
    """The base, the adapter on it (fresh, or ``cfg.init_adapter``), the frozen base in its dtype,
    and the prompt template."""
    base = random_base(cfg.base, cfg.base_seed) if cfg.base in TINY_BASES else load_base(cfg.base)
    init = load_adapter(cfg.init_adapter, base.config) if cfg.init_adapter else None
    if init is not None and cfg.adapter:
        log.warning("model.adapter is ignored: the adapter settings come from %s", cfg.init_adapter)
    adapter_config = init.config if init is not None else build_adapter_config(cfg.adapter, base.config)
    if cfg.base_dtype == "auto":
        # A frozen base in the autocast dtype halves its memory; the adapter stays float32.
        on_gpu = accelerator.device.type == "cuda"
        dtype = build.DTYPES.get(accelerator.mixed_precision, torch.float32) if on_gpu else torch.float32
    else:
        dtype = build.parse_dtype(cfg.base_dtype)
    model = build.build_model(
        base,
        init,
        adapter_config=adapter_config,
        dtype=dtype,
        clip_weights=cfg.clip_weights,
        pretrained_encoder=cfg.pretrained_encoder,
    )
    template = cfg.template if cfg.template != "auto" else build.default_template(adapter_config, base.tokenizer)
    return BuiltModel(model, base, template)


def trainable_groups(model: LlamaAdapter, stage: str) -> Groups:
    """The parameter groups ``stage`` trains (both for ``joint`` and ``all``), by name."""
    groups = parameter_groups(model)
    return {g: groups[g] for g in GROUPS if stage in (g, "joint", "all")}


def freeze_all_but(model: LlamaAdapter, stage: str) -> Groups:
    """Freeze everything but the groups ``stage`` trains; returns them."""
    set_trainable(model, "joint" if stage == "all" else stage)
    groups = trainable_groups(model, stage)
    for g, params in groups.items():
        if not params:
            raise ValueError(f"The {g} group is empty for this adapter config: nothing to train in {stage}")
        log.info("Group %s: %d tensors, %s parameters", g, len(params), f"{sum(p.numel() for _, p in params):,}")
    return groups


# -- data -------------------------------------------------------------------------------------------


def build_data(cfg: TrainConfig, built: BuiltModel, global_batch: int) -> tuple[TrainingData, DataPlan]:
    """Every sample of every source, and the plan of which ones each step draws."""
    acfg = built.model.adapter_config
    sources = load_sources(cfg, built.base.config.max_seq_len)
    if acfg.image_encoder is None:
        with_images = [s.name for s in sources if s.has_image.any()]
        if with_images:
            raise ValueError(f"The adapter has no visual branch but these sources have images: {with_images}")
    plan = DataPlan(sources, global_batch, cfg.seed)
    transform = None
    if acfg.image_encoder is not None:
        transform = ImageTransform(acfg.image_encoder, acfg.channel_order, cfg.data.augment)
    prompt_encoder = PromptEncoder(built.base.tokenizer, built.template, cfg.model.system_prompt)
    dataset = TrainingData(sources, prompt_encoder, transform, cfg.data.caption_prompt, cfg.seed)
    return dataset, plan


# -- optimiser ------------------------------------------------------------------------------------


def lr_factor(step: int, *, warmup: float, total: float, floor: float) -> float:
    """The official per-iteration schedule: linear warmup from 0, then a half-cycle cosine down to
    ``floor`` (min_lr / lr)."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(total - warmup, 1e-12)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(
    cfg: TrainConfig, groups: Groups, plan: DataPlan, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with each group's own learning rate and weight decay (none on 1-D tensors and biases,
    as official), and the warmup + cosine schedule per step."""
    param_groups = []
    for group, params in groups.items():
        lr, wd = cfg.group_hparams(group, plan.global_batch)
        no_decay = [p for n, p in params if p.ndim == 1 or n.endswith(".bias")]
        decay = [p for n, p in params if not (p.ndim == 1 or n.endswith(".bias"))]
        for suffix, ps, group_wd in (("decay", decay, wd), ("no_decay", no_decay, 0.0)):
            if ps:
                param_groups.append({"name": f"{group}/{suffix}", "params": ps, "lr": lr, "weight_decay": group_wd})
        log.info("Group %s: lr %.3g, weight decay %g", group, lr, wd)
    optimizer = torch.optim.AdamW(param_groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    warmup = cfg.stage_default("warmup_epochs") * plan.steps_per_epoch
    floors = [cfg.optim.min_lr / g["lr"] if g["lr"] else 0.0 for g in param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [partial(lr_factor, warmup=warmup, total=total_steps, floor=f) for f in floors]
    )
    return optimizer, scheduler
