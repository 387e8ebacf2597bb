"""Experiment trackers (report_to): a real training run logs into TensorBoard, MLflow (a local file store)
and wandb (offline), and each is read back with its own reader: TensorBoard's EventAccumulator, MLflow's
client, and wandb's own record schema over the run file it writes. The figures read back must equal the
run's metrics.jsonl."""

from __future__ import annotations

import glob
import json
import struct

import pytest
from conftest import tiny_model_dir, write_arithmetic_jsonl

from tailor.config import ConfigError
from tailor.trackers import TRACKERS, tracker_names, tracker_problems
from tailor.trackers.backends import BACKENDS
from tailor.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    # MLflow 3 keeps a plain-file store only on request; wandb offline writes only into the run directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tailor-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "tailor-test")
    return tmp_path


def wandb_records(path: str):
    """The records of a wandb run file: its LevelDB-log framing (a 7-byte ':W&B' header, 32 KiB blocks,
    each record chunk with a 7-byte header: crc, length, type FULL/FIRST/MIDDLE/LAST), each record a
    wandb.proto Record."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(update) -> dict[str, object]:
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in update}


def test_a_run_logs_to_tensorboard_mlflow_and_wandb_and_each_reads_it_back(tracker_env):
    tmp = tracker_env
    model = tiny_model_dir(tmp / "model")
    data = write_arithmetic_jsonl(tmp / "train.jsonl")
    config = TrainConfig(model=str(model), data=str(data), method="lora", rank=4, precision="fp32",
                         max_steps=4, batch_size=4, eval_every=2, progress=False, out=str(tmp / "run"),
                         report_to="tensorboard,mlflow,wandb")
    run = train(config)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps, losses = [x["step"] for x in logged], [x["loss"] for x in logged]
    summary = json.loads((run / "summary.json").read_text())
    state = json.loads((run / "trackers.json").read_text())
    assert sorted(state) == ["mlflow", "tensorboard", "wandb"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == steps
    assert [e.value for e in scalars] == pytest.approx(losses, abs=1e-5)
    assert [e.step for e in events.Scalars("train/val_loss")] == [2, 4]
    assert events.Scalars("summary/final_val_loss")[0].value == pytest.approx(summary["final_val_loss"])
    assert "config/text_summary" in events.Tags()["tensors"]

    from mlflow import MlflowClient

    client = MlflowClient()
    mlflow_run = client.get_run(state["mlflow"]["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "run"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert [m.step for m in history] == steps
    assert [m.value for m in history] == pytest.approx(losses, abs=1e-6)
    params = mlflow_run.data.params
    assert params["rank"] == "4" and params["report_to"] == "tensorboard,mlflow,wandb"
    assert mlflow_run.data.metrics["summary/steps"] == 4
    adapter_files = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files

    (wandb_file,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = list(wandb_records(wandb_file))
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == steps
    assert [h["train/loss"] for h in history] == pytest.approx(losses, abs=1e-6)
    config_seen = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config_seen.update(_items(r.config.update))
    assert config_seen["rank"] == {"value": 4} or config_seen["rank"] == 4
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [a.type for a in artifacts] == ["model"]
    assert "adapter_model.safetensors" in {m.path for m in artifacts[0].manifest.contents}

    # tailor eval RUN: the evaluation joins the same tracker runs
    from tailor.eval import evaluate_run

    result = evaluate_run(run, data=str(data), n=4, retention=False, max_new_tokens=4, batch_size=4,
                          dtype="fp32")
    mlflow_run = client.get_run(state["mlflow"]["run_id"])
    assert mlflow_run.data.metrics["eval/tuned/exact_match"] == result["tuned"]["exact_match"]
    assert "eval_comparison.json" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    events.Reload()
    assert events.Scalars("eval/base/exact_match")[0].value == result["base"]["exact_match"]


def test_report_to_names_and_problems(monkeypatch):
    assert tracker_names(None) == tracker_names("none") == tracker_names([]) == []
    assert tracker_names("all") == list(TRACKERS)
    assert tracker_names("TensorBoard, wandb") == ["tensorboard", "wandb"]
    (problem,) = tracker_problems(["tensorboard", "comet"])
    assert "'comet'" in problem and "tensorboard, mlflow, wandb" in problem
    with pytest.raises(ConfigError, match="report_to: 'comet' is not a tracker"):
        TrainConfig(report_to=["comet"]).validate()
    # a tracker that is not installed here: the package to install, before any work
    monkeypatch.setattr(BACKENDS["wandb"], "module", "wandb_is_not_installed_here")
    install = r"report_to: wandb is not installed; pip install 'wandb' \(or tailor\[trackers\]"
    with pytest.raises(ConfigError, match=install):
        TrainConfig(report_to="wandb").validate()


def test_mlflow_without_a_reachable_store_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    unreachable = "report_to: mlflow cannot reach its tracking store .*MLFLOW_TRACKING_URI"
    with pytest.raises(ConfigError, match=unreachable):
        TrainConfig(report_to="mlflow", out=str(tmp_path / "run")).validate()
    assert not (tmp_path / "run").exists()
