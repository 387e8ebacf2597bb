"""`tailor merge --ollama --out DIR`: a directory `ollama create NAME -f DIR/Modelfile` takes.

Merged (default): ``model.gguf`` (the adapter folded in, `tailor merge --gguf`) and a Modelfile
``FROM ./model.gguf``. With ``--lora-only``: ``base.gguf`` (the base as it is) and ``adapter.gguf``
(llama.cpp's LoRA adapter format), ``FROM ./base.gguf`` + ``ADAPTER ./adapter.gguf``.

The chat template: Ollama speaks Go templates, not Jinja. A ChatML template (SmolLM2, Qwen, ...) is
recognised by rendering it (a conversation with a system turn, one without) and comparing the text with
ChatML's; it becomes Ollama's own ChatML TEMPLATE, a system prompt the template adds by itself becomes
``SYSTEM``, and ``PARAMETER stop`` names the end-of-turn tokens. Any other template is left out with a
note: Ollama then picks a template from the GGUF's ``tokenizer.chat_template`` itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELFILE = "Modelfile"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Ollama's ChatML template (the form its library's Qwen and SmolLM2 models use): each message in turn, the
# assistant's prompt after the last one; a plain prompt (/api/generate) with its system prompt otherwise.
CHATML_TEMPLATE = """{{- if .Messages }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""


@dataclass
class ChatFormat:
    """What the Modelfile says about chat: the TEMPLATE (None: left to Ollama), a default SYSTEM prompt,
    the stop strings, and why the template was left out (if it was)."""

    template: str | None
    system: str | None
    stops: list[str]
    note: str | None = None


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _chatml(turns: list[tuple[str, str]]) -> str:
    return "".join(f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in turns) + f"{IM_START}assistant\n"


def chat_format(tokenizer: Any) -> ChatFormat:
    """The Modelfile's chat lines for `tokenizer`'s chat template (see the module docstring)."""
    eos = getattr(tokenizer, "eos_token", None)
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return ChatFormat(None, None, [eos] if eos else [], "the tokenizer has no chat template: no TEMPLATE")
    turns = [("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V")]
    try:
        with_system = _render(tokenizer, [{"role": r, "content": t} for r, t in turns])
        without = _render(tokenizer, [{"role": "user", "content": "U"}])
    except Exception as error:  # a template that needs other variables or roles
        return ChatFormat(None, None, [eos] if eos else [], f"the chat template does not render a plain "
                          f"conversation ({error}); Ollama picks a template from the GGUF's")
    if with_system != _chatml(turns):
        return ChatFormat(None, None, [eos] if eos else [], "the chat template is not ChatML; no TEMPLATE "
                          "written: Ollama picks one from the GGUF's tokenizer.chat_template")
    system = None
    if without.startswith(f"{IM_START}system\n"):
        system = without[len(f"{IM_START}system\n"):].split(IM_END, 1)[0]
    if without != _chatml(([("system", system)] if system is not None else []) + [("user", "U")]):
        return ChatFormat(None, None, [IM_START, IM_END], "the chat template adds something other than a "
                          "system prompt to a conversation without one; no TEMPLATE written")
    return ChatFormat(CHATML_TEMPLATE, system, [IM_START, IM_END])


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError(f"cannot write {text[:40]!r}... in a Modelfile: it holds triple quotes")
    return f'"""{text}"""'


def modelfile_text(model_file: str, adapter_file: str | None, chat: ChatFormat) -> str:
    """The Modelfile: FROM the model GGUF, ADAPTER the LoRA GGUF, TEMPLATE, SYSTEM, PARAMETER stop (paths
    relative to the Modelfile, as Ollama resolves them)."""
    lines = ["# Written by `tailor merge --ollama`. Create the model with:",
             "#   ollama create NAME -f Modelfile", f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if chat.template is not None:
        lines.append(f"TEMPLATE {_quoted(chat.template)}")
    if chat.system:
        lines.append(f"SYSTEM {_quoted(chat.system)}")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in chat.stops]
    return "\n".join(lines) + "\n"


@dataclass
class OllamaResult:
    out: Path
    files: list[str]
    chat: ChatFormat
    notes: list[str] = field(default_factory=list)
    merge: Any = None  # the MergeResult (merged) or LoraExportResult (--lora-only)


def export_ollama(adapter: str | os.PathLike, out: str | os.PathLike, *, lora_only: bool = False,
                  model: str | None = None, quant: str = "f16", force: bool = False,
                  store: str | os.PathLike | None = None, device: str | None = None,
                  **merge_options: Any) -> OllamaResult:
    """Write the Ollama directory `out` for `adapter` (see the module docstring). `merge_options` go to
    `merge_adapter` (dtype, base_dtype, quantized, verify) for the merged model.

    Raises:
        ExportError: an --out that holds something else. GGUFExportError and the errors of
            `merge_adapter` / `export_lora_gguf`, before anything is written.
    """
    import torch

    from tailor.export.gguf import write_gguf
    from tailor.export.gguf_lora import export_lora_gguf
    from tailor.export.merge import EXPORT_RECORD, _check_out, merge_adapter
    from tailor.files import atomic_output
    from tailor.models import load_model

    out = Path(out)
    _check_out(out, False)
    with atomic_output(out, directory=True) as tmp:
        if lora_only:
            result = export_lora_gguf(adapter, tmp / "adapter.gguf", model=model, quant=quant, force=force,
                                      store=store, device=device)
            base, tokenizer = load_model(result.base, dtype=torch.float32, device=device)
            write_gguf(base, tokenizer, tmp / "base.gguf", quant,
                       {"tailor.export": json.dumps({"format": 1, "kind": "base", "base": result.base})})
            files = ["base.gguf", "adapter.gguf"]
            notes = list(result.notes)
        else:
            result = merge_adapter(adapter, tmp / "model.gguf", model=model, gguf=True, quant=quant,
                                   force=force, store=store, device=device, **merge_options)
            from tailor.models.load import load_tokenizer

            tokenizer = load_tokenizer(result.base)
            files = ["model.gguf"]
            notes = list(result.notes)
        chat = chat_format(tokenizer)
        if chat.note:
            notes.append(chat.note)
        (tmp / MODELFILE).write_text(modelfile_text(files[0], files[1] if lora_only else None, chat),
                                     encoding="utf-8")
        record = {"format": 1, "kind": "ollama", "files": files, "lora_only": lora_only,
                  "adapter": result.adapter, "base": result.base}
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return OllamaResult(out, [*files, MODELFILE], chat, notes, result)


def format_ollama_result(result: OllamaResult, echo=print) -> None:
    for note in result.notes:
        echo(f"note: {note}")
    echo(f"wrote {result.out}: {', '.join(result.files)}")
    echo(f"  ollama create NAME -f {result.out / MODELFILE}   then   ollama run NAME")


__all__ = ["CHATML_TEMPLATE", "ChatFormat", "OllamaResult", "chat_format", "export_ollama",
           "format_ollama_result", "modelfile_text"]
