"""Initialisations that start the adapter from the base weight (PiSSA, OLoRA), and the conversion that makes
such an adapter an ordinary LoRA on the original base.

PiSSA (https://arxiv.org/abs/2404.02948) puts the top-r singular part of W into B and A and trains it;
OLoRA (https://arxiv.org/abs/2406.01775) puts the first r columns of W's QR factors there. Both subtract
what they took from W, so the model's output is unchanged at the start:

    W = W_res + s B0 A0            (W_res is what the base layer holds while training)
    W_res + s B A = W + s (B A - B0 A0) = W + s' [B | -B0] [A ; A0]

The last form is a LoRA of rank 2r on the *original* W (PEFT's ``path_initial_model_for_weight_conversion``:
r and lora_alpha doubled so that s' = s, A' = cat(A, A0) by rows, B' = cat(B, -B0) by columns), which is how
tailor saves these adapters: they load, serve and merge on the original base like any other.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # K: iterations of the randomised SVD


def init_problem(value: Any) -> str | None:
    """Why `value` is not an init_lora_weights tailor knows (None when it is one)."""
    if isinstance(value, bool) or value == "gaussian":
        return None
    if isinstance(value, str) and (value in ("pissa", "olora") or _PISSA_NITER.fullmatch(value)):
        return None
    return (f"init_lora_weights={value!r} must be one of True, False, 'gaussian', 'pissa', 'pissa_niter_K' "
            "(K iterations of the fast randomised SVD, e.g. 'pissa_niter_4'), 'olora'.")


def changes_base(init: Any) -> bool:
    """True for the initialisations that move part of the base weight into the adapter (PiSSA, OLoRA)."""
    return isinstance(init, str) and init != "gaussian" and init_problem(init) is None


@torch.no_grad()
def decompose(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) taken out of `weight` (fp32, nn.Linear layout (d_out, d_in)) by `init`, as PEFT computes them
    (peft.utils.loftq_utils._pissa_decomposition, LoraLayer.olora_init); W_res = weight - scaling B0 A0.

    pissa: W = V S U^T (full SVD), A0 = sqrt(S_r / s) U_r^T (r, d_in), B0 = V_r sqrt(S_r / s) (d_out, r).
    pissa_niter_K: the same from torch.svd_lowrank(W, r, niter=K) (randomised: draws from torch's RNG).
    olora: W = Q R, A0 = R[:r] (r, d_in), B0 = Q[:, :r] (d_out, r).
    """
    if init == "olora":
        q, upper = torch.linalg.qr(weight)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    niter = _PISSA_NITER.fullmatch(init)
    if niter:
        v, s, u = torch.svd_lowrank(weight, r, niter=int(niter.group(1)))
        uh = u.T
    elif init == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        v, s, uh = v[:, :r], s[:r], uh[:r]
    else:
        raise ValueError(f"init_lora_weights={init!r} does not take its adapter from the base weight.")
    root = torch.sqrt(s / scaling)
    return (root[:, None] * uh).contiguous(), (v * root[None, :]).contiguous()


def on_original_base(tensors: dict[str, torch.Tensor],
                     initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's adapter tensors (PEFT key suffixes) as a rank-2r LoRA on the original base weight:
    ``A' = [A ; A0]`` (rows), ``B' = [B | -B0]`` (columns); ``s' B' A' = s (B A - B0 A0)``."""
    out = {}
    for suffix, tensor in tensors.items():
        start = initial[suffix].to(tensor.device, tensor.dtype)
        is_a = suffix.startswith(("lora_A", "lora_embedding_A"))
        out[suffix] = torch.cat([tensor, start], dim=0) if is_a else torch.cat([tensor, -start], dim=1)
    return out


def on_original_base_config(config: Any) -> Any:
    """The LoraConfig of the converted adapter, as PEFT writes it: init True, r doubled, alpha doubled
    (times sqrt(2) with rsLoRA, whose scaling is alpha / sqrt(r)), rank_pattern and alpha_pattern doubled."""
    alpha_factor = 2**0.5 if config.use_rslora else 2
    return dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )


def quantized_weight(weight: torch.Tensor) -> bool:
    """A packed quantized weight (bitsandbytes Params4bit / Int8Params): PiSSA and OLoRA cannot change it."""
    return not weight.is_floating_point() or hasattr(weight, "quant_state") or hasattr(weight, "SCB")


__all__ = ["changes_base", "decompose", "init_problem", "on_original_base",
           "on_original_base_config", "quantized_weight"]
