"""Checkpoints: a folder per step holding the adapter (the library's safetensors format), the
optimiser's tensors (safetensors), and everything else as JSON (step, scheduler, counters, RNG
states of every process). Written into a temporary folder and renamed, so a checkpoint on disk is
always complete; resuming never unpickles anything."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llama_adapter.errors import CheckpointError

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_states.json"
_STEP_DIR = re.compile(r"step-(\d+)")


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
