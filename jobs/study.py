"""The study: the papers' orderings measured side by side (training-free baselines vs Long-PT, Fu et al.'s data
strategies on a long-tailed corpus, Index's RoPE base sweep, retrieval vs tokens trained) -> one report whose
first lines say which ordering held and which did not.

    python jobs/study.py                                   # the full study: 3 training seeds, intervals
    python jobs/study.py --quick --output runs/study-quick # one seed, fewer steps and prompts (< 15 min, 2 cores)
    python jobs/study.py --steps 10 --parts ab --output runs/study-ab
    longctx study --quick                                  # the same through the CLI

Fixed seeds (config's data.seed / train.seed / eval.seed; training seed k adds k to the first two). Writes
<output>/report.md (verdict counts first, then every verdict with its 95% intervals), study.json (numbers,
per-item results and verdicts), plan.json and trials/<name>/ (each trial's config, training log and
eval/metrics.json).
"""

from __future__ import annotations

import argparse
import sys

from longctx.runs.study import run_from_args
from longctx.runs.study_args import add_study_args


def main(argv: list[str] | None = None) -> int:
    parser = add_study_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
