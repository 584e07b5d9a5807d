"""Pass 1's engine on plain Ray tasks: read + validate every file, transform its record blocks, in input order.

    for table in record_stream(cfg, tasks, TokenizeBatches, kwargs, read_opts):
        ...   # tables in file order, then record order; each the output of one record block

One read task per file (`read_blocks`, a streaming generator: our own parser, quarantine rows instead of errors)
yields the file's record blocks (`sources.read_file`'s tables, at most 1M characters of text each); every block
goes to one transform task (`transform_block`: an instance of the worker class, e.g. `TokenizeBatches`, built
once per worker process and kept there). The driver only schedules: at most `data.num_tokenize_actors`
transforms and a quarter as many reads (at least 1, at most the files) at a time, the blocks of the earliest
unfinished file first, and it hands the results on in input order.

Why not Ray Data (which ran pass 1 before): on this machine Ray Data's actor pool, its helper actors and its
scheduling loop cost 0.1-0.2 of a bare tokenizer's CPU for the same tokens (bench/data_pipeline.py); plain tasks
run in Ray's pooled worker processes, which pass 2's tasks then reuse. What stays the same: the blocks (our
reader's, so the cache's row groups and the packed bytes depend on the input only, never on the cluster), the
order, bounded memory (reads pause when the driver holds enough blocks: `_generator_backpressure_num_objects`),
retries of a lost worker, and an error of the medium failing the job with the file's name.
"""

from __future__ import annotations

import collections
import json
from typing import Iterator

import pyarrow as pa

from longctx import raycluster
from longctx.data import sources as src

HELD_PER_WORKER = 2  # transforms running + results waiting for their turn, per worker, beyond the head file's
READS_PER_WORKERS = 4  # one file read at a time per this many tokenize workers (at least one)
MAX_WORKER_INSTANCES = 2  # transform instances a worker process keeps (one per kind of work: tokenizer, chat)
_instances: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()


def read_blocks(task: src.FileTask, opts: dict) -> Iterator[pa.Table]:
    """Ray task (streaming generator): the validated record blocks of one file."""
    yield from src.read_file(task, src.ReadOptions.from_dict(opts))


def worker_instance(cls, kwargs: dict):
    """The worker process's instance of `cls(**kwargs)`: built on first use (a tokenizer loads once per process),
    the most recent MAX_WORKER_INSTANCES kept."""
    key = (cls.__module__, cls.__qualname__, json.dumps(kwargs, sort_keys=True, default=str))
    inst = _instances.get(key)
    if inst is None:
        inst = _instances[key] = cls(**kwargs)
        while len(_instances) > MAX_WORKER_INSTANCES:
            _instances.popitem(last=False)
    else:
        _instances.move_to_end(key)
    return inst


def transform_block(block: pa.Table, cls, kwargs: dict, drop: tuple[str, ...] = ()) -> pa.Table:
    """Ray task: one record block through the worker class (`TokenizeBatches`, `ChatTokenizer`), minus `drop`."""
    out = worker_instance(cls, kwargs)(block)
    return out.drop_columns(list(drop)) if drop else out


def record_stream(cfg, tasks: list[src.FileTask], cls, kwargs: dict, read_opts: dict,
                  drop: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """The data engine's read path on Ray, in input order: one read task per file, one transform task per block
    (`cls(**kwargs)` called on it in a worker process); yields the transform's tables without the columns `drop`.
    Closing the iterator early (budget-aware reading stops there) cancels what is still running."""
    import ray  # deferred: heavy import, used only here

    raycluster.connect(cfg)  # RAY_ADDRESS / ray.address, else a local cluster (a no-op when connected)
    opts = {"num_cpus": cfg.ray.data_cpus_per_task, "max_retries": 3}
    if cfg.ray.data_resources:
        opts["resources"] = dict(cfg.ray.data_resources)
    workers = cfg.data.num_tokenize_actors
    # NOTE: reading + validating costs ~1/25 of tokenizing (bench/data_pipeline.py: 1.4 of ~35 CPU s at 10x the
    # sample corpus), so one read per 4 workers keeps them fed, latency of object storage included; every read
    # running at once is a worker process of its own (started, ~150 MB), so no more of them than that.
    readers = max(1, min(-(-workers // READS_PER_WORKERS), len(tasks)))
    # NOTE: a read reserves half the CPU of a transform (parsing is much cheaper than encoding); it pauses once
    # the driver has not taken 4 of its blocks, so a fast reader of a large file never runs ahead of the
    # transforms by more than that (memory stays flat however large the corpus).
    read = ray.remote(read_blocks).options(**dict(opts, num_cpus=opts["num_cpus"] / 2), num_returns="streaming",
                                           _generator_backpressure_num_objects=4)
    transform = ray.remote(transform_block).options(**opts)
    cls_ref = ray.put(cls)

    reading: dict[int, object] = {}  # file position -> its read's generator, in file order
    blocks_of: dict[int, int] = {}  # file position -> blocks taken from its read so far
    finished: set[int] = set()  # file positions whose read is done (blocks_of is their count)
    running: dict = {}  # transform ref -> (file position, block index)
    done: dict[tuple[int, int], object] = {}  # finished transforms not yet handed on
    next_file, head, head_block = 0, 0, 0  # next file to start reading; the (file, block) handed on next
    held = HELD_PER_WORKER * workers  # beyond this many results running or waiting, only the head file's blocks go on

    def can_take(pos: int) -> bool:
        return len(running) < workers and (pos == head or len(running) + len(done) < held)

    try:
        while True:
            while len(reading) < readers and next_file < len(tasks):
                reading[next_file] = read.remote(tasks[next_file], read_opts)
                blocks_of[next_file] = 0
                next_file += 1
            # Hand on, in order, what is done; a file whose read finished and whose blocks are all handed on ends.
            while head < len(tasks):
                if (head, head_block) in done:
                    table = ray.get(done.pop((head, head_block)))
                    head_block += 1
                    yield table
                elif head in finished and head_block == blocks_of[head]:
                    head, head_block = head + 1, 0
                else:
                    break
            if head >= len(tasks):
                return
            if len(reading) < readers and next_file < len(tasks):
                continue  # a read ended: start the next file's before waiting
            # Take the blocks that are ready: the head file's first, the others while few results are pending.
            for pos in sorted(reading):
                while pos in reading and can_take(pos):
                    ready, _ = ray.wait([reading[pos]], timeout=0, fetch_local=False)
                    if not ready:
                        break
                    try:
                        ref = next(reading[pos])
                    except StopIteration:
                        del reading[pos]
                        finished.add(pos)
                        break
                    running[transform.remote(ref, cls_ref, kwargs, drop)] = (pos, blocks_of[pos])
                    blocks_of[pos] += 1
            if (head, head_block) in done or (head in finished and head_block == blocks_of[head]) or (
                    len(reading) < readers and next_file < len(tasks)):
                continue
            waits = list(running) + [reading[p] for p in sorted(reading) if can_take(p)]
            if not waits:
                raise RuntimeError(f"pass 1 stalled at file {head} block {head_block} (a bug: nothing to wait for)")
            ready, _ = ray.wait(waits, num_returns=1, timeout=5.0, fetch_local=False)
            if ready and running:  # collect every transform that has finished, not only the first
                ready += ray.wait(list(running), num_returns=len(running), timeout=0, fetch_local=False)[0]
            for ref in ready:
                if ref in running:
                    done[running.pop(ref)] = ref
            # NOTE: a finished transform's result stays in the object store until its turn (the driver holds
            # only refs); a failed one raises at ray.get with the task's error (naming the file for an I/O one).
    finally:
        for ref in running:
            ray.cancel(ref, force=False)
        for gen in reading.values():
            try:
                ray.cancel(gen, force=False)
            except Exception:  # noqa: BLE001 - a generator that already ended cannot be cancelled
                pass
