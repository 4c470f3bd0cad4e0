"""Inside an answer (llama_adapter.explain): the adapter share, gates and where-it-looked map against
hand computations on tiny random models; cached tracing equals a full recompute; tracing changes no
logits and adds no compiled graph; the pictures and the CLI; on the demo model, a shape in one
corner draws the map's maximum to that corner."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw
from test_model import trained_looking

import llama_adapter
from llama_adapter import Pipeline, chat, explain
from llama_adapter.config import AdapterConfig, LlamaConfig
from llama_adapter.encoders import build_image_encoder
from llama_adapter.explain import Recording, grid_attention, repeated_spans, token_pieces
from llama_adapter.model import apply_rope
from llama_adapter.tokenizer import SentencePieceTokenizer

QUESTION = "What colour is the shape?"


def tiny_visual_pipe(spm, wiring: str = "paper") -> Pipeline:
    """A random tiny model with every adapter path active, two visual blocks and a random
    EfficientNet-Lite0 (a 7×7 grid), behind the pipeline."""
    cfg = LlamaConfig.from_name("tiny")
    visual = {"image_encoder": "efficientnet-lite0", "visual_dim": 32, "visual_depth": 2, "visual_heads": 4}
    if wiring == "paper":
        acfg = AdapterConfig.paper(cfg, **visual)
    else:  # the released wiring, with LoRA and so new_gate
        acfg = dataclasses.replace(AdapterConfig.official(cfg, lora_rank=4), channel_order="RGB", **visual)
    model = trained_looking(cfg, acfg)
    model.image_encoder = build_image_encoder("efficientnet-lite0", pretrained=False)
    return Pipeline(model, SentencePieceTokenizer(spm), template="alpaca")


@pytest.fixture(scope="module", params=["paper", "official"])
def pipe(request, tiny_spm) -> Pipeline:
    return tiny_visual_pipe(tiny_spm, request.param)


@pytest.fixture
def picture() -> Image.Image:
    img = Image.new("RGB", (160, 120), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 60, 60), fill="red")
    return img


def by_hand_share(model, layer_id: int, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """The adapter share of layer ``layer_id`` at every position of its input ``x`` [1, S, dim],
    written out from the paper's formula: explicit causal softmax attention over the tokens, the
    prompt (static + visual) through the layer's own norm and frozen wk/wv, its own softmax,
    scaled per head by tanh(gate) (× new_gate)."""
    block, att = model.layers[layer_id], model.layers[layer_id].attention
    cfg, acfg = model.config, model.adapter_config
    s, heads, kv_heads, d = x.shape[1], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    xn = block.attention_norm(x)
    freqs = model.rope[:s].unsqueeze(0)
    q = apply_rope(att.wq(xn).view(1, s, heads, d), freqs).transpose(1, 2)
    k = apply_rope(att.wk(xn).view(1, s, kv_heads, d), freqs).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    v = att.wv(xn).view(1, s, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    tokens = scores.softmax(-1) @ v

    prompt = torch.zeros(1, acfg.prompt_len, cfg.dim)
    if layer_id in model.prompt_layers:
        j = model.prompt_layers.index(layer_id)
        prompt = prompt + model.adapter_query.weight[j * acfg.prompt_len : (j + 1) * acfg.prompt_len]
    if layer_id in model.visual_layers:
        prompt = prompt + visual
    if acfg.prompt_norm:
        prompt = block.attention_norm(prompt)
    pk = att.wk(prompt, use_lora=False).view(1, -1, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    pv = att.wv(prompt, use_lora=False).view(1, -1, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    gate = att.gate.tanh() * (att.new_gate if att.new_gate is not None else 1)
    gated = gate * (q @ pk.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ pv
    a, t = gated.norm(dim=-1), tokens.norm(dim=-1)
    return (a / (t + a)).mean(1)[0]


def test_adapter_share_matches_the_formula_by_hand(pipe, picture):
    """Teacher-forced trace of a given answer: each layer's share at the positions that chose the
    answer's tokens equals the two terms computed by hand from the layer's input."""
    model = pipe.model
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(model.layers)
    ]
    try:
        trace = explain(pipe, QUESTION, picture, answer="The shape is red.")
    finally:
        for h in hooks:
            h.remove()
    n_answer = len(trace.token_ids)
    assert trace.adapter_share.shape == (n_answer, model.config.n_layers) and n_answer > 3
    with torch.no_grad():
        visual = pipe.visual_prompt(picture)
        checked = 0
        for i, kind in enumerate(trace.layer_kinds):
            if kind == "none":
                assert torch.all(trace.adapter_share[:, i] == 0)
                continue
            expected = by_hand_share(model, i, inputs[i], visual)[-n_answer:]
            assert torch.allclose(trace.adapter_share[:, i], expected, atol=1e-5), i
            checked += 1
    assert checked == len(model.prompt_layers) + (model.adapter_config.wiring == "paper")


def test_layer_kinds_follow_the_wiring(pipe, picture):
    with_image = explain(pipe, QUESTION, picture, answer="Red.").layer_kinds
    without = explain(pipe, QUESTION, answer="Red.").layer_kinds
    if pipe.model.adapter_config.wiring == "paper":  # tiny: 4 layers, the first visual, the last 3 static
        assert with_image == ["visual", "static", "static", "static"]
        assert without == ["none", "static", "static", "static"]
    else:  # every layer gated, the last 3 hold the static prompt plus the image
        assert with_image == ["none", "mixed", "mixed", "mixed"]
        assert without == ["none", "static", "static", "static"]


def test_zero_gates_give_exactly_zero_share(tiny_spm, picture):
    pipe = tiny_visual_pipe(tiny_spm)
    with torch.no_grad():
        for layer in pipe.model.layers:
            if layer.attention.gate is not None:
                layer.attention.gate.zero_()
    trace = explain(pipe, QUESTION, picture, max_new_tokens=6)
    assert trace.token_ids and torch.all(trace.adapter_share == 0)
    assert torch.all(trace.gates[~trace.gates.isnan()] == 0)


def test_shares_in_unit_interval_and_grid_sums_to_one(pipe, picture):
    trace = explain(pipe, QUESTION, picture, max_new_tokens=10)
    assert trace.adapter_share.min() >= 0 and trace.adapter_share.max() <= 1
    assert trace.adapter_share.max() > 0
    assert trace.grid.shape == (7, 7) and trace.grid_blocks.shape == (2, 7, 7)
    assert torch.all(trace.grid >= 0) and math.isclose(trace.grid.sum().item(), 1, rel_tol=1e-5)
    for block in trace.grid_blocks:
        assert math.isclose(block.sum().item(), 1, rel_tol=1e-5)
    assert trace.image.size == (224, 224)  # the centre crop the encoder saw


def test_gates_are_tanh_of_each_head_times_new_gate(pipe):
    trace = explain(pipe, QUESTION, answer="Red.")
    for i, layer in enumerate(pipe.model.layers):
        gate = layer.attention.gate
        if gate is None:
            assert trace.gates[i].isnan().all()
            continue
        expected = torch.tanh(gate.detach().flatten())
        if layer.attention.new_gate is not None:
            expected = expected * layer.attention.new_gate.item()
        assert torch.allclose(trace.gates[i], expected)


def test_grid_is_the_visual_queries_attention_by_hand(pipe, picture):
    """Each block's map: softmax(q kᵀ/√d) of its input, from the queries to the 7×7 grid tokens,
    averaged over heads and queries, renormalised; the headline map is the rollout of both."""
    model = pipe.model
    p = model.adapter_config.prompt_len
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())) for b in model.visual_blocks]
    try:
        trace = explain(pipe, QUESTION, picture, answer="Red.")
    finally:
        for h in hooks:
            h.remove()
    attentions = []
    with torch.no_grad():
        for block, x in zip(model.visual_blocks, inputs):
            n, d = x.shape[1], x.shape[2]
            q, k, _ = block.attn.qkv(block.norm1(x))[0].view(n, 3, block.heads, d // block.heads).unbind(1)
            weights = torch.einsum("qhd,khd->hqk", q, k).div(math.sqrt(d // block.heads)).softmax(-1).mean(0)
            attentions.append(weights)
    for a, got in zip(attentions, trace.grid_blocks):
        looked = a[:p, p:].mean(0)
        assert torch.allclose(got, (looked / looked.sum()).view(7, 7), atol=1e-6)
    eye = torch.eye(attentions[0].shape[0])
    rollout = (attentions[1] + eye) / 2 @ ((attentions[0] + eye) / 2)
    looked = rollout[:p, p:].mean(0)
    assert torch.allclose(trace.grid, (looked / looked.sum()).view(7, 7), atol=1e-6)


def test_clip_class_token_is_left_out_of_the_grid():
    """CLIP's 257 tokens: the class token follows the queries and gets no cell; 16×16 patches."""
    p, n = 10, 10 + 1 + 256
    attention = torch.zeros(n, n)
    attention[:, p] = 0.5  # half of every query's attention on the class token
    attention[:p, p + 1 + 17] = 0.5  # the rest on patch (1, 1)
    attention[p:] = 1 / n
    grid, blocks = grid_attention([attention], p, class_tokens=1)
    assert grid.shape == (16, 16) and blocks[0][1, 1] == 1 and blocks[0].sum() == 1
    assert llama_adapter.config.IMAGE_ENCODERS["clip-vit-l-14"].class_tokens == 1


@pytest.mark.parametrize("wiring", ["paper", "official"])
def test_cached_decode_trace_equals_full_recompute(tiny_spm, picture, wiring):
    """Tracing while decoding (prefill, then one cached step per token) gives, at every step, the
    numbers of one forward pass over prompt and answer without a cache."""
    pipe = tiny_visual_pipe(tiny_spm, wiring)
    for image in (picture, None):
        decoded = explain(pipe, QUESTION, image, max_new_tokens=12)
        assert len(decoded.token_ids) >= 6, decoded.token_ids  # a trace worth comparing
        recomputed = explain(pipe, QUESTION, image, answer=decoded.token_ids)
        assert torch.allclose(decoded.adapter_share, recomputed.adapter_share, atol=1e-5)
        assert decoded.tokens == recomputed.tokens and decoded.answer == recomputed.answer
        if image is not None:
            assert torch.equal(decoded.grid, recomputed.grid)


def test_tracing_changes_no_logits(tiny_spm, picture):
    """The same logits with and without a recorder, for a prefill and for cached one-token steps
    (which a recorder sends through the general path instead of the decode step); and explain's
    greedy answer is generate's."""
    pipe = tiny_visual_pipe(tiny_spm)
    model = pipe.model
    ids = torch.tensor([pipe.encode(pipe.render(QUESTION))])
    with torch.inference_mode():
        visual = pipe.visual_prompt(picture)
        plain, traced = model.new_cache(1), model.new_cache(1)
        recording = Recording()
        assert torch.equal(
            model(ids, visual_prompt=visual, cache=plain),
            model(ids, visual_prompt=visual, cache=traced, record=recording),
        )
        for token in ids[0, :20]:
            step = token.view(1, 1)
            assert torch.equal(model(step, cache=plain), model(step, cache=traced, record=recording))
    assert len(recording.shares) == len(model.prompt_layers) + 1  # it did record
    assert explain(pipe, QUESTION, picture, max_new_tokens=12).answer == pipe.generate(
        QUESTION, picture, max_new_tokens=12
    )


def test_a_traced_answer_adds_no_compiled_graph(tiny_spm, picture, fresh_compiler):
    """With the decode step compiled (for batch 1, and by the engine for its batch), a traced
    answer decodes eager: it compiles no graph, gives the eager trace, and normal answers after it
    still come from the graphs compiled before."""
    from torch._dynamo.utils import counters

    pipe = tiny_visual_pipe(tiny_spm)
    eager = explain(pipe, QUESTION, picture, max_new_tokens=8)
    pipe.model.compile_decoding()
    expected = pipe.generate(QUESTION, picture, max_new_tokens=8)  # the engine compiles its batch here
    graphs = counters["stats"]["unique_graphs"]
    trace = explain(pipe, QUESTION, picture, max_new_tokens=8)
    assert pipe.generate(QUESTION, picture, max_new_tokens=8) == expected
    assert counters["stats"]["unique_graphs"] == graphs
    assert trace.answer == eager.answer == expected and torch.equal(trace.adapter_share, eager.adapter_share)


def test_a_stop_string_cuts_the_trace_with_the_answer(tiny_spm):
    pipe = tiny_visual_pipe(tiny_spm)
    full = explain(pipe, QUESTION, max_new_tokens=12)
    cut_at = len("".join(full.tokens[:4]))
    cut = explain(pipe, QUESTION, max_new_tokens=12, stop=[full.answer[cut_at:]])
    assert cut.answer == full.answer[:cut_at] == pipe.generate(QUESTION, max_new_tokens=12, stop=[full.answer[cut_at:]])
    assert cut.tokens == full.tokens[:4] and torch.equal(cut.adapter_share, full.adapter_share[:4])


def test_token_pieces_join_to_the_decoded_text(tiny_spm, smol):
    text = "The quick brown fox jumps over the lazy dog. Name three colours: red, green and blue."
    for tokenizer in (SentencePieceTokenizer(tiny_spm), smol.tokenizer):
        ids = tokenizer.encode(text, bos=False)
        pieces = token_pieces(tokenizer, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids) == text


def test_an_answer_longer_than_the_context_is_refused(pipe):
    with pytest.raises(llama_adapter.InputError, match="at most"):
        explain(pipe, QUESTION, answer=list(range(5, 300)))
    with pytest.raises(llama_adapter.InputError, match="Sampling options"):
        explain(pipe, QUESTION, answer="Red.", temperature=0.5)


# -- expert text the answer repeats ------------------------------------------------------------------


def test_repeated_spans_mark_what_the_answer_repeats():
    source = "Total: $12.50\nThank you for shopping"
    assert repeated_spans(source, "The total is $12.50.") == [
        ("Total", "repeated"),
        (": ", None),
        ("$12.50", "repeated"),
        ("\nThank you for shopping", None),
    ]
    caption = "a red circle on a white background"
    assert repeated_spans(caption, "It is a red circle.") == [
        ("a red circle", "repeated"),
        (" on a white background", None),
    ]
    # One common word alone is no repeat; the pieces always join to the source.
    assert repeated_spans("the sign says OPEN", "the answer") == [("the sign says OPEN", None)]
    assert repeated_spans("", "anything") == []


# -- pictures, JSON, CLI -----------------------------------------------------------------------------


def test_importing_the_library_imports_no_drawing_or_web_toolkit():
    code = "import sys, llama_adapter; sys.exit(bool({'matplotlib', 'gradio'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_pictures_and_json_of_a_trace(pipe, picture, tmp_path):
    from llama_adapter import pictures

    messages = [{"role": "user", "content": QUESTION, "context": "Caption: a red circle on white"}]
    trace = explain(pipe, messages, picture, answer="It is a red circle.")
    assert trace.context_spans()[1] == ("a red circle", "repeated")
    written = {p.name for p in trace.save(tmp_path)}
    assert written == {"trace.json", "looked.png", "gates.png", "adapter_share.png", "repeated.png"}
    for name in written - {"trace.json"}:
        assert Image.open(tmp_path / name).size[0] > 300
    data = json.loads((tmp_path / "trace.json").read_text())
    n_layers = pipe.model.config.n_layers
    assert data["tokens"] == trace.tokens and len(data["adapter_share"]) == len(trace.tokens)
    assert all(len(row) == n_layers for row in data["adapter_share"])
    assert len(data["gates"]) == n_layers and data["grid"]["shape"] == [7, 7]
    assert math.isclose(sum(map(sum, data["grid"]["values"])), 1, abs_tol=1e-4)

    share = pictures.adapter_share(trace)
    ax = share.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == trace.tokens
    assert torch.allclose(torch.tensor(ax.images[0].get_array()), trace.adapter_share)
    bars = pictures.gates(trace).axes[0].patches
    gated = ~trace.gates[:, 0].isnan()
    assert [round(b.get_height(), 5) for b in bars] == [round(g, 5) for g in trace.gates[gated].mean(1).tolist()]


def test_chat_cli_writes_the_pictures_and_numbers(tiny_pipe, tmp_path, capsys):
    """``python -m llama_adapter.chat --prompt Q --explain DIR``, a text-only model: no map of where
    it looked, the rest written; the printed answer is the chat's."""
    expected = tiny_pipe.chat().ask("Name three colours.", max_new_tokens=12)
    argv = ["--base", tiny_pipe.info["base"], "--dtype", "fp32", "--prompt", "Name three colours."]
    assert chat.main([*argv, "--max-new-tokens", "12", "--explain", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(expected + "\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_share.png", "gates.png", "trace.json"]
    data = json.loads((tmp_path / "trace.json").read_text())
    assert data["grid"] is None and data["answer"] == expected
    with pytest.raises(SystemExit):
        chat.main(["--base", tiny_pipe.info["base"], "--explain", str(tmp_path)])  # needs --prompt


# -- the demo model ----------------------------------------------------------------------------------


def corner_image(shape: str, colour: str, corner: str, size: int = 224, side: int = 80) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    x0 = 16 if corner[1] == "l" else size - 16 - side
    y0 = 16 if corner[0] == "t" else size - 16 - side
    box = (x0, y0, x0 + side, y0 + side)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    return img


@pytest.mark.slow
def test_demo_model_looks_at_the_corner_with_the_shape():
    """A shape in one corner of an empty image: the map's maximum falls in that corner's 3×3 cells
    (of 7×7: chance 9/49) for most images. Measured: 34 of these 36 (a red circle and a blue square
    land one cell outside)."""
    from test_image_chat import visual_pipeline

    pipe = visual_pipeline()
    missed = []
    for shape in ("circle", "square", "triangle"):
        for colour in ("red", "blue", "green"):
            for corner in ("tl", "tr", "bl", "br"):
                recording = Recording()
                pipe.visual_prompt(corner_image(shape, colour, corner), record=recording)
                grid, _ = grid_attention(recording.visual, pipe.model.adapter_config.prompt_len)
                row, col = divmod(int(grid.argmax()), 7)
                rows = range(0, 3) if corner[0] == "t" else range(4, 7)
                cols = range(0, 3) if corner[1] == "l" else range(4, 7)
                if row not in rows or col not in cols:
                    missed.append((shape, colour, corner, (row, col)))
    assert len(missed) <= 6, missed


@pytest.mark.slow
def test_demo_model_cli_explains_an_image_answer(tmp_path, monkeypatch, capsys):
    from test_image_chat import visual_pipeline

    monkeypatch.setattr(llama_adapter.cli, "load", lambda *a, **k: visual_pipeline())
    image = llama_adapter.build.ASSETS / "examples" / "circle.png"
    argv = ["--image", str(image), "--prompt", "What shape is this?", "--explain", str(tmp_path)]
    assert chat.main(argv) == 0
    assert "circle" in capsys.readouterr().out.lower()
    assert {p.name for p in tmp_path.iterdir()} == {"trace.json", "looked.png", "gates.png", "adapter_share.png"}
    data = json.loads((tmp_path / "trace.json").read_text())
    assert data["layer_kinds"] == ["visual"] + ["mixed"] * 29
    assert 0 < max(map(max, data["adapter_share"])) <= 1
