"""Checkpoints: a folder per step holding the adapter (the library's safetensors format), the
optimiser's tensors (safetensors), and everything else as JSON (step, scheduler, counters, RNG
states of every process). Written into a temporary folder and renamed, so a checkpoint on disk is
always complete; resuming never unpickles anything. :func:`save_checkpoint` and :func:`restore`
save and resume a run; the rest reads and writes the files."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from accelerate import DistributedType
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from llama_adapter.errors import CheckpointError
from llama_adapter.model import adapter_state_dict
from llama_adapter.weights import read_adapter, save_adapter

from .metrics import global_counts

if TYPE_CHECKING:
    from .trainer import TrainState

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_states.json"
_STEP_DIR = re.compile(r"step-(\d+)")


# -- a run's checkpoints --------------------------------------------------------------------------------


def save_checkpoint(state: TrainState) -> Path:
    """Checkpoint the run at its current step (every process must call it)."""
    acc = state.accelerator
    adapter = adapter_tensors(state)
    # DeepSpeed's ZeRO optimiser keeps flat partitions of its own, not per-parameter state.
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    tensors, groups = ({}, []) if deepspeed else optimizer_state(state.optimizer.optimizer, state.names)
    rng = gather_object([rng_state()])
    counts = global_counts(acc, state.counts)
    if acc.is_main_process:
        record = {
            "step": state.step,
            "epoch": state.step / state.plan.steps_per_epoch,
            "steps_per_epoch": state.plan.steps_per_epoch,
            "total_steps": state.total_steps,
            "global_batch": state.plan.global_batch,
            "plan": state.plan.fingerprint(),
            "world_size": acc.num_processes,
            "optimizer_groups": groups,
            "scheduler": state.scheduler.state_dict(),
            "counts": counts,
            "config": state.cfg.to_dict(),
        }
        write_checkpoint(
            state.output_dir,
            state.step,
            write_adapter=partial(write_adapter, state, adapter),
            optimizer_tensors=tensors,
            state=record,
            rng_states=rng,
            keep_last=state.cfg.checkpoint.keep_last,
        )
        log.info("Saved checkpoint %s", checkpoint_dir(state.output_dir, state.step))
    acc.wait_for_everyone()
    return checkpoint_dir(state.output_dir, state.step)


def restore(state: TrainState, path: Path) -> None:
    """Continue the run from checkpoint ``path``: adapter, optimiser, schedule, step, counters, RNG."""
    acc = state.accelerator
    record, tensors, rng = read_checkpoint(path)
    if record["plan"] != state.plan.fingerprint():
        raise CheckpointError(
            f"{path} was written with other data, seed or global batch size ({record['global_batch']}; now "
            f"{state.plan.global_batch}); the data order would not continue. Resume with the same settings."
        )
    if record["total_steps"] != state.total_steps:
        log.warning("Schedule changed since the checkpoint: %d → %d steps", record["total_steps"], state.total_steps)
    adapter = read_adapter(path / ADAPTER_FILE)
    if adapter.config != state.unwrapped.adapter_config:
        raise CheckpointError(f"{path} holds an adapter with other settings than this run's")
    params = dict(state.unwrapped.named_parameters())
    with torch.no_grad():
        for name, value in adapter.state_dict.items():
            params[name].copy_(place_like(value, params[name]))
    if acc.distributed_type == DistributedType.DEEPSPEED:
        log.warning("DeepSpeed: the optimiser's moments restart (ZeRO state is not saved); DDP and FSDP resume exactly")
    else:
        load_optimizer_state(state.optimizer.optimizer, state.names, tensors, record["optimizer_groups"])
    state.scheduler.load_state_dict(record["scheduler"])
    state.step = record["step"]
    if acc.is_main_process:
        state.counts.update(record["counts"])  # the others start at 0: counts are summed over processes
    if len(rng) == acc.num_processes:
        set_rng_state(rng[acc.process_index])
    else:
        log.warning("Checkpoint from %d processes, now %d: RNG states not restored", len(rng), acc.num_processes)
    log.info("Resumed from %s at step %d of %d", path, state.step, state.total_steps)


def adapter_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    """Whole adapter tensors on the CPU (gathered from shards under FSDP: call on every process)."""
    params = adapter_state_dict(state.unwrapped).items()
    # float(): DeepSpeed's bf16/fp16 modes cast the whole module, adapter included.
    return {n: _full(p).float() for n, p in params}


def write_adapter(state: TrainState, tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """The adapter file of the run at its current step, with what rebuilds its base and encoder."""
    cfg, base = state.cfg, state.built.base
    return save_adapter(
        path,
        tensors,
        state.unwrapped.adapter_config,
        base=base.config,
        base_name=cfg.model.base,
        base_fingerprint=base.fingerprint,
        prompt_template=state.built.template,
        system_prompt=cfg.model.system_prompt,
        extra={
            "training": {
                "stage": cfg.stage,
                "step": state.step,
                "total_steps": state.total_steps,
                # What rebuilds a random tiny base and a random-init encoder (tests) as trained.
                "seed": cfg.seed,
                "base_seed": cfg.model.base_seed,
                "pretrained_encoder": cfg.model.pretrained_encoder,
            }
        },
    )


# -- the files ------------------------------------------------------------------------------------------


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.fullmatch(d.name))]
    return [d for _, d in sorted(found) if (d / STATE_FILE).is_file()]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto`` → the latest checkpoint in ``output_dir`` (``None`` if there is none yet);
    otherwise the checkpoint folder given."""
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint folder (no {STATE_FILE}): pick one in output_dir/checkpoints"
        )
    return path


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    write_adapter: Callable[[Path], Any],
    optimizer_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep_last``.

    A process killed at any point leaves every ``step-*`` folder whole: files are written into a
    hidden folder that is renamed into place, and a folder to delete is first renamed out of the
    ``step-*`` names, so that a deletion cut short never leaves a half-emptied checkpoint behind."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".*-step-*"):  # from a run killed while saving or deleting
        shutil.rmtree(leftover, ignore_errors=True)
    final = checkpoint_dir(output_dir, step)
    tmp = root / f".tmp-step-{step:08d}"
    tmp.mkdir()
    write_adapter(tmp / ADAPTER_FILE)
    save_file({k: v.contiguous() for k, v in optimizer_tensors.items()}, str(tmp / OPTIMIZER_FILE))
    (tmp / RNG_FILE).write_text(json.dumps(rng_states))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    # The same step saved again (e.g. the end of a resumed run): the new copy is in place before the old goes.
    replaced = _move_aside(final) if final.exists() else None
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[: -max(1, keep_last)]:
        shutil.rmtree(_move_aside(old), ignore_errors=True)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def _move_aside(checkpoint: Path) -> Path:
    trash = checkpoint.with_name(f".old-{checkpoint.name}")
    os.replace(checkpoint, trash)
    return trash


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(state, optimiser tensors, RNG states) of a checkpoint folder."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(str(path / OPTIMIZER_FILE))
        rng = json.loads((path / RNG_FILE).read_text())
    except Exception as e:  # a missing file, bad JSON, a damaged safetensors file
        raise CheckpointError(f"Cannot read checkpoint {path} ({type(e).__name__}: {e})") from e
    return state, tensors, rng


# -- optimiser state, by parameter name --------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor, also from a sharded (FSDP2) DTensor; every process must call it."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def place_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (whole) placed like ``param``: sharded the same way when ``param`` is a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def optimizer_state(optimizer: torch.optim.Optimizer, names: dict[torch.Tensor, str]) -> tuple[dict, list]:
    """(tensors keyed ``name/slot``, param groups with hyperparameters and parameter names)."""
    tensors = {}
    groups = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for slot, value in optimizer.state.get(p, {}).items():
                tensors[f"{names[p]}/{slot}"] = _full(value) if torch.is_tensor(value) else torch.tensor(value)
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": [names[p] for p in group["params"]]})
    return tensors, groups


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: dict[torch.Tensor, str], tensors: dict[str, torch.Tensor], groups: list
) -> None:
    ours = [[names[p] for p in g["params"]] for g in optimizer.param_groups]
    if ours != [g["params"] for g in groups]:
        raise CheckpointError(
            "The checkpoint's optimiser holds other parameters than this run trains "
            "(different stage, wiring or adapter settings?)"
        )
    index = {name: i for i, name in enumerate(n for g in ours for n in g)}
    params = {names[p]: p for g in optimizer.param_groups for p in g["params"]}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, slot = key.rsplit("/", 1)
        state.setdefault(index[name], {})[slot] = value if slot == "step" else place_like(value, params[name])
    saved_groups = []
    for g in groups:
        hyper = {k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k != "params"}
        saved_groups.append({**hyper, "params": [index[n] for n in g["params"]]})
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})


# -- RNG ----------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able lists."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
