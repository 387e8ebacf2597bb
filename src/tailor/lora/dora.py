"""DoRA: weight-decomposed low-rank adaptation (https://arxiv.org/abs/2402.09353), as PEFT computes it.

The adapted weight is split into a direction and a trained magnitude per output row::

    W' = m * (W + s B A) / ||W + s B A||        m: (d_out,), the row norms of W + s B A at creation
    y  = W' x + bias
       = (base(x) - bias) + (g - 1) * (W x) + g * s B A x + bias       g = m / ||W + s B A||  (d_out,)

The row norm ``||W + s B A||`` is treated as a constant (computed without gradient, "detached", DoRA
section 4.3 and PEFT): A, B and m get their gradients through the two products only. As in PEFT, when
dropout is active (training, p > 0) the dropped-out x feeds both W x and B A x, so W x is computed again
from the base weight; otherwise W x is the base layer's output minus its bias (no second matmul).

Layouts: an ``nn.Linear`` weight is (d_out, d_in); a GPT-2 ``Conv1D`` weight is stored (d_in, d_out)
(``fan_in_fan_out``) and an embedding matrix (num_embeddings, dim): for both, the "rows" are the columns
of the stored tensor (PEFT: the embedding's magnitude is per embedding dimension, (dim,)).

Quantized bases (QLoRA) dequantize their weight for the norm and for W x, as PEFT does: a quantized layer
type registers its dequantizer here (`register_dequantizer`; tailor.quant.bnb does for bitsandbytes), so
this package imports nothing of tailor's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (does this layer hold a quantized weight?, its weight dequantized) pairs, registered by quantization code
_DEQUANTIZERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], torch.Tensor]]] = []


def register_dequantizer(matches: Callable[[nn.Module], bool],
                         dequantize: Callable[[nn.Module], torch.Tensor]) -> None:
    """Teach DoRA to read the weight of a quantized layer type: `dequantize(layer)` returns the weight the
    layer computes with, as a float tensor in the layer's own layout."""
    if (matches, dequantize) not in _DEQUANTIZERS:
        _DEQUANTIZERS.append((matches, dequantize))


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight `layer` computes with: its own, or dequantized (PEFT's dequantize_module_weight).

    Raises:
        ValueError: a non-float weight no registered dequantizer knows.
    """
    weight = layer.weight
    if weight.is_floating_point():
        return weight
    for matches, dequantize in _DEQUANTIZERS:
        if matches(layer):
            return dequantize(layer)
    raise ValueError(
        f"DoRA needs the weight of {type(layer).__name__} in floating point, but it is stored as "
        f"{weight.dtype} and no dequantizer is registered for this layer type; use a bitsandbytes "
        "(tailor.quant) or unquantized base, or set use_dora false."
    )


def row_norm(weight: torch.Tensor, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``||W + delta||`` per output row, in fp32 (at least), without gradient.

    weight and delta are in the stored layout; `transposed`: rows are the stored tensor's columns
    (Conv1D, embedding). (d_out, d_in) -> (d_out,), or (d_in, d_out) -> (d_out,) when transposed.
    """
    with torch.no_grad():
        dtype = torch.promote_types(weight.dtype, torch.float32)
        total = weight.to(dtype) + delta.detach().to(dtype)
        return torch.linalg.vector_norm(total, dim=0 if transposed else 1)


def new_magnitude(weight: torch.Tensor, delta: torch.Tensor, transposed: bool,
                  dtype: torch.dtype) -> nn.Parameter:
    """A new adapter's magnitude m = ``||W + delta||`` per row (PEFT's update_layer): with the usual
    B = 0 start, the norms of W's rows, so DoRA starts at the base model's output."""
    return nn.Parameter(row_norm(weight, delta, transposed).to(dtype))


def linear_norm(base_layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float,
                fan_in_fan_out: bool) -> torch.Tensor:
    """``||W + s B A||`` per output row of a Linear / Conv1D layer (d_out,), fp32 at least, no gradient:
    a constant for the gradient (DoRA 4.3), so no graph through the d_out x d_in sum."""
    with torch.no_grad():
        delta = _product(b, a) * scaling  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
        return row_norm(base_weight(base_layer), delta.T if fan_in_fan_out else delta, fan_in_fan_out)


def linear_term(x: torch.Tensor, result: torch.Tensor, *, a: torch.Tensor, b: torch.Tensor,
                dropout: nn.Module, scaling: float, magnitude: torch.Tensor, norm: torch.Tensor,
                base_layer: nn.Module, fan_in_fan_out: bool, training: bool) -> torch.Tensor:
    """What DoRA adds to `result` (the output so far) for one adapter of a Linear / Conv1D layer.

    x (..., d_in) in the adapter's compute dtype; a (r, d_in); b (d_out, r); magnitude (d_out,); norm
    (d_out,): `linear_norm`'s. Returns ``(g - 1) * (W x) + g * s B A x`` (..., d_out), g = m / norm.
    """
    # (d_out,), broadcast over (..., d_out); kept in fp32 under autocast as PEFT does: g - 1 is small, and
    # rounding g to bf16 would scale W x by up to 0.4 % error
    gain = magnitude / norm
    if isinstance(dropout, nn.Identity) or not training:
        bias = getattr(base_layer, "bias", None)
        base_out = result if bias is None else result - bias  # W x, from the base call already made
    else:
        x = dropout(x)  # PEFT: the dropped-out x feeds W x too, so W x is computed again
        w = base_weight(base_layer).to(x.dtype)
        base_out = F.linear(x, w.T if fan_in_fan_out else w)
    lora_out = F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))  # (..., d_in) -> (..., r) -> (..., d_out)
    return (gain - 1) * base_out + gain * lora_out * scaling


def embedding_term(rows: torch.Tensor, result: torch.Tensor, *, a: torch.Tensor, b: torch.Tensor,
                   scaling: float, magnitude: torch.Tensor, base_layer: nn.Embedding,
                   embed_scale: torch.Tensor | None) -> torch.Tensor:
    """What DoRA adds to an embedding's `result` for one adapter (PEFT's DoraEmbeddingLayer).

    rows (..., r): A's columns looked up for the tokens; a (r, num_embeddings); b (dim, r); magnitude
    (dim,). Returns ``(g - 1) * result + g * s rows B^T`` (times embed_scale, which the base output holds).
    """
    with torch.no_grad():
        delta = (_product(b, a) * scaling).T  # (dim, num) -> (num, dim): the stored layout
        norm = row_norm(base_layer.weight, delta, transposed=True)  # (dim,)
    gain = magnitude / norm
    term = gain * (rows @ b.T) * scaling  # (..., r) @ (r, dim) -> (..., dim)
    if embed_scale is not None:
        term = term * embed_scale.to(term.dtype)
    return (gain - 1) * result + term


def _product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B A in fp32 at least (float64 stays float64: the merge check's arithmetic)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return b.to(dtype) @ a.to(dtype)


def merged_weight(merged: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                  transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``g * (merged + delta)``, g = m / ||base + delta|| per row (PEFT's merge: the norm is the unmerged
    base weight's, as the forward takes it, even when other adapters are merged already), and that norm,
    which unmerging needs. fp32 at least; all in the stored layout."""
    norm = row_norm(base, delta, transposed)
    gain = magnitude.to(norm.dtype) / norm
    gain = gain.view(1, -1) if transposed else gain.view(-1, 1)
    return gain * (merged.to(norm.dtype) + delta.to(norm.dtype)), norm


def unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                    transposed: bool) -> torch.Tensor:
    """W again from a merged ``g * (W + delta)``, g = m / norm, with the norm of the unmerged W kept at merge
    time (it cannot be recomputed from the merged weight); fp32 at least."""
    gain = magnitude.to(norm.dtype) / norm
    gain = gain.view(1, -1) if transposed else gain.view(-1, 1)
    return merged.to(norm.dtype) / gain - delta.to(norm.dtype)


__all__ = ["base_weight", "embedding_term", "linear_norm", "linear_term", "merged_weight", "new_magnitude",
           "register_dequantizer", "row_norm", "unmerged_weight"]
