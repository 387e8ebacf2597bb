"""Routing by content (`model: "auto"`): accuracy on held-out prompts, the base fallback on general prompts,
the cost of each embedding layer, and the latency routing adds to a request.

    python benchmarks/routing.py                           # support + 3 prompt families, default model
    python benchmarks/routing.py --tasks builtin:support,builtin:code,builtin:analysis,builtin:voice
    python benchmarks/routing.py --user-only --layers 0,2,8 --json routing.json

Tasks: `builtin:NAME` (described from its train split, tested on its test split) or `family:NAME` (the
prompt families of benchmarks/_routing_prompts.py: code, table, rewrite). Each task is one adapter, described
from --train-prompts of its prompts exactly as `tailor adapters describe` does; --test-prompts held-out
prompts per task are routed among all of them, and the general prompts (the retention prompts and a few
ordinary questions) should go to the base model. Descriptions need only the base model, not trained
adapters: routing never looks at the adapter's weights.

Parts:
    accuracy  per --layers entry: the confusion matrix (rows: the prompt's task, columns: where it went),
              routing accuracy per task and overall, the share of general prompts sent to the base, and the
              seconds per prompt the embedding costs at that layer against a full base prefill of it
    latency   the served layer (tailor.routing.ROUTING_LAYER): a chat request through the real engine with
              `model: "auto"` (route, then generate with the chosen adapter) against the same request naming
              its adapter, one request at a time, interleaved, --latency-requests each; the median ratio
--user-only drops the tasks' system messages (the client sends the user's message alone: harder).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (the tests do)
from _routing_prompts import FAMILIES, family_prompts, general_prompts  # noqa: E402
from _shared import DEFAULT_MODEL, print_machine  # noqa: E402

GOALS = {"accuracy": (">=", 0.95), "general_to_base": (">=", 0.95), "added_latency": ("<=", 0.10)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tasks", default="builtin:support," + ",".join(f"family:{f}" for f in FAMILIES),
                   help="comma-separated builtin:NAME or family:NAME")
    p.add_argument("--train-prompts", type=int, default=128, help="prompts each description is made from")
    p.add_argument("--test-prompts", type=int, default=100, help="held-out prompts per task")
    p.add_argument("--general", type=int, default=None, help="general prompts (default: all)")
    p.add_argument("--layers", default="0", help="comma-separated layers to measure accuracy at")
    p.add_argument("--margin", type=float, default=None, help="router margin (default: tailor's)")
    p.add_argument("--user-only", action="store_true", help="leave out the tasks' system messages")
    p.add_argument("--latency-requests", type=int, default=20, help="requests of each kind (0: skip)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens each latency request generates")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_path", default=None)
    return p.parse_args(argv)


def task_prompts(spec: str, split: str, n: int, user_only: bool) -> list[list[dict[str, str]]]:
    """`n` chat prompts of a task for `split` ("train" or "test")."""
    kind, _, name = spec.partition(":")
    if kind == "family":
        if name not in FAMILIES:
            raise SystemExit(f"unknown family {name!r}; one of {', '.join(FAMILIES)}")
        prompts = family_prompts(name, split, n, system=not user_only)
    elif kind == "builtin":
        from tailor.data import load_examples
        from tailor.routing import example_prompts

        prompts = example_prompts(load_examples(f"builtin:{name}:{split}"))
        prompts = random.Random(f"{spec}:{split}").sample(prompts, min(n, len(prompts)))
        if user_only:
            prompts = [[m for m in p if m["role"] != "system"] for p in prompts]
    else:
        raise SystemExit(f"task {spec!r}: give builtin:NAME or family:NAME")
    return prompts


def embedded(model, tokenizer, prompts, layer: int):
    from tailor.routing import pooled_states, prompt_ids
    from tailor.routing.embed import content_tokens, template_frame

    frame = template_frame(tokenizer)
    ids = [content_tokens(prompt_ids(tokenizer, p), frame) for p in prompts]
    started = time.perf_counter()
    points = pooled_states(model, ids, layer, batch_size=1)  # one request at a time, as served
    return points, (time.perf_counter() - started) / len(ids), ids


def prefill_seconds(model, tokenizer, prompts) -> float:
    """Seconds per prompt of a full base forward over the whole prompt (what serving computes anyway)."""
    import torch

    from tailor.routing import prompt_ids

    started = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            model(torch.tensor([prompt_ids(tokenizer, p)]), use_cache=False, logits_to_keep=1)
    return (time.perf_counter() - started) / len(prompts)


def accuracy(model, tokenizer, tasks: dict, general: list, layer: int, margin: float) -> dict[str, Any]:
    from tailor.routing import Described, choose, describe_embeddings

    described = []
    for name, (train, _) in tasks.items():
        points, _, _ = embedded(model, tokenizer, train, layer)
        described.append(Described.of(name, describe_embeddings(points, layer), name))
    columns = [*tasks, "base"]
    confusion: dict[str, dict[str, int]] = {}
    seconds = []
    for name, (_, test) in [*((n, t) for n, t in tasks.items()), ("general", (None, general))]:
        points, per_prompt, _ = embedded(model, tokenizer, test, layer)
        seconds.append(per_prompt)
        row = dict.fromkeys(columns, 0)
        for point in points:
            row[choose(point, described, margin).adapter or "base"] += 1
        confusion[name] = row
    per_task = {n: confusion[n][n] / sum(confusion[n].values()) for n in tasks}
    routed = sum(confusion[n][n] for n in tasks)
    total = sum(sum(confusion[n].values()) for n in tasks)
    prefill = prefill_seconds(model, tokenizer, [t[1][0] for t in tasks.values()] + general[:8])
    return {"layer": layer, "columns": columns, "confusion": confusion, "per_task": per_task,
            "accuracy": routed / total, "general_to_base": confusion["general"]["base"] / len(general),
            "embed_seconds_per_prompt": statistics.mean(seconds), "prefill_seconds_per_prompt": prefill}


def latency(name_or_path: str, tasks: dict, requests: int, new_tokens: int) -> dict[str, Any]:
    """Median seconds of a request with model "auto" against the same request naming its adapter."""
    import torch

    from tailor.adapters.format import save_adapter
    from tailor.adapters.metadata import update_metadata
    from tailor.lora import LoraConfig, add_lora
    from tailor.models import load_model
    from tailor.routing import describe_prompts, prompt_ids
    from tailor.serve.adapters import AdapterManager
    from tailor.serve.auto import ContentRouter
    from tailor.serve.engine import Engine
    from tailor.serve.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        writer, tokenizer = load_model(name_or_path, dtype=torch.float32, device="cpu")
        for name, (train, _) in tasks.items():  # r=16 all-linear adapters, described from their prompts
            update = dict(routing=describe_prompts(writer, tokenizer, train))
            add_lora(writer, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), name=name)
            save_adapter(writer, root / name, name=name)
            update_metadata(root / name, **update)
        del writer
        model, tokenizer = load_model(name_or_path, dtype=torch.float32, device="cpu")
        manager = AdapterManager(model, root, max_loras=len(tasks), max_lora_rank=16)
        engine = Engine(model, tokenizer, adapters=manager, max_batch=4)
        router = ContentRouter(model, tokenizer, manager)
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        cases = [(name, prompt_ids(tokenizer, p)) for name, (_, test) in tasks.items() for p in test]
        cases = [(name, ids) for name, ids in cases if len(ids) + new_tokens < engine.max_model_len]
        cases = random.Random(0).sample(cases, min(requests, len(cases)))
        for name, ids in cases[:2]:  # warm-up: adapters into slots, allocations
            engine.generate([ids], params, [name])
        auto, named, routing = [], [], []
        for name, ids in cases:
            started = time.perf_counter()
            engine.generate([ids], params, [name])
            named.append(time.perf_counter() - started)
            started = time.perf_counter()
            chosen = router.route("auto", ids, None).adapter
            routing.append(time.perf_counter() - started)
            engine.generate([ids], params, [chosen])
            auto.append(time.perf_counter() - started)
        engine.stop()
    ratio = statistics.median(a / n for a, n in zip(auto, named, strict=True))
    return {"requests": len(cases), "new_tokens": new_tokens, "median_named_s": statistics.median(named),
            "median_auto_s": statistics.median(auto), "median_routing_s": statistics.median(routing),
            "added_latency": ratio - 1}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from tailor.models import load_model
    from tailor.routing import ROUTING_LAYER, ROUTING_MARGIN

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = print_machine("cpu")
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    tasks = {spec.partition(":")[2]: (task_prompts(spec, "train", args.train_prompts, args.user_only),
                                      task_prompts(spec, "test", args.test_prompts, args.user_only))
             for spec in specs}
    general = general_prompts(args.general)
    margin = args.margin if args.margin is not None else ROUTING_MARGIN
    print(f"{len(tasks)} tasks ({', '.join(f'{n}: {len(t[1])} held out' for n, t in tasks.items())}), "
          f"{len(general)} general prompts, margin {margin}{', user message only' if args.user_only else ''}")
    results: dict[str, Any] = {"machine": machine, "model": args.model, "margin": margin,
                               "user_only": args.user_only, "layers": []}
    for layer in (int(x) for x in args.layers.split(",")):
        found = accuracy(model, tokenizer, tasks, general, layer, margin)
        results["layers"].append(found)
        print(f"\nlayer {layer}: accuracy {found['accuracy']:.3f}, "
              f"general -> base {found['general_to_base']:.3f}, "
              f"embedding {1000 * found['embed_seconds_per_prompt']:.2f} ms/prompt (a full prefill "
              f"{1000 * found['prefill_seconds_per_prompt']:.1f} ms)")
        width = max(len(c) for c in found["columns"] + ["general"]) + 2
        print("".ljust(width) + "".join(c.rjust(width) for c in found["columns"]))
        for name, row in found["confusion"].items():
            print(name.ljust(width) + "".join(str(row[c]).rjust(width) for c in found["columns"]))
    if args.latency_requests:
        found = latency(args.model, tasks, args.latency_requests, args.new_tokens)
        results["latency"] = found
        print(f"\nlatency at layer {ROUTING_LAYER}, {found['requests']} requests x {found['new_tokens']} "
              "tokens: "
              f"named {found['median_named_s']:.3f} s, auto {found['median_auto_s']:.3f} s (routing "
              f"{1000 * found['median_routing_s']:.2f} ms): {100 * found['added_latency']:+.1f}%")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
