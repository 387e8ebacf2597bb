"""LoRA on parameters rather than modules: PEFT's ``target_parameters`` (``lora.ParamWrapper``).

Mixture-of-experts models in transformers 5 keep their experts as 3-D parameters of one module
(Mixtral / Qwen3-MoE: ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I)),
and their router as a 2-D ``mlp.gate.weight`` of a custom module, so there is no ``nn.Linear`` to wrap.
PEFT adapts such a parameter by adding a low-rank update to the parameter itself while the module runs
(``W -> W + dW``, through ``torch.nn.utils.parametrize``); tailor does the same, with PEFT's shapes, names
and nesting, so the saved tensors are PEFT's:

- a parameter of shape (E, d1, d2) is read as E experts of ``in_features = d1``, ``out_features = d2``,
  swapped (``in = d2``, ``out = d1``: the nn.Linear layout, transformers' default) unless the module sets
  ``is_transposed``; a 2-D parameter (d_out, d_in) is one expert;
- ``lora_A.weight`` is (r*E, in) and ``lora_B.weight`` (out, r*E); expert e's update is
  ``dW_e = scaling * B_e A_e`` with A read as (E, r, in) (``A_e = A[e*r:(e+1)*r]``) and B as (out, r, E)
  (``B_e = B[:, e::E]``): ``einsum("o r e, e r i -> e o i")`` (``-> e i o`` for a transposed layout);
- each wrapper adapts one parameter; several parameters of one module nest, the first parameter in
  registration order innermost, so the keys are ``<module>.base_layer.lora_A.weight`` (gate_up_proj) and
  ``<module>.lora_A.weight`` (down_proj), as PEFT writes them;
- no dropout and no fan_in_fan_out (x never meets the update on its own).

Serving rows with different adapters (``tailor.lora.rows``): a wrapper with a slot bank runs its module
once per group of rows that share an adapter slot, with that slot's update added to the parameter. The
update is formed per step (E * d_out * d_in values per adapted parameter and distinct slot).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layer import ADAPTER_DTYPE, LoraLayer, init_lora_pair


class _AddDelta(nn.Module):
    """The parametrization ``W -> W + dW``: the sum formed in fp32 at least, cast back to W's dtype."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(weight.dtype, self.delta.dtype)
        return (weight.to(wide) + self.delta.to(weight.device, wide)).to(weight.dtype)


class LoraParam(LoraLayer):
    """LoRA on one parameter of `base_layer` (PEFT's ``ParamWrapper``): W (E, ...) gets ``scaling * B_e A_e``
    per expert e while the module runs. Nested wrappers adapt several parameters of one module.

    Args:
        base_layer: the module holding the parameter, or another LoraParam around it.
        parameter_name: the parameter's name on the innermost module ("gate_up_proj", "weight", ...).

    Raises:
        ValueError: the parameter is not 2-D or 3-D.
    """

    # serving's per-row adapter slots for this parameter (tailor.lora.rows.ParamSlotBank), set by
    # add_lora_slots; None outside serving
    slot_bank = None

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.get_param().shape
        if len(shape) == 3:
            num_experts, d_in, d_out = shape
        elif len(shape) == 2:
            num_experts, d_in, d_out = 1, shape[1], shape[0]
        else:
            raise ValueError(f"LoRA on parameter {parameter_name!r}: it has {len(shape)} dimensions; "
                             "only 2-D and 3-D parameters can be adapted.")
        # PEFT: 3-D stacks are (E, out, in) (swap) unless the module says it stores (E, in, out)
        self.swapped = len(shape) == 3 and not getattr(self.get_base_layer(), "is_transposed", False)
        if self.swapped:
            d_in, d_out = d_out, d_in
        self.num_experts, self.in_features, self.out_features = num_experts, d_in, d_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def get_base_layer(self) -> nn.Module:
        """The module that holds the parameter (below every nested LoraParam)."""
        module = self.base_layer
        while isinstance(module, LoraParam):
            module = module.base_layer
        return module

    def get_param(self) -> torch.Tensor:
        module = self.get_base_layer()
        if parametrize.is_parametrized(module, self.parameter_name):
            return module.parametrizations[self.parameter_name].original
        return getattr(module, self.parameter_name)

    def chain(self) -> list[LoraParam]:
        """This wrapper and the LoraParams nested below it, outermost first."""
        layers, module = [], self
        while isinstance(module, LoraParam):
            layers.append(module)
            module = module.base_layer
        return layers

    # -- adapters
    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        init: bool | str = True,
    ) -> None:
        if dropout:
            raise ValueError(f"LoRA on parameter {self.parameter_name!r} cannot use lora_dropout={dropout} "
                             "(as PEFT: the update is added to the weight, x cannot be dropped out).")
        self._record(name, r, alpha, use_rslora)
        device = self.get_param().device
        a = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=device, dtype=ADAPTER_DTYPE)
        b = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        init_lora_pair(a, b, init, r)  # PEFT's reset_lora_parameters, on the (r*E, in) A
        self.lora_A[name], self.lora_B[name] = a, b

    def delete_adapter(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]
        self._forget(name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name].weight, self.lora_B[name].weight]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B_e A_e`` for every expert, in the parameter's layout, fp32 (autograd flows)."""
        return expert_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                            self.num_experts, self.swapped, self.get_param().dim())

    # -- forward
    def lora_delta(self, x: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor | None:
        raise NotImplementedError("LoraParam adds its update to the parameter, not to an output.")

    def _named_delta(self) -> torch.Tensor | None:
        total = None
        for name in [] if self.disabled else self._unmerged_active():
            delta = self.delta_weight(name)
            total = delta if total is None else total + delta
        return total

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward with every adapted parameter of the chain replaced by W + dW (named active
        adapters; with slots, each group of rows also its slot's update)."""
        chain = self.chain()
        module = chain[-1].base_layer
        named = {layer.parameter_name: layer._named_delta() for layer in chain}
        banks = [layer for layer in chain if layer.slot_bank is not None and not layer.disabled]
        table = banks[0].slot_bank.table if banks else None
        if table is None or table.uniform == table.num_slots or not any(
                layer.slot_bank.used for layer in banks):
            with _parametrized(module, named):
                return module(*args, **kwargs)
        if table.uniform is not None:  # every row the same slot
            with _parametrized(module, _with_slot(named, banks, table.uniform)):
                return module(*args, **kwargs)
        return _grouped_forward(module, named, banks, table.values, args, kwargs)

    def __repr__(self) -> str:
        return f"LoraParam(parameter_name={self.parameter_name!r}, base_layer={self.base_layer!r})"


def expert_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, num_experts: int, swapped: bool,
                 ndim: int) -> torch.Tensor:
    """PEFT's ParamWrapper.get_delta_weight in fp32: a (r*E, in), b (out, r*E) -> (E, out, in) when
    `swapped` (the nn.Linear layout), (E, in, out) otherwise; (out, in) for a 2-D parameter."""
    a, b = a.float(), b.float()
    if ndim == 2:
        return (b @ a) * scaling
    a3 = a.reshape(num_experts, -1, a.shape[-1])  # (E, r, in)
    b3 = b.reshape(b.shape[0], -1, num_experts)  # (out, r, E)
    return torch.einsum("ore,eri->eoi" if swapped else "ore,eri->eio", b3, a3) * scaling


@contextlib.contextmanager
def _parametrized(module: nn.Module, deltas: Mapping[str, torch.Tensor | None]) -> Iterator[None]:
    """Within the block, ``module.<name>`` reads W + delta for each non-None delta (computed once)."""
    deltas = {name: d for name, d in deltas.items() if d is not None}
    if not deltas:
        yield
        return
    order = list(module._parameters)
    for name, delta in deltas.items():
        parametrize.register_parametrization(module, name, _AddDelta(delta), unsafe=True)
    try:
        with parametrize.cached():
            yield
    finally:
        for name in deltas:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        # removal re-registers the parameter last; keep the registration order, which decides PEFT's
        # nesting of the wrappers (and so the saved keys) and the module's state_dict order
        params = module._parameters
        module._parameters = {k: params[k] for k in order if k in params} | params


# ---------------------------------------------------------------------------------------------- slots
class ParamSlotBank:
    """One LoraParam's adapter slots: {slot: (A (r*E, in), B (out, r*E), scaling)} (PEFT's tensors as
    stored, in the table's dtype), and the table that says which slot each row uses."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    @property
    def used(self) -> set[int]:
        return set(self.weights)

    def delta(self, layer: LoraParam, slot: int) -> torch.Tensor | None:
        held = self.weights.get(slot)
        if held is None:
            return None
        a, b, scaling = held
        return expert_delta(a, b, scaling, layer.num_experts, layer.swapped, layer.get_param().dim())


def _with_slot(named: dict[str, torch.Tensor | None], banks: list[LoraParam], slot: int
               ) -> dict[str, torch.Tensor | None]:
    deltas = dict(named)
    for layer in banks:
        extra = layer.slot_bank.delta(layer, slot)
        if extra is not None:
            own = deltas.get(layer.parameter_name)
            deltas[layer.parameter_name] = extra if own is None else own + extra
    return deltas


def _grouped_forward(module: nn.Module, named: dict, banks: list[LoraParam], slots: Sequence[int],
                     args: tuple, kwargs: dict) -> Any:
    """Run `module` once per distinct slot over that slot's rows and put the outputs back in row order.

    The module must treat the tokens of its input independently (an experts stack or a router): tensor
    arguments whose first dimension is rows x tokens (Mixtral / Qwen3-MoE flatten (B, T, H) to (B*T, H),
    row b's tokens contiguous) are split by row; every output tensor is put back the same way.
    """
    rows = len(slots)
    first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    n = first.shape[0]
    if n % rows:
        raise RuntimeError(f"LoRA slots on {type(module).__name__}: its input has {n} tokens, not a multiple "
                           f"of the {rows} rows; per-row parameter adapters need (rows x tokens, ...) "
                           "inputs.")
    per_row = n // rows
    token_row = torch.arange(n, device=first.device) // per_row
    slot_of_row = torch.tensor(list(slots), device=first.device)

    def take(value: Any, index: torch.Tensor) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value.index_select(0, index)
        return value

    outputs: list[tuple[torch.Tensor, Any]] = []
    for slot in sorted(set(slots)):
        index = torch.nonzero(slot_of_row[token_row] == slot).flatten()
        group_args = tuple(take(a, index) for a in args)
        group_kwargs = {k: take(v, index) for k, v in kwargs.items()}
        with _parametrized(module, _with_slot(named, banks, slot)):
            outputs.append((index, module(*group_args, **group_kwargs)))

    def stitch(parts: list[tuple[torch.Tensor, Any]]) -> Any:
        sample = parts[0][1]
        if isinstance(sample, torch.Tensor):
            full = sample.new_empty((n, *sample.shape[1:]))
            for index, part in parts:
                full.index_copy_(0, index, part)
            return full
        if isinstance(sample, tuple):
            return tuple(stitch([(i, p[k]) for i, p in parts]) for k in range(len(sample)))
        raise RuntimeError(f"LoRA slots on {type(module).__name__}: cannot put back an output of type "
                           f"{type(sample).__name__}.")

    return stitch(outputs)


# ---------------------------------------------------------------------------------------------- targets
def parameter_matches(targets: Sequence[str], key: str) -> bool:
    """PEFT's rule: ``<module path>.<parameter>`` equals a target or ends with ``.<target>``."""
    return any(key == t or key.endswith(f".{t}") for t in targets)


def target_parameter_keys(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, str]]:
    """(module path, parameter name) of every parameter `targets` names, module paths as on the bare model
    (wrappers' ``base_layer`` segments removed), in module then registration order (PEFT's nesting order)."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            continue
        bare = strip_base_layer(path)
        for name, _ in module.named_parameters(recurse=False):
            if parameter_matches(targets, f"{bare}.{name}" if bare else name):
                found.append((bare, name))
    return found


def strip_base_layer(path: str) -> str:
    return ".".join(part for part in path.split(".") if part != "base_layer")


def saved_paths(model: nn.Module, targets: Sequence[str]) -> dict[str, str]:
    """{module path the tensors are saved under: parameter key} for an adapter with these
    target_parameters: with k adapted parameters on one module, the i-th (registration order) sits under
    ``<module>`` + ``.base_layer`` * (k - 1 - i), as PEFT nests its wrappers."""
    by_module: dict[str, list[str]] = {}
    for path, name in target_parameter_keys(model, targets):
        by_module.setdefault(path, []).append(name)
    paths = {}
    for path, names in by_module.items():
        for i, name in enumerate(names):
            paths[path + ".base_layer" * (len(names) - 1 - i)] = f"{path}.{name}"
    return paths


def adapter_shapes(model: nn.Module, path: str, name: str, r: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one adapter's tensors for parameter `name` of the module at bare path `path`:
    lora_A (r*E, in), lora_B (out, r*E), without wrapping anything."""
    module = model.get_submodule(path)
    while isinstance(module, LoraParam):
        module = module.base_layer
    shape = getattr(module, name).shape
    num_experts = shape[0] if len(shape) == 3 else 1
    d_in, d_out = (shape[1], shape[2]) if len(shape) == 3 else (shape[1], shape[0])
    if len(shape) == 3 and not getattr(module, "is_transposed", False):
        d_in, d_out = d_out, d_in
    return {"lora_A.weight": (r * num_experts, d_in), "lora_B.weight": (d_out, r * num_experts)}


def registration_order(wrappers: Mapping[str, LoraParam]) -> dict[str, list[str]]:
    """{bare module path: its parameter names in registration order} for the modules of `wrappers`.
    Taken once, outside any forward: a forward parametrizes the adapted parameters, which moves them out of
    the module's ``_parameters`` until it ends (so a live read from another thread sees them missing)."""
    return {key.rpartition(".")[0]: list(layer.get_base_layer()._parameters)
            for key, layer in wrappers.items()}


def nested_paths(wrappers: Mapping[str, LoraParam], targets: Sequence[str],
                 order: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """`saved_paths` from existing wrappers {parameter key: LoraParam} (serving slots): {saved module path:
    parameter key} for an adapter with these target_parameters. `order`: `registration_order` taken
    earlier (serving reads adapters in a loader thread while the engine runs forwards); None reads it now."""
    order = registration_order(wrappers) if order is None else order
    by_module: dict[str, set[str]] = {}
    for key, layer in wrappers.items():
        if parameter_matches(targets, key):
            by_module.setdefault(key.rpartition(".")[0], set()).add(layer.parameter_name)
    paths = {}
    for path, names in by_module.items():
        ordered = [n for n in order[path] if n in names]  # registration order
        for i, name in enumerate(ordered):
            paths[path + ".base_layer" * (len(ordered) - 1 - i)] = f"{path}.{name}"
    return paths


def wrapper_for(model: nn.Module, path: str, name: str) -> LoraParam | None:
    """The LoraParam adapting parameter `name` of the module at bare path `path`, if there is one."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    while isinstance(module, LoraParam):
        if module.parameter_name == name:
            return module
        module = module.base_layer
    return None


def param_wrappers(model: nn.Module) -> dict[str, LoraParam]:
    """{parameter key (bare module path + '.' + name): its LoraParam}."""
    return {f"{strip_base_layer(k)}.{m.parameter_name}": m for k, m in model.named_modules()
            if isinstance(m, LoraParam)}


def wrap_parameter(model: nn.Module, path: str, name: str) -> LoraParam:
    """The LoraParam for parameter `name` of the module at `path`, created (outermost) if missing."""
    existing = wrapper_for(model, path, name)
    if existing is not None:
        return existing
    current = model.get_submodule(path)
    layer = LoraParam(current, name)
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
    return layer


def unwrap_empty(model: nn.Module) -> None:
    """Take out LoraParams left without adapters or slots (innermost first, so paths stay valid)."""
    for path, layer in reversed([(k, m) for k, m in model.named_modules() if isinstance(m, LoraParam)]):
        if layer.adapter_names or layer.slot_bank is not None:
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer.base_layer)


def moe_all_linear(model: nn.Module, linear_keys: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """The parameters PEFT's "all-linear" adapts on a transformers-5 MoE model, and their rank factors.

    PEFT (0.18+) maps the v4 names of Mixtral / Qwen2-MoE-style models onto v5 parameters: the router
    ``gate`` -> ``gate.weight``, the experts' ``w1``/``w3`` (``gate_proj``/``up_proj``) -> the fused
    ``gate_up_proj`` at twice the rank and alpha (two rank-r LoRAs of v4, so alpha / r is unchanged), and
    ``w2`` / ``down_proj`` -> ``down_proj``. Here: every module holding a 3-D ``gate_up_proj`` /
    ``down_proj`` stack (an experts module) and the 2-D ``weight`` of its sibling router ``gate`` (when that
    is not an nn.Linear: those are already among `linear_keys`). Returns (target_parameters, {name: factor}).
    """
    linear = set(linear_keys)
    names: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, LoraLayer)):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name in ("gate_up_proj", "down_proj") and param.dim() == 3:
                names.add(name)
                parent_path = strip_base_layer(path).rpartition(".")[0]
                gate_path = f"{parent_path}.gate" if parent_path else "gate"
                gate = _submodule(model, gate_path)
                gate_param = getattr(gate, "weight", None) if gate is not None else None
                if isinstance(gate_param, torch.Tensor) and gate_param.dim() == 2 and gate_path not in linear:
                    names.add("gate.weight")
    factors = {"gate_up_proj": 2} if "gate_up_proj" in names else {}
    return sorted(names), factors


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


__all__ = ["LoraParam", "ParamSlotBank", "adapter_shapes", "expert_delta", "moe_all_linear", "nested_paths",
           "param_wrappers", "registration_order", "saved_paths", "target_parameter_keys", "wrap_parameter",
           "wrapper_for"]
