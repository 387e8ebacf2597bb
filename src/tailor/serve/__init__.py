"""Serving one base model with many adapters: the engine (continuous batching, per-row LoRA slots, KV
cache, shared prefixes) and, in `tailor.serve.server`, the OpenAI-compatible HTTP server (`tailor serve`).

The server module imports FastAPI; this package's top level does not (evaluation uses the engine only).
"""

from tailor.serve.adapters import AdapterManager, AdapterRef, AdapterRefusedError, UnknownAdapterError
from tailor.serve.constraints import OutputFormat, StructuredOutputError
from tailor.serve.engine import Engine, Request
from tailor.serve.sampling import SamplingParams, stop_token_ids

__all__ = ["AdapterManager", "AdapterRef", "AdapterRefusedError", "Engine", "OutputFormat", "Request",
           "SamplingParams", "StructuredOutputError", "UnknownAdapterError", "stop_token_ids"]
