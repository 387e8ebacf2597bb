"""Weighted combinations of LoRA adapters trained on one base, computed on the saved tensors alone.

Per adapted module the target is the weighted sum of the adapters' updates::

    dW = sum_i w_i * s_i * B_i A_i        s_i = alpha_i / r_i   (alpha_i / sqrt(r_i) with rsLoRA)

with each adapter's own rank and alpha at that module (rank_pattern / alpha_pattern), and zero from an
adapter that does not adapt the module. The result is written as one ordinary PEFT adapter whose scaling
is 1 everywhere (lora_alpha = r), every s_i and w_i folded into its A and B; modules whose rank is below
the adapter's r are padded with zero rows, which changes nothing and keeps the file free of rank_pattern
(so every runtime that reads PEFT adapters reads it).

Methods:
  cat     exact: A and B of all adapters stacked; the rank is the sum of the ranks.
  linear  PEFT's definition: A = sum_i sign(c_i) sqrt|c_i| A_i, B = sum_i sqrt|c_i| B_i (c_i = w_i s_i).
          Exact for one adapter; for two or more B A gains cross terms B_i A_j: an approximation, whose
          deviation from dW is reported. Needs equal ranks per module.
  svd     exact dW, truncated to `rank` by a singular value decomposition (default: the largest parent
          rank); the relative Frobenius error per module and overall is reported.
  ties    TIES-merging (https://arxiv.org/abs/2306.01708) of the modules' full updates w_i s_i B_i A_i:
          keep the `density` largest entries of each, elect a sign per entry, average the agreeing ones;
          then truncated by SVD to `rank` (default: the sum of the parents' ranks).
  dare    DARE (https://arxiv.org/abs/2311.03099): drop each entry of each update with probability
          1 - density (seeded), rescale by 1 / density, sum; then truncated like ties.
ties and dare change the sum by design; both their deviation from dW and their truncation error are
reported.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tailor.adapters.format import (
    PREFIX,
    _read_weights,
    config_to_peft_dict,
    read_adapter_config,
)
from tailor.adapters.layout import CONFIG_NAME, METADATA_NAME, WEIGHTS_NAME
from tailor.adapters.metadata import (
    describe_base,
    metadata_text,
    new_metadata,
    read_metadata,
    same_base,
)
from tailor.files import atomic_output, check_output_path
from tailor.lora import LoraConfig
from tailor.lora.inject import pattern_value
from tailor.lora.layer import lora_scaling

METHODS = ("cat", "linear", "svd", "ties", "dare")
# PEFT key suffixes of the two factors: (A, B) of a Linear / Conv1D, of an Embedding
FACTOR_KEYS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
EXACT_SVD_MAX_DIM = 4096  # above this the full SVD of a dense update (ties, dare) is randomized


class CombineError(ValueError):
    """Adapters that cannot be combined as asked; the message names the adapter and the fix."""


@dataclass
class Parent:
    """One input adapter: where it is, its config, its factors per module, its metadata."""

    path: Path
    weight: float
    config: LoraConfig
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, str]]  # module -> (A, B, A's key suffix)
    metadata: dict[str, Any] | None
    ref: str | None = None  # its store reference (NAME@VERSION) when it came from the store

    def scaling(self, module: str) -> float:
        """s_i at `module`: the module's own rank (from the tensor) and alpha (alpha_pattern)."""
        rank = self.factors[module][0].shape[0]
        alpha = pattern_value(self.config.alpha_pattern, module, self.config.lora_alpha)
        return lora_scaling(rank, alpha, self.config.use_rslora)


@dataclass
class LayerResult:
    module: str
    rank: int
    error: float  # relative Frobenius distance of the result's B A from the weighted sum dW
    truncation: float  # the part of `error` due to the rank cut (equal to error for cat/svd)


@dataclass
class CombineResult:
    out: Path
    method: str
    weights: list[float]
    rank: int
    layers: list[LayerResult] = field(default_factory=list)
    error: float = 0.0  # overall: sqrt(sum ||B A - dW||^2 / sum ||dW||^2)
    truncation: float = 0.0
    exact: bool = True

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method, "weights": self.weights, "rank": self.rank,
            "relative_error": self.error, "truncation_error": self.truncation, "exact": self.exact,
            "layers": {r.module: {"rank": r.rank, "relative_error": r.error, "truncation_error": r.truncation}
                       for r in self.layers},
        }


# ---------------------------------------------------------------------------------------------- reading
def _read_parent(path: Path, weight: float, ref: str | None) -> Parent:
    config = read_adapter_config(path)
    problems = []
    if config.modules_to_save:
        problems.append(f"modules_to_save {config.modules_to_save} (whole trained modules, not low-rank "
                        "updates: they cannot be weighted and summed exactly)")
    if config.bias != "none":
        problems.append(f"bias={config.bias!r} (trained biases are not low-rank updates)")
    if config.use_dora:
        problems.append("use_dora=true (a DoRA adapter rescales each row of the weight: its update is not "
                        "a low-rank term that can be weighted and summed)")
    if problems:
        raise CombineError(f"Adapter {path} cannot be combined: it has {'; '.join(problems)}. Combine "
                           "plain LoRA adapters trained with bias='none' and without modules_to_save, or "
                           "merge a DoRA adapter into the model instead (tailor merge).")
    tensors = {k.removeprefix(PREFIX): v for k, v in _read_weights(path, allow_pickle=False).items()}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}
    for key in tensors:
        for a_key, b_key in FACTOR_KEYS:
            if key.endswith(f".{a_key}"):
                module = key.removesuffix(f".{a_key}")
                b = tensors.get(f"{module}.{b_key}")
                if b is None:
                    raise CombineError(f"Adapter {path}: {module}.{a_key} has no {b_key} beside it; the file "
                                       "is incomplete: save the adapter again.")
                factors[module] = (tensors[key].double(), b.double(), a_key)
    known = {f"{m}.{suffix}" for m, (_, _, a_key) in factors.items()
             for suffix in next(pair for pair in FACTOR_KEYS if pair[0] == a_key)}
    other = sorted(set(tensors) - known)
    if other:
        raise CombineError(f"Adapter {path} holds tensors other than LoRA factors (e.g. {other[:3]}): "
                           "trained base tensors cannot be combined exactly. Combine plain LoRA adapters.")
    if not factors:
        raise CombineError(f"Adapter {path} holds no LoRA factors; save the adapter again.")
    for module, (a, b, _) in factors.items():
        r_config = pattern_value(config.rank_pattern, module, config.r)
        if a.shape[0] != r_config or b.shape[1] != a.shape[0]:
            raise CombineError(
                f"Adapter {path}: module {module!r} has factors of shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)} but its config says rank {r_config}; the adapter is inconsistent: save it "
                "again."
            )
    return Parent(path, weight, config, factors, read_metadata(path), ref)


def _check_compatible(parents: list[Parent], force: bool) -> None:
    first = parents[0]
    for other in parents[1:]:
        if other.config.fan_in_fan_out != first.config.fan_in_fan_out:
            raise CombineError(f"Adapters {first.path} and {other.path} disagree on fan_in_fan_out: they "
                               "were trained on different model types. Combine adapters of one base.")
        a_base = (first.metadata or {}).get("base")
        b_base = (other.metadata or {}).get("base")
        if not force and not same_base(a_base, b_base):
            raise CombineError(
                f"Adapters {first.path} and {other.path} were trained on different bases: "
                f"{describe_base(a_base)} and {describe_base(b_base)}. A combination only means something on "
                "one base; combine adapters of the same base (or force=True / --force if you know better)."
            )
        for module in set(first.factors) & set(other.factors):
            (a1, b1, _), (a2, b2, _) = first.factors[module], other.factors[module]
            if a1.shape[1] != a2.shape[1] or b1.shape[0] != b2.shape[0]:
                raise CombineError(
                    f"Adapters {first.path} and {other.path} do not fit the same model: module {module!r} "
                    f"updates a {b1.shape[0]}x{a1.shape[1]} weight in one and a {b2.shape[0]}x{a2.shape[1]} "
                    "one in the other. Combine adapters trained on the same base model."
                )


# ---------------------------------------------------------------------------------------------- algebra
def _frobenius_sq(us: list[torch.Tensor], vs: list[torch.Tensor]) -> float:
    """||sum_j U_j V_j||_F^2 without forming the product: trace((U^T U)(V V^T)) over the stacked factors.
    U_j: (d_out, k_j), V_j: (k_j, d_in)."""
    u, v = torch.cat(us, dim=1), torch.cat(vs, dim=0)
    return float(torch.sum((u.T @ u) * (v @ v.T)).clamp_min(0.0))


def _relative(numerator_sq: float, denominator_sq: float) -> float:
    if denominator_sq <= 0.0:
        return 0.0 if numerator_sq <= 1e-30 else math.inf
    return math.sqrt(max(numerator_sq, 0.0) / denominator_sq)


def _balanced(c: float, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' A' = c B A: sqrt|c| on each factor, the sign on B."""
    root = math.sqrt(abs(c))
    return a * root, b * (root if c >= 0 else -root)


def _low_rank_svd(us: list[torch.Tensor], vs: list[torch.Tensor], rank: int):
    """The best rank-`rank` factors of sum_j U_j V_j, through QR of the stacked factors and an SVD of the
    small (R x R) core, R = sum of the k_j: exact and O(d R^2). Returns (A, B, relative truncation error)."""
    u, v = torch.cat(us, dim=1), torch.cat(vs, dim=0)  # (d_out, R), (R, d_in)
    q_u, r_u = torch.linalg.qr(u)  # (d_out, R'), (R', R)
    q_v, r_v = torch.linalg.qr(v.T)  # (d_in, R''), (R'', R)
    left, s, right = torch.linalg.svd(r_u @ r_v.T)  # core (R', R'')
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = (q_u @ left[:, :k]) * root  # (d_out, k)
    a = root[:, None] * (right[:k] @ q_v.T)  # (k, d_in)
    error = _relative(float((s[k:] ** 2).sum()), float((s ** 2).sum()))
    return a, b, error


def _dense_svd(target: torch.Tensor, rank: int, seed: int):
    """Best rank-`rank` factors of a dense update (ties, dare). Randomized above EXACT_SVD_MAX_DIM."""
    if min(target.shape) <= EXACT_SVD_MAX_DIM:
        left, s, right = torch.linalg.svd(target, full_matrices=False)
    else:
        torch.manual_seed(seed)
        left, s, v = torch.svd_lowrank(target, q=min(rank + 10, min(target.shape)), niter=4)
        right = v.T
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return root[:, None] * right[:k], left[:, :k] * root


def _ties(updates: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging of weighted updates: trim each to its `density` largest magnitudes, elect the sign of
    the summed trimmed values per entry, average the entries that agree with it (PEFT's ties, on dW)."""
    trimmed = []
    for update in updates:
        k = max(int(density * update.numel()), 1)
        threshold = update.abs().flatten().kthvalue(update.numel() - k + 1).values
        trimmed.append(torch.where(update.abs() >= threshold, update, torch.zeros_like(update)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(dim=0).clamp_min(1)
    return (stacked * agree).sum(dim=0) / count


def _dare(updates: list[torch.Tensor], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescale the kept ones by 1 / density, then sum."""
    total = torch.zeros_like(updates[0])
    for update in updates:
        keep = torch.rand(update.shape, generator=generator, dtype=update.dtype) < density
        total += torch.where(keep, update / density, torch.zeros_like(update))
    return total


def _combine_module(method: str, module: str, parents: list[Parent], rank: int | None, density: float,
                    seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor, LayerResult]:
    present = [p for p in parents if module in p.factors]
    terms = [(p.weight * p.scaling(module), *p.factors[module][:2]) for p in present]  # (c_i, A_i, B_i)
    target_u = [c * b for c, _, b in terms]  # dW = sum_i (c_i B_i) A_i
    target_v = [a for _, a, _ in terms]
    target_sq = _frobenius_sq(target_u, target_v)
    ranks = [a.shape[0] for _, a, _ in terms]
    d_out, d_in = terms[0][2].shape[0], terms[0][1].shape[1]
    truncation = 0.0
    if method == "cat":
        pairs = [_balanced(c, a, b) for c, a, b in terms]
        a_out, b_out = torch.cat([a for a, _ in pairs], dim=0), torch.cat([b for _, b in pairs], dim=1)
    elif method == "linear":
        if len(set(ranks)) > 1:
            names = ", ".join(f"{p.path} (r={r})" for p, r in zip(present, ranks, strict=True))
            raise CombineError(f"method linear needs the same rank in every adapter at each module; "
                               f"{module!r} has {names}. Use cat (exact) or svd (--rank).")
        pairs = [_balanced(c, a, b) for c, a, b in terms]
        a_out, b_out = sum(a for a, _ in pairs), sum(b for _, b in pairs)
    elif method == "svd":
        want = rank or max(ranks)
        a_out, b_out, truncation = _low_rank_svd(target_u, target_v, min(want, d_out, d_in))
    else:  # ties, dare: dense updates of this module
        updates = [(c * b) @ a for c, a, b in terms]  # (d_out, r) @ (r, d_in) each
        if method == "ties":
            merged = _ties(updates, density)
        else:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            merged = _dare(updates, density, generator)
        want = rank or sum(ranks)
        a_out, b_out = _dense_svd(merged, min(want, d_out, d_in), seed)
        merged_sq = float((merged ** 2).sum())
        truncation = _relative(float(((merged - b_out @ a_out) ** 2).sum()), merged_sq)
    error_sq = _frobenius_sq([b_out, *[-u for u in target_u]], [a_out, *target_v])
    error = _relative(error_sq, target_sq)
    if method == "cat":
        truncation = error
    return a_out, b_out, LayerResult(module, a_out.shape[0], error, truncation)


# ---------------------------------------------------------------------------------------------- writing
def _check_out(out: Path, inputs: list[Path]) -> None:
    check_output_path(out, directory=True)
    resolved = out.resolve()
    for path in inputs:
        if path.resolve() == resolved:
            raise CombineError(f"--out {out} is one of the input adapters; write the combination elsewhere.")
    if out.is_dir() and any(out.iterdir()):
        previous = None
        with contextlib.suppress(ValueError):
            previous = read_metadata(out)
        if not (previous and previous.get("combination")):
            raise CombineError(f"--out {out} is not empty and does not hold an earlier combination; nothing "
                               "there is touched. Give a new or empty directory.")


def _store_ref(path: Path, store: str | os.PathLike | None) -> str | None:
    try:
        from tailor.adapters.store import AdapterStore

        return AdapterStore(store).ref_for(path)
    except (OSError, ValueError):
        return None


def combine_adapters(
    dirs: Sequence[str | os.PathLike], weights: Sequence[float], method: str, out: str | os.PathLike,
    rank: int | None = None, *, density: float = 0.5, seed: int = 0, force: bool = False,
    refs: Sequence[str | None] | None = None, store: str | os.PathLike | None = None,
) -> CombineResult:
    """Combine the adapters in `dirs` with `weights` by `method` (cat, linear, svd, ties, dare) into a new
    PEFT-format adapter at `out` (see the module docstring for each method's exactness).

    Works on the saved tensors: no base model is loaded. Weights may be negative (task negation). Adapters
    may differ in rank, alpha, rsLoRA, rank_pattern / alpha_pattern and target modules. `rank` is the
    target rank of svd, ties and dare; `density` and `seed` belong to ties and dare. `refs` are the store
    references the directories were resolved from (recorded as the parents' names; by default a parent
    inside the adapter store at `store` is named by its reference).

    Returns the per-module and overall relative errors against the explicit weighted sum.

    Raises:
        CombineError: bad arguments, adapters of different bases or shapes, unsupported adapter features,
            an --out that holds something else. AdapterFormatError: an unreadable adapter.
    """
    paths = [Path(d) for d in dirs]
    weights = list(weights)
    problems = []
    if not paths:
        problems.append("no adapters given (--adapters DIR1 DIR2 ...)")
    if len(weights) != len(paths):
        problems.append(f"{len(paths)} adapter(s) but {len(weights)} weight(s); give one weight per adapter")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) for w in weights):
        problems.append(f"weights {weights} must be finite numbers (negative ones subtract an adapter)")
    if method not in METHODS:
        problems.append(f"method {method!r} is not one of {', '.join(METHODS)}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        problems.append(f"rank {rank!r} must be a positive integer")
    if rank is not None and method in ("cat", "linear"):
        problems.append(f"--rank applies to svd, ties and dare; {method} keeps the parents' ranks")
    if not 0 < density <= 1:
        problems.append(f"density {density!r} must be in (0, 1]")
    if problems:
        raise CombineError("Cannot combine: " + "; ".join(problems) + ".")
    out = Path(out)
    _check_out(out, paths)
    refs = list(refs) if refs is not None else [None] * len(paths)
    parents = [_read_parent(p, float(w), ref or _store_ref(p, store))
               for p, w, ref in zip(paths, weights, refs, strict=True)]
    _check_compatible(parents, force)

    modules = sorted(set().union(*(p.factors for p in parents)))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}
    layers: list[LayerResult] = []
    error_sq = target_sq = trunc_sq = 0.0
    for index, module in enumerate(modules):
        a, b, result = _combine_module(method, module, parents, rank, density, seed, index)
        a_key = next(p.factors[module][2] for p in parents if module in p.factors)
        factors[module] = (a, b, a_key)
        layers.append(result)
        present = [p for p in parents if module in p.factors]
        norm_sq = _frobenius_sq([p.weight * p.scaling(module) * p.factors[module][1] for p in present],
                                [p.factors[module][0] for p in present])
        error_sq += (result.error ** 2) * norm_sq
        trunc_sq += (result.truncation ** 2) * norm_sq
        target_sq += norm_sq

    out_rank = max(a.shape[0] for a, _, _ in factors.values())
    state = {}
    for module, (a, b, a_key) in factors.items():
        b_key = dict(FACTOR_KEYS)[a_key]
        pad = out_rank - a.shape[0]  # zero rows of A / columns of B: B A unchanged, one rank for the file
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
        state[f"{PREFIX}{module}.{a_key}"] = a.float().contiguous()
        state[f"{PREFIX}{module}.{b_key}"] = b.float().contiguous()

    first = parents[0].config
    config = LoraConfig(
        r=out_rank, lora_alpha=out_rank, target_modules=modules, fan_in_fan_out=first.fan_in_fan_out,
        base_model_name_or_path=next((p.config.base_model_name_or_path for p in parents
                                      if p.config.base_model_name_or_path), None),
        task_type=first.task_type,
    )
    error = _relative(error_sq, target_sq)
    exact = (method == "cat" or (method == "linear" and len(parents) == 1)
             or (method == "svd" and error < 1e-6))
    truncation = _relative(trunc_sq, target_sq)
    result = CombineResult(out, method, weights, out_rank, layers, error, truncation, exact)
    base = next(((p.metadata or {}).get("base") for p in parents if (p.metadata or {}).get("base")), None)
    precision = next(((p.metadata or {}).get("precision") for p in parents
                      if (p.metadata or {}).get("precision")), None)
    combination = {k: v for k, v in result.summary().items() if k != "layers"}
    combination.update(density=density if method in ("ties", "dare") else None,
                       seed=seed if method == "dare" else None)
    metadata = new_metadata(
        base=base, precision=precision,
        parents=[{"path": str(p.path.resolve()), "ref": p.ref, "weight": p.weight, "r": p.config.r,
                  "lora_alpha": p.config.lora_alpha, "use_rslora": p.config.use_rslora,
                  "base": _base_name(p)} for p in parents],
        combination=combination,
    )
    with atomic_output(out, directory=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config_text = json.dumps(config_to_peft_dict(config), indent=2, sort_keys=True) + "\n"
        (tmp / CONFIG_NAME).write_text(config_text, encoding="utf-8")
        (tmp / METADATA_NAME).write_text(metadata_text(metadata), encoding="utf-8")
    return result


def _base_name(parent: Parent) -> str | None:
    return ((parent.metadata or {}).get("base") or {}).get("name") or parent.config.base_model_name_or_path


def format_result(result: CombineResult, echo: Callable[[str], None] = print, per_layer: bool = True) -> None:
    """Print the relative error of each module and overall (the CLI's output)."""
    kind = "exact" if result.exact else "approximate"
    echo(f"combined with {result.method} (weights {result.weights}), rank {result.rank}: {kind}")
    if per_layer:
        width = max(len(r.module) for r in result.layers)
        echo(f"  {'module'.ljust(width)}  rank  rel. error vs weighted sum  of which rank cut")
        for r in result.layers:
            echo(f"  {r.module.ljust(width)}  {r.rank:>4}  {r.error:>26.3e}  {r.truncation:>16.3e}")
    echo(f"overall relative error vs the weighted sum of the deltas: {result.error:.3e} "
         f"(rank cut: {result.truncation:.3e})")
    echo(f"adapter written to {result.out}")


__all__ = ["CombineError", "CombineResult", "LayerResult", "METHODS", "combine_adapters", "format_result"]
