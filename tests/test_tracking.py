"""Experiment tracking: the per-step log appends, TensorBoard event files hold the same scalars as metrics.jsonl
(local and on the loopback S3 server, read back with TensorBoard's own EventAccumulator), a resumed run's
repeated steps replace the old ones, and W&B (offline) / MLflow (file store) get the same scalars and the config
when those packages are installed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from longctx import storage
from longctx.config import ConfigError, JobConfig
from longctx.tracking import Tracker, check_available, flat_config, step_scalars
from longctx.train.metrics import StepLog


def _records(n: int, start: int = 0, total: int = 8, loss0: float = 4.0) -> list[dict]:
    return [{"step": s, "total_steps": total, "loss": loss0 - 0.1 * s + 0.013 * (s % 3), "lr": 1e-4 * s / total,
             "grad_norm": 1.0 + 0.01 * s, "tokens": 4096 * s, "step_tokens": 4096, "tokens_per_s": 900.0 + s,
             "tflops_per_s": 0.01, "mfu": None, "step_time_s": 4.5, "max_rss_gib": 1.5, "row_ids": [s, s + 100]}
            for s in range(start + 1, start + n + 1)]


def _read_events(logdir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(logdir).glob("events.out.tfevents.*"))
    assert files, f"no event files in {logdir}: {os.listdir(logdir)}"
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc


def _expected(jsonl_text: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for line in jsonl_text.splitlines():
        r = json.loads(line)
        for k, v in step_scalars(r).items():
            out.setdefault(k, {})[r["step"]] = v
    return out


def _assert_same(events: dict, expected: dict) -> None:
    assert set(events) == set(expected), (sorted(events), sorted(expected))
    for tag, by_step in expected.items():
        assert set(events[tag]) == set(by_step), tag
        for step, v in by_step.items():
            assert events[tag][step] == pytest.approx(v, rel=1e-6), (tag, step)  # float32 in the event file


def _cfg(**logging) -> JobConfig:
    return JobConfig.model_validate({"run_name": "t", "logging": logging})


def _run(log: StepLog, records: list[dict], val_at: dict[int, float]) -> None:
    for r in records:
        log.add(dict(r))
        if r["step"] in val_at:
            log.annotate(r["step"], val_loss=val_at[r["step"]])
    log.close()


def test_steplog_appends_and_keeps_the_validation_loss(tmp_path, monkeypatch):
    uri = str(tmp_path / "train" / "metrics.jsonl")
    writes = []
    real = storage.write_text
    monkeypatch.setattr(storage, "write_text", lambda u, t: (writes.append(u), real(u, t))[1])
    log = StepLog(uri, echo=False)
    records = _records(6, total=6)
    sizes = []
    for r in records:
        log.add(dict(r))
        if r["step"] == 3:
            log.annotate(3, val_loss=3.25)
        sizes.append(os.path.getsize(uri) if os.path.exists(uri) else 0)
    log.close()
    # one full write (creating both files), then appends: the files grow, nothing is rewritten per step
    assert sorted(writes) == sorted([uri, uri[:-6] + ".csv", uri[:-6] + ".csv"]), writes  # +1 CSV: new column
    assert sizes == sorted(sizes) and sizes[-1] > sizes[1] > 0
    lines = [json.loads(x) for x in Path(uri).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[2]["val_loss"] == 3.25 and all("val_loss" not in r for i, r in enumerate(lines) if i != 2)
    assert lines[5]["eta_s"] == pytest.approx(0.0) and lines[0]["eta_s"] >= 0 and "elapsed_s" in lines[0]
    import csv

    rows = list(csv.DictReader(open(uri[:-6] + ".csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert float(rows[2]["val_loss"]) == 3.25 and rows[3]["val_loss"] == ""
    assert float(rows[4]["loss"]) == pytest.approx(lines[4]["loss"])


def test_steplog_rewrites_once_after_a_resume(tmp_path):
    """A resumed run starts from the checkpoint's history: steps a failed attempt logged after it go away."""
    uri = str(tmp_path / "metrics.jsonl")
    first = StepLog(uri, echo=False)
    for r in _records(5):
        first.add(r)
    first.flush()
    resumed = StepLog(uri, history=_records(3), echo=False)
    for r in _records(2, start=3, loss0=9.0):
        resumed.add(r)
    resumed.close()
    lines = [json.loads(x) for x in Path(uri).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[3]["loss"] > 8  # the resumed attempt's step 4, not the failed attempt's


def test_step_line_printed_once_with_eta(tmp_path, capsys):
    log = StepLog(None, echo=True)
    for r in _records(3, total=6):
        log.add(r)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].startswith("[train] step 1/6 | loss")
    assert "elapsed" in out[-1] and "eta" in out[-1]


def test_tensorboard_events_match_metrics_jsonl_local(tmp_path):
    cfg = _cfg()
    logdir = str(tmp_path / "run" / "train" / "tensorboard")
    log = StepLog(str(tmp_path / "run" / "train" / "metrics.jsonl"), echo=False,
                  tracker=Tracker.open(cfg, logdir, run_id="t"))
    _run(log, _records(8), {4: 3.5, 8: 3.1})
    events, acc = _read_events(logdir)
    expected = _expected((tmp_path / "run" / "train" / "metrics.jsonl").read_text())
    assert expected["val/loss"] == {4: 3.5, 8: 3.1}
    assert "train/mfu" not in expected  # None on CPU: not logged as a number
    _assert_same(events, expected)
    # the run config is there as hyperparameters (TensorBoard's HParams plugin) and as text
    hp = acc.PluginTagToContent("hparams")
    assert hp, "no hparams in the event file"
    from tensorboard.plugins.hparams import plugin_data_pb2

    session = next(plugin_data_pb2.HParamsPluginData.FromString(v) for v in hp.values()
                   if plugin_data_pb2.HParamsPluginData.FromString(v).HasField("session_start_info"))
    hparams = session.session_start_info.hparams
    assert hparams["train.lr"].number_value == pytest.approx(cfg.train.lr)
    assert hparams["data.seq_len"].number_value == cfg.data.seq_len
    assert hparams["model.path"].string_value == cfg.model.path


def test_tensorboard_comparison_catches_a_wrong_scalar(tmp_path):
    """Negative control: the read-back comparison fails when one logged value differs from metrics.jsonl."""
    logdir = str(tmp_path / "tb")
    tracker = Tracker.open(_cfg(), logdir, run_id="t")
    records = _records(3)
    for r in records:
        tracker.log_step(dict(r, loss=r["loss"] + (0.01 if r["step"] == 2 else 0.0)))
    tracker.close()
    events, _ = _read_events(logdir)
    expected = _expected("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(AssertionError):
        _assert_same(events, expected)


def test_resumed_run_replaces_repeated_steps_in_tensorboard(tmp_path):
    logdir = str(tmp_path / "tb")
    cfg = _cfg()
    first = StepLog(None, echo=False, tracker=Tracker.open(cfg, logdir, run_id="t"))
    _run(first, _records(5), {})
    second = StepLog(None, history=_records(3), echo=False, tracker=Tracker.open(cfg, logdir, run_id="t",
                                                                                  resume_step=3))
    _run(second, _records(2, start=3, loss0=9.0), {})
    events, _ = _read_events(logdir)
    assert sorted(events["train/loss"]) == [1, 2, 3, 4, 5]
    assert events["train/loss"][4] > 8 and events["train/loss"][5] > 8  # the resumed attempt's values
    assert events["train/loss"][2] < 4


@pytest.mark.s3
def test_tensorboard_events_on_s3(s3_bucket, tmp_path):
    cfg = _cfg(flush_every_s=1000.0)
    train = f"{s3_bucket}/runs/t/train"
    log = StepLog(f"{train}/metrics.jsonl", echo=False, tracker=Tracker.open(cfg, f"{train}/tensorboard", run_id="t"),
                  flush_every_s=1000.0)
    _run(log, _records(6), {3: 3.4})
    remote = [p for p in storage.expand(f"{train}/tensorboard")]
    assert remote and all("events.out.tfevents" in p for p in remote), remote
    local = tmp_path / "tb"
    local.mkdir()
    for p in remote:
        (local / p.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(p))
    events, _ = _read_events(str(local))
    expected = _expected(storage.read_text(f"{train}/metrics.jsonl"))
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4, 5, 6] and expected["val/loss"] == {3: 3.4}
    _assert_same(events, expected)
    assert storage.read_text(f"{train}/metrics.csv").count("\n") == 7


def test_missing_tracking_package_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = _cfg(wandb={"enabled": True})
    with pytest.raises(ConfigError, match=r"logging\.wandb\.enabled is true but the `wandb` package is not installed"):
        check_available(cfg)
    check_available(_cfg())  # nothing asked for: fine
    from longctx.preflight import check_job

    problems = check_job(cfg, "pt")  # found with every other mistake, before Ray starts
    assert [p for p in problems if p.where == "logging.wandb.enabled" and "not installed" in p.what]
    assert not [p for p in check_job(_cfg(), "pt") if p.where.startswith("logging.")]


def test_flat_config_is_scalar_only():
    flat = flat_config(JobConfig())
    assert flat["train.lr"] == JobConfig().train.lr and flat["logging.tensorboard"] is True
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert not any(isinstance(v, float) and math.isnan(v) for v in flat.values())


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (optional: `pip install longctx[tracking]`; not in the test extras)")
def test_wandb_offline_run_gets_the_scalars_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored after the test (the tracker sets it from the config)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = _cfg(tensorboard=False, wandb={"enabled": True, "mode": "offline", "dir": str(tmp_path / "wandb"),
                                         "project": "longctx-test"})
    tracker = Tracker.open(cfg, None, run_id="wb-test")
    log = StepLog(str(tmp_path / "metrics.jsonl"), echo=False, tracker=tracker)
    run = tracker.wandb_run
    assert run is not None and run.id == "wb-test"
    for r in _records(4):
        log.add(dict(r))
        if r["step"] == 2:
            log.annotate(2, val_loss=3.7)
    assert run.config["train.lr"] == pytest.approx(cfg.train.lr)
    summary = dict(run.summary)
    # W&B commits a step's row when the next step arrives (so a validation loss can still join it): the summary
    # holds step 3 here, step 4 is written at finish
    summary = dict(run.summary)
    assert summary["train/loss"] == pytest.approx(_records(4)[2]["loss"]) and summary["_step"] == 3
    assert summary["val/loss"] == pytest.approx(3.7)
    log.close()
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*-wb-test"))
    assert runs, "no offline run folder"
    assert list(runs[0].glob("*.wandb")), "no offline run file (for `wandb sync`)"


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow is not installed (optional: `pip install longctx[tracking]`; not in the test extras)")
def test_mlflow_file_store_gets_the_scalars_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = "file:" + str(tmp_path / "mlruns")
    cfg = _cfg(tensorboard=False, mlflow={"enabled": True, "tracking_uri": uri, "experiment_name": "longctx-test"})
    log = StepLog(str(tmp_path / "metrics.jsonl"), echo=False, tracker=Tracker.open(cfg, None, run_id="mf-test"))
    _run(log, _records(4), {2: 3.7})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("longctx-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["longctx.run_id"] == "mf-test"
    assert float(run.data.params["train.lr"]) == pytest.approx(cfg.train.lr)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    expected = _expected((tmp_path / "metrics.jsonl").read_text())
    assert history == pytest.approx(expected["train/loss"])
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")} == {2: 3.7}


def test_evaluation_scalars_go_to_their_own_event_files(tmp_path):
    from longctx.tracking import log_evaluation

    ev = {"models": {
        "naive": {"perplexity": {"overall_nll": 3.2, "nll_beyond_base": 4.1}, "passkey": {"overall": 0.0}},
        "trained": {"perplexity": {"overall_nll": 2.9, "nll_beyond_base": float("nan")}, "passkey": {"overall": 0.5},
                    "needle": {"single": {"mean": 41.0}}}}}
    ckpts = [{"step": 2, "tokens": 10, "passkey": 0.25, "needle": 30.0, "nll_beyond_base": 3.5},
             {"step": 4, "tokens": 20, "passkey": 0.5, "needle": None, "nll_beyond_base": 3.1}]
    scalars = log_evaluation(_cfg(), str(tmp_path / "run"), "t", ev, step=7, checkpoint_evals=ckpts)
    assert scalars == {"eval/naive/overall_nll": 3.2, "eval/naive/nll_beyond_base": 4.1,
                       "eval/naive/passkey_accuracy": 0.0, "eval/trained/overall_nll": 2.9,
                       "eval/trained/passkey_accuracy": 0.5, "eval/trained/needle_single": 41.0}
    events, _ = _read_events(str(tmp_path / "run" / "eval" / "tensorboard"))
    _assert_same(events, {**{k: {7: v} for k, v in scalars.items()},
                          "checkpoint_eval/passkey": {2: 0.25, 4: 0.5}, "checkpoint_eval/needle": {2: 30.0},
                          "checkpoint_eval/nll_beyond_base": {2: 3.5, 4: 3.1}})


def test_progress_lines_have_counts_rate_and_eta(capsys):
    from longctx.progress import Progress, format_duration

    assert [format_duration(x) for x in (5, 65, 3720, None)] == ["5s", "1m05s", "1h02m", "?"]
    bar = Progress("eval", total=4, unit="items", every_s=3600)
    printed = [bar.update(i) for i in range(1, 5)]
    assert printed[0] and printed[1] is None and printed[2] is None and printed[3]  # first, then the end
    assert bar.update(4) is None  # the end is printed once
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("[longctx] eval: 1/4 items | ") and out[0].endswith("eta ?")
    assert out[1].startswith("[longctx] eval: 4/4 items") and out[1].endswith("eta 0s")


def test_model_labels_become_legal_tag_names_without_a_rename_log(tmp_path, caplog):
    from longctx.tracking import log_evaluation

    ev = {"models": {"base + dynamic NTK x4": {"perplexity": {"overall_nll": 3.3}},
                     "base (naive)": {"perplexity": {"overall_nll": 3.7}}}}
    with caplog.at_level("INFO"):
        scalars = log_evaluation(_cfg(), str(tmp_path / "run"), "t", ev, step=1)
    assert scalars == {"eval/base_dynamic_NTK_x4/overall_nll": 3.3, "eval/base_naive/overall_nll": 3.7}
    assert not [r for r in caplog.records if "is illegal" in r.getMessage()]
    events, _ = _read_events(str(tmp_path / "run" / "eval" / "tensorboard"))
    assert set(events) == set(scalars)
