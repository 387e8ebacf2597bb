"""A frozen base stored in bf16 and computed in fp32: half the weight memory, fp32's speed where bf16 is
not native (a CPU without AVX512-BF16/AMX, where bf16 matmuls run ~100x slower than fp32).

Each frozen `nn.Linear` keeps its weight in bf16 and multiplies by an fp32 copy made for that one matmul
(`UpcastLinear`); the copy is freed right after. Its backward (the input gradient LoRA needs through a
frozen layer) upcasts the *bf16* weight again instead of keeping the fp32 copy alive: autograd saves the
bf16 tensor only, so the saving holds during training too (tests/test_upcast.py checks the saved tensors).
Embeddings are stored in bf16 and return fp32 rows (`UpcastEmbedding`); norms, biases and the other small
parameters are fp32. The function is fp32 compute on bf16-rounded weights, exactly.

Both classes are subclasses of the torch ones, so tailor.lora wraps them as it wraps any nn.Linear /
nn.Embedding (its fp32 adapters compute beside them), and `isinstance` checks elsewhere keep working.
A layer whose weight trains (full fine-tuning) computes plainly: this is for frozen weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COMPUTE_DTYPE = torch.float32


class _UpcastLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W stored low-precision: upcast for the matmul, saved for backward as stored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the stored (bf16) tensor: no fp32 copy outlives this call
        ctx.has_bias = bias is not None
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def _compute_dtype(x: torch.Tensor, stored: torch.dtype) -> torch.dtype:
    return torch.promote_types(x.dtype, stored) if x.is_floating_point() else COMPUTE_DTYPE


class UpcastLinear(nn.Linear):
    """An nn.Linear whose frozen weight is stored in bf16 and upcast to the input's dtype (fp32) per matmul;
    backward keeps only the bf16 weight. Made from an nn.Linear in place by `store_low_precision`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, self.weight.dtype)
        x = x.to(dtype)
        if self.weight.requires_grad:  # a trained weight: ordinary autograd (it needs x for its gradient)
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x, self.weight.to(dtype), bias)
        return _UpcastLinearFunction.apply(x, self.weight, self.bias)


class UpcastEmbedding(nn.Embedding):
    """An nn.Embedding stored in bf16 whose looked-up rows come out in fp32."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input).to(COMPUTE_DTYPE)


def mark_low_precision(model: nn.Module) -> set[int]:
    """Turn every plain nn.Linear / nn.Embedding of `model` into UpcastLinear / UpcastEmbedding (their
    class only: the weights are not touched) and return the ids of their weight Parameters, the ones to
    store low-precision (tailor.models.lean casts them as it reads them)."""
    low: set[int] = set()
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = UpcastLinear
        elif type(module) is nn.Embedding:
            module.__class__ = UpcastEmbedding
        else:
            continue
        low.add(id(module.weight))
    return low


def store_low_precision(model: nn.Module, stored: torch.dtype = torch.bfloat16) -> nn.Module:
    """`model` (in place) with every nn.Linear and nn.Embedding weight stored in `stored` and computed in
    fp32 (their classes become UpcastLinear / UpcastEmbedding), every other floating parameter in fp32.
    Buffers stay as they are (rotary frequencies are kept fp32 by transformers). A tied weight is one
    Parameter and stays tied. Returns `model`."""
    low = mark_low_precision(model)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(stored if id(parameter) in low else COMPUTE_DTYPE)
    return model


def is_low_precision(module: nn.Module) -> bool:
    """Whether `module` (a layer) is stored low-precision and computed in fp32 by this module."""
    return isinstance(module, UpcastLinear | UpcastEmbedding)


def restore_full_precision(model: nn.Module) -> nn.Module:
    """The inverse of `store_low_precision`: plain nn.Linear / nn.Embedding with fp32 weights (in place), so
    a merged or exported model is an ordinary fp32 transformers model."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, UpcastLinear):
                module.__class__ = nn.Linear
            elif isinstance(module, UpcastEmbedding):
                module.__class__ = nn.Embedding
            else:
                continue
            module.weight.data = module.weight.data.to(COMPUTE_DTYPE)
    return model


__all__ = ["UpcastEmbedding", "UpcastLinear", "is_low_precision", "mark_low_precision",
           "restore_full_precision", "store_low_precision"]
