"""Which precision to compute and store a frozen base in, on this machine: one decoder layer's linear
layers of the default model (SmolLM2-135M: q, k, v, o 576 wide with 192-wide k/v, gate/up/down 1536),
timed in each way tailor could run them, in one process.

    python benchmarks/precision_paths.py [--json out.json] [--threads N] [--seconds 0.5]

Paths, each for a training step (2048 tokens: forward and the input-gradient backward a frozen layer
needs under LoRA) and a decode step (32 rows, one token each, forward only):

    fp32                 weights stored fp32, computed fp32 (precision fp32)
    bf16-stored-fp32     weights stored bf16, upcast to fp32 at each matmul (half the memory)
    bf16                 weights stored bf16, computed in bf16 autocast (precision bf16)
    nf4-fp32 / nf4-bf16  bitsandbytes NF4 weights (QLoRA), compute dtype fp32 / bf16

Printed per path: ms per layer, the achieved GFLOPS, and the time relative to fp32. Where bf16 is not
native a bf16 training step of 2048 tokens takes seconds per layer, so those paths time fewer tokens
(--slow-tokens) and report per-2048-token figures scaled from them; the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import machine_info  # noqa: E402

SHAPES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576), "gate": (576, 1536),
          "up": (576, 1536), "down": (1536, 576)}  # name: (in, out)
PATHS = ("fp32", "bf16-stored-fp32", "bf16", "nf4-fp32", "nf4-bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", dest="json_path", default=None, help="write the results here as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seconds", type=float, default=0.5, help="timing budget per path and phase")
    p.add_argument("--train-tokens", type=int, default=2048)
    p.add_argument("--decode-rows", type=int, default=32)
    p.add_argument("--slow-tokens", type=int, default=128,
                   help="tokens timed for bf16 compute where bf16 is not native")
    return p.parse_args(argv)


def build_layer(path: str):
    """The layer's linears for `path`: a list of (callable x -> y, in_features)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in SHAPES.values():
        weight = torch.randn(fan_out, fan_in) / fan_in**0.5
        if path == "fp32":
            layers.append(lambda x, w=weight: F.linear(x, w))
        elif path == "bf16-stored-fp32":
            stored = weight.to(torch.bfloat16)
            layers.append(lambda x, w=stored: F.linear(x, w.float()))
        elif path == "bf16":
            stored = weight.to(torch.bfloat16)
            layers.append(lambda x, w=stored: _autocast(lambda: F.linear(x, w)))
        else:
            import bitsandbytes as bnb

            compute = torch.float32 if path == "nf4-fp32" else torch.bfloat16
            layer = bnb.nn.Linear4bit(fan_in, fan_out, bias=False, compute_dtype=compute, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight.to(compute), requires_grad=False, quant_type="nf4")
            layer = layer.to("cpu")
            layer.weight.requires_grad_(False)
            layers.append(layer)
    return layers


def _autocast(fn):
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


def step_seconds(layers, tokens: int, backward: bool, seconds: float) -> float:
    """Median seconds of one pass of `tokens` rows through every linear (and its input-gradient backward)."""
    import statistics

    import torch

    def once() -> float:
        started = time.perf_counter()
        for (fan_in, _), layer in zip(SHAPES.values(), layers, strict=True):
            x = torch.randn(tokens, fan_in, requires_grad=backward)
            if backward:
                layer(x).float().sum().backward()
            else:
                with torch.no_grad():
                    layer(x)
        return time.perf_counter() - started

    once()  # warm-up: kernel choice, quantization state
    times, began = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - began < seconds and len(times) < 50):
        times.append(once())
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    info = machine_info()
    print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    flops_per_token = sum(2 * i * o for i, o in SHAPES.values())
    rows, reference = [], {}
    for path in PATHS:
        if path.startswith("nf4"):
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                print(f"{path}: skipped (bitsandbytes not installed)")
                continue
        layers = build_layer(path)
        slow = path in ("bf16", "nf4-bf16") and not info["native_bf16"]
        phases = (("train", args.train_tokens, True), ("decode", args.decode_rows, False))
        for phase, tokens, backward in phases:
            timed = min(tokens, args.slow_tokens) if slow else tokens
            seconds = step_seconds(layers, timed, backward, args.seconds) * tokens / timed
            flops = flops_per_token * tokens * (2 if backward else 1)
            reference.setdefault(phase, seconds) if path == "fp32" else None
            rows.append({"path": path, "phase": phase, "tokens": tokens, "timed_tokens": timed,
                         "ms_per_layer": round(seconds * 1e3, 2), "gflops": round(flops / seconds / 1e9, 1),
                         "vs_fp32": round(seconds / reference[phase], 2) if phase in reference else None})
            row = rows[-1]
            note = f" (timed on {timed} tokens, scaled)" if timed != tokens else ""
            print(f"{path:17s} {phase:6s} {tokens:5d} tokens  {row['ms_per_layer']:9.2f} ms/layer  "
                  f"{row['gflops']:6.1f} GFLOPS  {row['vs_fp32']}x fp32's time{note}", flush=True)
    result = {**info, "rows": rows}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
