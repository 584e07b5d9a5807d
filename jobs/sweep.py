"""Sweep: a Ray Tune experiment whose every trial is the real prepare -> Long-PT -> evaluate chain.

    python jobs/sweep.py --config jobs/configs/sweep-rope-budget.yaml            # laptop: 3 RoPE bases x 2 budgets
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py --config FILE
    python jobs/sweep.py --config FILE --set tune.params.rope_theta=[1.0e4,1.0e6] --set tune.max_concurrent_trials=4

Run the same command again (same tune.name) after an interruption and the sweep resumes: finished trials are kept,
only the missing ones run. Results (table, heatmap, perplexity-vs-length curves, best config as a recipe, report)
go to `<output_dir>/<tune.name>/results/`; the last line printed is that folder. Exit status 3 when the sweep was
interrupted before every trial finished.
"""

from __future__ import annotations

import argparse
import sys

from longctx import preflight
from longctx.config import ConfigError, load_config
from longctx.tune.sweep import run_sweep

DEFAULT_CONFIG = "jobs/configs/sweep-rope-budget.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML job config with a tune: section (local, builtin: or s3://)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set tune.max_concurrent_trials=2 (repeatable)")
    parser.add_argument("--fresh", action="store_true", help="refuse to resume: fail if a sweep of this name exists")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        preflight.require(cfg, "sweep")  # every checkable mistake, before Ray starts
        summary = run_sweep(cfg, fresh=args.fresh)
    except (ConfigError, ValueError) as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    if not summary["complete"]:
        return 3
    print(summary["results"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
