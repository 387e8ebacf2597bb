"""Parameter counts from an Architecture: totals, the linear layers LoRA can target, trainable counts.

Counting rules (each one checked against transformers on the meta device in tests/test_plan_params.py):

- embeddings ``V*H``; the output head adds another ``V*H`` unless tied to the embeddings;
- per block: attention ``H*(nh*d) + 2*H*(nkv*d) + (nh*d)*H`` (+ ``(nh+2*nkv)*d`` biases for Qwen2),
  SwiGLU MLP ``3*H*I``, and ``norms_per_layer`` RMSNorm weights of size ``H``; plus one final norm ``H``;
- LoRA on a linear ``in -> out`` with rank ``r`` adds ``r*(in + out)`` parameters (A is r x in, B out x r).
- mixture-of-experts (Mixtral, Qwen3-MoE; transformers 5 keeps the experts as 3-D parameters, not
  nn.Linear): per block a router ``E*H`` and E experts ``3*H*I_moe`` instead of the dense MLP (Qwen3 adds
  q/k RMSNorms of ``head_dim``). An expert stack counts as E linears (``count = layers * E``): its LoRA
  (PEFT's ``target_parameters``: A (r*E, in), B (out, r*E)) is then ``r*(in + out)`` per expert, exactly.
  "all-linear" adapts the router and the experts as PEFT's does, ``gate_up_proj`` at rank ``2r``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tailor.plan.catalogue import Architecture, PlanError


@dataclass(frozen=True)
class LinearShape:
    """One kind of linear layer in a transformer block (there are `count` of them in the model)."""

    name: str  # module name as in transformers (q_proj, gate_up_proj, ...)
    in_features: int
    out_features: int
    bias: bool
    count: int  # how many in the whole model (one per layer; an expert stack: one per layer and expert)
    rank_factor: int = 1  # "all-linear" rank multiple (PEFT: the fused experts' gate_up_proj gets 2r)
    parameter: bool = False  # adapted through target_parameters (not an nn.Linear; QLoRA leaves it as is)

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features


def block_linears(arch: Architecture) -> list[LinearShape]:
    """The nn.Linear layers of the transformer blocks (lm_head excluded, as PEFT's "all-linear" excludes it;
    an MoE model's experts and router are `moe_parameters`)."""
    h, i, d, n = arch.hidden_size, arch.intermediate_size, arch.head_dim, arch.num_layers
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    if arch.num_experts:
        return [
            LinearShape("q_proj", h, q, arch.qkv_bias, n), LinearShape("k_proj", h, kv, arch.qkv_bias, n),
            LinearShape("v_proj", h, kv, arch.qkv_bias, n), LinearShape("o_proj", q, h, False, n),
        ]
    if arch.fused_qkv:
        attn = [LinearShape("qkv_proj", h, q + 2 * kv, arch.qkv_bias, n)]
        mlp = [LinearShape("gate_up_proj", h, 2 * i, False, n)]
    else:
        attn = [
            LinearShape("q_proj", h, q, arch.qkv_bias, n),
            LinearShape("k_proj", h, kv, arch.qkv_bias, n),
            LinearShape("v_proj", h, kv, arch.qkv_bias, n),
        ]
        mlp = [LinearShape("gate_proj", h, i, False, n), LinearShape("up_proj", h, i, False, n)]
    return [*attn, LinearShape("o_proj", q, h, False, n), *mlp, LinearShape("down_proj", i, h, False, n)]


def moe_parameters(arch: Architecture) -> list[LinearShape]:
    """An MoE model's router (``gate.weight`` (E, H)) and expert stacks (``gate_up_proj`` (E, 2I, H),
    ``down_proj`` (E, H, I)) as linears; empty for a dense model."""
    e, h, i, n = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size, arch.num_layers
    if not e:
        return []
    return [
        LinearShape("gate", h, e, False, n, parameter=True),
        LinearShape("gate_up_proj", h, 2 * i, False, n * e, rank_factor=2, parameter=True),
        LinearShape("down_proj", i, h, False, n * e, parameter=True),
    ]


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # input embedding matrix
    lm_head: int  # 0 when tied
    block_linear: int  # weights of all block linears (what QLoRA quantises)
    linear_bias: int
    norms: int
    experts: int = 0  # MoE: router and expert weights (not nn.Linear: QLoRA does not quantise them)


def count_parameters(arch: Architecture) -> ParamCounts:
    """Exact parameter count of the base model (matches `sum(p.numel() for p in model.parameters())`)."""
    linears = block_linears(arch)
    embedding = arch.vocab_size * arch.hidden_size
    lm_head = 0 if arch.tie_embeddings else embedding
    block_linear = sum(lin.weight_params * lin.count for lin in linears)
    bias = sum(lin.out_features * lin.count for lin in linears if lin.bias)
    norms = (arch.norms_per_layer * arch.num_layers + 1) * arch.hidden_size
    norms += 2 * arch.head_dim * arch.num_layers if arch.qk_norm else 0
    experts = sum(p.weight_params * p.count for p in moe_parameters(arch))
    return ParamCounts(
        total=embedding + lm_head + block_linear + bias + norms + experts,
        embedding=embedding,
        lm_head=lm_head,
        block_linear=block_linear,
        linear_bias=bias,
        norms=norms,
        experts=experts,
    )


def resolve_targets(arch: Architecture, target_modules: str | list[str]) -> list[LinearShape]:
    """The block linears selected by `target_modules` ("all-linear" or a list of module names)."""
    linears = block_linears(arch) + moe_parameters(arch)
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return linears
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    by_name = {lin.name: lin for lin in linears}
    unknown = [t for t in target_modules if t not in by_name]
    if unknown:
        raise PlanError(
            f"target modules {unknown} do not exist in {arch.name} ({arch.model_type}); "
            f"valid: all-linear or a comma list of {', '.join(by_name)}"
        )
    return [dataclasses.replace(by_name[t], rank_factor=1) for t in dict.fromkeys(target_modules)]


def lora_parameters(arch: Architecture, rank: int, target_modules: str | list[str]) -> int:
    """Trainable LoRA parameters: sum over targeted linears of r*(in+out) (== PEFT's trainable count; an
    expert stack counts once per expert, gate_up_proj at 2r under "all-linear")."""
    return sum(
        rank * lin.rank_factor * (lin.in_features + lin.out_features) * lin.count
        for lin in resolve_targets(arch, target_modules)
    )
