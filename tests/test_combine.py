"""Adapter combination against the explicit weighted sum of the deltas, sum_i w_i s_i B_i A_i per module.

Each parent's delta comes from PEFT (PeftModel.from_pretrained + get_delta_weight: the field's reference
for alpha / r, rsLoRA's alpha / sqrt(r), rank_pattern and alpha_pattern), never from the code under test.
The parents differ in rank, alpha, rsLoRA, per-module patterns and target sets, and one weight is negative.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from typer.testing import CliRunner

import tailor
from tailor.adapters import load_adapter, read_metadata, save_adapter
from tailor.adapters.combine import CombineError, combine_adapters
from tailor.adapters.store import AdapterStore
from tailor.cli import app
from tailor.lora import LoraConfig, add_lora, lora_layers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

EXACT = 1e-5
PARENTS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=2, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "c": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"],
              rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 12}),
    "d": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]),
}


def make_adapter(path: Path, config: dict, seed: int, base_seed: int = 0) -> Path:
    model = tiny_llama(base_seed)
    add_lora(model, LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for param in layer.adapter_parameters("default"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return save_adapter(model, path)


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parents")
    made = {name: make_adapter(root / name, config, seed)
            for seed, (name, config) in enumerate(PARENTS.items())}
    made["other_base"] = make_adapter(root / "other_base", PARENTS["a"], 9, base_seed=1)
    return made


def peft_model(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_llama(0), str(path)).eval()


def peft_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{module path: delta} of an adapter, computed by PEFT."""
    deltas = {}
    for name, module in peft_model(path).named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
    return deltas


def weighted_sum(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * delta_i per module; a module an adapter lacks contributes zero."""
    total: dict[str, torch.Tensor] = {}
    for path, weight in zip(paths, weights, strict=True):
        for module, delta in peft_deltas(path).items():
            total[module] = total.get(module, torch.zeros_like(delta)) + weight * delta
    return total


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_against_sum(out: Path, paths: list[Path], weights: list[float]) -> dict[str, float]:
    """The combined adapter, as PEFT loads it, per module: relative error against the weighted sum."""
    expected, got = weighted_sum(paths, weights), peft_deltas(out)
    assert set(got) == set(expected)
    return {m: relative(got[m], expected[m]) for m in expected}


def max_abs(out: Path, paths: list[Path], weights: list[float]) -> float:
    expected, got = weighted_sum(paths, weights), peft_deltas(out)
    assert set(got) == set(expected)
    return max(float((got[m] - expected[m]).abs().max()) for m in expected)


# ------------------------------------------------------------------------------------------------ exact
def test_cat_is_exact_across_ranks_alphas_rslora_patterns_targets_and_a_negative_weight(parents, tmp_path):
    paths, weights = [parents["a"], parents["b"], parents["c"]], [0.7, -0.3, 1.5]
    result = combine_adapters(paths, weights, "cat", tmp_path / "cat")
    assert max_abs(tmp_path / "cat", paths, weights) <= EXACT
    assert result.exact and result.error <= 1e-7
    assert result.rank == 4 + 2 + 4  # the rank is the sum of the ranks (q_proj has all three)
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 10 and not config["use_rslora"]  # scaling 1, folded in
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}  # plain for every runtime


def test_svd_at_full_rank_is_exact(parents, tmp_path):
    paths, weights = [parents["a"], parents["b"], parents["c"]], [0.7, -0.3, 1.5]
    result = combine_adapters(paths, weights, "svd", tmp_path / "svd", rank=10)
    assert max_abs(tmp_path / "svd", paths, weights) <= EXACT
    assert result.exact


def test_svd_truncated_error_is_the_printed_error(parents, tmp_path):
    paths, weights = [parents["a"], parents["b"], parents["c"]], [0.7, -0.3, 1.5]
    result = combine_adapters(paths, weights, "svd", tmp_path / "svd3", rank=3)
    measured = check_against_sum(tmp_path / "svd3", paths, weights)
    reported = {layer.module: layer.error for layer in result.layers}
    for module, error in measured.items():
        assert error == pytest.approx(reported[module], abs=1e-6), module
    assert max(measured.values()) > 1e-2  # the cut is real: rank 3 < the 10 of q_proj
    # overall: sqrt(sum ||E||^2 / sum ||dW||^2), recomputed from PEFT's deltas
    expected, got = weighted_sum(paths, weights), peft_deltas(tmp_path / "svd3")
    overall = (sum(float((got[m] - expected[m]).norm() ** 2) for m in expected)
               / sum(float(expected[m].norm() ** 2) for m in expected)) ** 0.5
    assert overall == pytest.approx(result.error, abs=1e-6)
    assert not result.exact


def test_linear_of_one_adapter_is_exact_task_negation(parents, tmp_path):
    result = combine_adapters([parents["b"]], [-1.0], "linear", tmp_path / "neg")
    assert max_abs(tmp_path / "neg", [parents["b"]], [-1.0]) <= EXACT
    assert result.exact


# ------------------------------------------------------------------------------------------------ approximate
def test_linear_of_two_is_approximate_and_reports_its_deviation(parents, tmp_path):
    paths, weights = [parents["a"], parents["d"]], [0.6, -0.4]  # same rank 4; d uses rsLoRA
    result = combine_adapters(paths, weights, "linear", tmp_path / "lin")
    measured = check_against_sum(tmp_path / "lin", paths, weights)
    for layer in result.layers:
        assert measured[layer.module] == pytest.approx(layer.error, abs=1e-6)
    assert result.error > 0.1 and not result.exact  # the cross terms B_i A_j


def test_linear_refuses_mixed_ranks(parents, tmp_path):
    with pytest.raises(CombineError, match="same rank.*cat.*svd"):
        combine_adapters([parents["a"], parents["b"]], [0.5, 0.5], "linear", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_report_their_deviation_from_the_weighted_sum(parents, method, tmp_path):
    paths, weights = [parents["a"], parents["b"], parents["c"]], [0.7, -0.3, 1.5]
    result = combine_adapters(paths, weights, method, tmp_path / method, density=0.5)
    measured = check_against_sum(tmp_path / method, paths, weights)
    for layer in result.layers:
        assert measured[layer.module] == pytest.approx(layer.error, abs=1e-6)
        assert 0.0 < layer.truncation < 1.0  # the pruned update is full rank: the cut is reported too
    assert result.error > 0.05  # approximate by design


def test_dare_is_seeded(parents, tmp_path):
    paths, weights = [parents["a"], parents["b"]], [0.5, 0.5]
    for name, seed in (("s0", 0), ("s0b", 0), ("s1", 1)):
        combine_adapters(paths, weights, "dare", tmp_path / name, seed=seed)
    tensors = {n: load_file(tmp_path / n / "adapter_model.safetensors") for n in ("s0", "s0b", "s1")}
    assert all(torch.equal(tensors["s0"][k], tensors["s0b"][k]) for k in tensors["s0"])
    assert any(not torch.equal(tensors["s0"][k], tensors["s1"][k]) for k in tensors["s0"])


def test_dare_at_density_one_and_ties_of_one_adapter_are_exact(parents, tmp_path):
    paths, weights = [parents["a"], parents["c"]], [0.7, -1.2]
    combine_adapters(paths, weights, "dare", tmp_path / "dare1", density=1.0)  # rank: sum of ranks
    assert max_abs(tmp_path / "dare1", paths, weights) <= EXACT
    combine_adapters([parents["c"]], [0.8], "ties", tmp_path / "ties1", density=1.0)
    assert max_abs(tmp_path / "ties1", [parents["c"]], [0.8]) <= EXACT


# ------------------------------------------------------------------------------------------------ the output
def test_output_loads_in_peft_and_tailor_with_equal_logits(parents, tmp_path, input_ids):
    out = tmp_path / "cat"
    combine_adapters([parents["a"], parents["b"], parents["c"]], [0.7, -0.3, 1.5], "cat", out)
    with torch.no_grad():
        theirs = peft_model(out)(input_ids).logits
        model = tiny_llama(0)
        load_adapter(model, out)
        ours = model(input_ids).logits
        base = tiny_llama(0)(input_ids).logits
    assert (theirs - ours).abs().max().item() <= EXACT
    assert (ours - base).abs().max().item() > 1e-2  # the combination changes the output


def test_metadata_names_parents_weights_and_errors_and_the_store_keeps_the_lineage(parents, tmp_path):
    store = AdapterStore(tmp_path / "store")
    ref_a, _ = store.add("support", parents["a"])
    ref_b, _ = store.add("billing", parents["b"])
    out = tmp_path / "mix"
    combine_adapters([store.resolve(ref_a), store.resolve(ref_b)], [0.7, 0.3], "svd", out, rank=3,
                     store=store.root)
    metadata = read_metadata(out)
    assert [(p["ref"], p["weight"]) for p in metadata["parents"]] == [(ref_a, 0.7), (ref_b, 0.3)]
    assert metadata["combination"]["method"] == "svd" and metadata["combination"]["rank"] == 3
    assert metadata["base"] == read_metadata(parents["a"])["base"]  # the parents' base fingerprint
    ref, _ = store.add("mix", out)
    record = store.info(ref)["record"]
    assert [(p["ref"], p["weight"]) for p in record["parents"]] == [(ref_a, 0.7), (ref_b, 0.3)]
    lineage = store.lineage(ref)
    assert lineage[0].startswith("mix@1") and any("support@1" in line for line in lineage[1:])


def test_public_api(parents, tmp_path):
    result = tailor.combine_adapters([parents["a"]], [2.0], "cat", tmp_path / "double")
    assert result.exact


# ------------------------------------------------------------------------------------------------ bad input
def test_adapters_of_different_bases_are_refused_naming_both(parents, tmp_path):
    with pytest.raises(CombineError, match="different bases") as caught:
        combine_adapters([parents["a"], parents["other_base"]], [0.5, 0.5], "cat", tmp_path / "x")
    assert str(parents["a"]) in str(caught.value) and str(parents["other_base"]) in str(caught.value)
    assert not (tmp_path / "x").exists()
    combine_adapters([parents["a"], parents["other_base"]], [0.5, 0.5], "cat", tmp_path / "x", force=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=[0.5]), "2 adapter\\(s\\) but 1 weight"),
    (dict(method="mean"), "method 'mean' is not one of cat, linear, svd, ties, dare"),
    (dict(rank=4), "--rank applies to svd"),
    (dict(method="svd", rank=0), "rank 0 must be a positive integer"),
    (dict(weights=[0.5, float("nan")]), "finite numbers"),
    (dict(method="ties", density=0.0), "density"),
])
def test_bad_arguments_are_refused_before_any_work(parents, tmp_path, kwargs, message):
    args = dict(dirs=[parents["a"], parents["b"]], weights=[0.5, 0.5], method="cat", out=tmp_path / "x")
    args.update(kwargs)
    with pytest.raises(CombineError, match=message):
        combine_adapters(**args)
    assert not (tmp_path / "x").exists()


def test_an_out_that_holds_other_files_is_left_alone(parents, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CombineError, match="not empty"):
        combine_adapters([parents["a"]], [1.0], "cat", out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(CombineError, match="one of the input adapters"):
        combine_adapters([parents["a"]], [1.0], "cat", parents["a"])
    combine_adapters([parents["a"]], [1.0], "cat", tmp_path / "again")  # an earlier combination is replaced
    combine_adapters([parents["a"]], [2.0], "cat", tmp_path / "again")
    assert read_metadata(tmp_path / "again")["parents"][0]["weight"] == 2.0


def test_modules_to_save_is_refused(tmp_path):
    model = tiny_llama(0)
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    save_adapter(model, tmp_path / "mts")
    with pytest.raises(CombineError, match="modules_to_save"):
        combine_adapters([tmp_path / "mts"], [1.0], "cat", tmp_path / "x")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_combines_with_many_values_and_a_negative_weight(parents, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["combine", "--adapters", str(parents["a"]), str(parents["c"]),
                                 "--weights", "0.7", "-0.3", "--method", "svd", "--rank", "3",
                                 "--out", str(out), "--store", str(tmp_path / "store"), "--register", "mix"])
    assert result.exit_code == 0, result.output
    assert "overall relative error" in result.output and "model.layers.0.self_attn.q_proj" in result.output
    assert "registered as mix@1" in result.output
    assert read_metadata(out)["combination"]["weights"] == [0.7, -0.3]


def test_cli_bad_input_is_one_error_without_traceback(parents, tmp_path):
    result = runner.invoke(app, ["combine", "--adapters", str(parents["a"]), str(tmp_path / "missing"),
                                 "--weights", "0.5", "0.5", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "error:" in result.output and "missing" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
