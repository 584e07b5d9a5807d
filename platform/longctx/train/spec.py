"""What the driver hands every training worker: one typed `LoopSpec` instead of an untyped dict.

Ray Train passes `train_loop_config` to the workers as a plain dict, so the spec travels as `spec.to_dict()` and
the loop turns it back with `LoopSpec.from_dict` (unknown or missing keys fail there, naming them).

    spec = LoopSpec(job=cfg_json, layout=layout_dict, total_steps=100, train_root="s3://b/runs/r/train")
    TorchTrainer(train_loop_per_worker, train_loop_config=spec.to_dict(), ...)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class LoopSpec:
    job: dict
    """The job's config (JobConfig as JSON)."""
    layout: dict
    """BatchLayout fields (world size, data/sequence parallel, micro-batch, gradient accumulation, seq_len)."""
    total_steps: int
    """Optimizer steps of the whole run (a resumed run continues towards the same number)."""
    train_root: str
    """`<storage path>/<name>`: checkpoints, metrics.jsonl, engine_info.json, final_model/ (local or s3://)."""
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopSpec":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"training loop spec: unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def config(self):
        """The job config as a JobConfig."""
        from longctx.config import JobConfig

        return JobConfig.model_validate(self.job)

    def batch_layout(self):
        from longctx.train.schedule import BatchLayout

        return BatchLayout(**self.layout)
