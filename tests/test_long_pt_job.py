"""The main job end to end, as users run it: `python jobs/long_pt.py --config jobs/configs/tiny-two-stage.yaml`
(the laptop two-stage recipe: the shipped base continued at 512 tokens, then at 1024), shortened.

Runs the real script in a subprocess (its own local Ray, Ray Data, Ray Train + DeepSpeed on 2 gloo workers, the
regression gate after each stage, evaluation through Ray Data actors) and checks the artifacts it leaves, not just
its exit code. The run folder lives on the loopback S3 server, so checkpoints, final models, metrics and report all
take the s3:// path. (One test for the single-stage and the multi-stage path: both are the same chain, and the
single-stage default itself runs as the README's first command in tests/test_readme.py.)

Resubmit = resume: the first attempt's driver is SIGKILLed once Ray Train has recorded a checkpoint of stage 2; the
same command run again finds the run by its default name (`long-pt-<fingerprint>`), reuses stage 1 (its data, its
final model, its recorded gate verdict judged again) and stage 2's committed data without reading the corpus,
continues stage 2 from that checkpoint, gates, evaluates and reports. A third run says the run is finished; a
changed setting is refused with the key named. An uninterrupted one-stage run of stage 2 on the same data, from
stage 1's model, is the reference for the final loss.
"""

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

from longctx.train.batches import lane_step_rows

ROOT = Path(__file__).resolve().parents[1]
TWO_STAGE = str(ROOT / "jobs" / "configs" / "tiny-two-stage.yaml")
SECRET = "e2e-secret-9c41f07d"
STEPS = 3  # per stage

SETTINGS = [  # shortened: CI time
    f"train.max_steps={STEPS}",
    "eval.num_documents=4",
    "eval.passkey.trials=1",
    "eval.passkey.lengths=[256, 1024]",
    "eval.passkey.depths=[0.5]",
    "eval.gate.num_documents=4",
    "eval.gate.passkey_trials=1",
    "eval.gate.ruler_samples=5",
]


def _cmd(*sets: str, config: str = TWO_STAGE) -> list[str]:
    out = [sys.executable, str(ROOT / "jobs" / "long_pt.py"), "--config", config]
    for s in [*SETTINGS, *sets]:
        out += ["--set", s]
    return out


def _session_alive(session: str) -> list[int]:
    from longctx.raycluster import session_processes

    return session_processes(session)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.ray
def test_two_stage_job_killed_in_stage_2_and_resubmitted_on_s3(s3_bucket, tmp_path):
    from longctx import storage

    out = f"{s3_bucket}/runs"
    # NOTE: on a shared 2-core machine a local Ray node can take over a minute to register (Ray's default wait: 60 s)
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"), RAY_raylet_start_wait_time_s="300",
               AWS_SECRET_ACCESS_KEY=SECRET)  # the loopback server takes any key: the grep below looks for it
    env.pop("RAY_ADDRESS", None)
    env.pop("LONGCTX_HOME", None)
    cmd = _cmd(f"output_dir={out}", "train.checkpoint_every=1")

    # -- attempt 1: SIGKILL the driver once Ray Train has recorded stage 2's first checkpoint
    t0 = time.time()
    log1 = open(tmp_path / "attempt1.log", "w+")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT, text=True)
    snapshot = None
    pattern = f"{out}/long-pt-*/stages/ctx1k/train/checkpoint_manager_snapshot.json"
    while time.time() - t0 < 900 and proc.poll() is None:
        found = storage.expand(pattern) if storage.exists(out) else []
        if found and "checkpoint_0000000" in storage.read_text(found[0]):
            snapshot = found[0]
            break
        time.sleep(0.5)
    assert snapshot, "no stage-2 checkpoint recorded: " + open(tmp_path / "attempt1.log").read()[-4000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log1.seek(0)
    first = log1.read()
    run = snapshot.rsplit("/stages/", 1)[0]
    s1, s2 = f"{run}/stages/ctx512", f"{run}/stages/ctx1k"
    assert run.rsplit("/", 1)[-1].startswith("long-pt-") and not storage.exists(f"{run}/final_model.txt")
    assert "[longctx] stage 2/2 ctx1k" in first, first[-4000:]
    first_s1, first_s2 = first.split("[longctx] stage 2/2 ctx1k", 1)
    steps_before_kill = max([int(n) for n in re.findall(r"\[train\] step (\d+)", first_s2)] or [0])

    # the killed driver's local Ray cluster ends with it (no GCS, raylet, agent or worker of its session lingers)
    session = next(line.split("session_name=")[1].split()[0] for line in first.splitlines()
                   if "session_name=" in line) if "session_name=" in first else None
    if session:
        deadline = time.time() + 30
        while _session_alive(session) and time.time() < deadline:
            time.sleep(0.5)
        assert not _session_alive(session), f"Ray processes of the killed driver survive: {_session_alive(session)}"
    t_kill = time.time() - t0

    # -- attempt 2: the same command finds the run and finishes it from stage 2's checkpoint
    marker_before = {s: storage.read_text(f"{s}/data/_COMMITTED") for s in (s1, s2)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    final_model = lines[-1].strip()
    assert final_model == f"{s2}/train/final_model", lines[-5:]
    assert storage.read_text(f"{run}/final_model.txt").strip() == final_model

    def events(folder):
        return [(a["attempt"], a["event"], a.get("action")) for a in
                map(json.loads, storage.read_text(f"{folder}/attempts.jsonl").splitlines())]

    e1, e2, e_run = events(s1), events(s2), events(run)
    # stage 1 is reused whole (its recorded gate judged again), stage 2 resumes; both stages' data is reused
    assert (1, "data", "prepared") in e1 and (2, "data", "reused") in e1, e1
    assert (1, "train", "started") in e1 and (2, "train", "reused") in e1 and (2, "gate", "rejudged") in e1, e1
    assert (1, "data", "prepared") in e2 and (2, "data", "reused") in e2, e2
    assert (1, "train", "started") in e2 and (2, "train", "resumed") in e2 and (2, "gate", "ran") in e2, e2
    assert (2, "eval", "ran") in e_run and (2, "finished", None) in e_run, e_run
    # the corpus was not read again: no pass 1, and the committed data is untouched
    assert not re.search(r"^packed \d+ rows x", proc.stdout, re.M) and "the corpus is not read" in proc.stdout
    assert re.search(r"^packed \d+ rows x", first_s2, re.M)  # (attempt 1's pass 2 summary: the check can fail)
    assert {s: storage.read_text(f"{s}/data/_COMMITTED") for s in (s1, s2)} == marker_before
    attempts2 = [json.loads(x) for x in storage.read_text(f"{s2}/attempts.jsonl").splitlines()]
    resumed_from = next(a["from_step"] for a in attempts2 if a["event"] == "train" and a["attempt"] == 2)
    assert 1 <= resumed_from <= STEPS and f"[train] resumed at step {resumed_from}" in log
    assert steps_before_kill - resumed_from <= 1, "more steps redone than the checkpoint interval"

    metrics = json.loads(storage.read_text(f"{run}/metrics.json"))
    assert metrics["train"]["steps"] == STEPS
    from longctx.data.pipeline import load_manifest

    rows2 = sum(shard["rows"] for shard in load_manifest(f"{s2}/data")["shards"])
    history = [json.loads(x) for x in storage.read_text(f"{s2}/train/metrics.jsonl").splitlines()]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    used = [i for h in history for i in h["row_ids"]]
    assert len(used) == len(set(used)), "a row was trained on twice"
    # each of the 2 ranks reads its own half of the rows (its lane), 2 rows per step: none skipped
    lanes = lane_step_rows(rows2, 2, 2, STEPS)
    assert [h["row_ids"] for h in history] == [sorted(r) for r in lanes], "a row was skipped"

    # one row per stage, each from the previous stage's model, with the gate after each
    rows = metrics["stages"]
    assert [(r["stage"], r["seq_len"], r["rope_theta"], r["steps"]) for r in rows] == \
        [("ctx512", 512, 40000.0, STEPS), ("ctx1k", 1024, 80000.0, STEPS)]
    assert rows[1]["final_model"] == final_model and rows[0]["final_model"] == f"{s1}/train/final_model"
    gate = metrics["gate"]
    assert list(gate["verdicts"]) == ["ctx512", "ctx1k"]
    for name, v in gate["verdicts"].items():
        assert v["length"] == 256 and {"nll", "passkey", "ruler/niah_single_1"} <= set(v["checks"]), (name, v)
        assert all({"base", "after", "limit", "passed"} <= set(c) for c in v["checks"].values())
    # each stage is checked against its own input: stage 2's "before" is stage 1's model
    assert gate["verdicts"]["ctx1k"]["before"] == rows[0]["final_model"]
    assert gate["verdicts"]["ctx1k"]["checks"]["nll"]["base"] == gate["verdicts"]["ctx512"]["checks"]["nll"]["after"]

    report = storage.read_text(f"{run}/report.md")
    assert "naive" in report.lower() and "Long-PT" in report
    assert "## Stages" in report and "| ctx512 | pt | 512 |" in report and "| ctx1k | pt | 1,024 |" in report
    assert "## Regression gate" in report
    assert "- stage ctx1k (the last), from `stages/ctx512/train/final_model`, rope_theta 80000.0" in report
    pngs = [p for p in storage.expand(run) if p.endswith(".png")]
    assert pngs, "no plots in the run folder"
    # the report reads true: a loss curve, the lengths histogram linked, no raw dict, no absolute path
    loss_png = re.search(r"!\[training loss\]\(([^)]+\.png)\)", report)
    assert loss_png and storage.read_bytes(f"{run}/{loss_png.group(1)}")[:4] == b"\x89PNG", report[:3000]
    lengths_png = re.search(r"\]\(([^)]*data/lengths\.png)\)", report)
    assert lengths_png and storage.read_bytes(f"{run}/{lengths_png.group(1)}")[:4] == b"\x89PNG"
    assert "(mean of the first" in report and "Batch layout:" in report
    assert not re.search(r"\{['\"]", report), "a raw Python dict in the report"
    assert "s3://" not in report and str(tmp_path) not in report, "an absolute path in the report"
    # every step line once per attempt that ran it (Ray Train's patched print showed each twice), with elapsed time
    # and ETA; the first attempt tokenized, the second evaluated
    for step in range(1, STEPS + 1):
        assert first_s1.count(f"[train] step {step}/{STEPS} |") == 1, first_s1[-4000:]
    for step in range(1, steps_before_kill + 1):
        assert first_s2.count(f"[train] step {step}/{STEPS} |") == 1, first_s2[-4000:]
    for step in range(resumed_from + 1, STEPS + 1):
        assert log.count(f"[train] step {step}/{STEPS} |") == 1, log[-4000:]
    assert re.search(rf"\[train\] step {STEPS}/{STEPS} \|.*\| elapsed \S+ \| eta 0s", log)
    assert "[longctx] eval:" in log and "[longctx] tokenize:" in first and "[longctx] tokenize:" not in log
    # quiet by default: our lines, not Ray Data's progress blocks, Ray Train's bookkeeping, progress bars or warnings
    # we cause (--verbose shows them); the packing-isolation line once per training start
    for noise in ("logging_progress", "Reporting training result", "Loading weights", "Writing model shards",
                  "is illegal", "FutureWarning", "Started a local Ray instance", "Traceback"):
        assert noise not in first + log, noise
    assert first_s1.count("[train] packing isolation") == 1 and first_s2.count("[train] packing isolation") == 1, \
        first[-4000:]
    # TensorBoard event files in the run folder hold the same scalars as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    for sub, folder in (("train", f"{s2}/train"), ("eval", f"{run}/eval")):
        found = [p for p in storage.expand(f"{folder}/tensorboard") if "tfevents" in p]
        assert found, f"no event files under {folder}/tensorboard"
        (tb / sub).mkdir(parents=True)
        for p in found:
            (tb / sub / p.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(p))
    acc = EventAccumulator(str(tb / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    # the steps the resumed attempt ran are all there; steps of the killed attempt as far as it uploaded them;
    # a step logged by both attempts reads as the resumed one's (purge_step)
    for name, field in (("train/loss", "loss"), ("train/tokens_per_s", "tokens_per_s")):
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert set(range(resumed_from + 1, STEPS + 1)) <= set(got) <= set(range(1, STEPS + 1)), (name, got)
        assert got == pytest.approx({r["step"]: r[field] for r in history if r["step"] in got}, rel=1e-6)
    acc = EventAccumulator(str(tb / "eval"), size_guidance={"scalars": 0})
    acc.Reload()
    trained = next(n for n, m in metrics["eval"]["models"].items() if m["spec"]["role"] == "trained")
    (nll,) = acc.Scalars(f"eval/{trained}/overall_nll")
    assert nll.step == STEPS and nll.value == pytest.approx(
        metrics["eval"]["models"][trained]["perplexity"]["overall_nll"], rel=1e-6)
    assert yaml_loads(storage.read_text(f"{run}/config.yaml"))["train"]["max_steps"] == STEPS

    # the final model is a committed HF folder on S3 that from_pretrained loads, with the last stage's RoPE base
    storage.require_committed(final_model)
    from longctx.model.load import load_causal_lm

    model = load_causal_lm(final_model)
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(80000.0)
    assert model.config.max_position_embeddings == 1024

    # -- attempt 3: a finished run says so, exits 0 and still prints the final model last (no Ray started)
    t1 = time.time()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already finished" in proc.stdout and proc.stdout.strip().splitlines()[-1] == final_model
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    t_done = time.time() - t1

    # -- a setting that changes the results is refused, naming the key
    name = run.rsplit("/", 1)[-1]
    proc = subprocess.run(_cmd(f"output_dir={out}", f"run_name={name}", "train.lr=0.002"), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "train.lr: 0.001 -> 0.002" in proc.stderr, proc.stderr[-3000:]

    # -- the uninterrupted reference: stage 2 as a one-stage job on its committed data, from stage 1's model
    proc = subprocess.run(_cmd(f"output_dir={tmp_path}/ref", "run_name=ref", "stages=[]", "data.seq_len=1024",
                               "model.rope_theta=80000.0", "model.max_position_embeddings=1024",
                               f"model.path={rows[0]['final_model']}", f"data.output={s2}/data",
                               "eval.enabled=false", "eval.gate.enabled=false"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ref = [json.loads(x) for x in (tmp_path / "ref" / "ref" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [h["row_ids"] for h in ref] == [h["row_ids"] for h in history]
    assert history[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-4)
    # no secret in anything the runs wrote or printed (credentials come from the environment only)
    for uri in storage.expand(out, hidden=True):
        assert SECRET.encode() not in storage.read_bytes(uri), uri
    assert SECRET not in first + log + proc.stdout + proc.stderr
    print(f"killed in stage 2 after {t_kill:.0f}s, finished-run rerun {t_done:.1f}s")


def yaml_loads(text: str):
    import yaml

    return yaml.safe_load(text)
