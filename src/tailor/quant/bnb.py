"""Quantized frozen bases for QLoRA with bitsandbytes: 4-bit NF4 (`Linear4bit`) and 8-bit (`Linear8bitLt`).

`quantize_model` swaps the linear layers of the transformer blocks for bitsandbytes layers in place; LoRA
(tailor.lora) then wraps them like any nn.Linear (they subclass it and keep in_features/out_features).
The bitsandbytes layers dequantize their weight on the fly in forward and backward; only the input
gradient flows through them (the adapter beside them is what trains).

Left unquantized, as transformers' bitsandbytes integration does (`get_keys_to_not_convert`): the
output head (and a classifier head, the module holding the model's last parameter), tied weights,
embeddings and norms. Those stay in the model's dtype (bf16 for QLoRA): PEFT's
`prepare_model_for_kbit_training` casts them to fp32, which measured 1.2-1.5x slower per step here.

bitsandbytes is imported lazily (only a QLoRA run needs it). Two of its messages are dropped, narrowly,
by message on the logger that emits them (`_quiet_bitsandbytes`).

The trap this module closes (measured with bitsandbytes 0.50.2 on a CPU with avx512_bf16): a
`Linear4bit` forward in eval() with an input that needs no gradient (validation under no_grad) repacks
the weight *in place* into a CPU inference layout (and rounds its absmax to bf16). Back in train(),
`matmul_4bit` sees that layout and takes its inference kernel, which has no autograd: the layer's input
gradient is silently dropped (with a bias: an in-place error), so every LoRA gradient below it is wrong.
(A layer whose out_features is not a multiple of 32 fails the repack outright: an AssertionError.)
Validation in the middle of training (tailor.train's EvaluationHook) triggered it. `quantize_model`
therefore switches the repack off per layer (`cpu_inference_repack=False`), so evaluation and training
see the same weights and kernels; tests/test_quant.py checks gradients after an evaluation.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from tailor.lora.dora import register_dequantizer

KINDS = ("nf4", "int8")
INSTALL_HINT = "pip install 'tailor[qlora]' (or pip install bitsandbytes)"
# LLM.int8() outlier threshold: transformers' BitsAndBytesConfig(llm_int8_threshold=6.0), what PEFT's
# QLoRA recipes train on. On CPU, training steps dequantize the int8 weight (bitsandbytes' MatMul8bitFp)
# and the threshold only affects eval-mode forwards.
INT8_THRESHOLD = 6.0


class MissingDependencyError(ImportError, ValueError):
    """An optional dependency is not installed (a ValueError too, so the CLI reports it as bad input)."""


def _method_name(kind: str) -> str:
    return f"qlora-{kind}"


def require_bitsandbytes(method: str = "qlora-nf4", what: str = "method") -> None:
    """Raise MissingDependencyError (with the install command) unless bitsandbytes is importable; `what`
    `method` names who needs it (`optimizer adamw-8bit` too). Cheap: looks the package up, no import."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(f"{what} {method} needs bitsandbytes: {INSTALL_HINT}")


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes`; everything else passes."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# logger name -> message prefixes bitsandbytes logs that say nothing a tailor user can act on
_QUIET = {
    # Logged at import on CPUs with avx512_bf16: an optional Hub kernel package (`kernels`) for the CPU
    # inference repack is missing. tailor switches that repack off (see the module docstring) and never
    # downloads kernels at run time, so the warning only alarms.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # Logged on *every* int8 forward in eval mode (validation, generation): bf16 activations are cast to
    # fp16 for LLM.int8(), by design of the method.
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast from",),
}


def _quiet_bitsandbytes() -> None:
    """Install the filters (idempotent). A filter on the emitting logger, matched by message, keeps every
    other bitsandbytes warning visible; it must be in place before the import that logs the first one."""
    for name, prefixes in _QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


def import_bitsandbytes(method: str = "qlora-nf4") -> Any:
    """The bitsandbytes module, imported with its import-time kernel message dropped.

    Raises:
        MissingDependencyError: bitsandbytes is not installed (the message says how to install it).
    """
    _quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as error:
        if error.name is not None and error.name != "bitsandbytes":  # installed but broken: show why
            raise
        raise MissingDependencyError(f"method {method} needs bitsandbytes: {INSTALL_HINT}") from None
    return bitsandbytes


# ------------------------------------------------------------------------------------------------ layers
def _bnb_classes() -> tuple[type, ...]:
    """The bitsandbytes linear classes, or () when bitsandbytes was never imported (then no layer is)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit or 8-bit linear layer."""
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module path: bitsandbytes linear layer}, also inside LoRA wrappers (path ending .base_layer)."""
    classes = _bnb_classes()
    if not classes:
        return {}
    return {k: m for k, m in model.named_modules() if isinstance(m, classes)}


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where the submodule at `path` is."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _kept_unquantized(model: nn.Module, skip: Iterable[str]) -> set[str]:
    """Module paths transformers' integration leaves in full precision, plus the `skip` suffixes' matches."""
    keep: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    params = list(model.named_parameters())
    last_owner = params[-1][0].rpartition(".")[0] if params else None  # e.g. score / classifier
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    tied_owners = {k.removesuffix(".weight") for pair in tied.items() for k in pair}
    skip = list(skip)
    for key, module in model.named_modules():
        skipped = any(key == s or key.endswith(f".{s}") for s in skip)
        if skipped or module is head or key == last_owner or key in tied_owners:
            keep.add(key)
    return keep


def quantization_targets(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of the nn.Linear layers QLoRA quantizes: all but the output head, tied weights, a
    classifier head and modules whose path ends with a `skip` entry (embeddings and norms are not
    nn.Linear)."""
    keep = _kept_unquantized(model, skip)
    return [(k, m) for k, m in model.named_modules()
            if isinstance(m, nn.Linear) and not is_quantized_layer(m) and k not in keep]


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, kind: str = "nf4",
                     compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True,
                     cpu_inference_repack: bool = False, training: bool = False) -> nn.Module:
    """A bitsandbytes layer holding `weight` (out_features, in_features) quantized on the weight's device
    (kind "nf4": `Linear4bit`; "int8": `Linear8bitLt`), computing in `compute_dtype`; `bias` kept as is."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; choose one of {', '.join(KINDS)}")
    bnb = import_bitsandbytes(_method_name(kind))
    weight = weight.detach()
    device = weight.device
    out_features, in_features = weight.shape
    has_bias = bias is not None
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type="nf4", device="meta")
        # Params4bit quantizes when moved to a device (CUDA or CPU alike): here, where the weight already is.
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                         quant_type="nf4", module=layer).to(device)
        if not cpu_inference_repack:
            # See the module docstring: an eval-mode CPU forward would repack the weight in place and the
            # next training step would silently lose this layer's input gradient.
            layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        # Int8Params quantizes only when moved from the CPU to a device (transformers stages it the same
        # way); on a CPU model this is no copy.
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False,
                                         has_fp16_weights=False).to(device)
    if has_bias:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    layer.train(training)
    return layer


@torch.no_grad()
def quantize_model(model: nn.Module, kind: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16,
                   double_quant: bool = True, skip: Iterable[str] = (),
                   cpu_inference_repack: bool = False) -> nn.Module:
    """Replace the nn.Linear layers of the transformer blocks by bitsandbytes layers, in place.

    kind "nf4": `Linear4bit`, 4-bit NormalFloat with blocks of 64 and (double_quant) 8-bit absmax in
    blocks of 256, computing in `compute_dtype` (QLoRA, https://arxiv.org/abs/2305.14314). kind "int8":
    `Linear8bitLt`, per-row int8 (LLM.int8(), https://arxiv.org/abs/2208.07339; has_fp16_weights=False,
    outlier threshold 6.0 as transformers' default). Each layer is quantized on the device its weight is
    on (a model on CUDA is quantized there). The output head, tied weights, a classifier head and modules
    whose path ends with a `skip` entry stay as they are; so do embeddings and norms (not nn.Linear).
    `cpu_inference_repack=True` restores bitsandbytes' in-place CPU inference repack of 4-bit weights:
    only for a model that is never trained again (see the module docstring). A model loaded already
    quantized (tailor.models.load_model(quantize=...)) is returned as it is.

    Returns `model`.

    Raises:
        MissingDependencyError: bitsandbytes is not installed.
        ValueError: unknown kind, LoRA already on the model (quantize first), or no layer to quantize.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; choose one of {', '.join(KINDS)}")
    import_bitsandbytes(_method_name(kind))
    from tailor.lora import lora_configs, lora_layers

    if lora_layers(model) or lora_configs(model):
        raise ValueError("the model already has LoRA adapters: quantize the base first, then add_lora.")
    targets = quantization_targets(model, skip)
    if not targets and quantized_layers(model):
        return model  # quantized as it was loaded
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize (outside the output "
                         "head and the skipped modules); bitsandbytes quantizes nn.Linear only.")
    for key, linear in targets:
        replace_module(model, key, quantized_linear(linear.weight, linear.bias, kind, compute_dtype,
                                                    double_quant, cpu_inference_repack, linear.training))
    return model


def dequantized_weight(layer: nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The (out_features, in_features) weight a bitsandbytes linear layer computes with, in `dtype`."""
    bnb = import_bitsandbytes()
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward: undo it first
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
            weight.data, weight.quant_state = data, state
        return bnb.functional.dequantize_4bit(data, state).to(dtype)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scb = _int8_scales(layer)
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb).to(dtype)
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes Linear4bit / Linear8bitLt layer")


def _dequantized_for_dora(layer: nn.Module) -> torch.Tensor:
    """DoRA's norm and W x read the weight the layer computes with (fp32 holds every NF4 / int8 value)."""
    return dequantized_weight(layer, torch.float32)


# a DoRA adapter on a bitsandbytes layer dequantizes its weight, as PEFT does (tailor.lora.dora)
register_dequantizer(is_quantized_layer, _dequantized_for_dora)


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    """Per-row absmax of an int8 layer: on the weight until the first forward, on the layer's state after."""
    scb = getattr(layer.weight, "SCB", None)
    return scb if scb is not None else layer.state.SCB


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every bitsandbytes linear layer (also inside LoRA wrappers) by a plain nn.Linear holding
    the dequantized weight in `dtype` (bias cast to `dtype`), frozen, in place. Returns `model`."""
    for key, layer in quantized_layers(model).items():
        weight = dequantized_weight(layer, dtype)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta", dtype=dtype)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        plain.train(layer.training)
        replace_module(model, key, plain)
    return model


# ------------------------------------------------------------------------------------------------- bytes
class QuantizedBytes(NamedTuple):
    """Stored bytes of the quantized layers' weights (packed data + quantization state, each tensor once)
    and of the same weights in bf16."""

    quantized: int
    bf16: int
    layers: int

    @property
    def ratio(self) -> float:
        return self.quantized / self.bf16 if self.bf16 else math.nan


def _state_tensors(state: Any) -> list[torch.Tensor]:
    """Tensors of a bitsandbytes QuantState (absmax, code, offset), recursing into the nested state2."""
    found = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif type(value).__name__ == "QuantState":
            found += _state_tensors(value)
    return found


def quantized_weight_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """The tensors a bitsandbytes linear layer stores for its weight (not the bias)."""
    weight = layer.weight
    tensors = [weight.data]
    state = getattr(weight, "quant_state", None)
    if state is not None:
        tensors += _state_tensors(state)
    else:  # int8
        scb = _int8_scales(layer)
        if scb is not None:
            tensors.append(scb)
    return tensors


def frozen_weight_bytes(model: nn.Module) -> QuantizedBytes:
    """Bytes the quantized layers' weights occupy in memory (packed data plus absmax / scales and the code
    tables bitsandbytes keeps per layer, ~1 KiB each; a tensor shared by layers counted once) against the
    same weights in bf16. NF4 with double quantization: ~0.26x for layers of a few hundred features."""
    seen: set[tuple[int, str]] = set()
    quantized = bf16 = 0
    layers = quantized_layers(model)
    for layer in layers.values():
        bf16 += layer.in_features * layer.out_features * 2
        for tensor in quantized_weight_tensors(layer):
            key = (tensor.untyped_storage().data_ptr(), str(tensor.device))
            if key in seen:
                continue
            seen.add(key)
            quantized += tensor.numel() * tensor.element_size()
    return QuantizedBytes(quantized=quantized, bf16=bf16, layers=len(layers))


__all__ = ["INT8_THRESHOLD", "KINDS", "MissingDependencyError", "QuantizedBytes", "dequantize_model",
           "dequantized_weight", "frozen_weight_bytes", "import_bitsandbytes", "is_quantized_layer",
           "quantization_targets", "quantize_model", "quantized_layers", "quantized_linear",
           "quantized_weight_tensors", "replace_module", "require_bitsandbytes"]
