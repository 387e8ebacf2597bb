"""Several training processes against one: tokens/s and peak memory of each process, same global batch.

    python benchmarks/distributed_throughput.py                    # 1x2, 2x1-ddp, 2x1-fsdp, default model
    python benchmarks/distributed_throughput.py --steps 5 --json out.json
    python benchmarks/distributed_throughput.py --configs 1x2,2x1-ddp --nproc 2 --model path/to/model

Every configuration runs the real `tailor train` (LoRA r=16, all-linear, bf16, built-in support data,
max_seq_len 256, constant lr) in its own process tree, with the same global batch of
`--batch-size * --nproc` examples per step, so all see the same examples in the same order:

    1x{N}       one process with N threads, batch N*b (the baseline: what one machine does without torchrun)
    1x1         one process with one thread, batch N*b (not run unless named: shows what threads buy)
    {N}x1-ddp   `tailor train --nproc N --strategy ddp`, one thread each, batch b per process
    {N}x1-fsdp  the same with --strategy fsdp

On a CPU machine with N cores this is an honest comparison of two ways to use the same cores, not a speed
claim: N processes hold N copies of the model (DDP) and talk through gloo; one process shares its cores
between threads. On a GPU machine use --device cuda (NCCL, one GPU per process).

Timing: tokens/s over the steps after `--warmup`, from the run's metrics.jsonl (step time only: no model
loading, no evaluation or checkpoint writing); real (non-pad) tokens of all processes. Peak RSS of each
training process over its whole life (model loading included), read from /proc/PID/status (VmHWM) while
it runs, so every rank is measured, not only the one that writes the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (the tests do)
from _shared import DEFAULT_MODEL, print_machine  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or local path (tailor.models)")
    p.add_argument("--data", default="builtin:support", help="training data spec (tailor.data)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed configurations")
    p.add_argument("--configs", default=None, help="comma-separated: 1xN, Nx1-ddp, Nx1-fsdp (default), 1x1")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--batch-size", type=int, default=4, help="examples per process per step")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here as JSON")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration run")
    args = p.parse_args(argv)
    default = (f"1x{args.nproc}", f"{args.nproc}x1-ddp", f"{args.nproc}x1-fsdp")
    valid = (*default, "1x1")
    args.config_list = [c.strip() for c in (args.configs or ",".join(default)).split(",") if c.strip()]
    unknown = [c for c in args.config_list if c not in valid]
    if unknown or not args.config_list:
        p.error(f"--configs: unknown {unknown or 'empty list'}; choose from {', '.join(valid)}")
    if args.nproc < 2 or args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--nproc must be >= 2, --steps and --batch-size >= 1, --warmup >= 0")
    return args


def command_for(args: argparse.Namespace, name: str, out: Path) -> tuple[list[str], dict[str, str]]:
    """The `tailor train` command line of configuration `name`, and its environment."""
    single = name.startswith("1x")
    common = ["--model", args.model, "--data", args.data, "--max-seq-len", str(args.max_seq_len),
              "--max-steps", str(args.warmup + args.steps), "--schedule", "constant", "--rank", "16",
              "--lora-alpha", "32", "--lora-dropout", "0", "--val-fraction", "0", "--no-progress",
              "--no-keep-best", "--out", str(out)]
    if args.device:
        common += ["--device", args.device]
    if single:
        threads = int(name.split("x")[1])
        launch = ["--batch-size", str(args.batch_size * args.nproc), "--num-threads", str(threads)]
    else:
        threads = 1
        launch = ["--nproc", str(args.nproc), "--strategy", name.rsplit("-", 1)[1],
                  "--batch-size", str(args.batch_size), "--num-threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return [sys.executable, "-m", "tailor", "train", *common, *launch], env


class PeakWatcher:
    """Peak RSS (VmHWM) of every training process under a launcher, polled while they run."""

    def __init__(self, root_pid: int, interval: float = 0.2):
        self.root_pid, self.interval = root_pid, interval
        self.peaks: dict[str, float] = {}  # "rank 0" (or "main" for a single process) -> MiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _descendants(self, pid: int) -> list[int]:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        return [int(c) for c in children] + [d for c in children for d in self._descendants(int(c))]

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in [self.root_pid, *self._descendants(self.root_pid)]:
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                rank = next((e.split(b"=")[1].decode() for e in environ if e.startswith(b"RANK=")), None)
                if rank is None and pid != self.root_pid:
                    continue  # the launcher of several processes trains nothing
                label = f"rank {rank}" if rank is not None else "main"
                hwm = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:"))
                self.peaks[label] = max(self.peaks.get(label, 0.0), round(hwm / 1024, 1))
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        if len(self.peaks) > 1:
            self.peaks.pop("main", None)  # with ranks: the launcher itself
        return dict(sorted(self.peaks.items()))


def run_config(args: argparse.Namespace, name: str) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=f"dist-bench-{name}-")) / "run"
    command, env = command_for(args, name, out)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = PeakWatcher(process.pid)
    try:
        _, stderr = process.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        watcher.stop()
        return {"config": name, "status": "failed", "error": f"timed out after {args.timeout:.0f} s"}
    peaks = watcher.stop()
    if process.returncode != 0:
        return {"config": name, "status": "failed",
                "error": f"exit {process.returncode}: " + " | ".join(stderr.strip().splitlines()[-4:])}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start, end = metrics[args.warmup - 1] if args.warmup else {"tokens": 0, "elapsed": 0.0}, metrics[-1]
    tokens, seconds = end["tokens"] - start["tokens"], end["elapsed"] - start["elapsed"]
    return {"config": name, "status": "ok", "command": " ".join(command[1:]), "timed_steps": args.steps,
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "s_per_step": round(seconds / args.steps, 3), "final_loss": end["loss"], "peak_rss_mib": peaks,
            "wall_s": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hardware = print_machine(args.device)  # this process's view; each `tailor train` sets its own threads
    load_before = os.getloadavg()
    results = [run_config(args, name) for name in args.config_list]
    baseline = next((r for r in results if r["config"].startswith("1x") and r["status"] == "ok"), None)
    for result in results:
        if baseline and result["status"] == "ok":
            result["tokens_per_s_vs_1_process"] = round(result["tokens_per_s"] / baseline["tokens_per_s"], 3)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_before": load_before,
               "load_average_after": os.getloadavg()}
    print(f"{'config':<12} {'tokens/s':>9} {'vs 1 proc':>9} {'s/step':>7} {'final loss':>10}  peak RSS MiB")
    for r in results:
        if r["status"] != "ok":
            print(f"{r['config']:<12} failed: {r['error']}")
            continue
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mib"].items())
        print(f"{r['config']:<12} {r['tokens_per_s']:>9.1f} {r.get('tokens_per_s_vs_1_process', 1.0):>9.2f} "
              f"{r['s_per_step']:>7.2f} {r['final_loss']:>10.4f}  {peaks}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {machine['load_average_after']}")
    if args.json_path:
        from tailor.files import atomic_write_json

        atomic_write_json(Path(args.json_path), {**hardware, "machine": machine, "args": vars(args),
                                                "results": results})
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
