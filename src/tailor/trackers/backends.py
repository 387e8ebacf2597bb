"""One class per tracker, each speaking its library's own API: TensorBoard's SummaryWriter, MLflow's
client, wandb's run. Each is imported only when a run asks for it (they are an extra: tailor[trackers])."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, ClassVar


class Tracker:
    """What tailor sends to a tracker. `start` opens a run, or reopens the one `state` (what
    `reopen_state` returned before) names."""

    module: ClassVar[str]  # the import that tells the tracker is installed
    package: ClassVar[str]  # what to pip install

    @classmethod
    def start(cls, run_dir: Path, run_name: str, state: dict[str, Any] | None) -> Tracker:
        raise NotImplementedError

    @classmethod
    def problem(cls) -> str | None:
        """Why this tracker cannot start here (checked before training), or None."""
        return None

    def reopen_state(self) -> dict[str, Any]:
        return {}

    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_summary(self, scalars: dict[str, float]) -> None: ...
    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None: ...
    def log_artifact(self, directory: Path, name: str) -> None: ...
    def finish(self, failed: bool) -> None: ...


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard (`tensorboard --logdir runs` shows every run). Metrics are scalars
    under train/, final figures (summary/, eval/) at the last step; config and tables are text. TensorBoard
    keeps no files, so the adapter is named (its path), not copied."""

    module, package = "tensorboard", "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))  # reopening appends a new event file
        self.last_step = 0

    @classmethod
    def start(cls, run_dir: Path, run_name: str, state: dict[str, Any] | None) -> TensorBoardTracker:
        tracker = cls(run_dir / "tensorboard")
        tracker.last_step = int((state or {}).get("last_step", 0))
        return tracker

    def reopen_state(self) -> dict[str, Any]:
        return {"log_dir": str(self.log_dir), "last_step": self.last_step}

    def log_config(self, config: dict[str, Any]) -> None:
        text = "```\n" + json.dumps(config, indent=2, default=str) + "\n```"
        self.writer.add_text("config", text, global_step=self.last_step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, global_step=step)
        self.last_step = max(self.last_step, step)

    def log_summary(self, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=self.last_step)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.writer.add_text(name, _markdown_table(rows), global_step=self.last_step)

    def log_artifact(self, directory: Path, name: str) -> None:
        self.writer.add_text(f"artifact/{name}", str(Path(directory).resolve()), global_step=self.last_step)

    def finish(self, failed: bool) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run in MLFLOW_EXPERIMENT_NAME (default "tailor") of the store MLFLOW_TRACKING_URI names:
    the config as parameters (and config.json), metrics per step, tables as JSON artifacts, the adapter's
    files as artifacts."""

    module, package = "mlflow", "mlflow-skinny"

    def __init__(self, run_id: str, fresh: bool) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id, self.fresh = MlflowClient(), run_id, fresh

    @classmethod
    def problem(cls) -> str | None:
        try:
            from mlflow import MlflowClient

            MlflowClient().search_experiments(max_results=1)
        except Exception as error:  # any store error: say it before training, with the setting to fix
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            return (f"report_to: mlflow cannot reach its tracking store ({first}); set MLFLOW_TRACKING_URI, "
                    "e.g. http://HOST:5000 for a server, or file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true")
        return None

    @classmethod
    def start(cls, run_dir: Path, run_name: str, state: dict[str, Any] | None) -> MLflowTracker:
        from mlflow import MlflowClient

        client = MlflowClient()
        if state and state.get("run_id"):
            client.update_run(state["run_id"], status="RUNNING")
            return cls(state["run_id"], fresh=False)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tailor")
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={"tailor.run_dir": str(run_dir.resolve())})
        return cls(run.info.run_id, fresh=True)

    def reopen_state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self.fresh:  # MLflow's parameters are fixed once logged; a resumed run keeps the first ones
            params = [Param(k, str(v)[:6000]) for k, v in config.items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_mlflow_key(k), v, now, step)
                                                    for k, v in metrics.items()])

    def log_summary(self, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, 0) for k, v in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.client.log_dict(self.run_id, rows, f"{name}.json")

    def log_artifact(self, directory: Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path=name)

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _mlflow_key(key: str) -> str:
    # MLflow keys allow letters, digits, _ - . space / only
    return re.sub(r"[^\w\-. /]", "_", key)


class WandbTracker(Tracker):
    """A wandb run in WANDB_PROJECT (default "tailor"), its files under RUN/wandb; WANDB_MODE=offline
    writes only there (`wandb sync` uploads later). The adapter is a `model` artifact."""

    module, package = "wandb", "wandb"

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def start(cls, run_dir: Path, run_name: str, state: dict[str, Any] | None) -> WandbTracker:
        import wandb

        previous = (state or {}).get("id")
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tailor"), name=run_name, dir=str(run_dir),
                         id=previous, resume="allow" if previous else None, reinit="create_new")
        return cls(run)

    def reopen_state(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.run.project}

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def log_summary(self, scalars: dict[str, float]) -> None:
        self.run.summary.update(scalars)

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        import wandb

        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({name: table}, commit=False)

    def log_artifact(self, directory: Path, name: str) -> None:
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^\w\-.]", "-", f"{self.run.name}-{name}"), type="model")
        artifact.add_dir(str(directory))
        self.run.log_artifact(artifact)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker,
                                      "wandb": WandbTracker}
