"""Runs in separate processes: DDP on CPU (gloo) under ``accelerate launch`` against one process
accumulating the same global batch, and a run killed with SIGKILL then resumed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from train.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_process_ddp_matches_one_process(tmp_path):
    data = write_synthetic(tmp_path / "data", rows=6)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "base": "tiny",
                    "pretrained_encoder": False,
                    "adapter": {
                        "image_encoder": "efficientnet-lite0",
                        "visual_dim": 32,
                        "visual_depth": 1,
                        "visual_heads": 2,
                    },
                },
                "data": {
                    "sources": [{"path": str(data[k])} for k in ("captions", "instructions", "conversations")],
                    "batch_size": 2,
                    "max_len": 256,
                },
                # Joint: image-text and text batches, each step touching one group (unused
                # parameters in DDP), with gradient clipping on.
                "optim": {"epochs": 1, "warmup_epochs": 0.2, "lr": 1e-2, "clip_grad": 1.0},
                "checkpoint": {"every_epochs": None},
                "log": {"report_to": ["none"]},
            }
        )
    )
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    accelerate += ["--main_process_port", str(free_port())]
    two = launch([*accelerate, "-m", "train", "joint", "--config", str(config), "--output-dir", "two"], tmp_path)
    one = launch(
        [sys.executable, "-m", "train", "joint", "--config", str(config), "--output-dir", "one", "optim.grad_accum=2"],
        tmp_path,
    )
    assert "2 per device x 2 processes x 1 accumulation" in two
    assert "2 per device x 1 processes x 2 accumulation" in one
    a = load_file(tmp_path / "one" / "adapter.safetensors")
    b = load_file(tmp_path / "two" / "adapter.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"DDP and single-process adapters differ by {worst}"
    # The linears' biases start at zero: the runs trained, so the match is not between untouched adapters.
    assert max(a[k].abs().max().item() for k in a if k.startswith("layers.") and k.endswith(".bias")) > 1e-3


def test_killed_run_resumes_bit_identical(tmp_path):
    """SIGKILL mid-run (possibly mid-save), then --resume: the same adapter as a run never stopped."""
    data = write_synthetic(tmp_path / "data", rows=6)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"base": "tiny", "pretrained_encoder": False, "adapter": {"image_encoder": None}},
                "data": {"sources": [{"path": str(data["instructions"])}], "batch_size": 2, "max_len": 256},
                "optim": {"epochs": 12, "warmup_epochs": 1, "lr": 1e-2},
                "checkpoint": {"every_steps": 1, "keep_last": 2},
                "log": {"report_to": ["none"]},
            }
        )
    )
    command = [sys.executable, "-m", "train", "finetune", "--config", str(config), "--output-dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen(
        [*command, "killed"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "killed" / "checkpoints" / "step-00000003").exists():
            assert victim.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait(timeout=30)
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()  # it really died mid-run
    launch([*command, "killed", "--resume"], tmp_path)
    launch([*command, "full"], tmp_path)
    a = load_file(tmp_path / "full" / "adapter.safetensors")
    b = load_file(tmp_path / "killed" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
