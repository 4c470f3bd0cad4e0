"""Decode speed and time to first token of the path ``python app.py`` takes, against transformers
and (when ``llama_cpp`` is importable) llama.cpp, measured in one run, interleaved.

SmolLM2-135M-Instruct, a fixed chat prompt, exactly ``--new-tokens`` greedy new tokens (end
tokens ignored), best of ``--repeats`` rounds. Ours answers through the :class:`Engine` as the app
does: with the app's 8 slots (a lone user's steps compute the smallest batch-invariant row count,
printed) and with one slot; eager, and with ``--compile`` also with the decode step compiled
(minutes each, cold). ``int8`` is what ``load()`` and ``python app.py`` choose on CPU by default.
Decode speed counts the tokens after the first over the time after the first (prefill apart);
each row also shows the weight bytes read per token over the time, against this machine's read
bandwidth (a 2-thread sum over 1 GiB). llama.cpp runs the shipped GGUF requantised to f32 and
q8_0 (the same weights as ours) and the shipped q4_1 itself (``--dtypes fp32,int8,int4`` to set
our int4 beside it), through llama-cpp-python built from source (README, "Generation
speed"). Then time to first token of a ~40-token chat turn and of an image question with the
demo model (encoder + prefill), against transformers' prefill of the same tokens (plus our
encoder, for the image). Also the perplexity change of int8 (int4) weights on a fixed text, the time
our eager weight matmuls alone take per token, and the decode speed before and after a traced
answer (``llama_adapter.explain``: tracing off costs nothing).

    python -m benchmarks.generate [--threads 2] [--repeats 3] [--new-tokens 128] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import logging
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "100000")  # before torch, as app.py sets it

import torch

import llama_adapter
from llama_adapter.build import ASSETS
from llama_adapter.engine import Engine, EngineConfig
from llama_adapter.generate import Sampling
from llama_adapter.images import open_image
from llama_adapter.model import AdapterLinear
from llama_adapter.weights import _fetch_smollm2_gguf, smollm2_dir

PROMPT = "Explain in a few sentences why leaves change colour in autumn."
CHAT_TURN = (
    "I am planning a weekend trip to the mountains with two friends. We like walking and taking photos. "
    "What should we pack?"
)
IMAGE_QUESTION = "What is in this picture? Describe it."
TEXT = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven "
    "million square kilometres, of which five and a half million are covered by the rainforest. The region "
    "includes territory belonging to nine nations and thousands of indigenous territories. The majority of "
    "the forest is contained within Brazil, followed by Peru and Colombia. The rainforest likely formed during "
    "the Eocene era, following the extinction event that wiped out the dinosaurs. Scientists estimate that "
    "the forest holds about four hundred billion individual trees divided into sixteen thousand species."
)


def read_bandwidth_gbs(repeats: int = 5) -> float:
    """GB/s of a sum over 1 GiB of float32 with the torch threads set: what reading memory costs here."""
    x = torch.ones(1 << 28)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def weight_bytes_per_token(model: torch.nn.Module, *, tied: bool) -> int:
    """Bytes of the language model's weights one decode step reads: every tensor once, except the
    embedding table, of which a step reads one row (unless the output head is the same table)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(("image_encoder", "visual")) or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        if name.startswith("tok_embeddings") and not tied:
            continue
        total += t.nbytes
    return total


class Timing:
    """Seconds to the first token and decode tokens/s (tokens after the first over the time after it)."""

    def __init__(self, started: float, first: float, finished: float, tokens: int) -> None:
        self.ttft = first - started
        self.decode_rate = (tokens - 1) / max(finished - first, 1e-9)


def endless_engine(pipe: llama_adapter.Pipeline, max_batch: int) -> Engine:
    """An engine like the app's, whose answers run to ``max_new_tokens`` (end tokens ignored)."""
    tokenizer = copy.copy(pipe.tokenizer)
    tokenizer.stop_ids = set()
    return Engine(pipe.model, tokenizer, EngineConfig(max_batch=max_batch))


def ours(
    engine: Engine, ids: list[int], new_tokens: int, visual: torch.Tensor | None = None, opening: int = 0
) -> Timing:
    started = time.perf_counter()
    request = engine.submit(ids, Sampling(max_new_tokens=new_tokens), visual_prompt=visual, prefix=opening)
    first = None
    for _ in request:
        first = first or time.perf_counter()
    assert request.completion_tokens == new_tokens, request.completion_tokens
    return Timing(started, first, time.perf_counter(), new_tokens)


def transformers_run(model, ids: list[int], new_tokens: int) -> Timing:
    """Greedy decoding with transformers' own cache, timed per token like ours."""
    from transformers import DynamicCache

    x = torch.tensor([ids])
    with torch.inference_mode():
        started = time.perf_counter()
        cache = DynamicCache()
        out = model(x, past_key_values=cache, use_cache=True)
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
        return Timing(started, first, time.perf_counter(), new_tokens)


class LlamaCpp:
    """One GGUF through llama-cpp-python: greedy decoding, end tokens ignored, timed like ours."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp

        self.path = path
        self.llm = llama_cpp.Llama(
            str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False
        )

    def __call__(self, ids: list[int], new_tokens: int) -> Timing:
        llm = self.llm
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        return Timing(started, first, time.perf_counter(), new_tokens)


def llama_cpp_ggufs(directory: Path, threads: int) -> dict[str, Path]:
    """The shipped SmolLM2 GGUF (Q4_1) requantised by llama.cpp to f32 and q8_0 (our weights), and
    the shipped file itself as q4_1 (asymmetric 4-bit in groups of 32, as our int4)."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its quantizer prints every tensor
    paths = {}
    for name, ftype in (("f32", 0), ("q8_0", 7)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, threads
        out = directory / f"smollm2-{name}.gguf"
        if llama_cpp.llama_model_quantize(str(_fetch_smollm2_gguf()).encode(), str(out).encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama.cpp could not quantize to {name}")
        paths[name] = out
    paths["q4_1"] = _fetch_smollm2_gguf()
    return paths


def matmul_ms_per_token(pipe: llama_adapter.Pipeline, repeats: int = 20) -> float:
    """Milliseconds per token spent in the weight matmuls alone (every block linear and the output
    head on a one-token input, with the kernels this pipeline uses): decoding with no other cost."""
    model = pipe.model
    dtype = model.norm.weight.dtype
    linears = [m.base for m in model.modules() if isinstance(m, AdapterLinear)] + [model.output]
    inputs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in linears]
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(repeats):
            for linear, x in zip(linears, inputs):
                linear(x)
    return 1000 * (time.perf_counter() - start) / repeats


def perplexity(logits_fn, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = logits_fn(ids).float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(loss.item())


def decode_perplexity(model, ids: torch.Tensor) -> float:
    """Perplexity with every prediction but the first from a one-token cached step: the path that
    ``compile_decoding`` compiles."""
    with torch.inference_mode():
        cache = model.new_cache(1)
        logits = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(ids.shape[1] - 1)], 1).float()
    loss = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])
    return math.exp(loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also the compiled decode step (minutes, cold)")
    parser.add_argument("--dtypes", default="fp32,int8", help="ours: comma-separated fp32, bf16, int8, int4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth_gbs()

    from transformers import AutoModelForCausalLM

    settings = {
        "fp32": {"dtype": "fp32"},
        "bf16": {"dtype": "bf16"},
        "int8": {"quantize": "int8"},
        "int4": {"quantize": "int4"},
    }
    settings = {name: settings[name] for name in args.dtypes.split(",")}
    pipes = {name: llama_adapter.load("smollm2-135m", **kw) for name, kw in settings.items()}
    load_seconds = {}
    if args.compile:
        for name, kw in settings.items():
            started = time.perf_counter()
            pipes[f"{name} compiled"] = llama_adapter.load("smollm2-135m", compile=True, **kw)
            load_seconds[name] = time.perf_counter() - started
    first = next(iter(pipes.values()))  # every setting has the same config and tokenizer
    tied = first.model.config.tie_embeddings
    ids = first.encode(first.render(PROMPT))
    systems, read = {}, {}
    for name, pipe in pipes.items():
        for slots, label in ((8, "app path, 8 slots"), (1, "1 slot")):
            engine = endless_engine(pipe, slots)
            ours(engine, ids, 4)  # the engine's first step
            print(f"ours {name}, {label}: a step computes {' or '.join(map(str, engine.row_counts))} rows")
            systems[f"ours {name}, {label}"] = lambda engine=engine: ours(engine, ids, args.new_tokens)
            read[f"ours {name}, {label}"] = weight_bytes_per_token(pipe.model, tied=tied)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.float32).eval()
    systems["transformers fp32"] = lambda: transformers_run(hf, ids, args.new_tokens)
    read["transformers fp32"] = weight_bytes_per_token(hf.model, tied=False) + hf.lm_head.weight.nbytes
    gguf_dir = Path(tempfile.mkdtemp(prefix="llama-cpp-bench-"))
    try:
        import llama_cpp  # noqa: F401

        for name, path in llama_cpp_ggufs(gguf_dir, args.threads).items():
            runner = LlamaCpp(path, args.threads)
            systems[f"llama.cpp {name}"] = lambda runner=runner: runner(ids, args.new_tokens)
            read[f"llama.cpp {name}"] = path.stat().st_size
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows (README, Generation speed, says how)")

    best: dict[str, Timing] = {}
    for _ in range(args.repeats):
        for key, run in systems.items():
            timing = run()
            if key not in best or timing.decode_rate > best[key].decode_rate:
                best[key] = timing
    matmul_ms = {f"ours {name}": matmul_ms_per_token(pipe) for name, pipe in pipes.items() if not pipe.info["compiled"]}

    print(
        f"SmolLM2-135M, {len(ids)}-token prompt, {args.new_tokens} greedy tokens, {args.threads} threads, "
        f"best of {args.repeats}, interleaved; memory read {bandwidth:.1f} GB/s"
    )
    ref = best["transformers fp32"].decode_rate
    cpp = {bits: best.get(f"llama.cpp {bits}") for bits in ("f32", "q8_0", "q4_1")}
    peers = {"int8": "q8_0", "int4": "q4_1"}
    print(f"{'system':<34} {'tok/s':>7} {'vs HF fp32':>11} {'vs llama.cpp':>13} {'GB/s read':>10} {'of memory':>10}")
    for key, timing in best.items():
        rate = timing.decode_rate
        peer = cpp[next((bits for name, bits in peers.items() if name in key), "f32")]
        vs_cpp = f"{rate / peer.decode_rate:.2f}x" if peer is not None and not key.startswith("llama.cpp") else "-"
        gbs = read[key] * rate / 1e9
        print(f"{key:<34} {rate:7.1f} {rate / ref:10.2f}x {vs_cpp:>13} {gbs:10.1f} {gbs / bandwidth:9.0%}")
    print("vs llama.cpp: int8 rows against q8_0, int4 rows against q4_1, the others against f32")
    for key, ms in matmul_ms.items():
        print(f"{key}: weight matmuls alone {ms:.1f} ms/token, {1000 / ms:.0f} tok/s at most with these kernels")
    if load_seconds:
        print("load + compile seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in load_seconds.items()))

    time_to_first_token(hf, args.repeats)
    tracing_cost(args.new_tokens, args.repeats)

    text_ids = torch.tensor([first.tokenizer.encode(TEXT, bos=False)])
    ppl = {
        name: (decode_perplexity if pipe.info["compiled"] else perplexity)(pipe.model, text_ids)
        for name, pipe in pipes.items()
    }
    ppl["transformers fp32"] = perplexity(lambda x: hf(x).logits, text_ids)
    print(f"perplexity on a fixed {text_ids.shape[1]}-token text: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    for name in ppl:
        if name.startswith("int") and "fp32" in ppl:
            print(f"{name} perplexity change vs fp32: {100 * (ppl[name] / ppl['fp32'] - 1):+.2f}%")


def time_to_first_token(hf_model, repeats: int) -> None:
    """The demo model (what ``python app.py`` loads) through the app's 8-slot engine: a chat turn,
    and an image question (the encoder's time included), against transformers' prefill of the
    same tokens (plus our encoder alone, for the image). Ours as the app asks: the prompt's
    shared opening is kept from the question before (``Pipeline.shared_opening``)."""
    demo = llama_adapter.load()
    engine = endless_engine(demo, 8)
    picture = open_image(ASSETS / "examples" / "circle.png")
    turn = demo.encode(demo.render(CHAT_TURN))
    question = demo.encode(demo.render(IMAGE_QUESTION))
    turn_opening, question_opening = demo.shared_opening(CHAT_TURN, turn), demo.shared_opening(IMAGE_QUESTION, question)
    ours(engine, turn, 2, opening=turn_opening)

    def encoder_alone() -> float:
        started = time.perf_counter()
        demo.visual_prompt(picture)
        return time.perf_counter() - started

    def image_ttft() -> float:
        started = time.perf_counter()
        visual = demo.visual_prompt(picture)
        encoded = time.perf_counter()
        return (encoded - started) + ours(engine, question, 2, visual, question_opening).ttft

    rows = {
        f"chat turn, {len(turn)} tokens": (
            lambda: ours(engine, turn, 2, opening=turn_opening).ttft,
            lambda: transformers_run(hf_model, turn, 1).ttft,
        ),
        f"image question, {len(question)} tokens": (
            image_ttft,
            lambda: encoder_alone() + transformers_run(hf_model, question, 1).ttft,
        ),
    }
    print("time to first token (the demo model, the app's engine), best of", repeats)
    for label, (ours_ttft, reference) in rows.items():
        a = min(ours_ttft() for _ in range(repeats))
        b = min(reference() for _ in range(repeats))
        print(
            f"  {label}: ours {1000 * a:.0f} ms, transformers prefill (+ our encoder) {1000 * b:.0f} ms, {a / b:.2f}x"
        )


def tracing_cost(new_tokens: int, repeats: int) -> None:
    """The demo model answering an image question through a one-slot engine, before and after a
    traced answer (``llama_adapter.explain``, eager, recording every layer): tracing is paid only
    by the answer that asks for it, and leaves the normal decode as fast as it was."""
    demo = llama_adapter.load()
    engine = endless_engine(demo, 1)
    picture = open_image(ASSETS / "examples" / "circle.png")
    question = demo.encode(demo.render(IMAGE_QUESTION))
    visual = demo.visual_prompt(picture)
    ours(engine, question, 4, visual)

    def normal() -> float:
        return max(ours(engine, question, new_tokens, visual).decode_rate for _ in range(repeats))

    before = normal()
    started = time.perf_counter()
    trace = llama_adapter.explain(demo, IMAGE_QUESTION, picture, max_new_tokens=new_tokens, temperature=0)
    traced = len(trace.token_ids) / (time.perf_counter() - started)
    after = normal()
    print(
        f"tracing (the demo model, image question, 1 slot): decode {before:.1f} tok/s before a traced answer, "
        f"{after:.1f} after it ({after / before:.2f}x); the traced answer itself {traced:.1f} tok/s "
        "(prefill and recording included)"
    )


if __name__ == "__main__":
    main()
