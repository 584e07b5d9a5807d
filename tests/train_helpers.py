"""Test fixtures built from code for the training tests: a tiny HF causal LM folder and packed Parquet shards.

The model uses the shipped byte-level tokenizer's vocabulary (so tokenizer files are real) and a tiny config
(hidden 32-64, 2 layers). Packed rows follow the data engine's contract (docs/architecture.md, section 2).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from longctx import storage

TOKENIZER = "builtin:tiny-tokenizer"


def make_tiny_model(folder: str, arch: str = "llama", hidden: int = 64, layers: int = 2, vocab: int | None = None,
                    max_pos: int = 128, seed: int = 0, tie: bool = False) -> str:
    """Save a randomly initialised tiny causal LM (safetensors + tokenizer files) to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    tok_dir = storage.normalize(TOKENIZER)
    if vocab is None:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
              tie_word_embeddings=tie, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    for name in os.listdir(tok_dir):
        shutil.copy2(os.path.join(tok_dir, name), os.path.join(folder, name))
    return folder


def packed_rows(n_rows: int, seq_len: int, vocab: int, seed: int = 0, attention: str = "document",
                pad_every: int = 3, min_doc: int = 5, max_doc: int | None = None) -> pa.Table:
    """Rows of random documents packed back to back; every `pad_every`-th row ends in padding."""
    rng = np.random.default_rng(seed)
    max_doc = max_doc or seq_len
    cols = {k: [] for k in ("input_ids", "position_ids", "labels", "seg_lengths", "seg_sources", "seg_doc_ids",
                            "seg_doc_tokens", "row_id")}
    doc = 0
    for r in range(n_rows):
        room = seq_len - (int(rng.integers(1, seq_len // 4)) if pad_every and r % pad_every == pad_every - 1 else 0)
        lengths = []
        while sum(lengths) < room:
            lengths.append(int(min(rng.integers(min_doc, max_doc + 1), room - sum(lengths))))
        ids, pos, labels = [], [], []
        for n in lengths:
            toks = rng.integers(3, vocab, size=n).tolist()
            ids += toks
            labels += toks
            pos += list(range(n))
        pad = seq_len - room
        seg_src, seg_doc = ["code"] * len(lengths), [f"d{doc + i}" for i in range(len(lengths))]
        doc += len(lengths)
        if pad:
            ids += [0] * pad
            labels += [-100] * pad
            pos += list(range(pad))
            lengths.append(pad)
            seg_src.append("")
            seg_doc.append("")
        if attention == "full":
            pos = list(range(seq_len))
        cols["input_ids"].append(ids)
        cols["position_ids"].append(pos)
        cols["labels"].append(labels)
        cols["seg_lengths"].append(lengths)
        cols["seg_sources"].append(seg_src)
        cols["seg_doc_ids"].append(seg_doc)
        cols["seg_doc_tokens"].append(lengths)
        cols["row_id"].append(r)
    i32 = pa.list_(pa.int32())
    return pa.table({
        "input_ids": pa.array(cols["input_ids"], i32), "position_ids": pa.array(cols["position_ids"], i32),
        "labels": pa.array(cols["labels"], i32), "seg_lengths": pa.array(cols["seg_lengths"], i32),
        "seg_sources": pa.array(cols["seg_sources"], pa.list_(pa.string())),
        "seg_doc_ids": pa.array(cols["seg_doc_ids"], pa.list_(pa.string())),
        "seg_doc_tokens": pa.array(cols["seg_doc_tokens"], i32), "row_id": pa.array(cols["row_id"], pa.int64()),
    })


def write_packed_shards(uri: str, table: pa.Table, rows_per_shard: int = 16) -> str:
    """Publish packed rows as Parquet shards under `uri` (with the `_COMMITTED` marker), like the data engine."""
    with storage.publish_dir(uri, overwrite=True) as staging:
        for i, start in enumerate(range(0, table.num_rows, rows_per_shard)):
            pq.write_table(table.slice(start, rows_per_shard), os.path.join(staging, f"shard-{i:05d}.parquet"))
        shards = [{"path": f"shard-{i:05d}.parquet"} for i in range((table.num_rows + rows_per_shard - 1) // rows_per_shard)]
        storage.write_json(os.path.join(staging, "manifest.json"), {"rows": table.num_rows, "shards": shards})
    return uri


def reference_training(model_dir: str, cfg, table, steps: int, rows_per_step: int = 4, data_parallel: int = 2):
    """The same training in one process with plain PyTorch (no Ray, no DeepSpeed): (final weights, losses,
    pre-clip global gradient norms).

    Step s uses the rows the distributed run uses: rows_per_step / data_parallel rows of every rank's lane
    (`lane_step_rows`; the table's row i has row_id i). Which rank computes which row (batch balancing) does not
    change the step's loss or gradient.
    """
    from longctx.model.attention import attention_inputs
    from longctx.model.load import load_causal_lm
    from longctx.train.batches import collate, lane_step_rows, rows_from_table
    from longctx.train.loss import CausalLMWithChunkedLoss, shift_targets
    from longctx.train.optim import adamw
    from longctx.train.schedule import lr_lambda

    torch.manual_seed(cfg.train.seed)
    lm = load_causal_lm(model_dir, cfg.model, attn_implementation="sdpa", max_position_embeddings=cfg.data.seq_len)
    model = CausalLMWithChunkedLoss(lm, chunk_tokens=cfg.train.loss_chunk_tokens)
    opt = adamw(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=cfg.train.adam_betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, cfg.train.warmup_ratio, cfg.train.min_lr_ratio))
    rows = list(rows_from_table(table, "test"))
    order = lane_step_rows(len(rows), data_parallel, rows_per_step // data_parallel, steps)
    losses, grad_norms = [], []
    for step in range(steps):
        batch = collate([rows[i] for i in order[step]], "document")  # dp=2 x grad_accum=2 x micro=1 rows
        tgt = shift_targets(batch.labels, batch.doc_ids)
        loss_sum, n = model(batch.input_ids, tgt, **attention_inputs(batch.position_ids, attn_implementation="sdpa",
                                                                      doc_ids=batch.doc_ids))
        loss = loss_sum / n
        losses.append(float(loss.detach()))
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)))
        opt.step()
        sched.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in lm.state_dict().items()}, losses, grad_norms


def tokens_by_document(tables) -> dict[str, list[int]]:
    """{doc_id: its tokens in row order} gathered from packed-row tables (padding segments skipped): what the
    data tests compare with the documents that went in."""
    got: dict[str, list[int]] = {}
    for t in tables:
        for ids, lens, docs in zip(t.column("input_ids").to_pylist(), t.column("seg_lengths").to_pylist(),
                                   t.column("seg_doc_ids").to_pylist()):
            o = 0
            for n, d in zip(lens, docs):
                if d:
                    got.setdefault(d, []).extend(ids[o:o + n])
                o += n
    return got
