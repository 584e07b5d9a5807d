"""What the driver hands every training worker: one typed `LoopSpec`, and the names of the train root's files.

Ray Train passes `train_loop_config` to every worker (pickled), so the spec travels as `{"spec": spec}` and the
loop takes it back with `LoopSpec.from_loop_config`: the job config and the batch layout arrive as the objects
the driver validated (a `JobConfig`, a `BatchLayout`), not as dicts each worker validates again.

    spec = LoopSpec(job=cfg, layout=layout, total_steps=100, train_root="s3://b/runs/r/train", run_id="r")
    TorchTrainer(train_loop_per_worker, train_loop_config=spec.to_loop_config(), ...)

One row length: `spec.seq_len` (the layout's, which must equal `job.data.seq_len`); the workers compare every
micro-batch they read with it (`longctx.train.batches.collate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.config import JobConfig
from longctx.train.schedule import BatchLayout

# the train root (`<run>/train` or `<train.storage_path>/<run id>/train`): what training writes there
FINAL_MODEL = "final_model"
"""The trained Hugging Face model folder (committed with a `_COMMITTED` marker)."""
METRICS_LOG = "metrics.jsonl"
"""One JSON line per optimizer step, written by rank 0 (`metrics.csv` beside it)."""
ENGINE_INFO = "engine_info.json"
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class LoopSpec:
    job: JobConfig
    """The job's config, validated by the driver."""
    layout: BatchLayout
    """World size, data/sequence parallel, micro-batch, gradient accumulation and the row length."""
    total_steps: int
    """Optimizer steps of the whole run (a resumed run continues towards the same number)."""
    train_root: str
    """Where checkpoints, metrics.jsonl, engine_info.json and final_model/ go (local or s3://)."""
    run_id: str
    """The run's id, as the run folder names it (the trackers' run name)."""
    ds_override: dict | None = None
    """Keys of a user DeepSpeed JSON that override the generated config."""
    fail_at: dict | None = None
    """Fault injection for tests: {"step", "rank", "trigger_file"} (one hard worker exit)."""
    nan_at: dict | None = None
    """Fault injection for tests: {"step", "rank"} (that rank's loss is NaN at that step, once)."""
    parquet_files: list[str] | None = None
    """Packed shards read directly in row_id order (exact resume); None: Ray Train's dataset shard."""
    parquet_row_groups: list[list[int]] | None = None
    """Rows of each row group of every shard in `parquet_files` (each rank reads only the groups of its rows)."""

    def __post_init__(self) -> None:
        if not isinstance(self.job, JobConfig) or not isinstance(self.layout, BatchLayout):
            raise TypeError(f"LoopSpec takes a JobConfig and a BatchLayout, got {type(self.job).__name__} and "
                            f"{type(self.layout).__name__}")
        if self.layout.seq_len != self.job.data.seq_len:
            raise ValueError(f"training loop spec: the batch layout's rows are {self.layout.seq_len} tokens, "
                             f"data.seq_len is {self.job.data.seq_len}")

    @property
    def seq_len(self) -> int:
        """Tokens per packed row: the one row length of the run."""
        return self.layout.seq_len

    def to_loop_config(self) -> dict:
        return {"spec": self}

    @classmethod
    def from_loop_config(cls, loop_config: dict) -> "LoopSpec":
        spec = loop_config.get("spec") if isinstance(loop_config, dict) else None
        if not isinstance(spec, cls):
            raise TypeError(f"training loop config: expected {{'spec': LoopSpec}}, got "
                            f"{sorted(loop_config) if isinstance(loop_config, dict) else type(loop_config).__name__}")
        return spec
