"""LLaMA with LLaMA-Adapter V2: bias/scale tuning, gated adapter prompts and a visual branch.

One model serves both wirings of :class:`~llama_adapter.config.AdapterConfig`: ``official``
(loads the released BIAS-7B / LORA-BIAS-7B checkpoints exactly) and ``paper`` (early fusion).
Weights use Meta's layout: q/k rows interleave the two halves of each RoPE pair, so the
rotation below acts on adjacent pairs. Loaders convert other layouts to this one.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, LlamaConfig, RopeScaling

Phase = Literal["pretrain", "finetune", "joint"]
POSITION_STD = 0.02  # the visual position embedding's init, ViT's: at first the features, not their places, count


_prompt_tokens = threading.local()


@contextmanager
def computing_prompt_tokens() -> Iterator[None]:
    """Marks this thread's layer products as prompt tokens (prefill), not a decode step: kernels
    may then differ from a decode step's (:class:`~llama_adapter.quantize.Int8Linear`) without
    touching batch invariance, which only decode steps need."""
    outer = getattr(_prompt_tokens, "on", False)
    _prompt_tokens.on = True
    try:
        yield
    finally:
        _prompt_tokens.on = outer


def computes_prompt_tokens() -> bool:
    """Whether this thread is inside :func:`computing_prompt_tokens` (never in a compiled step)."""
    return not torch.compiler.is_compiling() and getattr(_prompt_tokens, "on", False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalise in float32, scale in the input's precision (as transformers does).
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight.to(x.dtype)


class AdapterLinear(nn.Module):
    """A frozen linear layer with Adapter V2's trainable extras: ``y = W(x ⊙ s) + b + B(A x)``.

    The scale ``s`` (init 1) acts on input channels and the bias ``b`` (init 0) on outputs, as in
    the released bias-scale-norm code (this is what makes the paper's 14M count); LoRA's ``B``
    starts at zero. With the defaults the layer equals the frozen ``base``.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, scale: bool, lora_rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features, bias=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.scale = nn.Parameter(torch.empty(in_features)) if scale else None
        self.lora_a = nn.Linear(in_features, lora_rank, bias=False) if lora_rank else None
        self.lora_b = nn.Linear(lora_rank, out_features, bias=False) if lora_rank else None
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """The identity adapter: bias 0, scale 1, LoRA's B = 0."""
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.scale is not None:
            nn.init.ones_(self.scale)
        if self.lora_a is not None:
            self.lora_a.reset_parameters()
            nn.init.zeros_(self.lora_b.weight)

    @classmethod
    def fused(cls, parts: list[AdapterLinear]) -> AdapterLinear:
        """One linear computing ``parts`` side by side (outputs concatenated), for inference: each
        input scale is folded into its weight, ``W(x ⊙ s) = (W diag(s)) x``; biases are joined."""
        if any(p.lora_a is not None for p in parts) or not all(isinstance(p.base, nn.Linear) for p in parts):
            raise ValueError("only float linears without LoRA can be fused")
        weights = [
            (p.base.weight.float() * p.scale).to(p.base.weight.dtype) if p.scale is not None else p.base.weight
            for p in parts
        ]
        with torch.device("meta"):
            fused = cls(
                parts[0].base.in_features, sum(w.shape[0] for w in weights), bias=False, scale=False, lora_rank=0
            )
        fused.base.weight = nn.Parameter(torch.cat(weights).detach(), requires_grad=False)
        if any(p.bias is not None for p in parts):
            biases = [
                p.bias if p.bias is not None else torch.zeros(w.shape[0], device=w.device)
                for p, w in zip(parts, weights)
            ]
            # Stored in the compute dtype: no cast per call (the int8 path computes in float32).
            fused.bias = nn.Parameter(torch.cat(biases).detach().to(weights[0].dtype), requires_grad=False)
        return fused

    def forward(self, x: torch.Tensor, use_lora: bool = True) -> torch.Tensor:
        h = x * self.scale.to(x.dtype) if self.scale is not None else x
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if isinstance(self.base, nn.Linear):
            y = F.linear(h, self.base.weight, bias)  # the bias add fused into the matmul
        else:  # a quantized base
            y = self.base(h)
            if bias is not None:
                y = y + bias.to(y.dtype)
        if use_lora and self.lora_a is not None:
            y = y + self.lora_b(self.lora_a(x.to(self.lora_a.weight.dtype))).to(y.dtype)
        return y


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None, seq_len: int | None = None
) -> torch.Tensor:
    """RoPE's angular frequencies θ_k = theta^(-2k/head_dim), [head_dim // 2], with ``scaling``
    applied as transformers defines it. ``seq_len`` matters only to ``dynamic`` scaling: the
    length of the sequence being computed (its largest position + 1)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    if scaling is None:
        return 1.0 / (theta**exponents)
    if scaling.type == "dynamic":
        # NTK-aware: past the original context, a larger base spreads the same rotations over more positions.
        length = max(seq_len or 0, scaling.original_context)
        grown = scaling.factor * length / scaling.original_context - (scaling.factor - 1)
        return 1.0 / ((theta * grown ** (head_dim / (head_dim - 2))) ** exponents)
    inv_freq = 1.0 / (theta**exponents)
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths longer than original/low_freq_factor are slowed by ``factor``, shorter
    # than original/high_freq_factor kept, and those between interpolated smoothly.
    wavelength = 2 * math.pi / inv_freq
    ratio = scaling.original_context / wavelength
    smooth = (ratio - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(
        wavelength > scaling.original_context / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq
    )
    between = (wavelength >= scaling.original_context / scaling.high_freq_factor) & (
        wavelength <= scaling.original_context / scaling.low_freq_factor
    )
    return torch.where(between, interpolated, scaled)


def rope_frequencies(
    head_dim: int, max_len: int, theta: float, scaling: RopeScaling | None = None, seq_len: int | None = None
) -> torch.Tensor:
    """Complex rotations e^{i·pos·θ_k} for positions 0..max_len-1, [max_len, head_dim // 2]."""
    inv_freq = rope_inverse_frequencies(head_dim, theta, scaling, seq_len)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` [B, S, H, D] by ``freqs`` [B, S, D/2] (Meta's layout)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(3).type_as(x)


@dataclass
class AttentionMask:
    """How tokens of one forward call may attend: a boolean mask, or plain causal, or everything."""

    mask: torch.Tensor | None  # [B, 1, S, T], True = may attend
    is_causal: bool


def attend_one_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row (q [B, H, 1, D]) over keys and values [B, KV heads, T, D]
    under a boolean ``mask`` [B, 1, 1, T], the query heads that share a key head taken as rows of
    one product.

    Written out rather than through SDPA so that a row's result does not depend on the rows beside
    it: on two threads SDPA's CPU kernel divides the work by the batch's size, and a decode step's
    rows changed in the last bits with the batch (83 of 120 random cases differed, against 0 of 840
    here, whatever the rows and the cache's capacity), so a greedy answer could differ alone and
    in a batch."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(b, kv_heads, h // kv_heads, d)
    scores = grouped @ k.transpose(-1, -2) * d**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(b, 1, 1, -1), float("-inf"))
    return (scores.softmax(-1) @ v).reshape(b, h, 1, d)


class KVCache:
    """Keys and values of the tokens seen so far, for every layer; grows on demand.

    Attention reads the whole buffers (``capacity`` positions) under a mask built from
    ``key_valid``, which marks the real positions (not left padding, not yet written), so a decode
    step has the same shapes at every position (what lets :meth:`LlamaAdapter.compile_decoding`
    compile it once). ``next_position`` is each row's next RoPE position; ``prompt_kv`` holds the
    adapter prompts' keys/values, computed once.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, device, dtype) -> None:
        self.shape = (batch, n_kv_heads, 0, head_dim)
        self.device, self.dtype = device, dtype
        self.keys = [torch.empty(self.shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.empty(self.shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.key_valid = torch.empty(batch, 0, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.write_at = torch.empty(0, dtype=torch.long, device=device)  # buffer positions of the new tokens
        self.length = 0
        self.prompt_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.prompts_ready = False  # prompt_kv is complete: later steps skip building the prompts

    @property
    def capacity(self) -> int:
        return self.key_valid.shape[1]

    def reserve(self, new_tokens: int) -> None:
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, 64)
        b, h, _, d = self.shape
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                # Zeros, not garbage: masked positions still enter the product, weighted 0 (and 0 × NaN is NaN).
                grown = torch.zeros((b, h, capacity, d), device=self.device, dtype=self.dtype)
                grown[:, :, : self.length] = old[:, :, : self.length]
                store[i] = grown
        valid = torch.zeros(b, capacity, dtype=torch.bool, device=self.device)
        valid[:, : self.length] = self.key_valid[:, : self.length]
        self.key_valid = valid

    def append_valid(self, n: int, valid: torch.Tensor | None) -> torch.Tensor:
        """Record the validity [B, n] of ``n`` new tokens (``None``: all real); returns the
        validity of every buffer position [B, capacity]."""
        self.reserve(n)
        self.write_at = torch.arange(self.length, self.length + n, device=self.device)
        if valid is None:
            self.key_valid[:, self.length : self.length + n] = True
            self.next_position += n
        else:
            self.key_valid[:, self.length : self.length + n] = valid
            self.next_position += valid.sum(1)
        return self.key_valid

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys and values at ``write_at``; returns the whole buffers."""
        self.keys[layer].index_copy_(2, self.write_at, k)
        self.values[layer].index_copy_(2, self.write_at, v)
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        self.length += n

    def mark_length_dynamic(self) -> None:
        """Tell ``torch.compile`` that the buffers' length varies, before the call that compiles a
        decode step through this cache: one graph then serves every length as the cache grows."""
        from torch._dynamo import mark_dynamic

        for buffer in (*self.keys, *self.values):
            mark_dynamic(buffer, 2)
        mark_dynamic(self.key_valid, 1)

    def copy_into(self, target: KVCache) -> None:
        """Make the empty batch-1 ``target`` hold this batch-1 cache's tokens (and share its
        adapter prompts' keys and values, which nobody writes into once computed)."""
        n = self.length
        target.reserve(n)
        for store, source in ((target.keys, self.keys), (target.values, self.values)):
            for dst, src in zip(store, source):
                dst[:, :, :n] = src[:, :, :n]
        target.key_valid[:, :n] = self.key_valid[:, :n]
        target.next_position = self.next_position.clone()
        target.length = n
        target.prompt_kv = list(self.prompt_kv)
        target.prompts_ready = self.prompts_ready

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens (to reuse a shared prefix)."""
        if length > self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
        with torch.inference_mode():  # the buffers were made in inference mode, by decoding
            self.key_valid[:, length:] = False
        self.next_position = self.key_valid[:, :length].sum(1)


class Recorder(Protocol):
    """Looks inside a forward pass (``record=`` of :meth:`LlamaAdapter.forward`; see
    :mod:`llama_adapter.explain`). ``None`` in the normal path, which then does no extra work."""

    def adapter_attention(self, layer_id: int, tokens: torch.Tensor, prompt: torch.Tensor) -> None:
        """A gated layer's per-head attention outputs [B, H, S, D] before ``wo``: over the tokens,
        and over its adapter prompt (gated), whose sum the layer uses."""

    def visual_attention(self, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """A visual block's per-head queries and keys [B, H, N, D] (the visual queries first)."""


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig, gated: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

        def linear(name: str, i: int, o: int) -> AdapterLinear:
            return AdapterLinear(i, o, bias=name in acfg.bias_targets, scale=acfg.scale, lora_rank=acfg.lora_rank)

        self.wq = linear("wq", cfg.dim, q_out)
        self.wk = linear("wk", cfg.dim, kv_out)
        self.wv = linear("wv", cfg.dim, kv_out)
        self.wo = linear("wo", q_out, cfg.dim)
        self.split = (q_out, kv_out, kv_out)
        self.wqkv: AdapterLinear | None = None  # wq, wk, wv in one matmul (inference; see fuse())
        self.gate = nn.Parameter(torch.empty(1, cfg.n_heads, 1, 1)) if gated else None
        self.new_gate = nn.Parameter(torch.empty(1, 1, 1, 1)) if gated and acfg.new_gate else None
        self.reset_adapter()

    def reset_adapter(self) -> None:
        # Per-head gate, zero-init: through tanh, an untrained adapter contributes exactly nothing.
        if self.gate is not None:
            nn.init.zeros_(self.gate)
        if self.new_gate is not None:
            nn.init.ones_(self.new_gate)

    def fuse(self) -> None:
        """Replace wq, wk, wv by one fused linear (inference only: the adapter stops being trainable)."""
        self.wqkv = AdapterLinear.fused([self.wq, self.wk, self.wv])
        del self.wq, self.wk, self.wv

    def qkv(self, x: torch.Tensor, use_lora: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.wqkv is not None:
            return self.wqkv(x).split(self.split, dim=-1)
        return self.wq(x, use_lora), self.wk(x, use_lora), self.wv(x, use_lora)

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        mask: AttentionMask,
        prompt: torch.Tensor | None,
        cache: KVCache | None,
        layer_id: int,
        prompt_norm: RMSNorm | None = None,
        record: Recorder | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x)
        q = apply_rope(q.view(b, s, self.n_heads, self.head_dim), freqs).transpose(1, 2)
        k = apply_rope(k.view(b, s, self.n_kv_heads, self.head_dim), freqs).transpose(1, 2)
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer_id, k, v)
        if s == 1 and not mask.is_causal:
            out = attend_one_token(q, k, v, mask.mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal, enable_gqa=self.n_kv_heads != self.n_heads
            )
        if self.gate is not None:
            kv = self._prompt_kv(prompt, cache, layer_id, prompt_norm, q.dtype)
            if kv is not None:
                prompted = self._prompt_attention(q, *kv)
                if record is not None:
                    record.adapter_attention(layer_id, out, prompted)
                out = out + prompted
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

    def _prompt_kv(
        self,
        prompt: torch.Tensor | None,
        cache: KVCache | None,
        layer_id: int,
        prompt_norm: RMSNorm | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values of this layer's adapter prompt (from the cache once computed).

        They come from the frozen wk/wv (with bias/scale, without LoRA), with no RoPE."""
        if cache is not None and cache.prompt_kv[layer_id] is not None:
            return cache.prompt_kv[layer_id]
        if prompt is None:
            return None
        b, p, _ = prompt.shape
        prompt = prompt.to(dtype)
        if prompt_norm is not None:
            prompt = prompt_norm(prompt)
        _, pk, pv = self.qkv(prompt, use_lora=False)
        pk = pk.reshape(b, p, self.n_kv_heads, self.head_dim).transpose(1, 2)
        pv = pv.reshape(b, p, self.n_kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.n_heads // self.n_kv_heads
        kv = (pk.repeat_interleave(repeat, 1), pv.repeat_interleave(repeat, 1))
        if cache is not None:
            cache.prompt_kv[layer_id] = kv
        return kv

    def _prompt_attention(self, q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
        """Attention over the adapter prompt, with its own softmax, scaled per head by tanh(gate).
        Through SDPA: over the prompt's few keys, unmasked, its rows measured batch-invariant (0 of
        320 random cases differed), unlike a decode step's attention over the cache
        (:func:`attend_one_token`)."""
        gate = self.gate.tanh()
        if self.new_gate is not None:
            gate = gate * self.new_gate
        return F.scaled_dot_product_attention(q, pk, pv) * gate.to(q.dtype)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig) -> None:
        super().__init__()

        def linear(name: str, i: int, o: int) -> AdapterLinear:
            return AdapterLinear(i, o, bias=name in acfg.bias_targets, scale=acfg.scale, lora_rank=acfg.lora_rank)

        self.w1 = linear("w1", cfg.dim, cfg.hidden_dim)
        self.w2 = linear("w2", cfg.hidden_dim, cfg.dim)
        self.w3 = linear("w3", cfg.dim, cfg.hidden_dim)
        self.w13: AdapterLinear | None = None  # w1 and w3 in one matmul (inference; see fuse())

    def fuse(self) -> None:
        self.w13 = AdapterLinear.fused([self.w1, self.w3])
        del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig, gated: bool) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, acfg, gated)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg, acfg)
        self.prompt_norm = acfg.prompt_norm

    def forward(self, x, freqs, mask, prompt, cache, layer_id, record: Recorder | None = None) -> torch.Tensor:
        prompt_norm = self.attention_norm if self.prompt_norm else None
        h = x + self.attention(self.attention_norm(x), freqs, mask, prompt, cache, layer_id, prompt_norm, record)
        return h + self.feed_forward(self.ffn_norm(h))


class VisualBlock(nn.Module):
    """A pre-norm ViT block (timm ``Block`` layout and names, as the official checkpoints use)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor, record: Recorder | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if record is not None:
            record.visual_attention(qkv[0], qkv[1])
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.attn.proj(attended.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class LlamaAdapter(nn.Module):
    """LLaMA + Adapter V2. ``forward(input_ids)`` returns logits [B, S, vocab].

    The frozen image encoder is optional: pass ``image_encoder`` to accept images, or give
    encoder features / a ready visual prompt directly.
    """

    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig, image_encoder: nn.Module | None = None) -> None:
        super().__init__()
        acfg.check(cfg)
        self.config, self.adapter_config = cfg, acfg
        n = cfg.n_layers
        self.prompt_layers = list(acfg.prompt_layer_ids(n))
        self.visual_layers = list(acfg.visual_layer_ids(n))
        gated = set(acfg.gated_layer_ids(n))

        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, acfg, i in gated) for i in range(n))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope", self._rope_table(), persistent=False)

        self.adapter_query = nn.Embedding(len(self.prompt_layers) * acfg.prompt_len, cfg.dim)
        if acfg.image_encoder is not None:
            vd = acfg.visual_dim
            self.clip_proj = nn.Linear(acfg.encoder_dim, vd)
            self.clip_proj_norm = nn.LayerNorm(vd)
            self.visual_query = nn.Embedding(acfg.prompt_len, vd)
            if acfg.visual_positions:
                self.visual_positions = nn.Embedding(acfg.visual_positions, vd)
                nn.init.normal_(self.visual_positions.weight, std=POSITION_STD)
            self.visual_blocks = nn.ModuleList(
                VisualBlock(vd, acfg.visual_heads, acfg.visual_mlp_ratio) for _ in range(acfg.visual_depth)
            )
            self.visual_proj = nn.Linear(vd, cfg.dim)
            self.visual_proj_norm = nn.LayerNorm(cfg.dim)
        self.image_encoder = image_encoder
        self.fused = False

    def _rope_table(self) -> torch.Tensor:
        cfg = self.config
        return rope_frequencies(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)

    def rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE rotations [B, S, head_dim // 2] at ``positions`` [B, S].

        With ``dynamic`` scaling they depend on the length of what is computed: a call whose
        largest position reaches past the original context uses frequencies for its own length
        (largest position + 1), as transformers computes a call on a freshly loaded model. Keys
        already in the cache keep the rotation they were written with, as in transformers.
        (transformers' rotary module also remembers the longest length it has seen and keeps
        using it for later, shorter calls past the original context; this model does not carry
        state from one call to the next.)"""
        scaling = self.config.rope_scaling
        if scaling is not None and scaling.type == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > scaling.original_context:
                cfg = self.config
                inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, scaling, seq_len)
                angles = positions.unsqueeze(-1).float() * inv_freq.to(positions.device)
                return torch.polar(torch.ones_like(angles), angles)
        return self.rope[positions]

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_adapter(self) -> None:
        """Initialise every adapter tensor as a fresh, untrained adapter (norms are left alone:
        they start as the base model's)."""
        for module in self.modules():
            if isinstance(module, (AdapterLinear, Attention)):
                module.reset_adapter()
        self.adapter_query.reset_parameters()
        for name in VISUAL_MODULES:
            if hasattr(self, name):
                for module in getattr(self, name).modules():
                    if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
                        module.reset_parameters()
        if hasattr(self, "visual_positions"):
            nn.init.normal_(self.visual_positions.weight, std=POSITION_STD)

    def fuse(self) -> None:
        """For inference: compute q, k, v in one matmul and w1, w3 in another, with the input
        scales folded into the weights. Same outputs (up to float rounding), fewer and larger
        matmuls. Biases and norms move to the base's dtype. Skipped with LoRA (the adapter prompts'
        keys must not see it). Afterwards the adapter tensors are merged, so the model is no longer
        trainable or savable as an adapter."""
        if self.adapter_config.lora_rank:
            return
        dtype = self.tok_embeddings.weight.dtype
        with torch.no_grad():
            for layer in self.layers:
                layer.attention.fuse()
                layer.feed_forward.fuse()
                for norm in (layer.attention_norm, layer.ffn_norm):
                    norm.weight.data = norm.weight.data.to(dtype)  # no cast per call in half precision
            self.norm.weight.data = self.norm.weight.data.to(dtype)
        self.requires_grad_(False)
        self.fused = True

    def materialize(self, device: torch.device | str = "cpu") -> None:
        """After reading a base checkpoint into a model built on the meta device (``assign=True``):
        give the tensors still on meta real storage and initialise them as a fresh adapter."""
        for module in self.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    setattr(module, name, nn.Parameter(torch.empty_like(p, device=device), p.requires_grad))
        self.tie_weights()
        self.rope = self._rope_table().to(device)
        self.reset_adapter()

    # -- visual branch -------------------------------------------------------------------------

    def encode_image(
        self,
        images: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        record: Recorder | None = None,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] (or encoder features [B, N, C]) → visual prompt [B, prompt_len, dim]."""
        if self.adapter_config.image_encoder is None:
            raise ValueError("This model has no visual branch (adapter config image_encoder=None)")
        if features is None:
            if self.image_encoder is None:
                raise ValueError("No image encoder is attached; pass features=... or build with an encoder")
            with torch.no_grad():
                features = self.image_encoder(images)
        x = self.clip_proj_norm(self.clip_proj(features.float()))
        if hasattr(self, "visual_positions"):
            if x.shape[1] != self.adapter_config.visual_positions:
                raise ValueError(
                    f"The encoder gave {x.shape[1]} tokens; this adapter has position embeddings for "
                    f"{self.adapter_config.visual_positions} (adapter config visual_positions)"
                )
            x = x + self.visual_positions.weight.float()
        queries = self.visual_query.weight.float().unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([queries, x], dim=1)
        for block in self.visual_blocks:
            x = block(x, record)
        x = x[:, : self.adapter_config.prompt_len]
        return self.visual_proj_norm(self.visual_proj(x))

    def layer_prompts(self, visual_prompt: torch.Tensor | None, batch: int) -> list[torch.Tensor | None]:
        """The adapter prompt each layer attends to: its static prompt, plus the visual prompt
        in fusion layers; ``None`` for layers without one."""
        p = self.adapter_config.prompt_len
        prompts: list[torch.Tensor | None] = [None] * self.config.n_layers
        static = self.adapter_query.weight.view(len(self.prompt_layers), p, self.config.dim)
        for j, layer in enumerate(self.prompt_layers):
            prompts[layer] = static[j].unsqueeze(0).expand(batch, -1, -1)
        if visual_prompt is not None:
            for layer in self.visual_layers:
                prompts[layer] = visual_prompt if prompts[layer] is None else prompts[layer] + visual_prompt
        return prompts

    # -- language model ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        *,
        visual_prompt: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
        record: Recorder | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, vocab]; [B, 1, vocab] with ``last_only`` (generation); [N, vocab] at the
        N positions of a boolean ``logits_at`` [B, S] (training: the head over the vocabulary
        is the largest matmul, so it runs only where a loss is taken).

        ``attention_mask`` [B, S] marks real tokens (0 = left padding). With a ``cache`` the
        tokens continue the cached sequence and their keys/values are appended to it. A ``record``
        sees inside the adapter layers and visual blocks (a one-token step then runs eager). Inside
        :func:`computing_prompt_tokens` one token is a prompt's (the engine's prefill thread), never
        a :meth:`decode_step`.
        """
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + s > self.config.max_seq_len:
            raise ValueError(f"Sequence longer than the model's context ({self.config.max_seq_len} tokens)")
        if images is not None and visual_prompt is None:
            visual_prompt = self.encode_image(images, record=record)
        one_step = cache is not None and cache.prompts_ready and s == 1 and attention_mask is None
        if one_step and record is None and not computes_prompt_tokens():
            freqs = self.rotations(cache.next_position.unsqueeze(1))
            cache.append_valid(1, None)
            logits = self.decode_step(self.tok_embeddings(input_ids), freqs, cache)
            cache.advance(1)
            return logits
        positions, mask = self._positions_and_mask(input_ids, attention_mask, cache)
        freqs = self.rotations(positions)
        if cache is not None and cache.prompts_ready:
            prompts: list[torch.Tensor | None] = [None] * self.config.n_layers  # their keys/values are cached
        else:
            prompts = self.layer_prompts(visual_prompt, b)

        h = self.tok_embeddings(input_ids)
        with computing_prompt_tokens():
            for i, layer in enumerate(self.layers):
                h = layer(h, freqs, mask, prompts[i], cache, i, record)
        if cache is not None:
            cache.advance(s)
            if not cache.prompts_ready:
                self._cache_absent_visual_prompts(cache)
                cache.prompts_ready = True
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = h[logits_at]
        return self.output(self.norm(h))

    def _cache_absent_visual_prompts(self, cache: KVCache) -> None:
        """Zero keys and values for the layers that only an image prompts, when there is none.
        They add exactly nothing (uniform weights on zero values), and keep a decode step the same
        graph with and without an image."""
        b, _, _, d = cache.shape
        shape = (b, self.config.n_heads, self.adapter_config.prompt_len, d)
        for i in self.visual_layers:
            if cache.prompt_kv[i] is None:
                keys = torch.zeros(shape, device=cache.device, dtype=cache.dtype)
                # Not the same tensor twice: the compiled step's guards tell aliased inputs apart.
                cache.prompt_kv[i] = (keys, torch.zeros_like(keys))

    def decode_step(self, h: torch.Tensor, freqs: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, 1, vocab] of one new token per row, from its embedding ``h`` [B, 1, dim] with
        RoPE rotations ``freqs`` [B, 1, head_dim // 2], its place in the cache already reserved and every adapter
        prompt's keys and values cached. Its shapes are the same at every step (the cache is read
        whole, its unwritten positions masked), so :meth:`compile_decoding` can compile it once."""
        mask = AttentionMask(cache.key_valid[:, None, None, :], is_causal=False)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, mask, None, cache, i)
        return self.output(self.norm(h))

    def compile_decoding(self, warm_up: bool = True) -> None:
        """Replace :meth:`decode_step` by its ``torch.compile`` version (inductor; on CPU with the
        C++ wrapper, which removes the per-kernel Python overhead that dominates one-token steps)
        and compile it now for a batch of one (``warm_up=False``: at its first call), with the
        cache length dynamic so that one graph serves every length. Costs ~1-3 min of compiling
        on a small CPU the first time, seconds afterwards (inductor caches on disk). A batch of
        another size compiles once more. Prefill stays eager."""
        if self.training:
            raise ValueError("compile_decoding is for inference: call model.eval() first")
        eager_only = {type(m).__name__ for m in self.modules() if not getattr(m, "compiles", True)}
        if eager_only:
            raise RuntimeError(f"{', '.join(sorted(eager_only))} decodes eager only")
        options = {"cpp_wrapper": True} if self.tok_embeddings.weight.device.type == "cpu" else None
        self.decode_step = torch.compile(self.decode_step, fullgraph=True, options=options)
        if not warm_up:
            return
        try:
            with torch.inference_mode():
                cache = self.new_cache(1)
                first = torch.zeros(1, 1, dtype=torch.long, device=cache.device)
                self(first, cache=cache)
                cache.mark_length_dynamic()
                self(first, cache=cache)
        except Exception:
            del self.decode_step  # back to the eager method
            raise

    def _positions_and_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[torch.Tensor, AttentionMask]:
        """RoPE positions [B, S] (left padding does not count) and the attention mask; with a
        cache, over all its buffer positions."""
        b, s = input_ids.shape
        device = input_ids.device
        past = cache.length if cache is not None else 0
        start = cache.next_position.unsqueeze(1) if cache is not None else 0
        valid = attention_mask.bool() if attention_mask is not None else None
        if valid is None:
            positions = start + torch.arange(s, device=device).expand(b, s)
        else:
            positions = start + (valid.long().cumsum(1) - 1).clamp(min=0)
        key_valid = cache.append_valid(s, valid) if cache is not None else valid

        if past == 0 and (valid is None or bool(valid.all())):
            # Query i attends keys 0..i; the cache's unwritten positions lie beyond every query.
            return positions, AttentionMask(None, is_causal=s > 1 or cache is not None)
        q_pos = torch.arange(past, past + s, device=device).unsqueeze(1)
        k_pos = torch.arange(key_valid.shape[1], device=device).unsqueeze(0)
        allowed = (k_pos <= q_pos).unsqueeze(0) & key_valid.unsqueeze(1)
        # A padding query attends to itself, so no row is fully masked (which would give NaN).
        allowed |= (k_pos == q_pos).unsqueeze(0)
        return positions, AttentionMask(allowed.unsqueeze(1), is_causal=False)

    def new_cache(self, batch: int = 1) -> KVCache:
        ref = self.tok_embeddings.weight
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
        return KVCache(self.config.n_layers, batch, self.config.n_kv_heads, self.config.head_dim, ref.device, dtype)


# -- parameter groups ----------------------------------------------------------------------------

VISUAL_MODULES = (
    "clip_proj",
    "clip_proj_norm",
    "visual_query",
    "visual_positions",
    "visual_blocks",
    "visual_proj",
    "visual_proj_norm",
)


def parameter_group(model: LlamaAdapter, name: str) -> str | None:
    """``"pretrain"``, ``"finetune"``, or ``None`` (frozen) for a parameter name of ``model``.

    ``paper`` wiring (the paper's joint training): image-text data trains the visual branch and
    the gates of the visual (early) layers; instruction data trains the static prompts, the
    other gates, bias, scale, norms and LoRA. ``official`` wiring reproduces the released code:
    pretrain = visual branch + static prompts + every gate; finetune = bias + norms (+ scale, LoRA).
    """
    parts = name.split(".")
    top = parts[0]
    if top in ("tok_embeddings", "output", "image_encoder") or parts[-2:] == ["base", "weight"]:
        return None
    if top in VISUAL_MODULES:
        return "pretrain"
    if top == "adapter_query":
        return "pretrain" if model.adapter_config.wiring == "official" else "finetune"
    if parts[-1] in ("gate", "new_gate"):
        if model.adapter_config.wiring == "official":
            return "pretrain"
        return "pretrain" if int(parts[1]) in model.visual_layers else "finetune"
    if parts[-1] in ("bias", "scale") or "lora_a" in parts or "lora_b" in parts or name.endswith("norm.weight"):
        return "finetune"
    raise ValueError(f"Parameter {name!r} has no training group")


def parameter_groups(model: LlamaAdapter) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The two disjoint groups of trainable parameters: ``{"pretrain": [...], "finetune": [...]}``."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"pretrain": [], "finetune": []}
    for name, param in model.named_parameters(remove_duplicate=True):
        group = parameter_group(model, name)
        if group is not None:
            groups[group].append((name, param))
    return groups


def trainable_parameters(model: LlamaAdapter, phase: Phase) -> list[tuple[str, nn.Parameter]]:
    """Parameters a phase trains; ``joint`` is the union of the two disjoint groups."""
    groups = parameter_groups(model)
    if phase == "joint":
        return groups["pretrain"] + groups["finetune"]
    if phase not in groups:
        raise ValueError(f"phase must be 'pretrain', 'finetune' or 'joint', got {phase!r}")
    return groups[phase]


def count_parameters(model: LlamaAdapter) -> dict[str, int]:
    """Element counts of each group, of all adapter tensors, and of the frozen base."""
    groups = parameter_groups(model)
    counts = {g: sum(p.numel() for _, p in params) for g, params in groups.items()}
    counts["adapter"] = counts["pretrain"] + counts["finetune"]
    counts["base"] = sum(
        p.numel() for n, p in model.named_parameters() if parameter_group(model, n) is None and "image_encoder" not in n
    )
    return counts


def adapter_state_dict(model: LlamaAdapter) -> dict[str, torch.Tensor]:
    """Every adapter tensor (both groups), i.e. what an adapter file stores."""
    if model.fused:
        raise ValueError("This model was fused for inference; its adapter tensors are merged. Load it unfused.")
    return {n: p.detach() for n, p in model.named_parameters() if parameter_group(model, n) is not None}


def set_trainable(model: LlamaAdapter, phase: Phase) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything but ``phase``'s parameters; returns them."""
    model.requires_grad_(False)
    params = trainable_parameters(model, phase)
    for _, p in params:
        p.requires_grad_(True)
    return params
