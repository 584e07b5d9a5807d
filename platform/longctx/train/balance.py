"""Attention-cost-balanced global batches: which data-parallel rank, and which micro-step, trains each row of a step.

With packed long-tailed data one row may hold a single 32K document (attention ~ 32K^2) and another 64 documents
of 512 tokens (~ 64 x 512^2): a step waits for its slowest rank. Every rank reads its own lane (train/batches.py);
then, per optimizer step:

1. Each rank computes the cost of its rows (`row_cost`: the row's training FLOPs, `train.metrics.step_flops`, with
   padding, which the kernels compute too, as one more span) and the costs are all-gathered (a few numbers).
2. Every rank computes the same assignment (`assign_rows`): the step's rows sorted by cost, heaviest first, are
   cut into grad_accum micro-step groups of data_parallel x micro_batch rows (rows of similar cost run side by
   side, so a micro-step waits for less: the smallest possible sum of micro-step maxima), and each group is dealt
   longest-processing-time first: the next row goes to the rank with room and the least cost in this micro-step,
   then the least over the step so far, then its own rank. Equal costs (full attention) move nothing.
3. Rows change ranks with one `all_to_all_single` (only when some row moves); sequence-parallel rank s of a group
   exchanges with rank s of the others.

The set of rows in a step does not change, only who computes which: the loss (a mean over the global batch) and
the gradient are the same up to summation order, and the assignment is a function of the step's rows alone, so a
resumed run makes the same one (exact resume holds). `imbalance` gives max/mean of the rank costs per step and
per micro-step, before and after (bench/batch_balance.py prints both on real corpora).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from longctx.train.batches import PackedRow
from longctx.train.metrics import attention_width, step_flops


@dataclass(frozen=True)
class CostModel:
    """Per-row training cost in FLOPs (`train.metrics.step_flops`, causal convention): 6 x matmul params per token
    plus 6 x layers x attention width (heads x head_dim) per squared span."""

    matmul_params: int
    num_layers: int
    attention_dim: int

    @classmethod
    def of(cls, hf_config, matmul_params: int) -> "CostModel":
        cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        return cls(int(matmul_params), int(cfg.num_hidden_layers), attention_width(cfg))

    def cost(self, tokens: int, sum_sq_spans: int) -> float:
        return step_flops(matmul_params=self.matmul_params, tokens=tokens, num_layers=self.num_layers,
                          attention_dim=self.attention_dim, sum_sq_doc_lengths=sum_sq_spans)


def span_lengths(position_ids: np.ndarray, attention: str) -> np.ndarray:
    """Attention spans of one row: one span per document (a new one wherever the position does not go up by one,
    as the batches' document ids) under `document` attention, the whole row under `full`."""
    n = len(position_ids)
    if attention != "document" or n == 0:
        return np.array([n], np.int64)
    starts = np.flatnonzero(np.concatenate([[True], np.diff(position_ids) != 1]))
    return np.diff(np.append(starts, n)).astype(np.int64)


def row_cost(row: PackedRow, attention: str, model: CostModel) -> float:
    spans = span_lengths(row.position_ids, attention)
    return model.cost(len(row.input_ids), int((spans * spans).sum()))


@dataclass(frozen=True)
class Assignment:
    """Where each row of a step goes: row i (rows in rank order, each rank's in lane order) is trained by data-
    parallel rank `rank[i]` in micro-step `micro[i]` at position `slot[i]` of that micro-batch."""

    rank: np.ndarray
    micro: np.ndarray
    slot: np.ndarray

    @classmethod
    def natural(cls, data_parallel: int, micro_batch: int, grad_accum: int) -> "Assignment":
        """No balancing: every rank trains its own rows in lane order."""
        k = micro_batch * grad_accum
        i = np.arange(data_parallel * k)
        return cls(rank=i // k, micro=(i % k) // micro_batch, slot=(i % k) % micro_batch)

    def moves(self, micro_batch: int, grad_accum: int) -> int:
        return int((self.rank != np.arange(len(self.rank)) // (micro_batch * grad_accum)).sum())


def assign_rows(costs, data_parallel: int, micro_batch: int, grad_accum: int) -> Assignment:
    """The balanced assignment of one step's rows (module docstring, step 2); deterministic: ties go by lane
    position, then owner, so equal costs leave every row where it is."""
    costs = np.asarray(costs, np.float64)
    k = micro_batch * grad_accum
    if len(costs) != data_parallel * k:
        raise ValueError(f"{len(costs)} row costs for a step of {data_parallel} ranks x {k} rows")
    owner, lane_pos = np.arange(len(costs)) // k, np.arange(len(costs)) % k
    order = np.lexsort((owner, lane_pos, -costs))  # heaviest first; ties: lane position, then owner
    rank, micro, slot = (np.zeros(len(costs), np.int64) for _ in range(3))
    group = data_parallel * micro_batch
    total = np.zeros(data_parallel)  # each rank's load over the step so far: the tie-break that evens step totals
    for j in range(grad_accum):
        load, used = np.zeros(data_parallel), np.zeros(data_parallel, np.int64)
        for i in order[j * group:(j + 1) * group]:
            room = used < micro_batch
            key = np.where(room, load, np.inf)
            tied = np.flatnonzero(key == key.min())
            tied = tied[total[tied] == total[tied].min()]
            r = int(owner[i]) if owner[i] in tied else int(tied[0])
            rank[i], micro[i], slot[i] = r, j, used[r]
            load[r] += costs[i]
            total[r] += costs[i]
            used[r] += 1
    return Assignment(rank=rank, micro=micro, slot=slot)


def best_possible(costs, data_parallel: int, micro_batch: int, grad_accum: int) -> float:
    """A lower bound of `imbalance(...)["step"]` over every assignment of these rows: micro-step j waits at least
    for its largest row and for its rows' mean per rank, and cutting the rows sorted by cost into micro-step groups
    gives the smallest sum of group maxima."""
    c = np.sort(np.asarray(costs, np.float64))[::-1]
    group = data_parallel * micro_batch
    ideal = c.sum() / data_parallel
    if ideal <= 0:
        return 1.0
    by_max = sum(c[j * group] for j in range(grad_accum))
    return float(max(by_max, ideal) / ideal)


def imbalance(costs, a: Assignment, data_parallel: int, grad_accum: int) -> dict[str, float]:
    """max/mean rank cost of one step. `step`: the sum over micro-steps of the slowest rank's cost over the sum of
    the mean rank cost, i.e. the step's time over the time of a perfect split when ranks synchronise every
    micro-step (ZeRO's gradient reduction and parameter gathers do); with one micro-step it is max/mean.
    `totals`: max/mean of the ranks' whole-step costs (what matters when they synchronise once per step)."""
    costs = np.asarray(costs, np.float64)
    per = np.zeros((grad_accum, data_parallel))
    np.add.at(per, (a.micro, a.rank), costs)
    totals = per.sum(axis=0)
    mean = per.mean(axis=1).sum()
    return {"step": float(per.max(axis=1).sum() / mean) if mean > 0 else 1.0,
            "totals": float(totals.max() / totals.mean()) if totals.mean() > 0 else 1.0}


class RowBalancer:
    """Collective per-step balancing inside the training loop (module docstring)."""

    def __init__(self, *, data_parallel: int, sequence_parallel: int, micro_batch: int, grad_accum: int,
                 attention: str, model: CostModel, device):
        self.dp, self.sp, self.mb, self.ga = data_parallel, sequence_parallel, micro_batch, grad_accum
        self.attention, self.model, self.device = attention, model, device

    def assign(self, rows: list[tuple[int, PackedRow]]) -> tuple[list[list[tuple[int, PackedRow]]], dict]:
        """This rank's step rows (epoch, row) -> its micro-batches after balancing, and the step's imbalance
        before and after (identical on every rank). Collective: every rank calls it every step."""
        costs_local = [row_cost(r, self.attention, self.model) for _, r in rows]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, costs_local)
        costs = [c for part in gathered[::self.sp] for c in part]  # one member per sequence-parallel group
        a = assign_rows(costs, self.dp, self.mb, self.ga)
        info = {"cost_max_over_mean": imbalance(costs, a, self.dp, self.ga)["step"],
                "cost_max_over_mean_unbalanced": imbalance(costs, Assignment.natural(self.dp, self.mb, self.ga),
                                                           self.dp, self.ga)["step"]}
        mine = self._exchange(rows, a) if a.moves(self.mb, self.ga) else self._local(rows, a)
        return mine, info

    def _local(self, rows, a: Assignment):
        k = self.mb * self.ga
        me = dist.get_rank() // self.sp
        out = [[None] * self.mb for _ in range(self.ga)]
        for t, item in enumerate(rows):
            out[a.micro[me * k + t]][a.slot[me * k + t]] = item
        return out

    def _exchange(self, rows, a: Assignment):
        """Move rows to their ranks: token arrays by all_to_all_single, metadata by all_gather_object."""
        k, world = self.mb * self.ga, dist.get_world_size()
        me_world = dist.get_rank()
        me, sp_rank = me_world // self.sp, me_world % self.sp
        meta_local = [(e, r.row_id, r.seg_lengths, r.seg_is_pad) for e, r in rows]
        metas: list = [None] * world
        dist.all_gather_object(metas, meta_local)
        seq = len(rows[0][1].input_ids)
        # send: my rows grouped by destination world rank (same sp rank in the destination group), lane order
        dest_world = a.rank * self.sp + sp_rank
        send_idx = sorted(range(k), key=lambda t: (dest_world[me * k + t], t))
        send = torch.from_numpy(np.stack([np.stack([rows[t][1].input_ids, rows[t][1].position_ids, rows[t][1].labels])
                                          for t in send_idx]).astype(np.int32))
        in_splits = [0] * world
        for t in range(k):
            in_splits[int(dest_world[me * k + t])] += 1
        # receive: rows whose destination is me, ordered by source rank then source lane position
        recv_src = [i for i in range(len(a.rank)) if a.rank[i] == me]
        out_splits = [0] * world
        for i in recv_src:
            out_splits[(i // k) * self.sp + sp_rank] += 1
        recv = torch.empty((len(recv_src), 3, seq), dtype=torch.int32)
        on = self.device if str(self.device).startswith("cuda") else "cpu"  # nccl needs device tensors
        unit = 3 * seq
        recv_dev = recv.to(on)
        dist.all_to_all_single(recv_dev.view(-1), send.to(on).view(-1),
                               output_split_sizes=[n * unit for n in out_splits],
                               input_split_sizes=[n * unit for n in in_splits])
        recv = recv_dev.cpu().numpy().astype(np.int64)
        out = [[None] * self.mb for _ in range(self.ga)]
        for arr, i in zip(recv, recv_src):
            epoch, row_id, seg_lengths, seg_is_pad = metas[(i // k) * self.sp][i % k]
            row = PackedRow(row_id=row_id, input_ids=arr[0], position_ids=arr[1], labels=arr[2],
                            seg_lengths=seg_lengths, seg_is_pad=seg_is_pad)
            out[a.micro[i]][a.slot[i]] = (epoch, row)
        return out
