"""trainer.logger (moe/train/tracking.py): for each tracker a tiny training run, then what it
logged is read back with the tracker's own reader and compared with what the run wrote itself:
the train/loss of every step (logs/metrics.csv), the recipe (recipe.yaml) and the ledger
(model/meta.json, itself checked against tokens = steps x batch x seq_len and FLOPs = tokens x
FLOPs per token). wandb and mlflow run only where installed (the `track` extra), wandb offline,
mlflow on a local SQLite store; tensorboard is in the `dev` extra."""

import csv
import importlib.util
import json
import struct

import pytest
import yaml
from helpers import DEBUG

from moe.cli import main
from moe.config import ConfigError, load_recipe
from moe.io.checkpoint import read_meta
from moe.model.flops import train_flops_per_token
from moe.train.tracking import ledger, ledger_metrics

STEPS, BATCH, SEQ = 4, 4, 32
ARGS = [str(DEBUG / "dense.yaml"), f"trainer.max_steps={STEPS}", "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=4",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "data.domains=[text,dna]", "data.bytes_per_domain=20000", f"data.seq_len={SEQ}",
        f"data.batch_size={BATCH}", "optim.warmup_steps=1"]  # fmt: skip


@pytest.fixture
def quiet_env(monkeypatch, tmp_path):
    """No tracker settings from the machine's environment; W&B's caches in tmp_path."""
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _train(tmp_path, logger: str, *extra: str):
    run = tmp_path / "run"
    assert main(["train", *ARGS, f"out_dir={run}", f"trainer.logger={logger}", *extra]) == 0
    return run


def _csv_losses(run) -> dict[int, float]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f)
                if r["train/loss"]}  # fmt: skip


def _recipe(run) -> dict:
    return yaml.safe_load((run / "recipe.yaml").read_text())


def _ledger(run) -> dict:
    """The run's ledger from model/meta.json, checked against the hand-computed accounting."""
    meta = read_meta(run / "model")
    rec = ledger(meta)
    tokens = STEPS * BATCH * SEQ  # every target of a packed byte stream counts
    cfg = load_recipe(str(run / "recipe.yaml")).model
    assert rec["tokens_seen"] == rec["stage"]["tokens"] == tokens
    assert rec["train_flops"] == pytest.approx(tokens * train_flops_per_token(cfg, SEQ), rel=1e-12)
    assert rec["stage"]["steps"] == STEPS and rec["id"] == meta["id"]
    assert sum(rec["stage"]["tokens_by_domain"].values()) == tokens
    return rec


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested keys joined with "/", as Lightning flattens hyperparameters for MLflow (empty
    dicts and lists vanish: the recipe.yaml artifact has them)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif v != []:
            out[f"{prefix}{k}"] = v
    return out


def test_csv_has_loss_recipe_and_ledger(tmp_path):
    run = _train(tmp_path, "csv")
    losses = _csv_losses(run)
    assert sorted(losses) == list(range(STEPS))
    assert yaml.safe_load((run / "logs" / "hparams.yaml").read_text()) == _recipe(run)
    want = ledger_metrics(_ledger(run))
    assert want["ledger/stage_tokens"] == STEPS * BATCH * SEQ and "ledger/tokens_dna" in want
    with open(run / "logs" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["ledger/tokens_seen"]]
    assert len(rows) == 1 and int(rows[0]["step"]) == STEPS
    assert {k: float(rows[0][k]) for k in want} == pytest.approx(want, rel=1e-12)
    assert not any(p.name in ("tensorboard", "wandb", "mlflow") for p in run.iterdir())


def test_tensorboard_has_loss_recipe_and_ledger(tmp_path):
    pytest.importorskip("tensorboard")
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    run = _train(tmp_path, "tensorboard")
    version = run / "tensorboard" / "debug-dense" / "version_0"
    ea = EventAccumulator(str(version), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    got = {e.step: e.value for e in ea.Scalars("train/loss")}
    want = {s: float(np.float32(v)) for s, v in _csv_losses(run).items()}  # TB keeps float32
    assert got == want
    rec = _ledger(run)
    for key, value in ledger_metrics(rec).items():
        (ev,) = ea.Scalars(key)
        assert ev.step == STEPS and ev.value == pytest.approx(value, rel=1e-6), key

    def text(tag):
        (ev,) = ea.Tensors(f"{tag}/text_summary")
        body = make_ndarray(ev.tensor_proto).item().decode()
        return body.split("\n", 1)[1].rsplit("\n```", 1)[0]  # inside the markdown fence

    assert text("recipe") == (run / "recipe.yaml").read_text()
    assert json.loads(text("ledger")) == rec
    assert yaml.safe_load((version / "hparams.yaml").read_text()) == _recipe(run)


def test_tensorboard_resume_appends_to_its_version(tmp_path):
    """A resume logs into the same version folder; the ledger of the first launch (at the step
    where the resume starts) is purged, so each step and the final ledger appear once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = [*ARGS, f"out_dir={run}", "trainer.logger=tensorboard", "optim.total_steps=6",
              "trainer.checkpoint_every_n_steps=2"]  # fmt: skip
    assert main(["train", *common, "trainer.max_steps=3"]) == 0
    assert main(["train", *common, "trainer.max_steps=6", f"resume={run}"]) == 0
    folder = run / "tensorboard" / "debug-dense"
    assert [p.name for p in folder.iterdir()] == ["version_0"]
    ea = EventAccumulator(str(folder / "version_0"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(6))
    assert [e.step for e in ea.Scalars("ledger/tokens_seen")] == [6]


def _wandb_records(run_dir) -> list:
    """The records of an offline W&B run (run-ID.wandb: a 7-byte header, then LevelDB's log
    format: 32 KiB blocks of chunks, each with a 7-byte header of CRC, length and type
    1 full / 2 first / 3 middle / 4 last; a block's tail shorter than a header is padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, part, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            part = data
        else:
            part += data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
    return out


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def test_wandb_offline_has_loss_recipe_and_ledger(tmp_path, quiet_env):
    pytest.importorskip("wandb")
    import wandb

    run = _train(tmp_path, "wandb")
    assert wandb.run is None  # the stage finished its W&B run
    (run_dir,) = (run / "wandb").glob("offline-run-*")  # offline: WANDB_MODE was not set
    recs = _wandb_records(run_dir)
    by = {}
    for r in recs:
        by.setdefault(r.WhichOneof("record_type"), []).append(r)
    (info,) = [r.run for r in by["run"]]
    assert (info.project, info.display_name) == ("moe-forge", "debug-dense")
    config = {}
    for r in by["config"]:
        config.update(_items(r.config.update))
    assert {k: v for k, v in config.items() if not k.startswith("_")} == _recipe(run)
    history = [_items(r.history.item) for r in by["history"]]
    got = {h["trainer/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert got == _csv_losses(run)
    rec = _ledger(run)
    (last,) = [h for h in history if "ledger/tokens_seen" in h]
    assert last["trainer/global_step"] == STEPS
    assert {k: last[k] for k in ledger_metrics(rec)} == pytest.approx(ledger_metrics(rec))
    assert (run_dir / "files" / "recipe.yaml").read_text() == (run / "recipe.yaml").read_text()
    assert json.loads((run_dir / "files" / "ledger.json").read_text()) == rec
    assert by["exit"][0].exit.exit_code == 0


def _mlflow(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("moe-forge").experiment_id])
    return client, found


@pytest.mark.slow  # MLflow's import and its store's set-up: about 10 s
def test_mlflow_has_loss_recipe_and_ledger(tmp_path, quiet_env):
    pytest.importorskip("mlflow")

    run = _train(tmp_path, "mlflow")
    client, found = _mlflow(run)
    assert (found.info.run_name, found.info.status) == ("debug-dense", "FINISHED")
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == _csv_losses(run)
    want = {k: str(v)[:250] for k, v in _flat(_recipe(run)).items()}  # MLflow params: strings
    assert found.data.params == want
    rec = _ledger(run)
    for key, value in ledger_metrics(rec).items():
        (m,) = client.get_metric_history(found.info.run_id, key)
        assert m.step == STEPS and m.value == pytest.approx(value, rel=1e-12), key
    got = client.download_artifacts(found.info.run_id, "", str(tmp_path / "artifacts"))
    assert (tmp_path / "artifacts" / "recipe.yaml").read_text() == (run / "recipe.yaml").read_text()
    assert json.loads((tmp_path / "artifacts" / "ledger.json").read_text()) == rec, got


@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_a_failed_stage_closes_its_tracker_run(tmp_path, quiet_env, monkeypatch, logger):
    """An exception in training ends the tracker's run as failed (a W&B run left open would
    take the next stage's metrics in the same process); no model is written."""
    pytest.importorskip(logger)
    from moe.train.module import LitLM
    from moe.train.stages import train

    def boom(self, batch, batch_idx):
        raise RuntimeError("boom")

    monkeypatch.setattr(LitLM, "training_step", boom)
    run = tmp_path / "run"
    r = load_recipe(ARGS[0], [*ARGS[1:], f"out_dir={run}", f"trainer.logger={logger}"])
    with pytest.raises(RuntimeError, match="boom"):
        train(r)
    assert not (run / "model").exists()
    if logger == "wandb":
        import wandb

        assert wandb.run is None
        (run_dir,) = (run / "wandb").glob("offline-run-*")
        (ex,) = [r for r in _wandb_records(run_dir) if r.WhichOneof("record_type") == "exit"]
        assert ex.exit.exit_code == 1
    else:
        assert _mlflow(run)[1].info.status == "FAILED"


def test_unknown_logger_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *ARGS, f"out_dir={run}", "trainer.logger=neptune"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trainer.logger: unknown logger 'neptune'" in err
    assert "csv, tensorboard, wandb, mlflow" in err
    assert not run.exists()


@pytest.mark.parametrize("found", ["none", "folder"])
def test_missing_tracker_package_names_the_extra(tmp_path, capsys, monkeypatch, found):
    """A chosen tracker that is not installed (or only a folder of its name, such as W&B's own
    ./wandb, in the working directory) is refused before anything is trained or written."""
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        if name != "wandb":
            return real(name, *a, **k)
        if found == "none":
            return None
        spec = importlib.util.spec_from_loader("wandb", None, is_package=True)
        return spec  # a namespace package: no origin

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    run = tmp_path / "run"
    assert main(["train", *ARGS, f"out_dir={run}", "trainer.logger=wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "trainer.logger=wandb needs the wandb package: pip install 'moe-forge[track]'" in err
    assert not run.exists()
    with pytest.raises(ConfigError, match="moe-forge\\[track\\]"):
        load_recipe(None, ["trainer.logger=wandb"])


def test_tracker_settings_do_not_change_a_cached_study_stage(tmp_path):
    """The tracker is no part of a result: a study does not redo a stage for it."""
    from moe.config import to_yaml
    from moe.experiments import recipe_changed

    r = load_recipe(ARGS[0], ARGS[1:])
    saved = tmp_path / "recipe.yaml"
    saved.write_text(to_yaml(r))
    assert not recipe_changed(saved, load_recipe(ARGS[0], [
        *ARGS[1:], "trainer.logger=tensorboard", "trainer.logger_dir=elsewhere",
        "trainer.project=p"]))  # fmt: skip
    assert recipe_changed(saved, load_recipe(ARGS[0], [*ARGS[1:], "trainer.max_steps=5"]))
