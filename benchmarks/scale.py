"""Memory and time at real sizes: tailor's QLoRA and LoRA against PEFT + bitsandbytes QLoRA, 1.7B and 7B.

    python benchmarks/scale.py                          # both shapes, ~15 min on 2 cores (models cached)
    python benchmarks/scale.py --shapes 1.7b --json scale.json
    python benchmarks/scale.py --shapes 7b --configs tailor-qlora-nf4,peft-qlora-nf4
    python benchmarks/scale.py --shapes 1.7b --configs tailor-qlora-nf4,peft-qlora-nf4 --device cuda --steps 6

The models are random weights with the real architectures' configs (SmolLM2-1.7B; Llama-2-7B with the
default tokenizer's 49,152-token vocabulary instead of 32,000, so 6.88B parameters), bf16
safetensors shards as `save_pretrained` writes them, and the default model's tokenizer; built once
(tailor.models.random, shard by shard) and cached outside the repository (`--cache`, default
~/.cache/tailor/scale-models). Every configuration runs in its own process, one after the other:

    tailor-qlora-nf4   `tailor train --method qlora-nf4` (the command a user runs)
    tailor-lora        `tailor train --method lora`
    peft-qlora-nf4     PEFT + bitsandbytes written the way their docs write it: from_pretrained with
                       BitsAndBytesConfig (nf4, double quant, compute in the dtype tailor's precision auto
                       picks here), prepare_model_for_kbit_training, get_peft_model(r=16, all-linear)

Same shapes for all: batch 1, one support ticket (at most 256 tokens), r=16, alpha 32, all-linear, AdamW
lr 2e-4, 2 steps. Reported: peak RSS of the process (getrusage: what /usr/bin/time prints), `tailor plan`'s
prediction for the tailor runs (planned_peak_gib in their summary.json) and measured / planned, model load
seconds and seconds per step. A child whose RSS passes `--memory-cap-gib` is stopped and reported as such
(PEFT's 7B run would otherwise take the machine down). The peak RSS figures do not depend on what else the
machine runs; the seconds do: run it on a quiet machine.

`--device cuda` runs every configuration on the GPU (`tailor train --device cuda`; PEFT's model placed there
with `device_map`) and adds each one's CUDA peak (the allocator's: summary.json's peak_cuda_gib for tailor,
torch.cuda.max_memory_allocated for PEFT). tokens/s counts the real tokens of the steps after the first
(the first holds CUDA's and bitsandbytes' one-time set-up), so it needs `--steps 2` or more. `--model-dir`
runs an existing model directory instead of building a shape (a tiny one checks the script on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path
from _shared import print_machine  # noqa: E402

# The real configs (their config.json fields that decide shapes and numerics)
SHAPES: dict[str, dict[str, Any]] = {
    "1.7b": dict(model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                 num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=8192, rope_theta=130000, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.02),
    # Llama-2-7B's config with the default model's vocabulary (49,152 against 32,000): the random model is
    # trained with the default tokenizer, whose ids must be rows of the embedding (6.88B parameters)
    "7b": dict(model_type="llama", vocab_size=49152, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02),
}
SHAPE_NAMES = {"1.7b": "SmolLM2-1.7B", "7b": "Llama-2-7B"}
CONFIGS = ("tailor-qlora-nf4", "tailor-lora", "peft-qlora-nf4")
RECIPE = dict(batch_size=1, max_seq_len=256, rank=16, lora_alpha=32, steps=2, lr=2e-4)
RESULT_MARKER = "SCALE_RESULT "
GIB = 1024**3


def model_dir(shape: str, cache: Path) -> Path:
    """The cached random model of `shape`, built on first use."""
    from transformers import AutoConfig

    from tailor.models.random import write_random_model

    directory = cache / f"{SHAPE_NAMES[shape]}-random-bf16"
    if not (directory / "config.json").is_file():
        print(f"building {directory} (random weights, {SHAPE_NAMES[shape]} config) ...", flush=True)
        config = AutoConfig.for_model(**SHAPES[shape])
        write_random_model(config, directory)
    return directory


def _rss_gib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 0.0


def run_capped(command: list[str], cap_gib: float, timeout: float) -> tuple[int | None, str, float, bool]:
    """Run `command`; stop it when its RSS passes `cap_gib`. (returncode, output, highest RSS seen, capped)"""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    highest, capped = 0.0, False
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(process.stdout), daemon=True)
    reader.start()
    started = time.monotonic()
    while process.poll() is None:
        highest = max(highest, _rss_gib(process.pid))
        if highest > cap_gib or time.monotonic() - started > timeout:
            capped = highest > cap_gib
            process.kill()
            break
        time.sleep(0.1)
    process.wait()
    reader.join(timeout=5)
    return process.returncode, "".join(chunks), highest, capped


def run_tailor(method: str, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "tailor", "train", "--model", str(directory),
                   "--data", "builtin:support", "--method", method, "--batch-size", str(RECIPE["batch_size"]),
                   "--max-seq-len", str(RECIPE["max_seq_len"]), "--rank", str(RECIPE["rank"]),
                   "--lora-alpha", str(RECIPE["lora_alpha"]), "--target-modules", "all-linear",
                   "--lr", str(RECIPE["lr"]), "--max-steps", str(args.steps), "--eval-batches", "1",
                   "--precision", args.precision, "--device", args.device, "--out", str(out)]
        code, output, highest, capped = run_capped(command, args.memory_cap_gib, args.timeout)
        if code != 0 or not (out / "summary.json").is_file():
            why = f"stopped at the {args.memory_cap_gib} GiB cap" if capped else \
                f"exit {code}: " + " | ".join(output.strip().splitlines()[-4:])
            return {"status": "failed", "error": why, "highest_rss_gib": round(highest, 2)}
        summary = json.loads((out / "summary.json").read_text())
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if '"step"' in line and '"loss"' in line]
    result = {"status": "ok", "peak_rss_gib": summary["peak_rss_gib"],
              "planned_peak_gib": summary.get("planned_peak_gib"),
              "load_seconds": summary["model_load_seconds"],
              "step_seconds": round(summary["train_seconds"] / max(1, summary["steps"]), 2),
              "loss": [s["loss"] for s in steps], "precision": summary["precision"]["resolved"]}
    if summary.get("peak_cuda_gib") is not None:
        result["peak_cuda_gib"] = summary["peak_cuda_gib"]
    if len(steps) >= 2:  # metrics.jsonl's tokens and elapsed are running totals: the steps after the first
        tokens, seconds = steps[-1]["tokens"] - steps[0]["tokens"], steps[-1]["elapsed"] - steps[0]["elapsed"]
        result["tokens_per_step"] = round(tokens / (len(steps) - 1), 1)
        result["tokens_per_s"] = round(tokens / seconds, 1) if seconds > 0 else None
    return result


def peft_child(directory: Path, precision: str, device: str = "cpu",
               steps: int = RECIPE["steps"]) -> dict[str, Any]:
    """PEFT + bitsandbytes QLoRA, `steps` steps on `device`, in this (fresh) process."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tailor.data import load_examples
    from tailor.hardware import precision_for

    compute = torch.bfloat16 if precision_for(precision, device) == "bf16" else torch.float32
    started = time.perf_counter()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    placement = {"device_map": {"": device}} if device.startswith("cuda") else {}
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, dtype=compute,
                                                 **placement)
    load_seconds = time.perf_counter() - started
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=RECIPE["rank"], lora_alpha=RECIPE["lora_alpha"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # one support ticket, as tailor's batch of 1 holds (both report tokens_per_step)
    text = "".join(tokenizer.apply_chat_template(e.messages, tokenize=False) if e.messages else e.text
                   for e in load_examples("builtin:support")[:1])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : RECIPE["max_seq_len"]].to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=RECIPE["lr"])
    model.train()
    times, losses = [], []
    for _ in range(steps):
        step_started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))  # .item() waits for the GPU: the step is done
        times.append(time.perf_counter() - step_started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    result = {"status": "ok", "peak_rss_gib": round(peak, 3),
              "load_seconds": round(load_seconds, 2), "step_seconds": round(sum(times) / len(times), 2),
              "loss": losses, "precision": "bf16" if compute == torch.bfloat16 else "fp32",
              "tokens_per_step": ids.numel()}
    if device.startswith("cuda"):
        result["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    if len(times) >= 2:  # the steps after the first, as for tailor
        result["tokens_per_s"] = round(ids.numel() * (len(times) - 1) / sum(times[1:]), 1)
    return result


def run_peft(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", str(directory), "--precision",
               args.precision, "--device", args.device, "--steps", str(args.steps)]
    code, output, highest, capped = run_capped(command, args.memory_cap_gib, args.timeout)
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    why = f"stopped at the {args.memory_cap_gib} GiB cap (RSS passed it)" if capped else \
        f"exit {code}: " + " | ".join(output.strip().splitlines()[-4:])
    return {"status": "failed", "error": why, "highest_rss_gib": round(highest, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1.7b,7b", help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {', '.join(CONFIGS)}")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp32 (tailor's and PEFT's compute)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "tailor" / "scale-models"))
    p.add_argument("--memory-cap-gib", type=float, default=20.0, help="stop a child whose RSS passes this")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    p.add_argument("--device", default="cpu", help="cpu | cuda: where every configuration trains")
    p.add_argument("--steps", type=int, default=RECIPE["steps"], help="optimizer steps per configuration")
    p.add_argument("--model-dir", default=None,
                   help="a model directory to run instead of building --shapes (named by its folder)")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = peft_child(Path(args.child), args.precision, args.device, args.steps)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return None
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [s for s in shapes if s not in SHAPES] + [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown {bad}; shapes: {', '.join(SHAPES)}; configs: {', '.join(CONFIGS)}")
    machine = print_machine(args.device)
    models = ([(Path(args.model_dir).name, Path(args.model_dir))] if args.model_dir else
              [(SHAPE_NAMES[shape], model_dir(shape, Path(args.cache).expanduser())) for shape in shapes])
    results: list[dict[str, Any]] = []
    for name, directory in models:
        for config in configs:
            print(f"{name} {config} ...", flush=True)
            run = run_peft(directory, args) if config.startswith("peft") else \
                run_tailor(config.removeprefix("tailor-"), directory, args)
            results.append({"shape": name, "config": config, **run})
            print("  " + json.dumps(results[-1]), flush=True)
    print_table(results)
    report = {"machine": machine, "device": args.device, "recipe": {**RECIPE, "steps": args.steps},
              "results": results}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    return report


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n| model | configuration | peak RSS GiB | planned GiB | measured / planned | load s | s/step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        if r["status"] != "ok":
            print(f"| {r['shape']} | {r['config']} | {r['error']} (highest seen {r['highest_rss_gib']}) "
                  "| | | | |")
            continue
        planned = r.get("planned_peak_gib")
        ratio = f"{r['peak_rss_gib'] / planned:.2f}" if planned else ""
        print(f"| {r['shape']} | {r['config']} ({r['precision']}) | {r['peak_rss_gib']:.2f} | "
              f"{planned if planned is not None else ''} | {ratio} | {r['load_seconds']} | "
              f"{r['step_seconds']} |")
    for shape in dict.fromkeys(r["shape"] for r in results):
        by = {r["config"]: r for r in results if r["shape"] == shape and r["status"] == "ok"}
        if "tailor-qlora-nf4" in by and "peft-qlora-nf4" in by:
            ratio = by["tailor-qlora-nf4"]["peak_rss_gib"] / by["peft-qlora-nf4"]["peak_rss_gib"]
            print(f"{shape}: tailor qlora-nf4 peak / PEFT + bitsandbytes qlora peak = {ratio:.2f}x "
                  "(goal <= 0.55x)")


if __name__ == "__main__":
    main(sys.argv[1:])
