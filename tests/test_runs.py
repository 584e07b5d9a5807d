"""Runs you can trust, the parts that need no Ray: where outputs go, run names that a rerun finds, the class of
every config key, the refusal of a changed config or of inputs changed in place (content binding), one driver per
run (the lease) and appends that lose nothing, the checks of prepared data against a job, the typed worker
contract, and the floor plan of the imports. (The kill-and-resubmit chain itself is in test_long_pt_job.py.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from longctx import storage
from longctx.config import ConfigError, load_config


# ------------------------------------------------------------------------------------------- where outputs go
def test_relative_outputs_never_land_in_rays_working_dir_copy(tmp_path, monkeypatch):
    from longctx.runs.folder import resolve_output, resolve_outputs

    monkeypatch.delenv("LONGCTX_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ray_copy = str(tmp_path / "ray/session_x/runtime_resources/working_dir_files/_ray_pkg_abc123")
    os.makedirs(ray_copy)
    assert resolve_output("runs", cwd=ray_copy) == str(tmp_path / "home" / "longctx" / "runs")
    assert resolve_output("runs", cwd=str(tmp_path / "work")) == str(tmp_path / "work" / "runs")
    assert resolve_output("/abs/runs", cwd=ray_copy) == "/abs/runs"
    assert resolve_output("s3://b/runs", cwd=ray_copy) == "s3://b/runs"
    monkeypatch.setenv("LONGCTX_HOME", str(tmp_path / "lh"))
    assert resolve_output("runs", cwd=ray_copy) == str(tmp_path / "lh" / "runs")
    assert resolve_output("runs", cwd=str(tmp_path / "work")) == str(tmp_path / "lh" / "runs")

    monkeypatch.chdir(ray_copy)
    monkeypatch.delenv("LONGCTX_HOME")
    cfg = resolve_outputs(load_config(None, ["train.storage_path=ckpt", "data.output=packed"]))
    for path in (cfg.output_dir, cfg.train.storage_path, cfg.data.output):
        assert "_ray_pkg_" not in path and path.startswith(str(tmp_path / "home" / "longctx"))


def test_storage_path_takes_checkpoints_and_final_model(tmp_path):
    from longctx.runs.folder import train_root_for

    cfg = load_config(None, [])
    assert train_root_for(cfg, f"{tmp_path}/runs/r1", "r1") == f"{tmp_path}/runs/r1/train"
    cfg = load_config(None, [f"train.storage_path={tmp_path}/ckpt"])
    assert train_root_for(cfg, f"{tmp_path}/runs/r1", "r1") == f"{tmp_path}/ckpt/r1/train"
    s3 = load_config(None, ["train.storage_path=s3://b/ck"])
    assert train_root_for(s3, "s3://b/runs/r2", "r2") == "s3://b/ck/r2/train"


# ---------------------------------------------------------------------------------- names and fingerprints
def _leaf_keys(model, prefix: str = "") -> list[str]:
    """Every key of a pydantic config model, recursing into nested models (dicts and lists are leaves)."""
    import typing

    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        nested = [c for c in (ann, *typing.get_args(ann)) if isinstance(c, type) and issubclass(c, BaseModel)]
        if nested and typing.get_origin(ann) not in (dict, list):
            out += _leaf_keys(nested[0], f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_every_config_key_has_a_class():
    from longctx.config import JobConfig
    from longctx.runs.identity import NOT_RESULT_KEYS, RESULT_KEYS, key_class

    keys = _leaf_keys(JobConfig)
    assert len(keys) > 170 and "model.rope_scaling.factor" in keys and "eval.during_training.actors" in keys
    missing = [k for k in keys if key_class(k) is None]
    assert not missing, (f"config keys without a class: {missing}; add each to RESULT_KEYS (it changes what a run "
                         f"computes) or NOT_RESULT_KEYS (where/how fast it runs, what it logs) in "
                         f"platform/longctx/runs/identity.py")
    assert not RESULT_KEYS & NOT_RESULT_KEYS
    assert not (RESULT_KEYS | NOT_RESULT_KEYS) - set(keys), "a class for a key the config does not have"
    # the classes the README states
    for k in ("logging.wandb.enabled", "logging.mlflow.tracking_uri", "eval.batch_size", "eval.during_training.actors",
              "eval.during_training.num_cpus", "ray.num_cpus", "train.num_workers", "train.checkpoint_every"):
        assert key_class(k) == "not result", k
    for k in ("storage.endpoint_url", "train.resources_per_worker", "train.lr", "data.seq_len", "model.path"):
        assert key_class(k) == "result", k
    # negative control: a key the walk finds but no list names fails the check
    assert key_class("train.some_new_knob") is None


def test_default_run_name_follows_the_settings_that_shape_results():
    from longctx.runs.folder import run_id_for

    a = run_id_for(load_config(None, []), "long-pt")
    assert a.startswith("long-pt-") and len(a) == len("long-pt-") + 10
    # where and how fast it runs, how much it logs and how many workers share the batch do not change the run
    same = load_config(None, ["ray.num_cpus=8", "output_dir=/elsewhere", "train.log_every=5",
                              "train.checkpoint_every=7", "eval.num_actors=3", "data.num_tokenize_actors=4",
                              "tune.max_concurrent_trials=2", "logging.wandb.enabled=true", "eval.batch_size=1",
                              "eval.during_training.actors=3", "eval.during_training.num_cpus=0.5",
                              "train.num_workers=1", "logging.tensorboard=false", "storage.read_retries=1"])
    assert run_id_for(same, "long-pt") == a
    for change in ("train.lr=1e-3", "data.seed=1", "model.rope_theta=1e6", "eval.num_documents=3",
                   "storage.endpoint_url=http://127.0.0.1:9", "train.resources_per_worker={gpu_a100: 1}"):
        assert run_id_for(load_config(None, [change]), "long-pt") != a, change
    assert run_id_for(load_config(None, ["run_name=mine"]), "long-pt") == "mine"
    # one rule: the folder, the trackers and Ray Train all get the slugged id
    assert run_id_for(load_config(None, ["run_name=my run"]), "long-pt") == "my-run"


def test_changed_settings_are_named_and_refused(tmp_path):
    from longctx.runs.folder import open_run
    from longctx.runs.identity import ResumeRefused, differences

    base = [f"output_dir={tmp_path}", "run_name=r"]
    run = open_run(load_config(None, base), "long-pt")
    assert run.attempt_no == 1 and run.finished is None
    # speed and placement settings may change between attempts
    again = open_run(load_config(None, base + ["ray.num_cpus=3", "train.max_failures=2", "eval.batch_size=1"]),
                     "long-pt")
    assert again.attempt_no == 2
    with pytest.raises(ResumeRefused, match=r"train.global_batch_tokens: 8192 -> 16384.*data.seed: 0 -> 1|"
                                            r"data.seed: 0 -> 1.*train.global_batch_tokens: 8192 -> 16384"):
        open_run(load_config(None, base + ["data.seed=1", "train.global_batch_tokens=16384"]), "long-pt")
    assert differences(load_config(None, []), load_config(None, ["ray.num_cpus=2", "storage.read_retries=1"])) == []
    events = [json.loads(x)["event"] for x in (tmp_path / "r" / "attempts.jsonl").read_text().splitlines()]
    assert events == ["started", "started"]  # the refused attempt wrote nothing
    run.close()
    again.close()


def test_a_finished_run_says_so(tmp_path, capsys):
    from longctx.runs.folder import open_run, record_attempt
    from longctx.runs.steps import already_finished

    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=done"])
    run = open_run(cfg, "long-pt")
    storage.write_json(run.path("metrics.json"), {"run_id": "done"})
    record_attempt(run.root, "finished", attempt=1, final_model="s3://b/m", report=run.path("report.md"))
    run.close()
    capsys.readouterr()
    again = open_run(cfg, "long-pt")
    assert again.finished and again.finished["final_model"] == "s3://b/m"
    assert already_finished(again) == {"run_id": "done"}
    out = capsys.readouterr().out.strip().splitlines()
    assert "already finished" in out[0] and out[-1] == "s3://b/m"
    assert not again.leases and not (tmp_path / "done" / "lease.json").exists()  # nothing to do: no lease taken


# ---------------------------------------------------------------------------------------- prepared data
def _manifest(cfg, **over) -> dict:
    from longctx.data.fingerprint import data_fingerprint, data_tree, tokenizer_fingerprint

    m = {"kind": "longctx.packed_sequences", "seq_len": cfg.data.seq_len, "attention": cfg.data.attention,
         "tokenizer": {"uri": cfg.data.tokenizer, "vocab_size": 256,
                       "fingerprint": tokenizer_fingerprint(cfg.data.tokenizer)},
         "data_fingerprint": data_fingerprint(cfg), "data_config": data_tree(cfg)}
    m.update(over)
    return m


def test_prepared_data_is_checked_against_the_job():
    from longctx.runs.handoff import PreparedDataMismatch, check_packed_data, model_vocab_size, require_packed_data

    cfg = load_config(None, [])
    assert check_packed_data(cfg, _manifest(cfg), "pt", same_config=True) == []
    vocab = model_vocab_size(cfg.model.path)
    assert vocab and vocab >= 256
    bad = _manifest(cfg, seq_len=2048, attention="full", kind="sft")
    bad["tokenizer"] = {**bad["tokenizer"], "fingerprint": "0" * 64, "vocab_size": vocab + 1}
    problems = check_packed_data(cfg, {**bad, "uri": "s3://b/packed"}, "pt")
    text = "\n".join(problems)
    assert len(problems) == 5, problems  # kind, seq_len, attention, tokenizer, vocabulary: all at once
    assert "Long-SFT chats" in text and "2048 tokens, data.seq_len is 1024" in text
    assert "another tokenizer" in text and f"the model {cfg.model.path} has {vocab}" in text
    assert "data.attention" in "\n".join(check_packed_data(cfg, _manifest(cfg, attention="full"), "pt"))
    # a rerun reusing its own data: the recorded data settings must match, the differing keys are named
    other = load_config(None, ["data.seed=3", "data.strategy=global"])
    with pytest.raises(PreparedDataMismatch, match=r"data.seed: 3 -> 0.*data.strategy: 'global' -> 'per-source'"):
        require_packed_data(cfg, _manifest(other), "pt", same_config=True)
    # ... which data.prepared (another job's data, by design) does not ask for
    assert check_packed_data(cfg, _manifest(other), "pt") == []


def test_a_committed_output_is_found_before_pass_1(tmp_path):
    from longctx.data.pipeline import prepare_data

    out = tmp_path / "packed"
    out.mkdir()
    (out / storage.COMMIT_MARKER).write_text("{}")
    # the source does not exist: reaching pass 1 would fail on it instead
    cfg = load_config(None, [f"data.sources.web={tmp_path}/missing/*.jsonl", f"data.output={out}"])
    with pytest.raises(storage.StorageError, match="already published"):
        prepare_data(cfg)


def test_preflight_checks_prepared_data_instead_of_the_corpus(tmp_path):
    from longctx import preflight

    data = tmp_path / "packed"
    data.mkdir()
    base = ["data.sources.web=/nonexistent/*.jsonl", f"data.prepared={data}", "eval.enabled=false"]
    cfg = load_config(None, base)
    lines = [p.line() for p in preflight.check_job(cfg, "pt")]
    assert any("not a committed packed dataset" in x for x in lines), lines
    assert not any("data.sources" in x for x in lines), "the corpus is not used with data.prepared"
    (data / "manifest.json").write_text(json.dumps(_manifest(load_config(None, ["data.seq_len=2048"]))))
    (data / storage.COMMIT_MARKER).write_text("{}")
    lines = [p.line() for p in preflight.check_job(cfg, "pt")]
    assert [x for x in lines if x.startswith("data.prepared")] == [
        f"data.prepared: {data}: rows are 2048 tokens, data.seq_len is 1024; fix: prepare data for this job's "
        f"settings (jobs/prepare_data.py), or match the job to the data"], lines
    assert not [p for p in preflight.check_job(load_config(None, base + ["data.seq_len=2048"]), "pt")
                if p.where == "data.prepared"]


def test_the_training_loop_gets_a_typed_spec():
    from longctx.train.batches import PackedRow, collate
    from longctx.train.schedule import derive_layout
    from longctx.train.spec import LoopSpec

    cfg = load_config(None, ["train.lr=0.5", "data.seq_len=64"])
    layout = derive_layout(global_batch_tokens=256, seq_len=64, micro_batch_size=1, num_workers=2)
    spec = LoopSpec(job=cfg, layout=layout, total_steps=5, train_root="/tmp/r/train", run_id="r",
                    fail_at={"step": 3, "trigger_file": "/tmp/x"})
    again = LoopSpec.from_loop_config(spec.to_loop_config())
    assert again is spec and again.job.train.lr == 0.5 and again.layout.grad_accum == 2 and again.seq_len == 64
    with pytest.raises(TypeError, match="expected"):
        LoopSpec.from_loop_config({"job": cfg.model_dump(), "total_steps": 5})  # the old untyped dict
    # one row length: the layout's must be data.seq_len, and every row read is compared with it
    with pytest.raises(ValueError, match=r"rows are 128 tokens, data.seq_len is 64"):
        LoopSpec(job=cfg, layout=derive_layout(global_batch_tokens=256, seq_len=128, micro_batch_size=1,
                                               num_workers=2), total_steps=5, train_root="/tmp/r/train", run_id="r")
    ids = np.arange(32)
    row = PackedRow(row_id=7, input_ids=ids, position_ids=ids, labels=ids, seg_lengths=[32], seg_is_pad=[False])
    assert collate([row], "document", 32).tokens == 32
    with pytest.raises(ValueError, match=r"row 7: 32 tokens.*data.seq_len=64 tokens"):
        collate([row], "document", spec.seq_len)


# -------------------------------------------------------------------------------- resume bound to content
def _publish(uri: str, files: dict[str, bytes]) -> str:
    """A committed folder (the platform's own publish, marker with every file's sha256)."""
    with storage.publish_dir(uri, overwrite=True) as staging:
        for name, data in files.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
    return uri


def test_prepared_data_replaced_at_the_same_uri_is_refused(tmp_path):
    from longctx.runs.folder import open_run
    from longctx.runs.identity import ResumeRefused

    data = _publish(str(tmp_path / "packed"), {"manifest.json": b"{}", "part-00000.parquet": b"rows of attempt 1"})
    base = [f"output_dir={tmp_path}/runs", f"data.prepared={data}"]
    first = open_run(load_config(None, base), "long-pt")
    first.close()
    again = open_run(load_config(None, base), "long-pt")  # the same bytes: the same run, resumed
    assert again.run_id == first.run_id and again.attempt_no == 2
    again.close()
    _publish(data, {"manifest.json": b"{}", "part-00000.parquet": b"other rows, same URI"})
    # the default name follows the content: a new run, not a silent resume on other rows
    assert open_run(load_config(None, base), "long-pt").run_id != first.run_id
    with pytest.raises(ResumeRefused, match=rf"data.prepared \({data}\): its content changed"):
        open_run(load_config(None, base + [f"run_name={first.run_id}"]), "long-pt")


def test_the_runs_own_data_replaced_between_attempts_is_refused_before_training(tmp_path):
    from longctx.runs.folder import open_run
    from longctx.runs.identity import ResumeRefused, committed_content
    from longctx.runs.steps import train_step

    data = _publish(str(tmp_path / "packed"), {"part-00000.parquet": b"rows of attempt 1"})
    cfg = load_config(None, [f"output_dir={tmp_path}/runs", "run_name=r", f"data.output={data}"])
    run = open_run(cfg, "long-pt")
    run.bind("data", committed_content(data), data)  # what attempt 1's train step recorded before it trained
    run.close()
    assert json.loads((tmp_path / "runs" / "r" / "identity.json").read_text())["bindings"]["data"]
    _publish(data, {"part-00000.parquet": b"another preparation, same URI"})
    run = open_run(cfg, "long-pt")
    with pytest.raises(ResumeRefused, match=rf"the data at {data}.*data: its content changed"):
        train_step(run, run.cfg, data)  # refused before Ray Train starts (no Ray in this test)
    run.close()


def test_a_deepspeed_json_or_model_edited_in_place_is_refused(tmp_path):
    import shutil

    from longctx.runs.folder import open_run
    from longctx.runs.identity import ResumeRefused

    ds = tmp_path / "ds.json"
    ds.write_text('{"gradient_clipping": 1.0}')
    model = tmp_path / "model"
    shutil.copytree(storage.normalize("builtin:tiny-llama"), model)
    base = [f"output_dir={tmp_path}/runs", "run_name=r", f"train.deepspeed_config={ds}", f"model.path={model}"]
    open_run(load_config(None, base), "long-pt").close()
    ds.write_text('{"gradient_clipping": 1000.0}')
    with pytest.raises(ResumeRefused, match=rf"train.deepspeed_config \({ds}\): its content changed"):
        open_run(load_config(None, base), "long-pt")
    ds.write_text('{"gradient_clipping": 1.0}')
    open_run(load_config(None, base), "long-pt").close()  # restored: resumes
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "rope_theta": 1.0}))
    with pytest.raises(ResumeRefused, match=rf"model.path \({model}\): its content changed"):
        open_run(load_config(None, base), "long-pt")


def _fake_checkpoint(train_root: str, step: int) -> None:
    """What a checkpoint leaves for the resume checks: its folder with trainer_state.json."""
    folder = os.path.join(train_root, f"checkpoint_{step:08d}")
    os.makedirs(folder)
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"step": step}, f)


def test_a_new_output_dir_reaches_the_same_checkpoints_only_through_the_check(tmp_path, capsys):
    from longctx.runs.folder import claim_train_root, open_run
    from longctx.runs.identity import ResumeRefused

    base = ["run_name=r", f"train.storage_path={tmp_path}/ckpt"]
    run = open_run(load_config(None, base + [f"output_dir={tmp_path}/a"]), "long-pt")
    claim_train_root(run)  # what the train step records beside the checkpoints before it trains
    _fake_checkpoint(run.train_root, 2)
    run.close()
    assert run.train_root == f"{tmp_path}/ckpt/r/train" and os.path.exists(f"{run.train_root}/config.yaml")
    # another output_dir, the same run_name and storage_path: the same checkpoints, so the same check
    with pytest.raises(ResumeRefused, match=r"ckpt/r/train/config.yaml was made with other settings.*train.lr: "
                                            r"1e-05 -> 0.01"):
        open_run(load_config(None, base + [f"output_dir={tmp_path}/b", "train.lr=1e-2"]), "long-pt")
    capsys.readouterr()
    moved = open_run(load_config(None, base + [f"output_dir={tmp_path}/b"]), "long-pt")  # same settings: said
    assert f"started by the run folder {tmp_path}/a/r" in capsys.readouterr().out
    moved.close()


def test_a_changed_storage_path_or_worker_count_on_a_checkpoint_is_refused(tmp_path):
    from longctx.runs.folder import claim_train_root, open_run
    from longctx.runs.identity import ResumeRefused
    from longctx.runs.steps import train_step

    base = [f"output_dir={tmp_path}/runs", "run_name=r", "train.num_workers=2"]
    run = open_run(load_config(None, base + [f"train.storage_path={tmp_path}/ckpt"]), "long-pt")
    claim_train_root(run)
    _fake_checkpoint(run.train_root, 4)
    run.close()
    with pytest.raises(ResumeRefused, match=rf"train.storage_path changed .*{tmp_path}/ckpt/r/train \(a checkpoint "
                                            r"at step 4\).*start again from step 0"):
        open_run(load_config(None, base + [f"train.storage_path={tmp_path}/elsewhere"]), "long-pt")
    # fewer workers: a new run would compute the same, but this checkpoint holds per-rank state
    run = open_run(load_config(None, base + [f"train.storage_path={tmp_path}/ckpt", "train.num_workers=1",
                                             "train.global_batch_tokens=8192"]), "long-pt")
    with pytest.raises(ResumeRefused, match=r"checkpoint at step 4 written by another layout \(train.num_workers: 2 "
                                            r"-> 1\)"):
        train_step(run, run.cfg, str(tmp_path / "no-data"))  # refused before Ray Train starts
    run.close()


# -------------------------------------------------------------------------------------------- one owner
HOLD = """
import sys, time
from longctx.config import ConfigError, load_config
from longctx.runs.folder import open_run
run = open_run(load_config(None, sys.argv[1:]), "long-pt")
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_driver_on_a_live_run_is_refused_and_a_stale_lease_taken_over(tmp_path, capsys):
    import socket
    import subprocess
    import sys
    import time

    from longctx.runs.folder import open_run
    from longctx.runs.lease import LEASE_FILE, RunInUse, STALE_AFTER_S

    base = [f"output_dir={tmp_path}", "run_name=r"]
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *base], stdout=subprocess.PIPE, text=True)
    try:
        assert any(line.strip() == "holding" for line in iter(proc.stdout.readline, "")), "no first driver"
        with pytest.raises(RunInUse, match=rf"another driver \(host {socket.gethostname()}, pid {proc.pid}"):
            open_run(load_config(None, base), "long-pt")
        events = [json.loads(x) for x in (tmp_path / "r" / "attempts.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events] == ["started"] and events[0]["pid"] == proc.pid  # nothing written
    finally:
        proc.kill()
        proc.wait()
    # its driver is gone (killed, no cleanup): the lease is stale and taken over, with a message
    capsys.readouterr()
    run = open_run(load_config(None, base), "long-pt")
    assert f"taking over the stale lease of {tmp_path}/r (host {socket.gethostname()}, pid {proc.pid}" in \
        capsys.readouterr().out
    assert json.loads((tmp_path / "r" / LEASE_FILE).read_text())["pid"] == os.getpid()
    run.close()
    # a driver on another host is live while it beats, stale once it stops
    lease = tmp_path / "r" / LEASE_FILE
    other = {"host": "other-node", "pid": 1, "owner": "x", "heartbeat": time.time()}
    lease.write_text(json.dumps(other))
    with pytest.raises(RunInUse, match="host other-node"):
        open_run(load_config(None, base), "long-pt")
    lease.write_text(json.dumps({**other, "heartbeat": time.time() - STALE_AFTER_S - 1}))
    open_run(load_config(None, base), "long-pt").close()


APPEND = """
import sys
from longctx.runs.folder import record_attempt
for i in range(int(sys.argv[2])):
    record_attempt(sys.argv[1], "tick", writer=sys.argv[3], i=i, pad="x" * 200)
"""


def test_concurrent_appends_from_two_processes_lose_no_line(tmp_path):
    import subprocess
    import sys

    from longctx.runs.folder import read_attempts

    root = str(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "-c", APPEND, root, "150", w]) for w in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    got = read_attempts(root)
    assert len(got) == 300, f"{300 - len(got)} of 300 lines lost"
    for w in ("a", "b"):
        assert [r["i"] for r in got if r["writer"] == w] == list(range(150))


def test_recipes_are_data_over_the_same_steps():
    from longctx.runs.recipes import EVAL, LONG_PT, LONG_SFT, Stage

    assert (LONG_PT.stage.data, LONG_SFT.stage.data, EVAL.stage) == ("pt", "sft", None)
    assert (LONG_PT.evaluate, LONG_SFT.evaluate, EVAL.evaluate) == ("trained", None, "given")
    cfg = load_config(None, [])
    assert Stage("long-pt", "pt").config(cfg) is cfg
    # a stage of a multi-stage recipe: its overrides, from the previous stage's final model
    final = "s3://b/r/train/final_model"
    second = Stage("32k", "pt", {"data.seq_len": 2048, "model.rope_theta": 3.2e5}).config(cfg, final)
    assert (second.data.seq_len, second.model.rope_theta, second.model.path) == (2048, 3.2e5, final)
    with pytest.raises(ConfigError, match="data.seq_len"):
        Stage("bad", "pt", {"data.seq_len": 1}).config(cfg)


def test_the_lease_beats_while_held_and_yields_when_taken_over(tmp_path, monkeypatch):
    import time

    from longctx.runs import lease as lease_mod

    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.05)
    held = lease_mod.Lease.acquire(str(tmp_path / "r"), "r")
    uri = tmp_path / "r" / lease_mod.LEASE_FILE
    first = json.loads(uri.read_text())["heartbeat"]
    deadline = time.time() + 30
    while json.loads(uri.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads(uri.read_text())["heartbeat"] > first, "no heartbeat was written"
    # another driver took it over (its own lease file): this one stops beating and does not delete it on release
    uri.write_text(json.dumps({"host": "other-node", "pid": 1, "owner": "theirs", "heartbeat": time.time()}))
    time.sleep(0.5)
    assert json.loads(uri.read_text())["owner"] == "theirs"
    held.release()
    assert json.loads(uri.read_text())["owner"] == "theirs"
