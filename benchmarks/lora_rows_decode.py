"""The per-row LoRA term of one decode step: tailor's row copies against gathering every step.

    python benchmarks/lora_rows_decode.py               # the default model, 32 rows, ~1 min on 2 cores
    python benchmarks/lora_rows_decode.py --rows 8 --json decode.json

One decode step of a heterogeneous batch: --rows rows, each for a different adapter (r=--rank, all linear
layers of the model, fp32 slots, bf16 activations as the served model has them), one token per row.
Measured in the same invocation, interleaved, --rounds times each (the machine is shared: min and median):

    base          the base matmuls of the step (bf16, weights shared by all rows): the yardstick
    row copies    tailor.lora.rows' decode path: LoraLinear layers with slots, each row's A and B kept
                  from step to step (`SlotBank._row_weights`); base matmuls included, subtracted in the table
    gather        the same term with every row's A and B gathered from the slots at every step and in
                  every layer (index_select), as vLLM's CPU LoRA ops (`bgmv_shrink`/`bgmv_expand`) do
    read          reading the rows' weights once (a sum over them): the memory-bound floor

Shapes come from the model's config (no weights loaded). The adapters are random.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (the tests do)
from _shared import DEFAULT_MODEL, print_machine  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (its config gives the shapes)")
    p.add_argument("--rows", type=int, default=32, help="rows of the batch, each its own adapter")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default: the model's)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def layer_shapes(model: str, layers: int | None) -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear layer a Llama-style model's decoder has, layer after layer."""
    from transformers import AutoConfig

    from tailor.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model).directory)
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    one = [(hidden, config.num_attention_heads * head_dim), (hidden, kv), (hidden, kv),
           (config.num_attention_heads * head_dim, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    return one * (layers or config.num_hidden_layers)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from torch import nn

    from tailor.lora import add_lora_slots

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    machine = print_machine("cpu")
    torch.manual_seed(0)
    shapes = layer_shapes(args.model, args.layers)
    model = nn.ModuleDict({f"l{i}": nn.Linear(d_in, d_out, bias=False)
                           for i, (d_in, d_out) in enumerate(shapes)})
    model.to(torch.bfloat16)
    slots = add_lora_slots(model, num_slots=args.rows, max_rank=args.rank, target_modules=list(model))
    for slot in range(args.rows):
        slots.write(slot, {f"l{i}": (torch.randn(args.rank, d_in) / d_in ** 0.5,
                                     torch.randn(d_out, args.rank) * 0.01, 2.0)
                           for i, (d_in, d_out) in enumerate(shapes)})
    inputs = {d: torch.randn(args.rows, 1, d, dtype=torch.bfloat16) for d in {d_in for d_in, _ in shapes}}
    layers = [(model[f"l{i}"], inputs[d_in]) for i, (d_in, _) in enumerate(shapes)]
    index = torch.arange(args.rows)

    @torch.inference_mode()
    def base() -> None:
        for layer, x in layers:
            layer.base_layer(x)

    @torch.inference_mode()
    def row_copies() -> None:
        slots.set_rows(index)
        for layer, x in layers:
            layer(x)
        slots.set_rows(None)

    @torch.inference_mode()
    def gather() -> None:
        for layer, x in layers:
            bank = layer.slot_bank
            result = layer.base_layer(x)
            a, b = bank.a.index_select(0, index), bank.b.index_select(0, index)  # (B, d_in, R), (B, R, d_out)
            result.add_(torch.bmm(torch.bmm(x.float(), a), b))

    rows_read = [(layer.slot_bank.a[: args.rows], layer.slot_bank.b[: args.rows]) for layer, _ in layers]

    @torch.inference_mode()
    def read() -> None:
        for a, b in rows_read:
            a.sum()
            b.sum()

    parts = {"base": base, "row copies": row_copies, "gather": gather, "read": read}
    times: dict[str, list[float]] = {name: [] for name in parts}
    for fn in parts.values():  # warm-up: allocations, the first copy of the rows
        fn()
    for _ in range(args.rounds):
        for name, fn in parts.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) * 1000)
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    weights_mb = sum(a.numel() + b.numel() for a, b in rows_read) * 4 / 1e6
    results = {**machine, "settings": {"model": args.model, "rows": args.rows, "rank": args.rank,
                            "linear_layers": len(shapes), "threads": torch.get_num_threads(),
                            "rows_weights_mb": round(weights_mb, 1)},
               "min_ms": {k: round(v, 2) for k, v in best.items()},
               "median_ms": {k: round(v, 2) for k, v in median.items()}}
    for key, stats in (("min", best), ("median", median)):
        term_new = stats["row copies"] - stats["base"]
        term_old = stats["gather"] - stats["base"]
        results[f"lora_term_ms_{key}"] = {"row copies": round(term_new, 2), "gather": round(term_old, 2)}
        results[f"ratio_gather_vs_row_copies_{key}"] = round(term_old / term_new, 2) if term_new > 0 else None
        results[f"ratio_step_base_vs_row_copies_{key}"] = round(stats["base"] / stats["row copies"], 3)
    print(f"{args.rows} rows, {len(shapes)} linear layers, r={args.rank}: the rows' fp32 adapter weights are "
          f"{weights_mb:.0f} MB per step")
    print(f"{'part':<12} {'min ms':>9} {'median ms':>10}")
    for name in parts:
        print(f"{name:<12} {best[name]:9.1f} {median[name]:10.1f}")
    for key in ("min", "median"):
        term = results[f"lora_term_ms_{key}"]
        print(f"LoRA term ({key}): row copies {term['row copies']:.1f} ms, gather {term['gather']:.1f} ms "
              f"({results[f'ratio_gather_vs_row_copies_{key}']}x); base step / step with LoRA "
              f"{results[f'ratio_step_base_vs_row_copies_{key}']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
