"""Adapters out of tailor: merged into their base as a plain transformers directory or one GGUF file, the
adapter alone as llama.cpp's LoRA GGUF, or a directory for Ollama."""

from tailor.export.gguf import GGUF_TOLERANCE, QUANT_TYPES, GGUFExportError, write_gguf
from tailor.export.gguf_lora import LoraExportResult, export_lora_gguf, write_lora_gguf
from tailor.export.merge import ExportError, MergeResult, merge_adapter
from tailor.export.ollama import OllamaResult, export_ollama

__all__ = ["ExportError", "GGUFExportError", "GGUF_TOLERANCE", "LoraExportResult", "MergeResult",
           "OllamaResult", "QUANT_TYPES", "export_lora_gguf", "export_ollama", "merge_adapter", "write_gguf",
           "write_lora_gguf"]
