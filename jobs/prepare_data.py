"""Prepare packed long-context training data: sources -> tokenize -> length mixture -> packed Parquet shards.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/prepare_data.py --config jobs/configs/prepare-slimpajama.yaml --set data.output=s3://your-bucket/packed/sp-32k-1b/
    python jobs/prepare_data.py --set data.output=runs/demo-data --set data.long_threshold=512   # laptop: shipped sample corpus

A config file with only a `data:` section is enough. Sources come from the config or from
`--set data.sources.NAME=URI` (local folder, file, glob or s3:// prefix; .jsonl, .jsonl.gz, .jsonl.zst, .parquet).
The same as `longctx data prepare`: a run of kind `prepare` whose data goes to `data.output` (default: the run
folder's `data/`); committed data of the same settings is reused, `--overwrite` prepares it again. `--stats`
prints the per-source length table only (nothing written). The last line printed is the output URI.
"""

from __future__ import annotations

import json
import sys

from longctx.jobargs import run_job
from longctx.runs.recipes import prepare_summary, run_prepare
from longctx.runs.steps import connect_ray


def _prepare(cfg, args) -> int:
    if args.stats:
        from longctx.data.pipeline import length_stats  # deferred: the data engine imports Ray Data

        connect_ray(cfg)
        print(json.dumps(length_stats(cfg)["quarantine"]))
        return 0
    uri, manifest = run_prepare(cfg, replace=args.overwrite)
    print(json.dumps(prepare_summary(manifest)))
    print(uri)
    return 0


def _args(p) -> None:
    p.add_argument("--stats", action="store_true", help="print per-source length statistics only")
    p.add_argument("--overwrite", action="store_true", help="prepare again over an existing committed output")


def main(argv: list[str] | None = None) -> int:
    return run_job("prepare_data", __doc__, _prepare, argv, default_config=None, kind="prepare",
                   example="data.sources.web=s3://bucket/web/", add_args=_args)


if __name__ == "__main__":
    sys.exit(main())
