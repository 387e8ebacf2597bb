"""Adapters out of tailor: merged into their base as a plain transformers directory, or as one GGUF file."""

from tailor.export.gguf import GGUF_TOLERANCE, QUANT_TYPES, GGUFExportError, write_gguf
from tailor.export.merge import ExportError, MergeResult, merge_adapter

__all__ = ["ExportError", "GGUFExportError", "GGUF_TOLERANCE", "MergeResult", "QUANT_TYPES", "merge_adapter",
           "write_gguf"]
