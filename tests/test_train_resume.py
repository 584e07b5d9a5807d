"""A training worker is killed mid-run (hard `os._exit`, no cleanup) right after it reported a checkpoint, inside
Ray Train's registration window (the checkpoint is on disk, but Ray Train may never have registered it); Ray
Train restarts the worker group (max_failures=1) and the run finishes as if nothing happened:

- the restart resumes from that newest checkpoint (found by listing the train folder and verified against its
  manifests, not taken from Ray's snapshot): no step is redone;
- the step log has every step exactly once, and the rows behind the steps are each row exactly once, in the
  order an uninterrupted run takes them (every rank's lane, with attention-cost balancing moving rows between
  ranks);
- the losses and final weights match an uninterrupted run with the same seed (a single-process PyTorch run,
  which test_train_engine.py shows equals the distributed one).
"""

from __future__ import annotations

import json

import pytest

from longctx import storage
from longctx.config import load_config
from longctx.train.batches import lane_step_rows
from train_helpers import make_tiny_model, packed_rows, reference_training, write_packed_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SEQ, STEPS = 64, 5


def test_worker_killed_mid_run_resumes_exactly(ray_cluster, tmp_path, capfd):
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx.train.trainer import run_training

    model_dir = make_tiny_model(str(tmp_path / "model"), hidden=32, max_pos=32)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    table = packed_rows(24, SEQ, vocab, seed=2)
    data_uri = write_packed_shards(str(tmp_path / "data"), table, rows_per_shard=7)
    cfg = load_config(None, [
        f"model.path={model_dir}", "data.seq_len=64", "model.rope_theta=20000",
        "train.global_batch_tokens=256", f"train.max_steps={STEPS}", "train.lr=3e-3", "train.warmup_ratio=0.2",
        "train.checkpoint_every=2", "train.max_failures=1",
    ])
    trigger = tmp_path / "kill-once"
    trigger.write_text("armed")
    # Rank 1 dies right after reporting the checkpoint of step 4 (the registration window).
    out = run_training(cfg, data_uri, str(tmp_path / "run" / "train"), run_id="run",
                       fail_at={"step": 4, "rank": 1, "trigger_file": str(trigger)})

    assert not trigger.exists(), "the failure was never injected"
    assert capfd_text(capfd).count("[train] resumed at step 4 ") == 1, "the reported checkpoint was not resumed from"
    assert [h["step"] for h in out.history] == list(range(1, STEPS + 1))
    # each rank's lane (rows 0-11 and 12-23), two rows per step, each row once: the uninterrupted order
    expected = lane_step_rows(24, 2, 2, STEPS)
    assert [h["row_ids"] for h in out.history] == [sorted(rows) for rows in expected], "a row was lost or trained on twice"
    state = json.loads(storage.read_text(out.checkpoint_uri + "/trainer_state.json"))
    assert state["ledger"]["consumed"] == {"0": sorted(i for rows in expected for i in rows)}
    # batch balancing was on: rows changed ranks in some step (and the losses below are still the reference's)
    assert any(h["cost_max_over_mean"] < h["cost_max_over_mean_unbalanced"] for h in out.history), out.history

    ref_weights, ref_losses, ref_norms = reference_training(model_dir, cfg, table, STEPS)
    assert [h["loss"] for h in out.history] == pytest.approx(ref_losses, rel=1e-5)
    assert [h["grad_norm"] for h in out.history] == pytest.approx(ref_norms, rel=1e-4)
    got = AutoModelForCausalLM.from_pretrained(out.final_model_uri).state_dict()
    worst = max((got[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    assert worst < 2e-5, f"resumed run drifted from the uninterrupted one by {worst}"

    # Nothing was computed twice: the log on disk has each step once.
    lines = storage.read_text(out.metrics_log_uri).splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))

    # TensorBoard (rank 0 writes event files beside metrics.jsonl): the same scalars, each step once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "train" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss == pytest.approx({json.loads(x)["step"]: json.loads(x)["loss"] for x in lines}, rel=1e-6)


def capfd_text(capfd) -> str:
    out = capfd.readouterr()
    return out.out + out.err
