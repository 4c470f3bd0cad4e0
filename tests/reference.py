"""LLaMA-Adapter V2 computed by hand, for oracles: written from the paper and from the published
description of the released code (/work/shared/reference/official_facts.md §1), never from the
product. Slow and plain on purpose: one sequence, one head at a time, float64.

Conventions that both sources fix: RMSNorm ``x / sqrt(mean(x²) + eps) · w``; Meta's RoPE turns the
adjacent pair (2i, 2i+1) of a token at position m by m·θ^(−2i/D); a query head h reads key/value
head h // (heads / kv_heads); the adapter prompt has no position (no RoPE), its own softmax, and
is weighted per head by tanh(gate[h]).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor], torch.Tensor]

OFFICIAL_BIASED = ("wq", "wo", "w1", "w2", "w3")
"""The linears the released code gives a bias (``w_bias``); wk, wv and the output head have none."""


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``W(x ⊙ s) + b + B(A x)``: scale on the input channels as in the released bias-scale-norm
    code (official_facts.md §4), LoRA ``(A, B)`` with no scaling (§1)."""
    y = (x * scale if scale is not None else x) @ weight.T
    if bias is not None:
        y = y + bias
    if lora is not None:
        y = y + x @ lora[0].T @ lora[1].T
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_pairs(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's RoPE on ``x`` [S, heads, D], the tokens at positions 0..S-1."""
    s, _, d = x.shape
    angle = torch.arange(s, dtype=x.dtype)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


@dataclass
class Layer:
    """One block's tensors and linears (each a function, with whatever bias/scale/LoRA it has)."""

    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    w1: Linear
    w2: Linear
    w3: Linear
    prompt_wk: Linear  # the same frozen wk/wv for the prompt's keys and values, without LoRA
    prompt_wv: Linear
    gate: torch.Tensor | None = None  # [heads], raw (tanh is applied here)
    new_gate: torch.Tensor | float = 1.0  # the released LoRA models' extra factor on tanh(gate)
    prompt: torch.Tensor | None = None  # [P, dim], what the layer's adapter prompt is before any norm
    prompt_norm: bool = False  # the prompt passes through attention_norm first (our paper wiring)


@dataclass
class Shape:
    heads: int
    kv_heads: int
    eps: float
    theta: float


def attention(x: torch.Tensor, layer: Layer, shape: Shape) -> torch.Tensor:
    """One layer's attention for one sequence ``x`` [S, dim] (already through attention_norm)."""
    s, dim = x.shape
    d = dim // shape.heads
    q = rotate_pairs(layer.wq(x).view(s, shape.heads, d), shape.theta)
    k = rotate_pairs(layer.wk(x).view(s, shape.kv_heads, d), shape.theta)
    v = layer.wv(x).view(s, shape.kv_heads, d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    if layer.prompt is not None:
        prompt = rms_norm(layer.prompt, layer.attention_norm, shape.eps) if layer.prompt_norm else layer.prompt
        pk = layer.prompt_wk(prompt).view(len(prompt), shape.kv_heads, d)
        pv = layer.prompt_wv(prompt).view(len(prompt), shape.kv_heads, d)
    heads = []
    for h in range(shape.heads):
        g = h // (shape.heads // shape.kv_heads)
        scores = (q[:, h] @ k[:, g].T / math.sqrt(d)).masked_fill(~causal, float("-inf"))
        out = scores.softmax(-1) @ v[:, g]
        if layer.prompt is not None:
            prompt_scores = q[:, h] @ pk[:, g].T / math.sqrt(d)  # a softmax of its own, over the prompt only
            out = out + torch.tanh(layer.gate[h]) * layer.new_gate * (prompt_scores.softmax(-1) @ pv[:, g])
        heads.append(out)
    return layer.wo(torch.cat(heads, -1))


def llama_logits(
    ids: torch.Tensor,
    embeddings: torch.Tensor,
    layers: list[Layer],
    norm: torch.Tensor,
    output: torch.Tensor,
    shape: Shape,
) -> torch.Tensor:
    """Logits [S, vocab] of one sequence of token ids [S]: pre-norm blocks, SwiGLU FFN."""
    h = embeddings[ids]
    for layer in layers:
        h = h + attention(rms_norm(h, layer.attention_norm, shape.eps), layer, shape)
        x = rms_norm(h, layer.ffn_norm, shape.eps)
        h = h + layer.w2(F.silu(layer.w1(x)) * layer.w3(x))
    return rms_norm(h, norm, shape.eps) @ output.T


def timm_block(x: torch.Tensor, t: dict[str, torch.Tensor], prefix: str, heads: int) -> torch.Tensor:
    """timm's ViT ``Block`` (pre-norm, fused qkv with bias, exact GELU MLP) on ``x`` [N, C]."""
    n, c = x.shape
    d = c // heads
    y = F.layer_norm(x, (c,), t[prefix + "norm1.weight"], t[prefix + "norm1.bias"])
    q, k, v = linear(y, t[prefix + "attn.qkv.weight"], t[prefix + "attn.qkv.bias"]).view(n, 3, heads, d).unbind(1)
    attended = torch.stack([(q[:, h] @ k[:, h].T * d**-0.5).softmax(-1) @ v[:, h] for h in range(heads)], 1)
    x = x + linear(attended.reshape(n, c), t[prefix + "attn.proj.weight"], t[prefix + "attn.proj.bias"])
    y = F.layer_norm(x, (c,), t[prefix + "norm2.weight"], t[prefix + "norm2.bias"])
    y = F.gelu(linear(y, t[prefix + "mlp.fc1.weight"], t[prefix + "mlp.fc1.bias"]))
    return x + linear(y, t[prefix + "mlp.fc2.weight"], t[prefix + "mlp.fc2.bias"])


def official_visual_query(adapter: dict[str, torch.Tensor], clip_tokens: torch.Tensor) -> torch.Tensor:
    """``LLaMA_adapter.forward_visual`` on CLIP tokens [257, 768]: clip_proj → LayerNorm; the 10
    visual queries in front; the visual blocks (16 heads); the first 10 tokens → visual_proj →
    LayerNorm. Tensors under the release file's own names."""
    t = adapter
    x = linear(clip_tokens, t["clip_proj.weight"], t["clip_proj.bias"])
    x = F.layer_norm(x, x.shape[-1:], t["clip_proj_norm.weight"], t["clip_proj_norm.bias"])
    queries = t["visual_query.weight"]
    x = torch.cat([queries, x])
    blocks = len({k.split(".")[1] for k in t if k.startswith("visual_blocks.")})
    for b in range(blocks):
        x = timm_block(x, t, f"visual_blocks.{b}.", heads=16)
    x = linear(x[: len(queries)], t["visual_proj.weight"], t["visual_proj.bias"])
    return F.layer_norm(x, x.shape[-1:], t["visual_proj_norm.weight"], t["visual_proj_norm.bias"])


def _official_linear(
    a: dict[str, torch.Tensor], base: dict[str, torch.Tensor], prefix: str, name: str, group: str, lora: bool = True
) -> Linear:
    key = f"{prefix}{group}.{name}"
    bias = a[key + ".bias"] if name in OFFICIAL_BIASED else None
    lora_ab = (a.get(f"{prefix}{group}.lora_{name}_l1.weight"), a.get(f"{prefix}{group}.lora_{name}_l2.weight"))
    return lambda x: linear(x, base[key + ".weight"], bias, lora=lora_ab if lora and lora_ab[0] is not None else None)


def official_logits(
    base: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    ids: torch.Tensor,
    clip_tokens: torch.Tensor,
    shape: Shape,
) -> torch.Tensor:
    """The released multimodal 7B forward (official_facts.md §1), from a Meta base checkpoint and a
    release-format adapter, each under its own key names: bias on wq, wo, w1, w2, w3 only; no
    scale; LoRA (when the file has it) on all seven linears but not on the prompt's keys/values,
    whose gate is then ``tanh(gate) · new_gate``; the last ``len(adapter_query) / 10`` layers get
    their static prompt plus the visual query, fed raw (no norm); the adapter's norms replace the base's."""
    a = {k.removeprefix("llama."): v for k, v in adapter.items()}
    visual = official_visual_query(adapter, clip_tokens)
    n_layers = 1 + max(int(k.split(".")[1]) for k in base if k.startswith("layers."))
    prompts = a["adapter_query.weight"].view(-1, len(visual), visual.shape[-1])
    first_adapted = n_layers - len(prompts)
    layers = []
    for i in range(n_layers):
        p = f"layers.{i}."
        lin = functools.partial(_official_linear, a, base, p)
        adapted = i >= first_adapted
        layers.append(
            Layer(
                attention_norm=a.get(p + "attention_norm.weight", base[p + "attention_norm.weight"]),
                ffn_norm=a.get(p + "ffn_norm.weight", base[p + "ffn_norm.weight"]),
                wq=lin("wq", "attention"),
                wk=lin("wk", "attention"),
                wv=lin("wv", "attention"),
                wo=lin("wo", "attention"),
                w1=lin("w1", "feed_forward"),
                w2=lin("w2", "feed_forward"),
                w3=lin("w3", "feed_forward"),
                prompt_wk=lin("wk", "attention", lora=False),
                prompt_wv=lin("wv", "attention", lora=False),
                gate=a[p + "attention.gate"].flatten() if adapted else None,
                new_gate=a.get(p + "attention.new_gate", torch.ones(())).flatten()[0],
                prompt=prompts[i - first_adapted] + visual if adapted else None,
                prompt_norm=False,
            )
        )
    norm = a.get("norm.weight", base["norm.weight"])
    return llama_logits(ids, base["tok_embeddings.weight"], layers, norm, base["output.weight"], shape)
