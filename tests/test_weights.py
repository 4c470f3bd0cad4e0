"""Loaders: official adapters key-exact, our adapter format, GGUF, downloads, clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import random_hf_model, write_hf_dir, write_meta_dir
from reference import Shape, official_logits
from safetensors.torch import save_file

import llama_adapter
from llama_adapter import weights
from llama_adapter.build import build_model, load_adapter_into
from llama_adapter.config import AdapterConfig, LlamaConfig
from llama_adapter.errors import CheckpointError
from llama_adapter.images import image_to_tensor
from llama_adapter.model import LlamaAdapter, adapter_state_dict
from llama_adapter.tiny import random_base
from llama_adapter.weights import (
    copy_adapter,
    load_adapter,
    load_base,
    read_adapter,
    read_official_adapter,
    save_adapter,
)

TINY = LlamaConfig.from_name("tiny")  # dim 64, 4 layers, 4 heads, 2 KV heads, FFN 192
TINY_LLAMA1 = LlamaConfig.from_name("tiny-llama1")  # tiny's shapes, LLaMA-1's config: what official adapters expect
V_DIM, V_DEPTH, RANK = 32, 2, 4


def official_tensors(lora: bool) -> dict[str, torch.Tensor]:
    """A release-format state dict at tiny size, keys and shapes written out by hand from the
    official code (llama_adapter.py / llama.py), independent of our key mapping."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    norm = lambda n: 1 + r(n)  # noqa: E731 (trained norms stay near 1)
    d, h, kv = TINY.dim, TINY.hidden_dim, TINY.n_kv_heads * TINY.head_dim
    sd = {
        "clip_proj.weight": r(V_DIM, 768), "clip_proj.bias": r(V_DIM),
        "clip_proj_norm.weight": norm(V_DIM), "clip_proj_norm.bias": r(V_DIM),
        "visual_query.weight": r(10, V_DIM),
        "visual_proj.weight": r(d, V_DIM), "visual_proj.bias": r(d),
        "visual_proj_norm.weight": norm(d), "visual_proj_norm.bias": r(d),
        "adapter_query.weight": r(10 * (TINY.n_layers - 1), d),
        "llama.norm.weight": norm(d),
    }  # fmt: skip
    for b in range(V_DEPTH):
        p = f"visual_blocks.{b}."
        sd |= {
            p + "norm1.weight": norm(V_DIM), p + "norm1.bias": r(V_DIM),
            p + "attn.qkv.weight": r(3 * V_DIM, V_DIM), p + "attn.qkv.bias": r(3 * V_DIM),
            p + "attn.proj.weight": r(V_DIM, V_DIM), p + "attn.proj.bias": r(V_DIM),
            p + "norm2.weight": norm(V_DIM), p + "norm2.bias": r(V_DIM),
            p + "mlp.fc1.weight": r(4 * V_DIM, V_DIM), p + "mlp.fc1.bias": r(4 * V_DIM),
            p + "mlp.fc2.weight": r(V_DIM, 4 * V_DIM), p + "mlp.fc2.bias": r(V_DIM),
        }  # fmt: skip
    for i in range(TINY.n_layers):
        p = f"llama.layers.{i}."
        sd |= {
            # Far from 0, where tanh matters, and different per head.
            p + "attention.gate": torch.tensor([2.0, -1.5, 0.7, 3.0]).view(1, TINY.n_heads, 1, 1) + r(1),
            p + "attention.wq.bias": r(d), p + "attention.wo.bias": r(d),
            p + "feed_forward.w1.bias": r(h), p + "feed_forward.w2.bias": r(d), p + "feed_forward.w3.bias": r(h),
            p + "attention_norm.weight": norm(d), p + "ffn_norm.weight": norm(d),
        }  # fmt: skip
        if lora:
            for name, out in (("wq", d), ("wk", kv), ("wv", kv), ("wo", d)):
                sd[p + f"attention.lora_{name}_l1.weight"] = r(RANK, d)
                sd[p + f"attention.lora_{name}_l2.weight"] = r(out, RANK)
            for name, inp, out in (("w1", d, h), ("w2", h, d), ("w3", d, h)):
                sd[p + f"feed_forward.lora_{name}_l1.weight"] = r(RANK, inp)
                sd[p + f"feed_forward.lora_{name}_l2.weight"] = r(out, RANK)
            sd[p + "attention.new_gate"] = 1 + r(1, 1, 1, 1)
    return sd


def write_official(path: Path, sd: dict[str, torch.Tensor], lora: bool) -> Path:
    torch.save({"model": sd, "config": {"w_bias": True, "w_lora": lora, "lora_rank": RANK}}, path)
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_official_adapter_loads_key_exact(lora, tmp_path):
    sd = official_tensors(lora)
    adapter = read_official_adapter(write_official(tmp_path / "a.pth", sd, lora), TINY_LLAMA1, name="tiny")
    assert adapter.config.wiring == "official" and adapter.channel_order == "BGR"
    model = LlamaAdapter(TINY_LLAMA1, adapter.config)
    load_adapter_into(model, adapter)
    params = dict(model.named_parameters())
    assert torch.equal(params["layers.2.attention.gate"], sd["llama.layers.2.attention.gate"])
    assert torch.equal(params["layers.0.feed_forward.w2.bias"], sd["llama.layers.0.feed_forward.w2.bias"])
    assert torch.equal(params["visual_blocks.1.attn.qkv.weight"], sd["visual_blocks.1.attn.qkv.weight"])
    if lora:
        assert torch.equal(
            params["layers.3.feed_forward.w3.lora_b.weight"], sd["llama.layers.3.feed_forward.lora_w3_l2.weight"]
        )
        assert torch.equal(params["layers.1.attention.new_gate"], sd["llama.layers.1.attention.new_gate"])
    assert len(sd) == len(adapter_state_dict(model))


def official_logits_by_hand(meta_dir: Path, official: dict[str, torch.Tensor], ids, clip_tokens) -> torch.Tensor:
    """The released forward (tests/reference.py) from the Meta checkpoint and the release file as written."""
    params = json.loads((meta_dir / "params.json").read_text())
    base = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    shape = Shape(params["n_heads"], params["n_kv_heads"], params["norm_eps"], params["rope_theta"])
    double = lambda sd: {k: v.double() for k, v in sd.items()}  # noqa: E731
    return official_logits(double(base), double(official), ids, clip_tokens.double(), shape).float()


@pytest.mark.parametrize("lora", [False, True])
def test_official_wiring_equals_the_released_forward_by_hand(lora, tiny_spm, tmp_path):
    """A Meta base and a release-format adapter read by our loaders, against the released code's
    forward written out by hand: bias on wq/wo/w1/w2/w3, no scale, raw prompts, the visual query
    added to every adapter layer's prompt, (LoRA: not on the prompt's keys/values, new_gate)."""
    meta_dir = write_meta_dir(random_hf_model("tiny-llama1"), tmp_path / "llama" / "7B", tiny_spm)
    official = official_tensors(lora)
    base = load_base(tmp_path / "llama")
    adapter = read_official_adapter(write_official(tmp_path / "a.pth", official, lora), base.config, name="tiny")
    model = LlamaAdapter(base.config, adapter.config).eval()  # no CLIP tower: its features are given
    assert model.load_state_dict(base.state_dict, strict=False).unexpected_keys == []
    load_adapter_into(model, adapter)
    g = torch.Generator().manual_seed(2)
    clip_tokens, ids = torch.randn(257, 768, generator=g), torch.randint(0, 320, (17,), generator=g)
    with torch.no_grad():
        got = model(ids[None], visual_prompt=model.encode_image(features=clip_tokens[None]))[0]
    torch.testing.assert_close(got, official_logits_by_hand(meta_dir, official, ids, clip_tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_official_adapter_with_one_key_off_fails_naming_it(change, tmp_path):
    sd = official_tensors(lora=False)
    if change == "extra":
        sd["llama.layers.0.attention.wk.bias"] = torch.zeros(32)
        name = "layers.0.attention.wk.bias"
    else:
        del sd["llama.layers.2.ffn_norm.weight"]
        name = "layers.2.ffn_norm.weight"
    adapter = read_official_adapter(write_official(tmp_path / "a.pth", sd, False), TINY_LLAMA1, name="tiny")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_adapter_into(LlamaAdapter(TINY_LLAMA1, adapter.config), adapter)


def test_official_adapter_end_to_end_with_bgr_computes_the_released_forward(tiny_spm, tmp_path):
    """load(base=Meta folder, adapter=.pth): random CLIP ViT-L/14 (no weights offline), BGR input."""
    base_dir = write_meta_dir(random_hf_model("tiny-llama1"), tmp_path / "llama" / "7B", tiny_spm)
    path = write_official(tmp_path / "tiny-BIAS.pth", official_tensors(lora=False), False)
    pipe = llama_adapter.load(base=tmp_path / "llama", adapter=path, clip_weights=None, dtype="fp32")
    assert pipe.template == "alpaca" and pipe.model.adapter_config.channel_order == "BGR"
    assert pipe.model.image_encoder is not None and base_dir.exists()
    from PIL import Image

    image = Image.new("RGB", (300, 200), (250, 10, 10))
    rgb, bgr = image_to_tensor(image, "clip-vit-l-14", "RGB"), image_to_tensor(image, "clip-vit-l-14", "BGR")
    assert bgr[2].mean() > bgr[0].mean() and rgb[0].mean() > rgb[2].mean()  # red lands in the last channel
    assert pipe.generate("What is in the image?", image=image, max_new_tokens=5) is not None
    # The whole load path (fused projections) computes the released forward.
    g = torch.Generator().manual_seed(2)
    clip_tokens, ids = torch.randn(257, 768, generator=g), torch.randint(0, 320, (17,), generator=g)
    with torch.no_grad():
        got = pipe.model(ids[None], visual_prompt=pipe.model.encode_image(features=clip_tokens[None]))[0]
    expected = official_logits_by_hand(base_dir, official_tensors(lora=False), ids, clip_tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_adapter_for_another_base_is_refused_in_one_sentence(tmp_path):
    path = write_official(tmp_path / "a.pth", official_tensors(lora=False), False)
    with pytest.raises(CheckpointError, match=r"width 64 and 4 layers.*'tiny-tied' has width 48.*load it with"):
        load_adapter(path, LlamaConfig.from_name("tiny-tied"))


def test_our_adapter_round_trip(tiny_spm, tmp_path):
    base = load_base(write_hf_dir(random_hf_model("tiny"), tmp_path / "hf", tiny_spm))
    acfg = AdapterConfig.paper(
        TINY, image_encoder="efficientnet-lite0", visual_dim=32, visual_depth=1, visual_heads=4, lora_rank=2
    )
    model = build_model(base, None, adapter_config=acfg, pretrained_encoder=False).eval()
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_adapter(
        tmp_path / "out" / "adapter.safetensors",
        adapter_state_dict(model),
        acfg,
        base=base.config,
        base_name=str(tmp_path / "hf"),
        base_fingerprint=base.fingerprint,
        prompt_template="alpaca",
        system_prompt="You see images.",
        extra={"note": "round trip"},
    )
    loaded = read_adapter(path)
    assert loaded.config == acfg and loaded.metadata["note"] == "round trip"
    copied = read_adapter(copy_adapter(path, tmp_path / "copy.safetensors", extra={"metrics": {"accuracy": 0.9}}))
    assert copied.metadata == {
        **{k: v for k, v in loaded.metadata.items() if k != "note"},
        "metrics": {"accuracy": 0.9},
    }
    assert all(torch.equal(copied.state_dict[k], v) for k, v in loaded.state_dict.items())
    assert loaded.metadata["base_fingerprint"] == base.fingerprint
    assert set(loaded.state_dict) == set(adapter_state_dict(model))  # adapter tensors only
    assert not any(k.endswith("base.weight") or k.startswith("tok_") for k in loaded.state_dict)

    pipe = llama_adapter.load(adapter=path, dtype="fp32")  # the base comes from the metadata
    assert pipe.render("Hi").startswith("You see images.\n\n### Instruction:\nHi")
    assert pipe.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]).startswith(
        "Be brief."
    )
    ids = torch.randint(0, 320, (1, 12))
    features = torch.randn(1, 49, 1280)
    with torch.no_grad():
        expected = model(ids, visual_prompt=model.encode_image(features=features))
        got = pipe.model(ids, visual_prompt=pipe.model.encode_image(features=features))
    assert torch.allclose(expected, got, atol=1e-5)  # the pipeline fuses projections: same up to rounding


def test_an_adapter_saved_before_visual_positions_existed_loads_without_them(tmp_path):
    """An adapter file names every AdapterConfig field it was saved with; one from before
    ``visual_positions`` (as the v1 demo adapter) has no such field and loads as it did."""
    acfg = AdapterConfig.paper(TINY, image_encoder="efficientnet-lite0", visual_dim=32, visual_depth=1, visual_heads=4)
    base = random_base("tiny")
    model = build_model(base, None, adapter_config=acfg, pretrained_encoder=False)
    path = tmp_path / "old.safetensors"
    save_adapter(path, adapter_state_dict(model), acfg, base=TINY, base_name="tiny", base_fingerprint=base.fingerprint,
                 prompt_template="alpaca")  # fmt: skip
    meta = weights.read_adapter_metadata(path)
    del meta["adapter_config"]["visual_positions"]
    save_file(weights.read_tensors(path), str(path), metadata={weights.META_KEY: json.dumps(meta)})
    loaded = read_adapter(path)
    assert loaded.config.visual_positions == 0 and loaded.config == acfg
    assert llama_adapter.load(adapter=path).model.adapter_config.visual_positions == 0
    assert AdapterConfig.official(TINY).visual_positions == 0  # the released checkpoints hold no such tensor


def test_our_adapter_on_the_wrong_base_is_refused(tiny_spm, tmp_path):
    base = load_base(write_hf_dir(random_hf_model("tiny"), tmp_path / "hf", tiny_spm))
    other = write_hf_dir(random_hf_model("tiny-tied"), tmp_path / "other", tiny_spm)
    acfg = AdapterConfig.paper(TINY, image_encoder=None)
    model = LlamaAdapter(TINY, acfg)
    path = save_adapter(
        tmp_path / "a.safetensors",
        adapter_state_dict(model),
        acfg,
        base=base.config,
        base_name=str(tmp_path / "hf"),
        base_fingerprint=base.fingerprint,
        prompt_template="chat",
    )
    with pytest.raises(CheckpointError, match="was trained on .*width 64.*width 48"):
        llama_adapter.load(base=other, adapter=path)


def test_gguf_to_folder_conversion_equals_transformers_reading_the_gguf(smol, smollm2_from_gguf, tmp_path, monkeypatch):
    """Our GGUF → Hugging Face folder conversion (q/k permuted back to transformers' layout), run
    afresh into a temporary cache: every tensor equals transformers' own reading of the GGUF, and
    the model loaded from the folder gives its logits."""
    gguf = weights._fetch_smollm2_gguf()
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / gguf.name).symlink_to(gguf)
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path))
    folder = weights.smollm2_dir()
    assert folder.parent == tmp_path  # converted here, not found in the user's cache

    expected = smollm2_from_gguf.state_dict()
    converted = weights.read_tensors(folder / "model.safetensors")
    assert set(converted) == set(expected) - {"lm_head.weight"}  # tied to the embeddings
    assert [key for key, tensor in converted.items() if not torch.equal(tensor, expected[key])] == []

    pipe = llama_adapter.load(folder, dtype="fp32")
    assert pipe.info["base_fingerprint"] == smol.info["base_fingerprint"]
    ids = torch.tensor([pipe.encode(pipe.render("Name three colours."))])
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(ids), smollm2_from_gguf(ids).logits, atol=1e-4, rtol=0)


def test_missing_and_unknown_inputs_say_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_base(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json"):
        load_base(tmp_path / "junk")
    with pytest.raises(CheckpointError, match="not bundled"):
        load_base("llama-7b")
    with pytest.raises(CheckpointError, match="Adapter 'NOPE-7B' not found"):
        load_adapter("NOPE-7B", TINY)


def test_missing_tokenizer_is_reported(tmp_path, tiny_spm):
    d = write_hf_dir(random_hf_model("tiny"), tmp_path / "hf", tiny_spm)
    (d / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="No tokenizer found"):
        load_base(d)


def test_base_with_a_missing_tensor_names_it(tmp_path, tiny_spm):
    d = write_hf_dir(random_hf_model("tiny"), tmp_path / "hf", tiny_spm)
    sd = weights.read_tensors(d / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1: layers\.1\.feed_forward\.w3\.base\.weight"):
        build_model(load_base(d), None)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_file({"x": torch.zeros(1000)}, str(path), metadata={"llama_adapter": json.dumps({"format": "x"})})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="Is the file complete"):
        read_adapter(path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Exploit(marker)}}, path)
    with pytest.raises(CheckpointError):
        load_adapter(path, TINY)
    assert not marker.exists()


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves bytes by path with Range support; can cut a response short once."""

    files: dict[str, bytes] = {}
    cut_after: int | None = None

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        chunk = body[start:]
        if _Files.cut_after is not None:
            chunk, _Files.cut_after = chunk[: _Files.cut_after], None
        self.wfile.write(chunk)

    def log_message(self, *args):
        pass


@pytest.fixture()
def file_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_download_checks_sha256_and_resumes(tmp_path, file_server):
    body = bytes(range(256)) * 4096
    _Files.files = {"/a.pth": body}
    good = hashlib.sha256(body).hexdigest()
    target = tmp_path / "cache" / "a.pth"
    with pytest.raises(CheckpointError, match="Checksum mismatch"):
        weights.download(f"{file_server}/a.pth", target, sha256="0" * 64)
    assert not target.exists() and not target.with_name("a.pth.part").exists()

    _Files.cut_after = 100_000  # the connection drops part-way
    with pytest.raises(CheckpointError, match="run again to resume"):
        weights.download(f"{file_server}/a.pth", target, sha256=good)
    part = target.with_name("a.pth.part")
    assert not target.exists() and 0 < part.stat().st_size < len(body)
    weights.download(f"{file_server}/a.pth", target, sha256=good)  # resumes from the .part file
    assert target.read_bytes() == body and not part.exists()


def test_official_adapter_on_llama2s_config_is_refused_naming_the_mismatch(tiny_spm, tmp_path):
    """LLaMA-2 7B has LLaMA-1's shapes (so every key check passes) but RMSNorm eps 1e-5 and a
    4,096 context: BIAS-7B, trained on LLaMA-1, is stopped before it loads, or loads with a
    warning when forced."""
    path = write_official(tmp_path / "tiny-BIAS.pth", official_tensors(lora=False), False)
    llama2 = dataclasses.replace(TINY_LLAMA1, name="llama-2-tiny", norm_eps=1e-5, max_seq_len=4096)
    sentence = (
        r"Adapter tiny-BIAS\.pth was trained on LLaMA-1 7B, but the base 'llama-2-tiny' has RMSNorm eps 1e-05 "
        r"\(trained with 1e-06\) and a 4,096-token context \(trained with 2,048\) — that is LLaMA-2's config: "
        r".*Load LLaMA-1 7B .* or pass force=True \(--force on the command line\)"
    )
    with pytest.raises(CheckpointError, match=sentence):
        load_adapter(path, llama2)
    with pytest.warns(UserWarning, match="LLaMA-2's config"):
        assert load_adapter(path, llama2, force=True).config.wiring == "official"
    assert load_adapter(path, TINY_LLAMA1).config.wiring == "official"  # LLaMA-1's config: no question

    # Through load() and the chat CLI, with a base folder holding LLaMA-2's config.json values.
    base = write_hf_dir(random_hf_model("tiny-llama1"), tmp_path / "llama-2-hf", tiny_spm)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}))
    with pytest.raises(CheckpointError, match="that is LLaMA-2's config"):
        llama_adapter.load(base=base, adapter=path, clip_weights=None)
    from llama_adapter.chat import main as chat

    assert chat(["--base", str(base), "--adapter", str(path), "--prompt", "Hi", "--max-new-tokens", "1"]) == 2
    with pytest.warns(UserWarning, match="LLaMA-2's config"):
        pipe = llama_adapter.load(base=base, adapter=path, clip_weights=None, force=True, dtype="fp32")
    assert pipe.model.config.norm_eps == 1e-5  # forced: the base stays as it is
