"""Long-context evaluation of a model beside training-free baselines of its base: perplexity by position,
passkey, needle-in-a-haystack grid and LongBench/LEval-format tasks, through Ray Data actors -> report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/eval_long.py --config jobs/configs/eval-long.yaml --set eval.model=s3://bucket/runs/x/train/final_model --set model.path=s3://bucket/base
    python jobs/eval_long.py --set eval.model=runs/long-pt-x/train/final_model     # laptop: shipped tiny base, CPU
    python jobs/eval_long.py --config jobs/configs/eval-long.yaml --set eval.longbench.data=/data/longbench/

`model.path` is the base model (baselines: eval.baselines with eval.scaling_factor); `eval.model` the model
under test (optional). Results: <output_dir>/<run>/metrics.json, report.md, PNGs, eval/longbench/*.jsonl.
"""

from __future__ import annotations

import argparse
import sys

from longctx import preflight
from longctx.config import EMBEDDED_DEFAULT, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=EMBEDDED_DEFAULT, help="YAML job config (local, builtin: or s3://)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set eval.model=runs/x/train/final_model (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        preflight.require(cfg, "eval")  # every checkable mistake, before Ray starts
    except ConfigError as e:
        print(f"eval_long: {e}", file=sys.stderr)
        return 2
    from longctx.eval.runner import run_eval  # imports torch: after the checks, which must take seconds

    run_eval(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
