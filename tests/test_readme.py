"""The README's shell commands run as written on a fresh clone, so they cannot drift.

Every command of every ``bash`` block in README.md is run, in order, in a ``git clone`` of this
repository (its committed state) that reuses this checkout's environment, each with a time limit;
``python app.py`` commands are started, probed for HTTP 200 and stopped. A command the test cannot
run here is in ``SKIP`` with the reason; a README command that is neither run nor skipped fails,
so a new command has to be looked at."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SKIP = {
    ".venv/bin/python -m pytest": "the test suite this test is part of",
    "python app.py --base /path/to/llama_dir --adapter BIAS-7B --device cuda --share": (
        "needs Meta's LLaMA-7B weights (not distributable), a GPU, and network for BIAS-7B, CLIP and the share link"
    ),
    "python -m llama_adapter.chat --base /path/to/llama_dir --adapter BIAS-7B --image photo.jpg --device cuda": (
        "needs Meta's LLaMA-7B weights, a GPU and network for BIAS-7B and CLIP"
    ),
    "python -m llama_adapter.fetch BIAS-7B clip-vit-l-14": (
        "downloads 1.1 GB from GitHub and OpenAI (tests/test_downloads.py checks the pinned downloads against a "
        "local server)"
    ),
    "accelerate launch --config_file configs/accelerate/fsdp-8gpu.yaml -m train joint --config "
    "configs/llama7b-joint.yaml": "needs 8 GPUs and LLaMA-7B",
    "python -m train.recipes.demo": "rebuilds the shipped model: about 70 minutes on 2 cores",
    "python -m train.recipes.demo --ablations": "four training runs: hours on 2 cores",
    "python -m train joint --config configs/tiny-cpu.yaml --base path/to/llama": (
        "path/to/llama stands for the user's model; tests/test_train_trainer.py::"
        "test_cli_trains_on_a_hugging_face_llama_folder runs --base with a Llama folder"
    ),
    "python -m train.recipes.demo --quick": (
        "minutes; tests/test_demo_model.py::test_the_quick_recipe_trains_and_its_loss_falls runs the same entry point"
    ),
}

INSTEAD = {
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python app.py": (
        ".venv/bin/pip install -r requirements.txt && .venv/bin/python app.py",
        "the clone reuses this checkout's environment as .venv instead of creating one",
    ),
}

STDIN = {"python -m llama_adapter.chat --quantize int8 --compile": "Name a colour.\n/exit\n"}
"""Interactive commands and what is typed into them."""

LIMIT_S = 300
LONGER_S = {  # compiling cold takes 3 min on 2 idle cores (over 10 on a busy machine); training a few CPU-minutes
    "python app.py --quantize int8 --compile --host 0.0.0.0 --port 7860": 1200,
    "python -m llama_adapter.chat --quantize int8 --compile": 1200,
    "python -m train joint --config configs/tiny-cpu.yaml": 900,
    "torchrun --nproc_per_node 2 -m train joint --config configs/tiny-cpu.yaml": 900,
    "accelerate launch --config_file configs/accelerate/fsdp-cpu-2proc.yaml -m train joint --config "
    "configs/tiny-cpu.yaml": 900,
}

APP_CLIENTS = "curl http://127.0.0.1:7860/"
"""Commands that talk to a running ``python app.py``: run against one the test starts."""


def readme_commands() -> list[tuple[str, str]]:
    """(section, command) for every command of every ``bash`` block: lines joined across ``\\``
    continuations and open quotes, trailing comments dropped, whitespace collapsed."""
    commands, section, block, pending = [], "", False, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            block = line.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        pending += line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            pending += "\n"
            continue
        command = " ".join(without_comment(pending).split())
        pending = ""
        if command:
            commands.append((section, command))
    return commands


def without_comment(command: str) -> str:
    """``command`` without a trailing ``# comment`` (a ``#`` after whitespace, outside quotes)."""
    for match in re.finditer(r"\s#", command):
        head = command[: match.start()]
        try:
            shlex.split(head)
        except ValueError:
            continue
        return head
    return command


COMMANDS = readme_commands()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone of the committed repository, with this checkout's environment as .venv."""
    target = tmp_path_factory.mktemp("readme") / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
    (target / ".venv").symlink_to((ROOT / ".venv").resolve())
    return target


def environment(clone: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return env


@contextlib.contextmanager
def serving(command: str, clone: Path, env: dict[str, str], limit_s: float):
    """Start a server command, wait for HTTP 200 on its port, yield the port, then stop it (and
    its children)."""
    port = free_port()
    command = command.replace("--port 7860", f"--port {port}")
    env = {**env, "GRADIO_SERVER_PORT": str(port)}
    log = clone / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", command], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + limit_s
        while not answers(port):
            assert proc.poll() is None, f"{command} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            if time.monotonic() > deadline:
                pytest.fail(f"{command} served nothing on port {port} within {limit_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def run(section: str, command: str, clone: Path, env: dict[str, str], limit_s: float, stdin: str = "") -> str:
    """Run ``command`` to its end within ``limit_s``; returns its output, fails on a non-zero exit."""
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=clone,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a command past its limit is stopped with all its children
    )
    try:
        stdout, stderr = proc.communicate(stdin, timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"[{section}] {command} ran past its {limit_s} s limit")
    assert proc.returncode == 0, f"[{section}] {command} failed ({proc.returncode}):\n{stderr[-3000:]}"
    return stdout


@pytest.mark.slow
@pytest.mark.parametrize(("section", "command"), COMMANDS, ids=[f"{s}: {c}"[:90] for s, c in COMMANDS])
def test_readme_command_runs_on_a_fresh_clone(section, command, clone):
    if command in SKIP:
        pytest.skip(SKIP[command])
    to_run = INSTEAD.get(command, (command, ""))[0]
    limit_s = LONGER_S.get(command, LIMIT_S)
    env = environment(clone)
    if command.startswith(APP_CLIENTS):
        with serving("python app.py", clone, env, limit_s) as port:
            out = run(section, to_run.replace(":7860/", f":{port}/"), clone, env, limit_s)
        reply = json.loads(out)
        assert reply.get("choices") and "error" not in reply, out[:3000]
    elif "app.py" in to_run:
        with serving(to_run, clone, env, limit_s):
            pass
    else:
        run(section, to_run, clone, env, limit_s, STDIN.get(command, ""))


def test_every_skipped_or_replaced_command_is_still_in_the_readme():
    commands = {c for _, c in COMMANDS}
    assert not (set(SKIP) | set(INSTEAD) | set(STDIN) | set(LONGER_S)) - commands
