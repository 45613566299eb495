"""Experiment tracking: where a training stage's metrics, recipe and ledger go.

Every run writes `RUN/logs/metrics.csv` (the study reports read their curves from it; a resume
keeps the rows logged before its step). `trainer.logger` adds one tracker, whose files lie under
`trainer.logger_dir` (default: the run directory), one folder per tracker:

    csv          nothing more
    tensorboard  LOGGER_DIR/tensorboard/NAME/version_N; a resume appends to the latest version,
                 and TensorBoard drops the steps it trains again (SummaryWriter's purge_step)
    wandb        LOGGER_DIR/wandb/offline-run-*: offline unless the environment sets WANDB_MODE
                 (`wandb sync` uploads such a directory later)
    mlflow       the SQLite store sqlite:///LOGGER_DIR/mlflow/mlflow.db, artifacts in
                 LOGGER_DIR/mlflow/artifacts, unless the environment sets MLFLOW_TRACKING_URI
                 (MLflow 3 refuses its old file store ./mlruns by default)

W&B runs are filed under `trainer.project`, MLflow runs under the experiment of that name; the
run's name is the recipe's `name`. A resumed or forked launch is a new W&B/MLflow run.

Each logger gets the same three things:
    metrics  every logged step: train/loss, train/loss_<domain>, val/loss_<domain>, val/bpb_<domain>
    recipe   the resolved recipe (what RUN/recipe.yaml holds), when training starts: as
             hyperparameters (CSV and TensorBoard: hparams.yaml beside the metrics; W&B: the
             run's config; MLflow: params, flattened to keys like optim/lr) and as the YAML text
             (TensorBoard: the text tab; W&B: the run file recipe.yaml; MLflow: the artifact)
    ledger   the run's compute accounting as written into model/meta.json, when it ends: the
             metrics `ledger/<key>` at the final step (`ledger_metrics`), and the whole record as
             JSON (TensorBoard: text; W&B: the run file ledger.json; MLflow: the artifact)

    tracking = Tracking(run, r.trainer, r.name, keep_before)
    trainer = pl.Trainer(logger=tracking.loggers, ...)
    with tracking:                                  # W&B finish / MLflow status, also on failure
        tracking.log_recipe(to_dict(r), to_yaml(r))
        trainer.fit(...)
        tracking.log_ledger(ledger(meta), step)
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger

from moe.config import TrainerConfig
from moe.io.checkpoint import atomic_write_text


def _csv_logger(run: Path, keep_before: int | None) -> CSVLogger:
    """Metrics in `run/logs/metrics.csv`. On a resume the rows logged before its step are kept:
    Lightning's CSV writer deletes an existing file when it opens, which would lose the history
    of every resumed run. Rows at or after that step were logged by steps that the resume does
    again, so they are dropped rather than repeated."""
    logger = CSVLogger(str(run), name="logs", version="")
    path = run / "logs" / "metrics.csv"
    if keep_before is None or not path.is_file():
        return logger
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        kept = [row for row in reader if (row.get("step") or "").isdigit()
                and int(row["step"]) < keep_before]
    writer = logger.experiment  # opening the writer deletes the old file
    if kept and header:
        buf = io.StringIO()
        out = csv.DictWriter(buf, fieldnames=header)
        out.writeheader()
        out.writerows(kept)
        atomic_write_text(path, buf.getvalue())
        # the writer appends under this header (it rewrites the file when new keys appear)
        writer.metrics_keys = header
    return logger


def _latest_version(folder: Path) -> int | None:
    """The highest N of the `version_N` folders in `folder` (None: none)."""
    found = [int(m.group(1)) for p in folder.glob("version_*")
             if p.is_dir() and (m := re.fullmatch(r"version_(\d+)", p.name))]  # fmt: skip
    return max(found) if found else None


def _tracker(kind: str, root: Path, project: str, name: str, keep_before: int | None) -> Logger:
    """The Lightning logger of `trainer.logger=kind`, its files under `root` (the logger dir).
    Made only where the run is written: MLflow's client opens (creates) its store at once."""
    if kind == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        version = _latest_version(root / "tensorboard" / name) if keep_before is not None else None
        extra = {"purge_step": keep_before} if version is not None else {}
        return TensorBoardLogger(str(root / "tensorboard"), name=name, version=version,
                                 default_hp_metric=False, **extra)  # fmt: skip
    if kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        # offline unless the user chose a mode; WandbLogger(offline=True) would instead set
        # WANDB_MODE in this process's environment for every later run
        mode = {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}
        root.mkdir(parents=True, exist_ok=True)  # W&B falls back to /tmp without it
        return WandbLogger(name=name, project=project, save_dir=str(root), **mode)
    if kind == "mlflow":
        from pytorch_lightning.loggers import MLFlowLogger

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            store = (root / "mlflow").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
            artifacts = (store / "artifacts").as_uri()
        return MLFlowLogger(experiment_name=project, run_name=name, tracking_uri=uri,
                            artifact_location=artifacts)  # fmt: skip
    raise ValueError(f"unknown tracker {kind!r}")


def ledger_metrics(ledger: dict) -> dict[str, float]:
    """The ledger's numbers as `ledger/<key>` metrics: the lineage's totals (tokens_seen,
    train_flops) and this stage's (stage_tokens, stage_flops, stage_steps, wall_s, tokens_per_s,
    skipped_steps, tokens_<domain>)."""
    st = ledger.get("stage", {})
    out = {"tokens_seen": ledger["tokens_seen"], "train_flops": ledger["train_flops"]}
    for key in ("tokens", "flops", "steps"):
        if key in st:
            out[f"stage_{key}"] = st[key]
    for key in ("wall_s", "tokens_per_s", "skipped_steps"):
        if key in st:
            out[key] = st[key]
    for dom, n in st.get("tokens_by_domain", {}).items():
        out[f"tokens_{dom}"] = n
    return {f"ledger/{k}": v for k, v in out.items()}


def ledger(meta: dict) -> dict[str, Any]:
    """The accounting part of a checkpoint's meta.json: its id, the lineage's tokens and
    training FLOPs, and this stage's record (steps, tokens per domain, FLOPs, wall time)."""
    return {k: meta[k] for k in ("id", "tokens_seen", "train_flops", "stage") if k in meta}


class Tracking:
    """The run's loggers: the CSV metrics and the `trainer.logger` tracker (if any). Only the
    process that writes the run directory (`rank0`, the launch's global rank 0) has a tracker
    and calls the log_* methods; the others log nothing (Lightning's loggers are rank-0 only)."""

    def __init__(self, run: Path, t: TrainerConfig, name: str, keep_before: int | None = None,
                 rank0: bool = True):  # fmt: skip
        """`keep_before`: a resume's step (the CSV rows and TensorBoard steps before it stay)."""
        self.csv = _csv_logger(run, keep_before)
        self.tracker: Logger | None = None
        self.kind = t.logger if rank0 else "csv"
        if self.kind != "csv":
            root = Path(t.logger_dir) if t.logger_dir else run
            self.tracker = _tracker(t.logger, root, t.project, name, keep_before)
        self._opened = False  # whether the tracker's run exists (log_recipe opens it)

    @property
    def loggers(self) -> list[Logger]:
        return [self.csv] + ([self.tracker] if self.tracker is not None else [])

    def log_recipe(self, recipe: dict, text: str) -> None:
        """The resolved recipe (`to_dict`) as hyperparameters, and its YAML `text`."""
        self._opened = True
        for lg in self.loggers:
            lg.log_hyperparams(recipe)
            lg.save()
        self._document("recipe.yaml", text, step=0)

    def log_ledger(self, record: dict, step: int) -> None:
        """The run's ledger (`ledger(meta)`) at its final `step`: `ledger_metrics` and JSON."""
        for lg in self.loggers:
            lg.log_metrics(ledger_metrics(record), step=step)
            lg.save()
        self._document("ledger.json", json.dumps(record, indent=2, sort_keys=True), step=step)

    def _document(self, filename: str, text: str, step: int) -> None:
        """`text` kept whole by the tracker: a text panel, a run file or an artifact."""
        if self.kind == "tensorboard":
            tag = filename.split(".")[0]
            fence = "yaml" if filename.endswith(".yaml") else "json"
            # TensorBoard renders text as markdown: fenced, it keeps its indentation
            self.tracker.experiment.add_text(tag, f"```{fence}\n{text}\n```", global_step=step)
            self.tracker.experiment.flush()
        elif self.kind == "wandb":
            # files in the run's folder are part of the run (uploaded with it by `wandb sync`);
            # written in place: W&B would take an atomic write's temporary file for one more
            (Path(self.tracker.experiment.dir) / filename).write_text(text, encoding="utf-8")
        elif self.kind == "mlflow":
            self.tracker.experiment.log_text(self.tracker.run_id, text, filename)

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close the tracker's run: finished, or failed when an exception (an interrupt too)
        ends the stage. Lightning finalizes its loggers at the end of `fit`, but a W&B run stays
        open in the process (the next stage of a study would log into it) and an MLflow run
        would be marked finished before its ledger came."""
        ok = exc_type is None
        if not self._opened:
            return
        if self.kind == "wandb":
            self.tracker.experiment.finish(exit_code=0 if ok else 1)
        elif self.kind == "mlflow":
            status = "FINISHED" if ok else "FAILED"
            self.tracker.experiment.set_terminated(self.tracker.run_id, status)
        elif self.kind == "tensorboard":
            self.tracker.experiment.close()
