"""Training throughput: tailor's trainer against PEFT + a plain PyTorch loop, same model/data/config.

    python benchmarks/train_throughput.py                        # all configurations, default model
    python benchmarks/train_throughput.py --steps 10 --json out.json
    python benchmarks/train_throughput.py --configs peft-bf16,tailor --model path/to/model

Every configuration trains the same model (default: SmolLM2-135M-Instruct) on the same data (the
built-in support dataset) with the same recipe (LoRA r=16, alpha=32, all-linear, dropout 0, batch 8,
max_seq_len 256, AdamW lr 2e-4 constant, clip 1.0, seed 0) for the same number of steps, each in its
own subprocess so that peak memory does not mix:

    peft-fp32           PEFT + plain loop, fp32, `model(**batch).loss`
    peft-autocast-bf16  the same under torch.autocast(bfloat16)
    peft-bf16           the same with the whole model cast to bf16
    tailor              tailor.train.fit with method=lora (its model preparation, loss and loop)
    tailor-no-prefix-sharing   the same with share_prefix=False (what running a shared prompt prefix
                        once per batch buys; an ablation)
    tailor-full         tailor.train.fit with method=full (reference: every weight trained)
    tailor-dora         tailor with use_dora (DoRA: a trained magnitude per output row; its step time
                        against tailor's LoRA is the price of DoRA)
    peft-dora           PEFT with use_dora=True + the plain loop, in the precision tailor runs here
                        (autocast bf16 where bf16 is native, else fp32): DoRA's price in PEFT, beside it
    peft-same-batches   the fastest PEFT configuration again, on tailor's length-grouped batches: the
                        like-for-like reference for the loss (runs after the others)

On a device without native bf16 (an AVX2-only CPU: its bf16 matmuls run ~100x slower than fp32) the
default --configs leave out peft-autocast-bf16 and peft-bf16, which would take hours: PEFT's users on such
a machine train in fp32, so peft-fp32 is PEFT best there, and tailor trains in fp32 too (its precision is
what `auto` resolves to). Naming them in --configs still runs them. The run's first line names the
machine (CPU capability, native bf16, the precision auto runs, threads, torch), and the JSON carries it.

Timing: the first `--warmup` steps (allocator, kernel selection, lazy init) are excluded; a step is the
time between two consecutive "step done" moments of the loop, so collate, the optimizer and the loop's
own bookkeeping count. tokens/s counts real (non-pad) tokens only. Wall time is what a user waits; CPU
time (process_time) is also recorded because on a shared machine it is far less noisy. On CUDA each
configuration also records the allocator's peak over its whole process (cuda_max_allocated_mib).

"loss after N steps" is the mean token cross-entropy on a fixed slice of the validation split, computed
identically for every configuration after training. tailor groups batches by length and plain PEFT loops
do not, so after a few steps their losses differ by batch order alone (a few %); the loss goal is
therefore checked against peft-same-batches, which sees exactly tailor's batches.

Model FLOPs per real token (attention score/value products excluded, as in the usual 6N rule):
    LoRA: 4 * N_body + 4 * s * N_head + 6 * N_lora    (forward + input-gradient backward through the
          frozen weights; forward + input- and weight-gradient through the adapters)
    full: 6 * N_body + 6 * s * N_head
with N_body the parameters of the linear layers in the transformer body, N_head = vocab * hidden (the
output head, run only on supervised positions by tailor, hence the supervised share s), N_lora the
adapter parameters. The achieved FLOP rate is compared with the measured matmul peak of the precision
tailor runs in here (bf16 where native, else fp32: precision auto). When tailor
runs a batch's shared prefix once, it performs fewer body/adapter FLOPs per real token (N_body and
N_lora times the computed share c <= 1); the peak fraction counts the FLOPs performed, not per-row ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (the tests do)
from _shared import (  # noqa: E402
    TrainingPeak,
    add_recipe_args,
    config_list,
    load_data,
    peak_rss_mib,
    pick_device,
    print_machine,
    run_child,
    set_threads,
    synchronize,
    train_config,
)

PEFT_CONFIGS = ("peft-fp32", "peft-autocast-bf16", "peft-bf16")
BF16_PEFT_CONFIGS = ("peft-autocast-bf16", "peft-bf16")  # left out by default where bf16 is not native
TAILOR_CONFIGS = ("tailor", "tailor-no-prefix-sharing", "tailor-full")
DORA_CONFIGS = ("tailor-dora", "peft-dora")  # not candidates for "PEFT best" (that is plain LoRA's)
SAME_BATCHES = "peft-same-batches"
ALL_CONFIGS = PEFT_CONFIGS + TAILOR_CONFIGS + DORA_CONFIGS + (SAME_BATCHES,)
GOAL = {"ratio_vs_peft_best": 3.0, "eval_loss_gap": 0.02, "peak_rss_ratio": 1.0}  # from the speed issue
RESULT_MARKER = "TRAIN_THROUGHPUT_RESULT "


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------


def default_configs(device: str) -> tuple[tuple[str, ...], str | None]:
    """The configurations run when --configs is not given, and why some are left out (None: none are).
    All of them where `device` computes bf16 natively; elsewhere not the bf16 PEFT ones."""
    from tailor.hardware import native_bf16

    if native_bf16(device):
        return ALL_CONFIGS, None
    return (tuple(c for c in ALL_CONFIGS if c not in BF16_PEFT_CONFIGS),
            f"skipped {', '.join(BF16_PEFT_CONFIGS)}: {device} has no native bf16, so their matmuls run "
            "~100x slower than fp32 (hours; PEFT's users here train in fp32). Name them in --configs to "
            "run them anyway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, ALL_CONFIGS, steps=20, train_examples=512, eval_examples=32, timeout=3600.0,
                    train_examples_help="first N examples of the training data (512 = 64 batches: one "
                                        "length-grouping chunk)",
                    configs_help="default: all, except peft-autocast-bf16 and peft-bf16 on a device without "
                                 "native bf16, where they take hours")
    p.add_argument("--peft-group-by-length", action="store_true",
                   help="give the PEFT loops tailor's length-grouped batches too (default: plain shuffled)")
    p.add_argument("--same-batches-variant", default=None, choices=PEFT_CONFIGS,
                   help=argparse.SUPPRESS)  # internal: which PEFT configuration peft-same-batches repeats
    p.set_defaults(configs=None)  # None: default_configs(device), which depends on the machine
    args = p.parse_args(argv)
    device = pick_device(args.device)
    args.skipped_configs = None
    if args.configs is None:
        defaults, args.skipped_configs = default_configs(device)
        args.configs = ",".join(defaults)
    if args.same_batches_variant is None:  # when no PEFT configuration ran to be the fastest
        from tailor.hardware import native_bf16

        args.same_batches_variant = "peft-autocast-bf16" if native_bf16(device) else "peft-fp32"
    args.config_list = config_list(p, args, ALL_CONFIGS)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    return args


# ------------------------------------------------------------------------------------------------------
# Shared pieces (run inside a child)
# ------------------------------------------------------------------------------------------------------


def evaluation_loss(model, eval_set: list, batch_size: int, pad_id: int, device: str,
                    autocast: bool) -> float:
    """Mean next-token cross-entropy over the supervised tokens of eval_set, from the model's own
    logits (identical for PEFT and tailor models, so their losses compare)."""
    import torch
    import torch.nn.functional as F

    from tailor.data import collate

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(eval_set), batch_size):
            batch = {k: v.to(device) for k, v in collate(eval_set[start:start + batch_size], pad_id).items()}
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]  # position t predicts token t+1
            total += float(F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                           ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    model.train()
    return total / max(count, 1)


def parameter_counts(model) -> dict[str, int]:
    """N_body (linear weights of the transformer body), N_head (output head), N_lora, trainable, total."""
    from torch import nn

    head = model.get_output_embeddings()
    n_head = head.weight.numel() if head is not None else 0
    n_body = 0
    n_lora = 0
    for name, module in model.named_modules():
        if module is head:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            if "lora_" in name:  # PEFT and tailor both name adapter matrices lora_A / lora_B
                n_lora += module.weight.numel()
            elif leaf not in ("lm_head",):
                n_body += module.weight.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"n_body": n_body, "n_head": n_head, "n_lora": n_lora, "trainable": trainable, "total": total}


def flops_per_token(counts: dict[str, int], supervised_share: float, full: bool,
                    computed_share: float = 1.0) -> float:
    """FLOPs per real token (see the module docstring for the formula). With computed_share < 1 (a shared
    prefix run once per batch) the body and adapter terms shrink: the FLOPs actually performed."""
    if full:
        return 6 * computed_share * counts["n_body"] + 6 * supervised_share * counts["n_head"]
    return (4 * computed_share * counts["n_body"] + 4 * supervised_share * counts["n_head"]
            + 6 * computed_share * counts["n_lora"])


def summarise(step_marks: list[tuple[float, float, int, int]], warmup: int, device: str) -> dict[str, Any]:
    """From (wall, cpu, real tokens, supervised tokens) at the end of each step (index 0 = before step 1),
    the timed window after `warmup` steps."""
    start, end = step_marks[warmup], step_marks[-1]
    wall, cpu = end[0] - start[0], end[1] - start[1]
    tokens = sum(mark[2] for mark in step_marks[warmup + 1:])
    supervised = sum(mark[3] for mark in step_marks[warmup + 1:])
    steps = len(step_marks) - 1 - warmup
    return {
        "timed_steps": steps, "tokens": tokens, "supervised_tokens": supervised,
        "tokens_per_s": round(tokens / wall, 2), "s_per_step": round(wall / steps, 3),
        "cpu_s_per_step": round(cpu / steps, 3) if not device.startswith("cuda") else None,
        "tokens_per_cpu_s": round(tokens / cpu, 2) if cpu > 0 and not device.startswith("cuda") else None,
        "supervised_share": round(supervised / max(tokens, 1), 4),
    }


# ------------------------------------------------------------------------------------------------------
# The configurations
# ------------------------------------------------------------------------------------------------------


def run_peft(args: argparse.Namespace, name: str, device: str) -> dict[str, Any]:
    """PEFT LoRA + the plain loop people write: HF loss on full logits, AdamW, clip, step.
    peft-same-batches repeats `--same-batches-variant` on tailor's length-grouped batches."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from tailor.data import batch_indices, collate
    from tailor.models import load_model
    from tailor.train.loop import clip_gradients, make_optimizer
    from tailor.train.run import seed_everything

    config = train_config(args, "lora", device, tempfile.mkdtemp(prefix="tt-peft-"))
    seed_everything(args.seed)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device=device)
    train_set, eval_set = load_data(args, tokenizer)
    seed_everything(args.seed)  # same adapter init as tailor's train() (it reseeds after data prep)
    dora_variant = "peft-autocast-bf16" if config.precision == "bf16" else "peft-fp32"  # tailor's precision
    variant = {SAME_BATCHES: args.same_batches_variant, "peft-dora": dora_variant}.get(name, name)
    if variant == "peft-bf16":
        model.to(torch.bfloat16)
    model.config.use_cache = False
    model = get_peft_model(model, PeftLoraConfig(
        r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM", use_dora=name == "peft-dora"))
    model.train()
    optimizer = make_optimizer(model, config)
    autocast = variant == "peft-autocast-bf16"
    pad_id = tokenizer.pad_token_id
    order = batch_indices([len(e) for e in train_set], args.batch_size, args.seed, 0,
                          group_by_length=args.peft_group_by_length or name == SAME_BATCHES)
    peak = TrainingPeak()
    peak.reset()

    marks = [(time.perf_counter(), time.process_time(), 0, 0)]
    loss_value = math.nan
    for step in range(args.warmup + args.steps):
        batch = {k: v.to(device) for k, v in
                 collate([train_set[i] for i in order[step % len(order)]], pad_id).items()}
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        clip_gradients(model, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)  # a host sync per step, as tailor's loop has
        synchronize(device)
        marks.append((time.perf_counter(), time.process_time(), int(batch["attention_mask"].sum()),
                      int((batch["labels"][:, 1:] != -100).sum())))
    result = summarise(marks, args.warmup, device)
    result.update(peak_rss_mib=peak_rss_mib(), train_peak_rss_mib=peak.read_mib())  # before evaluation
    result["last_train_loss"] = round(loss_value, 5)
    result["padding_share"] = padding_share(train_set, order[: args.warmup + args.steps])
    result["variant"] = variant
    counts = parameter_counts(model)
    result["eval_loss"] = round(evaluation_loss(model, eval_set, args.batch_size, pad_id, device,
                                                autocast), 5)
    result.update(params=counts,
                  flops_per_token=flops_per_token(counts, result["supervised_share"], full=False))
    return result


def padding_share(train_set: list, batches: list[list[int]]) -> float:
    real = sum(len(train_set[i]) for b in batches for i in b)
    padded = sum(max(len(train_set[i]) for i in b) * len(b) for b in batches)
    return round(1 - real / padded, 4)


def computed_share(train_set: list, batches: list[list[int]], share_prefix: bool) -> float:
    """Token positions the body actually computes per real token: 1.0 without prefix sharing; with it,
    a batch of B rows sharing P prefix tokens computes (B - 1) * P fewer (tailor.loss)."""
    from tailor.data import collate
    from tailor.loss import MIN_SHARED_PREFIX, shared_prefix_length

    real = computed = 0
    for b in batches:
        batch = collate([train_set[i] for i in b], pad_id=0)  # the mask, not the pad id, bounds the prefix
        real_in_batch = int(batch["attention_mask"].sum())
        real += real_in_batch
        computed += real_in_batch
        if share_prefix:
            prefix = shared_prefix_length(batch["input_ids"], batch["attention_mask"])
            if prefix >= MIN_SHARED_PREFIX:
                computed -= (len(b) - 1) * prefix
    return round(computed / max(real, 1), 4)


def run_tailor(args: argparse.Namespace, name: str, device: str) -> dict[str, Any]:
    """tailor's own path: the method object's prepare (precision policy + add_lora or unfreeze) and
    train.fit (the loss module, AdamW, the loop), exactly as `tailor train` calls them."""
    import torch

    from tailor.methods import get_method
    from tailor.models import load_model
    from tailor.train import fit
    from tailor.train.hooks import Hook, MetricsHook
    from tailor.train.run import seed_everything

    method = "full" if name == "tailor-full" else "lora"
    run_dir = tempfile.mkdtemp(prefix=f"tt-{name}-")
    config = train_config(args, method, device, run_dir, share_prefix=name != "tailor-no-prefix-sharing")
    if name == "tailor-dora":
        config = config.replace(use_dora=True)
    seed_everything(args.seed)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device=device)
    train_set, eval_set = load_data(args, tokenizer)
    seed_everything(args.seed)
    model = get_method(method).prepare(model, config)
    pad_id = tokenizer.pad_token_id

    # A hook after the metrics line stamps the clocks: the same "end of step" marks as the PEFT loop,
    # including the loop's own per-step work (no evaluation or checkpoint hooks: nothing to measure there).
    marks = [(time.perf_counter(), time.process_time(), 0, 0)]
    last = {"loss": math.nan}

    class StepClock(Hook):
        def on_step(self, run: Any, record: Any) -> None:
            synchronize(device)
            marks.append((time.perf_counter(), time.process_time(), record.tokens, 0))
            last["loss"] = record.loss

    peak = TrainingPeak()
    peak.reset()
    fit(model, train_set, [], config, Path(run_dir), pad_id, lambda _model, _dir: None,
        hooks=[MetricsHook(), StepClock()])
    memory = {"peak_rss_mib": peak_rss_mib(), "train_peak_rss_mib": peak.read_mib()}  # before evaluation
    result = summarise(marks, args.warmup, device)
    # supervised tokens per step are not in the metrics line; replay the loop's batch order to count them
    from tailor.train.loop import BatchStream

    lengths = [len(e) for e in train_set]
    stream = BatchStream(lengths, config.batch_size, config.seed, config.group_by_length)
    batches = [stream.next() for _ in range(args.warmup + args.steps)]
    supervised = sum(sum(1 for x in train_set[i].labels[1:] if x != -100)
                     for b in batches[args.warmup:] for i in b)
    result["supervised_tokens"] = supervised
    result["supervised_share"] = round(supervised / max(result["tokens"], 1), 4)
    result.update(memory)
    result["last_train_loss"] = round(float(last["loss"]), 5)
    result["padding_share"] = padding_share(train_set, batches)
    result["computed_share"] = computed_share(train_set, batches[args.warmup:], config.share_prefix)
    result["eval_loss"] = round(evaluation_loss(model, eval_set, args.batch_size, pad_id, device,
                                                autocast=config.precision == "bf16"), 5)
    counts = parameter_counts(model)
    result.update(params=counts, flops_per_token=flops_per_token(counts, result["supervised_share"],
                                                                 full=method == "full"))
    result["computed_flops_per_token"] = flops_per_token(counts, result["supervised_share"],
                                                         full=method == "full",
                                                         computed_share=result["computed_share"])
    return result


def child_main(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    set_threads(args.threads)
    import torch

    started = time.perf_counter()
    runner = run_peft if args.child in (*PEFT_CONFIGS, "peft-dora", SAME_BATCHES) else run_tailor
    try:
        result = runner(args, args.child, device)
        result["status"] = "ok"
    except ImportError as error:  # a piece (peft, tailor.train) is not installed / not written yet
        result = {"status": "unavailable", "error": f"{type(error).__name__}: {error}"}
    result.setdefault("peak_rss_mib", peak_rss_mib())
    if device.startswith("cuda"):  # the allocator's peak over the whole child: load, training, evaluation
        result["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result.update(config=args.child, device=device, threads=torch.get_num_threads(),
                  child_wall_s=round(time.perf_counter() - started, 1))
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------
# The parent: machine peak, one subprocess per configuration, table, JSON
# ------------------------------------------------------------------------------------------------------


def matmul_tflops(device: str, dtype_name: str, size: int = 2048,
                  min_seconds: float = 1.0) -> dict[str, float | None]:
    """Achieved TFLOPS of size x size matmuls (2 * size^3 FLOPs each): per wall second, and on CPU also
    per CPU second of this process (steady when other processes share the cores)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):  # kernel selection / first-touch
        a @ b
    synchronize(device)
    runs, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while True:
        a @ b
        runs += 1
        if runs % 4 == 0:
            synchronize(device)
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                flops = 2 * size**3 * runs / 1e12
                cpu = time.process_time() - cpu_started
                return {"wall": round(flops / elapsed, 4),
                        "cpu": round(flops / cpu, 4) if cpu > 0 and not device.startswith("cuda") else None}


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def fastest_peft(results: dict[str, dict[str, Any]]) -> str | None:
    """"PEFT best": the PEFT configuration (of the three plain ones) with the most tokens/s."""
    ok = [name for name in PEFT_CONFIGS if results.get(name, {}).get("status") == "ok"]
    return max(ok, key=lambda name: results[name]["tokens_per_s"]) if ok else None


def compare(results: dict[str, dict[str, Any]], peak_tflops: float,
            peak_tflops_per_cpu_s: float | None = None) -> dict[str, Any]:
    """PEFT best (fastest PEFT configuration), tailor / PEFT best, loss gap, memory, peak fraction.

    The fraction of the matmul peak (of the precision tailor runs in) is taken per wall second and, on
    CPU, per CPU second (model FLOPs per CPU second of the training process over matmul FLOPs per CPU
    second), which stays meaningful when other processes share the cores."""
    ok = {name: r for name, r in results.items() if r.get("status") == "ok"}
    for r in ok.values():
        # performed FLOPs: a shared prefix computed once is counted once (model FLOPs would count it
        # per row and could exceed what the hardware did)
        performed = r.get("computed_flops_per_token") or r["flops_per_token"]
        r["model_tflops"] = round(r["tokens_per_s"] * r["flops_per_token"] / 1e12, 4)
        r["achieved_tflops"] = round(r["tokens_per_s"] * performed / 1e12, 4)
        r["fraction_of_peak"] = (round(r["achieved_tflops"] / peak_tflops, 4)
                                      if peak_tflops else None)
        if peak_tflops_per_cpu_s and r.get("tokens_per_cpu_s"):
            per_cpu = r["tokens_per_cpu_s"] * performed / 1e12
            r["fraction_of_peak_per_cpu_s"] = round(per_cpu / peak_tflops_per_cpu_s, 4)
    best = fastest_peft(results)
    out: dict[str, Any] = {"peft_best": best, "ratio_vs_peft_best": None}
    if best and "tailor" in ok:
        tailor, reference = ok["tailor"], ok[best]

        def ratio(key: str, against: dict[str, Any] = reference) -> float | None:
            if not tailor.get(key) or not against.get(key):
                return None
            return round(tailor[key] / against[key], 4)

        out["ratio_vs_peft_best"] = ratio("tokens_per_s")
        out["cpu_ratio_vs_peft_best"] = ratio("tokens_per_cpu_s")
        out["eval_loss_gap_vs_peft_best"] = round(ratio("eval_loss") - 1, 4)
        if "peft-fp32" in ok:
            out["eval_loss_gap_vs_peft_fp32"] = round(ratio("eval_loss", ok["peft-fp32"]) - 1, 4)
        out["peak_rss_ratio_vs_peft_best"] = ratio("peak_rss_mib")
        same = ok.get(SAME_BATCHES)
        if same:
            out["eval_loss_gap_vs_peft_same_batches"] = round(ratio("eval_loss", same) - 1, 4)
            out["ratio_vs_peft_same_batches"] = ratio("tokens_per_s", same)
        if "tailor-no-prefix-sharing" in ok:
            out["prefix_sharing_speedup"] = ratio("tokens_per_s", ok["tailor-no-prefix-sharing"])
        if "tailor-dora" in ok:  # DoRA's step time over LoRA's, each in its own library
            out["dora_step_time_vs_lora"] = round(ok["tailor-dora"]["s_per_step"] / tailor["s_per_step"], 4)
            if "peft-dora" in ok:
                out["tailor_dora_vs_peft_dora"] = round(ok["tailor-dora"]["tokens_per_s"]
                                                        / ok["peft-dora"]["tokens_per_s"], 4)
        gap = out.get("eval_loss_gap_vs_peft_same_batches", out["eval_loss_gap_vs_peft_best"])
        out["goal"] = {
            "tokens_per_s": out["ratio_vs_peft_best"] >= GOAL["ratio_vs_peft_best"],
            "eval_loss": abs(gap) <= GOAL["eval_loss_gap"],
            "peak_rss": (out["peak_rss_ratio_vs_peft_best"] or math.inf) <= GOAL["peak_rss_ratio"],
            "loss_compared_with": SAME_BATCHES if same else best,
        }
        out["tailor_fraction_of_peak"] = tailor["fraction_of_peak"]
        out["tailor_fraction_of_peak_per_cpu_s"] = tailor.get("fraction_of_peak_per_cpu_s")
    peft_lora = ok.get(results.get("peft-dora", {}).get("variant"))  # PEFT's LoRA in the same precision
    if "peft-dora" in ok and peft_lora:
        out["peft_dora_step_time_vs_lora"] = round(ok["peft-dora"]["s_per_step"] / peft_lora["s_per_step"], 4)
    return out


COLUMNS = (("tokens_per_s", "10.1f"), ("s_per_step", "9.2f"), ("tokens_per_cpu_s", "11.1f"),
           ("peak_rss_mib", "14.0f"), ("train_peak_rss_mib", "11.0f"), ("eval_loss", "11.4f"),
           ("last_train_loss", "11.4f"), ("padding_pct", "7.1f"), ("peak_pct", "8.1f"),
           ("peak_cpu_pct", "10.1f"))


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = (f"{'configuration':<20}{'tokens/s':>10}{'s/step':>9}{'tok/cpu-s':>11}{'peak RSS MiB':>14}"
              f"{'train RSS':>11}{'eval loss':>11}{'last loss':>11}{'pad %':>7}{'%peak':>8}{'%peak/cpu':>10}")
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        r = {**result, "padding_pct": 100 * result.get("padding_share", 0),
             "peak_pct": 100 * (result.get("fraction_of_peak") or 0),
             "peak_cpu_pct": 100 * (result.get("fraction_of_peak_per_cpu_s") or 0)}
        if r.get("status") != "ok":
            lines.append(f"{name:<20}{r.get('status', 'failed')}: {r.get('error', '')}"[:200])
            continue

        cells = [format(r[key], fmt) if isinstance(r.get(key), (int, float))
                 else "-".rjust(int(fmt.split(".")[0])) for key, fmt in COLUMNS]
        lines.append(f"{name:<20}" + "".join(cells))
    return "\n".join(lines)


def parent_main(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    device = pick_device(args.device)
    set_threads(args.threads)
    machine = print_machine(device)
    if args.skipped_configs:
        print(args.skipped_configs, flush=True)
    # bf16 at 2048 takes ~13 s a matmul where bf16 is not native (6 of them here); 512 is as telling there
    bf16_size = 2048 if machine["native_bf16"] else 512
    peak = {"bfloat16": matmul_tflops(device, "bfloat16", bf16_size),
            "float32": matmul_tflops(device, "float32")}
    load_before = load_average()
    results: dict[str, dict[str, Any]] = {}
    for name in [c for c in args.config_list if c != SAME_BATCHES]:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_child(__file__, name, argv, args.timeout, RESULT_MARKER)
    if SAME_BATCHES in args.config_list:  # repeats whichever PEFT configuration was fastest
        fastest = fastest_peft(results) or args.same_batches_variant
        print(f"[{time.strftime('%H:%M:%S')}] {SAME_BATCHES} ({fastest}) ...", file=sys.stderr, flush=True)
        results[SAME_BATCHES] = run_child(__file__, SAME_BATCHES, [*argv, "--same-batches-variant", fastest],
                                          args.timeout, RESULT_MARKER)
    peak_dtype = "bfloat16" if machine["precision"] == "bf16" else "float32"  # what tailor computes in here
    summary = compare(results, peak[peak_dtype]["wall"], peak[peak_dtype]["cpu"])
    report = {
        **machine,
        "peak_dtype": peak_dtype,
        "skipped_configs": args.skipped_configs,
        "tokens_per_s": {n: r.get("tokens_per_s") for n, r in results.items()},
        **summary,
        "matmul_tflops": {"bf16": peak["bfloat16"]["wall"], "fp32": peak["float32"]["wall"],
                          "bf16_per_cpu_s": peak["bfloat16"]["cpu"], "fp32_per_cpu_s": peak["float32"]["cpu"],
                          "size": 2048, "bf16_size": bf16_size},
        "settings": {k: getattr(args, k) for k in (
            "model", "data", "steps", "warmup", "batch_size", "max_seq_len", "rank", "lora_alpha", "lr",
            "seed", "train_examples", "eval_examples", "peft_group_by_length")},
        "machine": {"device": device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                    "load_average_before": load_before, "load_average_after": load_average()},
        "flops_formula": {"lora": "4*N_body + 4*s*N_head + 6*N_lora", "full": "6*N_body + 6*s*N_head",
                          "note": "per real token; s = supervised share (PEFT computes the head on every "
                                  "token but only s of it is useful work, so the same formula is used)"},
        "configs": results,
    }
    print(format_table(results))
    print(f"\nbf16 matmul ({device}, {bf16_size}^2, {torch.get_num_threads()} threads): "
          f"{peak['bfloat16']['wall']:.3f} TFLOPS (fp32 at 2048^2 {peak['float32']['wall']:.3f}); "
          f"per CPU-second {peak['bfloat16']['cpu'] or 0:.3f} (fp32 {peak['float32']['cpu'] or 0:.3f}); "
          f"load average {load_before} -> {report['machine']['load_average_after']}")
    if summary["peft_best"]:
        print(f"PEFT best: {summary['peft_best']}")
    if summary.get("ratio_vs_peft_best") is not None:
        cpu_ratio = summary.get("cpu_ratio_vs_peft_best")
        print(f"tailor / PEFT best tokens/s: {summary['ratio_vs_peft_best']:.2f}x"
              + (f" (per CPU-second {cpu_ratio:.2f}x)" if cpu_ratio else "")
              + f"; eval loss {100 * summary['eval_loss_gap_vs_peft_best']:+.2f}% vs PEFT best; peak RSS "
              f"{summary['peak_rss_ratio_vs_peft_best']:.2f}x; tailor reaches "
              f"{100 * (summary['tailor_fraction_of_peak'] or 0):.1f}% of the {report['peak_dtype']} matmul "
              "peak "
              f"({100 * (summary['tailor_fraction_of_peak_per_cpu_s'] or 0):.1f}% per CPU-second) "
              f"(FLOPs/token: LoRA 4*N_body + 4*s*N_head + 6*N_lora)")
    if summary.get("eval_loss_gap_vs_peft_same_batches") is not None:
        print(f"eval loss vs {SAME_BATCHES} (PEFT on tailor's batches): "
              f"{100 * summary['eval_loss_gap_vs_peft_same_batches']:+.2f}%; tailor / {SAME_BATCHES} "
              f"tokens/s {summary['ratio_vs_peft_same_batches']:.2f}x")
    if summary.get("prefix_sharing_speedup") is not None:
        print(f"shared prefix once per batch: {summary['prefix_sharing_speedup']:.2f}x tokens/s "
              "(tailor vs tailor-no-prefix-sharing)")
    if summary.get("dora_step_time_vs_lora") is not None:
        line = f"DoRA step time / LoRA step time: tailor {summary['dora_step_time_vs_lora']:.2f}x"
        if summary.get("peft_dora_step_time_vs_lora") is not None:
            line += (f", PEFT {summary['peft_dora_step_time_vs_lora']:.2f}x "
                     f"({report['configs']['peft-dora']['variant']})")
        if summary.get("tailor_dora_vs_peft_dora") is not None:
            line += f"; tailor-dora / peft-dora tokens/s {summary['tailor_dora_vs_peft_dora']:.2f}x"
        print(line)
    if summary.get("goal"):
        goal = summary["goal"]
        print("goal (>= 3x PEFT best, loss within 2%, RSS <= PEFT best): "
              + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in goal.items() if isinstance(v, bool))
              + f" (loss compared with {goal['loss_compared_with']})")
    if args.json_path:
        from tailor.files import atomic_write_json

        atomic_write_json(args.json_path, report)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return None
    return parent_main(args, argv)


if __name__ == "__main__":
    main()
