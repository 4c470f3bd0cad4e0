"""8-bit weights as a separate pass that swaps the frozen base linears (adapter tensors stay in
full precision): bitsandbytes ``Linear8bitLt`` on CUDA, weight-only int8 on CPU."""

from __future__ import annotations

import torch
from torch import nn

from .model import AdapterLinear, LlamaAdapter


class Int8Linear(nn.Module):
    """Weight-only int8 with one scale per output row. On CPU the product runs in
    ``torch._weight_int8pack_mm`` with bfloat16 activations: measured fastest here (see
    ``benchmarks/generate.py``), ~2× less memory traffic than float32 weights."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]


def _bnb_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, threshold=6.0)
    q.weight = bnb.nn.Int8Params(
        linear.weight.detach().to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False
    )
    return q.to(linear.weight.device)


def quantize_model(model: LlamaAdapter, method: str = "int8") -> LlamaAdapter:
    """Swap the base linears of every block (and the output head) for 8-bit versions, in place."""
    if method != "int8":
        raise ValueError(f"Unknown quantization {method!r}; supported: 'int8'")
    on_cuda = model.tok_embeddings.weight.device.type == "cuda"
    make = _bnb_linear if on_cuda else Int8Linear
    for module in model.modules():
        if isinstance(module, AdapterLinear) and isinstance(module.base, nn.Linear):
            module.base = make(module.base)
    if isinstance(model.output, nn.Linear):
        model.output = make(model.output)
    return model
