"""The bases people bring: tiny random checkpoints in the layouts of Llama 2, 3, 3.1 and 3.2 (and
Llama 2 with linear and dynamic RoPE scaling, and Meta's Llama 2 folder), each with the chat
template and end ids its family carries, loaded through ``llama_adapter.load(base=DIR)`` and
checked against transformers' ``LlamaForCausalLM``: logits within 1e-4, 32 greedy tokens equal."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CORPUS
from llama_templates import LLAMA2_CHAT, LLAMA3_INSTRUCT, LLAMA31_INSTRUCT, LLAMA32_INSTRUCT

import llama_adapter
from llama_adapter.errors import CheckpointError
from llama_adapter.generate import Sampling, decode_tokens
from llama_adapter.model import rope_inverse_frequencies

VOCAB = 320
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]


@dataclass
class Layout:
    """One family's checkpoint layout at tiny size: config.json fields, tokenizer kind, template."""

    name: str
    config: dict[str, Any]
    tokenizer: str  # "spm" (Llama 2's SentencePiece) or "bpe" (Llama 3's byte-level BPE)
    template: str
    eos: list[str]  # config.json's eos_token_id, by token
    generation_eos: list[str] | None = None  # generation_config.json's, when it has its own
    rendered: str = ""  # the template's text for one user turn "Hi", written out by hand
    expected: dict[str, Any] = field(default_factory=dict)  # our LlamaConfig fields


LLAMA2 = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 192}
LLAMA3 = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 224}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
SYSTEM_31 = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
)
TURN_3 = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

LAYOUTS = [
    Layout(
        "llama-2",
        {**LLAMA2, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0},
        "spm",
        LLAMA2_CHAT,
        ["</s>"],
        rendered="<s>[INST] Hi [/INST]",
        expected={"norm_eps": 1e-5, "max_seq_len": 4096, "n_kv_heads": 4, "rope_scaling": None},
    ),
    Layout(
        "llama-2-linear",
        {
            **LLAMA2,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        },
        "spm",
        LLAMA2_CHAT,
        ["</s>"],
        rendered="<s>[INST] Hi [/INST]",
        expected={"max_seq_len": 128},
    ),
    Layout(
        "llama-2-dynamic",
        {
            **LLAMA2,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        },
        "spm",
        LLAMA2_CHAT,
        ["</s>"],
        rendered="<s>[INST] Hi [/INST]",
        expected={"max_seq_len": 128},
    ),
    Layout(
        "llama-3",
        {**LLAMA3, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "rope_theta": 500000.0},
        "bpe",
        LLAMA3_INSTRUCT,
        ["<|eot_id|>"],
        generation_eos=["<|end_of_text|>", "<|eot_id|>"],
        rendered="<|begin_of_text|>" + TURN_3,
        expected={"n_kv_heads": 2, "max_seq_len": 8192, "rope_theta": 500000.0, "tie_embeddings": False},
    ),
    Layout(
        "llama-3.1",
        {
            **LLAMA3,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 512,  # 131,072 in the real one; original 8,192
            "rope_parameters": {**LLAMA31_ROPE, "original_max_position_embeddings": 64, "rope_theta": 500000.0},
        },
        "bpe",
        LLAMA31_INSTRUCT,
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        rendered="<|begin_of_text|>" + SYSTEM_31.format(date="26 Jul 2024") + "<|eot_id|>" + TURN_3,
        expected={"max_seq_len": 512},
    ),
    Layout(
        "llama-3.2",
        {
            **LLAMA3,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "max_position_embeddings": 512,
            "rope_parameters": {
                **LLAMA31_ROPE,
                "factor": 32.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            },
        },
        "bpe",
        LLAMA32_INSTRUCT,
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        rendered="<|begin_of_text|>" + SYSTEM_31.format(date="{today}") + "<|eot_id|>" + TURN_3,
        expected={"tie_embeddings": True, "max_seq_len": 512},
    ),
]


# -- writing tiny checkpoints ----------------------------------------------------------------------


def llama3_tokenizer(template: str):
    """A byte-level BPE tokenizer with Llama 3's special tokens and pre-tokenizer, 320 ids in all."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    split = (  # Llama 3's (tiktoken's cl100k-style) split pattern
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(LLAMA3_SPECIALS) - 8, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS] * 20, trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=template
    )


def llama2_tokenizer(spm: Path, template: str):
    """The fast tokenizer of a SentencePiece model, as Llama 2's tokenizer.json is: its vocabulary,
    and the merges read off the vocabulary (transformers' SentencePieceExtractor does the same,
    but needs protobuf, which this environment lacks)."""
    import sentencepiece
    from transformers import LlamaTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = sorted(
        ((piece[:k], piece[k:], rank) for piece, rank in vocab.items() for k in range(1, len(piece))),
        key=lambda m: (m[2], vocab.get(m[0], 0), vocab.get(m[1], 0)),
    )
    merges = [(left, right) for left, right, _ in merges if left in vocab and right in vocab]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, chat_template=template)
    text = "What colour is the shape? The quick brown fox."
    assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)  # the same tokenizer
    return tokenizer


def write_layout(layout: Layout, directory: Path, spm: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors (+ generation_config.json) + tokenizer files, as the
    family's Hugging Face checkpoints have them."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    directory.mkdir(parents=True)
    if layout.tokenizer == "spm":
        tokenizer = llama2_tokenizer(spm, layout.template)
        (directory / "tokenizer.model").write_bytes(spm.read_bytes())
    else:
        tokenizer = llama3_tokenizer(layout.template)
    tokenizer.save_pretrained(str(directory))
    ids = tokenizer.convert_tokens_to_ids
    eos = [ids(t) for t in layout.eos]
    config = HFConfig(
        vocab_size=VOCAB,
        num_hidden_layers=3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        **layout.config,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.08)
    model.save_pretrained(str(directory))
    if layout.generation_eos:
        generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": [ids(t) for t in layout.generation_eos]}
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def transformers_model(directory: Path):
    """A fresh transformers model from the folder (fresh: dynamic RoPE keeps state across calls)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def greedy(pipe: llama_adapter.Pipeline, ids: list[int], n: int = 32) -> list[int]:
    """Our greedy tokens after ``ids``, through the pipeline's decode loop, up to and with an end id."""
    out = []
    for (token,) in decode_tokens(
        pipe.model, [ids], Sampling(max_new_tokens=n, temperature=0.0), pipe.tokenizer.stop_ids
    ):
        if token is None:
            break
        out.append(token)
    return out


def reference_greedy(directory: Path, ids: list[int], n: int = 32) -> list[int]:
    hf = transformers_model(directory)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, top_p=None, top_k=None)
    return out[0, len(ids) :].tolist()


def long_ids(pipe: llama_adapter.Pipeline, n: int) -> list[int]:
    ids = pipe.tokenizer.encode(CORPUS * 4, bos=True)
    return ids[:n]


# -- the layouts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tiny_spm, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {layout.name: write_layout(layout, root / layout.name, tiny_spm) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x.name for x in LAYOUTS])
def test_layout_equals_transformers(layout, checkpoints):
    directory = checkpoints[layout.name]
    pipe = llama_adapter.load(base=directory, dtype="fp32")
    for key, value in layout.expected.items():
        assert getattr(pipe.model.config, key) == value, key

    # Logits over a sequence past the original context of the scaled layouts (64), from a fresh model.
    ids = torch.tensor([long_ids(pipe, 100)])
    with torch.no_grad():
        expected = transformers_model(directory)(ids).logits
        got = pipe.model(ids)
    delta = (got - expected).abs().max().item()
    print(f"{layout.name}: max |Δlogit| {delta:.2e}")
    assert delta < 1e-4

    # The chat template the checkpoint carries, rendered and tokenised as transformers does.
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    messages = [{"role": "user", "content": "Hi"}]
    today = datetime.datetime.now().strftime("%d %b %Y")
    assert pipe.template == "chat"
    assert pipe.render(messages) == layout.rendered.replace("{today}", today)
    prompt = pipe.encode(pipe.render(messages))
    assert prompt == list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    assert prompt.count(pipe.tokenizer.bos_id) == 1 and prompt[0] == pipe.tokenizer.bos_id

    # 32 greedy tokens, from the chat prompt and from a prompt that runs past the original context.
    assert greedy(pipe, prompt) == reference_greedy(directory, prompt)
    near_edge = long_ids(pipe, 50)
    assert greedy(pipe, near_edge) == reference_greedy(directory, near_edge)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x.name for x in LAYOUTS])
def test_end_and_start_ids_come_from_the_config(layout, checkpoints):
    """Llama 3.1 and 3.2 list three end ids; an answer ends at any of them, as in transformers."""
    directory = checkpoints[layout.name]
    pipe = llama_adapter.load(base=directory, dtype="fp32")
    config = json.loads((directory / "config.json").read_text())
    generation = transformers_model(directory).generation_config
    eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    generation_eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert set(eos) | set(generation_eos) <= pipe.tokenizer.stop_ids
    assert pipe.tokenizer.bos_id == config["bos_token_id"]


def test_dynamic_scaling_depends_on_the_length(checkpoints):
    """Within the original context dynamic NTK is plain RoPE; past it, the frequencies follow the
    length of the call, for a prompt that is already long and for decoding that crosses the edge."""
    from llama_adapter.config import RopeScaling

    scaling = RopeScaling("dynamic", 2.0, 64)
    plain = rope_inverse_frequencies(16, 10000.0)
    assert torch.equal(rope_inverse_frequencies(16, 10000.0, scaling, seq_len=64), plain)
    longer = rope_inverse_frequencies(16, 10000.0, scaling, seq_len=100)
    base = 10000.0 * (2.0 * 100 / 64 - 1) ** (16 / 14)  # transformers' formula, by hand
    assert torch.allclose(longer, 1.0 / base ** (torch.arange(0, 16, 2) / 16), rtol=1e-6)

    directory = checkpoints["llama-2-dynamic"]
    pipe = llama_adapter.load(base=directory, dtype="fp32")
    with torch.no_grad():
        for n in (40, 64, 65, 120):
            ids = torch.tensor([long_ids(pipe, n)])
            assert (pipe.model(ids) - transformers_model(directory)(ids).logits).abs().max() < 1e-4, n


def test_unsupported_rope_scaling_is_refused_by_name(tmp_path, checkpoints):
    directory = tmp_path / "yarn"
    directory.mkdir()
    for f in checkpoints["llama-3.1"].iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"RoPE scaling 'yarn' is not supported.*linear, dynamic, llama3"):
        llama_adapter.load(base=directory)


# -- Meta's Llama 2 folder ------------------------------------------------------------------------


def test_meta_llama2_folder_equals_transformers(tiny_spm, tmp_path):
    """Meta's download: llama-2-7b/params.json (no context recorded, vocab_size -1) and
    consolidated.00.pth with rope.freqs, tokenizer.model beside the folder. The reference is
    transformers' model holding the same tensors, q/k permuted by transformers' own GGUF
    (Meta layout) reader."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    dim, heads, layers, ffn = 64, 4, 3, 192
    g = torch.Generator().manual_seed(5)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.08  # noqa: E731
    norm = lambda: torch.rand(dim, generator=g) + 0.5  # noqa: E731
    meta = {"tok_embeddings.weight": r(VOCAB, dim), "norm.weight": norm(), "output.weight": r(VOCAB, dim)}
    meta["rope.freqs"] = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    for i in range(layers):
        p = f"layers.{i}."
        meta |= {
            p + "attention.wq.weight": r(dim, dim), p + "attention.wk.weight": r(dim, dim),
            p + "attention.wv.weight": r(dim, dim), p + "attention.wo.weight": r(dim, dim),
            p + "feed_forward.w1.weight": r(ffn, dim), p + "feed_forward.w2.weight": r(dim, ffn),
            p + "feed_forward.w3.weight": r(ffn, dim),
            p + "attention_norm.weight": norm(), p + "ffn_norm.weight": norm(),
        }  # fmt: skip
    folder = tmp_path / "llama-2-7b"
    folder.mkdir()
    torch.save(meta, folder / "consolidated.00.pth")
    params = {"dim": dim, "multiple_of": 32, "n_heads": heads, "n_layers": layers, "norm_eps": 1e-05, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    (tmp_path / "tokenizer.model").write_bytes(tiny_spm.read_bytes())

    config = HFConfig(
        vocab_size=VOCAB, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, rms_norm_eps=1e-5, max_position_embeddings=4096,
    )  # fmt: skip
    permute = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": heads})
    hf_names = {
        "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
        "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }  # fmt: skip
    hf_state = {
        "model.embed_tokens.weight": meta["tok_embeddings.weight"],
        "model.norm.weight": meta["norm.weight"],
        "lm_head.weight": meta["output.weight"],
    }
    for i in range(layers):
        for ours, theirs in hf_names.items():
            w = meta[f"layers.{i}.{ours}.weight"]
            if ours in ("attention.wq", "attention.wk"):
                w = torch.from_numpy(permute._reverse_permute_weights(w.numpy(), heads, heads).copy())
            hf_state[f"model.layers.{i}.{theirs}.weight"] = w
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict(hf_state)

    pipe = llama_adapter.load(base=tmp_path, dtype="fp32")  # the folder above it, as upstream's llama_dir
    assert pipe.model.config.max_seq_len == 4096 and pipe.model.config.norm_eps == 1e-5
    ids = long_ids(pipe, 80)
    with torch.no_grad():
        delta = (pipe.model(torch.tensor([ids])) - reference(torch.tensor([ids])).logits).abs().max().item()
        print(f"meta llama-2: max |Δlogit| {delta:.2e}")
        assert delta < 1e-4
        theirs = reference.generate(torch.tensor([ids[:20]]), max_new_tokens=32, do_sample=False)[0, 20:].tolist()
    assert greedy(pipe, ids[:20]) == theirs
