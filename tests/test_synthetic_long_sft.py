"""Synthetic data end to end: SynL tables and retrieval instructions generated through Ray Data, mixed with
natural long instructions by jobs/long_sft.py (chat template, loss on assistant turns only, packing), trained on a
tiny Llama through Ray Train + DeepSpeed, and the final model published. The loss tokens of every synthetic
conversation are exactly its answer (plus the end-of-turn marker)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from longctx import storage
from longctx.config import load_config
from longctx.data.synthetic import load_chat_jsonl, synth_retrieval, synth_tables
from longctx.data.tokenize import load_fast_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SEQ = 512


def _long_sft_job():
    spec = importlib.util.spec_from_file_location("long_sft_job", ROOT / "jobs" / "long_sft.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.e2e
def test_long_sft_consumes_synthetic_data(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    from train_helpers import make_tiny_model

    synth = str(tmp_path / "synth")
    cfg = load_config(None, [f"synth.output={synth}", "synth.seed=1", "synth.batch_size=4",
                             "synth.tables.num_samples=8", "synth.tables.min_tokens=360",
                             "synth.tables.max_tokens=480", "synth.tables.questions=[lookup, extremum]",
                             "synth.retrieval.num_samples=8", "synth.retrieval.min_tokens=200",
                             "synth.retrieval.max_tokens=480", "synth.retrieval.haystack_max_chars=100000"])
    tables, retrieval = synth_tables(cfg), synth_retrieval(cfg)
    assert tables["totals"]["max_tokens"] <= SEQ and retrieval["totals"]["max_tokens"] <= SEQ
    rng = np.random.default_rng(0)
    with open(tmp_path / "natural.jsonl", "w") as f:
        for i in range(6):
            doc = " ".join(f"item{j}={int(rng.integers(0, 999))}" for j in range(60))
            f.write(json.dumps({"id": f"nat-{i}", "messages": [
                {"role": "user", "content": doc + "\nWhat is item3?"},
                {"role": "assistant", "content": doc.split()[3].split("=")[1]}]}) + "\n")
    model_dir = make_tiny_model(str(tmp_path / "model"), hidden=32, max_pos=SEQ)
    # NOTE: the SFT reader takes *.json files too, so the sources name the shards, not the folders (which also
    # hold manifest.json).
    job_cfg = load_config(ROOT / "jobs" / "configs" / "longskywork-sft.yaml", [
        f"output_dir={tmp_path}/runs", "run_name=longskywork", f"model.path={model_dir}",
        f"data.tokenizer={model_dir}", f"data.seq_len={SEQ}",
        f"data.sources={{synl: '{synth}/tables/part-*.jsonl', retrieval: '{synth}/retrieval/part-*.jsonl', "
        f"natural_long: '{tmp_path}/natural.jsonl'}}",
        "data.sft.mix={synl: 0.4, retrieval: 0.4, natural_long: 0.2}",
        "train.num_workers=2", "train.sequence_parallel=1", "train.use_gpu=false", "train.cpus_per_worker=1", "train.zero_stage=2",
        "train.activation_checkpointing=false", f"train.global_batch_tokens={2 * SEQ}", "train.lr=1e-3",
        "train.epochs=1", "train.max_steps=null", "train.checkpoint_every=0", "train.max_failures=0", "train.loss_chunk_tokens=256",
        "model.max_position_embeddings=null", "model.dtype=float32", "eval.enabled=false", "storage.endpoint_url=null"])
    metrics = _long_sft_job().run_long_sft(job_cfg)
    data = metrics["data"]
    assert data["quarantined"] == 0 and data["conversations"]["truncated"] == 0
    assert data["conversations"]["used"] == {"synl": 9, "retrieval": 9, "natural_long": 4}
    assert metrics["train"]["steps"] >= 1 and math.isfinite(metrics["train"]["final_loss"])
    AutoModelForCausalLM.from_pretrained(storage.download_dir(metrics["train"]["final_model"], str(tmp_path / "final")))
    # loss only on the answers of the synthetic conversations
    answers = {r["id"]: r["messages"][1]["content"] for r in load_chat_jsonl(tables["uri"]) + load_chat_jsonl(retrieval["uri"])}
    tok, _, _ = load_fast_tokenizer(model_dir)
    manifest = json.loads(storage.read_text(storage.join(data["uri"], "manifest.json")))
    checked = 0
    for shard in manifest["shards"]:
        for row in pq.read_table(storage.join(data["uri"], shard["path"])).to_pylist():
            start = 0
            for n, doc in zip(row["seg_lengths"], row["seg_doc_ids"]):
                labels = [t for t in row["labels"][start:start + n] if t != -100]
                start += n
                if doc in answers:
                    assert tok.decode(labels, skip_special_tokens=False).strip() == answers[doc] + "<|im_end|>"
                    checked += 1
    assert checked >= 18
