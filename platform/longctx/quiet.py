"""How much a job prints: by default our own lines, with `--verbose` (or LONGCTX_LOG_LEVEL=debug) everything.

Our lines are the ones a user reads: `[preflight]`, `[longctx]` phases and progress with ETA, one `[train]` line per
step, the report path, and the final model's URI last. Around them Ray, Ray Data, Ray Train, DeepSpeed and
transformers print by default what matters to whoever debugs them: Ray Data's progress blocks every few seconds,
Ray Train's worker-group and checkpoint bookkeeping, tqdm bars for loading weights, deprecation warnings raised
inside DeepSpeed. Quiet mode (the default) keeps their warnings and errors and drops the rest:

- the driver: Ray's own loggers at WARNING (`ray.init(logging_level=...)`), Ray Data's progress blocks off;
- every Ray process of the job (`ray.init(logging_config=...)` and the job's `runtime_env` variables): Python
  logging at WARNING, Ray Train's `ray.train` logs at WARNING (`train_logging_config`), Hugging Face progress bars
  off, and one known FutureWarning that DeepSpeed triggers in torch (`all_gather_into_tensor`) filtered by message.

    from longctx import quiet
    quiet.set_verbose()            # --verbose: before Ray starts, so its processes inherit the setting
    ray.init(..., runtime_env={"env_vars": quiet.process_env()}, **quiet.ray_init_kwargs())

`LONGCTX_LOG_LEVEL=debug` (or `--verbose`) shows everything Ray, Ray Data, Ray Train and DeepSpeed print by
default, and our own debug logs.
"""

from __future__ import annotations

import logging
import os
import sys

LEVEL_ENV = "LONGCTX_LOG_LEVEL"
KNOWN_WARNINGS = ("ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning",)
"""Warnings filtered in quiet mode (PYTHONWARNINGS syntax): raised inside DeepSpeed, not by our calls."""


def verbose() -> bool:
    """True with `--verbose` or LONGCTX_LOG_LEVEL=debug."""
    return os.environ.get(LEVEL_ENV, "").strip().lower() == "debug"


def set_verbose() -> None:
    """`--verbose`: everything is printed, here and in every Ray process started after this call."""
    os.environ[LEVEL_ENV] = "debug"


def log_level() -> str:
    """Level of our own Python logging: LONGCTX_LOG_LEVEL (any case; default INFO)."""
    level = os.environ.get(LEVEL_ENV, "INFO").strip().upper()
    return level if isinstance(logging.getLevelName(level), int) else "INFO"


def process_env() -> dict[str, str]:
    """Environment variables for every Ray process of the job (`runtime_env={"env_vars": ...}`)."""
    if verbose():
        return {LEVEL_ENV: "debug"}
    warnings = ",".join([*KNOWN_WARNINGS, *([os.environ["PYTHONWARNINGS"]] if os.environ.get("PYTHONWARNINGS") else [])])
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": warnings}


def ray_init_kwargs() -> dict:
    """`ray.init` keyword arguments: Ray's driver-side logs and the job's workers' Python logging at WARNING."""
    if verbose():
        return {}
    import ray  # deferred: callers import this module before deciding to start Ray

    return {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="WARNING")}


def configure_driver() -> None:
    """After `ray.init`: no Ray Data progress blocks or execution plans (our own progress lines say counts, rate
    and ETA)."""
    if verbose():
        return
    from ray.data import DataContext  # deferred: Ray Data is imported only once Ray is up

    DataContext.get_current().print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):  # Ray Data logs its progress blocks at INFO off a terminal
        logging.getLogger(name).setLevel(logging.WARNING)
    # the driver loads models too (the regression gate): Hugging Face progress bars off here as in the workers;
    # the variables for a later import, the calls for a transformers the driver has already imported
    for key, value in process_env().items():
        if key != "PYTHONWARNINGS":
            os.environ.setdefault(key, value)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging  # deferred: already imported (sys.modules), no cost

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def configure_worker() -> None:
    """In a Ray worker (the training loop): Python logging on the console at WARNING unless verbose. Ray Train sets
    the worker's root logger to print everything at INFO (e.g. one "Reporting training result" line per report
    and rank, from a logger named after its file); our own `longctx` loggers follow LONGCTX_LOG_LEVEL."""
    if verbose():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    logging.getLogger("longctx").setLevel(logging.WARNING)


def train_logging_config():
    """Ray Train's `RunConfig(logging_config=...)`: its `ray.train` logs at WARNING unless verbose."""
    import ray.train  # deferred: only the trainer needs it

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")
