"""Passes that swap the frozen base linears for faster inference (adapter tensors stay in full
precision): 8-bit weights (bitsandbytes ``Linear8bitLt`` on CUDA, weight-only int8 on CPU), 4-bit
weights on CPU, half-precision weights packed once for oneDNN on CPU, and float32 weights whose
decode products run in the project's own CPU kernel (:mod:`llama_adapter.kernels`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import decode_kernels_available
from .model import AdapterLinear, LlamaAdapter, computes_prompt_tokens

PROMPT_ROWS = 4
"""From this many rows, prompt tokens multiply by :class:`Int8Linear`'s bfloat16 copy or
:class:`Float32Linear`'s ``F.linear`` (fewer are faster through the decode kernels)."""


def _prompt_rows(rows: torch.Tensor) -> bool:
    """Whether ``rows`` are prompt tokens enough to take the many-row product."""
    return rows.shape[0] >= PROMPT_ROWS and computes_prompt_tokens()


class _RowsLinear(nn.Module):
    """A CPU kernel linear computing on 2-D rows: inputs of any leading shape in, the same shape and
    dtype out."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(_RowsLinear):
    """Weight-only int8 with one scale per output row, on CPU: ~2× less memory traffic per token
    than float32 weights. Decode steps multiply in the project's kernel
    (:mod:`llama_adapter.kernels`: float32 activations, each row summed alone, so bitwise the same in
    any batch), else in ``torch._weight_int8pack_mm`` with bfloat16 activations (~2× slower at one to
    eight rows here, see ``benchmarks/generate.py``).

    With ``prompt_copy``, prompt tokens (:func:`~llama_adapter.model.computing_prompt_tokens`,
    :data:`PROMPT_ROWS` rows or more) multiply by a bfloat16 copy of the dequantized weight packed
    for oneDNN instead: 2.3× faster than the int8 kernel at 32 rows here, for 2 more bytes per
    weight. Decode steps stay on the int8 kernel whatever their rows."""

    def __init__(self, linear: nn.Linear, prompt_copy: bool = False) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.prompt_linear = PackedLinear(self.dequantized().to(torch.bfloat16)) if prompt_copy else None
        self.own_kernel = decode_kernels_available()

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        if self.prompt_linear is not None and _prompt_rows(rows):
            return self.prompt_linear(rows.to(torch.bfloat16))
        if self.own_kernel and rows.dtype == torch.float32:
            return torch.ops.llama_adapter.int8_linear(rows.contiguous(), self.weight_int8, self.scales)
        return torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight_int8, self.scales)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]


class Float32Linear(_RowsLinear):
    """A float32 base linear for CPU inference whose decode products run in the project's kernel
    (:mod:`llama_adapter.kernels`), which reads the weights ~2.5× faster than MKL's one-row product
    here and gives each row bitwise the same result in any batch; prompt tokens
    (:func:`~llama_adapter.model.computing_prompt_tokens`, :data:`PROMPT_ROWS` rows or more) stay on
    ``F.linear``, faster for many rows. The same weight tensor, not a copy."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        # The kernel has no backward: a product that needs a gradient (training or explaining
        # through a loaded pipeline) goes through F.linear.
        needs_grad = torch.is_grad_enabled() and (rows.requires_grad or self.weight.requires_grad)
        if needs_grad or _prompt_rows(rows):
            return F.linear(rows, self.weight)
        return torch.ops.llama_adapter.float_linear(rows.contiguous(), self.weight)


class Int4Linear(_RowsLinear):
    """Weight-only 4-bit integers, asymmetric, one scale and offset per ``group`` input columns of
    each output row (the layout of ``torch._weight_int4pack_mm_for_cpu``, which computes with
    bfloat16 activations): w ≈ (q - 8) · scale + offset, q in 0..15. CPU only; half int8's bytes
    per token, at a cost in quality measured in the README (Generation speed)."""

    group = 32
    # Compiled, its kernel recompiled at every batch size until dynamo's limit failed the answer.
    compiles = False

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % self.group or self.out_features % 16:
            raise ValueError(
                f"int4 needs input widths divisible by {self.group} and output widths by 16; this linear is "
                f"{self.in_features} → {self.out_features}: use int8"
            )
        groups = linear.weight.detach().float().reshape(self.out_features, -1, self.group)
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-12)
        levels = torch.round((groups - low) / scales).clamp(0, 15).to(torch.int32)
        offsets = low + 8 * scales
        self.register_buffer(
            "packed", torch._convert_weight_to_int4pack_for_cpu(levels.reshape(self.out_features, -1), 1)
        )
        # [input groups, outputs, (scale, offset)]
        pairs = torch.stack([scales.squeeze(-1), offsets.squeeze(-1)], dim=-1).transpose(0, 1)
        self.register_buffer("scales_and_offsets", pairs.contiguous().to(torch.bfloat16))

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(
            rows.to(torch.bfloat16), self.packed, self.group, self.scales_and_offsets
        )


class PackedLinear(nn.Module):
    """A half-precision linear whose weight oneDNN has reordered once into its blocked layout.
    Plain ``F.linear`` in bfloat16 on CPU runs ~1.5× slower at batch 1 here (see
    ``benchmarks/generate.py``); the packed weight is opaque, so this is for inference only."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`pack_linears` applies: half-precision base weights on a CPU whose oneDNN
    computes in that precision natively."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def _bnb_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, threshold=6.0)
    q.weight = bnb.nn.Int8Params(
        linear.weight.detach().to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False
    )
    return q.to(linear.weight.device)


def quantize_model(model: LlamaAdapter, method: str = "int8", *, prompt_copy: bool = False) -> LlamaAdapter:
    """Swap the base linears of every block (and the output head) for 8-bit (``"int8"``) or, on
    CPU, 4-bit (``"int4"``) versions, in place. ``prompt_copy``: CPU int8 keeps a packed
    bfloat16 copy for prompt chunks (see :class:`Int8Linear`)."""
    on_cuda = model.tok_embeddings.weight.device.type == "cuda"
    if method == "int8":
        if on_cuda:
            return _swap_base_linears(model, _bnb_linear)
        return _swap_base_linears(model, lambda linear: Int8Linear(linear, prompt_copy))
    if method == "int4":
        if on_cuda:
            raise ValueError("quantize='int4' is for CPU; on a GPU use 'int8' or bfloat16")
        return _swap_base_linears(model, Int4Linear)
    raise ValueError(f"Unknown quantization {method!r}; supported: 'int8', 'int4'")


def use_decode_kernels(model: LlamaAdapter) -> bool:
    """Swap float32 CPU base linears (and the output head) for :class:`Float32Linear`, in place,
    where the project's kernels are available; whether it did."""
    weight = model.tok_embeddings.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not decode_kernels_available():
        return False
    _swap_base_linears(model, Float32Linear)
    return True


def pack_linears(model: LlamaAdapter) -> LlamaAdapter:
    """Swap the half-precision base linears (and the output head) for :class:`PackedLinear`, in
    place. Call only when :func:`can_pack` holds."""
    return _swap_base_linears(model, lambda linear: PackedLinear(linear.weight))


def _swap_base_linears(model: LlamaAdapter, make) -> LlamaAdapter:
    for module in model.modules():
        if isinstance(module, AdapterLinear) and isinstance(module.base, nn.Linear):
            module.base = make(module.base)
    if isinstance(model.output, nn.Linear):
        model.output = make(model.output)
    return model
