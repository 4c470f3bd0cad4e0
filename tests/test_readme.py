"""The README's shell commands run on a fresh clone, so they cannot drift.

Every command of every ``bash`` block in README.md is run, in order, in one ``git clone`` of this
repository (its committed state) that reuses this checkout's environment, each with a time limit.
``python app.py`` is started once and probed for HTTP 200, and the README's client talks to it;
other ``app.py`` commands are started, probed and stopped. A command too costly or impossible here
is in ``SKIP``, or in ``INSTEAD`` with the cheaper form that runs (fewer steps or tokens, no
compile); either way with the reason and the tests that cover the rest, which must exist. A README
command that is neither run nor listed as such fails, so a new command has to be looked at."""

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
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SELF = ".venv/bin/python -m pytest"
"""The test suite this test is part of."""

SKIP = {
    "python app.py --base /path/to/llama_dir --adapter BIAS-7B --device cuda --share": (
        "needs Meta's LLaMA-7B weights (not distributable), a GPU, and network for BIAS-7B, CLIP and the share "
        "link; tests/test_weights.py::test_official_adapter_end_to_end_with_bgr_computes_the_released_forward "
        "loads an official adapter on a Meta-layout folder, tests/test_app.py::test_main_loads_once_and_launches "
        "passes the flags to load"
    ),
    "python -m llama_adapter.chat --base /path/to/llama_dir --adapter BIAS-7B --image photo.jpg --device cuda": (
        "needs Meta's LLaMA-7B weights, a GPU and network for BIAS-7B and CLIP; "
        "tests/test_weights.py::test_official_adapter_end_to_end_with_bgr_computes_the_released_forward answers "
        "about an image with an official adapter on a Meta-layout folder"
    ),
    "python -m llama_adapter.fetch BIAS-7B clip-vit-l-14": (
        "downloads 1.1 GB from GitHub and OpenAI; tests/test_downloads.py::"
        "test_published_hash_is_checked_and_mirrors_are_tried_in_order and tests/test_downloads.py::"
        "test_fetch_readies_an_offline_machine fetch pinned files from a local server"
    ),
    "python -m train joint --config configs/tiny-cpu.yaml --base path/to/llama": (
        "path/to/llama stands for the user's model; tests/test_train_trainer.py::"
        "test_cli_trains_on_a_hugging_face_llama_folder runs --base with a Llama folder"
    ),
    "python -m train.recipes.demo": (
        "rebuilds the shipped model: about 115 minutes on 2 cores; tests/test_demo_model.py::"
        "test_the_quick_recipe_trains_and_its_loss_falls runs the same entry point on a subset"
    ),
    "python -m train.recipes.demo --quick": (
        "minutes; tests/test_demo_model.py::test_the_quick_recipe_trains_and_its_loss_falls runs the same entry point"
    ),
    "python -m train.recipes.demo --ablations": (
        "four training runs: hours on 2 cores; tests/test_demo_model.py::"
        "test_the_quick_recipe_trains_and_its_loss_falls runs its data and training code (no test runs the "
        "ablation loop itself)"
    ),
}
"""README commands not run here, each with why and the test that covers what it does."""

DEMO_APP = "python app.py"
"""Started once in the clone; the README commands that serve the demo or talk to it use that one."""

DEMO_CLIENT = "curl http://127.0.0.1:7860/"
"""Commands that start so talk to the demo: run against the one started here."""

INSTEAD = {
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python app.py": (
        ".venv/bin/pip install -r requirements.txt",
        "the clone reuses this checkout's environment as .venv instead of creating one, and its "
        "`.venv/bin/python app.py` is the demo server (`python` is .venv/bin/python on the clone's PATH); "
        "tests/test_app.py::test_python_app_py_serves_the_default_model_offline starts app.py too",
    ),
    "python -m llama_adapter.chat --compile": (
        "python -m llama_adapter.chat",
        "run without --compile (a cold compile of the demo model takes 3 to 10+ minutes on 2 cores); "
        "tests/test_generate.py::test_compiled_chat_cli_answers_as_eager runs --quantize int8 --compile",
    ),
    'python -m llama_adapter.chat --base smollm2-135m --prompt "Name three colours."': (
        'python -m llama_adapter.chat --base smollm2-135m --prompt "Name three colours." --max-new-tokens 8',
        "8 tokens (the whole answer takes 1 to 2 minutes on 2 busy cores); "
        "tests/test_generate.py::test_sensible_answer checks a longer answer to the same question",
    ),
    "python -m train joint --config configs/tiny-cpu.yaml": (
        "python -m train joint --config configs/tiny-cpu.yaml --max-steps 2",
        "2 of its 57 steps (the adapter is written all the same, for the evaluation command); "
        "tests/test_train_trainer.py::test_overfits_eight_samples_and_base_stays_bit_identical trains to the end",
    ),
    "torchrun --nproc_per_node 2 -m train joint --config configs/tiny-cpu.yaml": (
        "torchrun --nproc_per_node 2 -m train joint --config configs/tiny-cpu.yaml --max-steps 2",
        "2 steps; tests/test_train_distributed.py::test_two_process_ddp_matches_one_process checks a whole 2-process "
        "DDP run against one process",
    ),
    "accelerate launch --config_file configs/accelerate/fsdp-cpu-2proc.yaml -m train joint --config "
    "configs/tiny-cpu.yaml": (
        "accelerate launch --config_file configs/accelerate/fsdp-cpu-2proc.yaml -m train joint --config "
        "configs/tiny-cpu.yaml --max-steps 2",
        "2 steps; tests/test_train_distributed.py::test_fsdp_matches_ddp_and_resumes_bit_identical checks a whole "
        "FSDP run with these settings against DDP",
    ),
    "accelerate launch --config_file configs/accelerate/fsdp-8gpu.yaml -m train joint --config "
    "configs/llama7b-joint.yaml": (
        "python -m train joint --config configs/llama7b-joint.yaml --print-config",
        "needs 8 GPUs and LLaMA-7B: only its training config is resolved here; tests/test_train_distributed.py::"
        "test_fsdp_matches_ddp_and_resumes_bit_identical runs fsdp-8gpu.yaml's FSDP2 settings on 2 CPU processes",
    ),
}
EASY_VQA_TEST = (
    "--data \"$(python -c 'import easy_vqa, os; print(os.path.dirname(easy_vqa.__file__))')/data/test/questions.json\""
)
EVALUATE_DEMO = "python -m train.evaluate vqa --adapter assets/demo-adapter.safetensors --per-kind"
for blind in ("", " --no-image"):
    INSTEAD[f"{EVALUATE_DEMO} 25{blind} {EASY_VQA_TEST}"] = (
        f"{EVALUATE_DEMO} 1{blind} {EASY_VQA_TEST}",
        "one question of each kind (100 take 5 to 10 minutes on 2 cores); tests/test_train_evaluate.py::"
        "test_free_form_replies_are_judged_from_their_words and tests/test_train_evaluate.py::"
        "test_a_per_kind_sample_holds_as_many_yes_as_no check the judging and the sample",
    )
"""README commands run in a cheaper or runnable form: (what runs, why, and the test that covers the rest)."""

STDIN = {"python -m llama_adapter.chat --compile": "Name a colour.\n/exit\n"}
"""Interactive commands and what is typed into them."""

LIMIT_S = 300
"""Each command's time limit: a hang fails the test rather than CI's overall timeout."""

TEST_NAME = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")


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


@pytest.fixture(scope="module")
def demo_app(clone) -> Iterator[int]:
    """The port of ``python app.py`` started once in the clone."""
    with serving(DEMO_APP, clone, environment(clone), LIMIT_S) as port:
        yield port


@pytest.mark.slow
@pytest.mark.parametrize(("section", "command"), COMMANDS, ids=[f"{s}: {c}"[:90] for s, c in COMMANDS])
def test_readme_command_runs_on_a_fresh_clone(section, command, clone, request):
    if command == SELF:
        pytest.skip("the test suite this test is part of")
    if command in SKIP:
        pytest.skip(SKIP[command])
    to_run = INSTEAD.get(command, (command, ""))[0]
    env = environment(clone)
    if command == DEMO_APP:
        assert answers(request.getfixturevalue("demo_app"))
    elif command.startswith(DEMO_CLIENT):
        port = request.getfixturevalue("demo_app")
        reply = json.loads(run(section, to_run.replace(":7860/", f":{port}/"), clone, env, LIMIT_S))
        assert reply.get("choices") and "error" not in reply, reply
    elif "app.py" in to_run:
        with serving(to_run, clone, env, LIMIT_S):
            pass
    else:
        run(section, to_run, clone, env, LIMIT_S, STDIN.get(command, ""))
    if command.endswith(f"&& .venv/bin/{DEMO_APP}"):  # the set-up line, which ends by serving the demo
        assert answers(request.getfixturevalue("demo_app"))


def test_every_skipped_or_replaced_command_is_still_in_the_readme():
    commands = {c for _, c in COMMANDS}
    assert not ({SELF} | set(SKIP) | set(INSTEAD) | set(STDIN)) - commands


def test_every_skipped_or_replaced_command_names_the_tests_that_cover_it():
    for command, reason in [*SKIP.items(), *((c, why) for c, (_, why) in INSTEAD.items())]:
        named = TEST_NAME.findall(reason)
        assert named, f"{command!r}: its reason names no tests/test_*.py::test_* that covers it"
        for file, name in named:
            path = ROOT / "tests" / file
            assert path.is_file() and f"def {name}(" in path.read_text(), f"{command!r}: no {file}::{name}"
