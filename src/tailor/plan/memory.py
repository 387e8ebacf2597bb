"""Training-memory estimate from shapes alone: weights, adapter, gradients, optimizer state, activations.

Every part is bytes = (number of elements) x (bytes per element); the choices behind each number:

- Frozen weights: the whole base in the weight dtype (bf16/fp16: 2 bytes, fp32 and bf16-mixed: 4 bytes).
  QLoRA quantises only the block linears (embeddings, output head and norms stay in the compute dtype,
  as bitsandbytes/transformers and torchtune leave them):
  NF4 with double quantisation (QLoRA paper, sec. 3): 4 bits + one 8-bit absmax per 64 weights + one fp32
  second-level constant per 256 absmax values = 4 + 8/64 + 32/(64*256) = 4.127 bits per weight
  (4.5 bits without double quantisation). LLM.int8 (bitsandbytes): 1 byte per weight + one fp32 scale per
  output row.
- LoRA adapter weights, their gradients and their AdamW state are in the adapter dtype: fp32 by default
  (tailor creates adapters in fp32 even on a bf16 base), bf16 for torchtune / LitGPT bf16-true.
  Full fine-tuning keeps gradients and optimizer state in the weight dtype (what
  torch.optim does: state tensors take the parameter's dtype).
- Gradients: one per trainable element (how many are alive at the peak: "Peak" below). With the
  optimizer step fused into backward
  (`optimizer_in_backward`, torchtune's `optimizer_in_bwd`: each parameter is stepped and its gradient
  freed in a post-accumulate-grad hook) only one gradient is alive at a time: the largest tensor's.
- Optimizer state per trainable element: torch AdamW 2 states in the parameter dtype; bitsandbytes AdamW
  2 fp32 states (`adamw-paged`), or 8-bit (`adamw-8bit*`: 2 bytes + an fp32 absmax per 2048-element block,
  but fp32 for tensors under 4096 elements, bitsandbytes' `min_8bit_size`); SGD without momentum 0.
  Paged state is host memory (tailor.plan.optimizer says why).
- Activations: the tensors autograd keeps for backward, per token, read off a Hugging Face Llama block
  with SDPA (flash / memory-efficient attention: no s x s score matrix) by counting saved tensors with
  torch.autograd.graph.saved_tensors_hooks (tests/test_plan_memory.py repeats that count). With a the
  compute-dtype bytes and f the adapter-dtype bytes, per layer:
      every RMSNorm        4H  (it upcasts its input to fp32 and keeps that copy)
      attention (SDPA)     a*(2*nh*d + 2*nkv*d)  (q, k, v, output; RoPE and GQA add nothing)
      eager attention      + a*nh*s: the softmax probabilities (heads x s x s a sequence), what tailor's
                           trainer keeps on a CPU, where it runs eager attention (faster there)
      SwiGLU MLP           3*a*I  (silu input, silu output, up output)
      full fine-tuning     + a*(4H + nh*d + I): each pre-norm's output before and after its weight,
                           the o_proj and down_proj inputs (inputs of trainable linears are kept)
      LoRA                 + the inputs of adapted layers only (frozen ones keep none): when f != a PEFT
                           casts x to the adapter dtype in every adapted layer, one copy each (f*in);
                           when f == a they share one tensor per input; + f*r per adapted layer (A output)
      LoRA dropout > 0     each adapted layer keeps its dropout output (f*in) instead of the (cast)
                           input, and its keep-mask: 1 byte per element on CUDA (fused native_dropout),
                           f bytes on CPU (at::dropout keeps a noise tensor); without checkpointing the
                           first block's q/k/v adapters keep no mask (their input, from frozen
                           embeddings, needs no gradient)
      quant_keeps_inputs   bitsandbytes < 0.43.2 kept the input of every 4-bit linear for backward
                           (`ctx.tensors = (A, B)` in MatMul4Bit; removed by PR #1270): + a*(2H + nh*d + I)
                           shared with the LoRA inputs above
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4) is
  the classic derivation (34*s*b*h per layer for GPT with dropout and no flash attention); this list is
  the same exercise for today's Llama-style block. Plus the final norm (4H, +2aH when fully trained).
  QLoRA adds one dequantised weight (the largest block linear in the compute dtype): bitsandbytes and
  torchao dequantise each weight for its matmul and free it afterwards.
  With gradient checkpointing each block keeps only its input (a*H) and one block's activations are
  live again during its recomputation. With activation offloading (torchtune's OffloadActivations) what
  the blocks keep moves to pinned CPU memory as forward goes on; the device holds two blocks' worth (the
  one in use and the one being copied back) and the rest is reported as host memory.
- Loss, per token (V vocabulary, c the tokens of one loss chunk, T all tokens):
      eager, fp32 upcast   log-softmax kept in fp32 for every chunk (4V) + at the start of a chunk's
                           backward its fp32 gradient and the fp32 logits gradient (8V x c); unchunked,
                           the caller also holds the logits (a*V x T: transformers returns them)
      eager, no upcast     the same in the compute dtype (LitGPT's 2023 chunked loss): a*V kept,
                           2a*V x c in backward
      compiled             torch.compile fuses the upcast with the cross-entropy; its partitioner keeps
                           the compute-dtype logits and two fp32 numbers per row (max and log-sum-exp)
                           and recomputes the softmax in backward: a*V + 8 kept, a*V x c in backward
                           (tests/test_plan_memory.py measures both eager and compiled on CPU)
- Peak: the parts above are not all alive at once; the estimate is the largest of these moments of one
  optimizer step (`phase_bytes`), each weights + optimizer state + what is alive then:
      backward          activations + the gradients that exist while they are all still alive
      end of backward   all gradients + the first block's activations (+ its recomputation with
                        checkpointing), or a tied embedding's last gradient (see below), if larger
      optimizer step    all gradients + the step's temporaries + logits the caller still holds
  Why these moments, and the tied embedding's extra moment: docs/planning.md ("Where the peak is").
  Optimizer temporaries (torch/optim/adam.py): torch AdamW `fused` none (tailor's trainer asks for it),
  `foreach` (torch's default on CUDA) one temporary per tensor, all at once (`_foreach_sqrt`), the
  `for-loop` (torch's default on CPU) two of one tensor at a time; bitsandbytes kernels and SGD work in
  place. With the optimizer step in backward each gradient (and temporary) lives for one tensor only, so
  there is no separate step phase. Paged state and offloaded activations are off the device in every
  phase. In the breakdown, `activations` is the activation peak and `gradients` what the peak moment
  holds on top of weights, optimizer state and activations (`all_gradients` is the full size).
  tests/test_plan_memory.py counts live tensor bytes through real steps of a tiny model, phase by phase.
- Framework overhead: CUDA context and cuBLAS/cuDNN workspaces (a fixed 0.6 GiB, typical of PyTorch 2.x
  on recent GPUs) plus 8% of everything else for the caching allocator's fragmentation. On a CPU the peak
  is the process's RSS: the process before any model (CPU_PROCESS_GIB) plus what torch allocates besides
  tensors at the first steps (CPU_RUNTIME_GIB), both fitted on measurements (their comments).
  `torch.cuda.max_memory_allocated` corresponds to the total without overhead; `max_memory_reserved`
  to the total without the CUDA context; nvidia-smi to the total.
"""

from __future__ import annotations

from dataclasses import dataclass

from tailor.methods import METHODS, method_spec
from tailor.plan.catalogue import Architecture
from tailor.plan.optimizer import OPTIMIZER_KERNELS, state_bytes_on_device_and_host, step_temporary_bytes
from tailor.plan.params import block_linears, count_parameters, lora_parameters, resolve_targets

GIB = 1024**3
PRECISIONS = ("bf16", "fp16", "fp32", "bf16-mixed")
ADAPTER_DTYPES = ("fp32", "bf16")
ATTENTIONS = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")

# (weight bytes, compute/activation bytes) per precision
_PRECISION_BYTES = {"bf16": (2, 2), "fp16": (2, 2), "fp32": (4, 4), "bf16-mixed": (4, 2)}
NF4_BITS_DOUBLE_QUANT = 4 + 8 / 64 + 32 / (64 * 256)
NF4_BITS = 4 + 32 / 64
CUDA_CONTEXT_GIB = 0.6
# On a CPU the peak is the process's RSS, which holds more than tensors. Fitted on measurements:
# the process itself, before any model: the interpreter with torch, transformers, tokenizers, bitsandbytes
# and tailor imported, the tokenizer and the data loaded (0.47 GiB in `tailor train`, AVX512-BF16 Xeon)
CPU_PROCESS_GIB = 0.45
# what torch allocates at the first training steps besides tensors (oneDNN / MKL scratch, thread pools, the
# autograd engine): plan/measure.py's tiny case peaks this much above its live tensors, 0.067 GiB on an AVX2
# EPYC and 0.084 on an AVX512-BF16 Xeon (tests/test_plan_memory.py)
CPU_RUNTIME_GIB = 0.08
ALLOCATOR_FRACTION = 0.08
ADAPTER_BYTES = 4  # tailor keeps adapters in fp32
_ADAPTER_DTYPE_BYTES = {"fp32": 4, "bf16": 2}
OFFLOAD_RESIDENT_BLOCKS = 2  # activation offloading: the block in use and the one being copied back

# which saved input each block linear reads (layers reading the same tensor share it)
_INPUT_OF = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "qkv_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "gate_up_proj": "mlp_in",
    "down_proj": "down_in",
    "gate": "mlp_in",  # an MoE router (plan.params.moe_parameters) reads the MLP input
}


@dataclass(frozen=True)
class TrainingSetup:
    """What is being trained and how (validated by tailor.plan.planner before it gets here). Fields that
    TrainConfig also has carry its names (method, rank, lora_alpha, target_modules, batch_size,
    max_seq_len, gradient_checkpointing, lora_dropout, grad_accum); `precision` is the planner's, finer
    than train's (tailor.plan.planner.train_config_setup maps a TrainConfig onto a TrainingSetup)."""

    method: str = "lora"  # a name of tailor.methods.METHODS
    rank: int = 16
    lora_alpha: float = 32
    target_modules: str | tuple[str, ...] = "all-linear"
    batch_size: int = 1
    max_seq_len: int = 2048
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"
    precision: str = "bf16"
    double_quant: bool = True
    adapter_dtype: str = "fp32"  # tailor: fp32; torchtune and LitGPT bf16-true: bf16
    loss_chunk_tokens: int | None = None  # tokens per loss chunk (torchtune 8 chunks, tailor's trainer)
    compile: bool = False  # torch.compile'd loss: keeps compute-dtype logits, not fp32 log-softmax
    loss_upcast: bool = True  # the loss upcasts logits to fp32 (LitGPT's 2023 chunked loss did not)
    optimizer_in_backward: bool = False  # step each parameter in backward, free its gradient at once
    activation_offloading: bool = False  # kept activations go to pinned CPU memory (torchtune)
    lora_dropout: float = 0.0
    quant_keeps_inputs: bool = False  # bitsandbytes < 0.43.2: every 4-bit linear keeps its input
    optimizer_kernel: str = "fused"  # torch AdamW: fused (tailor), foreach (default on CUDA), for-loop (CPU)
    grad_accum: int = 1  # micro-batches per optimizer step; later ones run with gradients alive
    attention: str = "sdpa"  # eager (tailor's trainer on CPU) also keeps each block's softmax (s x s)
    base_dtype: str | None = None  # an unquantized frozen base stored otherwise than `precision` says (bf16
    # at fp32: tailor.models.upcast); None: in the precision's dtype

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.optimizer_kernel not in OPTIMIZER_KERNELS:
            problems.append(f"optimizer_kernel {self.optimizer_kernel!r}: choose one of {OPTIMIZER_KERNELS}")
        if self.grad_accum < 1:
            problems.append(f"grad_accum {self.grad_accum}: must be >= 1")
        if self.attention not in ATTENTIONS:
            problems.append(f"attention {self.attention!r}: choose one of {', '.join(ATTENTIONS)}")
        if problems:
            raise ValueError("TrainingSetup: " + "; ".join(problems))

    @property
    def is_lora(self) -> bool:
        """An adapter on a frozen (maybe quantised) base, as opposed to training every weight."""
        return not method_spec(self.method).trains_all_weights

    @property
    def quantized_bits(self) -> int | None:
        """Bits per frozen block-linear weight (None: the base is not quantised)."""
        return method_spec(self.method).quantized_bits


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per part of the peak; `overhead` is framework/CUDA overhead (0 on CPU). The host_* parts live
    in CPU memory (paged optimizer state, offloaded activations) and are not in `total`.

    The parts are what is alive at the peak moment of the training step (module docstring, "Peak";
    `peak_phase` names it) and sum to it: at the start of backward all activations and the first
    gradients; at its end all gradients and one block's activations; at the optimizer step all gradients
    (plus the step's temporaries) and only the logits the caller still holds. `all_gradients` is the size
    of every gradient together, whichever moment is the peak."""

    frozen_weights: float
    adapter_weights: float
    gradients: float
    optimizer_state: float
    activations: float
    overhead: float
    host_optimizer_state: float = 0.0
    host_activations: float = 0.0
    all_gradients: float = 0.0  # every trainable element's gradient, alive together after backward
    peak_phase: str = "backward"  # "backward", "end of backward" or "optimizer step"

    @property
    def model_state(self) -> float:
        """The parts FSDP-style sharding divides across GPUs."""
        return self.frozen_weights + self.adapter_weights + self.gradients + self.optimizer_state

    @property
    def total(self) -> float:
        return self.model_state + self.activations + self.overhead

    def gib(self) -> dict[str, float]:
        """Device memory: the total and one entry per part."""
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

    def host_gib(self) -> dict[str, float]:
        """CPU memory the run needs besides the device (paged optimizer state, offloaded activations)."""
        return {
            "optimizer_state": self.host_optimizer_state / GIB,
            "activations": self.host_activations / GIB,
        }


def trainable_parameters(arch: Architecture, setup: TrainingSetup) -> int:
    if not setup.is_lora:
        return count_parameters(arch).total
    return lora_parameters(arch, setup.rank, _targets(setup))


def trainable_tensors(arch: Architecture, setup: TrainingSetup) -> list[tuple[int, int]]:
    """(elements, how many) per kind of trainable tensor; sums to trainable_parameters()."""
    if setup.is_lora:
        tensors = []
        for lin in resolve_targets(arch, _targets(setup)):
            tensors += [(setup.rank * lin.in_features, lin.count), (lin.out_features * setup.rank, lin.count)]
        return tensors
    h, v = arch.hidden_size, arch.vocab_size
    tensors = [(v * h, 1 if arch.tie_embeddings else 2)]
    for lin in block_linears(arch):
        tensors.append((lin.weight_params, lin.count))
        if lin.bias:
            tensors.append((lin.out_features, lin.count))
    tensors.append((h, arch.norms_per_layer * arch.num_layers + 1))
    return tensors


def _targets(setup: TrainingSetup) -> str | list[str]:
    t = setup.target_modules
    return t if isinstance(t, str) else list(t)


def frozen_weight_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    counts = count_parameters(arch)
    weight_bytes = _PRECISION_BYTES[setup.precision][0]
    if setup.quantized_bits is None:
        if setup.base_dtype is not None:  # norms are fp32 there too: a few KB, not counted apart
            weight_bytes = _PRECISION_BYTES[setup.base_dtype][0]
        return counts.total * weight_bytes
    rest = (counts.total - counts.block_linear) * weight_bytes
    if setup.quantized_bits == 4:  # qlora-nf4
        bits = NF4_BITS_DOUBLE_QUANT if setup.double_quant else NF4_BITS
        return rest + counts.block_linear * bits / 8
    # qlora-int8: one int8 per weight plus an fp32 scale per output row
    rows = sum(lin.out_features * lin.count for lin in block_linears(arch))
    return rest + counts.block_linear + 4 * rows


def _optimizer_bytes(arch: Architecture, setup: TrainingSetup, state_bytes: int) -> tuple[float, float]:
    """(device bytes, host bytes) of the optimizer state; paged optimizers put large tensors' state in
    unified memory, which we count on the host."""
    return state_bytes_on_device_and_host(trainable_tensors(arch, setup), setup.optimizer, state_bytes)


def _mask_bytes(setup: TrainingSetup, device: str) -> int:
    """Bytes per element of a dropout keep-mask: CUDA's fused native_dropout keeps a bool mask; elsewhere
    at::dropout multiplies by a noise tensor in the adapter dtype and keeps that."""
    return 1 if device != "cpu" else _ADAPTER_DTYPE_BYTES[setup.adapter_dtype]


def _first_block_masks(arch: Architecture, setup: TrainingSetup, device: str) -> float:
    """Mask bytes per token the first block does not keep: with frozen embeddings and no checkpointing
    the first attention's input needs no gradient, so the dropouts of the q/k/v adapters reading it save
    no mask (everything after the first adapter does need gradients)."""
    if not setup.is_lora or setup.lora_dropout == 0 or setup.gradient_checkpointing:
        return 0.0
    targets = {lin.name for lin in resolve_targets(arch, _targets(setup))}
    reading_input = sum(_INPUT_OF[t] == "attn_in" for t in targets)
    return _mask_bytes(setup, device) * arch.hidden_size * reading_input


def _layer_bytes_per_token(arch: Architecture, setup: TrainingSetup, device: str = "cuda") -> float:
    """Bytes autograd keeps per token for one block (the list in the module docstring)."""
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    a = _PRECISION_BYTES[setup.precision][1]
    total = 4 * h * arch.norms_per_layer  # every RMSNorm keeps an fp32 copy of its input
    total += a * (2 * q + 2 * kv)  # SDPA keeps q, k, v and its output
    if setup.attention == "eager":  # the softmax probabilities, heads x s x s a sequence: nh x s a token
        total += a * arch.num_heads * setup.max_seq_len
    total += 3 * a * i  # silu input, silu output, up output
    if not setup.is_lora:
        # norm output before and after the (trainable) weight, for both pre-norms; o_proj and down_proj inputs
        return total + 4 * a * h + a * q + a * i
    f = _ADAPTER_DTYPE_BYTES[setup.adapter_dtype]
    input_size = {"attn_in": h, "o_in": q, "mlp_in": h, "down_in": i}
    targets = {lin.name for lin in resolve_targets(arch, _targets(setup))}
    shared: set[str] = set()  # inputs kept once, in the compute dtype, however many layers read them
    if setup.lora_dropout > 0:
        # each adapted layer keeps its dropout output (adapter dtype) and the keep-mask
        total += sum((f + _mask_bytes(setup, device)) * input_size[_INPUT_OF[t]] for t in targets)
    elif f != a:
        # PEFT casts x to the adapter dtype inside every adapted layer: one copy per layer
        total += sum(f * input_size[_INPUT_OF[t]] for t in targets)
    else:
        # no cast: the adapted layers share the tensor they read; frozen layers keep nothing
        shared |= {_INPUT_OF[t] for t in targets}
    if setup.quant_keeps_inputs and setup.method == "qlora-nf4":
        shared |= set(input_size)  # old bitsandbytes: every 4-bit linear keeps its input
    total += sum(a * input_size[name] for name in shared)
    return total + f * setup.rank * len(targets)  # the A outputs


def loss_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    """Peak bytes of the logits and the cross-entropy (module docstring, "Loss")."""
    a = _PRECISION_BYTES[setup.precision][1]
    v = arch.vocab_size
    tokens = setup.batch_size * setup.max_seq_len
    chunk = tokens if setup.loss_chunk_tokens is None else min(tokens, setup.loss_chunk_tokens)
    if setup.compile:
        # the fused upcast + cross-entropy keeps its compute-dtype input and a max and a log-sum-exp per row
        return tokens * (a * v + 8) + chunk * a * v
    held = tokens * a * v if setup.loss_chunk_tokens is None else 0  # unchunked: the caller holds logits
    if setup.loss_upcast:
        return held + tokens * 4 * v + chunk * 8 * v
    return held + tokens * a * v + chunk * 2 * a * v


def activation_bytes(arch: Architecture, setup: TrainingSetup, device: str = "cuda") -> float:
    """Peak activation bytes on the device: saved tensors of all blocks (or checkpoints + one block),
    the loss and, for QLoRA, one dequantised weight (with offloading, what stays on the device)."""
    return _activations(arch, setup, device)[0]


def _activations(arch: Architecture, setup: TrainingSetup, device: str = "cuda") -> tuple[float, float]:
    """(device bytes, host bytes) of activations."""
    a = _PRECISION_BYTES[setup.precision][1]
    tokens = setup.batch_size * setup.max_seq_len
    layer = tokens * _layer_bytes_per_token(arch, setup, device)
    checkpoint = tokens * a * arch.hidden_size  # a checkpointed block keeps only its input
    kept_per_block = checkpoint if setup.gradient_checkpointing else layer
    kept_blocks = arch.num_layers
    if setup.activation_offloading:
        kept_blocks = min(arch.num_layers, OFFLOAD_RESIDENT_BLOCKS)
    host = (arch.num_layers - kept_blocks) * kept_per_block
    on_device = kept_blocks * kept_per_block - tokens * _first_block_masks(arch, setup, device)
    if setup.gradient_checkpointing:
        on_device += layer  # one block's activations live again while it is recomputed
    h = arch.hidden_size
    on_device += tokens * (4 * h + (0 if setup.is_lora else 2 * a * h))  # final norm
    on_device += loss_bytes(arch, setup)
    if setup.quantized_bits is not None:
        on_device += a * max(lin.weight_params for lin in block_linears(arch))  # one dequantised weight
    return on_device, host


def _held_logits_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    """Logits the caller still holds after forward (unchunked loss: transformers returns them)."""
    if setup.loss_chunk_tokens is not None or setup.compile:
        return 0.0
    return setup.batch_size * setup.max_seq_len * _PRECISION_BYTES[setup.precision][1] * arch.vocab_size


def optimizer_temporary_bytes(arch: Architecture, setup: TrainingSetup, state_bytes: int) -> float:
    """Temporaries of one optimizer step on top of weights, gradients and state (tailor.plan.optimizer)."""
    return step_temporary_bytes(trainable_tensors(arch, setup), setup.optimizer, setup.optimizer_kernel,
                                setup.optimizer_in_backward, state_bytes)


def _gradient_bytes_by_stage(
    arch: Architecture, setup: TrainingSetup, state_bytes: int
) -> tuple[float, float]:
    """(gradients of the parameters forward used last: the output head and final norm, produced before
    any block's; gradients of one block) in bytes."""
    if setup.is_lora:  # adapters sit in the blocks only (lm_head is not a target)
        return 0.0, trainable_parameters(arch, setup) * state_bytes / arch.num_layers
    h, v = arch.hidden_size, arch.vocab_size
    embeddings = v * h * (1 if arch.tie_embeddings else 2)
    top = v * h + h  # lm_head (or the tied embedding) and the final norm
    per_block = (count_parameters(arch).total - embeddings - h) / arch.num_layers
    return top * state_bytes, per_block * state_bytes


def _tied_embedding_gradient(arch: Architecture, setup: TrainingSetup, state_bytes: int) -> float:
    """A tied, trained embedding has one AccumulateGrad node for head and lookup: the head's gradient waits
    in the engine's input buffer until the lookup's dense (V x H) gradient arrives last, and the two are
    summed out of place (the head's is a transposed view, so InputBuffer cannot add in place): two more
    embedding-sized tensors for a moment (tests/test_plan_memory.py sees it)."""
    if setup.is_lora or not arch.tie_embeddings:
        return 0.0
    return 2 * arch.vocab_size * arch.hidden_size * state_bytes


def _state_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of trainable tensors, their gradients and optimizer state."""
    if setup.is_lora:
        return _ADAPTER_DTYPE_BYTES[setup.adapter_dtype]
    return _PRECISION_BYTES[setup.precision][0]


def _weight_bytes(arch: Architecture, setup: TrainingSetup) -> tuple[float, float]:
    """(frozen weights, adapter weights) in bytes."""
    if setup.is_lora:
        return frozen_weight_bytes(arch, setup), trainable_parameters(arch, setup) * _state_bytes(setup)
    return trainable_parameters(arch, setup) * _PRECISION_BYTES[setup.precision][0], 0.0


def phase_bytes(arch: Architecture, setup: TrainingSetup, device: str = "cuda") -> dict[str, float]:
    """Device bytes (overhead aside) at each moment of a training step that can be its peak (module
    docstring, "Peak"): weights + optimizer state + what is alive then."""
    state_bytes = _state_bytes(setup)
    resident = sum(_weight_bytes(arch, setup)) + _optimizer_bytes(arch, setup, state_bytes)[0]
    parts = phase_parts(arch, setup, device)
    return {phase: resident + grads + acts for phase, (grads, acts) in parts.items()}


def phase_parts(
    arch: Architecture, setup: TrainingSetup, device: str = "cuda"
) -> dict[str, tuple[float, float]]:
    """(gradients + optimizer temporaries, activations) alive at each moment that can be the peak."""
    state_bytes = _state_bytes(setup)
    acts = activation_bytes(arch, setup, device)
    all_grads = trainable_parameters(arch, setup) * state_bytes
    step_temporary = optimizer_temporary_bytes(arch, setup, state_bytes)
    if setup.optimizer_in_backward:
        # each gradient is applied and freed as soon as it is complete: the largest one bounds the peak
        largest = max(numel for numel, _ in trainable_tensors(arch, setup)) * state_bytes
        return {"backward": (largest + step_temporary, acts)}
    top, per_block = _gradient_bytes_by_stage(arch, setup, state_bytes)
    # set_to_none: the first micro-batch starts with no gradients; later ones find all of them alive
    early = all_grads if setup.grad_accum > 1 else top + per_block
    tokens = setup.batch_size * setup.max_seq_len
    first_block = tokens * _layer_bytes_per_token(arch, setup, device)
    if setup.gradient_checkpointing:
        first_block += tokens * _PRECISION_BYTES[setup.precision][1] * arch.hidden_size
    last_moment = max(first_block, _tied_embedding_gradient(arch, setup, state_bytes))
    return {
        "backward": (early, acts),
        "end of backward": (all_grads, last_moment),
        "optimizer step": (all_grads + step_temporary, _held_logits_bytes(arch, setup)),
    }


def estimate_memory(arch: Architecture, setup: TrainingSetup, device: str = "cuda") -> MemoryBreakdown:
    """Peak training memory, part by part (bytes): the largest of phase_bytes(). The overhead is the CUDA
    context and allocator's on CUDA, the process and torch's runtime on a CPU (the peak is then the
    process's RSS: what `tailor train` records as peak_rss_gib)."""
    state_bytes = _state_bytes(setup)
    frozen, adapter = _weight_bytes(arch, setup)
    optim, host_optim = _optimizer_bytes(arch, setup, state_bytes)
    host_acts = _activations(arch, setup, device)[1]
    phases = phase_parts(arch, setup, device)
    peak_phase = max(phases, key=lambda phase: sum(phases[phase]))
    grads, acts = phases[peak_phase]  # what is alive at the peak moment, besides weights and state
    if device == "cpu":
        overhead = (CPU_PROCESS_GIB + CPU_RUNTIME_GIB) * GIB
    else:
        overhead = CUDA_CONTEXT_GIB * GIB + ALLOCATOR_FRACTION * (frozen + adapter + grads + optim + acts)
    all_grads = trainable_parameters(arch, setup) * state_bytes
    return MemoryBreakdown(
        frozen, adapter, grads, optim, acts, overhead, host_optim, host_acts, all_grads, peak_phase
    )


def adapter_file_bytes(arch: Architecture, setup: TrainingSetup, dtype_bytes: int = ADAPTER_BYTES) -> int:
    """Size of adapter_model.safetensors: the LoRA tensors (safetensors' JSON header is a few KiB)."""
    return trainable_parameters(arch, setup) * dtype_bytes if setup.is_lora else 0
