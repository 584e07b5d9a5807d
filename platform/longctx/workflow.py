"""Runs: one home per run and the steps every job composes (Long-PT, Long-SFT, evaluation, each sweep trial).

    from longctx.workflow import run_long_pt
    run_long_pt(load_config("jobs/configs/index-1.9b-32k-pt.yaml"))

A run is a folder `<output_dir>/<run id>/` (local or s3://) holding `config.yaml`, `attempts.jsonl` (one line per
event of every attempt: started, data, train, eval, finished), `data/`, `train/`, `eval/`, `metrics.json`,
`report.md` and `final_model.txt`. The steps:

    run = open_run(cfg, "long-pt")          # finds the run again (same settings -> same default name)
    data_uri, manifest = prepare_step(run, cfg)     # committed data of the same settings is reused, not re-read
    outcome = train_step(run, cfg, data_uri)        # continues from the last committed checkpoint
    ev = evaluate_step(run, cfg, specs)             # skipped when its metrics are already there
    finish(run, metrics, report_sections, final_model=outcome.final_model_uri)

Running the same command again is resuming: see docs/architecture.md ("Runs").
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from longctx import quiet, raycluster, storage
from longctx.config import JobConfig, dump_config, load_config, slug

log = logging.getLogger("longctx")

HOME_ENV = "LONGCTX_HOME"
DEFAULT_HOME = "~/longctx"
ATTEMPTS = "attempts.jsonl"
FINAL_MODEL_FILE = "final_model.txt"


# --------------------------------------------------------------------------------------------- where runs go
def in_ray_working_dir(cwd: str | None = None) -> bool:
    """True inside the temporary copy of the working dir that `ray job submit --working-dir` runs a job in."""
    cwd = cwd or os.getcwd()
    return "_ray_pkg_" in cwd or f"{os.sep}runtime_resources{os.sep}" in cwd


def resolve_output(path: str | None, cwd: str | None = None) -> str | None:
    """A writable location users find again: s3:// and absolute paths as given; a relative path under
    $LONGCTX_HOME when set, else under the current folder, except inside Ray's temporary working-dir copy
    (`ray job submit --working-dir .`), where it goes under ~/longctx instead of where Ray may delete it."""
    if path is None or storage.is_s3(path) or str(path).startswith("builtin:") or os.path.isabs(path):
        return path
    home = os.environ.get(HOME_ENV)
    if not home and in_ray_working_dir(cwd):
        home = DEFAULT_HOME
    base = os.path.expanduser(home) if home else (cwd or os.getcwd())
    return os.path.normpath(os.path.join(os.path.abspath(base), path))


def resolve_outputs(cfg: JobConfig) -> JobConfig:
    """`cfg` with output_dir, data.output and train.storage_path resolved by `resolve_output`."""
    out = cfg.model_copy(deep=True)
    out.output_dir = resolve_output(cfg.output_dir)
    if cfg.data.output:
        out.data.output = resolve_output(cfg.data.output)
    if cfg.train.storage_path:
        out.train.storage_path = resolve_output(cfg.train.storage_path)
    if cfg.output_dir != out.output_dir and in_ray_working_dir() and not os.environ.get(HOME_ENV):
        print(f"[longctx] output_dir {cfg.output_dir!r} is relative and this job runs in Ray's temporary copy of "
              f"the working dir: writing under {out.output_dir} (set {HOME_ENV} or an absolute/s3:// "
              f"output_dir to choose)", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------- runs
@dataclass
class RunContext:
    """A run's id and folder (local or s3://), its config, and wall-clock phase timings for the report."""

    run_id: str
    root: str
    cfg: JobConfig | None = None
    kind: str = "run"
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    finished: dict | None = None
    """The `finished` record of an earlier attempt (the run has nothing left to do), else None."""
    attempt_no: int = 1

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def phase(self, name: str):
        return _Phase(self, name)

    def attempt(self, event: str, **extra) -> None:
        """Append one event to `<run>/attempts.jsonl` (rewritten whole on s3://, where objects cannot grow)."""
        record_attempt(self.root, event, attempt=self.attempt_no, **extra)


def record_attempt(root: str, event: str, **extra) -> None:
    uri = storage.join(root, ATTEMPTS)
    line = json.dumps({"event": event, "time": round(time.time(), 3), **extra}, default=str)
    old = storage.read_text(uri) if storage.exists(uri) else ""
    storage.write_text(uri, old + line + "\n")


def read_attempts(root: str) -> list[dict]:
    uri = storage.join(root, ATTEMPTS)
    if not storage.exists(uri):
        return []
    return [json.loads(x) for x in storage.read_text(uri).splitlines() if x.strip()]


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
    logging.basicConfig(level=quiet.log_level(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_id_for(cfg: JobConfig, kind: str) -> str:
    """`run_name`, else `<kind>-<fingerprint of the result-shaping settings>` (a rerun finds the same run)."""
    from longctx.resume import run_fingerprint

    return slug(cfg.run_name or f"{kind}-{run_fingerprint(cfg)}")


def open_run(cfg: JobConfig, kind: str) -> RunContext:
    """Create the run folder, or find it again: an existing run is continued only when its recorded config
    would compute the same results (else `ResumeRefused`, naming the keys). Records the attempt."""
    from longctx.resume import check_same_run

    storage.configure(cfg.storage)
    cfg = resolve_outputs(cfg)
    run_id = run_id_for(cfg, kind)
    run = RunContext(run_id=run_id, root=storage.join(cfg.output_dir, run_id), cfg=cfg, kind=kind)
    cfg_uri = run.path("config.yaml")
    attempts = read_attempts(run.root)
    if storage.exists(cfg_uri):
        check_same_run(load_config(cfg_uri), cfg, cfg_uri)
        run.finished = next((a for a in reversed(attempts) if a.get("event") == "finished"), None)
        run.attempt_no = 1 + sum(a.get("event") == "started" for a in attempts)
    if run.finished:
        return run
    storage.write_text(cfg_uri, dump_config(cfg))
    run.attempt("started", kind=kind, pid=os.getpid(), host=socket.gethostname())
    verb = "resuming" if run.attempt_no > 1 else "run"
    print(f"[longctx] {verb} {run_id}: {run.root}" + (f" (attempt {run.attempt_no})" if run.attempt_no > 1 else ""),
          flush=True)
    return run


def start_run(cfg: JobConfig, kind: str) -> RunContext:
    """`open_run` for callers that only need the folder (data preparation, synthetic data)."""
    return open_run(cfg, kind)


def connect_ray(cfg: JobConfig):
    """The one Ray connector (`longctx.raycluster.connect`): RAY_ADDRESS / ray.address, else a local cluster."""
    return raycluster.connect(cfg)


# ---------------------------------------------------------------------------------------------------- steps
def data_location(run: RunContext, cfg: JobConfig) -> str:
    """Where this run's packed data is: data.prepared, else data.output, else `<run>/data`."""
    return cfg.data.prepared or (resolve_output(cfg.data.output) if cfg.data.output else run.path("data"))


def prepare_step(run: RunContext, cfg: JobConfig, kind: str = "pt") -> tuple[str, dict]:
    """Packed data for the run: `data.prepared` (checked against the job), committed data of the same settings
    (reused: the corpus is not read), else prepared now. Returns (uri, manifest)."""
    from longctx.handoff import require_packed_data

    uri = data_location(run, cfg)
    if storage.is_committed(uri):
        from longctx.data.pipeline import load_manifest

        manifest = load_manifest(uri)
        require_packed_data(cfg, {**manifest, "uri": uri}, kind, same_config=not cfg.data.prepared)
        action = "given" if cfg.data.prepared else "reused"
        print(f"[longctx] data: {'using' if cfg.data.prepared else 'reusing committed'} {uri} "
              f"({manifest.get('totals', {}).get('rows')} rows; the corpus is not read)", flush=True)
        run.attempt("data", action=action, uri=uri, rows=manifest.get("totals", {}).get("rows"))
        return uri, manifest
    if cfg.data.prepared:
        raise storage.StorageError(f"data.prepared={uri}: not a committed packed dataset (no {storage.COMMIT_MARKER})")
    with run.phase("data" if kind == "pt" else "sft data"):
        if kind == "pt":
            from longctx.data.pipeline import prepare_data

            manifest = prepare_data(cfg, uri)
        else:
            from longctx.train.sft_data import prepare_sft_data

            manifest = prepare_sft_data(cfg, uri)
    run.attempt("data", action="prepared", uri=uri, rows=manifest.get("totals", {}).get("rows"))
    return uri, manifest


def train_step(run: RunContext, cfg: JobConfig, data_uri, *, callbacks: list | None = None, fail_at: dict | None = None):
    """Training for the run: skipped when its final model is committed, else continued from the last committed
    checkpoint (Ray Train finds it under the run's train folder) at the exact data position."""
    from longctx.train.trainer import latest_checkpoint_step, read_outcome, run_training, train_root_for

    storage_path, name = train_root_for(cfg, run.root)
    train_root = storage.join(storage_path, name)
    if storage.is_committed(storage.join(train_root, "final_model")) and storage.exists(
            storage.join(train_root, "metrics.jsonl")):
        outcome = read_outcome(cfg, train_root)
        print(f"[longctx] train: already done ({outcome.steps} steps), {outcome.final_model_uri}", flush=True)
        run.attempt("train", action="reused", steps=outcome.steps)
        return outcome
    resume_step = latest_checkpoint_step(train_root)
    run.attempt("train", action="resumed" if resume_step else "started", from_step=resume_step or 0)
    with run.phase("train"):
        outcome = run_training(cfg, data_uri, run.root, callbacks=callbacks, fail_at=fail_at)
    run.attempt("trained", steps=outcome.steps, final_loss=outcome.final_loss, final_model=outcome.final_model_uri)
    return outcome


def evaluate_step(run: RunContext, cfg: JobConfig, specs: dict, out: str | None = None) -> dict:
    """Evaluation of `specs` into `<run>/eval` (or `out`); reused when its metrics.json is already there."""
    from longctx.eval.runner import evaluate_models

    out = out or run.path("eval")
    done = storage.join(out, "metrics.json")
    if storage.exists(done):
        print(f"[longctx] eval: already done, {done}", flush=True)
        run.attempt("eval", action="reused")
        return json.loads(storage.read_text(done))
    with run.phase("eval"):
        metrics = evaluate_models(cfg, specs, out)
    run.attempt("eval", action="ran", models=sorted(specs))
    return metrics


def finish(run: RunContext, metrics: dict, sections: list | None = None, *, title: str,
           final_model: str | None = None) -> dict:
    """Write metrics.json, report.md and final_model.txt, record `finished`, end a local Ray cluster this process
    started, and print the final model's URI as the very last line (after Ray's log streaming has stopped)."""
    from longctx.report import write_report

    metrics["timings_s"] = dict(run.timings, total=round(time.time() - run.started, 2))
    storage.write_json(run.path("metrics.json"), metrics)
    report = write_report(run.root, metrics, sections or [], title=title)
    if final_model:
        storage.write_text(run.path(FINAL_MODEL_FILE), final_model + "\n")
    run.attempt("finished", report=report, final_model=final_model)
    print(f"[longctx] report: {report}", flush=True)
    print(f"[longctx] total {metrics['timings_s']['total']:.1f}s", flush=True)
    raycluster.shutdown()
    if final_model:
        print(final_model, flush=True)  # last line: the final model (scripts parse it)
    return metrics


def already_finished(run: RunContext) -> dict:
    """A finished run asked to run again: say so, print its final model last, return its metrics."""
    rec = run.finished or {}
    print(f"[longctx] run {run.run_id} already finished (attempt {rec.get('attempt', '?')}); report: "
          f"{rec.get('report') or run.path('report.md')}. Nothing to do: choose another run_name or change a "
          f"setting to start a new run.", flush=True)
    metrics_uri = run.path("metrics.json")
    metrics = json.loads(storage.read_text(metrics_uri)) if storage.exists(metrics_uri) else {}
    if rec.get("final_model"):
        print(rec["final_model"], flush=True)
    return metrics


# ------------------------------------------------------------------------------------------------------ jobs
def run_long_pt(cfg: JobConfig) -> dict:
    """Prepare data, run Long-PT, evaluate base vs baselines vs trained, write the report. Returns metrics."""
    from longctx import tracking
    from longctx.eval.runner import default_model_specs
    from longctx.report.sections import data_section, train_section

    setup_logging()
    run = open_run(cfg, "long-pt")
    if run.finished:
        return already_finished(run)
    cfg = run.cfg
    tracking.check_available(cfg)  # a missing wandb / mlflow package fails here, before Ray is started
    connect_ray(cfg)
    data_uri, manifest = prepare_step(run, cfg, "pt")
    outcome = train_step(run, cfg, data_uri)
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
        specs = default_model_specs(cfg, cfg.model.path, outcome.final_model_uri)
        metrics["eval"] = evaluate_step(run, cfg, specs)
    # (checkpoint evaluations reached the trackers live, as each was recorded: eval.during_training)
    tracking.log_evaluation(cfg, run.root, run.run_id, metrics.get("eval"), step=outcome.steps)
    sections = [("Data", data_section(manifest, run.root, data_uri)),
                ("Training", train_section(cfg, outcome, run.timings, run.root))]
    if outcome.checkpoint_evals:  # eval.during_training: every checkpoint, evaluated while training ran
        from longctx.eval.during_training import PLOT, checkpoint_eval_section

        sections.append(("Checkpoints evaluated during training",
                         checkpoint_eval_section(outcome.checkpoint_evals, f"train/{PLOT}")))
    return finish(run, metrics, sections, title=f"Long-PT run {run.run_id}", final_model=outcome.final_model_uri)


def run_long_sft(cfg: JobConfig) -> dict:
    """Long-SFT: chat data (packed, loss on answers) -> training from a Long-PT model. Returns metrics."""
    from longctx.report.sections import train_section

    setup_logging()
    run = open_run(cfg, "long-sft")
    if run.finished:
        return already_finished(run)
    cfg = run.cfg
    connect_ray(cfg)
    data_uri, manifest = prepare_step(run, cfg, "sft")
    outcome = train_step(run, cfg, data_uri)
    totals = manifest.get("totals", {})
    metrics = {
        "run_id": run.run_id,
        "data": {"uri": data_uri, **totals, "conversations": manifest.get("conversations"),
                 "quarantined": manifest.get("quarantine", {}).get("records", 0)},
        "train": {"steps": outcome.steps, "tokens": outcome.tokens, "final_loss": outcome.final_loss,
                  "final_model": outcome.final_model_uri, "metrics_log": outcome.metrics_log_uri,
                  "tokens_per_s": outcome.tokens_per_s, "layout": outcome.layout},
    }
    print(f"[longctx] SFT: {totals.get('rows')} rows, {totals.get('loss_tokens')} loss tokens, "
          f"{outcome.steps} steps, final loss " + (f"{outcome.final_loss:.4f}" if outcome.final_loss is not None else "-"),
          flush=True)
    return finish(run, metrics, [("Training", train_section(cfg, outcome, run.timings, run.root))],
                  title=f"Long-SFT run {run.run_id}", final_model=outcome.final_model_uri)


def run_eval(cfg: JobConfig) -> dict:
    """`longctx eval run` / jobs/eval_long.py: evaluate `eval.model` beside baselines of `model.path`.

    Without `eval.model` only the base model and its training-free baselines are evaluated. Writes
    `<output_dir>/<run>/eval/metrics.json`, `metrics.json`, `report.md` and PNGs; returns the metrics.
    """
    from longctx.eval.runner import default_model_specs

    setup_logging()
    run = open_run(cfg, "eval")
    if run.finished:
        return already_finished(run)
    cfg = run.cfg
    connect_ray(cfg)
    trained = cfg.eval.model
    name = f"evaluated ({os.path.basename(str(trained).rstrip('/'))})" if trained else "evaluated"
    specs = default_model_specs(cfg, cfg.model.path, trained, trained_name=name)
    metrics = evaluate_step(run, cfg, specs)
    out = {"run_id": run.run_id, "eval": metrics}
    return finish(run, out, title=f"Long-context evaluation {run.run_id}")
