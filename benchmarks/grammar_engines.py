"""Grammar engines for structured output: one token's mask, llguidance vs xgrammar vs outlines-core.

    python benchmarks/grammar_engines.py            # default tokenizer, 32 rows, every engine installed
    python benchmarks/grammar_engines.py --rows 8 --answers 4 --json grammar.json

What is timed, per engine, on the default model's tokenizer (SmolLM2, vocabulary 49,152) and the built-in
support task's JSON Schema (`tailor.data.support.support_schema`):

    compile     turning the schema into the engine's grammar for this tokenizer (once per distinct schema;
                tailor caches it)
    mask_row    one row's next-token mask, then the row advanced by the accepted token, one row at a time:
                microseconds per token (what a constrained row adds to every decode step)
    mask_batch  the masks of --rows rows at once with the engine's batch call where it has one
                (llguidance's fill_next_token_bitmask_par, xgrammar's BatchGrammarMatcher), per step and
                per row-token

The rows replay the tokens of real reference answers (test split), so every mask is one the engine
computes while serving; each engine's masks are checked to allow every replayed token. Each engine runs
with its defaults, xgrammar as tailor runs it (compact JSON, tailor.serve.constraints); outlines-core
builds its index over the whole vocabulary up front (its compile) and has no batch call (its rows are
filled one after the other). Engines that are not installed are reported as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import DEFAULT_MODEL, print_machine  # noqa: E402

ENGINES = ("llguidance", "xgrammar", "outlines-core")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer (tailor.models)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {', '.join(ENGINES)}")
    p.add_argument("--rows", type=int, default=32, help="rows of the batched mask")
    p.add_argument("--answers", type=int, default=16, help="reference answers replayed per row measurement")
    p.add_argument("--threads", type=int, default=2, help="threads of the batch calls")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


class Bench:
    """One engine behind three calls: a fresh matcher, a row's mask into a bitmask row, a batch's masks."""

    def __init__(self, new: Callable[[], Any], fill: Callable[[Any, Any, int], None],
                 fill_batch: Callable[[list, Any], None], advance: Callable[[Any, int], None],
                 bitmask: Callable[[int], Any], allowed: Callable[[Any, int, int], bool]) -> None:
        self.new, self.fill, self.fill_batch, self.advance = new, fill, fill_batch, advance
        self.bitmask, self.allowed = bitmask, allowed


def _bit_allowed(bitmask, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def llguidance_bench(tokenizer, schema: str, threads: int) -> Bench:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    executor = llguidance.LLExecutor(threads)
    return Bench(new=lambda: llguidance.LLMatcher(ll_tokenizer, grammar),
                 fill=lambda m, mask, row: llguidance.torch.fill_next_token_bitmask(m, mask, row),
                 fill_batch=lambda ms, mask: llguidance.torch.fill_next_token_bitmask_par(
                     executor, [(m, i) for i, m in enumerate(ms)], mask),
                 advance=lambda m, token: m.consume_token(token),
                 bitmask=lambda rows: llguidance.torch.allocate_token_bitmask(rows, ll_tokenizer.vocab_size),
                 allowed=_bit_allowed)


def xgrammar_bench(tokenizer, schema: str, threads: int) -> Bench:
    import xgrammar

    from tailor.serve.constraints import JSON_SEPARATORS

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgrammar.GrammarCompiler(info, max_threads=threads)  # as tailor.serve.constraints compiles:
    compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS)
    batch = xgrammar.BatchGrammarMatcher(threads)
    return Bench(new=lambda: xgrammar.GrammarMatcher(compiled),
                 fill=lambda m, mask, row: m.fill_next_token_bitmask(mask, row),
                 fill_batch=lambda ms, mask: batch.batch_fill_next_token_bitmask(ms, mask),
                 advance=lambda m, token: m.accept_token(token),
                 bitmask=lambda rows: xgrammar.allocate_token_bitmask(rows, len(tokenizer)),
                 allowed=_bit_allowed)


def outlines_bench(tokenizer, schema: str, threads: int) -> Bench:
    import outlines_core
    import torch
    from outlines_core.json_schema import build_regex_from_schema

    # outlines' Vocabulary: each token's text (byte-level BPE decoded to its string) -> ids, without eos
    eos = tokenizer.eos_token_id
    by_text: dict[str, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id != eos:
            by_text.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(token_id)
    index = outlines_core.Index(build_regex_from_schema(schema), outlines_core.Vocabulary(eos, by_text))
    words = (len(tokenizer) + 31) // 32

    def fill(guide, mask, row: int) -> None:
        view = mask[row]
        guide.write_mask_into(view.data_ptr(), view.numel(), view.element_size())

    def fill_batch(guides, mask) -> None:  # no batch call: one row after the other
        for row, guide in enumerate(guides):
            fill(guide, mask, row)

    return Bench(new=lambda: outlines_core.Guide(index), fill=fill, fill_batch=fill_batch,
                 advance=lambda g, token: g.advance(token),
                 bitmask=lambda rows: torch.zeros(rows, words, dtype=torch.int32), allowed=_bit_allowed)


BUILDERS = {"llguidance": llguidance_bench, "xgrammar": xgrammar_bench, "outlines-core": outlines_bench}


def measure(bench: Bench, answers: list[list[int]], rows: int) -> dict[str, float]:
    """Per-token mask cost, one row at a time and a batch of `rows` rows (each replaying an answer)."""
    mask = bench.bitmask(rows)
    per_token = []
    for answer in answers:
        matcher = bench.new()
        for token in answer:
            started = time.perf_counter()
            bench.fill(matcher, mask, 0)
            if not bench.allowed(mask, 0, token):
                raise AssertionError(f"the mask refuses token {token} of a reference answer")
            bench.advance(matcher, token)
            per_token.append(time.perf_counter() - started)
    replay = [answers[i % len(answers)] for i in range(rows)]
    matchers = [bench.new() for _ in replay]
    per_step = []
    for step in range(min(len(a) for a in replay)):
        started = time.perf_counter()
        bench.fill_batch(matchers, mask)
        for matcher, answer in zip(matchers, replay, strict=True):
            bench.advance(matcher, answer[step])
        per_step.append(time.perf_counter() - started)
    step_us = statistics.median(per_step) * 1e6
    return {"mask_row_us": round(statistics.median(per_token) * 1e6, 1),
            "mask_row_p90_us": round(statistics.quantiles(per_token, n=10)[-1] * 1e6, 1),
            "mask_batch_step_us": round(step_us, 1), "mask_batch_per_row_us": round(step_us / rows, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    machine = print_machine("cpu")
    from tailor.data.support import build_support_split, support_schema
    from tailor.models.load import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    schema = json.dumps(support_schema())
    references = [e.messages[-1]["content"] for e in build_support_split("test", args.answers)]
    answers = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in references]
    print(f"tokenizer: {args.model} (vocabulary {len(tokenizer)}); {len(answers)} answers of "
          f"{statistics.mean(map(len, answers)):.0f} tokens on average; batch of {args.rows} rows",
          flush=True)
    results: dict[str, Any] = {}
    for name in engines:
        try:
            started = time.perf_counter()
            bench = BUILDERS[name](tokenizer, schema, args.threads)
            compile_ms = (time.perf_counter() - started) * 1e3
        except ImportError as error:
            results[name] = {"installed": False, "error": str(error)}
            print(f"{name:14s} not installed ({error})", flush=True)
            continue
        result = {"installed": True, "compile_ms": round(compile_ms, 1), **measure(bench, answers, args.rows)}
        results[name] = result
        r = result
        print(f"{name:14s} compile {r['compile_ms']:8.1f} ms   mask per row-token {r['mask_row_us']:7.1f} us "
              f"(p90 {r['mask_row_p90_us']:.1f})   batch of {args.rows}: {r['mask_batch_step_us']:8.1f} us "
              f"per step, {r['mask_batch_per_row_us']:.1f} us per row", flush=True)
    report = {"machine": machine, "model": args.model, "vocab": len(tokenizer), "rows": args.rows,
              "engines": results}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
