"""Experiment tracking through the ecosystem's own tools: TensorBoard event files (on by default), Weights &
Biases and MLflow (through Ray's `setup_wandb` / `setup_mlflow`), configured by the `logging:` section.

    tracker = Tracker.open(cfg, storage.join(train_root, "tensorboard"), run_id="long-pt-x", resume_step=0)
    tracker.log_step(record)                       # train/loss, train/lr, ... at record["step"]
    tracker.log({"val/loss": 2.9}, step=40)        # validation, checkpoint evaluation: same backends
    tracker.close()

Every backend gets the same scalars under the same names (`train/*`, `val/loss`, `eval/<model>/<metric>`) and the
run config as hyperparameters (flattened dotted keys). TensorBoard event files go under the run folder, local or
s3:// (written locally, uploaded at each flush), so `tensorboard --logdir <run folder>` shows the run.
Credentials never go into the config: W&B reads WANDB_API_KEY (or `wandb login`), MLflow its MLFLOW_* variables.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any

from longctx import storage
from longctx.config import ConfigError

log = logging.getLogger("longctx.tracking")

TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tflops_per_s", "mfu", "step_time_s",
                 "max_rss_gib", "gpu_peak_gib")
"""Fields of a training step record logged as `train/<field>` (the same numbers as metrics.jsonl)."""

_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def step_scalars(record: dict) -> dict[str, float]:
    """The scalars of one metrics.jsonl record, by tracked name: `train/<field>` and `val/loss`."""
    out = {f"train/{k}": float(record[k]) for k in TRAIN_SCALARS if _is_number(record.get(k))}
    if _is_number(record.get("val_loss")):
        out["val/loss"] = float(record["val_loss"])
    return out


def eval_scalars(metrics: dict) -> dict[str, float]:
    """Scalars of an evaluation (`evaluate_models`' result): `eval/<model>/<metric>` for NLL, passkey, needle,
    RULER's average per length (`<model>` as `tag_name` spells it)."""
    ev = metrics.get("eval", metrics) if isinstance(metrics, dict) else {}
    out: dict[str, float] = {}
    for label, m in (ev.get("models") or {}).items():
        name = tag_name(label)
        p = m.get("perplexity") or {}
        for key in ("overall_nll", "nll_beyond_base"):
            if _is_number(p.get(key)):
                out[f"eval/{name}/{key}"] = float(p[key])
        pk = m.get("passkey") or {}
        if _is_number(pk.get("overall")):
            out[f"eval/{name}/passkey_accuracy"] = float(pk["overall"])
        for variant, v in (m.get("needle") or {}).items():
            if _is_number(v.get("mean")):
                out[f"eval/{name}/needle_{variant}"] = float(v["mean"])
        for length, avg in ((m.get("ruler") or {}).get("average") or {}).items():
            if _is_number(avg):
                out[f"eval/{name}/ruler_{length}"] = float(avg)
    return out


def tag_name(label: str) -> str:
    """A model label as a scalar-name segment TensorBoard and MLflow accept as is (letters, digits, `_ - .`):
    `base + dynamic NTK x4` -> `base_dynamic_NTK_x4` (tensorboardX would rename it with a log line per tag)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flat_config(cfg) -> dict[str, Any]:
    """The job config as flat `section.key` hyperparameters (numbers, bools and strings; lists as JSON)."""
    tree = json.loads(cfg.model_dump_json()) if hasattr(cfg, "model_dump_json") else dict(cfg)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif node is None:
            out[prefix] = "null"
        elif isinstance(node, (bool, int, float, str)):
            out[prefix] = node
        else:
            out[prefix] = json.dumps(node)

    walk("", tree)
    return out


def missing_packages(cfg) -> list[str]:
    """Tracking packages the config asks for that are not installed."""
    lcfg = cfg.logging
    wanted = [name for name in ("wandb", "mlflow") if getattr(lcfg, name).enabled]
    return [name for name in wanted if importlib.util.find_spec(_PACKAGES[name]) is None]


def check_available(cfg) -> None:
    """Fail before Ray is started when `logging.wandb` / `logging.mlflow` is on without its package."""
    missing = missing_packages(cfg)
    if missing:
        raise ConfigError(
            "; ".join(f"logging.{m}.enabled is true but the `{m}` package is not installed in this environment "
                      f"(pip install '{m}', or `pip install longctx[tracking]`; on a cluster, in the image or the "
                      f"job's runtime_env)" for m in missing))


class Tracker:
    """Scalars to TensorBoard (+ W&B, MLflow when configured); `log` is cheap, uploads to s3 at most every
    `logging.flush_every_s` seconds and at `flush`/`close`."""

    def __init__(self, logdir: str | None, *, hparams: dict[str, Any] | None = None, resume_step: int = 0,
                 flush_every_s: float = 10.0, wandb_run=None, mlflow_module=None, role: str = "train"):
        self.logdir = logdir
        self.flush_every_s = flush_every_s
        self.role = role
        self._writer = None
        self._local_dir = None
        self._last_upload = 0.0
        self.wandb_run = wandb_run
        self.mlflow = mlflow_module
        if logdir:
            from tensorboardX import SummaryWriter  # deferred: optional dependency

            remote = logdir.startswith("s3://")
            self._local_dir = tempfile.mkdtemp(prefix="longctx-tb-") if remote else logdir
            if not remote:
                os.makedirs(logdir, exist_ok=True)
            # purge_step: after a resume, TensorBoard drops the events of steps the resumed run repeats
            # the suffix keeps two writers of one second (a quick resume) from sharing a file name, in start order
            self._writer = SummaryWriter(logdir=self._local_dir, purge_step=resume_step + 1 if resume_step else None,
                                         flush_secs=max(int(flush_every_s), 1),
                                         filename_suffix=f".{time.time_ns()}.{os.getpid()}")
            if hparams:
                self._write_hparams(hparams)

    # ---------------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, cfg, logdir: str | None, *, run_id: str, resume_step: int = 0, role: str = "train",
             rank_zero_only: bool = True) -> "Tracker":
        """The backends `cfg.logging` asks for; TensorBoard event files under `logdir` (local or s3://)."""
        check_available(cfg)
        lcfg = cfg.logging
        hparams = flat_config(cfg)
        wandb_run = mlflow_module = None
        if lcfg.wandb.enabled:
            wandb_run = _open_wandb(lcfg.wandb, hparams, run_id, role, rank_zero_only)
        if lcfg.mlflow.enabled:
            mlflow_module = _open_mlflow(lcfg.mlflow, hparams, run_id, role, rank_zero_only, cfg.output_dir)
        return cls(logdir if lcfg.tensorboard else None, hparams=hparams, resume_step=resume_step,
                   flush_every_s=lcfg.flush_every_s, wandb_run=wandb_run, mlflow_module=mlflow_module, role=role)

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        from tensorboardX.summary import hparams as hparams_summary  # deferred: optional dependency

        exp, ssi, sei = hparams_summary({k: v for k, v in hparams.items()}, {"train/loss": float("nan")})
        fw = self._writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        self._writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items())), 0)

    # ---------------------------------------------------------------------------------------------- logging
    def log(self, scalars: dict[str, float], step: int) -> None:
        scalars = {k: float(v) for k, v in scalars.items() if _is_number(v)}
        if not scalars:
            return
        if self._writer is not None:
            for k, v in scalars.items():
                self._writer.add_scalar(k, v, global_step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({_mlflow_key(k): v for k, v in scalars.items()}, step=step)
        if self._local_dir != self.logdir and time.time() - self._last_upload > self.flush_every_s:
            self.flush()

    def log_step(self, record: dict) -> None:
        self.log(step_scalars(record), int(record["step"]))

    def flush(self) -> None:
        if self._writer is None:
            return
        self._writer.flush()
        if self._local_dir != self.logdir:  # s3: upload the event files (append-only locally, small)
            for root, _, files in os.walk(self._local_dir):
                for name in files:
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, self._local_dir)
                    with open(path, "rb") as f:
                        storage.write_bytes(storage.join(self.logdir, *rel.split(os.sep)), f.read())
            self._last_upload = time.time()

    def close(self) -> None:
        if self._writer is not None:
            self.flush()
            self._writer.close()
            self.flush()
            if self._local_dir != self.logdir:
                shutil.rmtree(self._local_dir, ignore_errors=True)
            self._writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


def _mlflow_key(name: str) -> str:
    return name  # MLflow accepts / in metric names; kept identical to the TensorBoard tags


def _open_wandb(wcfg, hparams: dict, run_id: str, role: str, rank_zero_only: bool):
    from ray.air.integrations.wandb import setup_wandb  # deferred: heavy import, used only here

    kwargs: dict[str, Any] = {"project": wcfg.project, "group": wcfg.group or run_id, "mode": wcfg.mode,
                              "id": f"{run_id}-{role}" if role != "train" else run_id,
                              "name": run_id if role == "train" else f"{run_id} ({role})",
                              "job_type": role, "trial_id": run_id, "trial_name": run_id}
    if wcfg.mode != "online":  # Ray's setup_wandb reads the mode from the environment (no API key needed then)
        os.environ["WANDB_MODE"] = wcfg.mode
    if wcfg.entity:
        kwargs["entity"] = wcfg.entity
    if wcfg.dir:
        os.makedirs(wcfg.dir, exist_ok=True)
        kwargs["dir"] = wcfg.dir
    if wcfg.tags:
        kwargs["tags"] = list(wcfg.tags)
    return setup_wandb(config=hparams, rank_zero_only=rank_zero_only, **kwargs)


def _open_mlflow(mcfg, hparams: dict, run_id: str, role: str, rank_zero_only: bool, output_dir: str):
    from ray.air.integrations.mlflow import setup_mlflow  # deferred: heavy import, used only here

    uri = mcfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and not output_dir.startswith("s3://"):
        uri = "sqlite:///" + os.path.abspath(os.path.join(output_dir, "mlflow.db"))
    return setup_mlflow(config=hparams, tracking_uri=uri, experiment_name=mcfg.experiment_name,
                        run_name=run_id if role == "train" else f"{run_id}-{role}",
                        create_experiment_if_not_exists=True, rank_zero_only=rank_zero_only,
                        tags={"longctx.run_id": run_id, "longctx.role": role, **(mcfg.tags or {})})


CHECKPOINT_EVAL_SCALARS = ("nll_beyond_base", "passkey", "needle")
"""Fields of an eval.during_training record (checkpoint_eval.jsonl) logged as `checkpoint_eval/<field>`."""


def checkpoint_eval_scalars(record: dict) -> dict[str, float]:
    """`checkpoint_eval/<metric>` scalars of one eval.during_training record (logged at the checkpoint's step)."""
    return {f"checkpoint_eval/{k}": record[k] for k in CHECKPOINT_EVAL_SCALARS if _is_number(record.get(k))}


def log_evaluation(cfg, run_root: str, run_id: str, eval_metrics: dict | None, step: int,
                   checkpoint_evals: list[dict] | None = None) -> dict[str, float]:
    """The end-of-run evaluation's scalars (`eval/<model>/<metric>`, at training step `step`) and the checkpoint
    evaluations given in `checkpoint_evals` (`checkpoint_eval/<metric>` at each checkpoint's step; the jobs pass
    none: `eval.during_training` logs each record live, see `longctx.eval.during_training`) to
    `<run>/eval/tensorboard` and the configured backends (W&B: run `<run_id>-eval` in the run's group; MLflow:
    run `<run_id>-eval`). Returns the end-of-run scalars."""
    scalars = eval_scalars(eval_metrics or {})
    ckpts = [(int(r["step"]), checkpoint_eval_scalars(r)) for r in checkpoint_evals or [] if "step" in r]
    if not scalars and not any(v for _, v in ckpts):
        return scalars
    tracker = Tracker.open(cfg, storage.join(run_root, "eval", "tensorboard"), run_id=run_id, role="eval",
                           rank_zero_only=False)
    try:
        for s, values in sorted(ckpts, key=lambda x: x[0]):
            tracker.log(values, s)
        tracker.log(scalars, step)
    finally:
        tracker.close()
    return scalars
