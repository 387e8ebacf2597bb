"""What `tailor env` reports: the versions a bug report needs, and what this machine computes fast (the
device, the CPU's capability and flags, native bf16, what `precision: auto` resolves to, measured matmul
GFLOPS per dtype), plus where tailor keeps its files.

The compute facts come from `tailor.hardware` (the one rule); this module only gathers and prints them.
Versions are read from the installed packages' metadata, so transformers, peft and bitsandbytes are never
imported (importing transformers alone takes seconds).
"""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")
# CPU flags that decide how fast tailor's matmuls run: AVX2/FMA (fp32), AVX512 and its bf16/VNNI
# extensions and AMX (native bf16 through oneDNN), F16C (fp16 conversion).
RELEVANT_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                      "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
MATMUL_DTYPES = ("fp32", "bf16", "fp16")
# 512 x 512 for 0.2 s per dtype; a dtype at ~1 GFLOPS (bf16 without native support) takes its minimum of
# 3 matmuls, 0.27 s each. About 1.5 s in all: torch's import (~2 s) is the rest of the command's time.
MATMUL_SIZE = 512
MATMUL_SECONDS = 0.2
CHROMIUM_PATH = "/usr/bin/chromium"  # what `make test` installs and the page tests drive


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """tailor (the code running), python, and each of PACKAGES (None: not installed)."""
    from tailor._version import __version__

    return {"tailor": __version__, "python": platform.python_version(),
            **{name: package_version(name) for name in PACKAGES}}


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo (Linux), None elsewhere or when absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo's `model name`), else what `platform` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The RELEVANT_CPU_FLAGS this CPU has (from /proc/cpuinfo), in that order; [] where it cannot tell."""
    present = set((_cpuinfo_field("flags") or "").split())
    return [flag for flag in RELEVANT_CPU_FLAGS if flag in present]


def chromium() -> str | None:
    """The Chromium the web page's tests drive: /usr/bin/chromium, else one on PATH; None when none."""
    if Path(CHROMIUM_PATH).is_file():
        return CHROMIUM_PATH
    return shutil.which("chromium") or shutil.which("chromium-browser")


def cache_folders() -> dict[str, dict[str, Any]]:
    """tailor's cache ($TAILOR_CACHE), the adapter store ($TAILOR_ADAPTERS) and the Hugging Face hub
    cache ($HF_HUB_CACHE): path and whether it exists."""
    from huggingface_hub import constants

    from tailor.adapters.store import default_root
    from tailor.files import tailor_cache_dir

    folders = {"tailor": tailor_cache_dir(), "adapters": default_root(),
               "hf_hub": Path(constants.HF_HUB_CACHE)}
    return {name: {"path": str(path), "exists": path.is_dir()} for name, path in folders.items()}


def measure_matmuls(device: str, size: int = MATMUL_SIZE, seconds: float = MATMUL_SECONDS
                    ) -> dict[str, float | None]:
    """GFLOPS of a `size` x `size` matmul in each of MATMUL_DTYPES on `device` (None: not supported)."""
    from tailor import hardware

    dtypes = {name: dtype for dtype, name in hardware.DTYPE_NAMES.items()}
    measured: dict[str, float | None] = {}
    for name in MATMUL_DTYPES:
        try:
            measured[name] = round(hardware.matmul_gflops(dtypes[name], size, seconds, device), 2)
        except RuntimeError:  # a build without that kernel on this device
            measured[name] = None
    return measured


def describe(size: int = MATMUL_SIZE, seconds: float = MATMUL_SECONDS) -> dict[str, Any]:
    """Everything `tailor env` prints, as one JSON-ready dict (stable keys; None where unknown)."""
    import torch

    from tailor import hardware

    device = hardware.default_device()
    precision = hardware.resolve_precision("auto", device)
    return {
        "versions": versions(),
        "platform": platform.platform(),
        "device": device,
        "gpu": torch.cuda.get_device_name(device) if device == "cuda" else None,
        "cpu": {"model": cpu_model(), "capability": hardware.cpu_capability(), "flags": cpu_flags(),
                "threads": torch.get_num_threads(), "cores": os.cpu_count()},
        "native_bf16": precision.native_bf16,
        "precision_auto": {"resolved": precision.resolved, "reason": precision.reason},
        "matmul_gflops": measure_matmuls(device, size, seconds),
        "matmul_size": size,
        "chromium": chromium(),
        "caches": cache_folders(),
    }


def format_report(info: dict[str, Any]) -> list[str]:
    """`describe()`'s dict as aligned `name  value` lines, for a terminal or a bug report."""
    cpu, gflops = info["cpu"], info["matmul_gflops"]
    rows = [(name, version or "not installed") for name, version in info["versions"].items()]
    rows += [
        ("platform", info["platform"]),
        ("device", f"cuda ({info['gpu']})" if info["gpu"] else info["device"]),
        ("cpu", f"{cpu['model']} ({cpu['cores']} cores; torch threads: {cpu['threads']})"),
        ("capability", cpu["capability"]),
        ("cpu flags", " ".join(cpu["flags"]) or "none found"),
        ("native bf16", "yes" if info["native_bf16"] else "no"),
        ("precision", info["precision_auto"]["reason"]),
        ("matmul", _matmul_line(gflops, info["matmul_size"], info["device"])),
        ("chromium", info["chromium"] or "not found"),
    ]
    rows += [(f"{name} cache", f"{folder['path']} ({'exists' if folder['exists'] else 'not created yet'})")
             for name, folder in info["caches"].items()]
    width = max(len(name) for name, _ in rows)
    return [f"{name.ljust(width)}  {value}" for name, value in rows]


def _matmul_line(gflops: dict[str, float | None], size: int, device: str) -> str:
    measured = ", ".join(f"{name} {value:.1f}" if value is not None else f"{name} unsupported"
                         for name, value in gflops.items())
    line = f"{measured} GFLOPS ({size} x {size} on {device})"
    fp32, bf16 = gflops.get("fp32"), gflops.get("bf16")
    if fp32 and bf16:  # what a user picking bf16 should expect here, in one number
        line += (f"; bf16 is {fp32 / bf16:.0f}x slower than fp32" if bf16 < fp32
                 else f"; bf16 is {bf16 / fp32:.1f}x faster than fp32")
    return line


__all__ = ["RELEVANT_CPU_FLAGS", "cache_folders", "chromium", "cpu_flags", "cpu_model", "describe",
           "format_report", "measure_matmuls", "package_version", "versions"]
