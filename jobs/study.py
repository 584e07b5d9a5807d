"""The study: the papers' orderings measured side by side (training-free baselines vs Long-PT, Fu et al.'s data
strategies on a long-tailed corpus, Index's RoPE base sweep, retrieval vs tokens trained) -> one report whose
first lines say which ordering held and which did not.

    python jobs/study.py                                   # laptop: shipped tiny base, all parts, ~40 steps a trial
    python jobs/study.py --steps 10 --parts ab --output runs/study-quick
    longctx study --steps 40                               # the same through the CLI

Fixed seeds (config's data.seed / train.seed / eval.seed). Writes <output>/report.md, study.json (numbers and
verdicts), plan.json and trials/<name>/ (each trial's config, training log and eval/metrics.json).
"""

from __future__ import annotations

import argparse
import sys

from longctx.runs.study import add_study_args, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = add_study_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
