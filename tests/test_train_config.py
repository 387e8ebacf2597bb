"""TrainConfig: YAML + overrides, unknown keys refused, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailor.cli.flags import field_docs
from tailor.config import ConfigError, Sections, TrainConfig, field_names, load_config, save_config
from tailor.config.sections import SECTIONS

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"demo.yaml", "lora.yaml", "full.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_parse(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert config.data


def test_every_field_has_a_doc_line():
    docs = {name: doc for cls in SECTIONS.values() for name, doc in field_docs(cls).items()}
    assert set(docs) == set(field_names())
    assert all(docs.values())
    assert docs["rank"] == "LoRA rank r."


def test_sections_hold_the_flat_names_users_write():
    config = TrainConfig(rank=8, lr=1e-4, precision="bf16", model="m", data="d.jsonl", strategy="fsdp")
    assert config.sections.lora.rank == config.rank == 8
    assert config.sections.optimization.lr == config.lr == 1e-4
    assert config.sections.precision.precision == config.precision == "bf16"
    assert config.sections.model.model == config.model == "m"
    assert config.sections.data.data == config.data == "d.jsonl"
    assert config.sections.distributed.strategy == "fsdp"
    assert list(SECTIONS) == [f for f in Sections.__dataclass_fields__]
    assert len(field_names()) == len(set(field_names())) == 63  # each flat name in one section
    with pytest.raises(AttributeError, match="no field 'rnak'"):
        config.rnak  # noqa: B018 - a misspelt name is an error, not a fall-through
    with pytest.raises(TypeError, match="unknown field"):
        TrainConfig(rnak=4)


def test_config_is_immutable_and_replace_makes_a_copy():
    config = TrainConfig(data="d.jsonl")
    with pytest.raises(AttributeError, match="replace"):
        config.rank = 4
    changed = config.replace(rank=4)
    assert (config.rank, changed.rank) == (16, 4)
    assert changed.replace(rank=16) == config


def test_validate_changes_nothing_and_lr_is_the_methods_default_from_the_start():
    config = TrainConfig(method="full", data="x")
    assert config.lr == 2e-5  # fixed when made, not by validate
    before = config.to_dict()
    assert config.validate() is config and config.to_dict() == before


def test_a_saved_config_loads_again_unchanged(tmp_path):
    """config.yaml (flat, as runs have always written it) is what --resume, eval and the UI read."""
    config = load_config(data="builtin:support", rank=4, target_modules=["q_proj"], adam_betas=[0.9, 0.95])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    old = tmp_path / "old.yaml"  # a run's config.yaml from before the sections: the same flat keys
    old.write_text("method: lora\nmodel: SmolLM2-135M-Instruct\ndata: builtin:support\nrank: 4\nlr: 0.0002\n"
                   "precision: fp32\nstrategy: ddp\nresume: false\nadam_betas: [0.9, 0.999]\n")
    assert load_config(old).to_dict() == {**TrainConfig(data="builtin:support", rank=4, precision="fp32")
                                          .to_dict()}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: a.jsonl\nlr: 2e-4\nrank: 4\ntarget_modules: [q_proj, v_proj]\nepochs: 2\n")
    config = load_config(path, rank=8, lr=None, out=str(tmp_path / "run"))
    assert config.lr == 2e-4 and isinstance(config.lr, float)  # YAML 1.1 reads 2e-4 as a string
    assert config.rank == 8  # the flag wins
    assert config.epochs == 2.0 and isinstance(config.epochs, float)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.run_dir() == tmp_path / "run"


def test_unknown_key_refused_with_line_and_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: a.jsonl\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}:2: unknown key 'learning_rate'" in message
    assert "valid keys:" in message and "lr" in message


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(data="a.jsonl", method="qlora", rank=0, lr=-1.0, schedule="step", val_fraction=1.5)
    message = str(info.value)
    for needle in ("method: 'qlora' is not one of lora, full", "rank: 0 must be a positive integer",
                   "lr: -1.0 must be > 0", "schedule: 'step'", "val_fraction: 1.5"):
        assert needle in message


def test_wrong_types_refused():
    with pytest.raises(ConfigError, match="batch_size: 'eight' is not a int"):
        load_config(data="a.jsonl", batch_size="eight")


def test_missing_data_says_how():
    with pytest.raises(ConfigError, match="builtin:support"):
        load_config()


def test_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_default_run_dir_from_name():
    config = load_config(data="builtin:support")
    assert config.run_dir() == Path("runs") / "lora-support"


def test_demo_yaml_is_the_demo_recipe():
    from tailor.config import read_yaml_config
    from tailor.train.demo import DEMO_RECIPE

    path = Path(__file__).parents[1] / "examples" / "demo.yaml"
    assert read_yaml_config(path) == DEMO_RECIPE


def test_set_assignments_are_yaml():
    from tailor.config import parse_assignments

    assert parse_assignments(["lr=1e-4", "target_modules=[q_proj, v_proj]", "keep_best=false"]) == {
        "lr": "1e-4", "target_modules": ["q_proj", "v_proj"], "keep_best": False}
    assert load_config(data="a.jsonl", **parse_assignments(["lr=1e-4"])).lr == 1e-4
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        parse_assignments(["lr"])


@pytest.mark.parametrize(("fields", "message"), [
    ({"replay_loss": "mse", "replay_ratio": 0.2}, "replay_loss: 'mse' is not one of ce, kl"),
    ({"replay_loss": "kl"}, "replay_ratio is 0; set replay_ratio"),
    ({"replay_loss": "kl", "replay_ratio": 0.2, "method": "full"}, "method full has none"),
    ({"replay_loss": "kl", "replay_ratio": 0.2, "strategy": "fsdp"}, "use strategy ddp or replay_loss ce"),
])
def test_replay_loss_choices_and_what_kl_needs(fields, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data="builtin:support", **fields)
    assert load_config(data="builtin:support", replay_loss="kl", replay_ratio=0.2).replay_loss == "kl"
