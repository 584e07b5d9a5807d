"""The main job end to end, as users run it: `python jobs/long_pt.py` on a shortened embedded default.

Runs the real script in a subprocess (its own local Ray, Ray Data, Ray Train + DeepSpeed on 2 gloo workers,
evaluation through Ray Data actors) and checks the artifacts it leaves, not just its exit code. The run folder
lives on the loopback S3 server, so checkpoints, final model, metrics and report all take the s3:// path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.s3
def test_long_pt_job_end_to_end_on_s3(s3_bucket, tmp_path):
    from longctx import storage

    out = f"{s3_bucket}/runs"
    cmd = [
        sys.executable, str(ROOT / "jobs" / "long_pt.py"),
        "--set", f"output_dir={out}",
        "--set", "run_name=e2e",
        "--set", "train.max_steps=3",
        "--set", "train.global_batch_tokens=4096",
        "--set", "eval.num_documents=4",
        "--set", "eval.passkey.trials=1",
        "--set", "eval.passkey.lengths=[256, 1024]",
        "--set", "eval.passkey.depths=[0.5]",
    ]
    env = dict(os.environ, RAY_ADDRESS="", LONGCTX_CACHE=str(tmp_path / "cache"))
    env.pop("RAY_ADDRESS")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    final_model = lines[-1].strip()
    assert final_model.startswith(f"{out}/e2e/"), lines[-5:]
    assert "[longctx] data done" in proc.stdout and "[longctx] train done" in proc.stdout

    run = f"{out}/e2e"
    metrics = json.loads(storage.read_text(f"{run}/metrics.json"))
    assert metrics["train"]["steps"] == 3
    assert metrics["data"]["rows"] > 0
    report = storage.read_text(f"{run}/report.md")
    assert "naive" in report.lower() and "Long-PT" in report
    pngs = [p for p in storage.expand(run) if p.endswith(".png")]
    assert pngs, "no plots in the run folder"
    # the report reads true: a loss curve, the lengths histogram linked, no raw dict, no absolute path
    import re

    assert "![training loss](loss_curve.png)" in report
    assert storage.read_bytes(f"{run}/loss_curve.png")[:4] == b"\x89PNG"
    assert "(mean of the first" in report and "Batch layout:" in report
    assert "](data/lengths.png)" in report and storage.read_bytes(f"{run}/data/lengths.png")[:4] == b"\x89PNG"
    assert not re.search(r"\{['\"]", report), "a raw Python dict in the report"
    assert "s3://" not in report and str(tmp_path) not in report, "an absolute path in the report"
    # every step line once (Ray Train's patched print showed each twice), with elapsed time and ETA
    for step in (1, 2, 3):
        assert log.count(f"[train] step {step}/3 |") == 1, log[-4000:]
    assert re.search(r"\[train\] step 3/3 \|.*\| elapsed \S+ \| eta 0s", log)
    assert "[longctx] eval:" in log and "[longctx] tokenize:" in log
    # TensorBoard event files in the run folder hold the same scalars as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    for sub in ("train", "eval"):
        events = [p for p in storage.expand(f"{run}/{sub}/tensorboard") if "tfevents" in p]
        assert events, f"no event files under {run}/{sub}/tensorboard"
        (tb / sub).mkdir(parents=True)
        for p in events:
            (tb / sub / p.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(p))
    acc = EventAccumulator(str(tb / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [json.loads(x) for x in storage.read_text(f"{run}/train/metrics.jsonl").splitlines()]
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(
        {r["step"]: r["loss"] for r in steps}, rel=1e-6)
    assert {e.step: e.value for e in acc.Scalars("train/tokens_per_s")} == pytest.approx(
        {r["step"]: r["tokens_per_s"] for r in steps}, rel=1e-6)
    acc = EventAccumulator(str(tb / "eval"), size_guidance={"scalars": 0})
    acc.Reload()
    trained = next(n for n, m in metrics["eval"]["models"].items() if m["spec"]["role"] == "trained")
    (nll,) = acc.Scalars(f"eval/{trained}/overall_nll")
    assert nll.step == 3 and nll.value == pytest.approx(metrics["eval"]["models"][trained]["perplexity"]["overall_nll"],
                                                        rel=1e-6)
    assert yaml_loads(storage.read_text(f"{run}/config.yaml"))["train"]["max_steps"] == 3

    # the final model is a committed HF folder on S3 that from_pretrained loads, with the new RoPE base
    storage.require_committed(final_model)
    from longctx.model.load import load_causal_lm

    model = load_causal_lm(final_model)
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(80000.0)
    assert model.config.max_position_embeddings == 1024


def yaml_loads(text: str):
    import yaml

    return yaml.safe_load(text)
