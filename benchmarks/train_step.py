"""Training throughput: our trainer's step against a transformers LlamaForCausalLM on the same
frozen SmolLM2-135M base, in one run.

Ours trains the finetune group (bias + scale on the seven linears, norms, adapter prompts and
gates). The reference trains a PEFT-free equivalent: transformers' own biases on every linear
(``attention_bias`` / ``mlp_bias``, zero-initialised) and the norms. Both see the same token ids
and loss mask (a chat prompt, then the answer), take an AdamW step, and are timed alternately so
that load on the machine hits both alike; the median step gives (real, not padding) tokens per
second. ``--lengths fixed`` fills every row to ``--seq`` tokens; ``mixed`` (default) gives the
answers lengths from a quarter of that up to all of it, right-padded, as instruction data is.

    python benchmarks/train_step.py [--batch 4] [--seq 256] [--lengths mixed|fixed] [--steps 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_adapter.weights import smollm2_dir  # noqa: E402
from train import setup  # noqa: E402
from train.step import train_step  # noqa: E402
from train.trainer import data_loader  # noqa: E402

TEXT = " ".join(
    "The adapter learns a small set of prompts, biases and scales while the base model stays frozen.".split() * 60
)


def ours(args: argparse.Namespace, workdir: str) -> tuple[Callable[[], None], dict, int]:
    words = TEXT.split()
    share = (
        [1.0] * args.batch
        if args.lengths == "fixed"
        else [0.25 + 0.75 * i / max(args.batch - 1, 1) for i in range(args.batch)]
    )
    # About one word per token: the longest answers are cut at --seq tokens.
    samples = [
        {"instruction": f"Repeat the text ({i}).", "output": " ".join(words[: int(args.seq * f)] if f < 1 else words)}
        for i, f in enumerate(share)
    ]
    state = setup(
        {
            "stage": "finetune",
            "output_dir": workdir,
            "model": {"base": "smollm2-135m", "adapter": {"image_encoder": None}},
            "data": {"sources": [{"samples": samples}], "batch_size": args.batch, "max_len": args.seq},
            "optim": {"lr": 1e-4, "warmup_epochs": 0},
            "engine": {"cpu": args.device == "cpu"},
            "log": {"report_to": ["none"]},
        }
    )
    micro = next(iter(data_loader(state, 0, 1)))
    trainable = sum(p.numel() for params in state.groups.values() for _, p in params)
    return (lambda: train_step(state, [micro])), micro, trainable


def reference(args: argparse.Namespace, micro) -> tuple[Callable[[], None], int]:
    from transformers import LlamaForCausalLM

    device = torch.device(args.device)
    model = LlamaForCausalLM.from_pretrained(
        str(smollm2_dir()), attention_bias=True, mlp_bias=True, dtype=torch.float32
    )
    model.to(device).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        trainable = name.endswith(".bias") or name.endswith("norm.weight")
        p.requires_grad_(trainable)
        if name.endswith(".bias"):
            torch.nn.init.zeros_(p)  # the checkpoint has no biases: start as the frozen base
        if trainable:
            (no_decay if p.ndim == 1 else decay).append(p)
    if device.type == "cuda":  # as our trainer: frozen weights in bf16 under autocast, trainables float32
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95)
    )
    ids, labels = micro.input_ids.to(device), micro.labels.to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in decay + no_decay)


def timed(step: Callable[[], None], n: int, device: str) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="longest row, in tokens")
    parser.add_argument("--lengths", choices=["mixed", "fixed"], default="mixed", help="answer lengths in the batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and model")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, reference, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        our_step, micro, our_params = ours(args, workdir)
        ref_step, ref_params = reference(args, micro)
        tokens = int(micro.tokens)
        for step in (our_step, ref_step):  # warm-up: allocator, kernels
            timed(step, 2, args.device)
        ours_t, ref_t = [], []
        for _ in range(args.rounds):
            ours_t += timed(our_step, args.steps, args.device)
            ref_t += timed(ref_step, args.steps, args.device)
    ours_tps = tokens / statistics.median(ours_t)
    ref_tps = tokens / statistics.median(ref_t)
    width = micro.input_ids.shape[1]
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, batch {args.batch} x {width} ({tokens} real tokens)"
    )
    print(f"{'':<34}{'trainable':>12}{'tokens/s':>12}")
    print(f"{'ours (llama_adapter + train)':<34}{our_params:>12,}{ours_tps:>12,.0f}")
    print(f"{'transformers LlamaForCausalLM':<34}{ref_params:>12,}{ref_tps:>12,.0f}")
    print(f"ratio ours / transformers: {ours_tps / ref_tps:.2f}x")


if __name__ == "__main__":
    main()
