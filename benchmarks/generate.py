"""Decode speed of our generation against transformers ``generate``, measured in one run.

SmolLM2-135M-Instruct, batch 1, a fixed chat prompt, exactly 128 greedy new tokens (no early
stop), best of ``--repeats`` runs, interleaved so all see the same machine load. Ours runs
eager and with its decode step compiled (``load(compile=True)``; the compile time is printed).
Also the perplexity change of int8 weights on a fixed text, and the time our eager weight
matmuls alone take per token (the bound that no per-op overhead cut in eager mode can pass).

    python -m benchmarks.generate [--threads 2] [--repeats 3] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import llama_adapter
from llama_adapter.generate import Sampling, decode_tokens
from llama_adapter.model import AdapterLinear
from llama_adapter.weights import smollm2_dir

PROMPT = "Explain in a few sentences why leaves change colour in autumn."
TEXT = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven "
    "million square kilometres, of which five and a half million are covered by the rainforest. The region "
    "includes territory belonging to nine nations and thousands of indigenous territories. The majority of "
    "the forest is contained within Brazil, followed by Peru and Colombia. The rainforest likely formed during "
    "the Eocene era, following the extinction event that wiped out the dinosaurs. Scientists estimate that "
    "the forest holds about four hundred billion individual trees divided into sixteen thousand species."
)


def ours_tokens_per_second(pipe: llama_adapter.Pipeline, ids: list[int], new_tokens: int) -> float:
    params = Sampling(max_new_tokens=new_tokens)
    start = time.perf_counter()
    n = sum(1 for _ in decode_tokens(pipe.model, [ids], params, stop_ids=set()))
    assert n == new_tokens
    return n / (time.perf_counter() - start)


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


def hf_tokens_per_second(model, ids: list[int], new_tokens: int) -> float:
    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    n = out.shape[1] - x.shape[1]
    assert n == new_tokens
    return n / (time.perf_counter() - start)


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    settings = {"fp32": {}, "bf16": {"dtype": "bf16"}, "int8": {"quantize": "int8"}}
    ours = {name: llama_adapter.load("smollm2-135m", **kw) for name, kw in settings.items()}
    compile_seconds = {}
    for name, kw in settings.items():
        started = time.perf_counter()
        ours[f"{name} compiled"] = llama_adapter.load("smollm2-135m", compile=True, **kw)
        compile_seconds[name] = time.perf_counter() - started
    hf = {
        "fp32": AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.float32).eval(),
        "bf16": AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.bfloat16).eval(),
    }
    ids = ours["fp32"].encode(ours["fp32"].render(PROMPT))
    best: dict[str, float] = {}
    matmul_ms: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, pipe in ours.items():
            key = f"ours {name}"
            best[key] = max(best.get(key, 0), ours_tokens_per_second(pipe, ids, args.new_tokens))
            if not pipe.info["compiled"]:
                matmul_ms[key] = min(matmul_ms.get(key, math.inf), matmul_ms_per_token(pipe))
        for name, model in hf.items():
            key = f"transformers {name}"
            best[key] = max(best.get(key, 0), hf_tokens_per_second(model, ids, args.new_tokens))

    text_ids = torch.tensor([ours["fp32"].tokenizer.encode(TEXT, bos=False)])
    ppl = {
        name: (decode_perplexity if pipe.info["compiled"] else perplexity)(pipe.model, text_ids)
        for name, pipe in ours.items()
    }
    ppl["transformers fp32"] = perplexity(lambda x: hf["fp32"](x).logits, text_ids)

    ref = best["transformers fp32"]
    print(
        f"SmolLM2-135M, batch 1, {len(ids)}-token prompt, {args.new_tokens} greedy tokens, "
        f"{args.threads} threads, best of {args.repeats}"
    )
    print(f"{'system':<22} {'tok/s':>7} {'vs HF same dtype':>17} {'vs HF fp32':>11} {'matmuls ms/token':>17}")
    for key, value in best.items():
        same = best.get(f"transformers {key.split()[1]}")
        vs_same = f"{value / same:.2f}x" if same else "-"
        matmuls = f"{matmul_ms[key]:.1f} ({matmul_ms[key] * value / 10:.0f}%)" if key in matmul_ms else "-"
        print(f"{key:<22} {value:7.1f} {vs_same:>17} {value / ref:10.2f}x {matmuls:>17}")
    print(
        "matmuls ms/token: the weight matmuls alone, and their share of our decode time; "
        "1000 / that is the fastest any decoder calling these kernels could go"
    )
    print("load + compile seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in compile_seconds.items()))
    print(f"perplexity on a fixed {text_ids.shape[1]}-token text: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    print("(compiled: each prediction from a one-token decode step, the compiled path)")
    for name in ("int8", "int8 compiled"):
        print(f"{name} perplexity change vs fp32: {100 * (ppl[name] / ppl['fp32'] - 1):+.2f}%")


if __name__ == "__main__":
    main()
