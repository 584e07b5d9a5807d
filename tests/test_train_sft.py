"""Long-SFT data (chat template, loss only on assistant turns, quarantine, mix, packing) and `jobs/long_sft.py`
end to end on the loopback S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longctx import storage
from longctx.config import load_config
from longctx.model.load import load_tokenizer
from longctx.train.sft_data import (
    Conversation,
    SftStats,
    mix_conversations,
    pack_chats,
    prepare_sft_data,
    read_conversations,
    tokenize_chat,
)

ROOT = Path(__file__).resolve().parents[1]
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-tokenizer")


def test_loss_only_on_assistant_turns(tok):
    chat = tokenize_chat(tok, Conversation("s", "r1", CHAT), seq_len=4096)
    learned = chat.labels != -100
    assert tok.decode(chat.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    # The learned tokens, in order, are exactly the two answers with their end-of-turn markers.
    pieces, cur = [], []
    for tid, on in zip(chat.input_ids.tolist(), learned.tolist()):
        if on:
            cur.append(tid)
        elif cur:
            pieces.append(tok.decode(cur))
            cur = []
    if cur:
        pieces.append(tok.decode(cur))
    assert pieces == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    assert np.array_equal(chat.labels[learned], chat.input_ids[learned])
    assert not chat.truncated
    short = tokenize_chat(tok, Conversation("s", "r1", CHAT), seq_len=10)
    assert short.truncated and len(short.input_ids) == 10


def test_bad_records_are_quarantined_with_file_and_line(tmp_path):
    f = tmp_path / "chats.jsonl"
    lines = [json.dumps({"messages": CHAT}), "{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), json.dumps({"text": "no messages"})]
    f.write_text("\n".join(lines) + "\n")
    stats = SftStats()
    convs = read_conversations("s", str(f), "messages", stats)
    assert len(convs) == 1 and stats.records == {"s": 1}
    reasons = {q["where"].rsplit(":", 1)[1]: q["reason"] for q in stats.quarantined}
    assert set(reasons) == {"2", "3", "4", "5"}
    assert "invalid JSON" in reasons["2"] and "no assistant" in reasons["3"] and "role" in reasons["4"]


def test_mix_shares_and_repetition():
    by = {"long": [Conversation("long", f"l{i}", CHAT) for i in range(3)],
          "general": [Conversation("general", f"g{i}", CHAT) for i in range(17)]}
    stats = SftStats()
    chosen = mix_conversations(by, {"long": 0.5, "general": 0.5}, seed=0, stats=stats)
    assert stats.used == {"long": 10, "general": 10} and stats.repeated == {"long": 7, "general": 0}
    assert len({c.record_id for c in chosen if c.source == "general"}) == 10  # no repeats while a pool lasts
    with pytest.raises(ValueError, match="unknown source"):
        mix_conversations(by, {"books": 1.0}, seed=0, stats=SftStats())


def test_packing_keeps_conversations_whole_and_positions_restart(tok):
    chats = [tokenize_chat(tok, Conversation("s", f"r{i}", CHAT[: 3 + 2 * (i % 2)]), 64) for i in range(9)]
    table = pack_chats(chats, 64, pad_id=0)
    used = 0
    for row in table.to_pylist():
        assert len(row["input_ids"]) == 64 and sum(row["seg_lengths"]) == 64
        start = 0
        for n, doc in zip(row["seg_lengths"], row["seg_doc_ids"]):
            assert row["position_ids"][start : start + n] == list(range(n))
            if doc:
                used += 1
            else:
                assert set(row["labels"][start : start + n]) == {-100}
            start += n
    assert used == 9


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.ray
def test_long_sft_job_end_to_end_on_s3(s3_bucket, tmp_path):
    from transformers import AutoModelForCausalLM

    from train_helpers import make_tiny_model

    model_dir = make_tiny_model(str(tmp_path / "model"), hidden=32, max_pos=64)
    rng = np.random.default_rng(0)
    with open(tmp_path / "long.jsonl", "w") as f:
        for i in range(6):
            doc = " ".join(f"item{j}={int(rng.integers(0, 999))}" for j in range(40))
            f.write(json.dumps({"id": f"L{i}", "messages": [{"role": "user", "content": doc + " What is item3?"},
                                                            {"role": "assistant", "content": "A number."}]}) + "\n")
    with open(tmp_path / "general.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"messages": CHAT}) + "\n")
        f.write("{broken\n")  # 1 bad line of 17: quarantined, under max_bad_fraction
    cmd = [sys.executable, str(ROOT / "jobs" / "long_sft.py"),
           "--set", f"output_dir={s3_bucket}/runs", "--set", "run_name=sft",
           "--set", f"model.path={model_dir}", "--set", "data.seq_len=256",
           "--set", f"data.sources={{long: '{tmp_path}/long.jsonl', general: '{tmp_path}/general.jsonl'}}",
           "--set", "data.sft.mix={long: 0.5, general: 0.5}", "--set", "data.max_bad_fraction=0.1",
           "--set", "train.global_batch_tokens=512", "--set", "train.epochs=2", "--set", "train.lr=1e-3",
           "--set", "ray.num_cpus=4"]
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = proc.stdout.strip().splitlines()[-1]
    assert final == f"{s3_bucket}/runs/sft/train/final_model"
    metrics = json.loads(storage.read_text(f"{s3_bucket}/runs/sft/metrics.json"))
    assert metrics["data"]["quarantined"] == 1
    assert metrics["data"]["conversations"]["used"] == {"long": 8, "general": 8}
    rows = metrics["data"]["rows"]
    # 2 epochs over the packed rows (2 rows per step: 512 tokens / 256 per row, dp=2, grad_accum 1).
    assert metrics["train"]["steps"] == (rows // 2) * 2 // 1
    local = storage.download_dir(final, str(tmp_path / "final"))
    AutoModelForCausalLM.from_pretrained(local)


def test_sft_reader_skips_a_published_folders_manifest_and_quarantine(tmp_path):
    """A synthetic set's folder (part-*.jsonl + manifest.json + _COMMITTED) reads as its records only."""
    from longctx.train.sft_data import SftStats, read_conversations

    chat = {"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "part-00000.jsonl").write_text(json.dumps(chat) + "\n")
    (tmp_path / "manifest.json").write_text(json.dumps({"samples": 1, "shards": ["part-00000.jsonl"]}, indent=2))
    (tmp_path / "_COMMITTED").write_text("{}")
    (tmp_path / "_quarantine").mkdir()
    (tmp_path / "_quarantine" / "records.jsonl").write_text('{"where": "x", "reason": "y"}\n')
    stats = SftStats()
    convs = read_conversations("synth", str(tmp_path), "messages", stats)
    assert [c.record_id for c in convs] == ["a"]
    assert stats.quarantined == []
    # a plain .json file of records still counts (and a broken one is quarantined, not dropped)
    (tmp_path / "extra.json").write_text("not json\n")
    stats = SftStats()
    assert len(read_conversations("synth", str(tmp_path), "messages", stats)) == 1
    assert [q["where"] for q in stats.quarantined] == [f"{tmp_path}/extra.json:1"]
