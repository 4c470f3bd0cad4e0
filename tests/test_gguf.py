"""GGUF files written by ``gguf``'s own writer (as llama.cpp's converter writes them) from a tiny
random checkpoint, in f32, f16 and q8_0: each loads through ``load(base=FILE)`` and equals the
source (q8_0: equals the source quantised by hand, within the error computed for each block)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_hf_model

import llama_adapter
from llama_adapter.weights import _to_hf_state_dict, load_base

# transformers' Llama names → GGUF's (llama.cpp's tensor map).
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (HF half-split → interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q8_0_by_hand(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q8_0, computed here: blocks of 32 along a row, scale d = max|x| / 127 stored as
    float16, q = round(x / d) (half away from zero). Returns the dequantised values and, per
    element, the bound on their error: d/2 for rounding q plus 127 × the float16 rounding of d."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        q = np.sign(blocks) * np.floor(np.abs(np.where(d == 0, 0, blocks / d)) + 0.5)
    d16 = d.astype(np.float16).astype(np.float32)
    bound = d / 2 + 127 * np.abs(d - d16) + 1e-7
    return (q * d16).reshape(w.shape), np.broadcast_to(bound, blocks.shape).reshape(w.shape)


def write_gguf(hf_model, spm: Path, path: Path, kind: str) -> dict[str, np.ndarray]:
    """The checkpoint as a GGUF file of ``kind`` (f32, f16, q8_0), metadata and a SentencePiece
    vocabulary as llama.cpp writes them. Returns what each HF tensor should load as."""
    import gguf
    import sentencepiece

    cfg = hf_model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // n_head)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_type[kind])

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    types = []
    for i in range(sp.get_piece_size()):
        kind_of = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind_of = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind_of = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind_of = gguf.TokenType.BYTE
        types.append(kind_of)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i).encode() for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())

    expected = {}
    for name, tensor in hf_model.state_dict().items():
        data = tensor.numpy()
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            target = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            target = f"blk.{layer}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"
            if rest.startswith("self_attn.q_proj"):
                data = llama_cpp_permute(data, n_head)
            elif rest.startswith("self_attn.k_proj"):
                data = llama_cpp_permute(data, n_kv)
        if data.ndim == 1 or kind == "f32":  # llama.cpp keeps norms in float32
            writer.add_tensor(target, data.astype(np.float32))
            expected[name] = tensor.numpy()
        elif kind == "f16":
            writer.add_tensor(target, data.astype(np.float16))
            expected[name] = tensor.numpy().astype(np.float16).astype(np.float32)
        else:
            quantised = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(target, quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name], bound = q8_0_by_hand(tensor.numpy())
            assert (np.abs(expected[name] - tensor.numpy()) <= bound).all()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_gguf_from_gguf_writer_equals_the_source(kind, tiny_spm, tmp_path):
    source = random_hf_model("tiny", seed=7)
    path = tmp_path / f"tiny-{kind}.gguf"
    expected = write_gguf(source, tiny_spm, path, kind)

    base = load_base(path)
    assert base.config.norm_eps == pytest.approx(1e-5)  # GGUF keeps it in float32
    assert dataclasses.replace(base.config, name="tiny", norm_eps=1e-5) == llama_adapter.LlamaConfig.from_name("tiny")
    loaded = _to_hf_state_dict(base.state_dict, base.config)
    assert set(loaded) == set(expected)
    worst = 0.0
    for name, want in expected.items():
        got = loaded[name].numpy()
        assert got.shape == want.shape, name
        assert np.array_equal(got, want), name  # f32 exact; f16 = source in float16; q8_0 = quantised by hand
        worst = max(worst, float(np.abs(got - source.state_dict()[name].numpy()).max()))
    print(f"{kind}: max |weight - source| {worst:.2e}")

    # The same model as transformers' holding exactly these weights; same tokenizer.
    reference = random_hf_model("tiny")
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()})
    pipe = llama_adapter.load(base=path, dtype="fp32")
    ids = torch.tensor([pipe.tokenizer.encode("What shape is this? It is a triangle.")])
    with torch.no_grad():
        assert (pipe.model(ids) - reference(ids).logits).abs().max() < 1e-4
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_spm))
    assert ids[0].tolist() == [sp.bos_id(), *sp.encode("What shape is this? It is a triangle.")]
