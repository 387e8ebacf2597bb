"""QLoRA: LoRA on a frozen base whose block linear layers are stored quantized (tailor.quant, bitsandbytes),
delivered as the same PEFT-format adapter as LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tailor.hardware import precision_for
from tailor.methods.base import cast_weights
from tailor.methods.lora import LoraMethod, start_adapter
from tailor.quant.bnb import require_bitsandbytes

if TYPE_CHECKING:
    from tailor.config import TrainConfig
    from tailor.method_specs import MethodSpec

KIND_FOR_BITS = {4: "nf4", 8: "int8"}


class QLoraMethod(LoraMethod):
    """qlora-nf4: the linear layers of the transformer blocks in 4-bit NF4 with double quantization
    (bitsandbytes `Linear4bit`, bf16 compute; https://arxiv.org/abs/2305.14314); qlora-int8: in 8-bit
    (`Linear8bitLt`, LLM.int8()). Dequantized on the fly in forward and backward; the adapter is LoRA's.

    Precision (why): the adapter weights stay fp32 (the optimizer's master copy), as for LoRA. The parts
    left unquantized (embeddings, norms, output head) stay bf16: PEFT's prepare_model_for_kbit_training
    casts them to fp32, which made steps 1.2-1.5x slower here.

    Cost, measured with benchmarks/qlora_step.py (SmolLM2-135M, r=16 all-linear, batch 8, 2 CPU cores):
    the quantized layers hold 0.259x (NF4) and 0.503x (int8) the bytes of their bf16 weights; the median
    step takes 1.01-1.13x (NF4) and 1.08-1.22x (int8) the bf16 LoRA step (three runs on a shared machine).
    Quality on so small a model: after 12 steps the validation loss was 0.63 (NF4) and 0.51 (int8)
    against LoRA's 0.50 on the bf16 base.

    Validation in the middle of training is safe: tailor.quant switches off bitsandbytes' in-place CPU
    inference repack of 4-bit weights, which otherwise silently dropped input gradients in the steps after
    an evaluation (tests/test_quant.py compares gradients with and without an evaluation in between).
    int8 on CPU: training steps multiply by the dequantized weight, while eval-mode forwards (validation,
    generation) run bitsandbytes' LLM.int8() (int8 activations, fp16 outlier columns): a slightly
    different function, by bitsandbytes' design.

    Deliverable: the adapter only, in PEFT's format: it loads on the quantized base here (`attach`) and
    on a plain bf16 base with PEFT. `merged` (and so `export`) dequantizes the base to bf16 and folds the
    adapter in: a plain bf16 transformers model. Its logits against the adapter on the quantized base
    (tests/test_quant.py, tiny Llama, random B): at most 0.004 (NF4) and 0.005 (int8) apart, where the
    adapter itself moves them by 0.48; merging LoRA into a bf16 base gives 0.004. On SmolLM2-135M with a
    random adapter (B ~ N(0, 0.005^2); logits' std 7): mean |difference| 0.17 (NF4; max 1.5, same argmax
    everywhere) and 0.15 (int8, against the training-mode function; 0.57 against eval-mode LLM.int8()),
    as for LoRA merged into bf16 (0.15, max 1.1): the rounding of W + BA to bf16, not the quantization.
    """

    def __init__(self, spec: MethodSpec):
        super().__init__(spec)
        if spec.quantized_bits not in KIND_FOR_BITS:
            raise ValueError(f"method {spec.name}: no quantization for {spec.quantized_bits} bits; "
                             f"supported: {sorted(KIND_FOR_BITS)}")
        self.kind = self.base_quantization = KIND_FOR_BITS[spec.quantized_bits]
        self.float_base = False  # the block linears are quantized: base_dtype does not apply
        require_bitsandbytes(spec.name)  # fail at get_method, before any data or model is loaded

    def quantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """`model`'s weights in `dtype` (default: the dtype the model was loaded in, which evaluation picks
        by the device: tailor.hardware.fast_dtype; buffers kept, as LoRA does), then its block linear layers
        quantized from them (in place, on the model's device), computing in `dtype`. A base loaded by
        `load_base` is quantized already (as it was read) and returned as it is."""
        from tailor.quant import quantize_model

        dtype = dtype or next(model.parameters()).dtype
        cast_weights(model, dtype)
        return quantize_model(model, self.kind, compute_dtype=dtype)

    def adapt(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        bf16 = precision_for(config.precision, next(model.parameters()).device.type) == "bf16"
        self.quantize(model, torch.bfloat16 if bf16 else torch.float32)
        # LoRA's adapters (fp32) on the quantized layers. Not LoraMethod.adapt: its cast of every parameter
        # would turn the packed integer weights into floats.
        start_adapter(model, config)
        return model

    def attach(self, base: nn.Module, directory: Path) -> nn.Module:
        """The freshly loaded `base`, quantized as in training, with the adapter loaded onto it."""
        self.quantize(base)
        return super().attach(base, directory)

    def merged(self, model: nn.Module) -> nn.Module:
        from tailor.quant import dequantize_model

        dequantize_model(model, torch.bfloat16)
        return super().merged(model)

    def frozen_weight_bytes(self, model: nn.Module) -> int:
        """Frozen bytes as stored: the quantized layers' packed weights with their quantization state, and
        every other frozen tensor at its size."""
        from tailor.quant import frozen_weight_bytes, quantized_layers

        packed = {id(layer.weight) for layer in quantized_layers(model).values()}
        rest = sum(p.numel() * p.element_size() for p in model.parameters()
                   if not p.requires_grad and id(p) not in packed)
        return frozen_weight_bytes(model).quantized + rest
