"""Training-memory estimate from shapes alone: weights, adapter, gradients, optimizer state, activations.

Every part is bytes = (number of elements) x (bytes per element); the choices behind each number:

- Frozen weights: the whole base in the weight dtype (bf16/fp16: 2 bytes, fp32 and bf16-mixed: 4 bytes).
  QLoRA quantises only the block linears (embeddings, output head and norms stay in the compute dtype,
  as bitsandbytes/transformers leave them):
  NF4 with double quantisation (QLoRA paper, sec. 3): 4 bits + one 8-bit absmax per 64 weights + one fp32
  second-level constant per 256 absmax values = 4 + 8/64 + 32/(64*256) = 4.127 bits per weight
  (4.5 bits without double quantisation). LLM.int8 (bitsandbytes): 1 byte per weight + one fp32 scale per
  output row.
- LoRA adapter weights, their gradients and their AdamW state are in the adapter dtype: fp32 by default
  (tailor creates adapters in fp32 even on a bf16 base), bf16 for torchtune / LitGPT bf16-true.
  Full fine-tuning keeps gradients and optimizer state in the weight dtype (what
  torch.optim does: state tensors take the parameter's dtype).
- Optimizer state per trainable parameter: AdamW 2 states; 8-bit AdamW (bitsandbytes, block-wise, block
  2048 with an fp32 absmax per block) 2 bytes + 8/2048; SGD without momentum 0.
- Activations: the tensors autograd keeps for backward, per token, read off a Hugging Face Llama block
  with SDPA (flash / memory-efficient attention: no s x s score matrix) by counting saved tensors with
  torch.autograd.graph.saved_tensors_hooks (tests/test_plan_memory.py repeats that count). With a the
  compute-dtype bytes and f the adapter-dtype bytes, per layer:
      every RMSNorm        4H  (it upcasts its input to fp32 and keeps that copy)
      attention (SDPA)     a*(2*nh*d + 2*nkv*d)  (q, k, v, output; RoPE and GQA add nothing)
      SwiGLU MLP           3*a*I  (silu input, silu output, up output)
      full fine-tuning     + a*(4H + nh*d + I): each pre-norm's output before and after its weight,
                           the o_proj and down_proj inputs (inputs of trainable linears are kept)
      LoRA                 + the inputs of adapted layers only (frozen ones keep none): when f != a PEFT
                           casts x to the adapter dtype in every adapted layer, one copy each (f*in);
                           when f == a they share one tensor per input; + f*r per adapted layer (A output)
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4) is
  the classic derivation (34*s*b*h per layer for GPT with dropout and no flash attention); this list is
  the same exercise for today's Llama-style block. Plus the final norm (4H, +2aH when fully trained) and
  the loss: logits V in the compute dtype and, at the start of backward, fp32 log-softmax, its gradient
  and the fp32 logits gradient (12V bytes; with a chunked loss only one chunk's worth).
  With gradient checkpointing each block keeps only its input (a*H) and one block's activations are
  live again during its recomputation.
- Framework overhead: CUDA context and cuBLAS/cuDNN workspaces (a fixed 0.6 GiB, typical of PyTorch 2.x
  on recent GPUs) plus 8% of everything else for the caching allocator's fragmentation. On CPU, 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from tailor.plan.catalogue import Architecture
from tailor.plan.params import count_parameters, lora_parameters, resolve_targets

GIB = 1024**3
METHODS = ("full", "lora", "qlora-nf4", "qlora-int8")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
PRECISIONS = ("bf16", "fp16", "fp32", "bf16-mixed")

# (weight bytes, compute/activation bytes) per precision
_PRECISION_BYTES = {"bf16": (2, 2), "fp16": (2, 2), "fp32": (4, 4), "bf16-mixed": (4, 2)}
NF4_BITS_DOUBLE_QUANT = 4 + 8 / 64 + 32 / (64 * 256)
NF4_BITS = 4 + 32 / 64
CUDA_CONTEXT_GIB = 0.6
ALLOCATOR_FRACTION = 0.08
ADAPTER_BYTES = 4  # tailor keeps adapters in fp32
_ADAPTER_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class TrainingSetup:
    """What is being trained and how (validated by tailor.plan.planner before it gets here)."""

    method: str = "lora"
    rank: int = 16
    alpha: float = 32
    target_modules: str | tuple[str, ...] = "all-linear"
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"
    precision: str = "bf16"
    double_quant: bool = True
    adapter_dtype: str = "fp32"  # tailor: fp32; torchtune and LitGPT bf16-true: bf16
    loss_chunk_tokens: int | None = None  # logits computed in chunks (torchtune, tailor's trainer)

    @property
    def is_lora(self) -> bool:
        return self.method != "full"


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per part; `overhead` is framework/CUDA overhead (0 on CPU)."""

    frozen_weights: float
    adapter_weights: float
    gradients: float
    optimizer_state: float
    activations: float
    overhead: float

    @property
    def model_state(self) -> float:
        """The parts FSDP-style sharding divides across GPUs."""
        return self.frozen_weights + self.adapter_weights + self.gradients + self.optimizer_state

    @property
    def total(self) -> float:
        return self.model_state + self.activations + self.overhead

    def gib(self) -> dict[str, float]:
        parts = {
            k: getattr(self, k) / GIB
            for k in (
                "frozen_weights",
                "adapter_weights",
                "gradients",
                "optimizer_state",
                "activations",
                "overhead",
            )
        }
        return {"total": self.total / GIB, **parts}


def trainable_parameters(arch: Architecture, setup: TrainingSetup) -> int:
    if not setup.is_lora:
        return count_parameters(arch).total
    return lora_parameters(arch, setup.rank, _targets(setup))


def _targets(setup: TrainingSetup) -> str | list[str]:
    t = setup.target_modules
    return t if isinstance(t, str) else list(t)


def frozen_weight_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    counts = count_parameters(arch)
    weight_bytes = _PRECISION_BYTES[setup.precision][0]
    if setup.method in ("full", "lora"):
        return counts.total * weight_bytes
    rest = (counts.total - counts.block_linear) * weight_bytes
    if setup.method == "qlora-nf4":
        bits = NF4_BITS_DOUBLE_QUANT if setup.double_quant else NF4_BITS
        return rest + counts.block_linear * bits / 8
    # qlora-int8: one int8 per weight plus an fp32 scale per output row
    from tailor.plan.params import block_linears

    rows = sum(lin.out_features * lin.count for lin in block_linears(arch))
    return rest + counts.block_linear + 4 * rows


def optimizer_bytes_per_param(optimizer: str, state_bytes: int) -> float:
    if optimizer == "adamw":
        return 2 * state_bytes
    if optimizer == "adamw-8bit":
        return 2 * (1 + 4 / 2048)
    return 0.0  # sgd without momentum keeps no state


def _layer_bytes_per_token(arch: Architecture, setup: TrainingSetup) -> float:
    """Bytes autograd keeps per token for one block (the list in the module docstring)."""
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    a = _PRECISION_BYTES[setup.precision][1]
    total = 4 * h * arch.norms_per_layer  # every RMSNorm keeps an fp32 copy of its input
    total += a * (2 * q + 2 * kv)  # SDPA keeps q, k, v and its output
    total += 3 * a * i  # silu input, silu output, up output
    if not setup.is_lora:
        # norm output before and after the (trainable) weight, for both pre-norms; o_proj and down_proj inputs
        return total + 4 * a * h + a * q + a * i
    f = _ADAPTER_DTYPE_BYTES[setup.adapter_dtype]
    targets = {lin.name for lin in resolve_targets(arch, _targets(setup))}
    inputs = {
        "q_proj": h,
        "k_proj": h,
        "v_proj": h,
        "qkv_proj": h,
        "o_proj": q,
        "gate_proj": h,
        "up_proj": h,
        "gate_up_proj": h,
        "down_proj": i,
    }
    if f != a:
        # PEFT casts x to the adapter dtype inside every adapted layer: one copy per layer
        total += sum(f * inputs[t] for t in targets)
    else:
        # no cast: the adapted layers share the tensor they read; frozen layers keep nothing
        shared = {
            "attn_in": {"q_proj", "k_proj", "v_proj", "qkv_proj"},
            "mlp_in": {"gate_proj", "up_proj", "gate_up_proj"},
        }
        total += sum(a * h for group in shared.values() if targets & group)
        total += a * q * ("o_proj" in targets) + a * i * ("down_proj" in targets)
    return total + f * setup.rank * len(targets)  # the A outputs


def activation_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    """Peak activation bytes: saved tensors of all blocks (or checkpoints + one block) plus the loss."""
    a = _PRECISION_BYTES[setup.precision][1]
    tokens = setup.batch_size * setup.seq_len
    layer = _layer_bytes_per_token(arch, setup)
    h = arch.hidden_size
    # with checkpointing: each block's input, plus one block recomputed during backward
    blocks = arch.num_layers * a * h + layer if setup.gradient_checkpointing else arch.num_layers * layer
    final_norm = 4 * h + (0 if setup.is_lora else 2 * a * h)
    # logits (compute dtype, returned to the caller), and at the start of backward the fp32 log-softmax
    # kept by cross-entropy, its gradient and the fp32 logits gradient; a chunked loss holds one chunk's
    fp32_tokens = tokens if setup.loss_chunk_tokens is None else min(tokens, setup.loss_chunk_tokens)
    loss = arch.vocab_size * (tokens * a + fp32_tokens * 12)
    return tokens * (blocks + final_norm) + loss


def estimate_memory(arch: Architecture, setup: TrainingSetup, device: str = "cuda") -> MemoryBreakdown:
    """Peak training memory, part by part (bytes). `device="cpu"` drops the CUDA overhead."""
    trainable = trainable_parameters(arch, setup)
    weight_bytes = _PRECISION_BYTES[setup.precision][0]
    if setup.is_lora:
        frozen = frozen_weight_bytes(arch, setup)
        state_bytes = _ADAPTER_DTYPE_BYTES[setup.adapter_dtype]
        adapter = trainable * state_bytes
    else:
        frozen, adapter = trainable * weight_bytes, 0.0
        state_bytes = weight_bytes
    grads = trainable * state_bytes
    optim = trainable * optimizer_bytes_per_param(setup.optimizer, state_bytes)
    acts = activation_bytes(arch, setup)
    overhead = 0.0
    if device != "cpu":
        overhead = CUDA_CONTEXT_GIB * GIB + ALLOCATOR_FRACTION * (frozen + adapter + grads + optim + acts)
    return MemoryBreakdown(frozen, adapter, grads, optim, acts, overhead)


def adapter_file_bytes(arch: Architecture, setup: TrainingSetup, dtype_bytes: int = ADAPTER_BYTES) -> int:
    """Size of adapter_model.safetensors: the LoRA tensors (safetensors' JSON header is a few KiB)."""
    return trainable_parameters(arch, setup) * dtype_bytes if setup.is_lora else 0
