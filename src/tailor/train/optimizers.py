"""The optimizer of a run: AdamW (torch) or 8-bit AdamW (bitsandbytes, paged or not), over parameter groups
that are plain (decay on matrices only) or LoRA+'s (B learns `loraplus_lr_ratio` times faster than A).

Each group carries `lr_scale`, its learning rate as a multiple of the schedule's: the training step sets
``group["lr"] = lr * group["lr_scale"]`` (tailor.train.loop.train_step), which is how transformers' LambdaLR
scales the groups PEFT's `create_loraplus_optimizer` makes. The scale is part of the optimizer's state_dict,
so a resumed run keeps its groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tailor.lora.layer import LoraEmbedding, LoraLayer

if TYPE_CHECKING:
    from tailor.config import TrainConfig

# training config name -> bitsandbytes class (tailor.config.sections.OPTIMIZERS lists the names)
EIGHT_BIT_CLASSES = {"adamw-8bit": "AdamW8bit", "paged-adamw-8bit": "PagedAdamW8bit"}


def plain_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Decay applies to matrices, not to norms or biases (1-D)."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]


def loraplus_groups(model: nn.Module, ratio: float, lr: float, lr_embedding: float,
                    weight_decay: float) -> list[dict[str, Any]]:
    """LoRA+ (https://arxiv.org/abs/2402.12354) as PEFT's create_loraplus_optimizer groups the trainable
    parameters: embedding adapters at `lr_embedding`; each adapter's B, and every other 1-D parameter, at
    ratio x lr (without decay for biases and LayerNorm weights); A and everything else at lr."""
    embedding, group_a, group_b, group_b_no_decay = [], [], [], []
    placed: set[int] = set()
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        for name in layer.adapter_names:
            params = layer.adapter_parameters(name)
            if isinstance(layer, LoraEmbedding):
                embedding += params
            else:
                group_a.append(params[0])
                group_b.append(params[1])
            placed.update(id(p) for p in params)
    in_layer_norm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for key, p in model.named_parameters():
        if not p.requires_grad or id(p) in placed:
            continue
        if p.ndim != 1:
            group_a.append(p)
        elif key.endswith("bias") or id(p) in in_layer_norm:
            group_b_no_decay.append(p)
        else:
            group_b.append(p)
    def trained(group: list[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in group if p.requires_grad]

    return [{"params": trained(group_a), "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": trained(embedding), "weight_decay": weight_decay, "lr_scale": lr_embedding / lr},
            {"params": trained(group_b), "weight_decay": weight_decay, "lr_scale": ratio},
            {"params": group_b_no_decay, "weight_decay": 0.0, "lr_scale": ratio}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """`config.optimizer` over the trainable parameters, grouped per `config.loraplus_lr_ratio`.

    torch AdamW uses its fused kernel (one pass over all parameters) where torch has it for the device,
    else the multi-tensor `foreach` one; both beat a per-parameter Python loop.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; nothing to train")
    if config.loraplus_lr_ratio is not None:
        groups = loraplus_groups(model, config.loraplus_lr_ratio, config.lr, config.loraplus_lr_embedding,
                                 config.weight_decay)
    else:
        groups = plain_groups(params, config.weight_decay)
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    kwargs: dict[str, Any] = {"lr": config.lr, "betas": tuple(config.adam_betas)}
    if config.optimizer in EIGHT_BIT_CLASSES:
        import bitsandbytes as bnb

        return getattr(bnb.optim, EIGHT_BIT_CLASSES[config.optimizer])(groups, **kwargs)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def optimizer_state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (moments, 8-bit blocks' absmax; step counters), each tensor
    once (bitsandbytes gives every parameter the same quantization map)."""
    tensors = {t.data_ptr(): t.nbytes for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t)}
    return sum(tensors.values())


__all__ = ["EIGHT_BIT_CLASSES", "loraplus_groups", "make_optimizer", "optimizer_state_nbytes", "plain_groups"]
