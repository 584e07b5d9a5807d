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

import sys

from longctx.jobargs import run_job
from longctx.tune.sweep import run_sweep

DEFAULT_CONFIG = "jobs/configs/sweep-rope-budget.yaml"


def _sweep(cfg, args) -> int:
    try:
        summary = run_sweep(cfg, fresh=args.fresh)
    except ValueError as e:  # an invalid search space, or a sweep that exists with other settings
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    if not summary["complete"]:
        return 3
    print(summary["results"], flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job("sweep", __doc__, _sweep, argv, default_config=DEFAULT_CONFIG, kind="sweep",
                   example="tune.max_concurrent_trials=2",
                   add_args=lambda p: p.add_argument("--fresh", action="store_true",
                                                     help="refuse to resume: fail if a sweep of this name exists"))


if __name__ == "__main__":
    sys.exit(main())
