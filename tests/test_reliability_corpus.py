"""The bad-input corpus (``tests/bad_inputs.py``) through every door: the library, the command lines
(``python -m llama_adapter.chat``, ``python app.py``, ``python -m train``), the app's API and the
trainer. Each case is refused with its own clear message or accepted, and the next request still works."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import yaml
from bad_inputs import (
    API_SAMPLING,
    WHOLE_PROMPT_LIMITS,
    Case,
    checkpoint_cases,
    image_cases,
    prompt_cases,
    sampling_cases,
)
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from test_app import Served, serve
from test_image_chat import visual_pipeline

import app
import llama_adapter
import llama_adapter.chat
from llama_adapter import CheckpointError, InputError, Pipeline
from llama_adapter.images import open_image
from llama_adapter.pipeline import Limits
from train import run
from train.cli import main as train_main
from train.data import SKIP_REASONS

pytestmark = pytest.mark.slow

APP_LIMITS = Limits(max_new_tokens=app.MAX_NEW_TOKENS)  # what `python app.py` sets by default
QUICK = {"max_new_tokens": 2}
IMAGES, PROMPTS, SAMPLING = image_cases(), prompt_cases(), sampling_cases()
CHECKPOINTS = [
    "adapter-for-another-base",
    "official-adapter-for-another-base",
    "truncated-adapter",
    "empty-adapter",
    "text-named-safetensors",
    "foreign-safetensors",
    "damaged-metadata",
    "future-format",
    "pickle-that-runs-code",
    "pickle-in-a-base-shard",
    "missing-tokenizer",
    "config-with-wrong-shapes",
    "params-with-wrong-shapes",
    "unreadable-config",
    "unreadable-params",
    "truncated-base",
    "missing-base",
    "adapter-is-a-folder",
]


def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, BaseException | None]:
    """(result, None), or (None, the error) for the errors a bad input may get."""
    try:
        return fn(*args, **kwargs), None
    except (InputError, CheckpointError, AppError, ValidationError) as e:
        return None, e


def expect(case: Case, error: BaseException | None, refused: str | None = "same") -> None:
    """``case`` was refused with a message matching ``refused`` (default: the corpus's), or accepted."""
    refused = case.refused if refused == "same" else refused
    if refused is None:
        assert error is None, f"{case.name} should be accepted, got {type(error).__name__}: {error}"
    else:
        assert error is not None, f"{case.name} should be refused"
        assert re.search(refused, str(error)), f"{case.name}: {error}"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    """The app's model with the app's limits (a copy: the shared pipeline keeps the library's)."""
    return dataclasses.replace(visual_pipeline(), limits=APP_LIMITS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_spm) -> tuple[dict[str, Case], Path]:
    cases, marker = checkpoint_cases(tmp_path_factory.mktemp("checkpoints"), tiny_spm)
    return {c.name: c for c in cases}, marker


def test_every_checkpoint_case_is_run(checkpoints):
    assert list(checkpoints[0]) == CHECKPOINTS


# -- the library ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", IMAGES, ids=str)
def test_image_in_the_library(case: Case, pipe, tmp_path):
    path = case.value.write(tmp_path)
    image, error = attempt(open_image, path)
    expect(case, error)
    if error is None:
        assert image.mode == "RGB" and (case.check is None or case.check(image))
        assert pipe.visual_prompt(path).shape[:2] == (1, pipe.model.adapter_config.prompt_len)


@pytest.mark.parametrize("case", PROMPTS, ids=str)
def test_prompt_in_the_library(case: Case, pipe):
    answer, error = attempt(pipe.generate, case.value, **QUICK)
    expect(case, error)
    chat = pipe.chat()
    again, error = attempt(chat.ask, case.value, **QUICK)
    expect(case, error)
    if error is None:
        assert isinstance(answer, str) and again == answer
        assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    else:
        assert chat.messages == []  # a refused question leaves the conversation as it was
    assert pipe.running == 0


@pytest.mark.parametrize("case", SAMPLING, ids=str)
def test_sampling_in_the_library(case: Case, pipe):
    _, error = attempt(pipe.generate, "Say hi.", **case.value)
    expect(case, error)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_in_the_library_and_on_the_command_lines(name, checkpoints, capsys, caplog):
    cases, marker = checkpoints
    case = cases[name]
    _, error = attempt(llama_adapter.load, **case.value)
    expect(case, error)
    args = [f"--{k}={v}" for k, v in case.value.items()]
    code, err = chat_cli(capsys, [*args, "--prompt", "Hi"])
    assert code == 2 and err.startswith("error: ") and re.search(case.refused, err), err
    with caplog.at_level(logging.ERROR, logger="app"):
        assert app.main(args) == 2  # `python app.py` says why and stops
    assert any(re.search(case.refused, r.getMessage()) for r in caplog.records if r.name == "app")
    assert not marker.exists(), "a pickle ran code"


def test_the_library_still_answers_after_the_corpus(pipe):
    assert pipe.generate("Say hi.", **QUICK) == visual_pipeline().generate("Say hi.", **QUICK)
    assert pipe.running == 0


# -- the command line ----------------------------------------------------------------------------------


def chat_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """``python -m llama_adapter.chat ARGV`` in this process: (exit status, stderr)."""
    try:
        code = llama_adapter.chat.main(argv)
    except SystemExit as e:  # argparse refusing a value
        code = e.code
    return code, capsys.readouterr().err.strip()


def expect_cli(case: Case, code: int, err: str, argparse_refusal: str = "$^") -> None:
    if case.refused is None:
        assert code == 0, f"{case.name}: {err}"
        return
    *usage, last = err.splitlines() or [""]
    assert code == 2, f"{case.name}: {err}"
    if re.search(argparse_refusal, last):
        return
    assert not usage and last.startswith("error: ") and re.search(case.refused, last), f"{case.name}: {err}"


@pytest.fixture
def cli_model(monkeypatch, pipe):
    monkeypatch.setattr(llama_adapter.cli, "load", lambda *args, **kwargs: pipe)


@pytest.mark.parametrize("case", IMAGES, ids=str)
def test_image_on_the_command_line(case: Case, cli_model, capsys, tmp_path):
    path = case.value.write(tmp_path)
    code, err = chat_cli(capsys, ["--image", str(path), "--prompt", "What is it?", "--max-new-tokens", "2"])
    expect_cli(case, code, err)


@pytest.mark.parametrize("case", [c for c in PROMPTS if isinstance(c.value, str)], ids=str)
def test_prompt_on_the_command_line(case: Case, cli_model, capsys):
    code, err = chat_cli(capsys, ["--prompt", case.value, "--max-new-tokens", "2"])
    expect_cli(case, code, err)


@pytest.mark.parametrize("case", [c for c in SAMPLING if "beams" not in c.value], ids=str)
def test_sampling_on_the_command_line(case: Case, cli_model, capsys):
    [(key, value)] = case.value.items()
    code, err = chat_cli(capsys, ["--prompt", "Hi", f"--{key.replace('_', '-')}", str(value)])
    expect_cli(case, code, err, argparse_refusal=r"argument --[\w-]+: invalid (float|int) value")


# -- the app's API -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Served:
    """The app (shared with test_app.py), with the limits `python app.py` sets."""
    served = serve()
    kept, served.pipe.limits = served.pipe.limits, APP_LIMITS
    yield served
    served.pipe.limits = kept


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served.url, verbose=False)


@pytest.mark.parametrize("case", IMAGES, ids=str)
def test_image_through_the_api(case: Case, client, served, tmp_path):
    image = handle_file(case.value.write(tmp_path))
    result, error = attempt(client.predict, image, "What is it?", [], **QUICK, api_name="/describe_image")
    expect(case, error)
    if error is None:
        assert result["image_to_model"] and isinstance(result["answer"], str)
    assert served.pipe.running == 0


def chat(client: Client, message: Any, history: Any, **sampling: Any) -> tuple[Any, BaseException | None]:
    """``/chat`` through gradio_client, or as raw JSON for what its encoder refuses to send (a lone
    surrogate, NaN): any other client can send those."""
    args = {"message": message, "history": history, "system": "", **QUICK, "temperature": 0.0, "top_p": 1.0}
    args |= {"seed": 0, **sampling}
    try:
        json.dumps(args, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, UnicodeEncodeError):
        return raw_call(client.src, "/chat", list(args.values()))
    return attempt(client.predict, **args, api_name="/chat")


def raw_call(url: str, api_name: str, data: list[Any]) -> tuple[Any, BaseException | None]:
    body = json.dumps({"data": data})  # ASCII-escaped, NaN as NaN: what Python's json reads back
    base = f"{url.rstrip('/')}/gradio_api/call{api_name}"
    event = httpx.post(base, content=body, headers={"content-type": "application/json"}).json()["event_id"]
    kind = None
    with httpx.stream("GET", f"{base}/{event}", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind in ("complete", "error"):
                payload = json.loads(line.removeprefix("data: "))
                return (payload[0], None) if kind == "complete" else (None, AppError(payload["error"]))
    raise AssertionError(f"{api_name} ended without a result")


@pytest.mark.parametrize("case", PROMPTS, ids=str)
def test_prompt_through_the_api(case: Case, client, served):
    _, error = chat(client, case.value, [])
    expect(case, error)
    history = [{"role": "user", "content": case.value}, {"role": "assistant", "content": "Hi."}]
    _, error = chat(client, "Hello.", history)
    expect(case, error, case.refused if case.name in WHOLE_PROMPT_LIMITS else None)
    assert served.pipe.running == 0


@pytest.mark.parametrize("case", [c for c in SAMPLING if set(c.value) <= set(API_SAMPLING)], ids=str)
def test_sampling_through_the_api(case: Case, client):
    _, error = chat(client, "Say hi.", [], **case.value)
    expect(case, error)


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([{"role": "wizard", "content": "Abracadabra."}], r"role of system, user or assistant"),
        ("not a list of messages", r"role of system, user or assistant"),
        ([{"role": "user", "content": ["a", "list"]}], r"content must be text"),
    ],
    ids=["unknown-role", "history-not-a-list", "content-not-text"],
)
def test_a_malformed_history_through_the_api(client, history, message):
    _, error = chat(client, "Hello.", history)
    assert error is not None and re.search(message, str(error)), error


@pytest.mark.parametrize(
    "image",
    ["/etc/passwd", {"path": "/etc/passwd"}, {"path": "/tmp/gradio/../../etc/passwd"}, {"path": "/dev/zero"}],
    ids=["plain-string", "path-outside-the-uploads", "path-climbing-out-of-the-uploads", "a-device"],
)
def test_a_server_path_is_never_opened(client, image):
    _, error = attempt(client.predict, image, "What is it?", [], **QUICK, api_name="/describe_image")
    assert error is not None, "the server read a path it was given"
    assert re.search(r"Upload the image with the request|Send the image as a file", str(error)), error


def test_no_file_outside_the_uploads_and_examples_is_served(served):
    for path in ("/etc/passwd", str(Path(app.__file__).resolve()), "app.py"):
        assert httpx.get(f"{served.url}gradio_api/file={path}").status_code == 403, path


def test_the_examples_folder_is_still_readable(client, served):
    example = next(p for p in sorted(served.examples.iterdir()) if p.suffix == ".png")
    result, error = attempt(
        client.predict, {"path": str(example)}, "What is it?", [], **QUICK, api_name="/describe_image"
    )
    assert error is None and isinstance(result["answer"], str)


def test_the_app_still_answers_after_the_corpus(client, served):
    answer = client.predict("Say hi.", [], max_new_tokens=4, temperature=0.0, api_name="/chat")
    assert answer == served.pipe.generate("Say hi.", max_new_tokens=4) and served.pipe.running == 0


# -- the trainer -----------------------------------------------------------------------------------------


def train_config(out: Path, sources: list[dict], *, images: bool = True, **sections: dict) -> dict:
    """Captions into a tiny visual adapter, or instructions into a text-only one."""
    visual = {"image_encoder": "efficientnet-lite0", "visual_dim": 32, "visual_depth": 1, "visual_heads": 2}
    config = {
        "stage": "pretrain" if images else "finetune",
        "output_dir": str(out),
        "model": {
            "base": "tiny",
            "pretrained_encoder": False,
            "adapter": visual if images else {"image_encoder": None},
        },
        "data": {"sources": sources, "batch_size": 4, "max_len": 256},
        "optim": {"epochs": 1, "warmup_epochs": 0},
        "checkpoint": {"every_epochs": None},
        "log": {"report_to": ["none"]},
    }
    for name, values in sections.items():
        config[name] = {**config[name], **values}
    return config


def test_the_trainer_skips_and_counts_every_bad_image(tmp_path):
    rows = [{"image": str(c.value.write(tmp_path)), "caption": f"Picture {c.name}."} for c in IMAGES]
    rows.append({"image": str(tmp_path / "gone.png"), "caption": "Lost."})
    run(train_config(tmp_path / "out", [{"samples": rows, "name": "corpus"}]))
    counts = json.loads((tmp_path / "out" / "data_report.json").read_text())["counts"]
    assert counts["image_unreadable"] == sum(c.refused is not None for c in IMAGES)
    assert counts["image_missing"] == 1 and sum(counts[k] for k in SKIP_REASONS) == counts["image_unreadable"] + 1


def _instructions(tmp_path: Path) -> list[dict]:
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": str(i)} for i in range(4)]))
    return [{"path": str(data)}]


def _broken_json(tmp_path: Path) -> tuple[dict, list[str]]:
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "Hi", "output": "Hello"},')
    return train_config(tmp_path / "out", [{"path": str(data)}], images=False), []


def _damaged_checkpoint(tmp_path: Path) -> tuple[dict, list[str]]:
    config = train_config(tmp_path / "out", _instructions(tmp_path), images=False, optim={"max_steps": 1})
    run(config)
    [checkpoint] = (tmp_path / "out" / "checkpoints").iterdir()
    optimiser = checkpoint / "optimizer.safetensors"
    optimiser.write_bytes(optimiser.read_bytes()[: optimiser.stat().st_size // 2])
    return config, ["--resume"]


def _init_adapter(tmp_path: Path, checkpoints: dict[str, Case], case: str, base: str) -> tuple[dict, list[str]]:
    model = {"init_adapter": str(checkpoints[case].value["adapter"]), "base": base}
    return train_config(tmp_path / "out", _instructions(tmp_path), images=False, model=model), []


TRAINING_CASES: dict[str, tuple[Callable[[Path, dict[str, Case]], tuple[dict | None, list[str]]], str]] = {
    "missing-data-file": (
        lambda tmp, _: (train_config(tmp / "out", [{"path": str(tmp / "nowhere.json")}]), []),
        r"Data file not found",
    ),
    "data-not-json": (lambda tmp, _: _broken_json(tmp), r"data\.json is not valid JSON"),
    "unknown-config-key": (
        lambda tmp, _: (train_config(tmp / "out", _instructions(tmp), optim={"learning_rate": 1.0}), []),
        r"Unknown config key\(s\) optim\.learning_rate",
    ),
    "broken-yaml": (lambda tmp, _: (None, []), r"while parsing"),
    "resume-from-a-folder-that-is-not-a-checkpoint": (
        lambda tmp, _: (train_config(tmp / "out", _instructions(tmp), images=False), ["--resume", str(tmp)]),
        r"is not a checkpoint folder",
    ),
    "resume-from-a-damaged-checkpoint": (lambda tmp, _: _damaged_checkpoint(tmp), r"Cannot read checkpoint"),
    "init-adapter-that-runs-code": (
        lambda tmp, cases: _init_adapter(tmp, cases, "pickle-that-runs-code", "tiny"),
        r"exploit\.pth.*could run code",
    ),
    "init-adapter-for-another-base": (
        lambda tmp, cases: _init_adapter(tmp, cases, "adapter-for-another-base", "tiny-tied"),
        r"does not fit the model",
    ),
}


@pytest.mark.parametrize("name", TRAINING_CASES)
def test_the_training_command_line_refuses_in_one_line(name, tmp_path, capsys, checkpoints):
    cases, marker = checkpoints
    make, message = TRAINING_CASES[name]
    config, args = make(tmp_path, cases)
    path = tmp_path / "config.yaml"
    path.write_text("model: [1,\n" if config is None else yaml.safe_dump(config))
    capsys.readouterr()  # the set-up's own output
    with pytest.raises(SystemExit) as stopped:
        train_main([(config or {}).get("stage", "finetune"), "--config", str(path), *args])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert re.search(message, err), err
    assert not marker.exists(), "a pickle ran code"
