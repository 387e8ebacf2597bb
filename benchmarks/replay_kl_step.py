"""One training step on replayed answers: replay_loss ce against kl, and kl with the base's states kept.

    python benchmarks/replay_kl_step.py                 # the default model, 8 replayed answers, ~1 min
    python benchmarks/replay_kl_step.py --batch 16 --json kl.json

A batch of --batch replayed answers (the base model's own answers to the built-in general prompts, as
`tailor train --replay-ratio` mixes them in; generated once and cached), LoRA r=16 on the attention
projections with a moved adapter, in the precision auto runs here (bf16 autocast where native, else
fp32); forward and backward of the loss, measured in the same invocation, interleaved, --rounds times
each (the machine is shared: min and median):

    ce           cross-entropy on the answer tokens (replay_loss ce): the yardstick
    kl           KL from the base model, its body run again on the batch (no cache)
    kl cached    KL from the base model, its hidden states read from the cache filled on the first visit
                 (what the training loop does: every answer is seen several times)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (the tests do)
from _shared import DEFAULT_MODEL, print_machine  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=8, help="replayed answers in the batch")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def measure(model: torch.nn.Module, batch: dict[str, torch.Tensor], rounds: int) -> dict[str, dict]:
    """Seconds of one forward + backward of each loss, interleaved; and the loss each gave (kl and kl
    cached must agree: the cache changes where the base's hidden states come from, not what they are)."""
    from tailor.loss import compute_context, supervised_loss
    from tailor.loss.replay import BaseHiddenCache, CrossEntropyReplay, KLReplay

    kinds = {"ce": CrossEntropyReplay(), "kl": KLReplay(), "kl cached": KLReplay(BaseHiddenCache())}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    losses: dict[str, float] = {}
    device = next(model.parameters()).device
    for round_ in range(rounds + 1):  # round 0 warms up (and fills the cache)
        for name, replay in kinds.items():
            started = time.perf_counter()
            with compute_context(device, "auto"):
                loss, _ = supervised_loss(model, batch, replay=replay)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if round_:
                times[name].append(time.perf_counter() - started)
            losses[name] = float(loss.detach())
    return {name: {"min_s": min(t), "median_s": statistics.median(t), "loss": losses[name]}
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    from tailor.data import tokenize_examples
    from tailor.lora import LoraConfig, add_lora
    from tailor.loss import collate_batch
    from tailor.models import load_model
    from tailor.train.replay import replay_examples

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = print_machine()
    answers, _ = replay_examples(args.model)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    add_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter has moved B away from zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    tokenized, _ = tokenize_examples(answers[: args.batch], tokenizer, max_seq_len=256)
    batch = collate_batch(tokenized, tokenizer.pad_token_id, torch.device("cpu"))
    results = measure(model, batch, args.rounds)
    ce = results["ce"]["median_s"]
    print(f"{args.model}: {args.batch} replayed answers, {int(batch['attention_mask'].sum())} tokens, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'loss':<10} {'min s':>7} {'median s':>9} {'x ce':>6}")
    for name, r in results.items():
        print(f"{name:<10} {r['min_s']:>7.3f} {r['median_s']:>9.3f} {r['median_s'] / ce:>6.2f}")
    report = {**machine, "model": args.model, "batch": args.batch, "threads": torch.get_num_threads(),
              "results": results}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
