"""The training loop: one code path for a laptop CPU, DDP (gloo or NCCL), FSDP and DeepSpeed,
all through accelerate.

A step is one kind of batch (parameter group x with/without image) on every process and micro-
batch. The loss is the mean over the answer tokens of the whole global batch, so a run gives the
same update whatever its split into processes x accumulation x batch. In ``joint``, the other
group is frozen for the step, so a batch updates only its own group (AdamW skips parameters
without a gradient: no moment update, no weight decay).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from llama_adapter.build import DTYPES, build_model, default_template, parse_dtype
from llama_adapter.config import IMAGE_ENCODERS, TINY_BASES, AdapterConfig
from llama_adapter.errors import CheckpointError
from llama_adapter.model import LlamaAdapter, adapter_state_dict, parameter_groups, set_trainable
from llama_adapter.tiny import random_base
from llama_adapter.weights import load_adapter, load_base, read_adapter, save_adapter

from .checkpoint import (
    ADAPTER_FILE,
    checkpoint_dir,
    list_checkpoints,
    load_optimizer_state,
    optimizer_state,
    place_like,
    read_checkpoint,
    resolve_resume,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from .config import GROUPS, TrainConfig, as_config, load_config
from .data import IGNORE, SKIP_REASONS, Batch, Collate, ImageTransform, PromptEncoder, TrainingData, load_sources
from .metrics import MetricsWriter
from .sampler import DataPlan, StepBatches

log = logging.getLogger(__name__)

COUNTERS = (*SKIP_REASONS, "truncated", "truncated_tokens")
MAX_SKIP_WARNINGS = 10  # per reason and process; the rest are only counted


def kind_name(kind: tuple[str, bool]) -> str:
    return f"{kind[0]}/{'image' if kind[1] else 'text'}"


def lr_factor(step: int, *, warmup: float, total: float, floor: float) -> float:
    """The official per-iteration schedule: linear warmup from 0, then a half-cycle cosine down to
    ``floor`` (min_lr / lr)."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(total - warmup, 1e-12)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_adapter_config(cfg: TrainConfig, base_cfg: Any) -> AdapterConfig:
    overrides = dict(cfg.model.adapter)
    if overrides.get("wiring") == "official":
        overrides.pop("wiring")
        official = AdapterConfig.official(base_cfg, lora_rank=overrides.pop("lora_rank", 0))
        return AdapterConfig.from_dict({**official.to_dict(), **overrides})
    if "bias_targets" in overrides:
        overrides["bias_targets"] = tuple(overrides["bias_targets"])
    return AdapterConfig.paper(base_cfg, **overrides)


class Trainer:
    """Builds model, data, optimiser and schedule from a :class:`TrainConfig`; ``train()`` runs."""

    def __init__(self, config: TrainConfig | dict[str, Any]) -> None:
        self.cfg = cfg = as_config(config)
        self.accelerator = acc = Accelerator(
            mixed_precision=self._mixed_precision(),
            # accelerate picks gloo DDP for torchrun-launched processes only when told it is on CPU.
            cpu=cfg.engine.cpu or not torch.cuda.is_available(),
            gradient_accumulation_steps=cfg.optim.grad_accum,
            # A step of one kind leaves the other kinds' parameters without gradients.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            step_scheduler_with_optimizer=False,
        )
        self._deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if cfg.stage == "joint" and self._deepspeed:
            raise ValueError(
                "joint training needs steps that leave one parameter group untouched; DeepSpeed's ZeRO "
                "optimiser would still apply momentum and weight decay to it. Use DDP or FSDP for joint."
            )
        self.output_dir = Path(cfg.output_dir)
        set_seed(cfg.seed)
        self._build_model()
        self._build_data()
        self._build_optimizer()
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        log.info(
            "Engine: %s, %d process(es) on %s, mixed precision %s",
            acc.distributed_type.value,
            acc.num_processes,
            acc.device,
            acc.mixed_precision,
        )
        self.step = 0
        self.counts: Counter[str] = Counter()
        self._skip_warnings: Counter[str] = Counter()
        resume = resolve_resume(cfg.resume, self.output_dir) if cfg.resume else None
        if resume is not None:
            self._resume(resume)
        elif cfg.resume:
            log.info("No checkpoint in %s yet: starting from the beginning", self.output_dir)
        elif list_checkpoints(self.output_dir):
            log.warning("%s already holds checkpoints; starting over (pass --resume to continue)", self.output_dir)

    # -- setup --------------------------------------------------------------------------------------

    def _mixed_precision(self) -> str | None:
        choice = self.cfg.engine.mixed_precision
        if choice != "auto":
            return choice
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            return None  # set by `accelerate launch` / its config file
        if torch.cuda.is_available() and not self.cfg.engine.cpu:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"

    def _build_model(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.base = random_base(cfg.model.base, cfg.model.base_seed) if cfg.model.base in TINY_BASES else None
        if self.base is None:
            self.base = load_base(cfg.model.base)
        init = load_adapter(cfg.model.init_adapter, self.base.config) if cfg.model.init_adapter else None
        if init is not None and cfg.model.adapter:
            log.warning("model.adapter is ignored: the adapter settings come from %s", cfg.model.init_adapter)
        self.adapter_config = init.config if init is not None else build_adapter_config(cfg, self.base.config)
        if cfg.model.base_dtype == "auto":
            # A frozen base in the autocast dtype halves its memory; the adapter stays float32.
            dtype = DTYPES.get(acc.mixed_precision, torch.float32) if acc.device.type == "cuda" else torch.float32
        else:
            dtype = parse_dtype(cfg.model.base_dtype)
        self.model: LlamaAdapter = build_model(
            self.base,
            init,
            adapter_config=self.adapter_config,
            dtype=dtype,
            clip_weights=cfg.model.clip_weights,
            pretrained_encoder=cfg.model.pretrained_encoder,
        )
        self.tokenizer = self.base.tokenizer
        template = cfg.model.template
        self.template = template if template != "auto" else default_template(self.adapter_config, self.tokenizer)
        set_trainable(self.model, "joint" if cfg.stage == "all" else cfg.stage)
        groups = parameter_groups(self.model)
        self.group_params = {g: groups[g] for g in GROUPS if cfg.stage in (g, "joint", "all")}
        self.names = {p: n for g in self.group_params.values() for n, p in g}
        for g, params in self.group_params.items():
            if not params:
                raise ValueError(f"The {g} group is empty for this adapter config: nothing to train in {cfg.stage}")
            log.info("Group %s: %d tensors, %s parameters", g, len(params), f"{sum(p.numel() for _, p in params):,}")

    def _build_data(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        sources = load_sources(cfg, self.base.config.max_seq_len)
        if self.adapter_config.image_encoder is None:
            with_images = [s.name for s in sources if s.has_image.any()]
            if with_images:
                raise ValueError(f"The adapter has no visual branch but these sources have images: {with_images}")
        self.global_batch = cfg.data.batch_size * acc.num_processes * cfg.optim.grad_accum
        self.plan = DataPlan(sources, self.global_batch, cfg.seed)
        transform = None
        if self.adapter_config.image_encoder is not None:
            acfg = self.adapter_config
            transform = ImageTransform(acfg.image_encoder, acfg.channel_order, cfg.data.augment)
        self.prompt_encoder = PromptEncoder(self.tokenizer, self.template, cfg.model.system_prompt)
        self.dataset = TrainingData(sources, self.prompt_encoder, transform, cfg.data.caption_prompt, cfg.seed)
        spe = self.plan.steps_per_epoch
        self.total_steps = math.ceil(cfg.stage_default("epochs") * spe)
        self.warmup_steps = cfg.stage_default("warmup_epochs") * spe
        log.info(
            "Global batch %d (%d per device x %d processes x %d accumulation); %d steps per epoch, %d in all, "
            "%d samples per epoch left over (incomplete batches)",
            self.global_batch,
            cfg.data.batch_size,
            acc.num_processes,
            cfg.optim.grad_accum,
            spe,
            self.total_steps,
            self.plan.dropped_per_epoch,
        )

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        param_groups = []
        for group, params in self.group_params.items():
            lr, wd = cfg.group_hparams(group, self.global_batch)
            # As official: no decay for 1-D tensors (norms, scales) and biases.
            no_decay = [p for n, p in params if p.ndim == 1 or n.endswith(".bias")]
            decay = [p for n, p in params if not (p.ndim == 1 or n.endswith(".bias"))]
            for suffix, ps, group_wd in (("decay", decay, wd), ("no_decay", no_decay, 0.0)):
                if ps:
                    param_groups.append({"name": f"{group}/{suffix}", "params": ps, "lr": lr, "weight_decay": group_wd})
            log.info("Group %s: lr %.3g, weight decay %g", group, lr, wd)
        self.optimizer = torch.optim.AdamW(param_groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            [
                partial(
                    lr_factor,
                    warmup=self.warmup_steps,
                    total=self.total_steps,
                    floor=cfg.optim.min_lr / g["lr"] if g["lr"] else 0.0,
                )
                for g in param_groups
            ],
        )

    # -- resume and checkpoints -----------------------------------------------------------------------

    @property
    def unwrapped(self) -> LlamaAdapter:
        return self.accelerator.unwrap_model(self.model)

    def _resume(self, path: Path) -> None:
        state, tensors, rng = read_checkpoint(path)
        if state["plan"] != self.plan.fingerprint():
            raise CheckpointError(
                f"{path} was written with other data, seed or global batch size ({state['global_batch']}; now "
                f"{self.global_batch}); the data order would not continue. Resume with the same settings."
            )
        if state["total_steps"] != self.total_steps:
            log.warning("Schedule changed since the checkpoint: %d → %d steps", state["total_steps"], self.total_steps)
        adapter = read_adapter(path / ADAPTER_FILE)
        if adapter.config != self.adapter_config:
            raise CheckpointError(f"{path} holds an adapter with other settings than this run's")
        params = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in adapter.state_dict.items():
                params[name].copy_(place_like(value, params[name]))
        if self._deepspeed:
            log.warning(
                "DeepSpeed: the optimiser's moments restart (ZeRO state is not saved); DDP and FSDP resume exactly"
            )
        else:
            load_optimizer_state(self.optimizer.optimizer, self.names, tensors, state["optimizer_groups"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        if self.accelerator.is_main_process:
            self.counts.update(state["counts"])  # the others start at 0: counts are summed over processes
        if len(rng) == self.accelerator.num_processes:
            set_rng_state(rng[self.accelerator.process_index])
        else:
            world = self.accelerator.num_processes
            log.warning("Checkpoint from %d processes, now %d: RNG states not restored", len(rng), world)
        log.info("Resumed from %s at step %d of %d", path, self.step, self.total_steps)

    def _global_counts(self) -> dict[str, int]:
        local = torch.tensor([self.counts[k] for k in COUNTERS], dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.reduce(local, "sum")
        return {k: int(v) for k, v in zip(COUNTERS, total.tolist())}

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        adapter = self._adapter_tensors()
        # DeepSpeed's ZeRO optimiser keeps flat partitions of its own, not per-parameter state.
        tensors, groups = ({}, []) if self._deepspeed else optimizer_state(self.optimizer.optimizer, self.names)
        rng = gather_object([rng_state()])
        counts = self._global_counts()
        if acc.is_main_process:
            state = {
                "step": self.step,
                "epoch": self.step / self.plan.steps_per_epoch,
                "steps_per_epoch": self.plan.steps_per_epoch,
                "total_steps": self.total_steps,
                "global_batch": self.global_batch,
                "plan": self.plan.fingerprint(),
                "world_size": acc.num_processes,
                "optimizer_groups": groups,
                "scheduler": self.scheduler.state_dict(),
                "counts": counts,
                "config": self.cfg.to_dict(),
            }
            write_checkpoint(
                self.output_dir,
                self.step,
                write_adapter=partial(self._write_adapter, adapter),
                optimizer_tensors=tensors,
                state=state,
                rng_states=rng,
                keep_last=self.cfg.checkpoint.keep_last,
            )
            log.info("Saved checkpoint %s", checkpoint_dir(self.output_dir, self.step))
        acc.wait_for_everyone()
        return checkpoint_dir(self.output_dir, self.step)

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Whole adapter tensors on the CPU (gathered from shards under FSDP: call on every process)."""
        params = adapter_state_dict(self.unwrapped).items()
        # float(): DeepSpeed's bf16/fp16 modes cast the whole module, adapter included.
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu() for n, p in params}

    def _write_adapter(self, tensors: dict[str, torch.Tensor], path: Path) -> Path:
        return save_adapter(
            path,
            tensors,
            self.adapter_config,
            base=self.base.config,
            base_name=self.cfg.model.base,
            base_fingerprint=self.base.fingerprint,
            prompt_template=self.template,
            system_prompt=self.cfg.model.system_prompt,
            extra={
                "training": {
                    "stage": self.cfg.stage,
                    "step": self.step,
                    "total_steps": self.total_steps,
                    # What rebuilds a random tiny base and a random-init encoder (tests) as trained.
                    "seed": self.cfg.seed,
                    "base_seed": self.cfg.model.base_seed,
                    "pretrained_encoder": self.cfg.model.pretrained_encoder,
                }
            },
        )

    # -- one step -------------------------------------------------------------------------------------

    def activate(self, group: str) -> None:
        """Joint training: only ``group`` gets gradients this step."""
        for g, params in self.group_params.items():
            for _, p in params:
                p.requires_grad_(g == group)

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy over the answer tokens of a micro-batch. A micro-batch whose rows
        were all skipped runs one padding token with no loss, so every process still joins the
        gradient all-reduce."""
        device = self.accelerator.device
        if batch.input_ids is None:
            ids = torch.full((1, 2), self.tokenizer.pad_id, dtype=torch.long)
            labels = torch.full_like(ids, IGNORE)
            size = IMAGE_ENCODERS[self.adapter_config.image_encoder].image_size if batch.kind[1] else 0
            images = torch.zeros(1, 3, size, size) if batch.kind[1] else None
        else:
            ids, labels, images = batch.input_ids, batch.labels, batch.images
        if images is not None:
            images = images.to(device, next(self.unwrapped.image_encoder.parameters()).dtype)
        labels = labels.to(device)
        positions = torch.zeros_like(labels, dtype=torch.bool)
        positions[:, :-1] = labels[:, 1:] != IGNORE  # position i predicts token i + 1
        with self.accelerator.autocast():
            logits = self.model(ids.to(device), images, logits_at=positions)  # [answer tokens, vocab]
        return F.cross_entropy(logits.float(), labels[:, 1:][positions[:, :-1]], reduction="sum")

    def train_step(self, micro: list[Batch]) -> dict[str, Any]:
        """One optimiser step over this process's ``grad_accum`` micro-batches (all of one kind)."""
        acc = self.accelerator
        kind = micro[0].kind
        if self.cfg.stage == "joint":
            self.activate(kind[0])
        answer = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in micro if b.labels is not None)
        total_answer = acc.reduce(torch.tensor(float(answer), device=acc.device), "sum").item()
        # backward() divides by the accumulation steps and DDP averages over processes: undo both,
        # so that the gradient is that of the mean over the global batch's answer tokens.
        scale = acc.num_processes * self.cfg.optim.grad_accum / max(total_answer, 1.0)
        loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
        grad_norm = None
        # A step whose every row was skipped (on all processes alike) must not move the weights:
        # AdamW would still apply momentum and decay. The schedule advances all the same.
        for batch in micro if total_answer else []:
            with acc.accumulate(self.model):
                loss = self.loss_sum(batch)
                acc.backward(loss * scale)
                loss_sum += loss.detach()
                if acc.sync_gradients:
                    if self.cfg.optim.clip_grad:
                        active = [p for p in self.names if p.requires_grad]
                        grad_norm = acc.clip_grad_norm_(active, self.cfg.optim.clip_grad)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # After a skipped first step torch warns that the scheduler ran before the optimiser.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
            self.scheduler.step()
        tokens = sum(b.tokens for b in micro)
        summed = acc.reduce(torch.tensor([loss_sum.item(), float(tokens)], device=acc.device), "sum").tolist()
        return {
            "loss": summed[0] / total_answer if total_answer else None,  # every row skipped: no loss
            "tokens": summed[1],
            "answer_tokens": total_answer,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "kind": kind_name(kind),
        }

    def _count(self, micro: list[Batch]) -> None:
        for batch in micro:
            self.counts["truncated"] += batch.truncated
            self.counts["truncated_tokens"] += batch.truncated_tokens
            for s in batch.skipped:
                self.counts[s["skip"]] += 1
                self._skip_warnings[s["skip"]] += 1
                if self._skip_warnings[s["skip"]] <= MAX_SKIP_WARNINGS:
                    log.warning("Skipped row %d of %s (%s): %s", s["row"], s["source"], s["skip"], s["detail"])

    # -- the loop -----------------------------------------------------------------------------------

    def data_loader(self, start: int, stop: int) -> torch.utils.data.DataLoader:
        """This process's micro-batches of steps ``[start, stop)``, ``grad_accum`` per step."""
        cfg, acc = self.cfg, self.accelerator
        sampler = StepBatches(
            self.plan,
            start,
            stop,
            rank=acc.process_index,
            world=acc.num_processes,
            accum=cfg.optim.grad_accum,
            batch=cfg.data.batch_size,
        )
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=Collate(self.tokenizer.pad_id),
            num_workers=cfg.data.num_workers,
            pin_memory=acc.device.type == "cuda",
        )

    def train(self) -> Path:
        """Run to the end of the schedule (or ``optim.max_steps``); returns the final adapter file."""
        cfg, acc = self.cfg, self.accelerator
        stop = min(self.total_steps, cfg.optim.max_steps) if cfg.optim.max_steps else self.total_steps
        writer = None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            trained = {g: [n for n, _ in ps] for g, ps in self.group_params.items()}
            (self.output_dir / "trainable_parameters.json").write_text(json.dumps(trained, indent=1))
            writer = MetricsWriter(
                self.output_dir, cfg.log.report_to, cfg.to_dict(), cfg.log.wandb_project, append=self.step > 0
            )
        spe = self.plan.steps_per_epoch
        every = cfg.checkpoint.every_steps or round((cfg.checkpoint.every_epochs or 0) * spe)
        self.model.train()
        if self.unwrapped.image_encoder is not None:
            self.unwrapped.image_encoder.eval()  # frozen, and its BatchNorm must keep its statistics
        batches = iter(self.data_loader(self.step, stop))
        window: list[dict[str, Any]] = []
        tick = time.perf_counter()
        saved_at = -1
        bar = tqdm(total=stop, initial=self.step, desc=cfg.stage, disable=not acc.is_main_process, mininterval=1.0)
        with logging_redirect_tqdm():
            while self.step < stop:
                micro = [next(batches) for _ in range(cfg.optim.grad_accum)]
                self._count(micro)
                stats = self.train_step(micro)
                self.step += 1
                window.append(stats)
                bar.update(1)
                if stats["loss"] is not None:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.3g}")
                if self.step % cfg.log.every_steps == 0 or self.step == stop:
                    now = time.perf_counter()
                    self._log(window, now - tick, writer)
                    window, tick = [], now
                if (every and self.step % every == 0) or self.step == stop:
                    self.save_checkpoint()
                    saved_at = self.step
        bar.close()
        if saved_at != self.step:
            self.save_checkpoint()
        final = self.output_dir / ADAPTER_FILE
        adapter = self._adapter_tensors()
        counts = self._global_counts()
        if acc.is_main_process:
            self._write_adapter(adapter, final)
            per_kind = {kind_name(k): n for k, n in self.plan.samples_per_kind.items()}
            report = {"steps": self.step, "counts": counts, "samples_per_kind_per_epoch": per_kind}
            (self.output_dir / "data_report.json").write_text(json.dumps(report, indent=1))
            skipped = {k: counts[k] for k in SKIP_REASONS if counts[k]}
            log.info(
                "Done: %d steps; rows skipped %s; %d samples truncated (%d tokens cut); adapter %s",
                self.step,
                skipped or "none",
                counts["truncated"],
                counts["truncated_tokens"],
                final,
            )
            writer.close()
        acc.wait_for_everyone()
        return final

    def _log(self, window: list[dict[str, Any]], seconds: float, writer: MetricsWriter | None) -> None:
        counts = self._global_counts()
        tokens = sum(s["tokens"] for s in window)
        losses = [s["loss"] for s in window if s["loss"] is not None]
        record = {
            "step": self.step,
            "epoch": round(self.step / self.plan.steps_per_epoch, 4),
            "loss": sum(losses) / len(losses) if losses else None,
            "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "tokens": tokens,
            "kinds": dict(Counter(s["kind"] for s in window)),
            "skipped": {k: counts[k] for k in SKIP_REASONS},
            "truncated": {"samples": counts["truncated"], "tokens": counts["truncated_tokens"]},
        }
        norms = [s["grad_norm"] for s in window if s["grad_norm"] is not None]
        if norms:
            record["grad_norm"] = sum(norms) / len(norms)
        if writer is None:
            return
        writer.write(record)
        lrs = ", ".join(f"{k} {v:.3g}" for k, v in record["lr"].items())
        skipped = sum(record["skipped"].values())
        log.info(
            "step %d/%d  epoch %.2f  loss %s  lr [%s]  %.0f tokens/s  skipped %d  truncated %d",
            self.step,
            self.total_steps,
            record["epoch"],
            "-" if record["loss"] is None else f"{record['loss']:.4f}",
            lrs,
            record["tokens_per_s"],
            skipped,
            record["truncated"]["samples"],
        )


def run(config: TrainConfig | dict[str, Any] | str | Path, overrides: list[str] | None = None) -> Path:
    """Train as ``config`` says (a :class:`TrainConfig`, a dict of the same shape, or a YAML
    file with optional ``KEY=VALUE`` overrides); returns the final adapter file."""
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    elif overrides:
        raise ValueError("overrides apply to a YAML config file; edit the dict or TrainConfig instead")
    return Trainer(config).train()
