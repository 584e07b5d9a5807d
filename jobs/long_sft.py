"""Long-SFT: chat JSONL (long + general instruction sets) -> chat template, loss on assistant turns only, packed
with document attention -> Ray Train + DeepSpeed from a Long-PT output -> an HF model directory.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/long_sft.py --config jobs/configs/index-1.9b-32k-sft.yaml \
            --set model.path=s3://bucket/runs/<long-pt-run>/train/final_model
    python jobs/long_sft.py                     # laptop: the embedded default (shipped chat data, tiny model, CPU)
    python jobs/long_sft.py --set model.path=runs/<long-pt-run>/train/final_model   # from your Long-PT run

Without --config the embedded Long-SFT recipe (longctx/assets/recipes/tiny-long-sft.yaml) runs: shipped synthetic
retrieval and table conversations plus short general instructions. Sources are `data.sources` (JSONL with a
`messages` list per line); `data.sft.mix` sets their shares; epochs are `train.epochs` (Index: 2). The run folder
holds config.yaml, data/ (packed shards + manifest.json), train/ (checkpoints, metrics.jsonl, final_model/) and
metrics.json. The last line printed is the final model's URI.
"""

from __future__ import annotations

import sys

from longctx.config import EMBEDDED_SFT_DEFAULT
from longctx.jobargs import run_job
from longctx.runs.recipes import run_long_sft


def main(argv: list[str] | None = None) -> int:
    return run_job("long_sft", __doc__, lambda cfg, args: run_long_sft(cfg), argv, default_config=EMBEDDED_SFT_DEFAULT, kind="sft",
                   example="train.lr=5e-6")


if __name__ == "__main__":
    sys.exit(main())
