"""LoRA layers: a frozen base layer plus named low-rank adapters, kept separable.

::

    x ──► base_layer ─────────────────────────────┐
    │                                             (+) ──► y
    └──► dropout ──► A (r x d_in) ──► B (d_out x r) ──► * scaling ┘

The base call and the adapter term are two separate calls (``base_layer(x)`` and ``lora_delta(x)``),
so a quantized base layer or a per-row (multi-adapter) delta can replace either side alone. A DoRA
adapter (``use_dora``, tailor.lora.dora) also reads the base output: its term rescales it per row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .initialisation import changes_base, decompose, quantized_weight

try:  # GPT-2 style Conv1D (weight stored (in, out)); transformers is optional for lora/
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

ADAPTER_DTYPE = torch.float32


def init_lora_pair(a: nn.Linear, b: nn.Linear, init: bool | str, r: int) -> None:
    """PEFT's initialisation of a new adapter (reset_lora_parameters): `init` True, A kaiming-uniform like
    nn.Linear's default and B zero, so the adapter changes nothing at the start; "gaussian", A ~ N(0, 1/r)
    and B zero; False leaves both as created (random: for tests). PiSSA and OLoRA, which read the base
    weight, are the layer's (`LoraLinear.add_adapter`, tailor.lora.initialisation)."""
    if init is True:
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
    elif init == "gaussian":
        nn.init.normal_(a.weight, std=1 / r)
        nn.init.zeros_(b.weight)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (https://arxiv.org/abs/2312.03732)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_term(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * x A^T B^T`` for one adapter. x (..., d_in), a (r, d_in), b (d_out, r) -> (..., d_out)."""
    return F.linear(F.linear(x, a), b) * scaling


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast compute dtype for x's device, or None when autocast is off."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class LoraLayer(nn.Module):
    """Bookkeeping shared by the LoRA layers: named adapters, which are active, merged, disabled.

    Attribute lookups that the wrapper does not know fall through to the base layer (``.weight``,
    ``.in_features``, ``.nf`` ...), so model code that inspects its layers keeps working.
    """

    # A layer left without named adapters goes back to its base module (`delete_adapter`), unless a
    # subclass adds a term of its own (per-row adapter slots, `tailor.lora.rows.SlottedLinear`).
    unwrap_when_empty = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # DoRA adapters' magnitudes, one per output row (PEFT's name; absent for plain LoRA adapters)
        self.lora_magnitude_vector = nn.ParameterDict()
        # {adapter: ||W + s B A|| per row} of merged DoRA adapters: unmerging needs the norm of the unmerged W
        self.merged_norms: dict[str, torch.Tensor] = {}
        # {adapter: (what it was computed from, ||W + s B A||)}: DoRA's norm kept between inference forwards
        self._norm_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        # {adapter: its tensors as initialised (fp32, PEFT key suffixes)} for the adapters whose init moved
        # part of the base weight into them (PiSSA, OLoRA): the save converts them for the original base.
        self.initial_tensors: dict[str, dict[str, torch.Tensor]] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _record(self, name: str, r: int, alpha: float, use_rslora: bool) -> None:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r} for adapter {name!r}.")
        if name in self.r:
            raise ValueError(f"This layer already has an adapter named {name!r}.")
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)

    def uses_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def _forget(self, name: str) -> None:
        for table in (self.r, self.lora_alpha, self.scaling, self.initial_tensors):
            table.pop(name, None)
        if name in self.lora_magnitude_vector:  # ParameterDict.pop takes no default
            del self.lora_magnitude_vector[name]
        self.merged_norms.pop(name, None)
        self._norm_cache.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's update in the base weight's layout, computed in fp32."""
        raise NotImplementedError

    def _unmerged_active(self) -> list[str]:
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        delta = self.lora_delta(x, result=result)
        if delta is not None:
            # PEFT semantics: the sum is formed in the wider of the two dtypes, then cast back once.
            result = (result + delta).to(result.dtype)
        return result

    def lora_delta(self, x: torch.Tensor, names: Sequence[str] | None = None,
                   result: torch.Tensor | None = None) -> torch.Tensor | None:
        """The adapters' terms summed; `result`, the base output, is needed by DoRA adapters only."""
        raise NotImplementedError

    def _so_far(self, name: str, result: torch.Tensor | None, total: torch.Tensor | None) -> torch.Tensor:
        """The output before DoRA adapter `name`: the base output plus the adapters before it (PEFT adds the
        active adapters in turn, each DoRA term rescaling what is there)."""
        if result is None:
            raise ValueError(f"Adapter {name!r} is a DoRA adapter: its term needs the base output (result=).")
        return result if total is None else result + total


class LoraLinear(LoraLayer):
    """LoRA around an ``nn.Linear`` or a GPT-2 ``Conv1D``: ``y = W0 x + b + sum_k s_k B_k A_k dropout(x)``.

    Per adapter name k: ``lora_A[k].weight`` (r, d_in), ``lora_B[k].weight`` (d_out, r), both fp32
    (https://arxiv.org/abs/2106.09685); ``s_k = alpha / r`` (or ``alpha / sqrt(r)``). For Conv1D the base
    weight is stored (d_in, d_out) (``fan_in_fan_out``); A and B keep the Linear layout and only the
    merged delta is transposed. x is cast to the adapter dtype for the branch; the output keeps the
    base output's dtype. With ``use_dora`` an adapter also has ``lora_magnitude_vector[k]`` (d_out,) and
    its term is DoRA's (tailor.lora.dora.linear_term).

    Args:
        base_layer: the frozen ``nn.Linear`` / ``Conv1D`` (or a compatible quantized layer exposing
            ``in_features``/``out_features``).
        fan_in_fan_out: base weight layout is (in, out).

    Shapes:
        x: (..., d_in) -> (..., d_out)

    Raises:
        ValueError: unsupported base layer, non-positive rank, duplicate adapter name.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        init: bool | str = True, use_dora: bool = False,
    ) -> None:
        self._record(name, r, alpha, use_rslora)
        device = self.base_layer.weight.device
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=ADAPTER_DTYPE)
        b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        init_lora_pair(a, b, init, r)
        self.lora_A[name], self.lora_B[name] = a, b
        # nn.Identity when p == 0: no dropout kernel, no mask memory.
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if changes_base(init):
            self._take_from_base(name, init)
        if use_dora:  # after the init: the magnitude is the norm of the weight the adapter starts on
            weight = dora.base_weight(self.base_layer)
            self.lora_magnitude_vector[name] = dora.new_magnitude(
                weight, self.delta_weight(name).to(weight.device), self.fan_in_fan_out, ADAPTER_DTYPE)

    def check_base_changing_init(self, r: int) -> None:
        """Refuse PiSSA/OLoRA where they cannot run: a quantized base weight, a rank above the weight's,
        or a second such adapter on this layer (its decomposition would be of the first's residual)."""
        weight = self.base_layer.weight
        if quantized_weight(weight):
            raise ValueError(
                "init_lora_weights PiSSA/OLoRA changes the base weight, and this "
                f"{type(self.base_layer).__name__} is quantized; use method lora (a float base), or "
                "init_lora_weights true or gaussian with QLoRA.")
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"init_lora_weights PiSSA/OLoRA needs r <= min(d_in, d_out) = "
                             f"{min(self.in_features, self.out_features)}, got r={r}; lower the rank.")
        if self.initial_tensors:
            held = next(iter(self.initial_tensors))
            raise ValueError(f"This layer already holds a PiSSA/OLoRA adapter ({held!r}); one adapter per "
                             "layer may start from the base weight.")

    @torch.no_grad()
    def _take_from_base(self, name: str, init: str) -> None:
        """PiSSA / OLoRA: A0, B0 from the base weight W (fp32, Linear layout); W <- W - s B0 A0 in place."""
        self.check_base_changing_init(self.r[name])
        weight = self.base_layer.weight
        w = weight.float().T if self.fan_in_fan_out else weight.float()  # (d_out, d_in)
        a0, b0 = decompose(w, self.r[name], self.scaling[name], init)
        residual = w - self.scaling[name] * (b0 @ a0)
        weight.data = (residual.T if self.fan_in_fan_out else residual).contiguous().to(weight.dtype)
        self.lora_A[name].weight.copy_(a0)
        self.lora_B[name].weight.copy_(b0)
        self.initial_tensors[name] = {"lora_A.weight": a0.clone(), "lora_B.weight": b0.clone()}

    @torch.no_grad()
    def give_back_to_base(self, name: str) -> None:
        """W <- W + s B0 A0: the base gets back what PiSSA/OLoRA took for adapter `name` (none for other
        inits; none when the adapter is merged, since W + s B A then holds the trained model)."""
        initial = self.initial_tensors.pop(name, None)
        if initial is None or name in self.merged_adapters:
            return
        weight = self.base_layer.weight
        taken = self.scaling[name] * (initial["lora_B.weight"] @ initial["lora_A.weight"])  # (d_out, d_in)
        taken = taken.T if self.fan_in_fan_out else taken
        weight.data = (weight.float() + taken.to(weight.device)).to(weight.dtype)

    def delete_adapter(self, name: str) -> None:
        self.give_back_to_base(name)
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        self._forget(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        magnitude = [self.lora_magnitude_vector[name]] if self.uses_dora(name) else []
        return [self.lora_A[name].weight, self.lora_B[name].weight, *magnitude]

    def lora_delta(self, x: torch.Tensor, names: Sequence[str] | None = None,
                   result: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sum of the adapters' terms (default: active, unmerged ones) in fp32, or None if there are none.
        `result` (the base output) is needed when one of them is a DoRA adapter."""
        total = None
        compute_dtype = autocast_dtype(x)
        for name in self._unmerged_active() if names is None else names:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            if self.uses_dora(name):
                term = dora.linear_term(
                    x.to(compute_dtype or a.dtype), self._so_far(name, result, total), a=a, b=b,
                    dropout=self.lora_dropout[name], scaling=self.scaling[name],
                    magnitude=self.lora_magnitude_vector[name], norm=self._dora_norm(name, a, b),
                    base_layer=self.base_layer, fan_in_fan_out=self.fan_in_fan_out, training=self.training)
                total = term if total is None else total + term
                continue
            if compute_dtype is not None:
                # Under autocast cast the thin (r x d) weights, not the (tokens x d) activation: casting
                # x up to fp32 only for autocast to cast it back down costs two full copies per layer.
                # The fp32 weights stay the optimizer's master copy; their gradients arrive in fp32.
                x_in, a, b = x.to(compute_dtype), a.to(compute_dtype), b.to(compute_dtype)
            else:
                x_in = x.to(a.dtype)
            term = lora_term(self.lora_dropout[name](x_in), a, b, self.scaling[name])
            total = term if total is None else total + term
        return total

    def _dora_norm(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """DoRA's ``||W + s B A||`` for adapter `name`. In training it is computed in every forward, as PEFT
        does; at inference (eval mode, no gradient: generation, evaluation) it is kept while A, B and W are
        unchanged (same storage, same version counter): a decode step would otherwise form W + s B A in
        every layer for one token."""
        weight = self.base_layer.weight
        if self.training or torch.is_grad_enabled() or any(map(torch.is_inference, (a, b, weight))):
            self._norm_cache.pop(name, None)  # (inference tensors have no version counter to key on)
            return dora.linear_norm(self.base_layer, a, b, self.scaling[name], self.fan_in_fan_out)
        key = (a.data_ptr(), a._version, b.data_ptr(), b._version, weight.data_ptr(), weight._version)
        cached = self._norm_cache.get(name)
        if cached is None or cached[0] != key:
            norm = dora.linear_norm(self.base_layer, a, b, self.scaling[name], self.fan_in_fan_out)
            cached = self._norm_cache[name] = (key, norm)
        return cached[1]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = _at_least_fp32(self.lora_A[name].weight, self.lora_B[name].weight)
        delta = (b @ a) * self.scaling[name]  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta


class LoraEmbedding(LoraLayer):
    """LoRA around an ``nn.Embedding``: ``y = E[x] + s * (A^T[x]) B^T``.

    ``lora_embedding_A[k]`` is (r, num_embeddings), ``lora_embedding_B[k]`` (embedding_dim, r), fp32
    (PEFT's layout and names). Init swaps the roles of the Linear case: A zeros, B normal. No dropout
    (as PEFT). A base ``embed_scale`` (Gemma-style scaled embeddings) also scales the adapter term.
    With ``use_dora``: ``lora_magnitude_vector[k]`` (embedding_dim,), PEFT's DoRA for embeddings
    (tailor.lora.dora.embedding_term).

    Shapes:
        x: (...) int64 -> (..., embedding_dim)
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        init: bool | str = True, use_dora: bool = False,
    ) -> None:
        self._record(name, r, alpha, use_rslora)
        device = self.base_layer.weight.device
        a = torch.randn(r, self.num_embeddings, device=device, dtype=ADAPTER_DTYPE)
        b = torch.randn(self.embedding_dim, r, device=device, dtype=ADAPTER_DTYPE)
        if init is not False:
            nn.init.zeros_(a)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        if use_dora:
            self.lora_magnitude_vector[name] = dora.new_magnitude(
                self.base_layer.weight, self.delta_weight(name), True, ADAPTER_DTYPE)
        if changes_base(init):  # PEFT leaves embeddings at their usual init; recorded so that the save of an
            # adapter converted for the original base gives every layer the same doubled rank
            self.initial_tensors[name] = {"lora_embedding_A": a.detach().clone(),
                                          "lora_embedding_B": b.detach().clone()}

    def delete_adapter(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]
        self._forget(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        magnitude = [self.lora_magnitude_vector[name]] if self.uses_dora(name) else []
        return [self.lora_embedding_A[name], self.lora_embedding_B[name], *magnitude]

    def lora_delta(self, x: torch.Tensor, names: Sequence[str] | None = None,
                   result: torch.Tensor | None = None) -> torch.Tensor | None:
        base = self.base_layer
        embed_scale = getattr(base, "embed_scale", None)
        total = None
        for name in self._unmerged_active() if names is None else names:
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            rows = F.embedding(  # (..., r)
                x, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
            )
            if self.uses_dora(name):
                term = dora.embedding_term(
                    rows, self._so_far(name, result, total), a=a, b=b, scaling=self.scaling[name],
                    magnitude=self.lora_magnitude_vector[name], base_layer=base, embed_scale=embed_scale)
                total = term if total is None else total + term
                continue
            term = (rows @ b.T) * self.scaling[name]  # (..., r) @ (r, dim) -> (..., dim)
            if embed_scale is not None:
                term = term * embed_scale.to(term.dtype)
            total = term if total is None else total + term
        return total

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = _at_least_fp32(self.lora_embedding_A[name], self.lora_embedding_B[name])
        return ((b @ a) * self.scaling[name]).T  # (dim, num_embeddings) -> (num_embeddings, dim)


def _at_least_fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """fp32 for the merge arithmetic, float64 kept (a float64 check of a merge must not round to fp32)."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear, a Conv1D (weight (in, out)) or a layer exposing in/out_features."""
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    raise ValueError(f"Cannot add LoRA to {type(layer).__name__}: use nn.Linear, Conv1D, nn.Embedding.")


def is_conv1d(layer: nn.Module) -> bool:
    return isinstance(layer, Conv1D)


def wrap_layer(layer: nn.Module, fan_in_fan_out: bool = False) -> LoraLayer:
    """A new LoRA wrapper (no adapters yet) around a supported base layer."""
    if isinstance(layer, nn.Embedding):
        return LoraEmbedding(layer)
    if isinstance(layer, Conv1D):
        return LoraLinear(layer, fan_in_fan_out=True)
    if isinstance(layer, nn.Linear):
        return LoraLinear(layer, fan_in_fan_out=fan_in_fan_out)
    raise ValueError(
        f"Cannot add LoRA to a {type(layer).__name__}: supported layers are nn.Linear, GPT-2 Conv1D and "
        "nn.Embedding. Target the linear layers inside it instead."
    )


MAGNITUDE_KEY = "lora_magnitude_vector"  # PEFT's key suffix of a DoRA magnitude (no ".weight" on disk)


def adapter_shapes(layer: nn.Module, r: int, use_dora: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes of one adapter's tensors (PEFT key suffixes) for a base layer or an existing LoRA layer."""
    base = layer.base_layer if isinstance(layer, LoraLayer) else layer
    if isinstance(base, nn.Embedding):
        num, dim = base.weight.shape
        magnitude = {MAGNITUDE_KEY: (dim,)} if use_dora else {}
        return {"lora_embedding_A": (r, num), "lora_embedding_B": (dim, r), **magnitude}
    d_in, d_out = linear_features(base)
    magnitude = {MAGNITUDE_KEY: (d_out,)} if use_dora else {}
    return {"lora_A.weight": (r, d_in), "lora_B.weight": (d_out, r), **magnitude}


def adapter_tensors(layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors keyed by PEFT's key suffixes (adapter name stripped)."""
    magnitude = {MAGNITUDE_KEY: layer.lora_magnitude_vector[name]} if layer.uses_dora(name) else {}
    if isinstance(layer, LoraEmbedding):
        return {"lora_embedding_A": layer.lora_embedding_A[name],
                "lora_embedding_B": layer.lora_embedding_B[name], **magnitude}
    return {"lora_A.weight": layer.lora_A[name].weight, "lora_B.weight": layer.lora_B[name].weight,
            **magnitude}
