"""Build and run the Ray Train job: `run_training(cfg, train_data, train_root, run_id=...) -> TrainOutcome`.

    from longctx.train.trainer import run_training
    outcome = run_training(cfg, "runs/r1/data", "runs/r1/train", run_id="r1")    # committed packed-Parquet shards
    outcome = run_training(cfg, ray_dataset, "s3://bucket/runs/r1/train", run_id="r1")  # or a ray.data.Dataset
    print(outcome.final_model_uri)

The train root (local or s3://; the run folder decides where: `longctx.runs.folder.train_root_for`) receives Ray
Train's checkpoints (`checkpoint_<step>/`), `metrics.jsonl` and `metrics.csv` (one line per optimizer step,
written by rank 0), and `final_model/` (an HF directory with a `_COMMITTED` marker). Training again into the same
train root resumes from the newest intact checkpoint: the workers list the train folder and verify each
checkpoint's manifests (`longctx.train.integrity`), so Ray Train's own snapshot is not the only record; a damaged
checkpoint is skipped with one line. `longctx.runs.steps.train_step` is how jobs get there, and starts the
evaluator of `eval.during_training` it passes in as `watcher`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from longctx import quiet, storage
from longctx.train import integrity, stops
from longctx.train.batches import REQUIRED_COLUMNS, ShardRows
from longctx.train.deepspeed import load_user_deepspeed_json
from longctx.train.memory_savers import worker_env
from longctx.train.preemption import PreemptionGuard
from longctx.train.schedule import BatchLayout, derive_layout, plan_steps
from longctx.train.snapshots import ledger_uri, read_ledger
from longctx.train.spec import FINAL_MODEL, METRICS_LOG, LoopSpec

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    final_model_uri: str
    """HF directory of the trained model (`from_pretrained` loads it)."""
    metrics_log_uri: str
    """JSONL with one record per optimizer step (a CSV beside it)."""
    steps: int
    tokens: int
    """Tokens trained on (rows x seq_len, padding included)."""
    final_loss: float | None
    history: list[dict] = field(default_factory=list)
    checkpoint_uri: str | None = None
    """Latest Ray Train checkpoint."""
    layout: dict[str, Any] = field(default_factory=dict)
    tokens_per_s: float | None = None
    """Mean training throughput over the steps after the first (which includes warm-up)."""
    checkpoint_evals: list[dict] = field(default_factory=list)
    """eval.during_training: one record per evaluated checkpoint (`<train root>/checkpoint_eval.jsonl`)."""


def latest_checkpoint_step(train_root: str) -> int | None:
    """Step of the checkpoint a rerun most likely resumes from (None when there is none): the newest checkpoint
    folder that looks complete (`longctx.train.integrity.latest_intact_step`; the workers verify its files and
    fall back to an older one when they do not match)."""
    return integrity.latest_intact_step(train_root)


def packed_parquet_files(uri: str) -> tuple[list[str], int]:
    """(shard URIs, total rows) of a committed packed-Parquet prefix (`packed_shard_rows`)."""
    shards = packed_shard_rows(uri)
    return [s.uri for s in shards], sum(s.rows for s in shards)


def packed_shard_rows(uri: str) -> list[ShardRows]:
    """Every shard of a committed packed-Parquet prefix with the rows of each of its row groups, in row order.
    File names come from the committed manifest (under the committed generation after an S3 overwrite, never a
    listing); a plain folder of shards without a marker or manifest is listed. Row-group sizes come from the
    manifest's `row_groups` (no shard opened); a manifest written before it had them, or a plain folder, gives
    them from the Parquet footers."""
    uri = storage.normalize(str(uri))
    storage.recover_overwrite(uri)
    marker = storage.read_marker(uri)
    if marker is not None:
        return storage.read_committed(uri, lambda root: _shard_rows(uri, root), marker=marker)
    if storage.exists(storage.join(uri, "manifest.json")):
        raise storage.StorageError(f"{uri}: packed data has a manifest but no {storage.COMMIT_MARKER} marker (incomplete)")
    return _shard_rows(uri, uri)


def _shard_rows(uri: str, root: str) -> list[ShardRows]:
    try:
        shards = json.loads(storage.read_text(storage.join(root, "manifest.json"))).get("shards")
    except storage.StorageNotFound:
        shards = None
    if shards:  # the manifest's order is the data engine's row_id order
        files = [storage.join(root, sh["path"]) for sh in shards]
    else:
        files = storage.expand(uri, (".parquet",))
    if not files:
        raise storage.StorageError(f"{uri}: no .parquet shards found")
    known = [sh.get("row_groups") for sh in shards] if shards else [None] * len(files)
    out = []
    for i, (f, groups) in enumerate(zip(files, known)):
        if groups is not None and i > 0:  # the first shard is opened below to check the columns
            out.append(ShardRows(f, tuple(int(n) for n in groups)))
            continue
        fs, path = storage.pyarrow_fs(f)
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            names = set(pf.schema_arrow.names)
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise ValueError(f"{f}: not a packed-rows shard, missing column(s) {missing}")
            out.append(ShardRows(f, tuple(pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups))))
    return out


def _layout(cfg) -> BatchLayout:
    return derive_layout(
        global_batch_tokens=cfg.train.global_batch_tokens,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        num_workers=cfg.train.num_workers,
        sequence_parallel=cfg.train.sequence_parallel,
    )


def max_failures(cfg) -> int:
    """train.max_failures, else 3 with GPUs (spot nodes come and go) and 0 on CPU."""
    if cfg.train.max_failures is not None:
        return cfg.train.max_failures
    return 3 if cfg.train.use_gpu else 0


def build_trainer(cfg, train_data, train_root: str, *, run_id: str, fail_at: dict | None = None,
                  nan_at: dict | None = None, callbacks: list | None = None):
    """(TorchTrainer, plan): everything `run_training` runs. `callbacks`: Ray Train user callbacks (a sweep passes
    `TuneReportCallback` so the workers' reports reach Ray Tune). A checkpoint snapshot Ray Train could not load
    is moved aside first (`integrity.repair_ray_snapshot`): the workers find the checkpoints by listing the train
    folder."""
    import ray.data  # deferred: heavy import, used only here
    import ray.train  # deferred: heavy import, used only here
    from ray.train.torch import TorchTrainer  # deferred: heavy import, used only here

    from longctx.train.loop import train_loop_per_worker  # deferred: pulls in ray, used only here

    layout = _layout(cfg)
    datasets, files, rows, shards = None, None, None, []
    if isinstance(train_data, ray.data.Dataset):
        if layout.sequence_parallel > 1:
            raise ValueError("train.sequence_parallel > 1 needs packed Parquet shards (a URI), not a streamed Dataset: "
                             "the ranks of a sequence-parallel group must read the same rows")
        datasets = {"train": train_data}
        if cfg.train.token_budget is None and cfg.train.max_steps is None:
            rows = train_data.count()
    else:
        shards = packed_shard_rows(train_data)
        files, rows = [s.uri for s in shards], sum(s.rows for s in shards)
    plan = plan_steps(layout, token_budget=cfg.train.token_budget, max_steps=cfg.train.max_steps,
                      rows_available=rows, epochs=cfg.train.epochs)
    train_root = storage.normalize(train_root)
    storage_path, name = train_root.rstrip("/").rsplit("/", 1)  # Ray Train restores `storage_path/name`
    note = integrity.repair_ray_snapshot(train_root)
    if note:
        print(note, flush=True)
    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.resources_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    spec = LoopSpec(
        job=cfg,
        layout=layout,
        total_steps=plan.total,
        train_root=train_root,
        run_id=run_id,
        ds_override=load_user_deepspeed_json(cfg.train.deepspeed_config) if cfg.train.deepspeed_config else None,
        fail_at=fail_at,
        nan_at=nan_at,
        parquet_files=files,
        parquet_row_groups=[list(s.row_groups) for s in shards] if files else None,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.to_loop_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures(cfg)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": worker_env(cfg.train)},  # expandable segments on GPU workers
            logging_config=quiet.train_logging_config(),  # Ray Train's bookkeeping lines only with --verbose
        ),
        datasets=datasets,
    )
    return trainer, plan


def run_training(cfg, train_data, train_root: str, *, run_id: str, fail_at: dict | None = None,
                 nan_at: dict | None = None, callbacks: list | None = None, watcher=None) -> TrainOutcome:
    """Run Long-PT/Long-SFT training under Ray Train into `train_root`; returns where the model and metrics are.

    `train_data`: a committed packed-Parquet prefix (local or s3://; workers read the shards directly, in a fixed
    order: exact resume) or a `ray.data.Dataset` with the packed-row columns (Ray Train's streaming split).
    `run_id`: the run's id (the trackers' run name). `watcher`: a started
    `longctx.eval.during_training.CheckpointWatcher` (the train step starts it): drained when training succeeds,
    stopped with its pending snapshots kept when it fails or stops.
    Raises `longctx.train.stops.TrainingStopped` when the workers stopped on purpose: `TrainingPreempted`
    (SIGTERM/SIGINT to this process while training: checkpointed at a step boundary), `NonFiniteTraining`,
    `NoIntactCheckpoint`. Fault injection for tests: `fail_at` ({"step", "rank", "trigger_file"}) one hard worker
    exit, `nan_at` ({"step", "rank"}) one NaN loss.
    """
    trainer, plan = build_trainer(cfg, train_data, train_root, run_id=run_id, fail_at=fail_at, nan_at=nan_at,
                                  callbacks=callbacks)
    log.info("training %d steps (limited by %s) into %s", plan.total, plan.limited_by, train_root)
    guard = PreemptionGuard(train_root, cfg.train.preemption_grace_s)
    try:
        with guard:
            result = trainer.fit()
    except BaseException as e:
        if watcher is not None:  # a failed run keeps its pending snapshots for the resumed run
            watcher.finish(drain=False)
        if guard.requested and isinstance(e, KeyboardInterrupt):
            raise stops.TrainingPreempted(f"preempted ({guard.signal}) before a checkpoint was saved: rerun the same "
                                          "command to resume from the last checkpoint") from None
        raise
    stop = getattr(result, "return_value", None)  # rank 0's stop reason (longctx.train.stops), None: finished
    checkpoint_evals = watcher.finish(drain=result.error is None and not stop) if watcher is not None else None
    if result.error is not None:
        raise result.error
    stops.raise_for_stop(stop)
    if guard.requested:  # the signal came after the last step boundary: training is complete
        raise stops.TrainingPreempted(f"preempted ({guard.signal}) after training finished: rerun the same command "
                                      "to continue with what follows it", step=plan.total)
    return read_outcome(cfg, storage.normalize(train_root),
                        result.checkpoint.path if result.checkpoint is not None else None, checkpoint_evals)


def read_outcome(cfg, train_root: str, checkpoint_uri: str | None = None,
                 checkpoint_evals: list[dict] | None = None) -> TrainOutcome:
    """The outcome of a finished training under `train_root` from what it left there (metrics log, final model;
    without `checkpoint_evals`, eval.during_training's records are read from its ledger when there is one)."""
    if checkpoint_evals is None:
        checkpoint_evals = read_ledger(ledger_uri(train_root))
    metrics_uri = storage.join(train_root, METRICS_LOG)
    history = [json.loads(line) for line in storage.read_text(metrics_uri).splitlines() if line.strip()]
    final_uri = storage.join(train_root, FINAL_MODEL)
    storage.require_committed(final_uri)
    timed = [h for h in history[1:] if h.get("tokens_per_s")]
    tps = sum(h["step_tokens"] for h in timed) / sum(h["step_time_s"] for h in timed) if timed else None
    return TrainOutcome(
        final_model_uri=final_uri,
        metrics_log_uri=metrics_uri,
        steps=history[-1]["step"] if history else 0,
        tokens=history[-1]["tokens"] if history else 0,
        final_loss=history[-1]["loss"] if history else None,
        history=history,
        checkpoint_uri=checkpoint_uri,
        layout=_layout(cfg).as_dict(),
        tokens_per_s=tps,
        checkpoint_evals=checkpoint_evals,
    )
