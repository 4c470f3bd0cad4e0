"""The model against transformers' Llama, and the Adapter V2 mechanics."""

from __future__ import annotations

import pytest
import torch
from conftest import random_hf_model, write_hf_dir, write_meta_dir
from reference import Layer, Linear, Shape, linear, llama_logits

import llama_adapter
from llama_adapter.build import build_model
from llama_adapter.config import AdapterConfig, LlamaConfig, plain_adapter_config
from llama_adapter.model import LlamaAdapter, adapter_state_dict, count_parameters, parameter_groups, set_trainable
from llama_adapter.weights import load_base


def fresh_adapter(preset: str, **overrides) -> AdapterConfig:
    return AdapterConfig.paper(
        LlamaConfig.from_name(preset),
        image_encoder="efficientnet-lite0",
        visual_dim=32,
        visual_depth=1,
        visual_heads=4,
        **overrides,
    )


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied"])
def test_fresh_adapter_equals_transformers(preset, tiny_spm, tmp_path):
    """Gates 0, bias 0, scale 1: logits equal transformers' LlamaForCausalLM (GQA; tied)."""
    hf = random_hf_model(preset)
    base = load_base(write_hf_dir(hf, tmp_path / "hf", tiny_spm))
    model = build_model(base, None, adapter_config=fresh_adapter(preset), pretrained_encoder=False).eval()
    ids = torch.randint(0, 320, (2, 37), generator=torch.Generator().manual_seed(1))
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = hf(ids).logits
        assert torch.allclose(model(ids), expected, atol=1e-4, rtol=0)
        # A fresh adapter ignores the image too: every gate is zero.
        assert torch.allclose(model(ids, images=image), expected, atol=1e-4, rtol=0)


def test_meta_model_parallel_shards_give_the_hf_logits(tiny_spm, tmp_path):
    """Two shards split as Meta's reference code splits them (conftest.META_SHARD_DIM), merged by
    our loader: the same logits as the transformers folder."""
    hf = random_hf_model("tiny", seed=3)
    from_hf = build_model(load_base(write_hf_dir(hf, tmp_path / "hf", tiny_spm)), None)
    from_meta = build_model(load_base(write_meta_dir(hf, tmp_path / "llama" / "tiny", tiny_spm, shards=2)), None)
    ids = torch.randint(0, 320, (1, 23))
    with torch.no_grad():
        assert torch.equal(from_hf(ids), from_meta(ids))


def test_official_layout_folder_is_found(tiny_spm, tmp_path):
    """``base=llama_dir`` with llama_dir/7B/params.json and llama_dir/tokenizer.model, as upstream."""
    hf = random_hf_model("tiny")
    write_meta_dir(hf, tmp_path / "llama" / "7B", tiny_spm)
    base = load_base(tmp_path / "llama")
    assert base.config.dim == 64 and base.tokenizer.vocab_size == 320


def test_real_smollm2_matches_transformers_reading_the_gguf(smol, smollm2_from_gguf):
    """The cached SmolLM2 folder (made once by our conversion) against transformers reading the GGUF."""
    hf = smollm2_from_gguf
    ids = torch.tensor([smol.encode(smol.render("Name three colours."))])
    with torch.no_grad():
        assert torch.allclose(smol.model(ids), hf(ids).logits, atol=1e-4, rtol=0)
        ours = smol.generate("Name three colours.", max_new_tokens=64)
        theirs = hf.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1] :]
    assert ours == smol.tokenizer.decode(theirs.tolist())


def test_nonzero_gate_changes_logits():
    cfg = LlamaConfig.from_name("tiny")
    torch.manual_seed(0)
    model = LlamaAdapter(cfg, fresh_adapter("tiny")).eval()
    ids = torch.randint(0, 320, (1, 9))
    features = torch.randn(1, 49, 1280)
    with torch.no_grad():
        visual = model.encode_image(features=features)
        before = model(ids, visual_prompt=visual)
        model.layers[0].attention.gate.fill_(0.3)  # the visual (early) layer
        after_visual = model(ids, visual_prompt=visual)
        text_only = model(ids)
        model.layers[-1].attention.gate.fill_(0.3)  # a static-prompt (late) layer
        after_static = model(ids)
    assert not torch.allclose(before, after_visual)
    assert torch.allclose(before, text_only)  # no image: the early layer has no prompt
    assert not torch.allclose(text_only, after_static)


def test_visual_queries_know_where_on_the_grid_a_feature_lies():
    """Attention is blind to the order of its keys: without position embeddings, shuffling the
    encoder's 49 tokens gives the same visual prompt; with them (learnt, one per grid cell) it
    does not, and a model without them has no such tensor."""
    torch.manual_seed(0)
    features = torch.randn(2, 49, 1280)
    shuffled = features[:, torch.randperm(49)]
    plain = LlamaAdapter(LlamaConfig.from_name("tiny"), fresh_adapter("tiny")).eval()
    placed = LlamaAdapter(LlamaConfig.from_name("tiny"), fresh_adapter("tiny", visual_positions=49)).eval()
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(features=features), plain.encode_image(features=shuffled), atol=1e-5)
        assert not torch.allclose(placed.encode_image(features=features), placed.encode_image(features=shuffled))
    assert not any("visual_positions" in n for n in adapter_state_dict(plain))
    assert "visual_positions.weight" in dict(parameter_groups(placed)["pretrain"])
    assert placed.visual_positions.weight.std() < 0.05  # small at the start: features first
    with pytest.raises(ValueError, match="49"):
        placed.encode_image(features=torch.randn(1, 50, 1280))


def test_nonzero_bias_and_scale_change_logits():
    torch.manual_seed(0)
    model = LlamaAdapter(LlamaConfig.from_name("tiny"), fresh_adapter("tiny")).eval()
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        before = model(ids)
        model.layers[1].feed_forward.w2.bias.fill_(0.1)
        with_bias = model(ids)
        model.layers[1].attention.wk.scale.fill_(1.5)
        with_scale = model(ids)
    assert not torch.allclose(before, with_bias) and not torch.allclose(with_bias, with_scale)


def trained_looking(cfg: LlamaConfig, acfg: AdapterConfig) -> LlamaAdapter:
    """A random model (seeded) in eval mode, its adapter nudged away from the identity: every path active."""
    torch.manual_seed(0)
    model = LlamaAdapter(cfg, acfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or p.shape[-1] == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def paper_layers_by_hand(model: LlamaAdapter, visual_prompt: torch.Tensor) -> list[Layer]:
    """Each block of a ``paper``-wired model as the paper describes it, from its tensors: bias and
    scale on all seven linears; static prompts in the last ``adapter_layers`` layers, the visual
    prompt alone in the first ``visual_layers`` (early fusion); prompts through attention_norm."""
    t = {k: v.detach().double() for k, v in model.state_dict().items()}
    acfg, n = model.adapter_config, model.config.n_layers
    static = t["adapter_query.weight"].view(acfg.adapter_layers, acfg.prompt_len, -1)
    layers = []
    for i in range(n):
        p = f"layers.{i}."

        def lin(name: str, p: str = p) -> Linear:
            return lambda x: linear(x, t[p + name + ".base.weight"], t[p + name + ".bias"], t[p + name + ".scale"])

        prompt = None
        if i < acfg.visual_layers:
            prompt = visual_prompt.double()
        elif i >= n - acfg.adapter_layers:
            prompt = static[i - (n - acfg.adapter_layers)]
        layers.append(
            Layer(
                attention_norm=t[p + "attention_norm.weight"],
                ffn_norm=t[p + "ffn_norm.weight"],
                **{w: lin(f"attention.{w}") for w in ("wq", "wk", "wv", "wo")},
                **{w: lin(f"feed_forward.{w}") for w in ("w1", "w2", "w3")},
                prompt_wk=lin("attention.wk"),
                prompt_wv=lin("attention.wv"),
                gate=t[p + "attention.gate"].flatten() if prompt is not None else None,
                prompt=prompt,
                prompt_norm=True,
            )
        )
    return layers


def test_gated_prompt_attention_equals_the_paper_by_hand():
    """The adapter prompt's attention (its own softmax, no RoPE, weighted per head by tanh(gate)),
    against the computation written out in tests/reference.py. The gates are far from 0, where
    tanh matters (tanh 2 = 0.96), and differ per head."""
    cfg = LlamaConfig.from_name("tiny")
    acfg = fresh_adapter("tiny")
    model = trained_looking(cfg, acfg)
    heads = torch.tensor([2.0, -1.5, 0.7, 3.0])
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.attention.gate.copy_((heads + 0.2 * i).view(1, -1, 1, 1))
    g = torch.Generator().manual_seed(5)
    visual = torch.randn(acfg.prompt_len, cfg.dim, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (19,), generator=g)
    with torch.no_grad():
        got = model(ids[None], visual_prompt=visual[None])[0]
    t = {k: v.detach().double() for k, v in model.state_dict().items()}
    shape = Shape(cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps, cfg.rope_theta)
    layers = paper_layers_by_hand(model, visual)
    expected = llama_logits(ids, t["tok_embeddings.weight"], layers, t["norm.weight"], t["output.weight"], shape)
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("wiring", ["paper", "official"])
def test_kv_cached_decoding_equals_full_recompute(wiring):
    cfg = LlamaConfig.from_name("tiny")
    acfg = fresh_adapter("tiny") if wiring == "paper" else AdapterConfig.official(cfg, lora_rank=4)
    model = trained_looking(cfg, acfg)
    with torch.no_grad():
        encoder_dim = acfg.encoder_dim
        visual = model.encode_image(features=torch.randn(1, 5, encoder_dim))
        ids = torch.randint(0, 320, (1, 20))
        full = model(ids, visual_prompt=visual)
        cache = model.new_cache(1)
        steps = [model(ids[:, :12], visual_prompt=visual, cache=cache)]
        steps += [model(ids[:, i : i + 1], visual_prompt=visual, cache=cache) for i in range(12, 16)]
        steps.append(model(ids[:, 16:], visual_prompt=visual, cache=cache))  # a multi-token continuation
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_left_padded_batch_equals_rows_alone():
    torch.manual_seed(0)
    model = LlamaAdapter(LlamaConfig.from_name("tiny"), fresh_adapter("tiny")).eval()
    rows = [torch.randint(3, 320, (n,)) for n in (5, 11, 8, 2)]
    width = 11
    ids = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r.unsqueeze(0))
            assert torch.allclose(batched[i, width - len(r) :], alone[0], atol=1e-5)


def test_official_7b_counts_match_the_released_code():
    cfg = LlamaConfig.from_name("llama-7b")
    with torch.device("meta"):
        counts = count_parameters(LlamaAdapter(cfg, AdapterConfig.official(cfg)))
        lora = count_parameters(LlamaAdapter(cfg, AdapterConfig.official(cfg, lora_rank=16)))
    assert counts["pretrain"] == 61_731_584
    assert counts["finetune"] == 1_363_968
    assert counts["adapter"] == 63_095_552  # every tensor of a BIAS-7B file
    assert lora["adapter"] == 103_072_544  # every tensor of a LORA-BIAS-7B file


def test_paper_count_matches_the_papers_14m():
    """The paper's 14M is LLaMA-65B bias + scale + norm tuning."""
    cfg = LlamaConfig.from_name("llama-65b")
    with torch.device("meta"):
        model = LlamaAdapter(cfg, AdapterConfig.paper(cfg, adapter_layers=0, image_encoder=None))
    assert count_parameters(model)["adapter"] == 13_811_712


@pytest.mark.parametrize("wiring", ["paper", "official"])
def test_groups_are_disjoint_and_cover_every_adapter_tensor(wiring):
    cfg = LlamaConfig.from_name("tiny")
    acfg = fresh_adapter("tiny", lora_rank=2) if wiring == "paper" else AdapterConfig.official(cfg, lora_rank=2)
    model = LlamaAdapter(cfg, acfg)
    groups = parameter_groups(model)
    pre = {n for n, _ in groups["pretrain"]}
    fine = {n for n, _ in groups["finetune"]}
    assert pre and fine and not pre & fine
    frozen = {n for n, _ in model.named_parameters()} - pre - fine
    assert all(n.endswith("base.weight") or n.startswith(("tok_embeddings", "output")) for n in frozen)
    trained = {n for n, p in set_trainable(model, "joint")}
    assert trained == pre | fine == {n for n, p in model.named_parameters() if p.requires_grad}
    if wiring == "paper":
        assert "layers.0.attention.gate" in pre and f"layers.{cfg.n_layers - 1}.attention.gate" in fine
        assert "adapter_query.weight" in fine
    else:
        assert "adapter_query.weight" in pre and "layers.0.attention.wq.bias" in fine


@pytest.mark.parametrize("lora", [0, 2])
def test_fused_projections_compute_the_same(lora):
    """Inference fusion (q/k/v and w1/w3 in one matmul each, scales folded) changes no output."""
    torch.manual_seed(0)
    model = LlamaAdapter(LlamaConfig.from_name("tiny"), fresh_adapter("tiny", lora_rank=lora)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or p.shape[-1] == 1:
                p.add_(torch.randn_like(p) * 0.2)
    ids = torch.randint(0, 320, (2, 11))
    features = torch.randn(2, 49, 1280)
    with torch.no_grad():
        visual = model.encode_image(features=features)
        expected = model(ids, visual_prompt=visual)
        model.fuse()
        got = model(ids, visual_prompt=visual)
    assert torch.allclose(got, expected, atol=1e-5)
    assert model.fused == (lora == 0)
    assert (model.layers[0].attention.wqkv is None) == bool(lora)
    if not lora:
        with pytest.raises(ValueError, match="fused"):
            adapter_state_dict(model)


def test_plain_config_is_the_base_model(tiny_spm, tmp_path):
    hf = random_hf_model("tiny")
    model = build_model(load_base(write_hf_dir(hf, tmp_path / "hf", tiny_spm)), None)
    assert model.adapter_config == plain_adapter_config()
    assert count_parameters(model)["pretrain"] == 0


def test_forward_refuses_sequences_longer_than_the_context():
    model = LlamaAdapter(LlamaConfig.from_name("tiny"), plain_adapter_config()).eval()
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_public_api_exports():
    assert callable(llama_adapter.load) and llama_adapter.Pipeline and llama_adapter.AdapterConfig


@pytest.mark.parametrize("wiring", ["official", "paper"])
def test_compiled_decoding_equals_eager_from_one_graph(wiring, fresh_compiler):
    """compile_decoding: the same logits as eager decoding through adapter prompts, with and
    without an image (in the paper wiring the early layers have a prompt only with one), LoRA,
    cache growth (64 → 128 → 256 positions) and a truncated cache (chat reuse), all from the one
    graph compiled up front."""
    from torch._dynamo.utils import counters

    cfg = LlamaConfig.from_name("tiny")
    acfg = fresh_adapter("tiny") if wiring == "paper" else AdapterConfig.official(cfg, lora_rank=4)
    model = trained_looking(cfg, acfg)

    def decode(visual: torch.Tensor | None) -> torch.Tensor:
        cache = model.new_cache(1)
        logits = [model(ids[:, :10], visual_prompt=visual, cache=cache)]
        logits += [model(ids[:, i : i + 1], cache=cache) for i in range(10, 150)]
        cache.truncate(100)  # a new chat turn reusing the first 100 tokens
        logits += [model(ids[:, 100:104], cache=cache)]
        logits += [model(ids[:, i : i + 1], cache=cache) for i in range(104, 200)]
        return torch.cat(logits, 1)

    with torch.inference_mode():  # as generation runs (the compiled step is specialised to it)
        ids = torch.randint(0, 320, (1, 200))
        visual = model.encode_image(features=torch.randn(1, 5, acfg.encoder_dim))
        eager = [decode(visual), decode(None)]
        before = counters["stats"]["unique_graphs"]
        model.compile_decoding()
        assert counters["stats"]["unique_graphs"] - before == 1
        compiled = [decode(visual), decode(None)]
    assert counters["stats"]["unique_graphs"] - before == 1
    for c, e in zip(compiled, eager):
        assert torch.allclose(c, e, atol=1e-4, rtol=0)


def test_7b_table_rows_match_counts_by_hand():
    """The README's LoRA and paper rows, each group summed from the layer shapes by hand."""
    cfg = LlamaConfig.from_name("llama-7b")
    d, h, n, heads, p, v = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, 10, 768
    linears_in_out = [(d, d)] * 4 + [(d, h), (h, d), (d, h)]  # wq wk wv wo, w1 w2 w3
    with torch.device("meta"):  # shapes only: no memory for 7B weights
        official = count_parameters(LlamaAdapter(cfg, AdapterConfig.official(cfg)))
        lora = count_parameters(LlamaAdapter(cfg, AdapterConfig.official(cfg, lora_rank=16)))
        paper = count_parameters(LlamaAdapter(cfg, AdapterConfig.paper(cfg)))
    assert lora["pretrain"] == official["pretrain"] + n == 61_731_616  # + one new_gate per layer
    assert lora["finetune"] == official["finetune"] + n * sum(16 * (i + o) for i, o in linears_in_out) == 41_340_928

    block = 2 * 2 * v + (v * 3 * v + 3 * v) + (v * v + v) + (v * 4 * v + 4 * v) + (4 * v * v + v)
    visual = (v * v + v) + 2 * v + p * v + 8 * block + (v * d + d) + 2 * d
    assert paper["pretrain"] == visual + heads == 60_460_832  # + the gate of the one fusion layer
    per_layer = sum(o for _, o in linears_in_out) + sum(i for i, _ in linears_in_out) + 2 * d  # bias, scale, norms
    finetune = (n - 1) * p * d + (n - 1) * heads + n * per_layer + d
    assert paper["finetune"] == finetune == 4_035_552
