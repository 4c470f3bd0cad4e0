"""Where training metrics go: a JSONL file always, TensorBoard and wandb when installed."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
