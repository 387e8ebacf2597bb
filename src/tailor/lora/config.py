"""LoraConfig: which modules get LoRA adapters and how, with PEFT's field names and meanings."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .initialisation import changes_base, init_problem

ALL_LINEAR = "all-linear"
BIAS_CHOICES = ("none", "all", "lora_only")


class LoraConfigError(ValueError):
    """A LoraConfig field has a bad value; the message names the field, the value and the fix."""


@dataclass
class LoraConfig:
    """How to add LoRA adapters to a model (PEFT's `LoraConfig` fields, same names, same meanings).

    Each targeted weight W (d_out x d_in) gets a trainable low-rank update:
    ``W x  ->  W x + scaling * B A x`` with A: (r, d_in), B: (d_out, r), ``scaling = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with rsLoRA, https://arxiv.org/abs/2312.03732).

    Raises:
        LoraConfigError: listing every bad field at once, with the valid choices.
    """

    r: int = 8
    """Rank of the update B A."""
    lora_alpha: float = 8
    """Numerator of the scaling factor alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input (0 means no dropout work at all)."""
    target_modules: list[str] | str | None = None
    """Module names (suffix match on '.'), a regex (full match on the module path), or "all-linear"
    (every nn.Linear / Conv1D except the output head). None: PEFT's default for the model type."""
    target_parameters: list[str] | None = None
    """Parameters adapted directly (PEFT's ``target_parameters``): names matched as suffixes of
    ``<module path>.<parameter name>`` (e.g. "mlp.experts.gate_up_proj", "gate.weight"), no regex. For the
    3-D expert stacks of mixture-of-experts models (E, d_out, d_in) that are not nn.Linear: each expert e
    gets its own rank-r update ``scaling * B_e A_e`` (tailor.lora.experts). "all-linear" fills it in for
    MoE models as PEFT does."""
    exclude_modules: list[str] | str | None = None
    """Module names (suffix match) or a regex (full match) never to adapt."""
    bias: str = "none"
    """Which base biases train too: "none", "all", or "lora_only" (biases of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA (https://arxiv.org/abs/2402.09353): W' = m * (W + s B A) / ||W + s B A|| per output row, with the
    magnitude m trained too (tailor.lora.dora). Linear, Conv1D and Embedding layers; not target_parameters."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zeros (output unchanged at start); "gaussian": A ~ N(0, 1/r);
    False: A and B both random (for tests: the adapter changes the output immediately); "pissa" (full SVD),
    "pissa_niter_K" (fast randomised SVD, K iterations) and "olora" (QR) move the top-r part of each base
    weight into B A and leave the residual in the base (tailor.lora.initialisation; saved as a rank-2r LoRA
    on the original base)."""
    modules_to_save: list[str] | None = None
    """Modules trained and saved whole (e.g. a classifier head), matched by name suffix."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt these layer indices (list target_modules only)."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list (e.g. "layers", "h") used to read the layer index."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: {regex matched against the module path's end: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha: {regex matched against the module path's end: alpha}."""
    fan_in_fan_out: bool = False
    """Weight stored as (in, out); forced True for GPT-2 style Conv1D layers."""
    base_model_name_or_path: str | None = None
    """Informational: which base model the adapter was trained on."""
    task_type: str | None = None
    """Informational (PEFT task type, e.g. "CAUSAL_LM", "SEQ_CLS")."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_parameters, (tuple, set)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        problems = _problems(self)
        if problems:
            raise LoraConfigError("Invalid LoraConfig:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraConfig:
        """Build from a plain dict; unknown keys are refused (PEFT files go through tailor.adapters)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoraConfigError(f"Unknown LoraConfig field(s) {unknown}; valid fields: {sorted(known)}.")
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_names(name: str, value: Any, problems: list[str]) -> None:
    """A module-name field: None, a regex string or a list of strings."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            problems.append(f"{name}={value!r} is not a valid regular expression ({exc}).")
    elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        problems.append(f"{name}={value!r} must be None, a regex string or a list of non-empty module names.")


def _problems(c: LoraConfig) -> list[str]:
    problems: list[str] = []
    # The rank and alpha rule of tailor's config and planner (tailor.config.sections.lora_shape_problems),
    # kept here as its own guard for direct users of the lora API: tailor.lora imports nothing of tailor.
    if not _is_int(c.r) or c.r <= 0:
        problems.append(f"r={c.r!r} must be a positive integer (typical: 8, 16, 32).")
    if not _is_number(c.lora_alpha) or c.lora_alpha <= 0:
        problems.append(f"lora_alpha={c.lora_alpha!r} must be a positive number (typical: r or 2*r).")
    if not _is_number(c.lora_dropout) or not 0.0 <= c.lora_dropout < 1.0:
        problems.append(f"lora_dropout={c.lora_dropout!r} must be a number in [0, 1).")
    _check_names("target_modules", c.target_modules, problems)
    _check_names("exclude_modules", c.exclude_modules, problems)
    params = c.target_parameters
    names_ok = isinstance(params, list) and all(isinstance(p, str) and p for p in params)
    if params is not None and not names_ok:
        problems.append(f"target_parameters={params!r} must be None or a list of parameter names "
                        "(e.g. ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']).")
    elif params and (c.lora_dropout or c.fan_in_fan_out):
        problems.append("target_parameters cannot be combined with lora_dropout > 0 or fan_in_fan_out (as in "
                        "PEFT: the update is added to the parameter, so x cannot be dropped out).")
    if c.bias not in BIAS_CHOICES:
        problems.append(f"bias={c.bias!r} must be one of {list(BIAS_CHOICES)}.")
    init = init_problem(c.init_lora_weights)
    if init:
        problems.append(init)
    elif changes_base(c.init_lora_weights):
        if c.target_parameters:
            problems.append(f"init_lora_weights={c.init_lora_weights!r} applies to linear layers; "
                            "target_parameters (expert stacks) cannot take it: use True or 'gaussian'.")
        if c.use_rslora and (c.rank_pattern or c.alpha_pattern):
            problems.append(f"init_lora_weights={c.init_lora_weights!r} with use_rslora and rank_pattern or "
                            "alpha_pattern cannot be converted to a LoRA on the original base at save (as in "
                            "PEFT); drop use_rslora or the patterns.")
    if c.modules_to_save is not None and not (
        isinstance(c.modules_to_save, list) and all(isinstance(m, str) and m for m in c.modules_to_save)
    ):
        problems.append(f"modules_to_save={c.modules_to_save!r} must be None or a list of module names.")
    layers = c.layers_to_transform
    layers_ok = _is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))
    if layers is not None and not layers_ok:
        problems.append(f"layers_to_transform={layers!r} must be None, an int or a list of ints.")
    if isinstance(c.target_modules, str) and c.target_modules != ALL_LINEAR:
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(c, name) is not None:
                problems.append(
                    f"{name} cannot be used when target_modules is a regex string ({c.target_modules!r}); "
                    "put the layer index into the regex or pass a list of module names."
                )
    if c.layers_pattern and layers is None:
        problems.append("layers_pattern needs layers_to_transform (which layer indices to adapt).")
    for name, want_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = getattr(c, name)
        if not isinstance(pattern, dict):
            problems.append(f"{name}={pattern!r} must be a dict {{module regex: value}}.")
            continue
        for key, value in pattern.items():
            good = (_is_int(value) if want_int else _is_number(value)) and value > 0
            if not isinstance(key, str) or not good:
                kind = "positive int" if want_int else "positive number"
                problems.append(f"{name}[{key!r}]={value!r}: keys must be strings and values a {kind}.")
    if not isinstance(c.use_rslora, bool):
        problems.append(f"use_rslora={c.use_rslora!r} must be True or False.")
    if not isinstance(c.use_dora, bool):
        problems.append(f"use_dora={c.use_dora!r} must be True or False.")
    elif c.use_dora and c.target_parameters:
        problems.append(f"use_dora=True cannot adapt target_parameters {c.target_parameters} (mixture-of-"
                        "experts parameters; PEFT refuses DoRA there too): target linear layers with "
                        "target_modules, or set use_dora=False.")
    if not isinstance(c.fan_in_fan_out, bool):
        problems.append(f"fan_in_fan_out={c.fan_in_fan_out!r} must be True or False.")
    return problems
