"""Bad input wherever a path enters: data, config, --out, adapter, model.

One case per (entry point, kind of bad thing): missing; a file where a directory goes or the reverse;
unreadable; empty; corrupt; an adapter whose weights are not finite. Each must end in one `error: ...`
block (exit code 2) or the module's error type, naming the path and the fix, with no traceback, and must
leave every file the user had exactly as it was (nothing overwritten, nothing half-written left behind).

Tests run as root, so chmod cannot make a file unreadable: "unreadable" is a FIFO (not a regular file),
or Path.read_text / os.access patched to refuse the one path under test.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_dir, write_arithmetic_jsonl
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tailor.adapters import AdapterFormatError, load_adapter, save_adapter
from tailor.cli import app
from tailor.config import ConfigError, load_config, read_yaml_config
from tailor.data import DataError, load_examples
from tailor.files import OutputPathError
from tailor.lora import LoraConfig, add_lora, lora_configs
from tailor.models import GGUFConversionError, ModelLoadError, ModelNotFoundError, load_model, resolve_model
from tailor.train.run import check_run_dir

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------
# The user's world: a tiny model, training data, an adapter (built once, copied into each case)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    model_dir = tiny_model_dir(root / "model")
    data = write_arithmetic_jsonl(root / "train.jsonl", n=16)
    model, _ = load_model(str(model_dir), device="cpu")
    add_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                               base_model_name_or_path=str(model_dir)))
    with torch.no_grad():  # non-zero B so the adapter is not a no-op
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    adapter = save_adapter(model, root / "adapter")
    return {"model": model_dir, "data": data, "adapter": adapter}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """GGUF conversions go to a cache outside the case's directory (whose snapshot must not change)."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path_factory.mktemp("cache")))


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root`: file bytes, "<dir>", or "<special>" (a FIFO is never opened)."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            found[key] = "<special>"
        elif path.is_dir():
            found[key] = "<dir>"
        else:
            found[key] = path.read_bytes()
    return found


# ------------------------------------------------------------------------------------------------------
# Ways to make things bad
# ------------------------------------------------------------------------------------------------------


def copy_of(world: dict[str, Path], what: str, tmp: Path) -> Path:
    target = tmp / what
    shutil.copytree(world[what], target)
    return target


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def empty_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def refuse_reading(monkeypatch, target: Path) -> None:
    """Path.read_text raises PermissionError for `target` only: what a root-run test can do for 0o000."""
    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if Path(self) == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)


def refuse_writing(monkeypatch, target: Path) -> None:
    """os.access says "no" for writing in `target` only."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == target and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def set_weight(adapter: Path, value: float, key_part: str = "q_proj.lora_A") -> str:
    """Put `value` into one tensor of the adapter's safetensors file; returns that tensor's name."""
    weights = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in weights if key_part in k)[0]
    weights[key][0, 0] = value
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return key


def truncate(path: Path, keep: int | None = None) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])
    return path


# ------------------------------------------------------------------------------------------------------
# The table: (entry point, kind) -> a CLI call that must fail cleanly
# ------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    args: list[str]
    path: Path  # must appear in the message
    fix: str  # a phrase of the fix that must appear in the message
    problem: str = ""  # a phrase saying what is wrong


def train_args(world, tmp: Path, **over) -> list[str]:
    values = {"--model": str(world["model"]), "--data": str(world["data"]), "--out": str(tmp / "run")}
    values.update({k: str(v) for k, v in over.items() if not k.startswith("_")})
    args = ["train", *over.get("_config", [])]
    for flag, value in values.items():
        args += [flag, value]
    return args + ["--set", "max_steps=1", "--set", "progress=false", "--set", "num_threads=1"]


def generate_args(model: Path | str, adapter: Path | None = None) -> list[str]:
    return ["generate", "--model", str(model), *(["--adapter", str(adapter)] if adapter else []),
            "--max-new-tokens", "1", "hi"]


def _data(kind: str):
    def build(world, tmp, monkeypatch) -> Case:
        flag = "--val-data" if kind.startswith("val ") else "--data"
        name = kind.removeprefix("val ")
        path = tmp / "data.jsonl"
        fix, problem = "give the path to a data file (.jsonl, .json, .csv, .parquet)", ""
        if name == "missing":
            problem = "not found"
        elif name == "directory":
            path, problem = empty_dir(tmp / "datadir"), "is a directory with no data files in it"
            fix = "put .jsonl, .json, .csv, .parquet files in it"
        elif name == "directory of other files":
            path = empty_dir(tmp / "datadir")
            shutil.copy(world["data"], path / "train.txt")
            fix = "put .jsonl, .json, .csv, .parquet files in it"
            problem = "is a directory with no data files"
        elif name == "fifo":
            path, problem = fifo(path), "not a regular file"
        elif name == "unreadable":
            write(path, world["data"].read_text())
            refuse_reading(monkeypatch, path)
            fix, problem = "check that the file exists and that you may read it", "Permission denied"
        elif name == "empty":
            write(path, "")
            fix, problem = "add one JSON object per line", "the file is empty"
        elif name == "blank lines":
            write(path, "\n  \n\n")
            fix, problem = "add one JSON object per line", "the file is empty"
        elif name == "corrupt json":
            write(path, '{"messages": [{"role": "user", "content": "hi"}\n')
            fix, problem = "each line must hold one complete JSON object", "not valid JSON"
        elif name == "unclosed array":
            write(path, '[{"text": "a"},\n{"text": "b"}\n')
            fix, problem = "close the array", "not closed"
        elif name == "not utf-8":
            write(path, b"\xff\xfe\x00garbage")
            fix, problem = "save the file as UTF-8", "not UTF-8"
        elif name == "one example":  # nothing left to train on once a validation split is held out
            write(path, world["data"].read_text().splitlines()[0] + "\n")
            fix, problem = "pass --val-data FILE", "too few to hold out a validation split"
        else:  # pragma: no cover
            raise AssertionError(name)
        return Case(train_args(world, tmp, **{flag: path}), path, fix, problem)
    return build


def _config(kind: str):
    def build(world, tmp, monkeypatch) -> Case:
        path = tmp / "config.yaml"
        fix, problem = "YAML file of TrainConfig fields", ""
        if kind == "missing":
            problem = "not found"
        elif kind == "directory":
            path, problem = empty_dir(tmp / "configs"), "is a directory"
        elif kind == "unreadable":
            write(path, "rank: 4\n")
            refuse_reading(monkeypatch, path)
            fix, problem = "Check that you may read it", "Permission denied"
        elif kind == "empty":
            write(path, "")
            fix, problem = "leave the config argument out", "empty"
        elif kind == "only comments":
            write(path, "# rank: 4\n")
            fix, problem = "leave the config argument out", "empty"
        elif kind == "corrupt yaml":
            write(path, "rank: 4\ntarget_modules: [q_proj, v_proj\n")
            fix, problem = "quote values", "not valid YAML"
        elif kind == "not utf-8":
            write(path, b"\xff\xfe\x00rank: 4")
            fix, problem = "Save it as UTF-8", "not UTF-8"
        elif kind == "a list":
            write(path, "- rank: 4\n")
            fix, problem = "one `field: value` per line", "must be a mapping"
        elif kind == "a model's config.json":
            path = copy_of(world, "model", tmp) / "config.json"
            fix, problem = "--model", "not a training config"
        elif kind == "training data":
            path = tmp / "train.jsonl"
            shutil.copy(world["data"], path)
            fix, problem = "pass it with --data", "not valid YAML"
        else:  # pragma: no cover
            raise AssertionError(kind)
        return Case(train_args(world, tmp, _config=[str(path)]), path, fix, problem)
    return build


def _out(kind: str):
    def build(world, tmp, monkeypatch) -> Case:
        path = tmp / "run"
        fix = "--out DIR"
        problem = ""
        if kind == "a file":
            write(path, "the user's notes\n")
            problem = "is a file"
        elif kind == "under a file":
            write(tmp / "notes", "the user's notes\n")
            path, problem = tmp / "notes" / "run", "is a file, not a directory"
        elif kind == "other files":
            write(path / "thesis.tex", "the user's thesis\n")
            problem = "holds no tailor run"
        elif kind == "a run, no --resume":
            write(path / "config.yaml", "data: x.jsonl\n")
            write(path / "metrics.jsonl", '{"step": 1, "loss": 1.0}\n')
            fix, problem = "use --resume", "already holds a run"
        elif kind == "not writable":
            empty_dir(tmp / "locked")
            path = tmp / "locked" / "run"
            refuse_writing(monkeypatch, tmp / "locked")
            problem = "no permission"
        else:  # pragma: no cover
            raise AssertionError(kind)
        return Case(train_args(world, tmp, **{"--out": path}), path, fix, problem)
    return build


def _adapter(kind: str):
    def build(world, tmp, monkeypatch) -> Case:
        adapter = tmp / "adapter"
        path, fix, problem = adapter, "", ""  # path: what the message names; the CLI is given `arg`
        arg = adapter
        if kind == "missing":
            fix, problem = "Check the path", "does not exist"
        elif kind == "a file":
            write(adapter, "not an adapter")
            fix, problem = "adapter_config.json", "is a file"
        elif kind == "its config file":
            path = arg = copy_of(world, "adapter", tmp) / "adapter_config.json"
            fix, problem = f"Pass the directory that holds it: '{adapter}'", "is a file"
        elif kind == "empty directory":
            empty_dir(adapter)
            fix, problem = "pass the directory that save_adapter or tailor train wrote", "is missing"
        elif kind == "a run directory":
            run = tmp / "run"
            shutil.copytree(world["adapter"], run / "adapter")
            write(run / "config.yaml", "data: x.jsonl\n")
            path = arg = run
            fix, problem = f"pass its adapter, '{run / 'adapter'}'", "not a saved adapter"
        elif kind == "a model directory":
            path = arg = copy_of(world, "model", tmp)
            fix, problem = "--model", "not a saved adapter"
        else:
            copy_of(world, "adapter", tmp)
            config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
            if kind == "config unreadable":
                refuse_reading(monkeypatch, config)
                path, fix, problem = config, "check that you may read it", "Permission denied"
            elif kind == "config empty":
                write(config, "")
                path, fix, problem = config, "save the adapter again", "empty"
            elif kind == "config not json":
                write(config, '{"peft_type": "LORA", "r": ')
                path, fix, problem = config, "save the adapter again", "not valid JSON"
            elif kind == "config not utf-8":
                write(config, b"\xff\xfe{}")
                path, fix, problem = config, "save the adapter again", "not UTF-8"
            elif kind == "config a list":
                write(config, "[1, 2]")
                path, fix, problem = config, "save the adapter again", "expected a JSON object"
            elif kind == "weights missing":
                weights.unlink()
                fix, problem = "Copy the whole adapter directory again", "weights are missing"
            elif kind == "weights a directory":
                weights.unlink()
                empty_dir(weights)
                path, fix, problem = weights, "copy the adapter directory again", "not a file"
            elif kind == "weights empty":
                write(weights, b"")
                path, fix, problem = weights, "save the adapter again", "corrupt or truncated"
            elif kind == "weights truncated":
                truncate(weights)
                path, fix, problem = weights, "save the adapter again", "corrupt or truncated"
            elif kind == "weights garbage":
                write(weights, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
                path, fix, problem = weights, "save the adapter again", "corrupt or truncated"
            elif kind in ("weights NaN", "weights +inf", "weights -inf"):
                value = {"weights NaN": float("nan"), "weights +inf": float("inf"),
                         "weights -inf": float("-inf")}[kind]
                key = set_weight(adapter, value)
                path, fix, problem = weights, "retrain", f"tensor '{key}' is not finite"
            else:  # pragma: no cover
                raise AssertionError(kind)
        return Case(generate_args(world["model"], arg), path, fix, problem)
    return build


def _model(kind: str):
    def build(world, tmp, monkeypatch) -> Case:
        path = tmp / "model"
        fix, problem = "", ""
        arg = None  # what the CLI is given, when it is not `path` (the path the message names)
        if kind == "missing":
            fix, problem = "Check the path", "No such file or directory"
        elif kind == "missing, trailing slash":  # not mistaken for a hub id
            arg = f"{path}/"
            fix, problem = "Check the path", "No such file or directory"
        elif kind == "a file":
            write(path, "weights?")
            fix, problem = "Pass a model directory (with config.json) or a .gguf file", "not a .gguf file"
        elif kind == "its config.json":
            path = copy_of(world, "model", tmp) / "config.json"
            fix, problem = f"pass {path.parent}", "not a .gguf file"
        elif kind == "fifo":
            path = fifo(tmp / "model")
            fix, problem = "Pass a model directory", "neither a directory nor a file"
        elif kind == "empty directory":
            empty_dir(path)
            fix, problem = "Pass a directory with config.json + weights", "no config.json and no .gguf file"
        elif kind == "directory with two .gguf":
            write(path / "a.gguf", b"GGUF")
            write(path / "b.gguf", b"GGUF")
            fix, problem = "the path of one .gguf file", "2 .gguf files"
        elif kind in ("gguf empty", "gguf garbage", "gguf truncated header"):
            content = {"gguf empty": b"", "gguf garbage": b"<html>404 Not Found</html>",
                       "gguf truncated header": b"GGUF\x03\x00\x00\x00"}[kind]
            path = write(tmp / "weights.gguf", content)
            fix, problem = {"gguf empty": ("download or copy the .gguf file again", "it is empty"),
                            "gguf garbage": ("download or copy the .gguf file again", "magic bytes"),
                            "gguf truncated header": ("download it again", "truncated or corrupt")}[kind]
        else:
            model = arg = copy_of(world, "model", tmp)
            config, weights = model / "config.json", model / "model.safetensors"
            fix = "re-save the model with save_pretrained"
            if kind == "config unreadable":
                refuse_reading(monkeypatch, config)
                path, problem = config, "Permission denied"
            elif kind == "config empty":
                write(config, "")
                path, problem = config, "the file is empty"
            elif kind == "config not json":
                write(config, '{"model_type": "llama", ')
                path, problem = config, "not valid JSON"
            elif kind == "config without model_type":
                write(config, "{}")
                path, problem = config, "has no model_type"
            elif kind == "weights missing":
                weights.unlink()
                problem = "no weights"
            elif kind == "weights empty":
                write(weights, b"")
                path, problem = weights, "empty"
            elif kind == "weights truncated":
                truncate(weights)
                problem = "the model cannot be loaded"
            elif kind == "tokenizer corrupt":
                write(model / "tokenizer.json", "{not json")
                fix, problem = "copy the tokenizer files", "the tokenizer cannot be loaded"
            else:  # pragma: no cover
                raise AssertionError(kind)
        return Case(generate_args(arg or path), path, fix, problem)
    return build


def _eval(kind: str):
    def build(world, tmp, monkeypatch) -> Case:
        run = tmp / "run"
        shutil.copytree(world["adapter"], run / "adapter")
        base = ["eval", "--model", str(world["model"]), "--data", str(world["data"]), "--n", "1",
                "--no-retention", "--max-new-tokens", "1"]
        if kind == "run missing":
            path = tmp / "nope"
            return Case([*base, str(path)], path, "pass a run directory", "does not exist")
        if kind == "run a file":
            path = write(tmp / "notes", "mine\n")
            return Case([*base, str(path)], path, "pass a run directory", "is a file")
        if kind == "--out a directory":
            path = empty_dir(tmp / "results")
            return Case([*base, str(run), "--out", str(path)], path, "Choose another path", "is a directory")
        if kind == "--out under a file":
            write(tmp / "notes", "mine\n")
            path = tmp / "notes" / "eval.json"
            return Case([*base, str(run), "--out", str(path)], path, "Choose another path",
                         "is a file, not a directory")
        if kind == "--data missing":
            path = tmp / "nope.jsonl"
            return Case([*base[:4], str(path), *base[5:], str(run)], path, "give the path", "not found")
        raise AssertionError(kind)  # pragma: no cover
    return build


def _demo(kind: str):
    def build(world, tmp, monkeypatch) -> Case:
        path = tmp / "runs" / "mine"
        if kind == "--out a file":
            write(path, "mine\n")
            return Case(["demo", "--out", str(path)], path, "Choose another path", "is a file")
        if kind == "--out another run":  # a run of the user's own is never replaced by the demo
            write(path / "config.yaml", "name: mine\ndata: my.jsonl\n")
            write(path / "metrics.jsonl", '{"step": 1}\n')
            write(path / "adapter" / "adapter_config.json", "{}")
            return Case(["demo", "--out", str(path)], path, "Choose another --out",
                        "nothing there is touched")
        raise AssertionError(kind)  # pragma: no cover
    return build


CASES: dict[str, Callable] = {}
for _kind in ("missing", "directory", "directory of other files", "fifo", "unreadable", "empty",
              "blank lines", "corrupt json", "unclosed array", "not utf-8", "one example"):
    CASES[f"data: {_kind}"] = _data(_kind)
for _kind in ("missing", "directory", "empty", "corrupt json"):
    CASES[f"val-data: {_kind}"] = _data(f"val {_kind}")
for _kind in ("missing", "directory", "unreadable", "empty", "only comments", "corrupt yaml", "not utf-8",
              "a list", "a model's config.json", "training data"):
    CASES[f"config: {_kind}"] = _config(_kind)
for _kind in ("a file", "under a file", "other files", "a run, no --resume", "not writable"):
    CASES[f"out: {_kind}"] = _out(_kind)
for _kind in ("missing", "a file", "its config file", "empty directory", "a run directory",
              "a model directory", "config unreadable", "config empty", "config not json", "config not utf-8",
              "config a list", "weights missing", "weights a directory", "weights empty", "weights truncated",
              "weights garbage", "weights NaN", "weights +inf", "weights -inf"):
    CASES[f"adapter: {_kind}"] = _adapter(_kind)
for _kind in ("missing", "missing, trailing slash", "a file", "its config.json", "fifo", "empty directory",
              "directory with two .gguf", "gguf empty", "gguf garbage", "gguf truncated header",
              "config unreadable", "config empty", "config not json", "config without model_type",
              "weights missing", "weights empty", "weights truncated", "tokenizer corrupt"):
    CASES[f"model: {_kind}"] = _model(_kind)
for _kind in ("run missing", "run a file", "--out a directory", "--out under a file", "--data missing"):
    CASES[f"eval: {_kind}"] = _eval(_kind)
for _kind in ("--out a file", "--out another run"):
    CASES[f"demo: {_kind}"] = _demo(_kind)


def assert_clean_failure(result, case: Case) -> str:
    output = result.output
    assert result.exit_code == 2, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert [line.startswith("error:") for line in output.splitlines()].count(True) == 1, output  # one block
    message = " ".join(output[output.index("error:"):].split())
    shown = {str(case.path), str(case.path.resolve())}
    assert any(" ".join(p.split()) in message for p in shown), f"{case.path} not in: {message}"
    assert case.fix in message, f"fix {case.fix!r} not in: {message}"
    assert case.problem in message, f"problem {case.problem!r} not in: {message}"
    return message


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_path_is_one_clear_error_and_changes_nothing(name, world, tmp_path, monkeypatch):
    case = CASES[name](world, tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    result = runner.invoke(app, case.args)
    assert_clean_failure(result, case)
    assert snapshot(tmp_path) == before  # nothing overwritten, nothing created (no half-made run dir)


def test_a_failed_train_leaves_no_run_directory_behind_so_a_retry_works(world, tmp_path):
    """Bad data used to leave config.yaml in --out, and the retry was refused as 'already holds a run'."""
    out = tmp_path / "run"
    bad = train_args(world, tmp_path, **{"--data": tmp_path / "nope.jsonl", "--out": out})
    assert runner.invoke(app, bad).exit_code == 2
    assert not out.exists()
    result = runner.invoke(app, train_args(world, tmp_path, **{"--out": out}))
    assert result.exit_code == 0, result.output
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_resume_from_a_corrupt_checkpoint_names_it_and_leaves_it(world, tmp_path):
    out = tmp_path / "run"
    args = train_args(world, tmp_path, **{"--out": out})
    assert runner.invoke(app, [*args, "--set", "save_every=1", "--set", "max_steps=2"]).exit_code == 0
    checkpoints = out / "checkpoints"
    latest = sorted(checkpoints.iterdir())[-1]
    truncate(latest / "trainable.safetensors", keep=40)
    before = snapshot(checkpoints)
    result = runner.invoke(app, [*args, "--set", "max_steps=3", "--set", "resume=true"])
    message = assert_clean_failure(result, Case([], latest, "start a new run with another --out",
                                                 "the checkpoint cannot be read"))
    assert "to resume from step-000001" in message
    assert snapshot(checkpoints) == before


# ------------------------------------------------------------------------------------------------------
# Library entry points: the error types the command line relies on
# ------------------------------------------------------------------------------------------------------


def test_library_errors_are_the_modules_types_and_value_errors(world, tmp_path):
    empty = write(tmp_path / "empty.yaml", "")
    with pytest.raises(ConfigError, match="empty"):
        read_yaml_config(empty)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(DataError, match="is a directory"):
        load_examples(tmp_path)
    with pytest.raises(ModelNotFoundError, match="neither a directory nor a file"):
        resolve_model(str(fifo(tmp_path / "pipe")))
    with pytest.raises(GGUFConversionError, match="it is empty"):
        load_model(str(write(tmp_path / "x.gguf", b"")))
    model = copy_of(world, "model", tmp_path)
    write(model / "config.json", "[]")
    with pytest.raises(ModelLoadError, match="is a JSON list"):
        load_model(str(model))
    write(tmp_path / "run", "")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(tmp_path / "run", resume=False)
    for error in (ConfigError, DataError, ModelNotFoundError, ModelLoadError, GGUFConversionError,
                  AdapterFormatError, OutputPathError):
        assert issubclass(error, ValueError)  # what the command line catches


def test_permission_denied_while_writing_is_a_value_error_naming_the_path(tmp_path, monkeypatch):
    import tailor.files

    def refuse(path, kind, directory):
        raise PermissionError(13, "Permission denied", str(path.parent))

    monkeypatch.setattr(tailor.files, "_new_sibling", refuse)
    with pytest.raises(OutputPathError, match="Permission denied") as caught:
        tailor.files.atomic_write_text(tmp_path / "eval.json", "{}")
    assert str(tmp_path / "eval.json") in str(caught.value) and "Choose a path" in str(caught.value)
    assert isinstance(caught.value, ValueError) and not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pickle"])
def test_load_adapter_refuses_non_finite_weights_naming_tensor_and_file(world, tmp_path, value, pickled):
    adapter = copy_of(world, "adapter", tmp_path)
    key = set_weight(adapter, value, key_part="v_proj.lora_B")
    weights_file = adapter / "adapter_model.safetensors"
    if pickled:
        torch.save(load_file(weights_file), adapter / "adapter_model.bin")
        weights_file.unlink()
        weights_file = adapter / "adapter_model.bin"
    model, _ = load_model(str(world["model"]), device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(model, adapter, allow_pickle=pickled)
    message = str(caught.value)
    assert key in message and str(weights_file) in message and "not finite" in message
    assert not lora_configs(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _model_with_adapter(world, broken: bool):
    model, _ = load_model(str(world["model"]), device="cpu")
    load_adapter(model, world["adapter"])
    if broken:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_A" in n)[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("kind", ["non-finite weights over an adapter", "path is a file", "parent is a file"])
def test_a_failed_save_leaves_what_was_there(world, tmp_path, kind):
    model = _model_with_adapter(world, broken=kind.startswith("non-finite"))
    if kind == "non-finite weights over an adapter":
        target, error = copy_of(world, "adapter", tmp_path), "NaN"
    elif kind == "path is a file":
        target, error = write(tmp_path / "adapter", "mine"), "a file"
    else:
        write(tmp_path / "notes", "mine")
        target, error = tmp_path / "notes" / "adapter", "a file"
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=error) as caught:
        save_adapter(model, target)
    assert str(target) in str(caught.value)
    assert snapshot(tmp_path) == before


def test_good_inputs_still_work(world, tmp_path):
    """The checks refuse only what is wrong: the world's own model, data and adapter pass through."""
    result = runner.invoke(app, generate_args(world["model"], world["adapter"]))
    assert result.exit_code == 0, result.output
    config = write(tmp_path / "c.yaml", json.dumps({"rank": 2, "lora_alpha": 4}) + "\n")  # JSON is YAML
    assert read_yaml_config(config) == {"rank": 2, "lora_alpha": 4}
