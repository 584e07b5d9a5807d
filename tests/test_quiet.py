"""Quiet by default, everything with --verbose: what the job hands to Ray's processes, and that the one warning
filter it sets hides exactly that warning (the end-to-end job's output is checked in tests/test_long_pt_job.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from longctx import quiet
from longctx.cli import main

WARN = ("import warnings\n"
        "warnings.warn('`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...', FutureWarning)\n"
        "warnings.warn('some other deprecation', FutureWarning)\n")


def test_quiet_processes_drop_progress_bars_and_deepspeeds_warning_only(monkeypatch):
    monkeypatch.delenv(quiet.LEVEL_ENV, raising=False)
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    assert not quiet.verbose() and quiet.log_level() == "INFO"
    env = quiet.process_env()
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and env["TRANSFORMERS_VERBOSITY"] == "error"
    assert quiet.ray_init_kwargs()["logging_config"].log_level == "WARNING"
    proc = subprocess.run([sys.executable, "-c", WARN], env=dict(os.environ, PYTHONWARNINGS=env["PYTHONWARNINGS"]),
                          capture_output=True, text=True, timeout=60)
    assert "all_gather_into_tensor" not in proc.stderr  # the filter matches DeepSpeed's warning ...
    assert "some other deprecation" in proc.stderr      # ... and nothing else
    # a user's own PYTHONWARNINGS is kept beside ours
    monkeypatch.setenv("PYTHONWARNINGS", "error::UserWarning")
    assert quiet.process_env()["PYTHONWARNINGS"].endswith(",error::UserWarning")


def test_verbose_flag_and_debug_level_let_everything_through(monkeypatch, capsys):
    monkeypatch.setenv(quiet.LEVEL_ENV, "INFO")  # (recorded, so the --verbose below is undone after the test)
    assert not quiet.verbose()
    assert main(["config", "show", "--verbose"]) == 0
    capsys.readouterr()
    assert os.environ[quiet.LEVEL_ENV] == "debug" and quiet.verbose()
    assert quiet.process_env() == {quiet.LEVEL_ENV: "debug"} and quiet.ray_init_kwargs() == {}
    assert quiet.log_level() == "DEBUG"
    monkeypatch.setenv(quiet.LEVEL_ENV, "warning")
    assert not quiet.verbose() and quiet.log_level() == "WARNING"
    monkeypatch.setenv(quiet.LEVEL_ENV, "nonsense")
    assert quiet.log_level() == "INFO"
