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
from longctx.data import sources as src
from longctx.train.sft_data import (
    ChatTokenizer,
    Conversation,
    SftStats,
    chat_files,
    mix_conversations,
    pack_chats,
    prepare_sft_data,
    tokenize_chat,
    write_sft_shard,
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
    assert not chat.truncated and chat.cut_tokens == 0


LONG_CHAT = [
    {"role": "system", "content": "SYSTEMHEAD answer from the document."},
    {"role": "user", "content": "DOCSTART " + " ".join(f"w{i}" for i in range(300)) + " QUESTIONEND what is w7?"},
    {"role": "assistant", "content": "w7 is the eighth word."},
]


def _answers(tok, chat) -> list[str]:
    out, cur = [], []
    for tid, lab in zip(chat.input_ids.tolist(), chat.labels.tolist()):
        if lab != -100:
            cur.append(tid)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])


def test_overlong_conversation_keeps_its_last_answer(tok):
    """truncate_middle: the context is cut in the middle; the head (system prompt, start of the user turn), the
    end of the question and the whole last answer with its loss stay; quarantine: nothing is kept."""
    full = tokenize_chat(tok, Conversation("s", "L", LONG_CHAT), seq_len=100_000)
    seq_len = 96
    assert len(full.input_ids) > 3 * seq_len
    # negative control: cutting from the end (the old behaviour) loses the answer entirely
    assert (full.labels[:seq_len] != -100).sum() == 0
    cut = tokenize_chat(tok, Conversation("s", "L", LONG_CHAT), seq_len=seq_len)
    assert len(cut.input_ids) == seq_len and cut.truncated and cut.cut_tokens == len(full.input_ids) - seq_len
    assert _answers(tok, cut) == _answers(tok, full) == ["w7 is the eighth word.<|im_end|>\n"]
    text = tok.decode(cut.input_ids)
    assert text.startswith(tok.decode(full.input_ids[:10])) and "SYSTEMHEAD" in text and "DOCSTART" in text
    assert "QUESTIONEND what is w7?" in text and "w150 " not in text
    # the kept tokens are the full conversation's head and tail, with their labels unchanged
    n = len(cut.input_ids)
    k = next(i for i in range(n) if cut.input_ids[i] != full.input_ids[i])
    assert np.array_equal(cut.input_ids[k:], full.input_ids[-(n - k):])
    assert np.array_equal(cut.labels[k:], full.labels[-(n - k):]) and 20 < k < n - 20
    q = tokenize_chat(tok, Conversation("s", "L", LONG_CHAT), seq_len=seq_len, overlong="quarantine")
    assert q.overlong and "data.sft.overlong=quarantine" in q.overlong and len(q.input_ids) == 0
    # a last answer longer than a row cannot keep any context: refused under either policy, never cut
    big = LONG_CHAT[:2] + [{"role": "assistant", "content": " ".join(f"a{i}" for i in range(200))}]
    b = tokenize_chat(tok, Conversation("s", "B", big), seq_len=seq_len)
    assert b.overlong and "last assistant turn alone" in b.overlong and len(b.input_ids) == 0


def test_a_template_that_is_not_prefix_stable_is_refused_before_ray(tmp_path):
    """Answer spans are found by rendering prefixes; a template whose renders are not prefixes of each other
    (here: the message count up front) is refused on the driver, before Ray starts or any chat is read."""
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ messages|length }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                   "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg = load_config(None, [f"data.sft.chat_template={bad}", f"data.sources.s={tmp_path}/missing.jsonl"])
    with pytest.raises(ValueError, match="not prefixes of each other"):
        prepare_sft_data(cfg, str(tmp_path / "out"))
    good = tmp_path / "good.jinja"  # control: the same template without the count passes the check
    good.write_text(bad.read_text().removeprefix("{{ messages|length }}"))
    cfg = load_config(None, [f"data.sft.chat_template={good}", f"data.sources.s={tmp_path}/missing.jsonl"])
    with pytest.raises(storage.StorageError, match="missing.jsonl"):  # got past the check: listing the source
        prepare_sft_data(cfg, str(tmp_path / "out"))


def _read(path, uri=None):
    task = src.FileTask(0, str(path), "s", src.SourceSpec(uri=str(uri or path)))
    rows = [r for t in src.read_file(task, src.ReadOptions(messages_field="messages")) for r in t.to_pylist()]
    return [r for r in rows if r["reason"] is None], [r for r in rows if r["reason"] is not None]


def test_bad_records_are_quarantined_with_file_and_line(tmp_path):
    """The data engine's reader in chat mode: good chats become canonical JSON text, bad lines quarantine rows."""
    f = tmp_path / "chats.jsonl"
    lines = [json.dumps({"id": "ok", "messages": CHAT}), "{not json",
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), json.dumps({"text": "no messages"}),
             json.dumps({"messages": CHAT})]
    f.write_text("\n".join(lines) + "\n")
    good, bad = _read(f)
    assert [g["doc_id"] for g in good] == ["ok", f"{f}:6"] and json.loads(good[0]["text"]) == CHAT
    reasons = {b["doc_id"].rsplit(":", 1)[1]: (b["reason"], b["detail"]) for b in bad}
    assert set(reasons) == {"2", "3", "4", "5"}
    assert reasons["2"][0] == src.BAD_JSON and reasons["3"][0] == reasons["4"][0] == src.BAD_MESSAGES
    assert "no assistant" in reasons["3"][1] and "role" in reasons["4"][1]


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
        # longer than data.seq_len=256: cut in the middle, its answer kept (data.sft.overlong=truncate_middle)
        f.write(json.dumps({"id": "L6", "messages": LONG_CHAT}) + "\n")
    for part in (1, 2):  # the general set as a list of two files: both are read
        with open(tmp_path / f"general{part}.jsonl", "w") as f:
            for i in range(5):
                f.write(json.dumps({"messages": CHAT}) + "\n")
            if part == 2:
                f.write("{broken\n")  # 1 bad line of 18: quarantined, under max_bad_fraction
    cmd = [sys.executable, str(ROOT / "jobs" / "long_sft.py"),
           "--set", f"output_dir={s3_bucket}/runs", "--set", "run_name=sft",
           "--set", f"model.path={model_dir}", "--set", "data.seq_len=256",
           "--set", f"data.sources={{long: '{tmp_path}/long.jsonl', general: {{uri: ['{tmp_path}/general1.jsonl', "
                    f"'{tmp_path}/general2.jsonl']}}}}",
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
    conv = metrics["data"]["conversations"]
    assert conv["used"] == {"long": 8, "general": 8} and conv["read"] == {"long": 7, "general": 10}
    assert conv["repeated"] == {"long": 1, "general": 0} and conv["truncated"] >= 1 and conv["truncated_tokens"] > 0
    data = f"{s3_bucket}/runs/sft/data"
    bad = json.loads(storage.read_text(f"{data}/_quarantine/records.jsonl"))  # the one bad line, where it was
    assert storage.is_committed(data) and bad["reason"] == src.BAD_JSON
    assert bad["location"] == f"{tmp_path}/general2.jsonl:6"
    rows = metrics["data"]["rows"]
    # 2 epochs over the packed rows (2 rows per step: 512 tokens / 256 per row, dp=2, grad_accum 1).
    assert metrics["train"]["steps"] == (rows // 2) * 2 // 1
    local = storage.download_dir(final, str(tmp_path / "final"))
    AutoModelForCausalLM.from_pretrained(local)


def test_sft_reader_skips_a_published_folders_manifest_and_quarantine(tmp_path):
    """A synthetic set's folder (part-*.jsonl + manifest.json + _COMMITTED) reads as its records only."""
    chat = {"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "part-00000.jsonl").write_text(json.dumps(chat) + "\n")
    (tmp_path / "manifest.json").write_text(json.dumps({"samples": 1, "shards": ["part-00000.jsonl"]}, indent=2))
    (tmp_path / "_COMMITTED").write_text("{}")
    (tmp_path / "_quarantine").mkdir()
    (tmp_path / "_quarantine" / "records.jsonl").write_text('{"where": "x", "reason": "y"}\n')
    tasks = chat_files({"synth": src.SourceSpec(uri=str(tmp_path))})
    assert [t.uri for t in tasks] == [f"{tmp_path}/part-00000.jsonl"]
    # a plain .json file of records still counts (and a broken one is quarantined, not dropped)
    (tmp_path / "extra.json").write_text("not json\n")
    (tmp_path / "notes.txt").write_text("not a corpus file")
    tasks = chat_files({"synth": src.SourceSpec(uri=str(tmp_path))})
    assert src.SKIPPED_PREFIX + f"{tmp_path}/notes.txt" in [t.uri for t in tasks]  # listed (counted), never read
    tasks = [t for t in tasks if not t.uri.startswith(src.SKIPPED_PREFIX)]
    assert [t.uri for t in tasks] == [f"{tmp_path}/extra.json", f"{tmp_path}/part-00000.jsonl"]
    assert sorted(t.file_idx for t in tasks) == [0, 2]  # numbered in the listing, bookkeeping left out
    assert [b["doc_id"] for b in _read(tmp_path / "extra.json")[1]] == [f"{tmp_path}/extra.json:1"]


def test_every_uri_of_a_list_is_read(tmp_path):
    """A source given as a list of URIs reads all of them (it used to read only the first)."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "chats.jsonl").write_text(json.dumps({"id": name, "messages": CHAT}) + "\n")
    uris = [str(tmp_path / "a"), str(tmp_path / "b" / "chats.jsonl"), f"{tmp_path}/c/*.jsonl"]
    tasks = chat_files({"general": src.SourceSpec(uri=uris)})
    assert [t.uri for t in tasks] == [f"{tmp_path}/{n}/chats.jsonl" for n in "abc"]
    assert {t.source for t in tasks} == {"general"}


def test_chat_tokenizer_and_shard_writer_without_ray(tok, tmp_path):
    """The Ray workers' own code, called in this process: the actor writes ids+labels to the cache and sends on
    metadata only, an over-long chat under `quarantine` becomes a quarantine row; the shard task builds rows
    from the cache that equal `pack_chats` on the same chats."""
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n"
                         for i, m in enumerate([CHAT, LONG_CHAT, CHAT[:3]])) + "{bad\n")
    task = src.FileTask(0, str(f), "s", src.SourceSpec(uri=str(f)))
    batch = next(iter(src.read_file(task, src.ReadOptions(messages_field="messages"))))
    cache = tmp_path / "cache"
    cache.mkdir()
    outs = {}
    for policy in ("quarantine", "truncate_middle"):
        actor = ChatTokenizer("builtin:tiny-tokenizer", None, 96, policy, str(cache), {})
        outs[policy] = actor(batch).to_pylist()
    q, t = outs["quarantine"], outs["truncate_middle"]
    assert [r["reason"] for r in q] == [None, src.OVERLONG_CHAT, None, src.BAD_JSON]
    assert [r["reason"] for r in t] == [None, None, None, src.BAD_JSON]
    assert t[1]["n_tokens"] == 96 and t[1]["cut_tokens"] > 0 and t[1]["loss_tokens"] > 0
    assert "tokens" not in t[0] and t[0]["cache_row"] == 0 and t[2]["cache_row"] == 2
    expected = [tokenize_chat(tok, Conversation("s", f"c{i}", m), 96) for i, m in enumerate([CHAT, LONG_CHAT, CHAT[:3]])]
    assert [r["n_tokens"] for r in t[:3]] == [len(c.input_ids) for c in expected]
    rows = [[(r["cache_file"], r["cache_row"], r["source"], r["doc_id"]) for r in t[:2]], [
        (t[2]["cache_file"], t[2]["cache_row"], "s", "c2")]]
    (tmp_path / "out").mkdir()
    shard = write_sft_shard(rows, str(cache), str(tmp_path / "out"), "sft-00000.parquet", 5, 96 * 2, 0, {})
    import pyarrow.parquet as pq

    got = pq.read_table(tmp_path / "out" / "sft-00000.parquet")
    assert shard["rows"] == 2 and shard["row_id_start"] == 5 and len(shard["sha256"]) == 64
    from longctx.train.sft_data import build_rows

    want = build_rows(expected, [[0, 1], [2]], 96 * 2, 0, row_offset=5)
    assert got.to_pylist() == want.to_pylist()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_sft_data_through_the_engine_on_s3(ray_cluster, s3_bucket, tmp_path):
    """prepare_sft_data on the local Ray cluster, sources and output on loopback S3: every URI of a list read,
    an over-long chat cut in the middle (counted) and one whose answer cannot fit quarantined, bad lines in the
    published quarantine list, shards + manifest + _COMMITTED with the data fingerprint; a second preparation of
    the same settings gives the same shard bytes; the published folder refuses to be overwritten silently and is
    accepted as data.prepared for the same job."""
    from longctx.data.fingerprint import data_fingerprint
    from longctx.runs.handoff import check_packed_data

    big = LONG_CHAT[:2] + [{"role": "assistant", "content": " ".join(f"a{i}" for i in range(200))}]
    files = {"long/a.jsonl": [LONG_CHAT, CHAT], "long/b.jsonl": [LONG_CHAT, big], "general/g.jsonl": [CHAT] * 5}
    for name, chats in files.items():
        body = "".join(json.dumps({"id": f"{name}:{i}", "messages": m}) + "\n" for i, m in enumerate(chats))
        storage.write_text(f"{s3_bucket}/in/{name}", body + ("{broken\n" if name.startswith("general") else ""))
    overrides = [
        "data.seq_len=160", "data.max_bad_fraction=0.3", "data.rows_per_shard=2",
        f"data.sources={{long: {{uri: ['{s3_bucket}/in/long/a.jsonl', '{s3_bucket}/in/long/b.jsonl']}}, "
        f"general: '{s3_bucket}/in/general/'}}"]
    cfg = load_config(None, overrides)
    out = f"{s3_bucket}/data/sft"
    m = prepare_sft_data(cfg, out)
    assert storage.is_committed(out)
    c = m["conversations"]
    assert c["read"] == {"long": 3, "general": 5}  # both files of the list: 2 + 2 chats, one refused
    assert c["truncated"] == 2 and c["truncated_tokens"] > 0 and c["overlong_quarantined"] == 1
    assert m["quarantine"]["by_reason"] == {src.BAD_JSON: 1, src.OVERLONG_CHAT: 1}
    assert m["data_fingerprint"] == data_fingerprint(cfg) and m["kind"] == "sft"
    q = storage.read_text(f"{out}/_quarantine/records.jsonl").splitlines()
    assert sorted(json.loads(x)["reason"] for x in q) == [src.BAD_JSON, src.OVERLONG_CHAT]
    import pyarrow.parquet as pq

    rows = []
    for sh in m["shards"]:
        fs, path = storage.pyarrow_fs(f"{out}/{sh['path']}")
        rows += pq.read_table(path, filesystem=fs).to_pylist()
    assert len(rows) == m["totals"]["rows"] and [r["row_id"] for r in rows] == list(range(len(rows)))
    assert len(m["shards"]) == -(-len(rows) // 2)
    assert sum(sum(1 for d in r["seg_doc_ids"] if d) for r in rows) == 8 == len(rows) + 3  # 69-token chats: 2 a row
    assert all(len(r["input_ids"]) == 160 for r in rows)
    assert sum(sum(lab != -100 for lab in r["labels"]) for r in rows) == m["totals"]["loss_tokens"]
    # the truncated chats end with their answer, learned
    tok = load_tokenizer("builtin:tiny-tokenizer")
    for r in rows:
        at = 0
        for n, d in zip(r["seg_lengths"], r["seg_doc_ids"]):
            if d and n == 160:
                assert tok.decode(r["input_ids"][at:at + n]).endswith("w7 is the eighth word.<|im_end|>\n")
            at += n
    again = prepare_sft_data(cfg, f"{s3_bucket}/data/sft2")
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]
    with pytest.raises(storage.StorageError, match="already published"):
        prepare_sft_data(cfg, out)
    prepared = cfg.model_copy(update={"data": cfg.data.model_copy(update={"prepared": out})})
    assert check_packed_data(prepared, {**m, "uri": out}, "sft", same_config=True) == []
    # what a rerun checks before reusing it: the same settings pass, another overlong policy is named
    assert check_packed_data(cfg, {**m, "uri": out}, "sft", same_config=True) == []
    other = load_config(None, [*overrides, "data.sft.overlong=quarantine"])
    assert "data.sft.overlong" in "\n".join(check_packed_data(other, {**m, "uri": out}, "sft", same_config=True))
