"""Job plumbing shared by `jobs/*.py` and the CLI: run folders, the Ray connection, and the Long-PT chain.

    from longctx.workflow import run_long_pt
    run_long_pt(load_config("jobs/configs/index-1.9b-32k-pt.yaml"))

`run_long_pt` is the whole recipe: prepare data (Ray Data) -> Long-PT (Ray Train + DeepSpeed) -> evaluate the
base model (naive extrapolation and training-free baselines) against the trained model -> report.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass, field

from longctx import storage
from longctx.config import JobConfig, dump_config, slug

log = logging.getLogger("longctx")


@dataclass
class RunContext:
    """A run's id and folder (local or s3://), plus wall-clock phase timings for the report."""

    run_id: str
    root: str
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def phase(self, name: str):
        return _Phase(self, name)


class _Phase:
    def __init__(self, run: RunContext, name: str):
        self.run, self.name = run, name

    def __enter__(self):
        self.t0 = time.time()
        print(f"[longctx] {self.name} ...", flush=True)
        return self

    def __exit__(self, *exc):
        dt = time.time() - self.t0
        self.run.timings[self.name] = round(dt, 2)
        if exc[0] is None:
            print(f"[longctx] {self.name} done in {dt:.1f}s", flush=True)


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LONGCTX_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def start_run(cfg: JobConfig, kind: str) -> RunContext:
    """Create the run folder and record the resolved config in it."""
    storage.configure(cfg.storage)
    run_id = slug(cfg.run_name or f"{kind}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    run = RunContext(run_id=run_id, root=storage.join(cfg.output_dir, run_id))
    storage.write_text(run.path("config.yaml"), dump_config(cfg))
    print(f"[longctx] run {run_id}: {run.root}", flush=True)
    return run


def connect_ray(cfg: JobConfig):
    """Connect to RAY_ADDRESS / ray.address, or start a local cluster sized by ray.num_cpus."""
    import ray

    storage.configure(cfg.storage)
    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    if storage.options().endpoint_url:
        env_vars["AWS_ENDPOINT_URL"] = storage.options().endpoint_url
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars})
    else:
        # NOTE: address="local" always starts a fresh cluster; a bare ray.init() would silently attach to the
        # latest `ray start` cluster on this machine (/tmp/ray/ray_current_cluster).
        # The dashboard (on 127.0.0.1) serves the State API, which Ray Train's placement-group cleaner polls: without
        # it, the worker group's placement group of a killed Train controller (a sweep trial stopped early or
        # interrupted) is never released and later trials wait for CPUs forever.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env_vars})
    return ray


def run_long_pt(cfg: JobConfig) -> dict:
    """Prepare data, run Long-PT, evaluate base vs baselines vs trained, write the report. Returns metrics."""
    from longctx.data.pipeline import prepare_data
    from longctx.eval.runner import default_model_specs, evaluate_models
    from longctx.report import write_report
    from longctx.report.sections import data_section, train_section
    from longctx.train.trainer import run_training

    from longctx import tracking

    setup_logging()
    tracking.check_available(cfg)  # a missing wandb / mlflow package fails here, before Ray is started
    run = start_run(cfg, "long-pt")
    connect_ray(cfg)

    with run.phase("data"):
        data_uri = cfg.data.output or run.path("data")
        manifest = prepare_data(cfg, data_uri)
    with run.phase("train"):
        outcome = run_training(cfg, data_uri, run.root)
    totals = manifest.get("totals", {})
    metrics: dict = {
        "run_id": run.run_id,
        "data": {"uri": data_uri, **{k: totals.get(k) for k in ("rows", "tokens", "pad_fraction", "long_share",
                                                                  "split_docs")},
                 "quarantined": manifest.get("quarantine", {}).get("records", 0)},
        "train": {"steps": outcome.steps, "tokens": outcome.tokens, "final_loss": outcome.final_loss,
                  "final_model": outcome.final_model_uri, "metrics_log": outcome.metrics_log_uri,
                  "layout": outcome.layout},
    }
    if cfg.eval.enabled:
        with run.phase("eval"):
            specs = default_model_specs(cfg, cfg.model.path, outcome.final_model_uri)
            metrics["eval"] = evaluate_models(cfg, specs, run.path("eval"))
    tracking.log_evaluation(cfg, run.root, run.run_id, metrics.get("eval"), step=outcome.steps,
                            checkpoint_evals=getattr(outcome, "checkpoint_evals", None))
    metrics["timings_s"] = dict(run.timings, total=round(time.time() - run.started, 2))
    storage.write_json(run.path("metrics.json"), metrics)
    sections = [("Data", data_section(manifest, run.root, data_uri)),
                ("Training", train_section(cfg, outcome, run.timings, run.root))]
    if outcome.checkpoint_evals:  # eval.during_training: every checkpoint, evaluated while training ran
        from longctx.eval.during_training import PLOT, checkpoint_eval_section

        sections.append(("Checkpoints evaluated during training",
                         checkpoint_eval_section(outcome.checkpoint_evals, f"train/{PLOT}")))
    report = write_report(run.root, metrics, sections, title=f"Long-PT run {run.run_id}")
    print(f"[longctx] report: {report}", flush=True)
    print(f"[longctx] total {metrics['timings_s']['total']:.1f}s", flush=True)
    print(outcome.final_model_uri, flush=True)  # last line: the final model (scripts parse it)
    return metrics
