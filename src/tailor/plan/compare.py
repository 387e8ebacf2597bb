"""Published peak-memory measurements, each with the settings we plan it with (docs/planning.md's table).

A measurement is only comparable under its own settings, so each entry records them; where the source
does not state a setting we write down the value we assumed and say so in `assumed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tailor.plan.catalogue import CATALOGUE, Architecture
from tailor.plan.memory import GIB, TrainingSetup, estimate_memory

# LLaMA-1 65B (QLoRA paper's largest model): not in the catalogue, shape from its params.json
LLAMA1_65B = Architecture(
    name="LLaMA-65B",
    model_type="llama",
    vocab_size=32000,
    hidden_size=8192,
    intermediate_size=22016,
    num_layers=80,
    num_heads=64,
    num_kv_heads=64,
    head_dim=128,
    tie_embeddings=False,
    max_position_embeddings=2048,
    source="QLoRA paper",
)


@dataclass(frozen=True)
class Published:
    source: str
    arch: Architecture
    setup: TrainingSetup
    measured: float  # in `unit`
    unit: str  # "GB" (1e9 bytes) or "GiB"
    metric: str  # what the source measured
    assumed: str = ""  # settings the source does not state, and the value we used
    notes: list[str] = field(default_factory=list)

    def measured_gib(self) -> float:
        return self.measured * (1e9 / GIB if self.unit == "GB" else 1.0)


_L2 = CATALOGUE["Llama-2-7B"]
_L31 = CATALOGUE["Llama-3.1-8B"]
_QV = ("q_proj", "v_proj")
_TT_LLAMA3 = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PUBLISHED = [
    Published(
        "torchtune QLoRA tutorial: Llama-2-7B LoRA",
        _L2,
        TrainingSetup(
            method="lora",
            rank=8,
            alpha=16,
            target_modules=_QV,
            batch_size=2,
            seq_len=512,
            gradient_checkpointing=True,
            adapter_dtype="bf16",
        ),
        15.57,
        "GB",
        "peak memory during training",
        "assumed, the tutorial does not list them: r=8 alpha=16 on q_proj,v_proj, batch 2, "
        "Alpaca truncated at 512 tokens, activation "
        "checkpointing on (torchtune's llama2/7B_lora_single_device defaults of the time)",
    ),
    Published(
        "torchtune QLoRA tutorial: Llama-2-7B QLoRA",
        _L2,
        TrainingSetup(
            method="qlora-nf4",
            rank=8,
            alpha=16,
            target_modules=_QV,
            batch_size=2,
            seq_len=512,
            gradient_checkpointing=True,
            adapter_dtype="bf16",
        ),
        9.29,
        "GB",
        "peak memory during training",
        "same settings as the LoRA row, NF4 with double quantisation",
    ),
    Published(
        "torchtune README: Llama-3.1-8B full, RTX 4090",
        _L31,
        TrainingSetup(
            method="full",
            batch_size=2,
            seq_len=2048,
            gradient_checkpointing=True,
            optimizer="adamw-8bit",
            loss_chunk_tokens=512,
        ),
        18.9,
        "GiB",
        "peak memory per GPU (batch 2, packed 2048, compiled)",
        "8-bit paged AdamW with the optimizer step fused into backward (torchtune's single-device full "
        "config); the planner cannot express paging or optimizer-in-backward",
    ),
    Published(
        "torchtune README: Llama-3.1-8B LoRA, RTX 4090",
        _L31,
        TrainingSetup(
            method="lora",
            rank=8,
            alpha=16,
            target_modules=_TT_LLAMA3,
            batch_size=2,
            seq_len=2048,
            gradient_checkpointing=True,
            loss_chunk_tokens=512,
            adapter_dtype="bf16",
        ),
        16.2,
        "GiB",
        "peak memory per GPU (batch 2, packed 2048, compiled)",
        "r=8 alpha=16 on q,v,output proj + MLP, checkpointing on, chunked loss (8B_lora_single_device)",
    ),
    Published(
        "torchtune README: Llama-3.1-8B QLoRA, RTX 4090",
        _L31,
        TrainingSetup(
            method="qlora-nf4",
            rank=8,
            alpha=16,
            target_modules=_TT_LLAMA3,
            batch_size=2,
            seq_len=2048,
            gradient_checkpointing=True,
            loss_chunk_tokens=512,
            adapter_dtype="bf16",
        ),
        7.4,
        "GiB",
        "peak memory per GPU (batch 2, packed 2048, compiled)",
        "as the LoRA row, base in NF4",
    ),
    Published(
        "LitGPT resource tables: Llama-2-7B LoRA bf16-true, A100",
        _L2,
        TrainingSetup(
            method="lora",
            rank=8,
            alpha=16,
            target_modules=_QV,
            batch_size=1,
            seq_len=1304,
            gradient_checkpointing=False,
            loss_chunk_tokens=128,
            adapter_dtype="bf16",
        ),
        21.30,
        "GB",
        "torch.cuda.max_memory_allocated, micro-batch 1, Alpaca (longest example 1304 tokens)",
        "LitGPT's lora.py defaults of Oct 2023: r=8 alpha=16 on q,v (4,194,304 trainable, as the table "
        "says), no activation checkpointing, lm_head in chunks of 128",
    ),
    Published(
        "LitGPT resource tables: Llama-2-7B LoRA bnb.nf4, A100",
        _L2,
        TrainingSetup(
            method="qlora-nf4",
            rank=8,
            alpha=16,
            target_modules=_QV,
            batch_size=1,
            seq_len=1304,
            gradient_checkpointing=False,
            loss_chunk_tokens=128,
            double_quant=False,
            adapter_dtype="bf16",
        ),
        14.14,
        "GB",
        "torch.cuda.max_memory_allocated, micro-batch 1",
        "as the LoRA row, NF4 without double quantisation",
    ),
    Published(
        "QLoRA paper: LLaMA-65B on one 48 GB GPU",
        LLAMA1_65B,
        TrainingSetup(
            method="qlora-nf4", rank=64, alpha=16, batch_size=1, seq_len=512, gradient_checkpointing=True
        ),
        48,
        "GB",
        "claim: fits in 48 GB (an upper bound)",
        "r=64 on all linear layers, NF4 + double quantisation, paged AdamW, batch 1 x 512 tokens "
        "(Guanaco: 384 source + 128 target), gradient checkpointing",
    ),
]


def compare_published() -> list[dict]:
    """Estimate vs published peak for every entry; error in % of the published value."""
    rows = []
    for p in PUBLISHED:
        mem = estimate_memory(p.arch, p.setup)
        measured = p.measured_gib()
        allocated = mem.total - mem.overhead
        rows.append(
            {
                "source": p.source,
                "metric": p.metric,
                "settings": p.assumed,
                "published_gib": measured,
                "estimate_gib": mem.total / GIB,
                "estimate_allocated_gib": allocated / GIB,
                "error_percent": 100 * (mem.total / GIB - measured) / measured,
                "error_allocated_percent": 100 * (allocated / GIB - measured) / measured,
            }
        )
    return rows
