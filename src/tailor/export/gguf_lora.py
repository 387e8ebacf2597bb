"""A LoRA adapter as llama.cpp's adapter GGUF (`llama-cli --lora`, llama-cpp-python's ``lora_path``,
Ollama's ``ADAPTER``), as llama.cpp's convert_lora_to_gguf.py writes it.

The file: ``general.type`` = ``adapter``, ``general.architecture`` = the base's (llama.cpp refuses an
adapter of another architecture), ``adapter.type`` = ``lora``, ``adapter.lora.alpha``; for each adapted
weight ``W`` (GGUF name ``blk.N.attn_q.weight``...) two tensors ``blk.N.attn_q.weight.lora_a`` = A
(r, d_in) and ``...lora_b`` = B (d_out, r), PEFT's shapes. llama.cpp adds ``(alpha / r) B A x`` with r
read from the tensors, so a module whose scale is not alpha / r (rsLoRA, alpha_pattern) gets the ratio
folded into its B. Where the base's q/k rows are permuted (llama), so are B's rows: ``W + s B A``
permuted is ``permute(W) + s permute(B) A``.

What llama.cpp cannot apply is refused before anything is read: DoRA (a per-column magnitude), adapters on
mixture-of-experts parameters (``target_parameters``), trained biases or whole modules (``bias``,
``modules_to_save``), embedding adapters and an adapted tied output head.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tailor.export.gguf_arch import (
    GGUFExportError,
    _gguf,
    arch_name,
    architecture,
    heads_of,
    permute_rows,
    tensor_namer,
)

LORA_SUFFIXES = (".lora_a", ".lora_b")
ADAPTER_NAME = "default"


def check_lora_only(adapter_dir: Path) -> None:
    """Refuse, from adapter_config.json alone, an adapter llama.cpp's LoRA loader cannot apply.

    Raises:
        GGUFExportError: listing every problem at once, with what to do instead (a merged GGUF).
    """
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the adapter reader reports a missing or broken config in its own words
    if not isinstance(data, dict):
        return
    problems = []
    if data.get("use_dora"):
        problems.append("use_dora is true: DoRA rescales each weight column by a learned magnitude, which "
                        "llama.cpp's LoRA loader has no tensor for")
    if data.get("target_parameters"):
        problems.append(f"target_parameters={data['target_parameters']!r}: adapters on mixture-of-experts "
                        "parameters are not in llama.cpp's adapter format")
    if data.get("modules_to_save"):
        problems.append(f"modules_to_save={data['modules_to_save']!r}: whole trained modules are not a LoRA "
                        "pair")
    if data.get("bias", "none") != "none" or data.get("lora_bias"):
        problems.append(f"bias={data.get('bias')!r}: trained biases are not a LoRA pair")
    if data.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out is true (GPT-2 style Conv1D layers): not an architecture llama.cpp "
                        "runs as LoRA")
    if problems:
        raise GGUFExportError(
            f"{path}: --lora-only writes llama.cpp's LoRA adapter GGUF, which cannot hold this adapter: "
            + "; ".join(problems) + ". Drop --lora-only to write the merged model as one GGUF file "
            "(tailor merge --gguf), which llama.cpp and Ollama run the same.")


def lora_tensors(model: nn.Module, alpha: float) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) of every LoRA pair in `model` (an adapter-applied transformers model), in
    llama.cpp's layout for a file whose ``adapter.lora.alpha`` is `alpha`.

    Raises:
        GGUFExportError: an embedding adapter, an adapted tied output head, a module llama.cpp has no
            tensor for.
    """
    from tailor.lora import LoraLinear, lora_layers

    config = model.config
    spec = architecture(config)
    name_of = tensor_namer(spec, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: list[tuple[str, np.ndarray]] = []
    for path, layer in lora_layers(model).items():
        if ADAPTER_NAME not in layer.adapter_names:
            continue
        if not isinstance(layer, LoraLinear) or getattr(layer, "fan_in_fan_out", False):
            raise GGUFExportError(f"{path}: a {type(layer).__name__} adapter; llama.cpp's LoRA GGUF holds "
                                  "linear layers only. Drop --lora-only to write the merged model instead.")
        if path == "lm_head" and tied:
            raise GGUFExportError("the adapter changes the output head, which this model ties to its input "
                                  "embedding: llama.cpp has no separate output tensor to apply it to (its "
                                  "convert_lora_to_gguf.py refuses it too). Drop --lora-only to write the "
                                  "merged model instead.")
        stem = name_of(path)
        if stem is None:
            raise GGUFExportError(f"{path}: no tensor of that name in llama.cpp's {arch_name(spec)} "
                                  "architecture; drop --lora-only to write the merged model instead.")
        a = layer.lora_A[ADAPTER_NAME].weight.detach().to("cpu", torch.float32).numpy()  # (r, d_in)
        b = layer.lora_B[ADAPTER_NAME].weight.detach().to("cpu", torch.float32).numpy()  # (d_out, r)
        rank = a.shape[0]
        # llama.cpp scales by alpha / rank; the module's own scale may differ (rsLoRA, patterns)
        b = b * np.float32(layer.scaling[ADAPTER_NAME] * rank / alpha)
        n_head = heads_of(config, path) if spec.rope_permute else None
        if n_head is not None:
            b = permute_rows(b, n_head)
        out.append((f"{stem}.weight.lora_a", a))
        out.append((f"{stem}.weight.lora_b", b))
    if not out:
        raise GGUFExportError("the adapter has no LoRA pair on this model: nothing to write.")
    return out


def write_lora_gguf(model: nn.Module, path: str | os.PathLike, alpha: float, quant: str = "f32",
                    extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the LoRA pairs of `model` (adapter "default" applied, unmerged) to `path` as llama.cpp's
    adapter GGUF. `quant`: f32, f16, bf16 or q8_0 for A and B (q8_0 needs rows of 32 values: B's rows of
    r values fall back to f16, as llama.cpp does). Returns what was written."""
    from tailor.export.gguf import QUANT_TYPES, _file_type, write_tensors

    if quant not in QUANT_TYPES:
        raise GGUFExportError(f"--quant {quant!r} is not one of {', '.join(QUANT_TYPES)}.")
    gguf = _gguf()
    spec = architecture(model.config)
    tensors = lora_tensors(model, alpha)  # every check before the file is opened
    writer = gguf.GGUFWriter(str(path), arch_name(spec))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_file_type(_file_type(gguf, quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    counts = write_tensors(writer, gguf, tensors, quant)
    return {"tensors": counts, "pairs": len(tensors) // 2, "alpha": float(alpha), "quant": quant,
            "architecture": arch_name(spec)}


def read_lora_deltas(path: str | os.PathLike, config: Any) -> dict[str, np.ndarray]:
    """{GGUF weight name: (alpha / r) B A} from an adapter GGUF, B's rows put back in Hugging Face's order
    with transformers' own GGUF un-permutation (an implementation other than the writer's): what the file
    adds to each weight, in the base model's layout."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    arrays = {t.name: _as_float(t) for t in reader.tensors}
    spec = architecture(config)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    unpermute = LlamaTensorProcessor()._reverse_permute_weights
    deltas = {}
    for name, a in arrays.items():
        if not name.endswith(".lora_a"):
            continue
        weight = name.removesuffix(".lora_a")
        b = arrays[weight + ".lora_b"]
        if spec.rope_permute and ".attn_q." in weight:
            b = unpermute(b, n_head, n_head)
        elif spec.rope_permute and ".attn_k." in weight:
            b = unpermute(b, n_head, n_kv)
        deltas[weight] = (alpha / a.shape[0]) * (b.astype(np.float64) @ a.astype(np.float64))
    return deltas


def _as_float(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def check_lora_file(model: nn.Module, path: str | os.PathLike) -> float:
    """The largest |difference| between each adapted weight's update in `model` (fp64) and the one the
    file at `path` adds, relative to the largest |update|; raises if a module is missing or extra."""
    from tailor.lora import lora_layers

    spec = architecture(model.config)
    name_of = tensor_namer(spec, model.config.num_hidden_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deltas = read_lora_deltas(path, model.config)
    expected = {}
    for path_, layer in lora_layers(model).items():
        if ADAPTER_NAME in layer.adapter_names:
            a = layer.lora_A[ADAPTER_NAME].weight.detach().double().cpu().numpy()
            b = layer.lora_B[ADAPTER_NAME].weight.detach().double().cpu().numpy()
            expected[f"{name_of(path_)}.weight"] = layer.scaling[ADAPTER_NAME] * (b @ a)
    if set(deltas) != set(expected):
        raise GGUFExportError(f"the adapter GGUF holds {sorted(deltas)}, the adapter {sorted(expected)}; "
                              "nothing was written.")
    largest = max(float(np.abs(d).max()) for d in expected.values()) or 1.0
    return max(float(np.abs(deltas[k] - v).max()) for k, v in expected.items()) / largest




# ---------------------------------------------------------------------------------------------- command
LORA_FILE_TOLERANCE = 1e-6  # relative to the largest |update|: f32 A and B (the product rounds in fp32)
LORA_QUANT_TOLERANCE = {"f32": LORA_FILE_TOLERANCE, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}


@dataclass
class LoraExportResult:
    out: Path
    adapter: str
    base: str
    architecture: str
    alpha: float
    pairs: int
    quant: str
    relative_diff: float  # the file's updates vs the adapter's, relative to the largest |update|
    notes: list[str] = field(default_factory=list)


def export_lora_gguf(adapter: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
                     quant: str = "f32", force: bool = False, store: str | os.PathLike | None = None,
                     device: str | None = None) -> LoraExportResult:
    """`tailor merge --gguf --lora-only`: write `adapter` as llama.cpp's LoRA adapter GGUF at `out`.

    The base model is loaded (its config names the tensors; the adapter is checked against it), the
    adapter applied, and every update the file adds, read back, must equal the adapter's (relative
    difference within LORA_QUANT_TOLERANCE[quant]) or nothing is written.

    Raises:
        GGUFExportError: an adapter llama.cpp cannot apply (DoRA, expert parameters, ...), an unsupported
            architecture. ExportError: a bad --out or --quant. AdapterFormatError, ModelNotFoundError: see
            those.
    """
    from tailor.adapters.format import load_adapter, read_adapter_config
    from tailor.adapters.metadata import AdapterDtypeWarning, read_metadata
    from tailor.adapters.store import locate
    from tailor.export.gguf import QUANT_TYPES
    from tailor.export.merge import ExportError, _check_out
    from tailor.files import atomic_output
    from tailor.models import DEFAULT_MODEL, load_model, resolve_model

    adapter_dir, ref = locate(adapter, store)
    check_lora_only(adapter_dir)
    config = read_adapter_config(adapter_dir)
    metadata = read_metadata(adapter_dir) or {}
    out = Path(out)
    _check_out(out, True)
    if quant not in QUANT_TYPES:
        raise ExportError(f"--quant {quant!r} is not one of {', '.join(QUANT_TYPES)}.")
    base_name = (model or (metadata.get("base") or {}).get("name") or config.base_model_name_or_path
                 or DEFAULT_MODEL)
    from transformers import AutoConfig

    architecture(AutoConfig.from_pretrained(resolve_model(base_name).directory, local_files_only=True))
    base, _ = load_model(base_name, dtype=torch.float32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterDtypeWarning)  # the file is written in --quant, not as trained
        load_adapter(base, adapter_dir, force=force)
    notes = []
    kind = (metadata.get("precision") or {}).get("base_quantization")
    if kind:
        notes.append(f"the adapter was trained on a {kind.upper()}-quantized base; llama.cpp applies it to "
                     "whatever base GGUF it is given (a merged GGUF reproduces the quantized base's output)")
    extra = {"tailor.export": json.dumps({"format": 1, "adapter": ref or str(adapter_dir), "base": base_name,
                                          "kind": "lora"}),
             "tailor.adapter": json.dumps(metadata or None, default=str)}
    with atomic_output(out) as tmp:
        written = write_lora_gguf(base, tmp, config.lora_alpha, quant, extra)
        diff = check_lora_file(base, tmp)
        if diff > LORA_QUANT_TOLERANCE[quant]:
            raise ExportError(f"verification failed: the adapter GGUF's updates differ from the adapter's by "
                              f"{diff:.3e} of the largest update (> {LORA_QUANT_TOLERANCE[quant]:g} for "
                              f"{quant}); nothing was written.")
    return LoraExportResult(out, ref or str(adapter_dir), base_name, written["architecture"],
                            written["alpha"], written["pairs"], quant, diff, notes)


def format_lora_result(result: LoraExportResult, echo=print) -> None:
    echo(f"base: {result.base} (llama.cpp architecture {result.architecture})")
    for note in result.notes:
        echo(f"note: {note}")
    echo(f"{result.pairs} LoRA pairs ({result.quant}), adapter.lora.alpha {result.alpha:g}; read back, each "
         f"update (alpha/r) B A equals the adapter's to {result.relative_diff:.1e} of the largest")
    echo(f"wrote {result.out}  (llama.cpp: llama-cli -m BASE.gguf --lora {result.out.name})")


__all__ = ["LoraExportResult", "check_lora_file", "check_lora_only", "export_lora_gguf", "format_lora_result",
           "lora_tensors", "read_lora_deltas", "write_lora_gguf"]
