"""Serving throughput: tailor's engine with many adapters against the bare base, HF generate and PEFT.

    python benchmarks/serve_throughput.py                      # every part, default model, ~5 min on 2 cores
    python benchmarks/serve_throughput.py --json serve.json
    python benchmarks/serve_throughput.py --parts hetero,base,hf --requests 16 --new-tokens 32

Parts (same prompts: built-in support tickets rendered with the chat template; every request generates
exactly --new-tokens tokens, end-of-text ignored, so every system does the same work):

    hetero      tailor's engine, --requests concurrent requests, each for a different adapter (random
                r=16 all-linear adapters of the model's shapes), adapters already in slots
    base        the same engine, the same requests with no adapter (the bare base model)
    structured  the same engine and requests, each constrained to the support task's JSON Schema
                (response_format json_schema: every row its own grammar, masked per row each step), against
                the same requests unconstrained with each request's token count fixed to its constrained
                answer's (ignore_eos), so both do the same work; two interleaved rounds, the best of each
                (ratio_structured_vs_plain)
    hf          HF generate on the bare base model, one left-padded batch of all requests
    peft        PEFT's mixed-adapter batch (`generate(adapter_names=[...])`), one batch, one adapter per row
    swap        swap per request: load the adapter, generate alone, unload (--swap-requests requests)
    cold        cold load of one adapter never seen: read from disk + checked + put in a slot (median)
    many        --many-requests requests, each for an adapter drawn at random from 1,000 adapters on disk
                with --max-loras slots, against the same with 32 adapters (ratio_1000_vs_32). The 1,000
                adapter directories hold their own config but hard links to 32 distinct weight files (so
                that the benchmark writes 0.6 GB, not 20 GB); each is loaded, checked and placed as a
                separate adapter, and the files are in the page cache in both runs.

tokens/s counts generated tokens over the wall time of the whole batch (prefill included); each part
first runs its batch once with 2 new tokens (warm-up at the timed shapes: allocations, kernel selection).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (the tests do)
from _shared import DEFAULT_MODEL, print_machine  # noqa: E402

PARTS = ("hetero", "base", "structured", "hf", "peft", "swap", "cold", "many")
GOALS = {  # from the serving issue
    "ratio_vs_base": (">=", 0.7),
    "ratio_vs_peft_mixed": (">=", 3.0),
    "ratio_base_vs_hf": (">=", 1.0),
    "cold_load_ms": ("<=", 50.0),
    "ratio_1000_vs_32": (">=", 0.8),
    "ratio_structured_vs_plain": (">=", 0.8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or local path (tailor.models)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the device has it) | float32 | bfloat16")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--lora-dtype", default="float32", help="the adapter slots' dtype: float32 | bfloat16")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests (hetero/base/hf/peft)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--swap-requests", type=int, default=4, help="requests of the swap-per-request part")
    p.add_argument("--many-adapters", type=int, default=1000)
    p.add_argument("--many-requests", type=int, default=96)
    p.add_argument("--max-loras", type=int, default=32, help="slots of the engine")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    args.part_list = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.part_list if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    return args


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------


def support_prompts(tokenizer, n: int, limit: int | None = None) -> list[list[int]]:
    """n prompts: held-out support tickets, chat-rendered (all share the dataset's system prompt); at
    most `limit` tokens each (the end kept), for models with a short context."""
    from tailor.data import load_examples
    from tailor.data.tokenize import render_chat

    examples = load_examples("builtin:support:test")
    prompts = []
    for i in range(n):
        messages = list(examples[i % len(examples)].messages[:-1])
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(ids[-limit:] if limit else ids)
    return prompts


def adapter_shapes(model, rank: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """{module path: (A shape, B shape)} of an r-`rank` all-linear adapter of `model`."""
    from tailor.lora import LoraConfig, plan_lora
    from tailor.lora.layer import LoraLayer, linear_features

    plan = plan_lora(model, LoraConfig(r=rank, target_modules="all-linear"))
    shapes = {}
    for path, module, _, _ in plan.targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        d_in, d_out = linear_features(base)
        shapes[path] = ((rank, d_in), (d_out, rank))
    return shapes


def write_adapters(model, root: Path, names: list[str], rank: int, distinct: int | None = None,
                   seed: int = 0) -> None:
    """Random r-`rank` all-linear adapters in PEFT's format (fp32, as training saves them). Beyond
    `distinct` weight files, later adapters hard-link one of them (their own config, the same bytes)."""
    import torch
    from safetensors.torch import save_file

    from tailor.adapters.format import PREFIX, config_to_peft_dict
    from tailor.lora import LoraConfig

    shapes = adapter_shapes(model, rank)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=sorted(shapes))
    config_text = json.dumps({**config_to_peft_dict(config), "base_model_name_or_path": model.name_or_path},
                             indent=2, sort_keys=True)
    generator = torch.Generator().manual_seed(seed)
    written: list[Path] = []
    for i, name in enumerate(names):
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_config.json").write_text(config_text)
        weights = directory / "adapter_model.safetensors"
        if distinct is not None and i >= distinct:
            os.link(written[i % distinct], weights)
            continue
        state = {}
        for path, (a_shape, b_shape) in shapes.items():
            a = torch.randn(a_shape, generator=generator) / a_shape[1] ** 0.5
            state[f"{PREFIX}{path}.lora_A.weight"] = a
            state[f"{PREFIX}{path}.lora_B.weight"] = torch.randn(b_shape, generator=generator) * 0.01
        save_file(state, str(weights), metadata={"format": "pt"})
        written.append(weights)


# ------------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------------


def make_engine(model, tokenizer, root: Path, max_loras: int, max_batch: int,
                max_cpu_loras: int | None = None, lora_dtype: str = "float32"):
    from tailor.models import parse_dtype
    from tailor.serve import AdapterManager, Engine

    manager = AdapterManager(model, root, max_loras=max_loras, max_lora_rank=16, max_cpu_loras=max_cpu_loras,
                             dtype=parse_dtype(lora_dtype))
    return Engine(model, tokenizer, adapters=manager, max_batch=max_batch)


def run_engine(engine, prompts: list[list[int]], adapters: list[str | None],
               new_tokens: int) -> dict[str, Any]:
    """All requests submitted at once; generated tokens / wall seconds until the last one finishes."""
    from tailor.serve import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    steps: list[tuple[float, int, int]] = []  # (seconds, prompt tokens prefilled, rows decoded)
    last = [engine.stats["prefill_tokens"]]

    def listen(engine, tokens: int, seconds: float) -> None:
        prefilled = engine.stats["prefill_tokens"] - last[0]
        last[0] = engine.stats["prefill_tokens"]
        steps.append((seconds, prefilled, tokens - prefilled))

    engine.step_listeners.append(listen)
    started = time.perf_counter()
    try:
        requests = engine.generate(prompts, params, adapters=adapters)
    finally:
        engine.step_listeners.remove(listen)
    seconds = time.perf_counter() - started
    tokens = sum(len(r.output_ids) for r in requests)
    decode = [(s, rows) for s, prefilled, rows in steps if not prefilled]  # steps without a prefill
    decode_seconds = sum(s for s, _ in decode)
    decode_rate = round(sum(r for _, r in decode) / decode_seconds, 1) if decode_seconds else None
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "prefill_seconds": round(sum(s for s, p, _ in steps if p), 3), "decode_tokens_per_s": decode_rate}


def run_structured(engine, prompts: list[list[int]], new_tokens: int, rounds: int = 2) -> dict[str, Any]:
    """Every request constrained to the support task's JSON Schema (greedy, up to new_tokens tokens, ending
    when the JSON is complete), against the same requests unconstrained, each generating exactly as many
    tokens as its constrained answer did. A full-length run first grows the KV cache to its final size
    (else the first timed run pays for it); then `rounds` rounds of (constrained, unconstrained),
    interleaved so that a change in the machine's load touches both; the best tokens/s of each."""
    from tailor.data.support import support_schema
    from tailor.serve import SamplingParams
    from tailor.serve.constraints import OutputFormat

    output = OutputFormat.json_schema(support_schema(), "support")
    engine.generate(prompts, SamplingParams(max_tokens=2), output=output)  # compiles the grammar
    engine.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))  # cache at full size
    best = {"structured": 0.0, "plain": 0.0}
    lengths: list[int] = []
    for _ in range(rounds):
        started = time.perf_counter()
        constrained = engine.generate(prompts, SamplingParams(max_tokens=new_tokens), output=output)
        seconds = time.perf_counter() - started
        lengths = [r.generated for r in constrained]
        best["structured"] = max(best["structured"], sum(lengths) / seconds)
        same_work = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
        started = time.perf_counter()
        plain = engine.generate(prompts, same_work)
        seconds = time.perf_counter() - started
        assert [r.generated for r in plain] == lengths, "the unconstrained run must do the same work"
        best["plain"] = max(best["plain"], sum(lengths) / seconds)
    complete = sum(r.finish_reason == "stop" for r in constrained)
    return {"tokens": sum(lengths), "complete_json": complete, "requests": len(prompts), "rounds": rounds,
            "structured_tokens_per_s": round(best["structured"], 1),
            "plain_tokens_per_s": round(best["plain"], 1)}


def warm_slots(engine, names: list[str]) -> None:
    """Put every adapter in a slot first (a one-token request each): the hetero part measures decoding."""
    from tailor.serve import SamplingParams

    engine.generate([[1, 2, 3]] * len(names), SamplingParams(max_tokens=1), adapters=names)


def run_hf(model, tokenizer, prompts: list[list[int]], new_tokens: int, **generate_kwargs) -> dict[str, Any]:
    """One left-padded batch through `model.generate` (greedy, exactly new_tokens tokens per row)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    device = next(model.parameters()).device
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad, **generate_kwargs)
    seconds = time.perf_counter() - started
    tokens = (out.shape[1] - width) * len(prompts)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def run_peft_mixed(args, root: Path, names: list[str], tokenizer, prompts, dtype) -> dict[str, Any]:
    """PEFT with every adapter loaded, one batch whose rows name different adapters (adapter_names=)."""
    from peft import PeftModel

    from tailor.models import load_model

    base, _ = load_model(args.model, dtype=dtype, device=args.device)
    model = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0])
    for name in sorted(set(names[1:])):
        model.load_adapter(str(root / name), adapter_name=name)
    model.eval()
    run_hf(model, tokenizer, prompts, 2, adapter_names=names)  # warm-up at the timed shapes
    return run_hf(model, tokenizer, prompts, args.new_tokens, adapter_names=names)


def run_swap(model, tokenizer, root: Path, names: list[str], prompts, new_tokens: int) -> dict[str, Any]:
    """The naive server: per request, load its adapter, generate alone, delete the adapter."""
    from tailor.adapters.format import load_adapter
    from tailor.lora import delete_adapter

    tokens, started = 0, time.perf_counter()
    for name, prompt in zip(names, prompts, strict=False):
        load_adapter(model, root / name, name="request")
        tokens += run_hf(model, tokenizer, [prompt], new_tokens)["tokens"]
        delete_adapter(model, "request")
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def run_cold(engine, names: list[str]) -> dict[str, Any]:
    """Per adapter never seen: read from disk and check (AdapterManager.read), then write a free slot."""
    manager = engine.adapters
    times = []
    for name in names:
        started = time.perf_counter()
        manager.read(name)
        slot = manager.acquire(name)
        manager.release(slot)
        times.append((time.perf_counter() - started) * 1000)
    return {"cold_load_ms": round(statistics.median(times), 2),
            "cold_load_ms_all": [round(t, 2) for t in times]}


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        x, y = results.get(a), results.get(b)
        return round(x / y, 3) if x and y else None

    return {"ratio_vs_base": ratio("hetero_tokens_per_s", "base_tokens_per_s"),
            "ratio_vs_peft_mixed": ratio("hetero_tokens_per_s", "peft_mixed_tokens_per_s"),
            "ratio_base_vs_hf": ratio("base_tokens_per_s", "hf_base_tokens_per_s"),
            "ratio_vs_swap": ratio("hetero_tokens_per_s", "swap_tokens_per_s"),
            "ratio_vs_base_no_prefix_sharing": ratio("hetero_tokens_per_s",
                                                     "base_no_prefix_sharing_tokens_per_s"),
            "ratio_decode_vs_base_decode": ratio("hetero_decode_tokens_per_s", "base_decode_tokens_per_s"),
            "ratio_1000_vs_32": ratio("many_1000_tokens_per_s", "many_32_tokens_per_s"),
            "ratio_structured_vs_plain": ratio("structured_tokens_per_s", "structured_plain_tokens_per_s")}


def goal_status(results: dict[str, Any]) -> dict[str, str]:
    status = {}
    for key, (op, bound) in GOALS.items():
        value = results.get(key)
        if value is None:
            status[key] = "not measured"
        else:
            met = value >= bound if op == ">=" else value <= bound
            status[key] = f"{'met' if met else 'NOT met'} ({value} {op} {bound})"
    return status


def print_table(results: dict[str, Any]) -> None:
    settings = results["settings"]
    rows = [("engine, hetero (one adapter per request)", "hetero_tokens_per_s"),
            ("engine, bare base", "base_tokens_per_s"),
            ("engine, bare base, no prefix sharing (ablation)", "base_no_prefix_sharing_tokens_per_s"),
            ("engine, bare base, every request a JSON Schema", "structured_tokens_per_s"),
            ("engine, bare base, the same unconstrained", "structured_plain_tokens_per_s"),
            ("engine, hetero, decode steps only", "hetero_decode_tokens_per_s"),
            ("engine, bare base, decode steps only", "base_decode_tokens_per_s"),
            ("HF generate, bare base", "hf_base_tokens_per_s"),
            ("PEFT mixed-adapter batch", "peft_mixed_tokens_per_s"),
            ("swap per request (load, generate, unload)", "swap_tokens_per_s"),
            (f"engine, {settings['many_requests']} requests over 32 adapters", "many_32_tokens_per_s"),
            (f"engine, the same over {settings['many_adapters']} adapters", "many_1000_tokens_per_s")]
    print(f"\n{'configuration':<52} {'tokens/s':>10}")
    for label, key in rows:
        value = results.get(key)
        print(f"{label:<52} {value if value is not None else '-':>10}")
    print(f"{'cold load of one adapter (median ms)':<52} {results.get('cold_load_ms', '-'):>10}")
    print()
    for key, text in goal_status(results).items():
        print(f"goal {key:<22} {text}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from tailor.models import load_model, parse_dtype

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = print_machine(args.device)
    torch.manual_seed(args.seed)
    dtype = parse_dtype(args.dtype, args.device)
    parts = set(args.part_list)
    results: dict[str, Any] = {**machine, "settings": {
        "model": args.model, "dtype": str(dtype).removeprefix("torch."), "lora_dtype": args.lora_dtype,
        "requests": args.requests,
        "new_tokens": args.new_tokens, "rank": args.rank, "max_loras": args.max_loras,
        "many_adapters": args.many_adapters, "many_requests": args.many_requests,
        "threads": torch.get_num_threads(), "machine": f"{os.cpu_count()} cores", "device": args.device}}
    served, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    served.name_or_path = args.model
    context = getattr(served.config, "max_position_embeddings", None) or 2048
    prompts = support_prompts(tokenizer, args.requests, min(1024, context - args.new_tokens - 1))
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        root = Path(tmp) / "adapters"
        names = [f"adapter-{i:04d}" for i in range(args.requests)]
        write_adapters(served, root, names, args.rank, seed=args.seed)
        engine = make_engine(served, tokenizer, root, max(args.max_loras, args.requests), args.requests,
                             lora_dtype=args.lora_dtype)
        if "hetero" in parts:
            warm_slots(engine, names)
            run_engine(engine, prompts, names, 2)  # warm-up at the timed shapes: allocator, kernels
            hetero = run_engine(engine, prompts, names, args.new_tokens)
            results["hetero_tokens_per_s"] = hetero["tokens_per_s"]
            results["hetero_decode_tokens_per_s"] = hetero["decode_tokens_per_s"]
            print(f"hetero: {hetero}", flush=True)
        if "base" in parts:
            run_engine(engine, prompts, [None] * len(prompts), 2)
            base = run_engine(engine, prompts, [None] * len(prompts), args.new_tokens)
            results["base_tokens_per_s"] = base["tokens_per_s"]
            results["base_decode_tokens_per_s"] = base["decode_tokens_per_s"]
            print(f"base: {base}", flush=True)
            engine.share_prefix = False  # what the shared system prompt buys the bare base (an ablation)
            alone = run_engine(engine, prompts, [None] * len(prompts), args.new_tokens)
            engine.share_prefix = True
            results["base_no_prefix_sharing_tokens_per_s"] = alone["tokens_per_s"]
            print(f"base without prefix sharing: {alone}", flush=True)
        if "structured" in parts:
            structured = run_structured(engine, prompts, args.new_tokens)
            results["structured_tokens_per_s"] = structured["structured_tokens_per_s"]
            results["structured_plain_tokens_per_s"] = structured["plain_tokens_per_s"]
            print(f"structured: {structured}", flush=True)
        if "cold" in parts:
            cold_names = [f"cold-{i}" for i in range(10)]
            write_adapters(served, root, cold_names, args.rank, seed=args.seed + 1)
            results.update(run_cold(engine, cold_names))
            print(f"cold: {results['cold_load_ms']} ms", flush=True)
        if "many" in parts:
            many_root = Path(tmp) / "many"
            pool = [f"m-{i:04d}" for i in range(args.many_adapters)]
            write_adapters(served, many_root, pool, args.rank, distinct=32, seed=args.seed + 2)
            many_prompts = [prompts[i % len(prompts)] for i in range(args.many_requests)]
            engine.adapters.close()
            del engine
            for size, key in ((32, "many_32_tokens_per_s"), (args.many_adapters, "many_1000_tokens_per_s")):
                served_engine = make_engine(_fresh(args.model, dtype, args.device), tokenizer, many_root,
                                            args.max_loras, args.requests, max_cpu_loras=2 * args.max_loras,
                                            lora_dtype=args.lora_dtype)
                choice = [rng.choice(pool[:size]) for _ in many_prompts]
                run_engine(served_engine, many_prompts[:2], choice[:2], 2)
                many = run_engine(served_engine, many_prompts, choice, args.new_tokens)
                results[key] = many["tokens_per_s"]
                results[key.replace("tokens_per_s", "adapter_stats")] = dict(served_engine.adapters.stats)
                served_engine.adapters.close()
                print(f"many ({size} adapters): {many} {served_engine.adapters.stats}", flush=True)
                del served_engine
        else:
            engine.adapters.close()
            del engine
        del served
        if "hf" in parts:
            plain, _ = load_model(args.model, dtype=dtype, device=args.device)
            run_hf(plain, tokenizer, prompts, 2)
            hf = run_hf(plain, tokenizer, prompts, args.new_tokens)
            results["hf_base_tokens_per_s"] = hf["tokens_per_s"]
            print(f"hf: {hf}", flush=True)
            if "swap" in parts:
                swap = run_swap(plain, tokenizer, root, names[: args.swap_requests], prompts, args.new_tokens)
                results["swap_tokens_per_s"] = swap["tokens_per_s"]
                print(f"swap: {swap}", flush=True)
            del plain
        elif "swap" in parts:
            plain, _ = load_model(args.model, dtype=dtype, device=args.device)
            swap = run_swap(plain, tokenizer, root, names[: args.swap_requests], prompts, args.new_tokens)
            results["swap_tokens_per_s"] = swap["tokens_per_s"]
        if "peft" in parts:
            peft = run_peft_mixed(args, root, names, tokenizer, prompts, dtype)
            results["peft_mixed_tokens_per_s"] = peft["tokens_per_s"]
            print(f"peft mixed: {peft}", flush=True)
    results.update(ratios(results))
    if args.device.startswith("cuda"):  # the allocator's peak over every part run
        results["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    results["goals"] = goal_status(results)
    print_table(results)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _fresh(model_name: str, dtype, device: str | None = None):
    from tailor.models import load_model

    return load_model(model_name, dtype=dtype, device=device)[0]


if __name__ == "__main__":
    main(sys.argv[1:])
