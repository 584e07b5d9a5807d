"""Sweeps (issue 7): Ray Tune over RoPE base x token budget, every trial the real prepare -> Long-PT -> evaluate chain.

The end-to-end test runs `jobs/sweep.py` in a subprocess (its own local Ray), interrupts it with SIGINT (Ctrl-C)
after two trials have finished, runs the same command again and checks that only the missing trials ran, that
every trial has finite metrics, that the plots exist and that the best trial's recipe loads as a job config.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from longctx.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- config and keys
def test_sweep_params_aliases_grids_and_numbers():
    cfg = load_config(None, ["train.val_every=2", "tune.params.rope_theta=[1e4, 1.0e+5]",
                             "tune.params.token_budget=[1024, 2048]",
                             "tune.params.train.lr={loguniform: [1.0e-4, 1.0e-3]}"])
    space = cfg.tune.space()
    assert space["model.rope_theta"].grid == [10000.0, 100000.0]  # YAML 1.1 reads 1e4 as a string
    assert all(isinstance(v, float) for v in space["model.rope_theta"].grid)
    assert space["train.token_budget"].grid == [1024, 2048]
    assert space["train.lr"].loguniform == (1e-4, 1e-3)


@pytest.mark.parametrize("overrides, message", [
    (["tune.params.nonsense=[1, 2]"], "not a config key path"),
    (["tune.params.rope_theta=[1.0e+4]", "tune.params.model.rope_theta=[2.0e+4]"], "given twice"),
    (["tune.params.train.lr={grid: [1.0e-3], uniform: [0.0, 1.0]}"], "exactly one of"),
    (["tune.params.train.lr={loguniform: [1.0e-3, 1.0e-4]}"], "low must be below high"),
    (["tune.scheduler=asha"], "train.val_every"),
    (["tune.objective=val_loss"], "train.val_every"),
])
def test_sweep_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_sweep_space_is_validated_per_trial_before_any_work():
    from longctx.tune.space import validate_space

    with pytest.raises(ValueError, match="tune.params is empty"):
        validate_space(load_config(None))
    with pytest.raises(ValueError, match="repeats identical trials"):
        validate_space(load_config(None, ["tune.params.rope_theta=[1.0e+4, 1.0e+5]", "tune.num_samples=2"]))
    # a grid value that makes an invalid job config fails up front, naming the trial and the key
    with pytest.raises(ConfigError, match="train.lr"):
        validate_space(load_config(None, ["tune.params.train.lr=[1.0e-3, -1.0]"]))
    pts = validate_space(load_config(None, ["tune.params.rope_theta=[1.0e+4, 1.0e+5, 1.0e+6]",
                                            "tune.params.token_budget=[1024, 2048]"]))
    assert len(pts) == 6 and len({json.dumps(p, sort_keys=True) for p in pts}) == 6


def test_trial_and_data_keys():
    from longctx.tune.space import data_key, trial_config, trial_key

    a = {"model.rope_theta": 1e4, "train.token_budget": 1024}
    b = {"model.rope_theta": 1e5, "train.token_budget": 1024}
    assert trial_key(a) == trial_key(dict(reversed(list(a.items()))))
    assert trial_key(a) != trial_key(b) and trial_key(a).startswith("rope_theta-10000_token_budget-1024-")
    assert trial_key({"model.rope_theta": 1e6}).startswith("rope_theta-1e6-")  # not 1e-06
    base = json.loads(load_config(None).model_dump_json())
    base.pop("tune")
    # trials that differ only in model/train settings share one packed dataset; data settings do not
    assert data_key(trial_config(base, a)) == data_key(trial_config(base, b))
    assert data_key(trial_config(base, {"data.output": "/elsewhere"})) == data_key(trial_config(base, {}))
    assert data_key(trial_config(base, {"data.seq_len": 2048})) != data_key(trial_config(base, {}))
    cfg = trial_config(base, b)
    assert cfg.model.rope_theta == 1e5 and cfg.train.token_budget == 1024


def test_cumulative_perplexity_is_the_token_weighted_mean_up_to_each_length():
    from longctx.tune.space import cumulative_perplexity

    out = cumulative_perplexity([256, 512, 1024], [2.0, 3.0, 4.0], [255, 256, 512])
    assert out[0] == pytest.approx(math.exp(2.0))
    assert out[1] == pytest.approx(math.exp((2.0 * 255 + 3.0 * 256) / 511))
    assert out[2] == pytest.approx(math.exp((2.0 * 255 + 3.0 * 256 + 4.0 * 512) / 1023))


# ------------------------------------------------------------------------------------------------- results
def _fake_rows(objective_of):
    rows = []
    for theta in (1e4, 1e5, 1e6):
        for budget in (1024, 2048):
            params = {"model.rope_theta": theta, "train.token_budget": budget}
            obj = objective_of(theta, budget)
            rows.append({"params": params, "status": "done", "error": None, "tune_dir": "/x",
                         "metrics": {"trial_key": f"t{theta:g}-{budget}", "objective": obj, "nll_beyond_base": obj,
                                     "overall_nll": obj + 0.1, "val_loss": obj + 0.2, "final_train_loss": 3.0,
                                     "bucket_edges": "[256, 512]", "bucket_nll": json.dumps([3.0, obj]),
                                     "bucket_tokens": "[255, 256]", "final_model": f"/m/{theta:g}-{budget}",
                                     "trial_dir": f"/t/{theta:g}-{budget}"}})
    return rows


def test_write_results_table_plots_and_best_recipe(tmp_path):
    from longctx.tune.report import write_results

    cfg = load_config(None, [f"output_dir={tmp_path}", "data.seq_len=512", "eval.base_context_length=256",
                             "tune.params.rope_theta=[1.0e+4, 1.0e+5, 1.0e+6]", "tune.params.token_budget=[1024, 2048]"])
    rows = _fake_rows(lambda t, b: abs(math.log10(t) - 5) + 1.0 / b * 100)
    rows.append({"params": {"model.rope_theta": 1e7, "train.token_budget": 1024}, "status": "error",
                 "error": "RuntimeError: boom", "tune_dir": "/x", "metrics": {}})
    rows.append({"params": {"model.rope_theta": 1e3, "train.token_budget": 2048}, "status": "stopped", "error": None,
                 "tune_dir": "/x", "metrics": {"step": 2, "val_loss": 4.5, "loss": 3.9, "tokens": 1024}})
    out = write_results(cfg, str(tmp_path / "sweep"), rows, None)
    res = Path(out["uri"])
    assert (res / "_COMMITTED").exists()
    with open(res / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8
    assert {r["status"] for r in table} == {"done", "error", "stopped"}
    stopped = next(r for r in table if r["status"] == "stopped")  # ASHA's: its last training report
    assert stopped["trial_key"].startswith("rope_theta-1000_token_budget-2048-")
    assert (stopped["train_steps"], stopped["val_loss"], stopped["objective"]) == ("2", "4.5", "")
    assert next(r for r in table if r["status"] == "error")["error"] == "RuntimeError: boom"
    import pyarrow.parquet as pq

    assert pq.read_table(res / "trials.parquet").num_rows == 8
    # best: rope 1e5 (distance 0) with the larger budget (smaller penalty)
    assert out["best"]["model.rope_theta"] == 1e5 and out["best"]["train.token_budget"] == 2048
    best = load_config(str(res / "best_config.yaml"))
    assert best.model.rope_theta == 1e5 and best.train.token_budget == 2048
    assert not best.tune.params  # a plain job recipe, not another sweep
    for png in ("heatmap.png", "ppl_vs_length.png", "objective_vs_rope_base.png"):
        assert (res / png).read_bytes()[:8] == PNG, png
    report = (res / "report.md").read_text()
    assert "**(best)**" in report and "rope suggest" in report and "RuntimeError: boom" in report
    assert out["best"]["trial_key"] in report


def test_best_trial_respects_the_objective_direction(tmp_path):
    from longctx.tune.report import write_results

    cfg = load_config(None, [f"output_dir={tmp_path}", "tune.objective=passkey_accuracy",
                             "tune.params.rope_theta=[1.0e+4, 1.0e+5, 1.0e+6]", "tune.params.token_budget=[1024, 2048]"])
    rows = _fake_rows(lambda t, b: math.log10(t) / 10 + b / 1e6)  # higher is better: 1e6 x 2048
    out = write_results(cfg, str(tmp_path / "sweep"), rows, None)
    assert out["best"]["model.rope_theta"] == 1e6 and out["best"]["train.token_budget"] == 2048


# --------------------------------------------------------------------------------------------- end to end
SWEEP_YAML = """
output_dir: {out}
ray: {{num_cpus: 4}}
data:
  sources: {{c: "builtin:corpus/c.jsonl.gz"}}
  seq_len: 512
  long_threshold: 256
  token_budget: 1024   # the largest train.token_budget below: the trials share one data set
model: {{path: "builtin:tiny-llama", max_position_embeddings: 512}}
train: {{num_workers: 1, zero_stage: 0, global_batch_tokens: 512, lr: 1.0e-3, val_every: 1, val_num_documents: 1}}
eval:
  context_length: 512
  bucket_edges: [0, 256, 512]
  base_context_length: 256
  baselines: [naive]
  num_documents: 2
  passkey: {{enabled: false}}
tune:
  name: e2e
  params:
    rope_theta: [1.0e+4, 1.0e+6]   # 2 x 2 trials: enough to interrupt after two and resume the rest (CI time)
    token_budget: [512, 1024]
  max_concurrent_trials: 1
  baselines: false
"""


def _attempts(root: Path) -> dict[str, list[dict]]:
    out = {}
    for d in sorted((root / "trials").iterdir()):
        f = d / "attempts.jsonl"
        out[d.name] = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
    return out


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.ray
def test_sweep_interrupted_and_resumed_runs_every_trial_once(tmp_path):
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(SWEEP_YAML.format(out=tmp_path / "runs"))
    root = tmp_path / "runs" / "e2e"
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", str(cfg_path)]

    # 1. Start, wait for two finished trials, then Ctrl-C.
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    finished_before: set[str] = set()
    while time.time() < deadline and proc.poll() is None:
        if (root / "trials").exists():
            finished_before = {d.name for d in (root / "trials").iterdir() if (d / "metrics.json").exists()}
            if len(finished_before) >= 2:
                break
        time.sleep(1)
    assert proc.poll() is None, "sweep ended before it could be interrupted:\n" + (tmp_path / "run1.log").read_text()[-4000:]
    assert len(finished_before) >= 2, (tmp_path / "run1.log").read_text()[-4000:]
    proc.send_signal(signal.SIGINT)
    rc1 = proc.wait(timeout=180)
    log1.close()
    text1 = (tmp_path / "run1.log").read_text()
    assert rc1 == 3, f"interrupted sweep should exit 3, got {rc1}:\n{text1[-4000:]}"
    assert "interrupted" in text1
    assert not (root / "results").exists(), "results published by an unfinished sweep"
    finished_at_interrupt = {k for k, v in _attempts(root).items() if any(a["event"] == "finished" for a in v)}
    assert finished_at_interrupt >= finished_before and len(finished_at_interrupt) < 4

    # 2. The same command resumes and finishes only what is missing.
    proc2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    text2 = proc2.stdout + proc2.stderr
    assert proc2.returncode == 0, text2[-6000:]
    assert "resuming" in text2
    attempts = _attempts(root)
    assert len(attempts) == 4
    for key, events in attempts.items():
        kinds = [a["event"] for a in events]
        assert kinds.count("finished") == 1, (key, kinds)
        if key in finished_at_interrupt:  # never trained again (at most its committed metrics were re-read)
            trial = [k for k in kinds if k in ("started", "finished", "reused")]  # without the run steps' events
            assert trial[:2] == ["started", "finished"] and set(trial[2:]) <= {"reused"}, (key, kinds)
            assert kinds.count("train") == 1 and kinds.count("eval") == 1, (key, kinds)

    # 3. Results: every trial with finite metrics, plots, a loadable best recipe.
    res = root / "results"
    assert (res / "_COMMITTED").exists()
    with open(res / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {r["status"] for r in table} == {"done"}
    grid = {(float(r["model.rope_theta"]), int(r["train.token_budget"])) for r in table}
    assert grid == {(t, b) for t in (1e4, 1e6) for b in (512, 1024)}
    for r in table:
        for col in ("objective", "nll_beyond_base", "nll_within_base", "overall_nll", "val_loss", "final_train_loss"):
            assert math.isfinite(float(r[col])), (r["trial_key"], col, r[col])
        assert int(r["train_steps"]) == int(r["train.token_budget"]) // 512
        assert Path(r["final_model"], "_COMMITTED").exists()
    objectives = [float(r["objective"]) for r in table]
    assert len(set(objectives)) > 1, "every trial gave the same objective: the parameters did not reach the trials"
    for png in ("heatmap.png", "ppl_vs_length.png", "objective_vs_rope_base.png"):
        assert (res / png).read_bytes()[:8] == PNG, png
    best = load_config(str(res / "best_config.yaml"))
    best_row = min(table, key=lambda r: float(r["objective"]))
    assert best.model.rope_theta == float(best_row["model.rope_theta"])
    assert best.train.token_budget == int(best_row["train.token_budget"])
    assert yaml.safe_load((res / "best_config.yaml").read_text()).get("tune") is None
    # the data was prepared once and shared by every trial
    assert len(list((root / "data").iterdir())) == 1
    assert all(r["trial_key"] in (res / "report.md").read_text() for r in table)


def test_resuming_refuses_a_sweep_whose_trials_would_compute_something_else(tmp_path):
    from longctx.tune.sweep import open_sweep

    base = [f"output_dir={tmp_path}", "tune.name=s", "tune.params.rope_theta=[1.0e+4, 1.0e+5]"]
    first = open_sweep(load_config(None, base))
    assert (tmp_path / "s" / "config.yaml").exists() and (tmp_path / "s" / "lease.json").exists()
    first.close()
    # where and how fast it runs may change
    open_sweep(load_config(None, base + ["tune.max_concurrent_trials=4", "ray.num_cpus=16",
                                         "tune.trial_resources={CPU: 1, head_node: 0.01}"])).close()
    # what the trials compute may not: Tuner.restore would keep the old grid, and new settings would reach only
    # the unfinished trials
    with pytest.raises(ValueError, match=r"tune.params.rope_theta.*Choose a new tune.name"):
        open_sweep(load_config(None, [f"output_dir={tmp_path}", "tune.name=s", "tune.params.rope_theta=[1.0e+4, 1.0e+6]"]))
    with pytest.raises(ValueError, match=r"train.lr: 1e-05 -> 0.001"):
        open_sweep(load_config(None, base + ["train.lr=1.0e-3"]))
    # the workers' resources pick the GPU, so the "auto" attention kernel: not a placement-only key
    with pytest.raises(ValueError, match=r"train.resources_per_worker"):
        open_sweep(load_config(None, base + ["train.resources_per_worker={trainer_node: 0.01}"]))
    # one driver per sweep: it holds the sweep's lease while it runs (tests/test_runs.py: a second one is refused)
    held = open_sweep(load_config(None, base))
    assert json.loads((tmp_path / "s" / "lease.json").read_text())["pid"] == os.getpid()
    held.close()
    assert not (tmp_path / "s" / "lease.json").exists()
