"""Multi-stage recipes (`stages:`): each stage's config, the preflight of every stage before Ray, the shipped
ProLong recipe's memory plan per stage; and (slow, Ray) the laptop two-stage recipe run end to end, killed in
stage 2 and resumed there."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longctx import storage
from longctx.config import ConfigError, load_config, stage_config
from longctx.preflight import check_job

ROOT = Path(__file__).resolve().parents[1]
TWO_STAGE = str(ROOT / "jobs" / "configs" / "tiny-two-stage.yaml")
PROLONG = str(ROOT / "jobs" / "configs" / "prolong-8b-512k.yaml")


def test_stage_config_applies_the_stage_keys_over_the_jobs():
    cfg = load_config(TWO_STAGE)
    first, second = stage_config(cfg, 0), stage_config(cfg, 1, model_path="/runs/x/stages/ctx512/train/final_model")
    assert (first.data.seq_len, first.model.rope_theta, first.model.path) == (512, 40000.0, "builtin:tiny-llama")
    assert (second.data.seq_len, second.model.rope_theta, second.model.max_position_embeddings) == (1024, 80000.0, 1024)
    assert second.model.path == "/runs/x/stages/ctx512/train/final_model" and second.stages == []
    assert second.train.lr == cfg.train.lr and second.eval.gate == cfg.eval.gate  # the rest: the job's


@pytest.mark.parametrize("stages, says", [
    ("[{name: a, data: {seq_lenn: 512}}]", "stages[0] (a)"),
    ("[{name: a, model: {path: x}}]", "stages.0.model.path: unknown key"),
    ("[{name: a}, {name: a}]", "names must differ"),
    ("[{name: a}, {name: b, train: {lr: -1}}]", "stages[1] (b)"),
    ("[{name: 'a b'}]", "stages.0.name"),
])
def test_a_bad_stage_is_named(stages, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, [f"stages={stages}"])


def test_preflight_checks_every_stage_and_names_it(tmp_path):
    ok = load_config(TWO_STAGE)
    assert check_job(ok, "pt") == []
    bad = load_config(TWO_STAGE, [f"stages=[{{name: s1}}, {{name: s2, data: {{sources: {{web: {tmp_path}/none/}}}}}}]"])
    problems = [p.line() for p in check_job(bad, "pt")]
    assert problems and all(p.startswith("stages[1] (s2) data.sources.web") for p in problems), problems


def test_prolong_recipe_fits_h100_in_every_stage(capsys):
    """`longctx plan` plans every stage of the shipped ProLong recipe on Llama-3-8B's shape (the preflight's memory
    check per stage); the 512K stage without its sequence parallelism does not fit (negative control)."""
    from longctx.cli import main
    from longctx.plan.planner import Planner

    cfg = load_config(PROLONG, ["model.path=builtin:model-shapes/llama-3.1-8b"])
    shape = json.loads(storage.read_text("builtin:model-shapes/llama-3.1-8b/config.json"))
    assert [s.name for s in cfg.stages] == ["64k", "512k"] and cfg.train.gpu_type == "h100"
    assert main(["plan", "--json", "--config", PROLONG, "--set", "model.path=builtin:model-shapes/llama-3.1-8b"]) == 0
    out = capsys.readouterr()
    plans = [json.loads(line) for line in out.out.strip().splitlines()]
    assert [p["fits"] for p in plans] == [True, True]
    assert "stage 1/2 64k:" in out.err and "stage 2/2 512k:" in out.err
    assert stage_config(cfg, 1).model.rope_theta == 1.28e8 and stage_config(cfg, 0).model.rope_theta == 8e6
    no_sp = load_config(PROLONG, ["model.path=builtin:model-shapes/llama-3.1-8b",
                                  "stages=" + json.dumps([cfg.stages[0].model_dump(exclude_unset=True),
                                                          {**cfg.stages[1].model_dump(exclude_unset=True),
                                                           "train": {"global_batch_tokens": 8388608}}])])
    assert Planner(stage_config(no_sp, 1), model_config=shape).plan().fits is False


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.ray
def test_two_stage_recipe_killed_in_stage_2_resumes_there(tmp_path):
    """`python jobs/long_pt.py --config jobs/configs/tiny-two-stage.yaml` (4 steps per stage): the driver is
    SIGKILLed once stage 2 has a checkpoint; the same command finishes the run from there (stage 1 reused, stage 2
    resumed), with the gate after each stage, one report row per stage and the last stage's model published."""
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"), RAY_raylet_start_wait_time_s="300")
    env.pop("RAY_ADDRESS", None)
    env.pop("LONGCTX_HOME", None)
    sets = ["output_dir=runs", "train.max_steps=4", "train.checkpoint_every=1", "eval.num_documents=4",
            "eval.passkey.trials=1", "eval.passkey.lengths=[1024]", "eval.gate.num_documents=4",
            "eval.gate.passkey_trials=1", "eval.gate.ruler_samples=5"]  # shortened: CI time
    cmd = [sys.executable, str(ROOT / "jobs" / "long_pt.py"), "--config", TWO_STAGE,
           *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    log1 = open(tmp_path / "attempt1.log", "w+")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT, text=True)
    snapshot = None
    while time.time() - t0 < 900 and proc.poll() is None:
        found = list((tmp_path / "runs").glob("long-pt-*/stages/ctx1k/train/checkpoint_manager_snapshot.json"))
        if found and "checkpoint_0000000" in found[0].read_text():
            snapshot = found[0]
            break
        time.sleep(0.5)
    assert snapshot, "no stage-2 checkpoint recorded: " + open(tmp_path / "attempt1.log").read()[-4000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = snapshot.parents[3]
    assert not (run / "final_model.txt").exists()
    t_kill = time.time() - t0

    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    final = proc.stdout.strip().splitlines()[-1]
    assert final == str(run / "stages" / "ctx1k" / "train" / "final_model")
    assert (run / "final_model.txt").read_text().strip() == final

    def events(folder):
        return [(a["attempt"], a["event"], a.get("action")) for a in
                map(json.loads, (folder / "attempts.jsonl").read_text().splitlines())]

    s1, s2 = events(run / "stages" / "ctx512"), events(run / "stages" / "ctx1k")
    assert (1, "train", "started") in s1 and (2, "train", "reused") in s1 and (2, "gate", "rejudged") in s1, s1
    assert (1, "train", "started") in s2 and (2, "train", "resumed") in s2 and (2, "gate", "ran") in s2, s2
    assert (2, "finished", None) in events(run)
    assert "[train] resumed at step" in log

    metrics = json.loads((run / "metrics.json").read_text())
    rows = metrics["stages"]
    assert [(r["stage"], r["seq_len"], r["rope_theta"], r["steps"]) for r in rows] == \
        [("ctx512", 512, 40000.0, 4), ("ctx1k", 1024, 80000.0, 4)]
    gate = metrics["gate"]
    assert list(gate["verdicts"]) == ["ctx512", "ctx1k"]
    for name, v in gate["verdicts"].items():
        assert v["length"] == 256 and {"nll", "passkey", "ruler/niah_single_1"} <= set(v["checks"]), (name, v)
        assert all({"base", "after", "limit", "passed"} <= set(c) for c in v["checks"].values())
    # each stage is checked against its own input: stage 2's "before" is stage 1's model
    assert gate["verdicts"]["ctx1k"]["before"] == rows[0]["final_model"]
    assert gate["verdicts"]["ctx1k"]["checks"]["nll"]["base"] == gate["verdicts"]["ctx512"]["checks"]["nll"]["after"]
    report = (run / "report.md").read_text()
    assert "## Stages" in report and "| ctx512 | pt | 512 |" in report and "| ctx1k | pt | 1,024 |" in report
    assert "## Regression gate" in report
    print(f"two-stage e2e: killed after {t_kill:.0f}s, resumed run {time.time() - t0 - t_kill:.0f}s")
