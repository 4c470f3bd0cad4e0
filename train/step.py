"""One optimiser step. A step is one kind of batch (parameter group x with/without image) on every
process and micro-batch. The loss is the mean over the answer tokens of the whole global batch,
so a run gives the same update whatever its split into processes x accumulation x batch. In
``joint``, the other group is frozen for the step, so a batch updates only its own group (AdamW
skips parameters without a gradient: no moment update, no weight decay)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from llama_adapter.config import IMAGE_ENCODERS

from .builders import Groups
from .data import IGNORE, Batch
from .metrics import kind_name

if TYPE_CHECKING:
    from .trainer import TrainState


def activate(groups: Groups, group: str) -> None:
    """Joint training: only ``group`` gets gradients this step."""
    for g, params in groups.items():
        for _, p in params:
            p.requires_grad_(g == group)


def loss_sum(state: TrainState, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens of a micro-batch. A micro-batch whose rows
    were all skipped runs one padding token with no loss, so every process still joins the
    gradient all-reduce."""
    device = state.accelerator.device
    if batch.input_ids is None:
        ids = torch.full((1, 2), state.built.base.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        size = IMAGE_ENCODERS[state.unwrapped.adapter_config.image_encoder].image_size if batch.kind[1] else 0
        images = torch.zeros(1, 3, size, size) if batch.kind[1] else None
    else:
        ids, labels, images = batch.input_ids, batch.labels, batch.images
    if images is not None:
        images = images.to(device, next(state.unwrapped.image_encoder.parameters()).dtype)
    labels = labels.to(device)
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE  # position i predicts token i + 1
    with state.accelerator.autocast():
        logits = state.model(ids.to(device), images, logits_at=positions)  # [answer tokens, vocab]
    return F.cross_entropy(logits.float(), labels[:, 1:][positions[:, :-1]], reduction="sum")


def train_step(state: TrainState, micro: list[Batch]) -> dict[str, Any]:
    """One optimiser step over this process's ``grad_accum`` micro-batches (all of one kind)."""
    cfg, acc = state.cfg, state.accelerator
    kind = micro[0].kind
    if cfg.stage == "joint":
        activate(state.groups, kind[0])
    answer = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in micro if b.labels is not None)
    total_answer = acc.reduce(torch.tensor(float(answer), device=acc.device), "sum").item()
    # backward() divides by the accumulation steps and DDP averages over processes: undo both,
    # so that the gradient is that of the mean over the global batch's answer tokens.
    scale = acc.num_processes * cfg.optim.grad_accum / max(total_answer, 1.0)
    loss_total = torch.zeros((), device=acc.device, dtype=torch.float64)
    grad_norm = None
    # A step whose every row was skipped (on all processes alike) must not move the weights:
    # AdamW would still apply momentum and decay. The schedule advances all the same.
    for batch in micro if total_answer else []:
        with acc.accumulate(state.model):
            loss = loss_sum(state, batch)
            acc.backward(loss * scale)
            loss_total += loss.detach()
            if acc.sync_gradients:
                if cfg.optim.clip_grad:
                    active = [p for params in state.groups.values() for _, p in params if p.requires_grad]
                    grad_norm = acc.clip_grad_norm_(active, cfg.optim.clip_grad)
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # After a skipped first step torch warns that the scheduler ran before the optimiser.
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
        state.scheduler.step()
    tokens = sum(b.tokens for b in micro)
    summed = acc.reduce(torch.tensor([loss_total.item(), float(tokens)], device=acc.device), "sum").tolist()
    return {
        "loss": summed[0] / total_answer if total_answer else None,  # every row skipped: no loss
        "tokens": summed[1],
        "answer_tokens": total_answer,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "kind": kind_name(kind),
    }
