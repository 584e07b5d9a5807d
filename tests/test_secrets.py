"""No secrets in outputs: a URL with credentials (`user:password@`) in any config field is refused before anything
is written or started, the refusal shows the URL masked, and a rejected `--set` never echoes its value.

The job runs as users run it (`python jobs/long_pt.py ...` in a subprocess, and its `main` in-process for the
other entry points); afterwards the output folder and everything the job printed or logged are searched for the
secret."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.config import ConfigError, JobConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-Pa55"


def _job_main():
    spec = importlib.util.spec_from_file_location("long_pt_job", ROOT / "jobs" / "long_pt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _grep_tree(folder: Path, needle: str) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            p = Path(dirpath) / name
            if needle.encode() in p.read_bytes():
                hits.append(str(p))
    return hits


CASES = [
    # (where the secret is, the --set overrides or a YAML body)
    ("storage.endpoint_url", [f"storage.endpoint_url=http://AKIAUSER:{SECRET}@127.0.0.1:9000"]),
    ("logging.mlflow.tracking_uri", ["logging.mlflow.enabled=true",
                                     f"logging.mlflow.tracking_uri=https://bob:{SECRET}@mlflow.example.com"]),
    ("a token as user name", [f"model.path=https://{SECRET}@hub.example.com/model"]),
    ("a source URI", [f"data.sources.web=s3://key:{SECRET}@bucket/web/"]),
    ("an unknown key", [f"storage.endpont_url=http://u:{SECRET}@h"]),
    ("a value of the wrong type", [f"train.lr=http://u:{SECRET}@h"]),
    ("a non-URL value of an unknown key", [f"logging.wandb.api_key={SECRET}"]),
]


@pytest.mark.parametrize("what, sets", CASES, ids=[c[0] for c in CASES])
def test_a_secret_in_a_config_is_refused_and_never_echoed_or_written(what, sets, tmp_path, capsys, caplog):
    main = _job_main()

    caplog.set_level(logging.DEBUG)
    argv = [a for s in [*sets, f"output_dir={tmp_path / 'runs'}"] for a in ("--set", s)]
    assert main(argv) == 2
    out = capsys.readouterr()
    said = out.out + out.err + caplog.text
    assert "invalid configuration" in said
    assert SECRET not in said, said
    if "unknown key" not in what and "wrong type" not in what:
        assert "credentials never go in a URL" in said and "***@" in said
    assert not (tmp_path / "runs").exists() or not _grep_tree(tmp_path / "runs", SECRET)


def test_a_secret_in_a_yaml_config_is_refused(tmp_path, capsys):
    main = _job_main()

    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"storage:\n  endpoint_url: http://AKIAUSER:{SECRET}@127.0.0.1:9000\n")
    assert main(["--config", str(cfg)]) == 2
    said = "".join(capsys.readouterr())
    assert "storage" in said and "http://***@127.0.0.1:9000" in said and SECRET not in said


def test_the_job_command_refuses_a_secret_before_starting_anything(tmp_path):
    runs = tmp_path / "runs"
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "long_pt.py"), "--set", f"output_dir={runs}",
                           "--set", f"storage.endpoint_url=http://AKIAUSER:{SECRET}@127.0.0.1:9000"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "credentials never go in a URL" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not _grep_tree(tmp_path, SECRET)


def test_assignment_after_validation_is_refused_too():
    cfg = load_config(None)
    with pytest.raises(ValueError, match="credentials never go in a URL") as err:
        cfg.storage.endpoint_url = f"http://u:{SECRET}@h"
    assert SECRET not in str(err.value)
    assert cfg.storage.endpoint_url is None
    assert SECRET not in dump_config(cfg)


def test_redact_masks_userinfo_only():
    from longctx.redact import has_credentials, redact

    assert has_credentials(f"http://u:{SECRET}@h:1/x") and has_credentials("https://tok@h")
    assert not has_credentials("s3://bucket/key@v2.jsonl")  # '@' in a key, not in the authority
    assert not has_credentials("mailto:a@b.c") and not has_credentials("sqlite:////tmp/mlflow.db")
    assert redact(f"see http://u:{SECRET}@h:9/p and s3://b/k@1") == "see http://***@h:9/p and s3://b/k@1"
    # negative control: the check that refuses these configs is what keeps them out
    assert JobConfig.model_construct().storage.endpoint_url is None
    with pytest.raises(ConfigError):
        load_config(None, [f"storage.endpoint_url=http://u:{SECRET}@h"])
