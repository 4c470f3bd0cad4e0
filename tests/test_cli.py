"""Every command that loads a model takes the same model flags, each with its environment
variable, through llama_adapter.cli: python app.py, python -m llama_adapter.chat, … .serve,
python -m experts.compare and the batching benchmark."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import app
import llama_adapter.cli
from benchmarks import batching
from llama_adapter import chat, serve

compare = importlib.import_module("experts.compare")  # the package exports a compare() that hides the module
ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT = {
    "LLAMA_ADAPTER_BASE": "/models/llama-2-7b",
    "LLAMA_ADAPTER_ADAPTER": "mine.safetensors",
    "LLAMA_ADAPTER_DEVICE": "cuda:1",
    "LLAMA_ADAPTER_DTYPE": "bf16",
    "LLAMA_ADAPTER_QUANTIZE": "int8",
    "LLAMA_ADAPTER_COMPILE": "1",
    "LLAMA_ADAPTER_FORCE": "1",
}
FROM_ENVIRONMENT = {
    "base": "/models/llama-2-7b",
    "adapter": "mine.safetensors",
    "device": "cuda:1",
    "dtype": "bf16",
    "quantize": "int8",
    "compile": True,
    "force": True,
}
PARSERS = {
    "app": lambda argv: app.parse_args(argv),
    "chat": lambda argv: chat.build_parser().parse_args(argv),
    "serve": lambda argv: serve.build_parser().parse_args(argv),
    "compare": lambda argv: compare.build_parser().parse_args(["photo.png", "What is it?", *argv]),
}
SERVERS = ("app", "serve")
MAINS = {
    "app": app.main,
    "chat": lambda argv: chat.main(["--prompt", "Hi", *argv]),
    "serve": serve.main,
    "compare": lambda argv: compare.main([str(ROOT / "assets" / "examples" / "circle.png"), "What?", *argv]),
    "batching": batching.main,
}


@pytest.fixture
def clean_environment(monkeypatch):
    for name in (*ENVIRONMENT, "LLAMA_ADAPTER_TEMPLATE", "GRADIO_SHARE", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("command", PARSERS)
def test_model_flags_default_to_the_environment_and_the_command_line_wins(command, clean_environment):
    parse = PARSERS[command]
    args = vars(parse([]))
    assert {k: args[k] for k in FROM_ENVIRONMENT} == {
        "base": None,
        "adapter": None,
        "device": "cpu",
        "dtype": None,
        "quantize": "auto",
        "compile": command in SERVERS,  # a server compiles in the background by default
        "force": False,
    }
    assert parse(["--no-compile"]).compile is False and parse(["--compile"]).compile is True
    for name, value in ENVIRONMENT.items():
        clean_environment.setenv(name, value)
    args = vars(parse([]))
    assert {k: args[k] for k in FROM_ENVIRONMENT} == FROM_ENVIRONMENT
    args = vars(parse(["--base", "smollm2-135m", "--device", "cpu", "--dtype", "fp16"]))
    chosen = (args["base"], args["device"], args["dtype"], args["adapter"])
    assert chosen == ("smollm2-135m", "cpu", "fp16", "mine.safetensors")


@pytest.mark.parametrize("command", MAINS)
@pytest.mark.parametrize(("variable", "wrong"), [("LLAMA_ADAPTER_DTYPE", "fp8"), ("LLAMA_ADAPTER_QUANTIZE", "int3")])
def test_a_misspelt_environment_value_stops_every_command_before_loading(
    command, variable, wrong, clean_environment, capsys
):
    clean_environment.setenv(variable, wrong)
    clean_environment.setattr(llama_adapter.cli, "load", lambda *a, **k: pytest.fail("loaded with a wrong setting"))
    with pytest.raises(SystemExit) as stopped:
        MAINS[command]([])
    assert stopped.value.code == 2
    assert re.search(rf"{variable} must be one of .*got '{wrong}'", capsys.readouterr().err)


def test_the_flags_reach_load_unchanged(clean_environment):
    calls = []
    clean_environment.setattr(llama_adapter.cli, "load", lambda *a, **k: calls.append((a, k)))
    argv = ["--base", "b", "--adapter", "a", "--template", "alpaca", "--compile", "--force"]
    llama_adapter.cli.load_from_arguments(chat.build_parser().parse_args(argv), limits="L")
    expected = {"device": "cpu", "dtype": None, "quantize": "auto", "compile": True, "template": "alpaca"}
    expected |= {"force": True, "limits": "L"}
    assert calls == [(("b", "a"), expected)]


def test_server_flags_have_their_variables_too(clean_environment):
    clean_environment.setenv("GRADIO_SHARE", "true")
    clean_environment.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    clean_environment.setenv("LLAMA_ADAPTER_PORT", "9100")
    assert app.parse_args([]).share and app.parse_args([]).host == "0.0.0.0"
    assert (serve.build_parser().parse_args([]).port, serve.build_parser().parse_args([]).host) == (9100, "127.0.0.1")


def test_no_command_defines_the_model_flags_itself():
    """The model flags are declared once (llama_adapter/cli.py); train's --base is the base to
    train on, another flag of the same name."""
    sources = [*ROOT.glob("*.py"), *ROOT.glob("llama_adapter/*.py"), *ROOT.glob("experts/*.py")]
    sources += ROOT.glob("benchmarks/*.py")
    flag = re.compile(r"""["']--(base|dtype)["']""")
    declaring = [p.relative_to(ROOT).as_posix() for p in sources if flag.search(p.read_text())]
    assert declaring == ["llama_adapter/cli.py"]
