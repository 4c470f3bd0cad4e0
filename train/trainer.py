"""The training run, in the shape of accelerate's examples: :func:`setup` builds everything from a
config (seed, model, data, optimiser, one ``prepare``, resume), :func:`fit` loops over
:func:`train.step.train_step` with logs and checkpoints, :func:`run` does both. One code path for
a laptop CPU, DDP (gloo or NCCL), FSDP and DeepSpeed."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from llama_adapter.model import LlamaAdapter

from .builders import (
    BuiltModel,
    Groups,
    build_data,
    build_model,
    build_optimizer,
    freeze_all_but,
    make_accelerator,
    trainable_groups,
)
from .checkpoint import (
    ADAPTER_FILE,
    adapter_tensors,
    list_checkpoints,
    resolve_resume,
    restore,
    save_checkpoint,
    write_adapter,
)
from .config import TrainConfig, as_config, load_config
from .data import SKIP_REASONS, Collate, TrainingData
from .metrics import MetricsWriter, count_rows, global_counts, kind_name, log_record, window_record
from .sampler import DataPlan, StepBatches
from .step import train_step

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """A run as :func:`setup` built it. ``model`` is as prepared (wrapped by DDP, sharded in place
    by FSDP); ``groups`` hold its parameters by name (FSDP replaces the ones built)."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    built: BuiltModel
    groups: Groups
    dataset: TrainingData
    plan: DataPlan
    optimizer: Any  # accelerate's wrapper around the AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    step: int = 0
    counts: Counter[str] = field(default_factory=Counter)  # this process's skipped and truncated rows
    warned: Counter[str] = field(default_factory=Counter)

    @property
    def unwrapped(self) -> LlamaAdapter:
        return self.accelerator.unwrap_model(self.model)

    @property
    def names(self) -> dict[torch.Tensor, str]:
        return {p: n for params in self.groups.values() for n, p in params}

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def setup(config: TrainConfig | dict[str, Any]) -> TrainState:
    """Everything a run needs, built from its config, and resumed from a checkpoint if it says so."""
    cfg = as_config(config)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    built = build_model(cfg.model, accelerator)
    groups = freeze_all_but(built.model, cfg.stage)
    global_batch = cfg.data.batch_size * accelerator.num_processes * cfg.optim.grad_accum
    dataset, plan = build_data(cfg, built, global_batch)
    total_steps = math.ceil(cfg.stage_default("epochs") * plan.steps_per_epoch)
    log.info(
        "Global batch %d (%d per device x %d processes x %d accumulation); %d steps per epoch, %d in all, "
        "%d samples per epoch left over (incomplete batches)",
        global_batch,
        cfg.data.batch_size,
        accelerator.num_processes,
        cfg.optim.grad_accum,
        plan.steps_per_epoch,
        total_steps,
        plan.dropped_per_epoch,
    )
    optimizer, scheduler = build_optimizer(cfg, groups, plan, total_steps)
    model, optimizer = accelerator.prepare(built.model, optimizer)
    log.info(
        "Engine: %s, %d process(es) on %s, mixed precision %s",
        accelerator.distributed_type.value,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
    )
    groups = trainable_groups(accelerator.unwrap_model(model), cfg.stage)
    state = TrainState(cfg, accelerator, model, built, groups, dataset, plan, optimizer, scheduler, total_steps)
    resume = resolve_resume(cfg.resume, state.output_dir) if cfg.resume else None
    if resume is not None:
        restore(state, resume)
    elif cfg.resume:
        log.info("No checkpoint in %s yet: starting from the beginning", state.output_dir)
    elif list_checkpoints(state.output_dir):
        log.warning("%s already holds checkpoints; starting over (pass --resume to continue)", state.output_dir)
    return state


def data_loader(state: TrainState, start: int, stop: int) -> torch.utils.data.DataLoader:
    """This process's micro-batches of steps ``[start, stop)``, ``grad_accum`` per step."""
    cfg, acc = state.cfg, state.accelerator
    sampler = StepBatches(
        state.plan,
        start,
        stop,
        rank=acc.process_index,
        world=acc.num_processes,
        accum=cfg.optim.grad_accum,
        batch=cfg.data.batch_size,
    )
    return torch.utils.data.DataLoader(
        state.dataset,
        batch_sampler=sampler,
        collate_fn=Collate(state.built.base.tokenizer.pad_id),
        num_workers=cfg.data.num_workers,
        pin_memory=acc.device.type == "cuda",
    )


def fit(state: TrainState) -> Path:
    """Train to the end of the schedule (or ``optim.max_steps``); returns the final adapter file."""
    cfg, acc = state.cfg, state.accelerator
    stop = min(state.total_steps, cfg.optim.max_steps) if cfg.optim.max_steps else state.total_steps
    writer = open_metrics(state) if acc.is_main_process else None
    every = cfg.checkpoint.every_steps or round((cfg.checkpoint.every_epochs or 0) * state.plan.steps_per_epoch)
    state.model.train()
    if state.unwrapped.image_encoder is not None:
        state.unwrapped.image_encoder.eval()  # frozen, and its BatchNorm must keep its statistics
    batches = iter(data_loader(state, state.step, stop))
    window: list[dict[str, Any]] = []
    tick = time.perf_counter()
    saved_at = -1
    bar = tqdm(total=stop, initial=state.step, desc=cfg.stage, disable=not acc.is_main_process, mininterval=1.0)
    with logging_redirect_tqdm():
        while state.step < stop:
            micro = [next(batches) for _ in range(cfg.optim.grad_accum)]
            count_rows(micro, state.counts, state.warned)
            stats = train_step(state, micro)
            state.step += 1
            window.append(stats)
            bar.update(1)
            if stats["loss"] is not None:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{state.scheduler.get_last_lr()[0]:.3g}")
            if state.step % cfg.log.every_steps == 0 or state.step == stop:
                now = time.perf_counter()
                log_window(state, window, now - tick, writer)
                window, tick = [], now
            if (every and state.step % every == 0) or state.step == stop:
                save_checkpoint(state)
                saved_at = state.step
    bar.close()
    if saved_at != state.step:
        save_checkpoint(state)
    return finish(state, writer)


def open_metrics(state: TrainState) -> MetricsWriter:
    """The main process's record of the run: what it trains, and a metrics writer (appending on resume)."""
    cfg = state.cfg
    state.output_dir.mkdir(parents=True, exist_ok=True)
    trained = {g: [n for n, _ in ps] for g, ps in state.groups.items()}
    (state.output_dir / "trainable_parameters.json").write_text(json.dumps(trained, indent=1))
    return MetricsWriter(
        state.output_dir, cfg.log.report_to, cfg.to_dict(), cfg.log.wandb_project, append=state.step > 0
    )


def log_window(state: TrainState, window: list[dict[str, Any]], seconds: float, writer: MetricsWriter | None) -> None:
    """The record of the steps since the last one (counters summed over every process)."""
    counts = global_counts(state.accelerator, state.counts)
    if writer is None:
        return
    lrs = {g["name"]: g["lr"] for g in state.optimizer.param_groups}
    record = window_record(state.step, state.step / state.plan.steps_per_epoch, window, seconds, lrs, counts)
    writer.write(record)
    log_record(record, state.total_steps)


def finish(state: TrainState, writer: MetricsWriter | None) -> Path:
    """Write the final adapter and the data report; returns the adapter file."""
    acc = state.accelerator
    final = state.output_dir / ADAPTER_FILE
    adapter = adapter_tensors(state)
    counts = global_counts(acc, state.counts)
    if acc.is_main_process:
        write_adapter(state, adapter, final)
        per_kind = {kind_name(k): n for k, n in state.plan.samples_per_kind.items()}
        report = {"steps": state.step, "counts": counts, "samples_per_kind_per_epoch": per_kind}
        (state.output_dir / "data_report.json").write_text(json.dumps(report, indent=1))
        skipped = {k: counts[k] for k in SKIP_REASONS if counts[k]}
        log.info(
            "Done: %d steps; rows skipped %s; %d samples truncated (%d tokens cut); adapter %s",
            state.step,
            skipped or "none",
            counts["truncated"],
            counts["truncated_tokens"],
            final,
        )
        writer.close()
    acc.wait_for_everyone()
    return final


def run(config: TrainConfig | dict[str, Any] | str | Path, overrides: list[str] | None = None) -> Path:
    """Train as ``config`` says (a :class:`TrainConfig`, a dict of the same shape, or a YAML
    file with optional ``KEY=VALUE`` overrides); returns the final adapter file."""
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    elif overrides:
        raise ValueError("overrides apply to a YAML config file; edit the dict or TrainConfig instead")
    return fit(setup(config))
