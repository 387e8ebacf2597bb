"""The benchmark half of `benchmarks/gpu_check.sh`: three short runs of the existing benchmarks, one table.

    python benchmarks/gpu_check.py --device cuda --deadline EPOCH_SECONDS --json gpu_check.json
    python benchmarks/gpu_check.py --device cpu --model TINY_DIR --qlora-model-dir TINY_DIR   # dry run

Parts, each the existing benchmark in its own process group, stopped at its time limit (or at --deadline,
whichever comes first) and reported as such rather than eating the others' time:

    train   benchmarks/train_throughput.py --configs peft-bf16,tailor: the default model (SmolLM2-135M-
            Instruct), LoRA r=16 all-linear, batch 8 x 256 tokens, bf16 (precision auto on a GPU)
    serve   benchmarks/serve_throughput.py --parts hetero,base: 32 requests, each for a different random
            r=16 adapter, against the same 32 requests on the bare base (the engine, prefix sharing on)
    qlora   benchmarks/scale.py --shapes 1.7b --configs tailor-qlora-nf4,peft-qlora-nf4: the SmolLM2-1.7B
            shape (random weights, built once into --cache, outside the repository), batch 1 x 256

It prints one table (markdown) of tokens/s and peak CUDA memory, tailor beside PEFT (serving: 32 adapters
beside the bare base), and writes everything (the table's numbers and each benchmark's own JSON) to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GIB_PER_MIB = 1 / 1024
PARTS = ("train", "serve", "qlora")
DEFAULT_CACHE = Path.home() / ".cache" / "tailor" / "scale-models"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of this script")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="the train and serve parts' model")
    p.add_argument("--qlora-model-dir", default=None,
                   help="a model directory for the qlora part instead of the SmolLM2-1.7B shape")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the 1.7B-shaped model is built once")
    p.add_argument("--train-steps", type=int, default=10, help="train part: timed steps (after 3 warm-up)")
    p.add_argument("--qlora-steps", type=int, default=6, help="steps of the qlora part (first one untimed)")
    p.add_argument("--requests", type=int, default=32, help="serving requests = different adapters")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per serving request")
    p.add_argument("--train-timeout", type=float, default=110)
    p.add_argument("--serve-timeout", type=float, default=80)
    p.add_argument("--qlora-timeout", type=float, default=200)
    p.add_argument("--deadline", type=float, default=None,
                   help="epoch seconds by which every part must have ended (gpu_check.sh's budget)")
    p.add_argument("--tests", default=None, help="the CUDA tests' result line, for the report")
    p.add_argument("--json", dest="json_path", default=None, help="write the report here")
    args = p.parse_args(argv)
    args.part_list = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.part_list if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    return args


def run_bounded(command: list[str], limit: float, log: Path) -> tuple[int | None, float]:
    """Run `command` in its own process group, output to `log`; past `limit` seconds the whole group (the
    benchmark and its children) is killed. (returncode or None when killed, seconds)"""
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = process.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    return code, round(time.monotonic() - started, 1)


def budget(args: argparse.Namespace, cap: float) -> float:
    """A part's time: its cap, or what is left before the deadline (less 5 s to report), if less."""
    if args.deadline is None:
        return cap
    return min(cap, args.deadline - time.time() - 5)


def part(name: str, args: argparse.Namespace, cap: float, command: list[str], json_path: Path,
         workdir: Path) -> dict[str, Any]:
    """Run one benchmark; its JSON report, or why there is none."""
    limit = budget(args, cap)
    if limit < 15:
        return {"status": "skipped", "error": f"only {max(limit, 0):.0f} s of the budget left"}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: up to {limit:.0f} s: {' '.join(command[1:])}", flush=True)
    log = workdir / f"{name}.log"
    code, seconds = run_bounded(command, limit, log)
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:])
    if code is None:
        return {"status": "failed", "error": f"stopped at its {limit:.0f} s limit; last output: {tail}",
                "seconds": seconds}
    if code != 0 or not json_path.is_file():
        return {"status": "failed", "error": f"exit {code}: {tail}", "seconds": seconds}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {seconds} s", flush=True)
    return {"status": "ok", "seconds": seconds, "report": json.loads(json_path.read_text())}


def run_parts(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, Any]]:
    python = sys.executable
    parts: dict[str, dict[str, Any]] = {}
    if "train" in args.part_list:
        out = workdir / "train.json"
        each = max(30.0, (budget(args, args.train_timeout) - 10) / 2)  # two configurations, in turn
        parts["train"] = part("train", args, args.train_timeout, [
            python, str(HERE / "train_throughput.py"), "--device", args.device, "--model", args.model,
            "--configs", "peft-bf16,tailor", "--steps", str(args.train_steps), "--warmup", "3",
            "--train-examples", "256", "--eval-examples", "8", "--timeout", f"{each:.0f}", "--json", str(out),
        ], out, workdir)
    if "serve" in args.part_list:
        out = workdir / "serve.json"
        parts["serve"] = part("serve", args, args.serve_timeout, [
            python, str(HERE / "serve_throughput.py"), "--device", args.device, "--model", args.model,
            "--parts", "hetero,base", "--requests", str(args.requests), "--max-loras", str(args.requests),
            "--new-tokens", str(args.new_tokens), "--json", str(out),
        ], out, workdir)
    if "qlora" in args.part_list:
        out = workdir / "qlora.json"
        where = ["--model-dir", args.qlora_model_dir] if args.qlora_model_dir else \
            ["--shapes", "1.7b", "--cache", args.cache]
        each = max(30.0, (budget(args, args.qlora_timeout) - 60) / 2)  # 60 s: building the model once
        parts["qlora"] = part("qlora", args, args.qlora_timeout, [
            python, str(HERE / "scale.py"), *where, "--configs", "tailor-qlora-nf4,peft-qlora-nf4",
            "--device", args.device, "--steps", str(args.qlora_steps), "--timeout", f"{each:.0f}",
            "--json", str(out),
        ], out, workdir)
    return parts


def gib(mib: float | None) -> float | None:
    return None if mib is None else round(mib * GIB_PER_MIB, 3)


def rows(parts: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The table: per workload two systems side by side, then their ratio."""
    out: list[dict[str, Any]] = []

    def failed(workload: str, result: dict[str, Any]) -> None:
        out.append({"workload": workload, "system": "-", "status": result["status"],
                    "error": result.get("error", "")})

    if "train" in parts:
        workload = f"train {Path(args.model).name}, LoRA r=16 all-linear, batch 8 x 256"
        result = parts["train"]
        if result["status"] != "ok":
            failed(workload, result)
        else:
            configs = result["report"]["configs"]
            for name, label in (("tailor", "tailor"), ("peft-bf16", "PEFT (peft-bf16)")):
                r = configs.get(name, {})
                out.append({"workload": workload, "system": label, "status": r.get("status", "failed"),
                            "error": r.get("error", ""), "tokens_per_s": r.get("tokens_per_s"),
                            "peak_cuda_gib": gib(r.get("cuda_max_allocated_mib")),
                            "peak_rss_gib": gib(r.get("peak_rss_mib")),
                            "precision": result["report"].get("precision")})
    if "qlora" in parts:
        shape = Path(args.qlora_model_dir).name if args.qlora_model_dir else "SmolLM2-1.7B shape"
        workload = f"train {shape}, QLoRA NF4 r=16 all-linear, batch 1 x 256"
        result = parts["qlora"]
        if result["status"] != "ok":
            failed(workload, result)
        else:
            by = {r["config"]: r for r in result["report"]["results"]}
            for name, label in (("tailor-qlora-nf4", "tailor"), ("peft-qlora-nf4", "PEFT + bitsandbytes")):
                r = by.get(name, {"status": "failed", "error": "not run"})
                out.append({"workload": workload, "system": label, "status": r.get("status", "failed"),
                            "error": r.get("error", ""), "tokens_per_s": r.get("tokens_per_s"),
                            "peak_cuda_gib": r.get("peak_cuda_gib"), "peak_rss_gib": r.get("peak_rss_gib"),
                            "planned_peak_gib": r.get("planned_peak_gib"),
                            "tokens_per_step": r.get("tokens_per_step"), "precision": r.get("precision")})
    if "serve" in parts:
        workload = f"serve {Path(args.model).name}, {args.requests} requests x {args.new_tokens} tokens"
        result = parts["serve"]
        if result["status"] != "ok":
            failed(workload, result)
        else:
            report = result["report"]
            peak = gib(report.get("cuda_max_allocated_mib"))
            for key, label in (("hetero_tokens_per_s", f"tailor, {args.requests} different adapters"),
                               ("base_tokens_per_s", "tailor, bare base")):
                out.append({"workload": workload, "system": label, "tokens_per_s": report.get(key),
                            "status": "ok" if report.get(key) else "failed", "peak_cuda_gib": peak})
    return out


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_table(table: list[dict[str, Any]]) -> str:
    def cell(value: Any, fmt: str = "") -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| workload | system | tokens/s | peak CUDA GiB | note |", "|---|---|---:|---:|---|"]
    for workload in dict.fromkeys(r["workload"] for r in table):
        group = [r for r in table if r["workload"] == workload]
        for r in group:
            if r["status"] != "ok":
                lines.append(f"| {workload} | {r['system']} | {r['status']} | | {r.get('error', '')[:300]} |")
                continue
            note = []
            if r.get("planned_peak_gib") is not None:
                note.append(f"tailor plan {r['planned_peak_gib']:.2f} GiB")
            if r.get("tokens_per_step") is not None:
                note.append(f"{r['tokens_per_step']:.0f} tokens/step")
            if r.get("peak_cuda_gib") is None and r.get("peak_rss_gib") is not None:
                note.append(f"peak RSS {r['peak_rss_gib']:.2f} GiB")
            if r.get("precision"):
                note.append(r["precision"])
            lines.append(f"| {workload} | {r['system']} | {cell(r.get('tokens_per_s'), '.1f')} | "
                         f"{cell(r.get('peak_cuda_gib'), '.2f')} | {', '.join(note)} |")
        ok = [r for r in group if r["status"] == "ok"]
        if len(ok) == 2:
            first, second = ok
            lines.append(f"| {workload} | {first['system']} / {second['system']} | "
                         f"{ratio(first.get('tokens_per_s'), second.get('tokens_per_s'))} | "
                         f"{ratio(first.get('peak_cuda_gib'), second.get('peak_cuda_gib'))} | |")
    return "\n".join(lines)


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": sys.executable,
                            "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    info = machine(args.device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        parts = run_parts(args, Path(tmp))
        logs = {name: (Path(tmp) / f"{name}.log").read_text(errors="replace")[-4000:]
                for name in parts if (Path(tmp) / f"{name}.log").is_file()}
    table = rows(parts, args)
    where = info.get("gpu") or args.device
    tests = f", CUDA tests: {args.tests}" if args.tests else ""
    print(f"\ngpu check: {where}, torch {info['torch']}{tests}")
    print(format_table(table))
    report = {"machine": info, "tests": args.tests, "table": table, "markdown": format_table(table),
              "seconds": round(time.monotonic() - started, 1),
              "parts": {name: {k: v for k, v in r.items()} for name, r in parts.items()}, "log_tails": logs}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {args.json_path}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
