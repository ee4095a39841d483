"""fp8 block linears for generation and for training's frozen base: weights stored as float8 e4m3 with one
scale per output row, activations scaled per token on the fly, multiplied by `torch._scaled_mm` (fp8 tensor cores
on Hopper: H100, H200), fp32 accumulation.

Halves the transformer's weight memory (9B: 18.2 -> ~9.6 GB) and the time of its large matmuls. Only the
LoRA-targetable linears of the blocks are converted (the attention projections and MLPs: nearly all parameters);
embedders, modulation and the output projection stay in bf16. Convert after the LoRAs are fused into the weights,
so the LoRA is quantised with the layer it changes.

Training (`TrainSettings.fp8_base`) converts the base layers that peft's LoRA layers wrap, after the adapters are
added: the LoRA factors stay float32 beside the fp8 base. Gradients flow through the frozen fp8 layer to the
input only (the weight gets none): backward multiplies by the dequantised weight in the gradient's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arch import lora_linear_names

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


class Float8Linear(nn.Module):
    """An nn.Linear's y = x W^T + b with W in float8 (rowwise scales) and x quantised per token."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight", (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # (1, out), float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        # torch.autograd.Function.apply is unannotated; called through a subclass, untyped_calls_exclude misses it.
        out: torch.Tensor = _Fp8Matmul.apply(rows, self.weight, self.weight_scale)  # type: ignore[no-untyped-call]
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


class _Fp8Matmul(torch.autograd.Function):
    """rows @ W^T with W in fp8: forward on fp8 tensor cores, backward (to the input) with the dequantised W."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        ctx.input_dtype = rows.dtype
        if rows.is_cuda:  # under autocast a LayerNorm hands fp32 on; rowwise-scaled fp8 wants bf16 in and out
            rows = rows.to(torch.bfloat16)
        # One scale per token, kept in the activations' dtype so no float32 copy of them is made; the same
        # (rounded) scale divides here and multiplies back inside the matmul.
        scale = (rows.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # (tokens, 1)
        quantised = (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        ctx.save_for_backward(weight, weight_scale)
        return torch._scaled_mm(
            quantised, weight.t(), scale_a=scale.float(), scale_b=weight_scale, out_dtype=_out_dtype(rows)
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        weight, weight_scale = ctx.saved_tensors
        dequantised = weight.to(grad.dtype) * weight_scale.t().to(grad.dtype)  # (out, in)
        return (grad @ dequantised).to(ctx.input_dtype), None, None


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    # Rowwise scaling on CUDA writes bf16 (cuBLAS before 12.9 allows nothing else); the CPU kernel (tests) fp32 too.
    return x.dtype if x.dtype == torch.float32 and not x.is_cuda else torch.bfloat16


def base_layers_to_fp8(transformer: nn.Module) -> int:
    """Replace the nn.Linear base layers that peft's LoRA layers wrap with Float8Linear; returns how many."""
    wrapped = [
        (m, base) for m in transformer.modules() if isinstance(base := getattr(m, "base_layer", None), nn.Linear)
    ]
    for module, base in wrapped:
        module.base_layer = Float8Linear(base)
    return len(wrapped)


def to_fp8(transformer: nn.Module) -> int:
    """Replace the transformer's block linears with Float8Linear in place; returns how many were converted."""
    names = lora_linear_names(transformer)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        setattr(parent, child, Float8Linear(getattr(parent, child)))
    return len(names)
