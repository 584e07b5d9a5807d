"""The command line every job shares (`jobs/*.py` and the `longctx` verbs): `--config FILE` plus any number of
`--set key.path=value`, and one mapping from errors to exit codes.

    def main(argv=None):
        return run_job("long_pt", __doc__, lambda cfg, args: run_long_pt(cfg), argv)

Exit codes: 0 done (or already finished), 2 the configuration or the inputs it names are wrong (including a rerun
whose settings differ from the run it would continue, and prepared data that does not fit the job), 3 the input
data failed its quality gate (or, for a sweep, not every trial finished), 4 training stopped on purpose (a
non-finite loss or gradient norm, non-finite weights, no intact checkpoint), 5 the regression gate after a
training stage failed under `eval.gate.action: fail` (the stage's model is not published: `longctx.eval.gate`), 75
preempted: SIGTERM/SIGINT while training checkpointed at a step boundary, rerun the same command to resume
(`longctx.train.stops`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from longctx import quiet
from longctx.config import EMBEDDED_DEFAULT, EMBEDDED_SFT_DEFAULT, ConfigError, load_config
from longctx.eval.gate import GateFailed
from longctx.train.stops import TrainingStopped


def add_config_args(p: argparse.ArgumentParser, default_config: str | None = EMBEDDED_DEFAULT,
                    example: str = "train.lr=2e-5", default_help: str | None = None) -> None:
    """--config and --set, as every job and verb takes them (`default_help` says what the default is)."""
    what = default_help or {EMBEDDED_DEFAULT: "the embedded default recipe, shipped corpus + tiny model on CPU",
                            EMBEDDED_SFT_DEFAULT: "the embedded Long-SFT recipe, shipped chat data + tiny model on "
                                                  "CPU"}.get(default_config, default_config or "the built-in defaults")
    p.add_argument("--config", default=default_config,
                   help=f"YAML job config: local, builtin: or s3:// (default: {what})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key by dotted path, e.g. --set {example} (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="print everything Ray, Ray Data, Ray Train, DeepSpeed and transformers print (default: "
                   "longctx's own lines; same as LONGCTX_LOG_LEVEL=debug)")


def job_parser(doc: str, default_config: str | None = EMBEDDED_DEFAULT, example: str = "train.lr=2e-5"):
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_config, example)
    return parser


def exit_code(e: BaseException) -> int | None:
    """The exit code of an error a job reports in one line, None for the others (they keep their traceback)."""
    from longctx.data.token_cache import DataQualityError  # deferred: pulls in pyarrow, used only here
    from longctx.runs.handoff import PreparedDataMismatch  # deferred: pulls in pyarrow, used only here

    if isinstance(e, (ConfigError, PreparedDataMismatch)):
        return 2
    if isinstance(e, DataQualityError):
        return 3
    if isinstance(e, (TrainingStopped, GateFailed)):
        return e.exit_code
    return None


def run_job(prog: str, doc: str, fn: Callable, argv: list[str] | None = None, *,
            default_config: str | None = EMBEDDED_DEFAULT, example: str = "train.lr=2e-5",
            kind: str | None = None, add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse the job's arguments, load its config, run the checks of job `kind` before Ray starts
    (`longctx.preflight`: every problem at once, exit 2) and call `fn(cfg, args)`; an int result is the exit code."""
    parser = job_parser(doc, default_config, example)
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    if args.verbose:
        quiet.set_verbose()
    try:
        cfg = load_config(args.config, args.overrides)
        if kind is not None:
            from longctx import preflight  # deferred: pulls in pyarrow, used only here

            preflight.require(cfg, kind)  # every checkable mistake, before Ray starts
        result = fn(cfg, args)
    except Exception as e:  # noqa: BLE001 - mapped to an exit code and one line, or re-raised
        code = exit_code(e)
        if code is None:
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        return code
    return result if isinstance(result, int) else 0
