"""Per-row adapters: every row of a batch uses its own LoRA adapter, taken from a bank of fixed slots.

Serving many adapters on one base model (S-LoRA https://arxiv.org/abs/2311.03285, Punica
https://arxiv.org/abs/2310.18547, vLLM's LoRA slots): the base matmul is shared by all rows, and the LoRA
term of the whole batch is one gathered computation over per-layer slot tensors::

    A_bank (S+1, d_in, R)   B_bank (S+1, R, d_out)      slot S is all zeros: "no adapter"
    y[b] = W0 x[b] + (x[b] @ A_bank[s_b]) @ B_bank[s_b]   s_b = the slot of row b

An adapter of rank r <= R fills ``A_bank[s, :, :r] = A^T`` and ``B_bank[s, :r, :] = scaling * B^T``; the
zero padding contributes exactly nothing. Rows are the segments: a row's tokens (its whole prompt at
prefill, one token at decode) share one slot, so each layer gathers R x (d_in + d_out) weights per row,
never per token, and the batch runs as two batched matmuls (``bmm``) with no loop over rows or slots.
When every row uses the same slot (one tenant, or evaluation) the gather is skipped (plain matmuls);
when no row uses an adapter in a layer, the layer adds nothing.

Decode steps (one token per row) keep the gathered weights: each layer holds a copy of every row's A and B
(``row_a`` (B, d_in, R), ``row_b`` (B, R, d_out)) and refreshes only the rows whose slot changed since
the last step (a request joined, left or moved rows; a slot was rewritten). With one token per row the
LoRA term is memory-bound (every row reads its own adapter: 625 MB a step for 32 rows of r=16 all-linear
adapters on SmolLM2-135M in fp32); re-gathering them in every layer at every step also wrote them into
fresh buffers before the ``bmm`` read them (`benchmarks/lora_rows_decode.py`: the term alone 4.5x
faster with the copies kept; whole engine decode steps 1.05-1.33x). The copies cost one adapter per
running row; the engine frees them when idle (`LoraSlots.drop_row_copies`).

DoRA adapters (``use_dora``) fit the same banks: at inference their row norm ``||W + s B A||`` is a
constant, so a slot holds g = m / ||W + s B A|| per output row: g folded into B, and g - 1 in a third bank
``gain`` (S+1, d_out), allocated with the first DoRA adapter. A row using such a slot first rescales the base
output, ``y += (g - 1) * (y - bias)``, then adds its LoRA term: PEFT's DoRA output, per row.

Parameters adapted directly (MoE experts and routers, ``target_parameters``: tailor.lora.experts) hold
their slots as PEFT's tensors (A (r*E, d_in), scaling * B (d_out, r*E)); their module runs once per group of
rows sharing a slot, with that slot's update added to the parameter (``experts.ParamSlotBank``).

The slots live beside the layers' named adapters (``add_lora``), which still apply to every row as before.
Usage::

    slots = add_lora_slots(model, num_slots=8, max_rank=16)       # wraps all linear layers but the head
    slots.write(0, {"model.layers.0.self_attn.q_proj": (A, B, scaling), ...})
    with slots.rows([0, -1, 0]):                                  # row 1: the bare base model
        logits = model(input_ids).logits
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from . import dora
from .config import ALL_LINEAR, LoraConfig
from .experts import LoraParam, ParamSlotBank, nested_paths, registration_order, wrap_parameter
from .inject import _replace_module, pattern_value, plan_lora
from .layer import LoraLayer, LoraLinear, lora_scaling, wrap_layer

NO_ADAPTER = -1  # a row's slot when it uses no adapter


class SlotError(ValueError):
    """Adapter weights that do not fit the slots (module, shape or rank); nothing was written."""


@dataclasses.dataclass(eq=False)
class SlotBank:
    """One layer's slot tensors: ``a`` (S+1, d_in, R) and ``b`` (S+1, R, d_out), scaling folded into b."""

    table: LoraSlots
    a: torch.Tensor
    b: torch.Tensor
    used: set[int] = dataclasses.field(default_factory=set)  # slots holding weights for this layer
    row_a: torch.Tensor | None = None  # (rows, d_in, R): decode rows' A, copied from their slots
    row_b: torch.Tensor | None = None  # (rows, R, d_out)
    row_slots: list[int] = dataclasses.field(default_factory=list)  # slot held by row i (-1: none yet)
    row_key: tuple[int, ...] | None = None  # the rows' slots the copies were last brought up to date for
    bias: torch.Tensor | None = None  # the base layer's bias (DoRA rescales the output without it)
    gain: torch.Tensor | None = None  # (S+1, d_out): g - 1 of DoRA slots, zeros elsewhere; None until one
    dora: set[int] = dataclasses.field(default_factory=set)  # slots holding a DoRA adapter for this layer

    def add_to(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (the base layer's output, (rows, ..., d_out)) plus each row's LoRA term for x.

        With no gradient flowing, the term is accumulated into result in place (``addmm_``/``baddbmm_``:
        one pass over result, no (rows, ..., d_out) term materialised). When the banks' dtype differs
        from result's (fp32 banks on a bf16 model), that fused path is taken for rows of at least R
        tokens (prefill), in result's dtype: the thin A and B are cast, not the activations. Otherwise
        (decode, autograd) the term is computed in the banks' dtype and the sum formed in the wider
        dtype, then cast back, as the named adapters do.
        """
        table = self.table
        uniform = table.uniform
        if uniform is not None:
            if uniform not in self.used:
                return result
            if uniform in self.dora:
                result = self._rescale(result, self.gain[uniform])  # (d_out,) over every row
            a, b = self.a[uniform], self.b[uniform]  # (d_in, R), (R, d_out)
            tokens = x.numel() // x.shape[-1]
            if self._fuses(result, tokens):
                flat = result.view(-1, result.shape[-1])  # (N, d_out)
                h = x.reshape(-1, x.shape[-1]).to(result.dtype) @ a.to(result.dtype)  # (N, d_in) @ (d_in, R)
                flat.addmm_(h, b.to(result.dtype))  # += (N, R) @ (R, d_out)
                return result
            return self._add(result, (table.cast(x) @ a) @ b)
        if self.used.isdisjoint(table.row_set):
            return result
        rows, d_in = x.shape[0], x.shape[-1]
        tokens = x.numel() // (rows * d_in)  # per row
        if not self.dora.isdisjoint(table.row_set):
            gain = self.gain.index_select(0, table.index)  # (B, d_out); zeros for rows of other slots
            result = self._rescale(result, gain.view(rows, *[1] * (result.dim() - 2), -1))  # (B, 1, d_out)
        if tokens == 1:  # decode: the rows' weights, kept from the last step (no gather)
            a, b = self._row_weights()
        else:
            a = self.a.index_select(0, table.index)  # (B, d_in, R): gathered once per row, not per token
            b = self.b.index_select(0, table.index)  # (B, R, d_out)
        if self._fuses(result, tokens):
            h = torch.bmm(x.reshape(rows, -1, d_in).to(result.dtype), a.to(result.dtype))  # -> (B, T, R)
            target = result.view(rows, -1, result.shape[-1])  # (B, T, d_out)
            target.baddbmm_(h, b.to(result.dtype))  # += (B, T, R) @ (B, R, d_out)
            return result
        x_in = table.cast(x).reshape(rows, -1, d_in)  # (B, T, d_in): a row's tokens share its slot
        term = torch.bmm(torch.bmm(x_in, a), b)  # (B, T, d_in) @ (B, d_in, R) @ (B, R, d_out)
        return self._add(result, term.reshape(*x.shape[:-1], term.shape[-1]))

    def _row_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's (A, B) as views (B, d_in, R), (B, R, d_out) of the per-row copies, after copying
        the slots of the rows that changed since the last call."""
        slots = self.table.values
        rows = len(slots)
        if slots == self.row_key:  # the usual decode step: the same requests in the same rows
            return self.row_a[:rows], self.row_b[:rows]
        if self.row_a is None or self.row_a.shape[0] < rows:  # grow, keeping the rows already copied
            kept = 0 if self.row_a is None else self.row_a.shape[0]
            row_a = self.a.new_empty((rows, *self.a.shape[1:]))
            row_b = self.b.new_empty((rows, *self.b.shape[1:]))
            if kept:
                row_a[:kept], row_b[:kept] = self.row_a, self.row_b
            self.row_a, self.row_b = row_a, row_b
            self.row_slots += [-1] * (rows - kept)
        changed = [row for row in range(rows) if self.row_slots[row] != slots[row]]
        if changed:
            where = torch.tensor(changed, device=self.a.device)
            which = torch.tensor([slots[row] for row in changed], device=self.a.device)
            self.row_a.index_copy_(0, where, self.a.index_select(0, which))
            self.row_b.index_copy_(0, where, self.b.index_select(0, which))
            for row in changed:
                self.row_slots[row] = slots[row]
        self.row_key = slots
        return self.row_a[:rows], self.row_b[:rows]

    def _rescale(self, result: torch.Tensor, gain_minus_one: torch.Tensor) -> torch.Tensor:
        """DoRA's rescaled base output: result + (g - 1) * (result - bias), before the LoRA term is added."""
        base_out = result if self.bias is None else result - self.bias
        return self._add(result, gain_minus_one * base_out)

    def forget_slot(self, slot: int) -> None:
        """The slot's weights change: rows holding a copy of it copy it again at their next step."""
        if slot in self.row_slots:
            self.row_slots = [-1 if held == slot else held for held in self.row_slots]
            self.row_key = None

    def drop_row_copies(self) -> None:
        self.row_a = self.row_b = self.row_key = None
        self.row_slots = []

    def _fuses(self, result: torch.Tensor, tokens: int) -> bool:
        """Accumulate in place? Never under autograd; across dtypes only for >= R tokens per row."""
        if result.requires_grad or not result.is_contiguous():
            return False
        return result.dtype == self.a.dtype or tokens >= self.a.shape[-1]

    @staticmethod
    def _add(result: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        if result.requires_grad:
            return (result + term).to(result.dtype)
        return result.add_(term)  # in place: computed in the wider dtype, cast back once


class SlottedLinear(LoraLinear):
    """A `LoraLinear` that also adds each row's adapter from its slot bank (`LoraSlots`).

    The slots are the server's: the layer's own named adapters (training, `add_lora`) keep working
    beside them, and a layer stays wrapped while it has slots, adapters or not.
    """

    unwrap_when_empty = False
    slot_bank: SlotBank

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # LoraLayer.forward written out, not called: one Python call less per layer and decode step
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        delta = self.lora_delta(x, result=result)
        if delta is not None:
            result = (result + delta).to(result.dtype)
        return self.slot_bank.add_to(x, result)  # each row's own adapter, for the whole batch at once


class LoraSlots:
    """Fixed adapter slots on a model's LoRA layers, and which slot each row of the next forward uses.

    Create with ``add_lora_slots``. ``write``/``clear`` change one slot's weights (between forwards: a
    forward reads the banks as they are); ``rows`` sets the per-row slots for the forwards in its block.

    Args:
        layers: {module path: LoraLinear} that get a bank.
        num_slots: S, adapters held at once.
        max_rank: R, the largest rank a slot takes (smaller ranks are zero padded).
        dtype: the banks' dtype (float32: PEFT's adapter precision).
    """

    def __init__(self, layers: Mapping[str, SlottedLinear], num_slots: int, max_rank: int,
                 dtype: torch.dtype = torch.float32, params: Mapping[str, LoraParam] | None = None) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots={num_slots} and max_rank={max_rank} must both be >= 1.")
        self.num_slots, self.max_rank, self.dtype = num_slots, max_rank, dtype
        self.layers = dict(layers)
        self.params = dict(params or {})  # {parameter key: LoraParam}
        self._registration = registration_order(self.params)  # fixed now: adapters load during forwards
        self.index: torch.Tensor | None = None  # (B,) slot per row, num_slots meaning none
        self.values: tuple[int, ...] = ()  # the same as a tuple
        self.uniform: int | None = num_slots  # the slot every row uses; None when rows differ
        self.row_set: frozenset[int] = frozenset()
        self._cast: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (x, x._version, x in dtype)
        for layer in self.layers.values():
            device = layer.base_layer.weight.device
            a = torch.zeros(num_slots + 1, layer.in_features, max_rank, dtype=dtype, device=device)
            b = torch.zeros(num_slots + 1, max_rank, layer.out_features, dtype=dtype, device=device)
            layer.slot_bank = SlotBank(self, a, b, bias=getattr(layer.base_layer, "bias", None))
        for param in self.params.values():
            param.slot_bank = ParamSlotBank(self)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """x in the banks' dtype; q/k/v (and gate/up) get the same input tensor: it is converted once."""
        if x.dtype == self.dtype:
            return x
        version = -1 if torch.is_inference(x) else x._version  # inference tensors have no version counter
        cached = self._cast
        if cached is not None and cached[0] is x and cached[1] == version:
            return cached[2]
        converted = x.to(self.dtype)
        self._cast = (x, version, converted)
        return converted

    @property
    def device(self) -> torch.device:
        if self.layers:
            return next(iter(self.layers.values())).slot_bank.a.device
        return next(iter(self.params.values())).get_param().device

    def adapter_weights(self, config: LoraConfig, halves: Mapping[str, Sequence[torch.Tensor]]
                        ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], int]:
        """An adapter's saved tensors {saved module path: (A, B)} as `write` takes them, {key: (A, B,
        scaling)}, and its largest rank. Module paths stay; PEFT's nested parameter paths
        (``<module>[.base_layer]``) become parameter keys (``<module>.<parameter>``), whose rank is
        A's rows / E. Scaling uses `config`'s alpha (alpha_pattern: module path or parameter key)."""
        paths = nested_paths(self.params, config.target_parameters or [], self._registration)
        weights, rank = {}, 0
        for path, (a, b) in halves.items():
            key = paths.get(path, path)
            r = a.shape[0] // self.params[key].num_experts if key in self.params else a.shape[0]
            alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
            weights[key] = (a, b, lora_scaling(max(r, 1), alpha, config.use_rslora))
            rank = max(rank, r)
        return weights, rank

    def check(self, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Refuse weights that would not fit: unknown module, wrong shapes, rank above max_rank.

        Raises:
            SlotError: naming the module, the shapes and the fix.
        """
        unknown = sorted(set(weights) - set(self.layers) - set(self.params))
        if unknown:
            raise SlotError(f"the adapter has weights for modules without slots: {unknown[:3]} "
                            f"({len(unknown)} in all); slots exist for {len(self.layers)} linear layers, "
                            f"e.g. {sorted(self.layers)[:2]}"
                            + (f", and {len(self.params)} parameters (target_parameters)." if self.params
                               else "."))
        for path, (a, b, _) in weights.items():
            if path in self.params:  # PEFT's (r*E, d_in) and (d_out, r*E)
                layer = self.params[path]
                experts = layer.num_experts
                r = a.shape[0] // experts
                fits = (a.shape == (r * experts, layer.in_features)
                        and b.shape == (layer.out_features, r * experts))
                if not fits or r == 0:
                    raise SlotError(f"parameter {path!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}"
                                    " "
                                    f"do not fit {experts} expert(s) of ({layer.out_features} x "
                                    f"{layer.in_features}); was the adapter trained on another base model?")
                if r > self.max_rank:
                    raise SlotError(f"parameter {path!r} has rank {r}, above max_lora_rank={self.max_rank}; "
                                    "raise max_lora_rank (all-linear on an MoE model gives the experts' "
                                    "gate_up_proj twice the rank, as PEFT does) or use a lower rank.")
                continue
            layer = self.layers[path]
            r = a.shape[0]
            if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
                raise SlotError(f"module {path!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                                f"not fit a ({layer.out_features} x {layer.in_features}) layer; was the "
                                "adapter trained on another base model?")
            if r > self.max_rank:
                raise SlotError(f"module {path!r} has rank {r}, above max_lora_rank={self.max_rank}; raise "
                                "max_lora_rank or use an adapter of lower rank.")

    @torch.no_grad()
    def prepare(self, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                magnitudes: Mapping[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
        """Check one adapter's weights and put them in the banks' layout and dtype, scaling folded into
        B: {module path: (A^T (d_in, r), scaling * B^T (r, d_out))}. Slow work that needs no slot (a
        server does it while loading, off the step loop); `write_prepared` then only copies.

        `magnitudes` {module path: m (d_out,)}: a DoRA adapter's; its layers get (A^T, g * scaling * B^T,
        g - 1) with g = m / ||W + scaling B A|| from the layer's base weight.

        Raises:
            SlotError: see `check`, and magnitudes for modules the weights lack or of the wrong shape.
        """
        self.check(weights)
        magnitudes = magnitudes or {}
        for path, magnitude in magnitudes.items():
            layer = self.layers.get(path)
            if path not in weights or layer is None or tuple(magnitude.shape) != (layer.out_features,):
                raise SlotError(f"module {path!r}: DoRA magnitude of shape {tuple(magnitude.shape)} has no "
                                "lora_A/lora_B pair on a linear layer with slots, or does not fit its "
                                f"{getattr(layer, 'out_features', '?')} output rows; save the adapter again.")
        prepared = {}
        for path, (a, b, scaling) in weights.items():
            if path in self.params:  # kept in PEFT's layout, scaling folded into B
                prepared[path] = (a.to(self.dtype).contiguous(),
                                  (b.to(torch.float32) * scaling).to(self.dtype).contiguous())
                continue
            a_t = a.T.to(self.dtype).contiguous()  # (r, d_in) -> (d_in, r)
            if path in magnitudes:
                gain = self._dora_gain(self.layers[path], a, b, scaling, magnitudes[path])  # (d_out,)
                b_t = (b.to(torch.float32) * scaling * gain[:, None]).T.to(self.dtype).contiguous()
                prepared[path] = (a_t, b_t, (gain - 1).to(self.dtype))
                continue
            b_t = (b.to(torch.float32) * scaling).T.to(self.dtype).contiguous()  # (d_out, r) -> (r, d_out)
            prepared[path] = (a_t, b_t)
        return prepared

    @staticmethod
    def _dora_gain(layer: LoraLinear, a: torch.Tensor, b: torch.Tensor, scaling: float,
                   magnitude: torch.Tensor) -> torch.Tensor:
        """g = m / ||W + scaling B A|| per output row (fp32), W the layer's (dequantized) base weight."""
        device = layer.base_layer.weight.device
        norm = dora.linear_norm(layer.base_layer, a.to(device), b.to(device), scaling, layer.fan_in_fan_out)
        return magnitude.to(device, torch.float32) / norm

    @torch.no_grad()
    def write(self, slot: int, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Put one adapter into `slot`: {module path: (A (r, d_in), B (d_out, r), scaling)}.

        Layers the adapter does not name get zeros in that slot. All weights are checked first.

        Raises:
            SlotError: see `check`; IndexError: slot outside [0, num_slots).
        """
        self.write_prepared(slot, self.prepare(weights))

    @torch.no_grad()
    def write_prepared(self, slot: int, prepared: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
        """Put an adapter from `prepare` into `slot` (copies only; ranks below max_rank zero padded)."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside [0, {self.num_slots}).")
        unknown = set(prepared) - set(self.layers) - set(self.params)
        if unknown:
            raise SlotError(f"prepared weights for modules without slots: {sorted(unknown)[:3]}.")
        for key, param in self.params.items():
            if key in prepared:
                a, b = prepared[key]
                param.slot_bank.weights[slot] = (a, b, 1.0)
            else:
                param.slot_bank.weights.pop(slot, None)
        for path, layer in self.layers.items():
            bank = layer.slot_bank
            bank.forget_slot(slot)
            gain = prepared[path][2] if path in prepared and len(prepared[path]) == 3 else None
            if gain is not None:
                if bank.gain is None:
                    bank.gain = bank.b.new_zeros(bank.b.shape[0], bank.b.shape[2])  # (S+1, d_out)
                bank.gain[slot].copy_(gain)
                bank.dora.add(slot)
            elif slot in bank.dora:
                bank.gain[slot].zero_()
                bank.dora.discard(slot)
            if path in prepared:
                a_t, b_t = prepared[path][:2]
                r = a_t.shape[1]
                if r < self.max_rank and slot in bank.used:  # the padding must be zero
                    bank.a[slot, :, r:].zero_()
                    bank.b[slot, r:].zero_()
                bank.a[slot, :, :r].copy_(a_t)
                bank.b[slot, :r].copy_(b_t)
                bank.used.add(slot)
            elif slot in bank.used:  # a layer this adapter leaves alone: zeros (never-used slots are)
                bank.a[slot].zero_()
                bank.b[slot].zero_()
                bank.used.discard(slot)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Empty `slot` (rows using it then get no adapter term)."""
        self.write(slot, {})

    def set_rows(self, slots: Sequence[int] | torch.Tensor | None) -> None:
        """The slot of each row for the following forwards (NO_ADAPTER = -1 for the bare base); None: none."""
        self._cast = None
        if slots is None:
            self.index, self.values, self.uniform, self.row_set = None, (), self.num_slots, frozenset()
            return
        values = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
        bad = [s for s in values if not (s == NO_ADAPTER or 0 <= s < self.num_slots)]
        if bad:
            raise IndexError(f"row slots {bad[:3]} are outside [0, {self.num_slots}) and not {NO_ADAPTER}.")
        values = tuple(self.num_slots if s == NO_ADAPTER else s for s in values)
        self.values, self.row_set = values, frozenset(values)
        self.uniform = values[0] if len(self.row_set) == 1 else None
        self.index = torch.tensor(values, dtype=torch.long, device=self.device)

    def drop_row_copies(self) -> None:
        """Free the decode rows' copies of their adapters (the next decode step copies them again)."""
        for layer in self.layers.values():
            layer.slot_bank.drop_row_copies()

    @contextlib.contextmanager
    def rows(self, slots: Sequence[int] | torch.Tensor) -> Iterator[LoraSlots]:
        """Within the block, row b of every forward uses adapter slot ``slots[b]`` (-1: none)."""
        self.set_rows(slots)
        try:
            yield self
        finally:
            self.set_rows(None)


def add_lora_slots(
    model: nn.Module, num_slots: int, max_rank: int, target_modules: str | list[str] = ALL_LINEAR,
    dtype: torch.dtype = torch.float32, target_parameters: list[str] | None = None,
) -> LoraSlots:
    """Give the targeted linear layers (default: all but the output head; on an MoE model also the experts'
    and routers' parameters, as "all-linear" resolves them) `num_slots` adapter slots.

    Layers are wrapped in ``SlottedLinear`` (a ``LoraLinear``); a layer that is a ``LoraLinear`` already
    becomes one in place (its named adapters, added before or after, keep working). Returns the
    `LoraSlots` that fills the slots and sets the rows' slots.

    Raises:
        LoraTargetError: the targets match nothing; ValueError: a target is not a linear layer, or the
            model already has slots.
    """
    plan = plan_lora(model, LoraConfig(r=1, target_modules=target_modules,
                                       target_parameters=target_parameters))
    layers: dict[str, SlottedLinear] = {}
    for path, module, _, _ in plan.targets:
        layer = module if isinstance(module, LoraLayer) else wrap_layer(module)
        if not isinstance(layer, LoraLinear):
            raise ValueError(f"{path!r} is a {type(layer.base_layer).__name__}; adapter slots go on linear "
                             "layers only.")
        if isinstance(layer, SlottedLinear):
            raise ValueError(f"{path!r} already has adapter slots; add them once per model.")
        if type(layer) is not LoraLinear:
            raise ValueError(f"{path!r} is a {type(layer).__name__}; adapter slots go on LoraLinear layers.")
        layer.__class__ = SlottedLinear  # the same module (adapters, place kept); its forward adds slots
        if layer is not module:
            _replace_module(model, path, layer)
        layers[path] = layer
    params: dict[str, LoraParam] = {}
    for path, name, _, _ in plan.parameters:
        param = wrap_parameter(model, path, name)
        if param.slot_bank is not None:
            raise ValueError(f"{path}.{name!r} already has adapter slots; add them once per model.")
        params[f"{path}.{name}"] = param
    return LoraSlots(layers, num_slots, max_rank, dtype, params=params)


__all__ = ["NO_ADAPTER", "LoraSlots", "SlotBank", "SlotError", "SlottedLinear", "add_lora_slots"]
