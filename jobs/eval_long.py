"""Long-context evaluation of a model beside training-free baselines of its base: perplexity by position,
passkey, needle-in-a-haystack grid and LongBench/LEval-format tasks, through Ray Data actors -> report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/eval_long.py --config jobs/configs/eval-long.yaml --set eval.model=s3://bucket/runs/x/train/final_model --set model.path=s3://bucket/base
    python jobs/eval_long.py --set eval.model=runs/long-pt-x/train/final_model     # laptop: shipped tiny base, CPU
    python jobs/eval_long.py --config jobs/configs/eval-long.yaml --set eval.longbench.data=/data/longbench/

`model.path` is the base model (baselines: eval.baselines with eval.scaling_factor); `eval.model` the model
under test (optional). Results: <output_dir>/<run>/metrics.json, report.md, PNGs, eval/longbench/*.jsonl.
"""

from __future__ import annotations

import sys

from longctx.jobargs import run_job
from longctx.runs.recipes import run_eval


def main(argv: list[str] | None = None) -> int:
    return run_job("eval_long", __doc__, lambda cfg, args: run_eval(cfg), argv, kind="eval",
                   example="eval.model=runs/x/train/final_model")


if __name__ == "__main__":
    sys.exit(main())
