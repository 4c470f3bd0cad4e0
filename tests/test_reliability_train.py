"""Training that is killed: at any point of writing a checkpoint, no half-written checkpoint is ever
read; killed at random steps (really, with SIGKILL), the resumed run ends bit-identical to one never
stopped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch
import yaml
from safetensors.torch import load_file

from llama_adapter.weights import read_adapter
from train import checkpoint as ckpt
from train.checkpoint import list_checkpoints, read_checkpoint, resolve_resume, write_checkpoint
from train.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parent.parent
FILES = {ckpt.ADAPTER_FILE, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE, ckpt.RNG_FILE}


class Killed(BaseException):
    """A simulated SIGKILL: nothing after it runs, not even ``except Exception`` handlers."""


def save(out: Path, step: int, keep_last: int = 2) -> Path:
    def write_adapter(path: Path) -> None:
        safetensors.torch.save_file({"w": torch.full((4,), float(step))}, str(path))

    return write_checkpoint(
        out,
        step,
        write_adapter=write_adapter,
        optimizer_tensors={"w/exp_avg": torch.full((4,), float(step))},
        state={"step": step},
        rng_states=[{"seed": step}],
        keep_last=keep_last,
    )


def assert_every_listed_checkpoint_is_whole(out: Path) -> None:
    for path in list_checkpoints(out):
        assert {p.name for p in path.iterdir()} == FILES, f"{path.name} is incomplete"
        state, tensors, _ = read_checkpoint(path)
        assert tensors["w/exp_avg"][0].item() == state["step"] == int(path.name.split("-")[1])


def kill_at(monkeypatch, target: Any, name: str, after: int = 0, partial: Callable[..., Any] | None = None) -> None:
    """Make ``target.name`` die on its call number ``after`` (0-based), optionally having done part of its work."""
    real = getattr(target, name)
    calls = {"n": 0}

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] - 1 == after:
            if partial is not None:
                partial(real, *args, **kwargs)
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, dying)


def rmtree_one_file(real: Callable[..., Any], path: Any, *args: Any, **kwargs: Any) -> None:
    """rmtree cut short after removing one file."""
    for f in sorted(Path(path).iterdir()):
        f.unlink()
        return


CRASH_POINTS = {
    "writing the adapter": (safetensors.torch, "save_file", 0, None),
    "writing the optimiser state": (ckpt, "save_file", 0, None),
    "writing the RNG states": (Path, "write_text", 0, None),
    "writing the trainer state": (Path, "write_text", 1, None),
    "renaming into place": (ckpt.os, "replace", 0, None),
    "deleting an old checkpoint": (ckpt.shutil, "rmtree", 0, rmtree_one_file),
    "moving an old checkpoint aside": (ckpt.os, "replace", 1, None),
}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_save_killed_anywhere_leaves_only_whole_checkpoints(point, tmp_path, monkeypatch):
    for step in (1, 2):
        save(tmp_path, step)
    target, name, after, partial = CRASH_POINTS[point]
    with monkeypatch.context() as m:
        kill_at(m, target, name, after, partial)
        with pytest.raises(Killed):
            save(tmp_path, 3)
    assert_every_listed_checkpoint_is_whole(tmp_path)
    latest = resolve_resume("auto", tmp_path)
    assert latest is not None and read_checkpoint(latest)[0]["step"] in (2, 3)
    # The next save goes through and clears what the killed one left behind.
    save(tmp_path, 4)
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step-00000004"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_every_listed_checkpoint_is_whole(tmp_path)


def test_saving_the_same_step_again_killed_midway_keeps_a_whole_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        save(tmp_path, step)
    with monkeypatch.context() as m:
        kill_at(m, ckpt.shutil, "rmtree", 0, rmtree_one_file)  # deleting the old copy of step 2
        with pytest.raises(Killed):
            save(tmp_path, 2)
    assert_every_listed_checkpoint_is_whole(tmp_path)
    assert resolve_resume("auto", tmp_path).name == "step-00000002"


# -- a real run, really killed -------------------------------------------------------------------------


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]


def latest_step(out: Path) -> int:
    root = out / "checkpoints"
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    return max((int(n.split("-")[1]) for n in names if n.startswith("step-")), default=0)


def test_a_run_killed_at_random_steps_resumes_exactly(tmp_path):
    """SIGKILL twice at random steps (each kill a random few milliseconds after a checkpoint
    appeared, so it may land in the middle of the next save), resume each time: the adapter is
    bit-identical to a run never stopped, and no incomplete checkpoint is ever listed."""
    seed = int(os.environ.get("KILL_SEED", 0))  # fixed; KILL_SEED=n tries other kill points
    rng = random.Random(seed)
    data = write_synthetic(tmp_path / "data", rows=6)
    config = tmp_path / "config.yaml"
    steps = 60
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"base": "tiny", "pretrained_encoder": False, "adapter": {"image_encoder": None}},
                "data": {"sources": [{"path": str(data["instructions"])}], "batch_size": 2, "max_len": 256},
                "optim": {"epochs": 12, "warmup_epochs": 1, "lr": 1e-2},  # 5 steps an epoch: 60 steps
                "checkpoint": {"every_steps": 1, "keep_last": 2},
                "log": {"report_to": ["none"]},
            }
        )
    )
    command = ["finetune", "--config", str(config), "--output-dir"]
    reference = launch([*command, "full"], tmp_path)  # runs alongside: a second core is there for it
    out = tmp_path / "killed"
    kills = sorted(rng.sample(range(3, steps - 5), 2))
    for i, step in enumerate(kills):
        victim = launch([*command, "killed", *(["--resume"] if i else [])], tmp_path)
        while latest_step(out) < step:
            assert victim.poll() is None, f"seed {seed}: the run ended before step {step}"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert not (out / "adapter.safetensors").exists(), f"seed {seed}: the run finished before the kill"
        assert_run_checkpoints_are_whole(out, seed)
    finish(launch([*command, "killed", "--resume"], tmp_path))
    finish(reference)
    a, b = (load_file(tmp_path / d / "adapter.safetensors") for d in ("full", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}: resume was not exact"
    assert read_adapter(out / "adapter.safetensors").metadata["training"]["step"] == steps


def assert_run_checkpoints_are_whole(out: Path, seed: int) -> None:
    listed = list_checkpoints(out)
    assert listed, f"seed {seed}: no checkpoint survived"
    for path in listed:
        assert {p.name for p in path.iterdir()} == FILES, f"seed {seed}: {path.name} is incomplete"
        read_checkpoint(path)
        read_adapter(path / ckpt.ADAPTER_FILE)
    assert resolve_resume("auto", out) == listed[-1]
