"""`tailor merge`: an adapter folded into its base, written as a plain transformers directory or one GGUF
file (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3: tailor.export.gguf_arch), and checked against the
adapter-applied model before anything is written.

The merge is computed in float32: the base weights are taken as stored (a bf16 checkpoint's values are
exact in fp32), a quantized base (bitsandbytes NF4 / int8: a QLoRA adapter's, or a pre-quantized
checkpoint) is dequantized first, and each ``W + s B A`` is formed in fp32 (tailor.lora.merge_lora).
The reference is the same base with the adapter applied unmerged; the merged model must give the same
logits on a few prompts (float32 output: max |difference| <= 1e-4) or nothing is written. The check runs
in float64 arithmetic by default, so that it measures the merge and not float32's own rounding: on
SmolLM2-135M (logits up to ~40) the float32 forward pass alone is ~1e-4 away from the float64 one, so two
float32 computations of the same function (W + dW) x and W x + B A x differ by ~1.5e-4. Both figures are
reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tailor.adapters.format import read_adapter_config
from tailor.adapters.metadata import AdapterDtypeWarning, now_iso, read_metadata
from tailor.adapters.store import locate
from tailor.files import atomic_output, check_output_path

EXPORT_RECORD = "tailor_export.json"
FP32_TOLERANCE = 1e-4
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
QUANTIZATIONS = ("auto", "none", "nf4", "int8")
VERIFY_PROMPTS = (
    "Where is my order ORD-12345? It was due yesterday.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
)


class ExportError(ValueError):
    """Bad arguments, an output path that holds something else, or a failed verification."""


@dataclass
class MergeResult:
    out: Path
    adapter: str
    base: str
    base_dtype: str
    dtype: str  # of the written weights ("gguf:<quant>" for a GGUF file)
    prompts: int
    tokens: int
    max_abs_diff: float
    tolerance: float | None
    notes: list[str] = field(default_factory=list)
    gguf: dict[str, Any] | None = None
    check: str = "float64"  # the arithmetic the verification ran in
    float32_noise: float | None = None  # the adapter model's float32 forward vs its float64 one
    float32_diff: float | None = None  # the same comparison as max_abs_diff, in float32 arithmetic
    file_diff: float | None = None  # GGUF: the file vs the merged model with the file's rounding applied

    def record(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "base": self.base, "base_dtype": self.base_dtype,
                "dtype": self.dtype,
                "verification": {"prompts": self.prompts, "tokens": self.tokens, "arithmetic": self.check,
                                 "max_abs_logit_diff": self.max_abs_diff, "tolerance": self.tolerance,
                                 "float32_max_abs_logit_diff": self.float32_diff,
                                 "float32_forward_noise": self.float32_noise,
                                 "gguf_file_vs_rounded_merged_model": self.file_diff},
                "notes": self.notes, "gguf": self.gguf}


def _dtype(name: str, option: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ExportError(f"{option} {name!r} is not one of: {', '.join(DTYPES)}.") from None


def _checkpoint_dtype(directory: Path) -> torch.dtype:
    """The dtype a model directory stores its weights in (config.json's dtype), float32 if it says none."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)


def _check_out(out: Path, gguf: bool) -> None:
    """Refuse, before any work, an output that would overwrite something other than an earlier export."""
    if gguf:
        if out.suffix.lower() != ".gguf":
            raise ExportError(f"--out {out}: with --gguf the output is one file; give a path ending in "
                              ".gguf.")
        check_output_path(out, directory=False)
        if out.exists() and not _is_tailor_gguf(out):
            raise ExportError(f"--out {out} exists and is not a GGUF file tailor wrote; it is left as it is. "
                              "Choose another path or move it away.")
        return
    check_output_path(out, directory=True)
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_RECORD).is_file():
        raise ExportError(f"--out {out} is not empty and does not hold an earlier `tailor merge`; nothing "
                          "there is touched. Give a new or empty directory.")


def _is_tailor_gguf(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        return "tailor.export" in GGUFReader(str(path)).fields
    except Exception:  # not a GGUF file at all
        return False


def _prepare_base(model: nn.Module, kind: str | None, compute_dtype: torch.dtype, notes: list[str]) -> None:
    """Quantize the base as the adapter was trained on it (QLoRA), then dequantize to fp32; or dequantize a
    base that was loaded quantized."""
    if kind:
        from tailor.quant import dequantize_model, quantize_model

        # QLoRA quantizes from weights in its compute dtype (tailor.methods.qlora casts the model first).
        # Only the linear layers are cast here: a whole-model cast would also round non-persistent buffers
        # (the rotary inv_freq) that a reloaded model recomputes, and the check would then not describe the
        # written model.
        head = model.get_output_embeddings()
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not head:
                module.to(compute_dtype)
        quantize_model(model, kind, compute_dtype=compute_dtype)
        dequantize_model(model, torch.float32)
        notes.append(f"the adapter was trained on a {kind.upper()}-quantized base: the base was quantized "
                     f"the same way ({str(compute_dtype).removeprefix('torch.')} compute) and dequantized to "
                     "float32 before merging, so the merged model reproduces the adapter on the quantized "
                     "base (not on the original weights)")
        return
    from tailor.quant import quantized_layers

    if quantized_layers(model):
        from tailor.quant import dequantize_model

        dequantize_model(model, torch.float32)
        notes.append("the base was loaded quantized (bitsandbytes): dequantized to float32 before merging")
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
            model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def _untie_adapted_embeddings(model: nn.Module, notes: list[str]) -> None:
    """A tied input/output embedding with an adapter on one side: merged, the update would reach both.
    Give the output head its own copy first (the config then says untied)."""
    from tailor.lora import LoraLayer

    if not getattr(model.config, "tie_word_embeddings", False):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if not (isinstance(inputs, LoraLayer) or isinstance(outputs, LoraLayer)):
        return
    head = outputs.base_layer if isinstance(outputs, LoraLayer) else outputs
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    notes.append("the adapter changes the tied input/output embedding: the output head is written as its own "
                 "tensor (tie_word_embeddings=false)")


def _prompt_ids(tokenizer: Any, device: torch.device) -> list[torch.Tensor]:
    ids = []
    for prompt in VERIFY_PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            tokens = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True, tokenize=True)
            tokens = tokens["input_ids"] if isinstance(tokens, dict) or hasattr(tokens, "keys") else tokens
        else:
            tokens = tokenizer(prompt)["input_ids"]
        ids.append(torch.tensor([list(tokens)], device=device))
    return ids


@torch.no_grad()
def _logits(model: nn.Module, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits.float().cpu() for ids in prompts]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def merge_adapter(
    adapter: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None, dtype: str = "float32",
    base_dtype: str = "auto", quantized: str = "auto", force: bool = False, gguf: bool = False,
    quant: str = "f16", device: str | None = None, store: str | os.PathLike | None = None,
    verify: str = "float64",
) -> MergeResult:
    """Merge `adapter` (a directory or a store reference) into its base and write `out`.

    `model`: the base (default: the one the adapter names). `dtype`: the written weights (float32 keeps
    the logits within 1e-4 of the adapter-applied model; bfloat16 / float16 round the merged weights).
    `base_dtype`: the precision of the base weights (auto: as stored in the checkpoint). `quantized`:
    auto (as the adapter was trained: its metadata), none, nf4, int8. `gguf`: write one GGUF file (an
    architecture in gguf_arch.ARCHITECTURES; `quant` f32, f16, bf16, q8_0) instead of a transformers
    directory. `verify`:
    the arithmetic of the check, float64 (the merge's own error, limit 1e-4; needs memory for a float64
    copy of the model) or float32 (limit 1e-4 or 1e-5 of the largest logit, see `_tolerance`).

    Raises:
        ExportError: bad arguments, an --out holding something else, verification outside tolerance
            (then nothing is written). AdapterFormatError, AdapterBaseMismatchError, ModelNotFoundError,
            GGUFExportError: see those.
    """
    from tailor.export.gguf import GGUF_TOLERANCE, QUANT_TYPES, check_exportable, round_like_gguf, write_gguf
    from tailor.lora import unload_lora
    from tailor.models import DEFAULT_MODEL, load_model, resolve_model

    adapter_dir, ref = locate(adapter, store)
    config = read_adapter_config(adapter_dir)  # a bad adapter fails here, before the model load
    try:
        metadata = read_metadata(adapter_dir) or {}
    except ValueError:
        if not force:
            raise
        metadata = {}
    out = Path(out)
    _check_out(out, gguf)
    out_dtype = _dtype(dtype, "--dtype")
    if verify not in ("float64", "float32"):
        raise ExportError(f"--verify {verify!r} is not one of: float64, float32.")
    check = torch.float64 if verify == "float64" else torch.float32
    if gguf and quant not in QUANT_TYPES:
        raise ExportError(f"--quant {quant!r} is not one of {', '.join(QUANT_TYPES)}.")
    if quantized not in QUANTIZATIONS:
        raise ExportError(f"--quantized {quantized!r} is not one of {', '.join(QUANTIZATIONS)}.")
    precision = metadata.get("precision") or {}
    kind = precision.get("base_quantization") if quantized == "auto" else (None if quantized == "none"
                                                                          else quantized)
    base_name = (model or (metadata.get("base") or {}).get("name") or config.base_model_name_or_path
                 or DEFAULT_MODEL)
    resolved = resolve_model(base_name)
    if gguf:  # the architecture and the vocabulary, before the model is loaded
        from transformers import AutoConfig

        from tailor.export.gguf import check_tokenizer
        from tailor.models.load import load_tokenizer

        check_exportable(AutoConfig.from_pretrained(resolved.directory, local_files_only=True))
        check_tokenizer(load_tokenizer(str(resolved.directory)))
    stored = (_dtype(base_dtype, "--base-dtype") if base_dtype != "auto"
              else _checkpoint_dtype(resolved.directory))

    notes: list[str] = []
    trained = precision.get("base_dtype")
    if trained and trained != str(stored).removeprefix("torch.") and not kind:
        notes.append(f"the adapter was trained on a {trained} copy of the base; merging into the weights as "
                     f"stored ({str(stored).removeprefix('torch.')}); --base-dtype {trained} merges into the "
                     "weights it saw")
    base, tokenizer = load_model(base_name, dtype=stored, device=device)
    _prepare_base(base, kind, DTYPES.get(str(precision.get("base_dtype")), torch.bfloat16), notes)
    base.to(torch.float32)  # exact for bf16 / fp16 values: the merge and the reference run in fp32
    from tailor.adapters.format import load_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterDtypeWarning)  # deliberate: the merge runs in fp32
        load_adapter(base, adapter_dir, force=force)
    _untie_adapted_embeddings(base, notes)
    prompts = _prompt_ids(tokenizer, next(base.parameters()).device)
    reference32 = _logits(base, prompts)
    reference = _logits_in(base, prompts, check) if check != torch.float32 else reference32
    plain = unload_lora(base, merge=True, safe=True)
    result = MergeResult(out, ref or str(adapter_dir), base_name, str(stored).removeprefix("torch."),
                         f"gguf:{quant}" if gguf else str(out_dtype).removeprefix("torch."), len(prompts),
                         sum(p.shape[1] for p in prompts), 0.0, None, notes,
                         check=str(check).removeprefix("torch."),
                         float32_noise=_max_diff(reference32, reference) if check != torch.float32 else None)
    if not gguf:
        plain.to(out_dtype)
        result.float32_diff = _max_diff(reference32, _logits(plain, prompts))
        result.max_abs_diff = _max_diff(reference, _logits_in(plain, prompts, check))
        if out_dtype == torch.float32:
            result.tolerance = _tolerance(check, reference)
        else:
            notes.append(f"weights written in {dtype}: the difference is the rounding of the merged weights "
                         "(write float32 to keep it below 1e-4)")
        _verify(result, "the merged model's")
        record = {"format": 1, "created": now_iso(), **result.record(), "adapter_metadata": metadata or None}
        with atomic_output(out, directory=True) as tmp:
            plain.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            text = json.dumps(record, indent=2, default=str) + "\n"
            (tmp / EXPORT_RECORD).write_text(text, encoding="utf-8")
        return result

    largest = max(1.0, max(float(x.abs().max()) for x in reference))
    result.tolerance = max(GGUF_TOLERANCE[quant] * largest, _tolerance(check, reference))
    extra = {"tailor.export": json.dumps({"format": 1, "created": now_iso(), **result.record()}, default=str),
             "tailor.adapter": json.dumps(metadata or None, default=str)}
    with atomic_output(out) as tmp:
        result.gguf = write_gguf(plain, tokenizer, tmp, quant, extra)
        back = _read_back_gguf(tmp, plain)
        result.float32_diff = _max_diff(reference32, _logits(back, prompts))
        from_file = _logits_in(back, prompts, check)
        result.max_abs_diff = _max_diff(reference, from_file)
        _verify(result, f"the GGUF file ({quant}) loaded back gives")
        round_like_gguf(plain, quant)  # the merged model as the file should hold it: must match it exactly
        result.file_diff = _max_diff(_logits_in(plain, prompts, check), from_file)
        if result.file_diff > _tolerance(check, reference):
            raise ExportError(f"verification failed: the GGUF file does not hold the merged model: its "
                              f"logits differ by {result.file_diff:.3e} from the merged model rounded to "
                              f"{quant} the same way (tensor names or layout); nothing was written.")
    return result


def _read_back_gguf(path: Path, merged: nn.Module) -> nn.Module:
    """The merged model's architecture holding the tensors of the GGUF file at `path`, as transformers' GGUF
    reader reads them back (its own name table, un-permutation and Gemma norm shift: an implementation
    other than tailor's writer). The hyper-parameters come from the merged model's config, since
    transformers' GGUF config mapping is incomplete for some architectures (qwen3's head_dim, gemma's
    softcapping); llama.cpp's own reading of them is what the llama.cpp tests check."""
    import copy

    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from tailor.export.gguf_arch import arch_name, architecture

    back = copy.deepcopy(merged)
    # transformers picks its name table by model_type; mistral's is llama.cpp's "llama" (a copy's config)
    back.config.model_type = arch_name(architecture(merged.config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=back)["tensors"]
    expected = set(back.state_dict())
    if getattr(back.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")  # the file holds the embedding once, as llama.cpp expects
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ExportError(f"verification failed: the GGUF file read back lacks {missing[:5]} and has extra "
                          f"{extra[:5]}; nothing was written.")
    back.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if getattr(back.config, "tie_word_embeddings", False):
        back.tie_weights()
    return back.eval()


def _logits_in(model: nn.Module, prompts: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Logits computed in `dtype` (float64: without float32's own rounding noise), the model left as it was
    (float32 / bf16 values are exact in float64, so the round trip changes no weight)."""
    before = next(model.parameters()).dtype
    if dtype == before:
        return _logits(model, prompts)
    model.to(dtype)
    try:
        with _eager_experts(model):
            return [logits.double() for logits in _logits(model, prompts)]
    finally:
        model.to(before)


@contextlib.contextmanager
def _eager_experts(model: nn.Module) -> Iterator[None]:
    """Mixture-of-experts models run their experts with transformers' "grouped_mm" kernel by default, which
    has no float64 ("Expected mat_a to be Float32, BFloat16 or Float16"): the float64 check runs them with
    the "eager" implementation (the same function, one matmul per expert)."""
    current = getattr(getattr(model, "config", None), "_experts_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_experts_implementation"):
        yield
        return
    model.set_experts_implementation("eager")
    try:
        yield
    finally:
        model.set_experts_implementation(current)


def _tolerance(check: torch.dtype, reference: list[torch.Tensor]) -> float:
    """1e-4 in float64 arithmetic. In float32 arithmetic the forward pass alone is that far off for a real
    model (SmolLM2-135M, logits ~40: 9e-5 between its fp32 and fp64 forward), so there the limit grows
    with the logits: 1e-4 or 1e-5 of the largest |logit|, whichever is larger."""
    if check == torch.float64:
        return FP32_TOLERANCE
    largest = max(float(x.abs().max()) for x in reference)
    return max(FP32_TOLERANCE, 1e-5 * largest)


def _verify(result: MergeResult, what: str) -> None:
    if result.tolerance is not None and result.max_abs_diff > result.tolerance:
        raise ExportError(f"verification failed: {what} logits differ from the adapter's by "
                          f"{result.max_abs_diff:.3e} in {result.check} (> {result.tolerance:g}); nothing "
                          "was written.")


def format_result(result: MergeResult, echo=print) -> None:
    echo(f"base: {result.base} (weights as {result.base_dtype}, merged in float32)")
    for note in result.notes:
        echo(f"note: {note}")
    limit = f" (limit {result.tolerance:g})" if result.tolerance is not None else ""
    what = ("the GGUF file, read back with transformers' GGUF reader," if result.gguf
            else f"the merged model ({result.dtype} weights)")
    echo(f"verified on {result.prompts} prompts ({result.tokens} tokens) in {result.check} arithmetic: "
         f"{what} vs the adapter on its base: max |logit difference| {result.max_abs_diff:.3e}{limit}")
    if result.float32_noise is not None:
        echo(f"  in float32 arithmetic: {result.float32_diff:.3e} (float32's own rounding: the adapter "
             f"model's float32 forward is {result.float32_noise:.3e} from its float64 one)")
    if result.file_diff is not None:
        echo(f"  the file vs the merged model rounded to {result.dtype.removeprefix('gguf:')} the same way: "
             f"{result.file_diff:.3e} (limit 1e-4: names, layout and permutations are right)")
    echo(f"wrote {result.out}")


__all__ = ["ExportError", "MergeResult", "format_result", "merge_adapter"]
