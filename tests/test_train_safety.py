"""Nothing lost, nothing garbage, on the real stack (Ray Train + DeepSpeed ZeRO-2 on 2 gloo workers, tiny Llama):

- a NaN loss on one rank is seen by every rank: `train.nonfinite=stop` ends the run naming the step and its
  rows, publishes nothing, exit code 4 (on S3; a rerun whose only checkpoint is damaged stops naming it); `skip` passes over the step's rows (recorded as skipped, not consumed)
  without advancing the step or the LR schedule, so the final weights equal a plain PyTorch run on the other rows;
- SIGTERM to the driver mid-run checkpoints at the next step boundary and ends with `TrainingPreempted` (exit
  code 75) instead of losing the interval;
- every kind of damage to the newest checkpoint (model states, optimizer states, trainer_state.json, hf_model,
  a missing rank, the folder, Ray's snapshot) is found by the verifier, and a rerun on a damaged copy skips it
  with one line and resumes from the newest intact one, finishing exactly like an uninterrupted run;
- `tokens` comes from the checkpoint (log_every=4: the last logged step is not the checkpoint's).

One producing run (preempted), copies of its folder damaged per kind (pure verifier, no Ray), and one real rerun
from a damaged copy, plus the NaN-stop run and its rerun: four trainings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from longctx import storage
from longctx.config import load_config
from longctx.jobargs import exit_code
from longctx.train import integrity
from longctx.train.batches import lane_step_rows
from longctx.train.schedule import cosine_lr
from longctx.train.stops import NonFiniteTraining, NoIntactCheckpoint, TrainingPreempted
from train_helpers import make_tiny_model, packed_rows, reference_training, write_packed_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SEQ, ROWS_PER_STEP, ROWS = 64, 4, 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("safety")
    model_dir = make_tiny_model(str(root / "model"), hidden=32, max_pos=32)
    table = packed_rows(ROWS, SEQ, AutoConfig.from_pretrained(model_dir).vocab_size, seed=3)
    return model_dir, table, write_packed_shards(str(root / "data"), table, rows_per_shard=8)


def _cfg(model_dir, *sets):
    return load_config(None, [f"model.path={model_dir}", "data.seq_len=64", "train.global_batch_tokens=256",
                              "train.lr=3e-3", "train.warmup_ratio=0.2", *sets])


@pytest.mark.s3
def test_nan_loss_with_stop_names_the_step_and_rows_and_publishes_nothing(ray_cluster, s3_bucket, tiny):
    from longctx.train.trainer import run_training

    model_dir, _, data = tiny
    run = f"{s3_bucket}/runs/nan"
    root = f"{run}/train"
    cfg = _cfg(model_dir, "train.max_steps=3", "train.checkpoint_every=1")
    with pytest.raises(NonFiniteTraining) as err:
        run_training(cfg, data, root, run_id="nan", nan_at={"step": 2, "rank": 1})
    msg = str(err.value)
    step2 = lane_step_rows(ROWS, 2, ROWS_PER_STEP // 2, 2)[1]  # each rank's lane: [2, 3] and [22, 23]
    assert "non-finite loss" in msg and f"at step 2 (rows {step2})" in msg and "train.nonfinite=stop" in msg
    assert "last checkpoint: step 1" in msg and exit_code(err.value) == 4
    assert not storage.exists(f"{root}/final_model"), "a stopped run published a model"
    assert [r.step for r in integrity.list_checkpoints(root)] == [1]  # nothing saved at or after the NaN

    # its only checkpoint damaged on S3: the rerun stops naming it, and publishes nothing
    states = f"{root}/checkpoint_00000001/deepspeed/state/mp_rank_00_model_states.pt"
    data_bytes = bytearray(storage.read_bytes(states))
    data_bytes[200:456] = bytes(b ^ 0xFF for b in data_bytes[200:456])
    storage.write_bytes(states, bytes(data_bytes))
    with pytest.raises(NoIntactCheckpoint) as err:
        run_training(cfg, data, root, run_id="nan")
    assert "checkpoint_00000001: deepspeed/state/mp_rank_00_model_states.pt altered" in str(err.value)
    assert exit_code(err.value) == 4 and not storage.exists(f"{root}/final_model")


def _sigterm_after_checkpoint(train_root: str, step: int, sent: list):
    """Send SIGTERM to this process (the driver) once the checkpoint of `step` is completely on disk."""
    def watch():
        deadline = time.time() + 600
        while time.time() < deadline:
            for ref in integrity.list_checkpoints(train_root):
                if ref.step >= step and os.path.exists(os.path.join(ref.uri, integrity.manifest_name(1))):
                    sent.append(time.time())
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            time.sleep(0.1)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _flip(path: str, at: int = 200, n: int = 256) -> None:
    data = bytearray(open(path, "rb").read())
    at = min(at, max(0, len(data) - n))
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


DAMAGE = {  # kind -> (damage(folder of the newest checkpoint, train root), what the verifier must name)
    "model states flipped": (lambda f, r: _flip(f"{f}/deepspeed/state/mp_rank_00_model_states.pt"),
                             "mp_rank_00_model_states.pt altered"),
    "model states truncated": (lambda f, r: _truncate(f"{f}/deepspeed/state/mp_rank_00_model_states.pt"),
                               "mp_rank_00_model_states.pt has"),
    "optimizer states flipped": (
        lambda f, r: _flip(f"{f}/deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        "zero_pp_rank_1_mp_rank_00_optim_states.pt altered"),
    "trainer_state.json missing": (lambda f, r: os.remove(f"{f}/trainer_state.json"), "no trainer_state.json"),
    "trainer_state.json torn": (lambda f, r: _truncate(f"{f}/trainer_state.json"), "trainer_state.json unreadable"),
    "hf_model weights flipped": (lambda f, r: _flip(f"{f}/hf_model/model.safetensors"),
                                 "hf_model/model.safetensors altered"),
    "rank 1 never arrived": (lambda f, r: os.remove(f"{f}/{integrity.manifest_name(1)}"),
                             "no manifest.rank00001.json"),
    "folder deleted": (lambda f, r: shutil.rmtree(f), None),
}


def test_preempted_run_and_damaged_checkpoints_resume_from_the_newest_intact(ray_cluster, tiny, tmp_path, capfd):
    import torch
    from transformers import AutoModelForCausalLM

    from longctx.train.trainer import run_training

    model_dir, table, data = tiny
    steps = 8
    cfg = _cfg(model_dir, f"train.max_steps={steps}", "train.checkpoint_every=2", "train.nonfinite=skip",
               "train.log_every=4")
    run = tmp_path / "run"
    root = str(run / "train")

    # -- 1. NaN at step 2 on rank 1 (skipped), SIGTERM to the driver once the checkpoint of step 2 is on disk
    sent: list = []
    _sigterm_after_checkpoint(root, 2, sent)
    with pytest.raises(TrainingPreempted) as err:
        run_training(cfg, data, root, run_id="run", nan_at={"step": 2, "rank": 1})
    assert sent, "SIGTERM was never sent"
    at = err.value.step
    assert 2 <= at < steps and exit_code(err.value) == 75 and "rerun the same command" in str(err.value)
    said = capfd.readouterr()
    said = said.out + said.err
    # the rows every attempted step takes from the two ranks' lanes; the NaN attempt (step 2) is skipped, so trained
    # step k >= 2 takes the rows of attempt k + 1
    attempts = lane_step_rows(ROWS, 2, ROWS_PER_STEP // 2, steps + 1)
    skipped = attempts[1]
    assert "non-finite loss" in said and f"at step 2 (rows {skipped})" in said and "skipped" in said
    refs = integrity.list_checkpoints(root)
    assert refs[0].step == at and refs[0].name == err.value.checkpoint  # checkpointed at the step boundary
    assert integrity.verify_checkpoint(refs[0].uri) == []
    state = json.loads(open(f"{refs[0].uri}/trainer_state.json").read())
    assert state["ledger"]["consumed"] == {"0": sorted(attempts[0] + [r for a in attempts[2:at + 1] for r in a])}
    assert state["ledger"]["skipped"] == {"0": skipped}
    assert state["tokens"] == at * ROWS_PER_STEP * SEQ  # the checkpoint's own count, whatever was logged
    assert not storage.is_committed(f"{root}/final_model")

    # -- 2. every kind of damage to the newest checkpoint is found; the one before it stays the choice
    older = refs[1]
    for kind, (damage, names) in DAMAGE.items():
        copy = tmp_path / "copies" / kind.replace(" ", "_")
        shutil.copytree(run, copy)
        croot = str(copy / "train")
        damage(f"{croot}/{refs[0].name}", croot)
        listed = integrity.list_checkpoints(croot)
        problems = integrity.verify_checkpoint(f"{croot}/{refs[0].name}")
        assert problems, kind
        if names:
            assert any(names in p for p in problems), (kind, problems)
        intact = [r for r in listed if not integrity.verify_checkpoint(r.uri)]
        assert intact[0].name == older.name, (kind, intact)
    for kind, content in (("torn", b'{"ray_version": "2.6'), ("empty", b""), ("names a deleted folder", None)):
        copy = tmp_path / "snapshots" / kind.replace(" ", "_")
        shutil.copytree(run, copy)
        snap = copy / "train" / integrity.RAY_SNAPSHOT
        if content is None:
            shutil.rmtree(copy / "train" / json.loads(snap.read_text())["checkpoint_results"][0]["checkpoint_dir_name"])
        else:
            snap.write_bytes(content)
        assert integrity.snapshot_problem(str(copy / "train")), kind
        note = integrity.repair_ray_snapshot(str(copy / "train"))
        assert "moved aside" in note and not snap.exists() and list((copy / "train").glob(f"{snap.name}.unloadable-*"))
    assert integrity.snapshot_problem(root) is None  # negative control: the real snapshot loads

    # -- 3. a rerun on a copy whose newest checkpoint is damaged and whose Ray snapshot is torn
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    droot = str(damaged / "train")
    _flip(f"{droot}/{refs[0].name}/deepspeed/state/mp_rank_00_model_states.pt")
    (damaged / "train" / integrity.RAY_SNAPSHOT).write_bytes(b'{"checkpoint_results": [')
    out = run_training(cfg, data, droot, run_id="damaged")
    said = capfd.readouterr()
    said = said.out + said.err
    assert f"{refs[0].name} is damaged (deepspeed/state/mp_rank_00_model_states.pt altered" in said
    assert "moved aside" in said and f"[train] resumed at step {older.step} " in said
    assert os.path.isdir(f"{droot}/{refs[0].name}"), "the damaged checkpoint was deleted"
    assert out.steps == steps and out.history[-1]["tokens"] == steps * ROWS_PER_STEP * SEQ
    # the LR of every logged step is the schedule's at that step: the skipped step did not shift it
    for h in out.history:
        assert h["lr"] == pytest.approx(cosine_lr(h["step"] - 1, total_steps=steps, peak=3e-3, warmup_ratio=0.2,
                                                  min_lr_ratio=cfg.train.min_lr_ratio), rel=1e-6)
    kept = table.filter(pc.invert(pc.is_in(table.column("row_id"), value_set=pa.array(skipped))))
    ref_weights, _, _ = reference_training(model_dir, cfg, kept, steps)
    got = AutoModelForCausalLM.from_pretrained(out.final_model_uri).state_dict()
    worst = max((got[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    assert worst < 2e-5, f"the resumed run drifted from the uninterrupted one by {worst}"
    assert all(bool(torch.isfinite(t).all()) for t in got.values())
