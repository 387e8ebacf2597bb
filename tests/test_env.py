"""`tailor env`: the real command in a subprocess, its facts checked against tailor.hardware, this test's
own matmul timing, /proc/cpuinfo and the cache variables it was given."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tailor import hardware
from tailor._version import __version__
from tailor.environment import RELEVANT_CPU_FLAGS

SRC = Path(__file__).resolve().parents[1] / "src"


def run_env(*args: str, env: dict[str, str] | None = None) -> str:
    """stdout of `python -m tailor env ARGS` on this checkout's code."""
    variables = {**os.environ, **(env or {})}
    variables["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "tailor", "env", *args], capture_output=True, text=True,
                          env=variables, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    (root / "tailor").mkdir()
    return {"TAILOR_CACHE": root / "tailor", "TAILOR_ADAPTERS": root / "no-store-yet",
            "HF_HUB_CACHE": root / "hub"}


@pytest.fixture(scope="module")
def report(caches) -> dict:
    started = time.perf_counter()
    stdout = run_env("--json", env={name: str(path) for name, path in caches.items()})
    report = json.loads(stdout)  # the whole of stdout is one JSON object
    report["_wall_s"] = time.perf_counter() - started
    return report


def test_json_has_stable_keys_and_types(report):
    assert set(report) - {"_wall_s"} == {"versions", "platform", "device", "gpu", "cpu", "native_bf16",
                                         "precision_auto", "matmul_gflops", "matmul_size", "chromium",
                                         "caches"}
    assert set(report["versions"]) == {"tailor", "python", "torch", "transformers", "peft", "bitsandbytes"}
    assert all(v is None or isinstance(v, str) for v in report["versions"].values())
    assert set(report["cpu"]) == {"model", "capability", "flags", "threads", "cores"}
    assert isinstance(report["cpu"]["model"], str) and report["cpu"]["model"]
    assert isinstance(report["cpu"]["flags"], list) and isinstance(report["cpu"]["threads"], int)
    assert isinstance(report["native_bf16"], bool)
    assert set(report["precision_auto"]) == {"resolved", "reason"}
    assert set(report["matmul_gflops"]) == {"fp32", "bf16", "fp16"}
    assert isinstance(report["matmul_gflops"]["fp32"], float) and report["matmul_gflops"]["fp32"] > 0
    assert report["chromium"] is None or Path(report["chromium"]).is_file()


def test_json_agrees_with_hardware_and_this_process(report):
    device = hardware.default_device()
    assert report["device"] == device
    assert report["cpu"]["capability"] == hardware.cpu_capability()
    assert report["native_bf16"] == hardware.native_bf16(device)
    precision = hardware.resolve_precision("auto", device)
    assert report["precision_auto"] == {"resolved": precision.resolved, "reason": precision.reason}
    assert report["versions"]["tailor"] == __version__
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["cpu"]["cores"] == os.cpu_count()
    # a fresh process in the same environment (this one's thread count may have been set by another test)
    fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True)
    assert report["cpu"]["threads"] == int(fresh.stdout)


def test_cpu_flags_are_the_relevant_ones_in_proc_cpuinfo(report):
    flags = report["cpu"]["flags"]
    assert set(flags) <= set(RELEVANT_CPU_FLAGS)
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        assert flags == []
        return
    line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    assert flags == [f for f in RELEVANT_CPU_FLAGS if f in present]
    if report["cpu"]["capability"] in ("AVX2", "AVX512"):  # ATen's level needs the instructions it names
        assert "avx2" in flags
    if report["cpu"]["capability"] == "AVX512":
        assert "avx512f" in flags


def test_cache_folders_follow_the_environment(report, caches):
    folders = report["caches"]
    assert folders["tailor"] == {"path": str(caches["TAILOR_CACHE"]), "exists": True}
    assert folders["adapters"] == {"path": str(caches["TAILOR_ADAPTERS"]), "exists": False}
    assert folders["hf_hub"] == {"path": str(caches["HF_HUB_CACHE"]), "exists": False}


def _fp32_gflops(size: int, seconds: float = 0.3) -> float:
    """This test's own reference: a size x size fp32 matmul timed for about `seconds`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    repeats, started = 0, time.perf_counter()
    while repeats < 3 or time.perf_counter() - started < seconds:
        a @ b
        repeats += 1
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def test_human_output_names_capability_precision_and_versions(caches):
    stdout = run_env(env={name: str(path) for name, path in caches.items()})
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in stdout.splitlines())  # `name  value`
    assert rows["capability"] == hardware.cpu_capability()
    assert rows["precision"] == hardware.resolve_precision("auto").reason
    assert rows["native bf16"] == ("yes" if hardware.native_bf16() else "no")
    assert rows["tailor"] == __version__ and rows["torch"] == torch.__version__
    assert rows["matmul"].startswith("fp32 ") and "GFLOPS (512 x 512" in rows["matmul"]
    assert rows["tailor cache"] == f"{caches['TAILOR_CACHE']} (exists)"
    assert rows["adapters cache"] == f"{caches['TAILOR_ADAPTERS']} (not created yet)"
