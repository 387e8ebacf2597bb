"""What this machine computes fast: the device, the CPU's vector capability, whether it computes bf16
natively, and the precision `auto` resolves to. One rule, used by training, evaluation, serving, QLoRA's
compute dtype and the benchmarks.

Why it matters: on a CPU without native bf16 (AVX2 only: many laptops, AMD Zen 2/3 servers, hosted CI
runners) PyTorch falls back to a generic bf16 kernel about 100x slower than fp32 (1024 x 1024 on 2 cores:
fp32 84 GFLOPS, bf16 0.7), while on one with AVX512-BF16 or AMX bf16 runs 2-4x faster than fp32.

The rule: a CPU computes bf16 natively when oneDNN takes its bf16 matmul path
(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: an AVX512 core or AVX2-VNNI-2 ISA); that is the path
`torch.matmul` uses for bf16 on the CPU, and the fallback is the slow kernel. A CUDA device does when
`torch.cuda.is_bf16_supported()`. oneDNN's check reads its ISA cap, so `ONEDNN_MAX_CPU_ISA=AVX2` should make
a native-bf16 CPU report (and take) the AVX2 path; that was not verifiable on the AVX2-only machine this
was written on.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import torch

from tailor.names import BASE_DTYPE_AT_FP32
from tailor.names import BASE_DTYPES as BASE_DTYPE_CHOICES
from tailor.names import PRECISIONS as PRECISION_CHOICES

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_capability() -> str:
    """ATen's CPU kernel level: "AVX512", "AVX2", "DEFAULT" (or "ZVECTOR", "VSX" elsewhere)."""
    return torch.backends.cpu.get_cpu_capability()


def native_bf16(device: str | None = None) -> bool:
    """Whether `device` (default: cuda when available) computes bf16 matmuls natively (see the module doc)."""
    device = device or default_device()
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fast_dtype(device: str | None = None) -> torch.dtype:
    """bfloat16 where `device` computes it natively, else float32."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def precision_for(requested: str, device: str | None = None) -> str:
    """The precision that runs for `requested` on `device`: auto -> bf16 where bf16 is native, else fp32;
    bf16 and fp32 as given. No warning (`resolve_precision` is the one call that reports)."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


@dataclass(frozen=True)
class Precision:
    """A training precision as resolved on one device: what was asked, what runs, and why."""

    requested: str  # auto | bf16 | fp32
    resolved: str  # bf16 | fp32
    reason: str
    device: str
    cpu_capability: str
    native_bf16: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def resolve_precision(requested: str, device: str | None = None) -> Precision:
    """`auto` -> bf16 where the device computes it natively, fp32 otherwise; bf16 and fp32 stay as given.
    An explicit bf16 where bf16 is not native runs (the user asked), with one warning that measures how
    much slower it is and names the fix.

    Raises:
        ValueError: `requested` is not one of PRECISION_CHOICES.
    """
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISION_CHOICES)}")
    device = device or default_device()
    kind = device.split(":")[0]
    capability = cpu_capability()
    native = native_bf16(device)
    where = f"cuda ({torch.cuda.get_device_name(device)})" if kind == "cuda" else f"cpu ({capability})"
    if native:
        why = f"{where}: native bf16"
    elif kind == "cuda":
        why = f"{where}: no bf16 support"
    else:
        why = f"{where}: no native bf16 (no AVX512-BF16/AMX), fp32 matmuls are ~100x faster here"
    resolved = precision_for(requested, device)
    reason = f"auto -> {resolved}: {why}" if requested == "auto" else f"{requested}, as configured; {why}"
    if resolved == "bf16" and not native:
        slower = _bf16_slowdown() if kind == "cpu" else None
        how_much = f"{slower:.0f}x slower than fp32 here (measured)" if slower else "much slower than fp32"
        warnings.warn(f"precision bf16 on {where}, which has no native bf16: its matmuls run {how_much}. "
                      "Use precision auto (or fp32): --precision auto", stacklevel=2)
    return Precision(requested, resolved, reason, kind, capability, native)


@dataclass(frozen=True)
class BaseDtype:
    """The dtype a run's frozen base is stored in, as resolved: what was asked, what runs, and why."""

    requested: str  # auto | bf16 | fp32
    resolved: str  # bf16 | fp32
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def resolve_base_dtype(requested: str, precision: str, float_base: bool = True,
                       sharded: bool = False) -> BaseDtype:
    """The storage dtype of the frozen base for a run computing at `precision` (resolved: bf16 or fp32).

    auto: at precision bf16, bf16 (the base bf16 autocast computes on); at precision fp32 (auto on a CPU
    without native bf16) tailor.names.BASE_DTYPE_AT_FP32, which says why it is what it is; bf16 there
    means stored bf16 and upcast to fp32 per matmul (tailor.models.upcast), half the memory. Exceptions,
    which resolve to the compute dtype: a method without a float frozen base (`float_base` False: QLoRA's
    base is quantized, full fine-tuning trains every weight), and fp32 under FSDP (`sharded`: it shards
    parameters of one dtype; the upcast base mixes bf16 weights with fp32 norms).

    Raises:
        ValueError: `requested` is not one of BASE_DTYPE_CHOICES, or bf16 at precision fp32 under FSDP.
    """
    if requested not in BASE_DTYPE_CHOICES:
        raise ValueError(f"base_dtype {requested!r} is not one of {', '.join(BASE_DTYPE_CHOICES)}")
    if not float_base:
        return BaseDtype(requested, precision, f"{precision}: the method has no float frozen base to store "
                         "otherwise (QLoRA quantizes it; full fine-tuning trains it)")
    if requested != "auto":
        if requested == "bf16" and precision == "fp32" and sharded:
            raise ValueError("base_dtype bf16 with precision fp32 does not run under FSDP (it shards "
                             "parameters of one dtype); use --base-dtype fp32 or --strategy ddp")
        how = {("bf16", "fp32"): "stored bf16, upcast to fp32 per matmul",
               ("fp32", "bf16"): "stored fp32, bf16 autocast per matmul"}.get((requested, precision), "")
        return BaseDtype(requested, requested, f"{requested}, as configured" + (f": {how}" if how else ""))
    if precision == "bf16":
        return BaseDtype(requested, "bf16", "auto -> bf16: precision bf16 computes on a bf16 base")
    if sharded:
        return BaseDtype(requested, "fp32", "auto -> fp32: precision fp32 under FSDP, which shards "
                         "parameters of one dtype")
    if BASE_DTYPE_AT_FP32 == "bf16":
        return BaseDtype(requested, "bf16", "auto -> bf16: precision fp32 computes on a bf16-stored base "
                         "upcast per matmul (half the memory, measured as fast as fp32 storage: "
                         "docs/precision.md)")
    return BaseDtype(requested, "fp32", "auto -> fp32: precision fp32 (--base-dtype bf16 halves the frozen "
                     "weights, upcast per matmul: docs/precision.md)")


def matmul_gflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.25,
                  device: str = "cpu") -> float:
    """Measured GFLOPS of a `size` x `size` matmul in `dtype` on `device`: one warm-up, then repeats for
    about `seconds` (at least two)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    _synchronize(device)
    repeats, started = 0, time.perf_counter()
    while repeats < 2 or time.perf_counter() - started < seconds:
        a @ b
        repeats += 1
    _synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def _bf16_slowdown() -> float:
    """How many times slower a bf16 matmul is than an fp32 one on this CPU (small: ~50 ms at 1 GFLOPS)."""
    return matmul_gflops(torch.float32, 256, 0.02) / matmul_gflops(torch.bfloat16, 256, 0.02)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


__all__ = ["BASE_DTYPE_CHOICES", "BaseDtype", "PRECISION_CHOICES", "Precision", "cpu_capability",
           "default_device", "fast_dtype", "matmul_gflops", "native_bf16", "precision_for",
           "resolve_base_dtype", "resolve_precision"]
