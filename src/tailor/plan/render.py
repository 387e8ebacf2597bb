"""Rich tables for `tailor plan` (the JSON form is the dict itself)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tailor.method_specs import method_spec

_PARTS = ("frozen_weights", "adapter_weights", "gradients", "optimizer_state", "activations", "overhead")


def render_plan(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    s = result["setup"]
    adapter = not method_spec(s["method"]).trains_all_weights
    console.print(
        f"[bold]{result['model']}[/bold] ({result['model_source']}): {result['total_params']:,} parameters"
    )
    if result["assumption"]:
        console.print(f"[yellow]assumed shape:[/yellow] {result['assumption']}")
    rank = ""
    if adapter:
        rank = f" rank={s['rank']} lora_alpha={s['lora_alpha']:g} targets={s['target_modules']}"
    console.print(
        f"{s['method']}{rank}, batch {s['batch_size']} x {s['max_seq_len']} tokens, "
        f"{s['precision']}, {s['optimizer']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}"
    )
    stack = [
        label
        for key, label in (
            ("compile", "compiled loss"),
            ("optimizer_in_backward", "optimizer step in backward"),
            ("activation_offloading", "activation offloading"),
            ("quant_keeps_inputs", "4-bit layers keep inputs"),
        )
        if s.get(key)
    ]
    if s.get("grad_accum", 1) > 1:
        stack.append(f"grad_accum {s['grad_accum']} (micro-batches per step)")
    if s.get("optimizer_kernel", "fused") != "fused":
        stack.append(f"{s['optimizer_kernel']} AdamW")
    if s.get("loss_chunk_tokens"):
        stack.append(f"loss in chunks of {s['loss_chunk_tokens']} tokens")
    if not s.get("loss_upcast", True):
        stack.append("loss without fp32 upcast")
    if adapter:
        dropout = f", dropout {s['lora_dropout']:g}" if s["lora_dropout"] else ""
        stack.append(f"{s['adapter_dtype']} adapters{dropout}")
    if stack:
        console.print("stack: " + ", ".join(stack))
    console.print(
        f"trainable: {result['trainable_params']:,} ({result['trainable_percent']:.3g}%)"
        + (
            f"; adapter file {result['adapter_file_mib']:.1f} MiB vs full copy "
            f"{result['full_copy_gib']:.1f} GiB (bf16)"
            if adapter
            else ""
        )
    )
    phase = result.get("peak_phase", "backward")
    mem = Table(title="Peak training memory (estimate)", caption=f"peak at: {phase}")
    mem.add_column("part")
    mem.add_column("GiB", justify="right")
    for part in _PARTS:
        mem.add_row(part.replace("_", " "), f"{result['memory_gib'][part]:.2f}")
    mem.add_row("[bold]total[/bold]", f"[bold]{result['memory_gib']['total']:.2f}[/bold]")
    console.print(mem)
    processes = result.get("processes")
    if processes:
        console.print(_processes_line(processes))
    host = result.get("host_memory_gib", {})
    labels = {"optimizer_state": "optimizer state (paged)", "activations": "activations (offloaded)"}
    host_parts = [f"{label} {host[key]:.2f} GiB" for key, label in labels.items() if host.get(key)]
    if host_parts:
        console.print("in CPU memory besides: " + ", ".join(host_parts))
    gpus = Table(title=f"GPUs: time and cost for {result['tokens']:.3g} tokens at MFU {result['mfu']:.0%}")
    for col in ("GPU", "memory", "GPUs needed", "hours", "cost USD"):
        gpus.add_column(col, justify="right" if col != "GPU" else "left")
    for f in result["gpus"]:
        n = f["gpus_needed"]
        gpus.add_row(
            f["gpu"],
            f"{f['memory_gb']:g} GB",
            "does not fit" if n is None else str(n),
            "-" if n is None else f"{f['hours']:.2f}",
            "-" if n is None else f"{f['cost_usd']:.2f}",
        )
    console.print(gpus)
    if result.get("tokens_basis"):
        console.print(f"tokens: {result['tokens']:,.0f}, {result['tokens_basis']}", highlight=False)
    c = result["chosen_gpu"]
    if c:
        console.print(
            f"cheapest fitting: {c['gpus_needed']} x {c['gpu']}, {c['hours']:.2f} h, "
            f"${c['cost_usd']:.2f} (prices: {result['prices_source']})"
        )
    if "business" in result:
        render_business(result["business"], console)


def _processes_line(p: dict) -> str:
    """What each of N training processes holds (tailor.plan.memory.per_process_memory)."""
    if p["strategy"] == "fsdp":
        how = (f"fsdp divides weights, gradients and optimizer state by {p['nproc']} ({p['sharded']:.2f} GiB "
               f"each), plus {p['gathered']:.2f} GiB of units gathered whole at a time (root, two layers)")
    else:
        how = (f"ddp replicates the whole model state ({p['replicated']:.2f} GiB) in each, plus "
               f"{p['gathered']:.2f} GiB of gradient buckets")
    return (f"{p['nproc']} processes, {p['strategy']}: {p['per_process']:.2f} GiB per process; {how}; "
            f"activations and overhead {p['activations_and_overhead']:.2f} GiB in each")


def render_business(b: dict, console: Console) -> None:
    t = Table(title="Business view (--cost)")
    t.add_column("item")
    t.add_column("value", justify="right")
    full_run = b["full_finetune_cost_per_run_usd"]
    rows = [
        ("training cost per run", f"${b['training_cost_per_run_usd']:.2f} on {b['training_gpu']}"),
        ("full fine-tune cost per run", "does not fit" if full_run is None else f"${full_run:.2f}"),
        ("storage per adapter", f"{b['adapter_size_mb']:.1f} MB"),
        ("storage per full copy", f"{b['full_copy_size_gb']:.2f} GB"),
        (
            f"serve N={b['inputs']['customisations']} as N full models",
            f"{b['serving_n_full_models']['gpus']} x {b['serving_gpu']}: "
            f"${b['serving_n_full_models']['cost_usd']:,.0f}",
        ),
        (
            "serve one base + N adapters",
            f"{b['serving_base_plus_n_adapters']['gpus']} x {b['serving_gpu']}: "
            f"${b['serving_base_plus_n_adapters']['cost_usd']:,.0f}",
        ),
        (
            "storage: N full copies / base + N adapters",
            f"${b['storage_n_full_copies_usd']:,.2f} / ${b['storage_base_plus_n_adapters_usd']:,.2f}",
        ),
    ]
    for row in rows:
        t.add_row(*row)
    console.print(t)
    r = b["roi"]
    console.print(r["formula"])
    console.print(f"  baseline cost  ${r['baseline_cost_usd']:,.0f}  ({r['baseline_is']})")
    console.print(f"  new cost       ${r['new_cost_usd']:,.0f}  ({r['new_is']})")
    console.print(f"  implementation ${r['implementation_cost_usd']:,.0f}")
    console.print(f"  [bold]ROI = {r['roi']:.2f}[/bold]  (inputs: {b['inputs']})")
