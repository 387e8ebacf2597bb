"""Published peak-memory measurements, each with the settings we plan it with (docs/planning.md's table).

A measurement is only comparable under its own settings, so each entry records them and where each one
comes from; where the source does not state a setting we write down the value we assumed and say so.
A measurement is also only comparable with the part of our estimate that its tool counts: `metric_kind`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tailor.plan.catalogue import CATALOGUE, Architecture
from tailor.plan.memory import CUDA_CONTEXT_GIB, GIB, MemoryBreakdown, TrainingSetup, estimate_memory

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


METRIC_KINDS = {
    "allocated": "torch.cuda.max_memory_allocated / peak active bytes: the estimate without overhead",
    "reserved": "torch.cuda.max_memory_reserved: the estimate without the CUDA context",
    "device": "what the card must hold (nvidia-smi, 'fits in'): the whole estimate",
}


@dataclass(frozen=True)
class Published:
    source: str
    arch: Architecture
    setup: TrainingSetup
    measured: float  # in `unit`
    unit: str  # "GB" (1e9 bytes) or "GiB"
    metric: str  # what the source measured, in its words
    metric_kind: str  # a key of METRIC_KINDS: which part of our estimate is comparable
    settings: str  # where each setting comes from; assumptions say so
    url: str = ""

    def measured_gib(self) -> float:
        return self.measured * (1e9 / GIB if self.unit == "GB" else 1.0)

    def comparable_estimate(self, mem: MemoryBreakdown) -> float:
        """Bytes of our estimate that the source's metric counts."""
        if self.metric_kind == "allocated":
            return mem.total - mem.overhead
        if self.metric_kind == "reserved":
            return mem.total - CUDA_CONTEXT_GIB * GIB
        return mem.total


_L2 = CATALOGUE["Llama-2-7B"]
_L31 = CATALOGUE["Llama-3.1-8B"]
_QV = ("q_proj", "v_proj")
_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TT_README = "https://github.com/pytorch/torchtune/blob/30b8519e8/README.md (PR #1664, 2024-09-24)"
_TT_QLORA = "https://github.com/pytorch/torchtune/blob/0914d5cfb/docs/source/tutorials/qlora_finetune.rst"
_LITGPT = "https://github.com/Lightning-AI/litgpt/blob/main/tutorials/resource-tables.md (commit 8641822)"
# torchtune README rows: batch 2, packed to 2048, torch.compile on (the README's note); recipe configs
# llama3_1/8B_*_single_device.yaml at 30b8519e8: bf16, activation checkpointing, CEWithChunkedOutputLoss
# (8 chunks along the sequence: 2 x 256 = 512 tokens each)
_TT_8B = dict(batch_size=2, max_seq_len=2048, gradient_checkpointing=True, loss_chunk_tokens=512,
              compile=True)
_TT_8B_SETTINGS = (
    "batch 2 x 2048 packed, compile (README note); bf16, activation checkpointing, chunked CE in 8 chunks "
    "(recipes/configs/llama3_1/8B_{}_single_device.yaml at 30b8519e8); {}"
)
_OFFLOAD_ASSUMED = (
    "ASSUMED activation offloading on (the config ships it off; the option landed in PR #1443 a week "
    "before the table; without it forward ends holding weights + 1.0 GiB checkpoints + 0.98 GiB logits, "
    "more than the published peak); metric assumed active bytes, as the README's other memory table"
)

# torchtune QLoRA tutorial rows: llama2/7B_{lora,qlora}_single_device.yaml at 0914d5cfb
_TT_TUTORIAL_LORA = TrainingSetup(
    method="lora",
    rank=8,
    lora_alpha=16,
    target_modules=_QV,
    batch_size=2,
    max_seq_len=512,
    gradient_checkpointing=True,
    adapter_dtype="bf16",
    grad_accum=64,
)
# LitGPT resource-table rows: finetune/lora.py at 8641822, first step on the longest Alpaca example
_LITGPT_LORA = TrainingSetup(
    method="lora",
    rank=8,
    lora_alpha=16,
    target_modules=_QV,
    batch_size=1,
    max_seq_len=1304,
    gradient_checkpointing=False,
    loss_chunk_tokens=128,
    loss_upcast=False,
    lora_dropout=0.05,
    adapter_dtype="bf16",
)

PUBLISHED = [
    Published(
        "torchtune QLoRA tutorial: Llama-2-7B LoRA",
        _L2,
        _TT_TUTORIAL_LORA,
        15.57,
        "GB",
        "peak memory reserved, training",
        "reserved",
        "llama2/7B_lora_single_device.yaml at 0914d5cfb: r=8 alpha=16 on q,v, batch 2, bf16, checkpointing, "
        "unchunked CE, gradient_accumulation_steps 64; alpaca_cleaned truncated at 512 tokens (dataset "
        "default); GB = 1e9 (memory_stats_log)",
        _TT_QLORA,
    ),
    Published(
        "torchtune QLoRA tutorial: Llama-2-7B QLoRA",
        _L2,
        replace(_TT_TUTORIAL_LORA, method="qlora-nf4", target_modules=_ALL),
        9.29,
        "GB",
        "peak memory reserved, training",
        "reserved",
        "llama2/7B_qlora_single_device.yaml at 0914d5cfb: r=8 alpha=16 on q,k,v,o + MLP, NF4 with double "
        "quantisation (torchao), otherwise as the LoRA row",
        _TT_QLORA,
    ),
    Published(
        "torchtune README: Llama-3.1-8B full, RTX 4090",
        _L31,
        TrainingSetup(method="full", optimizer="adamw-8bit-paged", optimizer_in_backward=True, **_TT_8B),
        18.9,
        "GiB",
        "peak memory per GPU",
        "allocated",
        _TT_8B_SETTINGS.format(
            "full", "bitsandbytes PagedAdamW8bit, optimizer_in_bwd: True; metric assumed active bytes"
        ),
        _TT_README,
    ),
    Published(
        "torchtune README: Llama-3.1-8B LoRA, RTX 4090",
        _L31,
        TrainingSetup(
            method="lora",
            rank=8,
            lora_alpha=16,
            target_modules=_QV,
            adapter_dtype="bf16",
            activation_offloading=True,
            **_TT_8B,
        ),
        16.2,
        "GiB",
        "peak memory per GPU",
        "allocated",
        _TT_8B_SETTINGS.format("lora", "r=8 alpha=16 on q,v, fused torch AdamW; " + _OFFLOAD_ASSUMED),
        _TT_README,
    ),
    Published(
        "torchtune README: Llama-3.1-8B QLoRA, RTX 4090",
        _L31,
        TrainingSetup(
            method="qlora-nf4",
            rank=8,
            lora_alpha=16,
            target_modules=_ALL,
            adapter_dtype="bf16",
            activation_offloading=True,
            **_TT_8B,
        ),
        7.4,
        "GiB",
        "peak memory per GPU",
        "allocated",
        _TT_8B_SETTINGS.format("qlora", "r=8 alpha=16 on q,k,v,o + MLP, NF4 (torchao); " + _OFFLOAD_ASSUMED),
        _TT_README,
    ),
    Published(
        "LitGPT resource tables: Llama-2-7B LoRA bf16-true, A100",
        _L2,
        _LITGPT_LORA,
        21.30,
        "GB",
        "torch.cuda.max_memory_allocated, micro-batch 1",
        "allocated",
        "finetune/lora.py at 8641822: r=8 alpha=16 dropout 0.05 on q,v (4,194,304 trainable, as the table "
        "says), no checkpointing, lm_head and CE in chunks of 128 without fp32 upcast; first step on the "
        "longest Alpaca example, 1304 tokens (the table's note)",
        _LITGPT,
    ),
    Published(
        "LitGPT resource tables: Llama-2-7B LoRA bnb.nf4, A100",
        _L2,
        replace(_LITGPT_LORA, method="qlora-nf4", double_quant=False, quant_keeps_inputs=True,
                optimizer="adamw-paged"),
        14.14,
        "GB",
        "torch.cuda.max_memory_allocated, micro-batch 1",
        "allocated",
        "as the LoRA row; NF4 without double quantisation, bnb.optim.PagedAdamW (finetune/lora.py); "
        "bitsandbytes 0.41.1, whose 4-bit layers keep their inputs (fixed in 0.43.2, PR #1270)",
        _LITGPT,
    ),
    Published(
        "QLoRA paper: LLaMA-65B on one 48 GB GPU",
        LLAMA1_65B,
        TrainingSetup(
            method="qlora-nf4",
            rank=64,
            lora_alpha=16,
            batch_size=4,  # per_device_train_batch_size 4 in finetune_guanaco_65b.sh
            max_seq_len=528,
            gradient_checkpointing=True,
            optimizer="adamw-paged",
            lora_dropout=0.05,
            adapter_dtype="bf16",
            quant_keeps_inputs=True,
            grad_accum=4,
        ),
        48,
        "GB",
        "claim: fits in 48 GB (an upper bound)",
        "device",
        "scripts/finetune_guanaco_65b.sh + qlora.py (artidoro/qlora): r=64 alpha=16 dropout 0.05 on all "
        "linear layers, NF4 + double quantisation, bf16 adapters, paged_adamw_32bit, batch 4 x (16 source "
        "+ 512 target) tokens, gradient checkpointing, gradient_accumulation_steps 4 (micro-batches after "
        "the first run with every LoRA gradient alive); bitsandbytes of 2023 (inputs kept)",
        "https://arxiv.org/abs/2305.14314",
    ),
]


def compare_published() -> list[dict]:
    """Estimate vs published peak for every entry; error in % of the published value."""
    rows = []
    for p in PUBLISHED:
        mem = estimate_memory(p.arch, p.setup)
        measured = p.measured_gib()
        comparable = p.comparable_estimate(mem) / GIB
        rows.append(
            {
                "source": p.source,
                "metric": p.metric,
                "metric_kind": p.metric_kind,
                "settings": p.settings,
                "url": p.url,
                "published_gib": measured,
                "estimate_gib": comparable,
                "error_percent": 100 * (comparable - measured) / measured,
                "estimate_total_gib": mem.total / GIB,
                "host_gib": sum(mem.host_gib().values()),
            }
        )
    return rows


def markdown_table() -> str:
    """docs/planning.md's table of published measurements."""
    lines = [
        "| source | metric | published | estimate of that metric (error) | on the card | host |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in compare_published():
        lines.append(
            f"| {r['source']} | {r['metric']} ({r['metric_kind']}) | {r['published_gib']:.2f} GiB | "
            f"{r['estimate_gib']:.2f} GiB ({r['error_percent']:+.0f}%) | {r['estimate_total_gib']:.2f} GiB | "
            f"{r['host_gib']:.2f} GiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
