"""eval.during_training: every committed checkpoint is evaluated exactly once while training runs, also after a
resume, by a pool of actors with their own CPUs (training does not wait for them).

The fast tests check the ledger, the early stop, snapshot commit rules and one real evaluation in-process; the
slow one trains a tiny model under Ray Train with a worker killed mid-run and evaluates every checkpoint beside it.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from longctx import storage
from longctx.config import load_config
from longctx.eval import during_training as dt
from longctx.train import snapshots
from train_helpers import make_tiny_model, packed_rows, write_packed_shards


def _rec(step, passkey=None, nll=None):
    return {"step": step, "tokens": 100 * step, "passkey": passkey, "nll_beyond_base": nll}


def test_ledger_keeps_one_record_per_step_and_drops_only_a_torn_last_line(tmp_path):
    uri = str(tmp_path / "checkpoint_eval.jsonl")
    snapshots.write_ledger(uri, [_rec(3, 0.5), _rec(1, 0.0)])
    assert [r["step"] for r in snapshots.read_ledger(uri)] == [1, 3]
    with open(uri, "a") as f:  # a duplicate line (never written by the watcher, but must not double count)
        f.write(json.dumps(_rec(3, 0.9)) + "\n" + '{"step": 4, "tok')
    recs = snapshots.read_ledger(uri)
    assert [r["step"] for r in recs] == [1, 3] and recs[1]["passkey"] == 0.5  # first wins; torn line dropped
    with open(uri, "w") as f:  # a bad line in the middle is an error naming the file and line
        f.write('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"checkpoint_eval.jsonl: line 2"):
        snapshots.read_ledger(uri)


def test_early_stop_fires_only_when_retrieval_stops_improving():
    rising = [_rec(s, p) for s, p in enumerate([0.0, 0.2, 0.4, 0.6], 1)]
    assert not snapshots.should_stop(rising, "passkey", patience=2)
    flat = [_rec(s, p) for s, p in enumerate([0.0, 0.5, 0.5, 0.4], 1)]
    assert snapshots.should_stop(flat, "passkey", patience=2)
    assert not snapshots.should_stop(flat, "passkey", patience=3)  # 0.5 beat 0.0 within the last three
    assert not snapshots.should_stop(flat, "passkey", patience=0)  # off
    assert snapshots.should_stop([_rec(s, 0.5) for s in range(1, 4)] + [_rec(4, 0.52)], "passkey", 1, min_delta=0.05)
    nll = [_rec(s, None, v) for s, v in enumerate([3.0, 2.9, 2.95, 2.91], 1)]
    assert snapshots.should_stop(nll, "neg_nll_beyond_base", patience=2)
    assert not snapshots.should_stop(nll[:3] + [_rec(4, None, 2.8)], "neg_nll_beyond_base", patience=2)
    assert snapshots.tune_metrics(nll)["ckpt_neg_nll_beyond_base"] == pytest.approx(-2.91)
    assert snapshots.tune_metrics([]) == {}


def test_snapshots_count_only_when_committed_and_resume_republishes_a_missing_one(tmp_path):
    root = str(tmp_path / "train")
    half = snapshots.eval_snapshot_uri(root, 2)
    os.makedirs(half)  # a writer died mid-publish: no _COMMITTED marker
    model = make_tiny_model(str(tmp_path / "ck" / "hf_model"), hidden=32, max_pos=32)
    assert snapshots.ensure_eval_snapshot(str(tmp_path / "ck"), root, 4, 400) == snapshots.eval_snapshot_uri(root, 4)
    assert [s for s, _ in snapshots.committed_eval_snapshots(root)] == [4]
    info = json.loads(storage.read_text(snapshots.eval_snapshot_uri(root, 4) + "/snapshot.json"))
    assert (info["step"], info["tokens"]) == (4, 400)
    # already committed, or already evaluated: nothing is published again
    assert snapshots.ensure_eval_snapshot(os.path.dirname(model), root, 4, 400) is None
    snapshots.write_ledger(snapshots.ledger_uri(root), [_rec(2)])
    assert snapshots.ensure_eval_snapshot(os.path.dirname(model), root, 2, 200) is None
    assert [s for s, _ in snapshots.committed_eval_snapshots(root)] == [4]
    # the one ledger reader: a torn last line (its writer killed mid-write) is not an evaluation, so that
    # checkpoint's snapshot is published again (evaluated twice at worst, never lost) ...
    with open(snapshots.ledger_uri(root), "a") as f:
        f.write('{"step": 3, "tok')
    assert snapshots.ensure_eval_snapshot(os.path.dirname(model), root, 3, 300) == snapshots.eval_snapshot_uri(root, 3)
    # ... and a damaged line before the last is an error naming the file and line, not a silent "not evaluated"
    with open(snapshots.ledger_uri(root), "w") as f:
        f.write('not json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"checkpoint_eval.jsonl: line 1"):
        snapshots.ensure_eval_snapshot(os.path.dirname(model), root, 5, 500)


def test_evaluator_scores_a_snapshot_with_finite_numbers(tmp_path):
    root = str(tmp_path / "train")
    src = tmp_path / "ck"
    make_tiny_model(str(src / "hf_model"), hidden=32, max_pos=32)
    uri = snapshots.ensure_eval_snapshot(str(src), root, 5, 1280)
    cfg = load_config(None, [f"model.path={src / 'hf_model'}", "data.seq_len=64", "eval.during_training.enabled=true",
                             "eval.during_training.num_documents=2", "eval.during_training.passkey_lengths=[96]",
                             "eval.passkey.depths=[0.5]", "eval.during_training.passkey_trials=1",
                             "eval.bucket_edges=[0,32]"])
    ev = dt.CheckpointEvaluator(json.loads(cfg.model_dump_json()))
    rec = ev.evaluate(uri)
    assert (rec["step"], rec["tokens"], rec["context_length"], rec["base_context_length"]) == (5, 1280, 64, 32)
    for k in ("nll_within_base", "nll_beyond_base", "passkey"):
        assert math.isfinite(rec[k]), k
    assert rec["nll_beyond_base"] > 1.0  # a random model: about log(vocab) nats, never ~0
    assert rec["eval_finished_at"] >= rec["eval_started_at"]
    png = dt.plot_checkpoint_eval([rec, {**rec, "step": 6, "tokens": 1536}])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 5 | 1,280 |" in dt.checkpoint_eval_section([rec])


@pytest.mark.ray
def test_a_pool_of_evaluators_shares_the_checkpoints_each_evaluated_once(ray_cluster, tmp_path):
    root = str(tmp_path / "train")
    src = tmp_path / "ck"
    make_tiny_model(str(src / "hf_model"), hidden=32, max_pos=32)
    for step in (1, 2, 3, 4):
        assert snapshots.ensure_eval_snapshot(str(src), root, step, 256 * step)
    snapshots.write_ledger(snapshots.ledger_uri(root), [{**_rec(3), "tokens": 768}])  # already evaluated before a resume
    cfg = load_config(None, [f"model.path={src / 'hf_model'}", "data.seq_len=64", "eval.during_training.enabled=true",
                             "eval.during_training.actors=2", "eval.during_training.num_cpus=0.5",
                             "eval.during_training.poll_s=0.2", "eval.during_training.num_documents=2",
                             "eval.during_training.passkey_lengths=[96]", "eval.passkey.depths=[0.5]",
                             "eval.during_training.passkey_trials=1", "eval.bucket_edges=[0,32]"])
    w = dt.CheckpointWatcher(cfg, root, run_id="run").start()
    recs = w.finish()
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and sorted(w.evaluated) == [1, 2, 4]
    assert [json.loads(x)["step"] for x in storage.read_text(snapshots.ledger_uri(root)).splitlines()] == [1, 2, 3, 4]
    # steps 1 and 2 were started in the same poll, one on each actor: two evaluator processes did the work
    assert len({r["evaluator_pid"] for r in recs if r["step"] in (1, 2)}) == 2
    assert snapshots.committed_eval_snapshots(root) == []


def test_a_passkey_length_too_short_is_refused_in_the_driver(tmp_path):
    model = make_tiny_model(str(tmp_path / "m"), hidden=32, max_pos=32)
    cfg = load_config(None, [f"model.path={model}", "data.seq_len=64", "eval.during_training.enabled=true"])
    with pytest.raises(ValueError, match=r"passkey_lengths=\[64\]: passkey length 64 is too short"):
        dt.CheckpointWatcher(cfg, str(tmp_path / "train"), run_id="run").start()


@pytest.mark.ray
@pytest.mark.slow
def test_every_checkpoint_evaluated_once_beside_training_and_after_a_resume(ray_cluster, tmp_path):
    from longctx.runs.folder import open_run
    from longctx.runs.steps import train_step

    steps = 6
    model_dir = make_tiny_model(str(tmp_path / "model"), hidden=32, max_pos=32)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    data_uri = write_packed_shards(str(tmp_path / "data"), packed_rows(4 * steps, 64, vocab, seed=3), rows_per_shard=8)
    cfg = load_config(None, [
        f"model.path={model_dir}", "data.seq_len=64", "train.global_batch_tokens=256", f"train.max_steps={steps}",
        "train.lr=3e-3", "train.checkpoint_every=1", "train.max_failures=1",
        "eval.during_training.enabled=true", "eval.during_training.num_cpus=1", "eval.during_training.poll_s=0.2",
        # an evaluation slower than a checkpoint interval, so that the two must overlap unless training waits
        "eval.during_training.context_length=512", "eval.during_training.num_documents=16",
        "eval.during_training.passkey_lengths=[512,1024]", "eval.during_training.passkey_trials=2",
        "eval.during_training.keep_snapshots=true",
        "eval.bucket_edges=[0,32]", f"output_dir={tmp_path}", "run_name=run",
    ])
    trigger = tmp_path / "kill-once"
    trigger.write_text("armed")
    # Rank 1 dies right after the checkpoint of step 3: Ray Train restarts the workers from it. The train step
    # starts the evaluator beside the workers.
    run = open_run(cfg, "long-pt")
    out = train_step(run, run.cfg, data_uri, fail_at={"step": 3, "rank": 1, "trigger_file": str(trigger)},
                     eval_hold_s=120)
    run.close()
    assert not trigger.exists(), "the failure was never injected"
    root = str(tmp_path / "run" / "train")
    assert run.train_root == root
    recs = snapshots.read_ledger(snapshots.ledger_uri(root))
    lines = [json.loads(x) for x in storage.read_text(snapshots.ledger_uri(root)).splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1)), "a checkpoint was skipped or evaluated twice"
    assert [r["step"] for r in out.checkpoint_evals] == list(range(1, steps + 1))
    assert [r["tokens"] for r in recs] == [256 * s for s in range(1, steps + 1)]
    for r in recs:
        assert math.isfinite(r["nll_beyond_base"]) and math.isfinite(r["nll_within_base"]) and 0 <= r["passkey"] <= 1
    # each record is its own checkpoint's weights (random-token training data moves held-out NLL only a little)
    assert len({round(r["nll_within_base"], 6) for r in recs}) == steps, "two checkpoints evaluated the same weights"
    assert os.path.getsize(os.path.join(root, dt.PLOT)) > 1000
    # Training did not wait for evaluation: a later checkpoint was committed while an earlier one was evaluated.
    # The first evaluation is held open until that happens (at most 120 s): training that waited would time it out.
    assert recs[0]["held_for_later_commit"] is True, "no later checkpoint was committed while the first was held"
    assert sum("held_for_later_commit" in r for r in recs) == 1
    overlaps = [(r["step"], q["step"]) for r in recs for q in recs
                if q["step"] > r["step"] and r["eval_started_at"] < q["committed_at"] < r["eval_finished_at"]]
    assert overlaps, "no checkpoint was committed while another was being evaluated: did training wait?"

    # Each record reached TensorBoard live, once, at its checkpoint's step, with the ledger's values.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(root, "tensorboard", "checkpoint_eval"), size_guidance={"scalars": 0})
    acc.Reload()
    for field in ("nll_beyond_base", "passkey"):
        events = acc.Scalars(f"checkpoint_eval/{field}")
        assert [e.step for e in events] == list(range(1, steps + 1))
        assert [e.value for e in events] == pytest.approx([r[field] for r in recs], rel=1e-6, abs=1e-6)

    # A rerun of the driver (resume) finds every snapshot already in the ledger: nothing is evaluated again.
    rerun = load_config(None, [f"model.path={model_dir}", "data.seq_len=64", "eval.during_training.passkey_lengths=[128]",
                               "eval.during_training.enabled=true", "eval.during_training.poll_s=0.2",
                               "eval.during_training.num_documents=4", "eval.bucket_edges=[0,32]"])
    w = dt.CheckpointWatcher(rerun, root, run_id="run").start()
    assert w.finish() and w.evaluated == []
    assert storage.read_text(snapshots.ledger_uri(root)).count("\n") == steps
    assert snapshots.committed_eval_snapshots(root) == [], "evaluated snapshots were not removed"
    # Negative control: a checkpoint missing from the ledger is evaluated, once.
    snapshots.write_ledger(snapshots.ledger_uri(root), [r for r in recs if r["step"] != steps])
    assert snapshots.ensure_eval_snapshot(out.checkpoint_uri, root, steps, 256 * steps)
    w = dt.CheckpointWatcher(rerun, root, run_id="run").start()
    assert [r["step"] for r in w.finish()] == list(range(1, steps + 1)) and w.evaluated == [steps]
