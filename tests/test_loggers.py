"""Logger overlays (configs/loggers/): CSV beside TensorBoard, MLflow against a real local
SQLite tracking store, W&B offline (its local run files hold the metrics)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, TINY_DEMO, run_cli

LOGGERS = CONFIGS / "loggers"


def _fit(*extra: str):
    return run_cli("fit", *TINY_DEMO, *extra)


def test_csv_writes_beside_tensorboard_and_a_resume_keeps_the_first_file(in_tmp):
    cli = _fit("--config", str(LOGGERS / "csv.yaml"))
    run = Path(cli.trainer.loggers[0].log_dir)
    assert list(run.glob("events.out.tfevents.*"))
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    epochs = {int(r["epoch"]) for r in rows if r.get("val/acc1")}
    assert epochs == {0, 1}
    before = (run / "csv" / "metrics.csv").read_text()
    _fit("--config", str(LOGGERS / "csv.yaml"), "--trainer.max_epochs=3", "--ckpt_path=last")
    assert (run / "csv" / "metrics.csv").read_text() == before  # not deleted, not rewritten
    resumed = list(csv.DictReader((run / "csv_2" / "metrics.csv").open()))
    assert {int(r["epoch"]) for r in resumed if r.get("val/acc1")} == {2}
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


@pytest.mark.slow
def test_mlflow_logs_params_metrics_and_the_best_checkpoint(in_tmp):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is in dev; CI installs it")
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    cli = _fit("--config", str(LOGGERS / "mlflow.yaml"),
               f"--trainer.logger.init_args.tracking_uri={uri}",
               f"--trainer.logger.init_args.artifact_location={in_tmp / 'artifacts'}")  # fmt: skip
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("swin_lightning")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["label_smoothing"] == "0.1"
    history = client.get_metric_history(run.info.run_id, "val/acc1")
    assert len(history) == 2  # one value per epoch
    assert history[-1].value == pytest.approx(float(cli.trainer.callback_metrics["val/acc1"]))
    # The checkpoints are artifacts, one folder each, the best one tagged 'best'.
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    stored = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {best.stem, "last"} <= stored, stored
    folder = Path(client.download_artifacts(run.info.run_id, best.stem, str(in_tmp / "dl")))
    assert "best" in (folder / "aliases.txt").read_text()
    ckpt = torch.load(folder / best.name, weights_only=True, map_location="cpu")
    saved = torch.load(best, weights_only=True, map_location="cpu")
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in saved["state_dict"].items())


@pytest.mark.slow
def test_wandb_offline_run_files_hold_the_metrics(in_tmp, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the wandb extra is in dev; CI installs it")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        cli = _fit("--config", str(LOGGERS / "wandb.yaml"),
                   f"--trainer.logger.init_args.save_dir={in_tmp / 'wb'}")  # fmt: skip
        # The command finished its run: no open run is left for the next one to reuse, and
        # the run file is complete now, not only when the process exits.
        assert wandb.run is None
        (run_dir,) = (in_tmp / "wb" / "wandb").glob("offline-run-*")
        (run_file,) = run_dir.glob("run-*.wandb")  # what `wandb sync` uploads
        records = wandb_records(run_file)
    finally:
        wandb.finish()  # a failed assertion above must not leave a run open for other tests
    history = [item for kind, item in records if kind == "history" and "val/acc1" in item]
    assert [int(h["epoch"]) for h in history] == [0, 1]
    final = float(cli.trainer.callback_metrics["val/acc1"])
    assert json.loads(history[-1]["val/acc1"]) == pytest.approx(final)
    assert [item for kind, item in records if kind == "exit"] == [{"exit_code": "0"}]


def wandb_records(path: Path) -> list[tuple[str, dict[str, str]]]:
    """The history rows and exit records of a W&B run file, in order (LevelDB-log framing:
    7-byte file header, 32 KiB blocks, records of checksum(4) length(2) type(1) data; types
    1 full, 2-4 split)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, block, buf = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # too short for a record header: padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            which = record.WhichOneof("record_type")
            if which == "history":
                rows.append(("history", {i.key or "/".join(i.nested_key): i.value_json
                                         for i in record.history.item}))  # fmt: skip
            elif which == "exit":
                rows.append(("exit", {"exit_code": str(record.exit.exit_code)}))
    return rows
