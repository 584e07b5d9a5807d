"""Data engine: sources -> validated records -> tokens -> length mixture -> packed rows -> Parquet shards.

See README.md in this folder for the numbered walk-through. Public functions:
`prepare_data(cfg, output=None)`, `read_packed(uri)`, `packed_dataset(cfg)`, `length_stats(cfg)`.
"""

from longctx.data.pipeline import length_stats, load_manifest, packed_dataset, prepare_data, read_packed

__all__ = ["prepare_data", "read_packed", "packed_dataset", "length_stats", "load_manifest"]
