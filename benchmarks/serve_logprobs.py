"""What log-probabilities cost the serving engine: decoding with `logprobs` against without, and
lm-eval-style likelihood requests (echo: the prompt's log-probabilities, max_tokens 0) against plain
prefills of the same prompts, both in one run on one machine (its line printed first).

    python benchmarks/serve_logprobs.py                       # the default model, 32 rows, 64 tokens
    python benchmarks/serve_logprobs.py --requests 8 --new-tokens 16 --json out.json

decode: `--requests` concurrent requests, each with its own random r-16 adapter, `--new-tokens` tokens
each (ignore_eos), without and then with `logprobs` (`--top` most likely tokens per position): generated
tokens/s of each, and their ratio. echo: the same prompts as likelihood requests (every prompt position's
log-probabilities, top 1) against a one-token answer without them: prompts/s of each, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import DEFAULT_MODEL, print_machine  # noqa: E402
from serve_throughput import make_engine, support_prompts, warm_slots, write_adapters  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or local path (tailor.models)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the device has it) | float32 | bfloat16")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests, each its own adapter")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (decode)")
    p.add_argument("--top", type=int, default=5, help="most likely tokens reported per position (decode)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def timed(engine, prompts, params, adapters) -> tuple[float, list]:
    started = time.perf_counter()
    requests = engine.generate(prompts, params, adapters=adapters)
    return time.perf_counter() - started, requests


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from tailor.models import load_model, parse_dtype
    from tailor.serve import SamplingParams

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = print_machine()
    model, tokenizer = load_model(args.model, dtype=parse_dtype(args.dtype))
    limit = getattr(model.config, "max_position_embeddings", 2048) - args.new_tokens - 1
    prompts = support_prompts(tokenizer, args.requests, limit=limit)
    names = [f"a{i}" for i in range(args.requests)]
    results: dict[str, Any] = {"machine": machine, "model": args.model, "dtype": args.dtype,
                               "requests": args.requests, "new_tokens": args.new_tokens, "top": args.top}
    with tempfile.TemporaryDirectory() as root:
        write_adapters(model, Path(root), names, args.rank)
        engine = make_engine(model, tokenizer, Path(root), max_loras=args.requests, max_batch=args.requests)
        engine.share_prefix = False  # likelihood requests compute their whole prompt: compare like with like
        warm_slots(engine, names)
        decode = {}
        for label, logprobs in (("plain", None), ("logprobs", args.top)):
            params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, logprobs=logprobs)
            seconds, requests = timed(engine, prompts, params, names)
            decode[label] = round(sum(r.generated for r in requests) / seconds, 1)
        echo = {}
        for label, params in (("plain", SamplingParams(max_tokens=1)),
                              ("echo", SamplingParams(max_tokens=0, logprobs=1, prompt_logprobs=1))):
            seconds, _ = timed(engine, prompts, params, names)
            echo[label] = round(len(prompts) / seconds, 2)
    results["decode_tokens_per_s"] = decode
    results["decode_ratio"] = round(decode["logprobs"] / decode["plain"], 3)
    results["prompts_per_s"] = echo
    results["echo_ratio"] = round(echo["echo"] / echo["plain"], 3)
    print(f"decode, {args.requests} rows x {args.new_tokens} tokens: {decode['plain']} tokens/s plain, "
          f"{decode['logprobs']} with logprobs (top {args.top}): {results['decode_ratio']}x")
    print(f"likelihood requests (echo, max_tokens 0): {echo['echo']} prompts/s, against {echo['plain']} for "
          f"one plain token: {results['echo_ratio']}x")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
