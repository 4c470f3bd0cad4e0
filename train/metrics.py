"""What a run reports: rows skipped and truncated (counted on every process, summed for the
record), a record per window of steps, and where records go: a JSONL file always, TensorBoard
and wandb when installed."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .data import SKIP_REASONS, Batch

log = logging.getLogger(__name__)

COUNTERS = (*SKIP_REASONS, "truncated", "truncated_tokens")
MAX_SKIP_WARNINGS = 10  # per reason and process; the rest are only counted


def kind_name(kind: tuple[str, bool]) -> str:
    return f"{kind[0]}/{'image' if kind[1] else 'text'}"


def count_rows(micro: list[Batch], counts: Counter[str], warned: Counter[str]) -> None:
    """Add a step's truncated and skipped rows to this process's ``counts``; warn of the first few."""
    for batch in micro:
        counts["truncated"] += batch.truncated
        counts["truncated_tokens"] += batch.truncated_tokens
        for s in batch.skipped:
            counts[s["skip"]] += 1
            warned[s["skip"]] += 1
            if warned[s["skip"]] <= MAX_SKIP_WARNINGS:
                log.warning("Skipped row %d of %s (%s): %s", s["row"], s["source"], s["skip"], s["detail"])


def global_counts(accelerator: Accelerator, counts: Counter[str]) -> dict[str, int]:
    """``counts`` summed over processes (every process must call it)."""
    local = torch.tensor([counts[k] for k in COUNTERS], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, "sum")
    return {k: int(v) for k, v in zip(COUNTERS, total.tolist())}


def window_record(
    step: int, epoch: float, window: list[dict[str, Any]], seconds: float, lrs: dict[str, float], counts: dict
) -> dict[str, Any]:
    """The record of the steps in ``window`` (what :func:`train.step.train_step` returned)."""
    tokens = sum(s["tokens"] for s in window)
    losses = [s["loss"] for s in window if s["loss"] is not None]
    by_kind: dict[str, list[float]] = {}
    for s in window:
        if s["loss"] is not None:
            by_kind.setdefault(s["kind"], []).append(s["loss"])
    record = {
        "step": step,
        "epoch": round(epoch, 4),
        "loss": sum(losses) / len(losses) if losses else None,
        "loss_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "lr": lrs,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "tokens": tokens,
        "kinds": dict(Counter(s["kind"] for s in window)),
        "skipped": {k: counts[k] for k in SKIP_REASONS},
        "truncated": {"samples": counts["truncated"], "tokens": counts["truncated_tokens"]},
    }
    norms = [s["grad_norm"] for s in window if s["grad_norm"] is not None]
    if norms:
        record["grad_norm"] = sum(norms) / len(norms)
    return record


def log_record(record: dict[str, Any], total_steps: int) -> None:
    lrs = ", ".join(f"{k} {v:.3g}" for k, v in record["lr"].items())
    log.info(
        "step %d/%d  epoch %.2f  loss %s  lr [%s]  %.0f tokens/s  skipped %d  truncated %d",
        record["step"],
        total_steps,
        record["epoch"],
        "-" if record["loss"] is None else f"{record['loss']:.4f}",
        lrs,
        record["tokens_per_s"],
        sum(record["skipped"].values()),
        record["truncated"]["samples"],
    )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class MetricsWriter:
    """Writes one JSON object per record to ``metrics.jsonl`` (a resumed run appends to it)
    and mirrors the numbers to TensorBoard / wandb. Only the main process writes."""

    def __init__(
        self, output_dir: Path, report_to: list[str], config: dict[str, Any], project: str, *, append: bool
    ) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")
        wanted = set(report_to)
        auto = "auto" in wanted
        self.tensorboard = None
        self.wandb = None
        if "tensorboard" in wanted or (auto and _installed("tensorboard")):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        if "wandb" in wanted or (auto and _installed("wandb")):
            import wandb

            self.wandb = wandb.init(project=project, config=config, dir=str(output_dir), resume="allow")
        unknown = wanted - {"auto", "tensorboard", "wandb", "none"}
        if unknown:
            log.warning("Unknown log.report_to entries ignored: %s", sorted(unknown))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in _flatten(record).items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out
