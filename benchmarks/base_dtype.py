"""The frozen base stored in fp32 or in bf16 (upcast to fp32 per matmul, tailor.models.upcast), both computing
in fp32 (what `precision: auto` runs on a CPU without native bf16), at the level of the whole model:

    python benchmarks/base_dtype.py [--rounds 5] [--json out.json] [--threads N]

Timed in one process, the two bases interleaved (A B, then B A, ...), --rounds times each, medians:

    train step   LoRA r=16 all-linear on the default model, batch 8 x 256 tokens: forward, loss, backward
                 (tailor.loss.supervised_loss; the adapters' AdamW step is the same for both, left out)
    kl base      the replay/KL pass's base forward: the same batch, adapters off, no_grad, body + head
    decode       the serving engine's decode step, reduced: the bare base's forward of 32 rows x 1 token
                 with a KV cache of 128 tokens per row

and each base's peak RSS over loading it and 2 training steps, each in its own child process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import DEFAULT_MODEL, print_machine  # noqa: E402

BASES = ("fp32", "bf16")  # the frozen base's storage dtype; compute is fp32 for both


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--decode-rows", type=int, default=32)
    p.add_argument("--decode-context", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--skip-rss", action="store_true", help="no child processes for peak RSS")
    p.add_argument("--phases", default="train,kl,decode", help="which of train, kl, decode to time")
    p.add_argument("--rss-child", choices=BASES, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load(model: str, base: str, lora: bool):
    import torch

    from tailor.lora import LoraConfig, add_lora
    from tailor.models import load_model

    stored = torch.bfloat16 if base == "bf16" else None
    m, _ = load_model(model, dtype=torch.float32, device="cpu", stored=stored)
    m.set_attn_implementation("eager")  # as tailor's trainer runs on a CPU (tailor.methods.base)
    if lora:
        add_lora(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return m


def batch_for(args, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (args.batch_size, args.max_seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_step(model, batch) -> None:
    from tailor.loss import supervised_loss

    loss, n = supervised_loss(model, batch)
    (loss / n).backward()
    model.zero_grad(set_to_none=True)


def kl_base_forward(model, batch) -> None:
    import torch

    from tailor.lora import disable_adapters

    with torch.no_grad(), disable_adapters(model):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=0)


def decoder(model, args, vocab: int):
    """A callable running one decode step of `decode_rows` rows against a KV cache of `decode_context`."""
    import torch
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(1)
    rows, context = args.decode_rows, args.decode_context
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(100, vocab, (rows, context), generator=g), past_key_values=cache,
              use_cache=True, logits_to_keep=1)
    token = torch.randint(100, vocab, (rows, 1), generator=g)
    position = torch.full((rows, 1), context)

    def step() -> None:
        with torch.no_grad():
            model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to the context: every step decodes against the same cache

    return step


def rss_child(args) -> None:
    """Peak RSS of loading the base and 2 training steps (a fresh process per base). VmHWM, not ru_maxrss:
    the latter survives exec, so a child of a large parent would report the parent's peak."""
    model = load(args.model, args.rss_child, lora=True)
    batch = batch_for(args, model.config.vocab_size)
    for _ in range(2):
        train_step(model, batch)
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")), None)
    print(json.dumps({"peak_rss_mib": peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_rss(args) -> dict[str, float]:
    """Each base's peak RSS in its own child process (run before this process loads anything)."""
    rss = {}
    for base in BASES:
        command = [sys.executable, __file__, "--model", args.model, "--rss-child", base,
                   "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rss[base] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
        print(f"peak RSS, {base} base (load + 2 training steps): {rss[base]:.0f} MiB", flush=True)
    return rss


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return {}
    machine = print_machine("cpu")
    rss = {} if args.skip_rss else measure_rss(args)
    models = {base: load(args.model, base, lora=True) for base in BASES}
    vocab = models["fp32"].config.vocab_size
    batch = batch_for(args, vocab)
    for model in models.values():  # a moved adapter, so the adapters compute something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
    decoders = {base: decoder(model, args, vocab) for base, model in models.items()}
    phases = {"train step": lambda base: train_step(models[base], batch),
              "kl base": lambda base: kl_base_forward(models[base], batch),
              "decode": lambda base: decoders[base]()}
    phases = {name: run for name, run in phases.items() if name.split()[0] in args.phases.split(",")}
    times: dict[str, dict[str, list[float]]] = {phase: {b: [] for b in BASES} for phase in phases}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        order = BASES if round_ % 2 == 0 else BASES[::-1]
        for phase, run in phases.items():
            repeats = 10 if phase == "decode" else 1
            for base in order:
                started = time.perf_counter()
                for _ in range(repeats):
                    run(base)
                if round_:
                    times[phase][base].append((time.perf_counter() - started) / repeats)
            if round_:
                print(f"  round {round_} {phase}: " + ", ".join(f"{b} {times[phase][b][-1] * 1e3:.1f} ms"
                                                            for b in BASES), flush=True)
    rows = []
    for phase in phases:
        fp32, bf16 = (statistics.median(times[phase][b]) for b in BASES)
        rows.append({"phase": phase, "fp32_ms": round(fp32 * 1e3, 1), "bf16_ms": round(bf16 * 1e3, 1),
                     "bf16_vs_fp32": round(bf16 / fp32, 3),
                     "bf16_vs_fp32_per_round": [round(b / a, 3) for a, b in
                                                zip(*(times[phase][b] for b in BASES), strict=True)]})
    print(f"{'phase':12s} {'fp32 base ms':>13s} {'bf16 base ms':>13s} {'bf16/fp32':>10s}  per round")
    for r in rows:
        print(f"{r['phase']:12s} {r['fp32_ms']:13.1f} {r['bf16_ms']:13.1f} {r['bf16_vs_fp32']:10.3f}  "
              f"{' '.join(f'{x:.2f}' for x in r['bf16_vs_fp32_per_round'])}", flush=True)
    result = {**machine, "rounds": args.rounds, "rows": rows, "peak_rss_mib": rss}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
