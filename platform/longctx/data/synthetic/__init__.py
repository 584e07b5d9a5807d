"""Synthetic long-context data (LongSkywork; docs/architecture.md, section 5), generated in parallel through Ray Data.

- `cip`: chunk-interleaved pretraining (CIP-k) rows in the packed contract, for Long-PT
  (`data.cip.fraction` mixes them into `prepare_data`; `cip_dataset` is the Ray Data stage).
- `tables`: SynL, synthetic lengthy tables with computed answers, as chat JSONL for Long-SFT.
- `retrieval`: passkey / key-value / multi-needle instructions over corpus haystacks, as chat JSONL.
- `general`: short general instructions with computed answers (the general part of the embedded Long-SFT
  default's mix; `scripts/build_sft_sample.py` ships them with small retrieval and table sets).

Everything is a function of `synth.seed` (or `data.seed`) and sized in tokens of `data.tokenizer`:

    longctx data synth cip       --set data.cip.k=2 --output runs/cip        # or --packed <packed folder>
    longctx data synth tables    --set synth.tables.num_samples=1000 --set synth.output=s3://bucket/synth
    longctx data synth retrieval --set synth.retrieval.max_tokens=32768 --set synth.output=s3://bucket/synth

    from longctx.data.synthetic import synth_cip, synth_tables, synth_retrieval, cip_table, cip_dataset
"""

from longctx.data.cip import cip_dataset, cip_table
from longctx.data.synthetic.cip import synth_cip
from longctx.data.synthetic.common import load_chat_jsonl
from longctx.data.synthetic.retrieval import synth_retrieval
from longctx.data.synthetic.tables import synth_tables

__all__ = ["cip_table", "cip_dataset", "synth_cip", "synth_tables", "synth_retrieval", "load_chat_jsonl"]
