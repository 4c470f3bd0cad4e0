"""Batched against one-at-a-time decoding, measured in one run: ``--requests`` concurrent greedy
requests of exactly ``--new-tokens`` tokens each, through an engine with one slot (today's
one-answer-at-a-time server) and through an engine with ``--requests`` slots, interleaved over
``--rounds`` rounds. Reports the total throughput of each (tokens/s over all requests), the
ratio, and whether every batched answer is identical to the same request's answer alone.

    python -m benchmarks.batching                     # the demo model (what `python app.py` loads)
    python -m benchmarks.batching --base smollm2-135m --quantize int8 --threads 2

Both engines decode the same model in the same process, one after the other; end tokens are
ignored so that every request writes exactly ``--new-tokens`` tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000")  # before torch, as app.py sets it

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from llama_adapter.cli import add_model_arguments, check_environment_choices, load_from_arguments  # noqa: E402
from llama_adapter.engine import Engine, EngineConfig  # noqa: E402
from llama_adapter.generate import Sampling  # noqa: E402

log = logging.getLogger("benchmarks.batching")

PROMPTS = [
    "Explain in a few sentences why leaves change colour in autumn.",
    "Write a short story about a lighthouse keeper.",
    "Give me five tips for learning a new language.",
    "Describe how a bicycle works.",
    "What are the main causes of the seasons on Earth?",
    "Write a poem about the sea at night.",
    "Explain what a neural network is to a child.",
    "List the planets of the solar system and one fact about each.",
    "Why is the sky blue?",
    "Describe a busy market in the morning.",
    "How do bees make honey?",
    "Write a letter to a friend about a trip to the mountains.",
    "What is the water cycle?",
    "Explain how to bake bread.",
    "Describe the life of a tree over a year.",
    "What makes a good teacher?",
]


def run(engine: Engine, rows: list[list[int]], params: Sampling) -> tuple[float, list[list[int]]]:
    """Submit every row at once; seconds until the last answer is done, and the answers' tokens."""
    started = time.perf_counter()
    requests = [engine.submit(ids, params) for ids in rows]
    for r in requests:
        for _ in r:
            pass
    seconds = time.perf_counter() - started
    assert all(r.completion_tokens == params.max_new_tokens for r in requests)
    return seconds, [r.generated for r in requests]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=__doc__.split("\n\n")[0])
    add_model_arguments(p, template=False)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    check_environment_choices(p, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    if args.requests > len(PROMPTS):
        p.error(f"at most {len(PROMPTS)} requests")

    pipe = load_from_arguments(args)
    endless = copy.copy(pipe.tokenizer)
    endless.stop_ids = set()  # every answer runs to --new-tokens
    rows = [pipe.encode(pipe.render(prompt)) for prompt in PROMPTS[: args.requests]]
    params = Sampling(max_new_tokens=args.new_tokens)
    one = Engine(pipe.model, endless, EngineConfig(max_batch=1, max_waiting=args.requests))
    batched = Engine(pipe.model, endless, EngineConfig(max_batch=args.requests))
    try:
        solo, alone_seconds = [], []
        for ids in rows:  # each request alone on the batched server: the answer it must keep in a batch
            seconds, answer = run(batched, [ids], params)
            solo += answer
            alone_seconds.append(seconds)
        one_alone = run(one, rows[:1], params)[0]
        times: dict[str, list[float]] = {"one at a time": [], "batched": []}
        answers: dict[str, list[list[int]]] = {}
        for round_ in range(args.rounds):
            for name, engine in (("one at a time", one), ("batched", batched)):
                seconds, answers[name] = run(engine, rows, params)
                times[name].append(seconds)
                log.info("round %d, %s: %.1f s", round_ + 1, name, seconds)
    finally:
        one.close()
        batched.close()

    total = args.requests * args.new_tokens
    best = {name: min(t) for name, t in times.items()}
    throughput = {name: total / s for name, s in best.items()}
    ratio = throughput["batched"] / throughput["one at a time"]
    identical = answers["batched"] == solo
    same_as_one_slot = sum(a == b for a, b in zip(answers["one at a time"], solo))
    single = {"one at a time": args.new_tokens / one_alone, "batched": args.new_tokens / alone_seconds[0]}
    info = pipe.info
    print(
        f"{info['base']} + {info['adapter']}, {info['dtype']}, quantize={info['quantize']}, "
        f"compiled={info['compiled']}, {args.threads} threads: {args.requests} concurrent requests × "
        f"{args.new_tokens} greedy tokens, best of {args.rounds} round(s)\n"
    )
    print(f"{'server':<15} {'all requests s':>14} {'tokens/s (all)':>15} {'one request alone tok/s':>24}")
    for name in times:
        print(f"{name:<15} {best[name]:>14.1f} {throughput[name]:>15.1f} {single[name]:>24.1f}")
    print(f"\nthroughput, batched / one at a time: {ratio:.2f}× (target ≥ 3×)")
    print(f"batched answers identical to each request's answer alone: {identical}")
    print(
        f"one-slot answers identical to them: {same_as_one_slot} of {args.requests} "
        "(another batch shape, so rounding may differ)"
    )
    if args.json:
        with open(args.json, "w") as f:
            numbers = {
                "times": times,
                "throughput": throughput,
                "ratio": ratio,
                "identical": identical,
                "alone": single,
            }
            json.dump(numbers, f, indent=1)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
