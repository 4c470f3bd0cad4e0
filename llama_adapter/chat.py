"""Chat from the terminal, streaming: ``python -m llama_adapter.chat [--image I] [--prompt P]``.

Without ``--prompt`` it is interactive: type a message; ``/image PATH`` brings an image to the next
question (the conversation goes on, about it from then on), ``/undo`` drops the last turn,
``/reset`` starts over, ``/exit`` (or Ctrl-D) quits.
``--prompt P --explain DIR`` also writes what the answer drew on (``trace.json`` and PNGs, see
:mod:`llama_adapter.explain`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .cli import add_model_arguments, check_environment_choices, load_from_arguments
from .errors import LlamaAdapterError
from .explain import explain
from .pipeline import ChatSession, Pipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_adapter.chat",
        description="Talk to a LLaMA-Adapter V2 model, optionally about an image. With no --base and no "
        "--adapter, the shipped demo model is used (offline).",
    )
    add_model_arguments(p)
    p.add_argument("--image", help="an image to talk about")
    p.add_argument("--prompt", help="ask this once and exit (otherwise: interactive)")
    p.add_argument("--system", help="system prompt")
    p.add_argument(
        "--explain",
        metavar="DIR",
        type=Path,
        help="with --prompt: write what the answer drew on into DIR (trace.json; PNGs of where it looked, "
        "the gates, each token's use of the adapter prompts)",
    )
    gen = p.add_argument_group("sampling")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    p.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    return p


def stream_answer(session: ChatSession, text: str, sampling: dict[str, Any]) -> None:
    for piece in session.stream(text, **sampling):
        print(piece, end="", flush=True)
    print()


def interactive(pipe: Pipeline, session: ChatSession, sampling: dict[str, Any]) -> None:
    print(f"Loaded {pipe.info['base']} + {pipe.info['adapter'] or 'no adapter'}. /help for commands.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        try:
            if line == "/help":
                print("/image PATH  the next question is about this image\n/undo  drop the last turn")
                print("/reset  start over\n/exit")
            elif line.startswith("/image"):
                session.set_image(line.removeprefix("/image").strip() or None)
                print("The next question brings this image.")
            elif line == "/undo":
                dropped = session.undo()
                if dropped is not None and dropped.get("image") is not None:
                    session.set_image(dropped["image"])  # the image it brought stays for the next question
            elif line == "/reset":
                session.reset()
            else:
                stream_answer(session, line, sampling)
        except LlamaAdapterError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)")


def explain_answer(pipe: Pipeline, args: argparse.Namespace, sampling: dict[str, Any]) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    trace = explain(pipe, [*messages, {"role": "user", "content": args.prompt}], args.image, **sampling)
    print(trace.answer)
    written = trace.save(args.explain)
    print(f"Wrote {', '.join(p.name for p in written)} to {args.explain}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_environment_choices(parser, args)
    if args.explain is not None and args.prompt is None:
        parser.error("--explain needs --prompt (it explains one answer)")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    try:
        pipe = load_from_arguments(args)
        if args.explain is not None:
            explain_answer(pipe, args, sampling)
            return 0
        session = pipe.chat(system=args.system, image=args.image)
        if args.prompt is not None:
            stream_answer(session, args.prompt, sampling)
        else:
            interactive(pipe, session, sampling)
    except LlamaAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
