"""The pieces of the training safety net that need no Ray (tests/test_train_safety.py runs them on the real stack):
the driver's SIGTERM/SIGINT guard, checkpoint manifests on a folder written here, the ledger of skipped rows and
the mapping from a worker's stop reason to the driver's error and exit code."""

from __future__ import annotations

import os
import signal
import tempfile
import time

import pytest
import torch

from longctx.jobargs import exit_code
from longctx.train import integrity, stops
from longctx.train.batches import Ledger
from longctx.train.preemption import PreemptionGuard, PreemptionPoller, marker_uri


def test_sigterm_asks_for_a_checkpoint_and_a_second_signal_stops_at_once(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(str(tmp_path), grace_s=60) as guard:
        poller = PreemptionPoller(str(tmp_path), is_rank0=True)
        assert poller.flags()[0] == 0 and not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal == "SIGTERM"
        assert os.path.exists(marker_uri(str(tmp_path)))
        assert poller.flags()[0] == 1  # rank 0 sees the request at its next step boundary
        assert PreemptionPoller(str(tmp_path), is_rank0=False).flags() == [0.0, 0.0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler was not restored"
    assert not os.path.exists(marker_uri(str(tmp_path)))


def test_no_checkpoint_within_the_grace_period_interrupts_the_driver(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with PreemptionGuard(str(tmp_path), grace_s=0.3) as guard:
            os.kill(os.getpid(), signal.SIGTERM)
            while time.monotonic() - t0 < 10:
                time.sleep(0.05)
    assert guard.expired and 0.3 <= time.monotonic() - t0 < 5


def test_a_stale_request_of_an_earlier_attempt_is_removed(tmp_path):
    open(marker_uri(str(tmp_path)), "w").write("{}")
    with PreemptionGuard(str(tmp_path), grace_s=60) as guard:
        assert not guard.requested and not os.path.exists(marker_uri(str(tmp_path)))


def test_skipped_rows_are_neither_consumed_nor_read_again():
    ledger = Ledger()
    ledger.add(0, 1)
    ledger.skip(0, 5)
    assert ledger.contains(0, 1) and ledger.contains(0, 5) and not ledger.contains(0, 2)
    assert ledger.total() == 1
    back = Ledger.merge([Ledger.from_json(ledger.to_json()), Ledger({0: {2}})])
    assert back.to_json() == {"consumed": {"0": [1, 2]}, "skipped": {"0": [5]}}
    assert Ledger({0: {1}}).to_json() == {"consumed": {"0": [1]}}  # unchanged for runs that skipped nothing


def test_a_stop_reason_becomes_the_drivers_error_and_exit_code():
    stops.raise_for_stop(None)
    for kind, cls, code in (("nonfinite", stops.NonFiniteTraining, 4), ("damaged", stops.NoIntactCheckpoint, 4),
                            ("preempted", stops.TrainingPreempted, 75)):
        with pytest.raises(cls, match="why") as err:
            stops.raise_for_stop(stops.stop_reason(kind, "why", step=3, checkpoint="checkpoint_00000003"))
        assert exit_code(err.value) == code and err.value.step == 3
    with pytest.raises(ValueError):
        stops.stop_reason("tired", "no")


def test_nonfinite_tensors_are_named():
    sd = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")]),
          "ids": torch.tensor([1, 2])}
    assert stops.nonfinite_tensors(sd) == ["b", "c"]
    assert stops.nonfinite_tensors({"a": torch.zeros(2)}) == []


def _checkpoint(root, step, world=2, name=None):
    folder = os.path.join(root, name or f"checkpoint_{step:08d}")
    os.makedirs(os.path.join(folder, "deepspeed"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        f.write(f'{{"format": {integrity.FORMAT}, "step": {step}}}')
    for rank in range(world):
        with open(os.path.join(folder, "deepspeed", f"rank{rank}.pt"), "wb") as f:
            f.write(os.urandom(1000))
    # each rank hashes only what it wrote (its own temp folder in real runs): split the files by rank here
    for rank in range(world):
        mine = tempfile.mkdtemp(prefix=f"rank{rank}-", dir=root)
        os.makedirs(os.path.join(mine, "deepspeed"))
        os.link(os.path.join(folder, "deepspeed", f"rank{rank}.pt"), os.path.join(mine, "deepspeed", f"rank{rank}.pt"))
        if rank == 0:
            os.link(os.path.join(folder, "trainer_state.json"), os.path.join(mine, "trainer_state.json"))
        integrity.write_manifest(mine, rank, world, step)
        os.replace(os.path.join(mine, integrity.manifest_name(rank)), os.path.join(folder, integrity.manifest_name(rank)))
    return folder


def test_manifests_verify_each_ranks_share_and_the_newest_complete_step_is_found(tmp_path):
    root = str(tmp_path)
    _checkpoint(root, 2)
    newest = _checkpoint(root, 4)
    assert [r.step for r in integrity.list_checkpoints(root)] == [4, 2]
    assert integrity.verify_checkpoint(newest) == []
    assert integrity.latest_intact_step(root) == 4
    with open(os.path.join(newest, "deepspeed", "rank1.pt"), "r+b") as f:
        f.write(b"\0" * 10)  # same size, other bytes
    assert integrity.verify_checkpoint(newest, rank=0, world=2) == []  # rank 0's share is intact
    assert integrity.verify_checkpoint(newest, rank=1, world=2) == ["deepspeed/rank1.pt altered (sha256 differs "
                                                                     "from its manifest)"]
    assert integrity.latest_intact_step(root) == 4  # sizes match: only the workers' hashing finds it
    os.truncate(os.path.join(newest, "deepspeed", "rank1.pt"), 10)
    assert integrity.latest_intact_step(root) == 2
    assert integrity.fresh_dir_name(root, 4) == "checkpoint_00000004-2"
    _checkpoint(root, 4, name="checkpoint_00000004-2")
    assert [r.name for r in integrity.list_checkpoints(root)][:2] == ["checkpoint_00000004-2", "checkpoint_00000004"]
    assert integrity.latest_intact_step(root) == 4


def test_a_checkpoint_written_before_manifests_is_used_unverified(tmp_path):
    folder = tmp_path / "checkpoint_00000003"
    folder.mkdir()
    (folder / "trainer_state.json").write_text('{"step": 3, "ledger": {}, "history": []}')
    assert integrity.verify_checkpoint(str(folder)) == []
    assert integrity.latest_intact_step(str(tmp_path)) == 3
    (folder / "trainer_state.json").write_text(f'{{"format": {integrity.FORMAT}, "step": 3}}')
    assert integrity.verify_checkpoint(str(folder)) == ["no manifest.rank00000.json (rank 0's files never arrived)"]
