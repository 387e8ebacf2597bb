"""Quantized frozen bases (QLoRA): bitsandbytes NF4 / int8 linear layers in, plain bf16 layers back out.

bitsandbytes is optional (`pip install 'tailor[qlora]'`); importing this package does not import it.
"""

from tailor.quant.bnb import (
    INT8_THRESHOLD,
    KINDS,
    MissingDependencyError,
    QuantizedBytes,
    dequantize_model,
    dequantized_weight,
    frozen_weight_bytes,
    import_bitsandbytes,
    is_quantized_layer,
    quantization_targets,
    quantize_model,
    quantized_layers,
    quantized_linear,
    quantized_weight_tensors,
    replace_module,
    require_bitsandbytes,
)

__all__ = ["INT8_THRESHOLD", "KINDS", "MissingDependencyError", "QuantizedBytes", "dequantize_model",
           "dequantized_weight", "frozen_weight_bytes", "import_bitsandbytes", "is_quantized_layer",
           "quantization_targets", "quantize_model", "quantized_layers", "quantized_linear",
           "quantized_weight_tensors", "replace_module", "require_bitsandbytes"]
