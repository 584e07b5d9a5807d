"""The steps every run is composed of (Long-PT, Long-SFT, evaluation, each sweep trial and study trial, data
preparation): each first looks at what the run folder already holds, so running again is resuming.

    run = open_run(cfg, "long-pt")                          # longctx.runs.folder
    data_uri, manifest = prepare_step(run, cfg)             # committed data of the same settings is reused
    outcome = train_step(run, cfg, data_uri)                # continues from the last committed checkpoint
    ev = evaluate_step(run, cfg, specs)                     # skipped when its metrics are already there
    finish(run, metrics, sections, title="...", final_model=outcome.final_model_uri)

Order of a run: prepare -> train -> gate -> evaluate -> finish. The gate (`gate_step`: the trained model against
the stage's input model at short context, `longctx.eval.gate`) records its measurement in `<run>/gate.json` and
its verdict in attempts.jsonl; under `eval.gate.action: fail` a failed gate stops the run before its model is
evaluated or published (`stop_at_gate`: metrics.json and report.md say why, exit code 5). See
docs/architecture.md ("Runs").
"""

from __future__ import annotations

import json
import logging
import time

from longctx import quiet, raycluster, storage
from longctx.config import JobConfig, load_config
from longctx.eval.during_training import start_watcher
from longctx.eval.gate import GateFailed, gate_line, gate_metrics, judge, raise_if_failed
from longctx.runs.handoff import require_packed_data
from longctx.runs import identity
from longctx.runs.folder import (CONFIG, DATA_DIR, EVAL_DIR, FINAL_MODEL_FILE, METRICS, REPORT, RunContext,
                                 claim_train_root, resolve_output)
from longctx.train.spec import FINAL_MODEL, METRICS_LOG
from longctx.train.trainer import TrainOutcome, latest_checkpoint_step, read_outcome, run_training


def setup_logging() -> None:
    logging.basicConfig(level=quiet.log_level(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def connect_ray(cfg: JobConfig):
    """The one Ray connector (`longctx.raycluster.connect`): RAY_ADDRESS / ray.address, else a local cluster."""
    return raycluster.connect(cfg)


# -------------------------------------------------------------------------------------------------- prepare
def data_location(run: RunContext, cfg: JobConfig) -> str:
    """Where this run's packed data is: data.prepared, else data.output, else `<run>/data`."""
    return cfg.data.prepared or (resolve_output(cfg.data.output) if cfg.data.output else run.path(DATA_DIR))


def prepare_step(run: RunContext, cfg: JobConfig, kind: str = "pt", *, uri: str | None = None,
                 replace: bool = False) -> tuple[str, dict]:
    """Packed data for the run at `uri` (default `data_location`): `data.prepared` (checked against the job),
    committed data of the same settings (reused: the corpus is not read), else prepared now (`replace`: prepared
    again over a committed output). Returns (uri, manifest)."""
    from longctx.data.pipeline import prepare_data  # deferred: Ray Data (seconds); a reused dataset needs none
    from longctx.train.sft_data import prepare_sft_data  # deferred: likewise

    uri = uri or data_location(run, cfg)
    if storage.is_committed(uri) and not replace:
        return _reuse_data(run, cfg, kind, uri)
    if cfg.data.prepared:
        raise storage.StorageError(f"data.prepared={uri}: not a committed packed dataset (no {storage.COMMIT_MARKER})")
    try:
        with run.phase("data" if kind == "pt" else "sft data"):
            manifest = (prepare_data if kind == "pt" else prepare_sft_data)(cfg, uri, overwrite=replace)
    except storage.StorageError:
        if replace or not storage.is_committed(uri):
            raise
        # another writer (a sweep trial with the same data settings) published it meanwhile: that data is ours
        return _reuse_data(run, cfg, kind, uri)
    run.attempt("data", action="prepared", uri=uri, rows=manifest.get("totals", {}).get("rows"))
    return uri, manifest


def _reuse_data(run: RunContext, cfg: JobConfig, kind: str, uri: str) -> tuple[str, dict]:
    from longctx.data.pipeline import load_manifest  # deferred: see prepare_step

    manifest = load_manifest(uri)
    require_packed_data(cfg, {**manifest, "uri": uri}, kind, same_config=not cfg.data.prepared)
    action = "given" if cfg.data.prepared else "reused"
    print(f"[longctx] data: {'using' if cfg.data.prepared else 'reusing committed'} {uri} "
          f"({manifest.get('totals', {}).get('rows')} rows; the corpus is not read)", flush=True)
    run.attempt("data", action=action, uri=uri, rows=manifest.get("totals", {}).get("rows"))
    return uri, manifest


# ---------------------------------------------------------------------------------------------------- train
def train_step(run: RunContext, cfg: JobConfig, data_uri, *, callbacks: list | None = None,
               fail_at: dict | None = None, eval_hold_s: float | None = None) -> TrainOutcome:
    """Training for the run: skipped when its final model is committed, else continued from the last committed
    checkpoint (Ray Train finds it in the run's train root) at the exact data position. First the run is bound
    to the data's content (data replaced at the same URI since an earlier attempt is refused by name, before Ray
    Train starts) and its config and identity are recorded beside the checkpoints; then the evaluator of every
    checkpoint (`eval.during_training`) starts beside the workers. `eval_hold_s`: fault tests
    (`CheckpointWatcher`)."""
    root = run.train_root
    if storage.is_committed(storage.join(root, FINAL_MODEL)) and storage.exists(storage.join(root, METRICS_LOG)):
        outcome = read_outcome(cfg, root)
        print(f"[longctx] train: already done ({outcome.steps} steps), {outcome.final_model_uri}", flush=True)
        run.attempt("train", action="reused", steps=outcome.steps)
        return outcome
    if isinstance(data_uri, str):
        run.bind("data", identity.committed_content(data_uri), f"the data at {data_uri}")
    resume_step = latest_checkpoint_step(root)
    if resume_step and storage.exists(storage.join(root, CONFIG)):
        identity.check_pinned(load_config(storage.join(root, CONFIG)), cfg, root, resume_step)
    claim_train_root(run)
    run.attempt("train", action="resumed" if resume_step else "started", from_step=resume_step or 0)
    with run.phase("train"):
        watcher = start_watcher(cfg, root, run_id=run.run_id, hold_s=eval_hold_s)
        outcome = run_training(cfg, data_uri, root, run_id=run.run_id, callbacks=callbacks, fail_at=fail_at,
                               watcher=watcher)
    run.attempt("trained", steps=outcome.steps, final_loss=outcome.final_loss, final_model=outcome.final_model_uri)
    return outcome


# ----------------------------------------------------------------------------------------------------- gate
GATE = "gate.json"
"""The gate's measurement and verdict in the (stage's) run folder."""


def gate_step(run: RunContext, cfg: JobConfig, before: str, after: str, *, first_model: str | None = None,
              stage: str | None = None) -> dict | None:
    """The regression gate of a trained model (`after`) against the stage's input (`before`), at the gate length of
    the run's first model (`first_model`, default `before`): None when eval.gate is off. A measurement recorded in
    `<run>/gate.json` is judged again by the current limits instead of measured again. On a GPU cluster
    (train.use_gpu) it runs as one Ray task on a GPU; on CPU in this process (seconds on a small model)."""
    if not cfg.eval.gate.enabled:
        return None
    uri = run.path(GATE)
    if storage.exists(uri):
        verdict, action = judge(json.loads(storage.read_text(uri)), cfg.eval.gate), "rejudged"
    else:
        from longctx.eval.gate_checks import gate_length, run_gate  # deferred: torch + transformers (seconds)

        length = gate_length(cfg, first_model or before)
        with run.phase("gate"):
            if cfg.train.use_gpu:
                import ray  # deferred: only a GPU job sends the gate to a GPU worker

                gpus = cfg.eval.gpus_per_actor or 1
                task = ray.remote(num_cpus=1, num_gpus=gpus)(run_gate)
                verdict = ray.get(task.remote(cfg, before, after, length=length, stage=stage))
            else:
                verdict = run_gate(cfg, before, after, length=length, stage=stage)
        storage.write_json(uri, verdict)
        action = "ran"
    run.attempt("gate", action=action, passed=verdict["passed"], failed=verdict["failed"], stage=stage)
    if verdict["passed"] or verdict["action"] == "fail":  # (a failure under `fail` is reported by stop_at_gate)
        print(f"[longctx] {gate_line(verdict)}", flush=True)
    else:
        raise_if_failed(verdict)  # action warn: one WARNING line, the run goes on
    return verdict


def stop_at_gate(run: RunContext, metrics: dict, verdicts: list[dict], sections: list | None, title: str) -> None:
    """A gate failed under action `fail`: write metrics.json (with `gate`) and report.md (the gate's line first),
    publish no final model, record `gate failed`, release the run and raise GateFailed (exit code 5). Rerunning
    with the limits loosened or `eval.gate.action=warn` judges the recorded measurement again and goes on."""
    from longctx.report import write_report  # deferred: imports matplotlib (seconds)

    failed = next(v for v in verdicts if not v["passed"])
    metrics["gate"] = gate_metrics(verdicts)
    storage.write_json(run.path(METRICS), metrics)
    report = write_report(run.root, metrics, sections or [], title=title)
    run.attempt("gate failed", report=report, stage=failed.get("stage"))
    run.close()
    print(f"[longctx] report: {report}", flush=True)
    raise GateFailed(failed)


# ------------------------------------------------------------------------------------------------- evaluate
def evaluate_step(run: RunContext, cfg: JobConfig, specs: dict, out: str | None = None) -> dict:
    """Evaluation of `specs` into `<run>/eval` (or `out`); reused when its metrics.json is already there."""
    from longctx.eval.runner import evaluate_models  # deferred: imports torch and transformers (seconds)

    out = out or run.path(EVAL_DIR)
    done = storage.join(out, METRICS)
    if storage.exists(done):
        print(f"[longctx] eval: already done, {done}", flush=True)
        run.attempt("eval", action="reused")
        return json.loads(storage.read_text(done))
    with run.phase("eval"):
        metrics = evaluate_models(cfg, specs, out)
    run.attempt("eval", action="ran", models=sorted(specs))
    return metrics


# --------------------------------------------------------------------------------------------------- finish
def finish(run: RunContext, metrics: dict, sections: list | None = None, *, title: str | None = None,
           final_model: str | None = None, metrics_name: str = METRICS, **record) -> dict:
    """Write the run's metrics (`metrics_name`), with `title` report.md, and final_model.txt; record `finished`
    (with `record`) and release the run's lease. A top-level run then ends a local Ray cluster this process
    started and prints the final model's URI as the very last line (after Ray's log streaming has stopped); a
    sub-run (study or sweep trial) leaves both to its parent."""
    from longctx.report import write_report  # deferred: imports matplotlib (seconds)

    if not run.is_sub_run:
        metrics["timings_s"] = dict(run.timings, total=round(time.time() - run.started, 2))
    storage.write_json(run.path(metrics_name), metrics)
    report = write_report(run.root, metrics, sections or [], title=title) if title else None
    if final_model:
        storage.write_text(run.path(FINAL_MODEL_FILE), final_model + "\n")
    run.attempt("finished", report=report, final_model=final_model, **record)
    run.close()
    if run.is_sub_run:
        return metrics
    if report:
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
          f"{rec.get('report') or run.path(REPORT)}. Nothing to do: choose another run_name or change a "
          f"setting to start a new run.", flush=True)
    metrics_uri = run.path(METRICS)
    metrics = json.loads(storage.read_text(metrics_uri)) if storage.exists(metrics_uri) else {}
    if rec.get("final_model"):
        print(rec["final_model"], flush=True)
    return metrics
