"""python scripts/build_sft_sample.py [--seed 0] [--retrieval 96] [--tables 48] [--general 192]

Build the chat data the embedded Long-SFT default (`builtin:recipes/tiny-long-sft.yaml`) trains on, under
`platform/longctx/assets/sft/`, with the library's own generators (the same sample builders `longctx data synth`
runs in Ray Data actors, called here in one process):

* `retrieval.jsonl.gz`  passkey / key-value / multi-needle instructions over haystacks cut from the shipped
  training corpus (`longctx.data.synthetic.retrieval`), 256-1024 tokens of the shipped tokenizer's ChatML;
* `tables.jsonl.gz`     SynL table questions with computed answers (`longctx.data.synthetic.tables`), same lengths;
* `general.jsonl.gz`    short general instructions with computed answers (`longctx.data.synthetic.general`).

Every sample is a function of (seed, generator, index) and gzip is written with mtime=0, so the files are
byte-identical on a rerun. Counts and sizes are printed (and recorded in `assets/README.md` by hand).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

from longctx import storage
from longctx.config import EMBEDDED_DEFAULT, load_config
from longctx.data.synthetic.general import general_record
from longctx.data.synthetic.retrieval import RetrievalSampleBuilder, load_haystack, retrieval_settings
from longctx.data.synthetic.tables import TableSampleBuilder, table_settings

OUT = os.path.join(os.path.dirname(__file__), "..", "platform", "longctx", "assets", "sft")


def write_gz(path: str, lines: list[str]) -> int:
    """Write JSON lines gzip-compressed with no timestamp or name (reproducible bytes); returns the size."""
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(data)
    return os.path.getsize(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrieval", type=int, default=96, help="retrieval samples")
    p.add_argument("--tables", type=int, default=48, help="SynL table samples")
    p.add_argument("--general", type=int, default=192, help="general-instruction samples")
    p.add_argument("--min-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--output", default=OUT)
    args = p.parse_args(argv)
    lengths = [f"synth.retrieval.min_tokens={args.min_tokens}", f"synth.retrieval.max_tokens={args.max_tokens}",
               f"synth.tables.min_tokens={args.min_tokens}", f"synth.tables.max_tokens={args.max_tokens}",
               "synth.retrieval.haystack_max_chars=2000000"]
    cfg = load_config(EMBEDDED_DEFAULT, lengths)  # the shipped corpus (haystacks) and tokenizer
    storage.configure(cfg.storage)
    os.makedirs(args.output, exist_ok=True)
    t0 = time.time()
    ids, texts = load_haystack(cfg)
    sets = {
        "retrieval": (RetrievalSampleBuilder(cfg.data.tokenizer, args.seed, retrieval_settings(cfg), ids, texts),
                      args.retrieval),
        "tables": (TableSampleBuilder(cfg.data.tokenizer, args.seed, table_settings(cfg)), args.tables),
    }
    for name, (builder, n) in sets.items():
        built = [builder.build(i) for i in range(n)]
        size = write_gz(os.path.join(args.output, f"{name}.jsonl.gz"), [b["line"] for b in built])
        tokens = [b["tokens"] for b in built]
        print(f"{name}: {n} samples, {sum(tokens):,} tokens ({min(tokens)}-{max(tokens)} per sample), "
              f"{size:,} bytes gz, {time.time() - t0:.1f}s")
    general = [json.dumps(general_record(args.seed, i), ensure_ascii=False) for i in range(args.general)]
    size = write_gz(os.path.join(args.output, "general.jsonl.gz"), general)
    print(f"general: {args.general} samples, {size:,} bytes gz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
