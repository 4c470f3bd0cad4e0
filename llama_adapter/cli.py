"""The flags every command that loads a model shares (``app.py``, ``python -m llama_adapter.chat``,
``… .serve``, ``experts.compare``, the benchmarks), and the one call that turns them into a model.

Each flag reads its default from an environment variable, so that a Hugging Face Space or a
container is configured without a command line: ``LLAMA_ADAPTER_BASE``, ``LLAMA_ADAPTER_ADAPTER``,
``LLAMA_ADAPTER_DEVICE``, ``LLAMA_ADAPTER_DTYPE``, ``LLAMA_ADAPTER_QUANTIZE``,
``LLAMA_ADAPTER_COMPILE``, ``LLAMA_ADAPTER_FORCE``, ``LLAMA_ADAPTER_TEMPLATE``; servers add
``--host``/``--port`` (``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` for the app,
``LLAMA_ADAPTER_HOST``/``_PORT`` for the API alone), ``--share`` (``GRADIO_SHARE``) and the
image-source flags.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .build import AUTO, can_compile, load
from .engine import EngineConfig
from .pipeline import Pipeline

DTYPES = ("fp32", "bf16", "fp16")
QUANTIZE = (AUTO, "int8", "int4", "none")
TEMPLATES = ("alpaca", "chat")
TRUE = ("1", "true", "yes", "on")


def env_value(name: str, default: str | None = None) -> str | None:
    """The environment variable ``name``; unset and empty both give ``default``."""
    return os.environ.get(name) or default


def env_switch(name: str, default: bool = False) -> bool:
    """The environment variable ``name`` as a yes/no (``1``, ``true``, ``yes``, ``on``); unset: ``default``."""
    value = env_value(name)
    return default if value is None else value.lower() in TRUE


def add_model_arguments(parser: argparse.ArgumentParser, *, template: bool = True, server: bool = False) -> None:
    """``--base --adapter --device --dtype --quantize --[no-]compile --force`` (and ``--template``).
    ``server``: compiling is on by default (a server compiles in the background, answering meanwhile)."""
    group = parser.add_argument_group("model", "with no --base and no --adapter: the shipped demo model, offline")
    group.add_argument(
        "--base",
        default=env_value("LLAMA_ADAPTER_BASE"),
        help="smollm2-135m, a folder (HF or Meta layout), a .gguf, or a hub id org/name (env LLAMA_ADAPTER_BASE)",
    )
    group.add_argument(
        "--adapter",
        default=env_value("LLAMA_ADAPTER_ADAPTER"),
        help="an adapter file or an official name: BIAS-7B, LORA-BIAS-7B, CAPTION-7B, … (env LLAMA_ADAPTER_ADAPTER)",
    )
    group.add_argument(
        "--device",
        default=env_value("LLAMA_ADAPTER_DEVICE", "cpu"),
        help="cpu, cuda, cuda:1, … (env LLAMA_ADAPTER_DEVICE)",
    )
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        default=env_value("LLAMA_ADAPTER_DTYPE"),
        help="the base's dtype; default: fp32 with int8 weights on CPU, bf16 on GPU (env LLAMA_ADAPTER_DTYPE)",
    )
    group.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default=env_value("LLAMA_ADAPTER_QUANTIZE", AUTO),
        help="int8: the base's weights in 8 bits; int4: in 4 bits (CPU; faster, less exact); none: as --dtype "
        "says; auto (default): int8 on CPU unless "
        "--dtype is given, none on a GPU (env LLAMA_ADAPTER_QUANTIZE)",
    )
    compiling = (
        "default: on; the server answers at once and switches to the compiled step when it is ready"
        if server
        else "default: off"
    )
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=env_switch("LLAMA_ADAPTER_COMPILE", server),
        help="compile the decode step: faster answers after 1-3 min of compiling the first time, seconds once "
        f"inductor has cached it; {compiling} (env LLAMA_ADAPTER_COMPILE=1 or 0)",
    )
    group.add_argument(
        "--force",
        action="store_true",
        default=env_switch("LLAMA_ADAPTER_FORCE"),
        help="load an official adapter on a base unlike the LLaMA-1 7B it was trained on, with a warning "
        "(env LLAMA_ADAPTER_FORCE=1)",
    )
    if template:
        group.add_argument(
            "--template",
            choices=TEMPLATES,
            default=env_value("LLAMA_ADAPTER_TEMPLATE"),
            help="prompt format (default: the model's own; env LLAMA_ADAPTER_TEMPLATE)",
        )


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1 (``_`` separators allowed)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_positive_int_flags(group: argparse._ActionsContainer, *flags: tuple[str, int, str]) -> None:
    """``--flag`` positive integers (name, default, help), each also set by ``LLAMA_ADAPTER_FLAG``."""
    for flag, default, text in flags:
        variable = "LLAMA_ADAPTER_" + flag.upper().replace("-", "_")
        # argparse converts (and checks) a string default with ``type`` as if it came from the command line.
        group.add_argument(
            f"--{flag}",
            type=positive_int,
            default=env_value(variable, str(default)),
            help=f"{text}; default {default:,} (env {variable})",
        )


def add_server_arguments(
    parser: argparse.ArgumentParser, *, port: int, host_env: str, port_env: str, share: bool = False
) -> None:
    """``--host --port`` (and Gradio's ``--share``), the engine's ``--max-batch --queue-size``, and
    what a request may name as its image."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=env_value(host_env, "127.0.0.1"), help=f"default 127.0.0.1 (env {host_env})")
    group.add_argument(
        "--port", type=int, default=int(env_value(port_env, str(port))), help=f"default {port} (env {port_env})"
    )
    if share:
        group.add_argument(
            "--share",
            action="store_true",
            default=env_switch("GRADIO_SHARE"),
            help="also serve on a public gradio.live link (env GRADIO_SHARE=1)",
        )
    add_positive_int_flags(
        group,
        ("max-batch", EngineConfig.max_batch, "answers written together (each decode step computes them all)"),
        ("queue-size", EngineConfig.max_waiting, "requests that may wait; more are turned away at once"),
    )
    group.add_argument(
        "--allow-local-dir",
        action="append",
        type=Path,
        default=[Path(d) for d in (env_value("LLAMA_ADAPTER_ALLOW_LOCAL_DIRS") or "").split(os.pathsep) if d],
        help="a server folder whose images requests may name by path instead of uploading them; repeatable "
        f"(env LLAMA_ADAPTER_ALLOW_LOCAL_DIRS, separated by {os.pathsep!r}). Default: none, uploads only",
    )
    group.add_argument(
        "--allow-remote-images",
        action="store_true",
        default=env_switch("LLAMA_ADAPTER_ALLOW_REMOTE_IMAGES"),
        help="fetch http(s) image URLs that requests name (env LLAMA_ADAPTER_ALLOW_REMOTE_IMAGES=1). Default: refused",
    )


def check_environment_choices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse checks ``choices`` on the command line only, not on defaults read from the
    environment: a misspelt ``LLAMA_ADAPTER_DTYPE`` would otherwise pass silently."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            variable = f"LLAMA_ADAPTER_{action.dest.upper()}"
            parser.error(f"{variable} must be one of {', '.join(map(str, action.choices))}, got {value!r}")


def load_from_arguments(args: argparse.Namespace, **kwargs) -> Pipeline:
    """:func:`llama_adapter.load` with the model flags (``kwargs`` add or override, e.g. limits)."""
    options = {
        "device": args.device,
        "dtype": args.dtype,
        "quantize": None if args.quantize == "none" else args.quantize,
        "compile": args.compile,
        "template": getattr(args, "template", None),
        "force": args.force,
    }
    return load(args.base, args.adapter, **{**options, **kwargs})


def load_for_serving(args: argparse.Namespace, **kwargs) -> Pipeline:
    """A server's model: loaded, its engine started with ``--max-batch`` and ``--queue-size``, and
    with ``--compile`` its decode step compiled in the background while it answers eager, so
    that the first visitor never waits for the compiler."""
    pipe = load_from_arguments(args, **kwargs, compile=False)
    engine = pipe.start_engine(EngineConfig(max_batch=args.max_batch, max_waiting=args.queue_size))
    if args.compile and can_compile(pipe.device):
        engine.compile_in_background()
    return pipe
