"""benchmarks/serve_throughput.py: every part runs end to end on a tiny model and reports the named keys."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from conftest import tiny_model_dir

from tailor.hardware import cpu_capability, native_bf16, resolve_precision

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_throughput.py"
KEYS = ("hetero_tokens_per_s", "base_tokens_per_s", "hf_base_tokens_per_s", "peft_mixed_tokens_per_s",
        "ratio_vs_base", "ratio_vs_peft_mixed", "cold_load_ms", "ratio_1000_vs_32",
        "ratio_structured_vs_plain")


def test_every_part_on_a_tiny_model(tmp_path, one_thread, capsys):
    spec = importlib.util.spec_from_file_location("serve_throughput", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["serve_throughput"] = bench
    spec.loader.exec_module(bench)
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "serve.json"
    bench.main(["--model", str(model), "--dtype", "float32", "--requests", "4", "--new-tokens", "3",
                "--rank", "4", "--many-adapters", "40", "--many-requests", "8", "--max-loras", "4",
                "--swap-requests", "2", "--threads", "1", "--json", str(out)])
    results = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(results[key], (int, float)) and results[key] > 0, key
    assert set(results["goals"]) == set(bench.GOALS)
    assert results["cpu_capability"] == cpu_capability()
    assert results["precision"] == resolve_precision("auto").resolved
    printed = capsys.readouterr().out
    assert "goal ratio_vs_base" in printed and "PEFT mixed-adapter batch" in printed


def test_lora_rows_decode_benchmark_on_a_tiny_model(tmp_path, one_thread, capsys):
    path = BENCHMARK.parent / "lora_rows_decode.py"
    spec = importlib.util.spec_from_file_location("lora_rows_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "decode.json"
    results = bench.main(["--model", str(model), "--rows", "3", "--rank", "4", "--rounds", "2",
                          "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    assert set(results["min_ms"]) == {"base", "row copies", "gather", "read"}
    assert results["cpu_capability"] == cpu_capability() and results["native_bf16"] == native_bf16("cpu")
    assert results["settings"]["linear_layers"] == 7 * 2  # tiny_llama: 2 layers of q, k, v, o, gate, up, down
    assert "LoRA term (min)" in capsys.readouterr().out
