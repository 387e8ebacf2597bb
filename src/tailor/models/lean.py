"""Load a model holding each weight once, in the precision it will be used in.

The ordinary way, `from_pretrained(dtype=torch.float32)` on a bf16 checkpoint and then quantizing for
QLoRA, materialises the whole model in fp32 first: SmolLM2-1.7B peaked at 9.95 GiB of RSS for a QLoRA run
whose model needs under 1.5 GiB. Here the peak is the resident model plus one tensor:

1. transformers builds the model from the checkpoint *in the checkpoint's own dtype*. Then it does not
   convert anything: every weight is a zero-copy view of the memory-mapped safetensors files, and nothing
   is read from disk yet (the architecture, its buffers, tied weights and key conversions stay
   transformers' business).
2. Each weight is then replaced, one tensor at a time, by its final form: cast to `dtype` and moved to
   `device`, or for a block linear of a QLoRA run quantized by bitsandbytes (NF4 / int8) straight from
   the bytes read.
3. The bytes are read with plain file reads into a buffer of that tensor's size, not through the memory
   map: pages of a mapping that were touched count as the process's RSS until the whole file is unmapped,
   which happens only when the last weight of that file is gone, so reading through the map would add
   the checkpoint's size to the peak (measured: 8.3 GiB instead of 6.8 for fp32 at 1.7B). Where a
   parameter's name is not a key of the files (an architecture whose checkpoint transformers converts on
   load, such as fused mixture-of-experts weights), its mapped view is used instead.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# safetensors dtype names (https://github.com/huggingface/safetensors, format.md)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, from the start of the file
    nbytes: int


class SafetensorsFiles:
    """The tensors of a directory's `*.safetensors` files, read one at a time with ordinary file reads.

    Only the headers are parsed up front (8 bytes of header length, then a JSON header of dtype, shape and
    data offsets per tensor, per the safetensors format).
    """

    def __init__(self, directory: str | Path):
        self.tensors: dict[str, StoredTensor] = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for key, entry in header.items():
                if key == "__metadata__" or entry.get("dtype") not in _SAFETENSORS_DTYPES:
                    continue
                begin, end = entry["data_offsets"]
                self.tensors[key] = StoredTensor(file, _SAFETENSORS_DTYPES[entry["dtype"]],
                                                 tuple(entry["shape"]), 8 + length + begin, end - begin)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype most of the floating-point bytes are stored in (what transformers can map as is)."""
        totals: dict[torch.dtype, int] = {}
        for stored in self.tensors.values():
            if stored.dtype.is_floating_point:
                totals[stored.dtype] = totals.get(stored.dtype, 0) + stored.nbytes
        return max(totals, key=totals.__getitem__) if totals else None

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` in its stored dtype, in a fresh CPU buffer of exactly its size."""
        stored = self.tensors[key]
        buffer = torch.empty(stored.nbytes, dtype=torch.uint8)
        with open(stored.file, "rb") as handle:
            handle.seek(stored.offset)
            view = memoryview(buffer.numpy())
            done = 0
            while done < stored.nbytes:
                got = handle.readinto(view[done:])
                if not got:
                    raise OSError(f"{stored.file}: ends before tensor {key} does (truncated file?)")
                done += got
        return buffer.view(stored.dtype).reshape(stored.shape)


@dataclass(frozen=True)
class WeightFormat:
    """How a loaded model keeps its weights: floating weights in `dtype`; with `quantize` ("nf4", "int8")
    the linear layers of the transformer blocks quantized by bitsandbytes, computing in `dtype`; with
    `stored` (bf16) every nn.Linear / nn.Embedding weight stored in that dtype and upcast to `dtype` per
    matmul (tailor.models.upcast), the other parameters in `dtype`."""

    dtype: torch.dtype = torch.float32
    quantize: str | None = None
    stored: torch.dtype | None = None


def _final(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


@torch.no_grad()
def convert_weights(model: nn.Module, files: SafetensorsFiles, fmt: WeightFormat,
                    device: torch.device | str) -> nn.Module:
    """Replace every parameter of `model` (loaded as views of `files`) by its final form, one at a time:
    quantized (block linears, when `fmt.quantize`), else cast to `fmt.dtype`, on `device`. In place."""

    def source(name: str, current: torch.Tensor) -> torch.Tensor:
        if name in files and files.tensors[name].shape == tuple(current.shape):
            return files.read(name)
        return current  # a converted or computed weight: its mapped view (see the module docstring)

    done: set[int] = set()
    low: set[int] = set()
    if fmt.stored is not None and fmt.stored != fmt.dtype:
        from tailor.models.upcast import mark_low_precision

        low = mark_low_precision(model)
    if fmt.quantize:
        from tailor.quant import quantization_targets, quantized_layers, quantized_linear, replace_module

        for path, linear in quantization_targets(model):
            weight = _final(source(f"{path}.weight", linear.weight), fmt.dtype, device)
            bias = None if linear.bias is None else _final(source(f"{path}.bias", linear.bias), fmt.dtype,
                                                            device)
            replace_module(model, path, quantized_linear(weight, bias, fmt.quantize, compute_dtype=fmt.dtype,
                                                         training=linear.training))
            del weight, bias
        # the quantized layers' packed weights and biases are final already: not read again below
        done |= {id(p) for layer in quantized_layers(model).values() for p in layer.parameters()}
    for name, parameter in model.named_parameters():
        if id(parameter) in done:
            continue
        done.add(id(parameter))
        dtype = fmt.stored if id(parameter) in low else fmt.dtype
        parameter.data = _final(source(name, parameter.data), dtype, device)
    for module in model.modules():  # buffers (rotary frequencies, ...) stay in their dtype, move only
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != torch.device(device):
                module._buffers[key] = buffer.to(device)
    return model


__all__ = ["SafetensorsFiles", "StoredTensor", "WeightFormat", "convert_weights"]
