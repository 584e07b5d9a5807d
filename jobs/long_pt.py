"""Long-PT: prepare data (Ray Data) -> continual pretraining at a long context (Ray Train + DeepSpeed) ->
evaluation against training-free baselines -> report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/long_pt.py --config jobs/configs/index-1.9b-32k-pt.yaml
    python jobs/long_pt.py                      # laptop: the embedded default (shipped corpus, tiny model, CPU)
    python jobs/long_pt.py --set train.max_steps=10 --set data.seq_len=512

Without --config the embedded default recipe (longctx/assets/recipes/tiny-long-pt.yaml) runs. The last line
printed is the URI of the final Hugging Face model directory.
"""

from __future__ import annotations

import sys

from longctx.jobargs import run_job
from longctx.runs.recipes import run_long_pt


def main(argv: list[str] | None = None) -> int:
    return run_job("long_pt", __doc__, lambda cfg, args: run_long_pt(cfg), argv, kind="pt")


if __name__ == "__main__":
    sys.exit(main())
