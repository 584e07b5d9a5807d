"""The per-worker training loop Ray Train runs: DeepSpeed engine, packed-document batches, exact resume.

Ray Train has already created the torch process group (gloo on CPU, nccl on GPU); DeepSpeed adopts it. One
optimizer step = grad_accum micro-batches per data-parallel rank. The loss is the mean over every valid target
token of the whole global batch: each micro-batch's summed loss is scaled by (dp x grad_accum / N_global) so
DeepSpeed's own 1/grad_accum and 1/dp averaging leave exactly sum / N_global.

Entry point: `train_loop_per_worker(loop_config)`; `longctx.train.trainer.run_training` builds the config, a
`longctx.train.spec.LoopSpec`. The steps are `LoopRunner`'s methods: `build_engine`, `restore`, `train_step`,
`validate`, `checkpoint`, `early_stop`, `finish`, composed by `run`.

Faults (docs/faults.md, section 6): `restore` takes the newest checkpoint whose manifests verify
(`longctx.train.integrity`); `train_step` finds a non-finite loss or gradient norm on any rank and stops or skips
the step (`train.nonfinite`); no checkpoint or final model with non-finite weights is written; a preemption
request checkpoints at the step boundary. A deliberate stop is reported, not raised (`longctx.train.stops`).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time

import ray.train
import torch
import torch.distributed as dist

from longctx import quiet, storage
from longctx.eval.documents import iter_texts
from longctx.eval.perplexity import select_documents
from longctx.model.attention import attention_inputs
from longctx.model.load import load_causal_lm, load_tokenizer, local_model_dir, pick_attn_implementation
from longctx.progress import emit
from longctx.tracking import Tracker
from longctx.train import checkpoint as ckpt
from longctx.train import fault_injection as inject
from longctx.train import integrity, stops
from longctx.train.balance import CostModel, RowBalancer
from longctx.train.batches import (Ledger, RowStream, ShardRows, collate, lane_row_stream, rank_forward_inputs,
                                   ray_data_tables)
from longctx.train.deepspeed import build_deepspeed_config, disable_deepspeed_shm_comm
from longctx.train.isolation import check_packing_isolation
from longctx.train.loss import shift_targets
from longctx.train.memory_savers import prepare_for_training
from longctx.train.metrics import StepLog, count_params, device_peak_flops, memory_stats, model_step_flops
from longctx.train.optim import adamw
from longctx.train.preemption import PreemptionPoller, ray_preemption_notice
from longctx.train.schedule import lr_lambda
from longctx.train.sequence_parallel import enable_ulysses, shard_for_rank
from longctx.train.snapshots import (ensure_eval_snapshot, ledger_uri, publish_eval_snapshot, read_ledger, should_stop,
                                     tune_metrics)
from longctx.train.spec import ENGINE_INFO, FINAL_MODEL, METRICS_LOG, LoopSpec

_MAX_SKIPS_IN_A_ROW = 8
"""train.nonfinite=skip: more non-finite steps in a row than this stop the run (the model or the data is broken)."""

# Set before DeepSpeed is imported (it picks its accelerator at import time).
_DS_ACCEL_ENV = "DS_ACCELERATOR"


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch  # deferred: heavy import, used only here

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """The loop Ray Train runs on every worker; `loop_config` is `{"spec": LoopSpec}` (`LoopSpec.to_loop_config`).
    Returns the stop reason (`longctx.train.stops`), None when the run finished: rank 0's is the `Result`'s
    `return_value`."""
    quiet.configure_worker()  # Ray Train's per-report INFO lines only with --verbose
    return LoopRunner(LoopSpec.from_loop_config(loop_config)).run()


class LoopRunner:
    """One worker's training run: `build_engine`, `restore`, then `train_step` / `validate` / `checkpoint` until
    `total_steps` (or the data or early stop ends it), then the final checkpoint and model (`run` composes them);
    a stop reason (non-finite, no intact checkpoint, preempted) is reported instead of finishing."""

    def __init__(self, spec: LoopSpec):
        self.t_start = time.perf_counter()
        self.startup: dict[str, float] = {}  # seconds since the loop started, per phase (engine_info.json)
        self.spec = spec
        self.cfg = spec.job
        self.tcfg = self.cfg.train
        self.during = self.cfg.eval.during_training
        self.layout = spec.layout
        self.total_steps = int(spec.total_steps)
        self.train_root = spec.train_root
        storage.configure(self.cfg.storage)

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.dp_rank = self.rank // self.layout.sequence_parallel
        self.is_rank0 = self.rank == 0
        self.device = _device(self.tcfg.use_gpu)
        self.sp, self.sp_rank = self.layout.sequence_parallel, self.rank % self.layout.sequence_parallel
        self.stop_reason: dict | None = None  # stops.stop_reason: returned instead of finishing
        self.last_checkpoint_step: int | None = None
        self.last_checkpoint_name: str | None = None
        self.preempt_requested = False  # the driver asked for a checkpoint (SIGTERM/SIGINT)
        self.ray_notice = None  # Ray Train's node-preemption notice, once acted on
        self.skipped_steps: list[dict] = []
        self.poller = PreemptionPoller(self.train_root, self.is_rank0)
        self.inject_nan = inject.NanOnce(spec.nan_at, self.rank, lambda: self.step + 1)

    def run(self) -> dict | None:
        self.build_engine()
        if self.restore():
            self.train()
        if self.stop_reason is not None:
            self.report_stop()
        return self.stop_reason

    def train(self) -> None:
        """Steps until `total_steps` (or the data, an early stop or a stop reason ends them), then `finish`."""
        while self.step < self.total_steps:
            if not self.train_step():
                break
            step = self.step
            checkpoint_now = bool(self.tcfg.checkpoint_every and step % self.tcfg.checkpoint_every == 0
                                  and step < self.total_steps)
            if self.val_rows is not None and step % self.tcfg.val_every == 0 and step < self.total_steps:
                val_loss = self.validate()
                self.record_validation(step, val_loss)
                if not checkpoint_now:  # otherwise the checkpoint's report carries val_loss
                    last_loss = self.log.history[-1].get("loss") if self.is_rank0 and self.log.history else None
                    ray.train.report({"step": step, "val_loss": val_loss, "loss": last_loss})
            if checkpoint_now and self.early_stop():
                break  # the final checkpoint below is saved at this step
            if checkpoint_now or self.preempt_requested or self.ray_notice == "new":
                self.checkpoint()
                if self.ray_notice == "new":  # Ray Train restarts us when the node goes; until then, train on
                    self.ray_notice = "saved"
            if self.stop_reason is not None:
                return
            if self.preempt_requested:
                self.stop_reason = stops.stop_reason(
                    "preempted", f"preempted at step {step} of {self.total_steps}: checkpoint saved; rerun the same "
                                 "command to resume", step=step, checkpoint=self.last_checkpoint_name)
                return
            inject.failure(self.spec, step, self.rank)
        if self.stop_reason is None:
            self.finish()

    def report_stop(self) -> None:
        """Say why the run stops (rank 0) and flush the step log; `run` returns the reason to the driver."""
        if self.is_rank0:
            emit(f"[train] stopped: {self.stop_reason[stops.STOP_KEY]['message']}")
            if getattr(self, "log", None) is not None:
                self.log.close()

    def build_engine(self) -> None:
        """Distributed init, the model (RoPE changes from config, trained at the new length), the DeepSpeed engine
        with our AdamW + cosine schedule and the parallel layout; writes engine_info.json."""
        cfg, tcfg, layout = self.cfg, self.tcfg, self.layout
        if not tcfg.use_gpu:
            os.environ.setdefault(_DS_ACCEL_ENV, "cpu")
        import deepspeed  # after DS_ACCELERATOR is set

        disable_deepspeed_shm_comm()
        deepspeed.init_distributed(dist_backend="nccl" if tcfg.use_gpu else "gloo")
        torch.manual_seed(tcfg.seed)
        self.startup["imports_and_dist"] = time.perf_counter() - self.t_start

        # 1. Model.
        self.attn_impl = attn_impl = pick_attn_implementation(cfg.model.attn_implementation, self.device)
        max_pos = cfg.model.max_position_embeddings or self.spec.seq_len
        self.lm = lm = load_causal_lm(cfg.model.path, cfg.model, device=self.device, attn_implementation=attn_impl,
                                      max_position_embeddings=max_pos)
        # checkpointing (+ activation offload), tiled MLP, chunked loss: the same call the planner traces
        wrapped = prepare_for_training(lm, tcfg, use_gpu=tcfg.use_gpu)
        self.n_params = count_params(lm)
        self.startup["model_loaded"] = time.perf_counter() - self.t_start

        # 2. DeepSpeed engine.
        optimizer = adamw(wrapped, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=tcfg.adam_betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.total_steps, tcfg.warmup_ratio, tcfg.min_lr_ratio))
        ds_config = build_deepspeed_config(tcfg, layout, use_gpu=tcfg.use_gpu, user_override=self.spec.ds_override)
        self.mpu = None
        if self.sp > 1:
            self.mpu = enable_ulysses(lm, self.sp, layout.micro_batch_size, core=attn_impl,
                                      attention=cfg.data.attention)
        self.engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config, mpu=self.mpu)
        if self.is_rank0:
            emit(f"[train] world={self.world} data_parallel={layout.data_parallel} "
                 f"sequence_parallel={layout.sequence_parallel} "
                 f"micro_batch={layout.micro_batch_size} grad_accum={layout.grad_accum} "
                 f"tokens/step={layout.tokens_per_step:,} steps={self.total_steps} attn={attn_impl} "
                 f"zero={tcfg.zero_stage} params={self.n_params['total']:,} "
                 + "".join(f"{k}=on " for k in ("activation_checkpointing", "activation_offload", "tiled_mlp",
                                                "offload_optimizer", "offload_params") if getattr(tcfg, k))
                 + " ".join(f"{k}={v}" for k, v in (lm.config.rope_parameters or {}).items()))

        self.startup["engine_ready"] = time.perf_counter() - self.t_start
        _write_engine_info(self.engine, self.train_root, self.rank, self.world, self.n_params, attn_impl, ds_config,
                           self.startup)

    def restore(self) -> bool:
        """3. Resume from the newest intact checkpoint: DeepSpeed state + the data ledger + tokens + the metrics
        history so far; then the step log, the row stream positioned after the rows already consumed, the
        validation rows. False (with a stop reason) when checkpoints exist but none is intact."""
        cfg, tcfg, layout = self.cfg, self.tcfg, self.layout
        state = self.load_newest_intact()
        if self.stop_reason is not None:
            return False
        start_step, ledger, history, tokens = 0, Ledger(), [], 0
        if state is not None:
            start_step, ledger, history = int(state["step"]), Ledger.from_json(state["ledger"]), state["history"]
            # NOTE: older checkpoints have no `tokens`: the last logged step's count is all they have
            tokens = int(state.get("tokens", history[-1]["tokens"] if history else 0))
            self.skipped_steps = list(state.get("skipped_steps", []))
            self.last_checkpoint_step = start_step
            if self.is_rank0:
                emit(f"[train] resumed at step {start_step} ({ledger.total()} rows already consumed)")
        self.start_step, self.step, self.ledger = start_step, start_step, ledger

        tracker = None
        if self.is_rank0:  # TensorBoard event files (and W&B / MLflow when configured) beside metrics.jsonl
            tracker = Tracker.open(cfg, storage.join(self.train_root, "tensorboard"),
                                   run_id=self.spec.run_id, resume_step=start_step)
        self.log = StepLog(storage.join(self.train_root, METRICS_LOG) if self.is_rank0 else None, history,
                           echo=self.is_rank0, tracker=tracker, flush_every_s=cfg.logging.flush_every_s)
        if self.spec.parquet_files:  # this rank's lane of the committed shards (train/batches.py)
            shards = [ShardRows(f, tuple(g)) for f, g in zip(self.spec.parquet_files, self.spec.parquet_row_groups)]
            self.stream = lane_row_stream(shards, dp_rank=self.dp_rank, data_parallel=layout.data_parallel,
                                          epochs=tcfg.epochs, ledger=ledger)
        else:  # a ray.data.Dataset, split by Ray Train across the data-parallel ranks
            shard = ray.train.get_dataset_shard("train")
            self.stream = RowStream(lambda epoch: ray_data_tables(shard), epochs=tcfg.epochs, ledger=ledger)
        self.balancer = None  # train.balance_batches: rows change ranks to even out attention cost per step
        if tcfg.balance_batches and layout.data_parallel > 1:
            self.balancer = RowBalancer(
                data_parallel=layout.data_parallel, sequence_parallel=layout.sequence_parallel,
                micro_batch=layout.micro_batch_size, grad_accum=layout.grad_accum, attention=cfg.data.attention,
                model=CostModel.of(self.lm.config, self.n_params["matmul"]),
                device=self.device)
        self.peak = device_peak_flops(str(self.device))
        model_dir = local_model_dir(cfg.model.path)
        self.tokenizer_dirs = [model_dir, local_model_dir(cfg.data.tokenizer)]
        self.val_rows = (_validation_rows(cfg, self.spec.seq_len, self.dp_rank, layout.data_parallel)
                         if tcfg.val_every else None)
        self.tokens_seen = tokens
        self.skips_in_a_row, self.isolation_checked = 0, False
        return True

    def load_newest_intact(self) -> dict | None:
        """The trainer state of the newest checkpoint under the train root whose manifests verify (every rank
        checks its share of the files), with the DeepSpeed state loaded; damaged ones are skipped with one line
        each. None when there is no checkpoint; a `damaged` stop reason when none is intact."""
        refs = [integrity.list_checkpoints(self.train_root) if self.is_rank0 else None]
        dist.broadcast_object_list(refs, src=0)
        damaged = []
        for ref in refs[0]:
            with contextlib.ExitStack() as stack:
                try:
                    folder = stack.enter_context(integrity.local_copy(ref.uri))
                    problems = integrity.verify_checkpoint(folder, self.rank, self.world)
                except storage.StorageError as e:  # a folder that vanished or cannot be read is not a checkpoint
                    problems = [f"unreadable ({e})"]
                parts = [None] * self.world
                dist.all_gather_object(parts, problems)
                problems = list(dict.fromkeys(p for part in parts for p in part))
                if not problems:
                    state = integrity.read_state(folder)
                    with ckpt.safe_deepspeed_load():
                        self.engine.load_checkpoint(os.path.join(folder, "deepspeed"), tag="state")
                    if self.is_rank0 and self.during.enabled:
                        ensure_eval_snapshot(folder, self.train_root, int(state["step"]), int(state.get("tokens", 0)))
                    self.last_checkpoint_name = ref.name
                    return state
            damaged.append((ref, problems))
            if self.is_rank0:
                emit(f"[train] {ref.name} is damaged ({integrity.describe(problems)}): skipped, trying the one "
                     "before it")
        if damaged:
            lines = "; ".join(f"{ref.name}: {integrity.describe(p)}" for ref, p in damaged)
            self.stop_reason = stops.stop_reason(
                "damaged", f"no intact checkpoint under {self.train_root} to resume from ({lines}). Restore one "
                           "of them, or move them away to start over")
        return None

    def train_step(self) -> bool:
        """4. One optimizer step over grad_accum micro-batches (the packing-isolation proof before the first one);
        logs it. A non-finite loss or gradient norm on any rank stops the run or, with train.nonfinite=skip,
        passes over the step's rows and takes the next ones. False (and no step) when the data ran out on any
        rank or the run is to stop."""
        while True:
            outcome = self._attempt_step()
            if outcome != "skipped":
                return outcome == "stepped"

    def _attempt_step(self) -> str:
        """"stepped", "skipped" (non-finite, train.nonfinite=skip), "ran_out" or "stopped" (stop_reason set)."""
        cfg, tcfg, layout, device, engine, lm = self.cfg, self.tcfg, self.layout, self.device, self.engine, self.lm
        sp, sp_rank = self.sp, self.sp_rank
        t0 = time.perf_counter()
        rows = self.stream.take(layout.micro_batch_size * layout.grad_accum)
        ran_out = _all_sum([0.0 if rows is not None else 1.0], device)[0]
        if ran_out:
            if self.is_rank0:
                emit(f"[train] data exhausted after {self.step} steps (planned {self.total_steps})")
            return "ran_out"
        balance = {}
        if self.balancer is not None:
            micro_rows, balance = self.balancer.assign(rows)
        else:
            micro_rows = [rows[i : i + layout.micro_batch_size] for i in range(0, len(rows), layout.micro_batch_size)]
        micro = [collate([r for _, r in mr], cfg.data.attention, self.spec.seq_len) for mr in micro_rows]
        if not self.isolation_checked and tcfg.isolation_check and cfg.data.attention == "document":
            _prove_isolation(lm, micro[0], self.attn_impl, cfg, device, sp, sp_rank, self.mpu, self.is_rank0)
        self.isolation_checked = True
        targets = [shift_targets(m.labels, m.doc_ids if cfg.data.attention == "document" else None) for m in micro]
        if sp > 1:
            local_valid = float(sum(int((shard_for_rank(t, sp_rank, sp) != -100).sum()) for t in targets))
        else:
            local_valid = float(sum(int((t != -100).sum()) for t in targets))
        n_global, = _all_sum([local_valid], device)
        scale = layout.data_parallel * layout.grad_accum / max(n_global, 1.0)
        lr_used = float(engine.get_lr()[0])
        loss_sum_local = 0.0
        for m, tgt in zip(micro, targets):
            input_ids, tgt, kwargs = rank_forward_inputs(m, tgt, sequence_parallel=sp, sp_rank=sp_rank,
                                                         attn_implementation=self.attn_impl,
                                                         attention=cfg.data.attention, device=device, dtype=lm.dtype)
            loss_sum, _ = engine(input_ids, tgt, **kwargs)
            loss_sum = self.inject_nan(loss_sum)
            engine.backward(loss_sum * scale)
            engine.step()
            loss_sum_local += float(loss_sum.detach())
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        # NOTE: under fp16 loss scaling an overflowing gradient is the scaler's business (DeepSpeed skips the step
        # and lowers the scale); only the loss itself counts there
        bad = not math.isfinite(loss_sum_local) or (not stops.is_finite(grad_norm) and not engine.fp16_enabled())
        loss_total, tokens_step, nonpad, sumsq, n_bad, applied, preempt, ask_ray = _all_sum(
            [loss_sum_local, float(sum(m.tokens for m in micro)), float(sum(m.non_pad_tokens for m in micro)),
             float(sum(m.sum_sq_doc_lengths for m in micro)), float(bad), float(engine.was_step_applied()),
             *self.poller.flags()], device)
        self.preempt_requested = self.preempt_requested or preempt > 0
        if ask_ray and self.ray_notice is None and ray_preemption_notice() is not None:
            self.ray_notice = "new"
            if self.is_rank0:
                emit(f"[train] Ray Train reports a node of this run being preempted: checkpointing at step "
                     f"{self.step + 1}")
        if layout.sequence_parallel > 1:  # every SP rank of a group counted the same rows
            tokens_step, nonpad, sumsq = (x / layout.sequence_parallel for x in (tokens_step, nonpad, sumsq))
        step_rows = [None] * self.world  # which rows made this step (audit trail for exactly-once data)
        dist.all_gather_object(step_rows,
                               [r.row_id for _, r in rows] if self.rank % layout.sequence_parallel == 0 else [])
        row_ids = sorted(i for part in step_rows for i in part)
        if n_bad:
            return self._nonfinite(rows, row_ids, loss_total / max(n_global, 1.0), grad_norm, applied > 0)
        self.skips_in_a_row = 0
        for epoch, r in rows:
            self.ledger.add(epoch, r.row_id)
        self.step += 1
        step = self.step
        dt = time.perf_counter() - t0
        self.tokens_seen += int(tokens_step)
        if self.is_rank0 and (step % tcfg.log_every == 0 or step == self.total_steps):
            world, n_params = self.world, self.n_params
            flops = model_step_flops(lm.config, matmul_params=n_params["matmul"], tokens=int(nonpad),
                                     sum_sq_doc_lengths=int(sumsq))
            record = {
                "step": step, "total_steps": self.total_steps, "loss": loss_total / max(n_global, 1.0),
                "lr": lr_used, "grad_norm": grad_norm,
                "tokens": self.tokens_seen, "step_tokens": int(tokens_step), "loss_tokens": int(n_global),
                "step_time_s": dt, "tokens_per_s": tokens_step / dt,
                "tflops_per_s": flops["causal"] / dt / 1e12 / world,
                "mfu": (flops["causal"] / dt / world / self.peak) if self.peak else None,
                "mfu_full_square": (flops["full_square"] / dt / world / self.peak) if self.peak else None,
                **memory_stats(str(device)),
                "epoch": rows[-1][0], "row_ids": row_ids, **balance,
            }
            self.log.add(record)
        return "stepped"

    def _nonfinite(self, rows, row_ids: list[int], loss: float, grad_norm: float | None, applied: bool) -> str:
        """A non-finite loss or gradient norm at the step being taken: stop (train.nonfinite=stop, or when the
        update was applied anyway, or after too many in a row), or pass over its rows (skip): not counted as
        consumed, the step counter and the LR schedule stay (DeepSpeed applied no update)."""
        at = self.step + 1
        what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} (loss {loss}, grad_norm " \
               f"{grad_norm}) at step {at} (rows {row_ids})"
        self.skips_in_a_row += 1
        if self.tcfg.nonfinite == "stop" or applied or self.skips_in_a_row > _MAX_SKIPS_IN_A_ROW:
            why = ("train.nonfinite=stop" if self.tcfg.nonfinite == "stop" else
                   "the update was applied anyway (the weights are damaged)" if applied else
                   f"{self.skips_in_a_row} non-finite steps in a row")
            last = f"step {self.last_checkpoint_step}" if self.last_checkpoint_step is not None else "none yet"
            self.stop_reason = stops.stop_reason(
                "nonfinite", f"{what}: {why}; the run stops and its model is not published (last checkpoint: "
                             f"{last}). Set train.nonfinite=skip to pass over such steps", step=self.step)
            return "stopped"
        for epoch, r in rows:
            self.ledger.skip(epoch, r.row_id)
        self.skipped_steps.append({"at_step": at, "rows": row_ids, "loss": str(loss)})
        if self.is_rank0:
            emit(f"[train] {what}: skipped (train.nonfinite=skip): its rows are not counted as trained on, the step "
                 "and the LR schedule do not advance")
        return "skipped"

    def validate(self) -> float:
        """Mean next-token NLL over the validation documents (every rank runs the same number of forwards)."""
        engine, device = self.engine, self.device
        engine.eval()
        sums = [0.0, 0.0]
        with torch.no_grad():
            for ids, weight in self.val_rows:
                x = torch.tensor([ids], dtype=torch.long)
                pos = torch.arange(x.shape[1]).unsqueeze(0)
                tgt = shift_targets(x)
                kwargs = attention_inputs(pos.to(device), attn_implementation=self.attn_impl, attention="full")
                loss_sum, n_tok = engine(x.to(device), tgt.to(device), **kwargs)
                sums[0] += weight * float(loss_sum)
                sums[1] += weight * float(n_tok)
        engine.train()
        total, count = _all_sum(sums, device)
        return total / max(count, 1.0)

    def record_validation(self, step: int, val_loss: float) -> None:
        """Print it, add it to this step's log record and the tracker (rank 0); the next report to Ray Train
        carries it."""
        if self.is_rank0:
            self.log.annotate(step, val_loss=val_loss)

    def checkpoint(self) -> dict | None:
        """Report a checkpoint of the current step to Ray Train (collective; each rank's files hashed into its
        manifest first), then publish its eval snapshot (rank 0, eval.during_training); returns the gathered HF
        state dict (rank 0). Weights with NaN/inf are never written: a `nonfinite` stop reason instead."""
        step, log, engine, is_rank0 = self.step, self.log, self.engine, self.is_rank0
        parts = [None] * self.world
        dist.all_gather_object(parts, self.ledger.to_json())
        merged = Ledger.merge([Ledger.from_json(p) for p in parts])
        hf_sd = self.gather_finite_state_dict()
        if hf_sd is None and self.stop_reason is not None:
            return None
        name = integrity.fresh_dir_name(self.train_root, step) if is_rank0 else f"checkpoint_{step:08d}"
        with tempfile.TemporaryDirectory(prefix="longctx-ckpt-") as folder:
            engine.save_checkpoint(os.path.join(folder, "deepspeed"), tag="state")
            if is_rank0:
                ckpt.write_trainer_state(folder, {"format": integrity.FORMAT, "step": step, "tokens": self.tokens_seen,
                                                  "ledger": merged.to_json(), "history": log.history,
                                                  "skipped_steps": self.skipped_steps,
                                                  "layout": self.layout.as_dict()})
                ckpt.save_hf_model(self.lm, hf_sd, os.path.join(folder, "hf_model"), self.tokenizer_dirs)
                log.flush()
            integrity.write_manifest(folder, self.rank, self.world, step)
            last = log.history[-1] if (is_rank0 and log.history) else {}
            metrics = {k: last.get(k) for k in ("loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu")}
            if is_rank0 and self.during.enabled:  # the latest evaluated checkpoint's values, for Ray Tune
                metrics.update(tune_metrics(read_ledger(ledger_uri(self.train_root))))
            ray.train.report({"step": step, **metrics},
                             checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)
        self.last_checkpoint_step, self.last_checkpoint_name = step, name
        if is_rank0 and self.during.enabled:  # persisted: now the evaluator may see it (eval/during_training.py)
            publish_eval_snapshot(self.lm, hf_sd, self.train_root, step, self.tokens_seen, self.tokenizer_dirs)
        return hf_sd

    def gather_finite_state_dict(self) -> dict | None:
        """The HF state dict (collective; on rank 0), or None with a `nonfinite` stop reason when a weight holds
        NaN/inf (rank 0 checks, every rank learns it)."""
        hf_sd = ckpt.gather_hf_state_dict(self.engine, self.tcfg.zero_stage)
        bad = stops.nonfinite_tensors(hf_sd) if self.is_rank0 else []
        if _all_sum([float(len(bad))], self.device)[0]:
            names = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
            self.stop_reason = stops.stop_reason(
                "nonfinite", f"non-finite weights after step {self.step} ({names}): not saved, the model is not "
                             "published", step=self.step)
            return None
        return hf_sd

    def early_stop(self) -> bool:
        """eval.during_training.early_stop_patience: retrieval stopped improving (rank 0 decides for all)."""
        during = self.during
        if not during.early_stop_patience:
            return False
        stop = self.is_rank0 and should_stop(read_ledger(ledger_uri(self.train_root)), during.objective,
                                             during.early_stop_patience, during.early_stop_min_delta)
        if stop:
            emit(f"[train] early stop at step {self.step}: {during.objective} did not improve over the last "
                 f"{during.early_stop_patience} evaluated checkpoints")
        return _all_sum([1.0 if stop else 0.0], self.device)[0] > 0

    def finish(self) -> None:
        """5. Final validation + checkpoint + the published HF model (only with finite weights)."""
        if self.val_rows is not None:
            self.record_validation(self.step, self.validate())
        if self.last_checkpoint_step == self.step:  # resumed from the final checkpoint: it is there already
            hf_sd = self.gather_finite_state_dict()
        else:
            hf_sd = self.checkpoint()
        if self.stop_reason is not None:
            return
        if self.is_rank0:
            final_uri = storage.join(self.train_root, FINAL_MODEL)
            with storage.publish_dir(final_uri, overwrite=True) as staging:
                ckpt.save_hf_model(self.lm, hf_sd, staging, self.tokenizer_dirs)
            self.log.close()
            emit(f"[train] final model: {final_uri}")
        dist.barrier()


def _prove_isolation(lm, micro, attn_impl: str, cfg, device, sp: int, sp_rank: int, mpu, is_rank0: bool) -> None:
    """The first micro-batch packed vs per document on this backend/layout (longctx.train.isolation); raises
    PackingLeakError (the run fails before its first optimizer step) when documents see each other."""
    result = check_packing_isolation(lm, micro, attn_implementation=attn_impl, attention=cfg.data.attention,
                                     device=device, sp=sp, sp_rank=sp_rank,
                                     sp_group=mpu.get_sequence_parallel_group() if mpu is not None else None,
                                     tolerance=cfg.train.isolation_tolerance)
    if is_rank0:
        emit(f"[train] {result.line()}")


def _validation_rows(cfg, seq_len: int, dp_rank: int, data_parallel: int) -> list[tuple[list[int], float]]:
    """This data-parallel rank's validation rows as (token ids, weight); padded with weight-0 repeats so every
    rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)."""
    tcfg = cfg.train
    if tcfg.sequence_parallel > 1:
        raise ValueError("train.val_every needs train.sequence_parallel == 1 (validation rows are not sharded)")
    uri = tcfg.val_documents or cfg.eval.documents
    tok = load_tokenizer(cfg.data.tokenizer)
    docs, skipped = select_documents(tok, iter_texts(uri, cfg.eval.text_field), seq_len, tcfg.val_num_documents)
    if not docs:
        raise ValueError(f"train.val_every: {uri} has no document with data.seq_len={seq_len} tokens "
                         f"({skipped} too short)")
    per_rank = -(-len(docs) // data_parallel)
    mine = [(d, 1.0) for d in docs[dp_rank::data_parallel]]
    return mine + [(docs[0], 0.0)] * (per_rank - len(mine))


def _optimizer_state_numel(engine) -> int:
    """Elements of fp32 master weights this rank's optimizer holds (shows ZeRO partitioning at work)."""
    opt = engine.optimizer
    groups = getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if groups is None:
        groups = getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if groups is not None:
        return int(sum(g.numel() for g in groups))
    return int(sum(p.numel() for group in opt.param_groups for p in group["params"]))


def _write_engine_info(engine, train_root: str, rank: int, world: int, n_params: dict, attn_impl: str, ds_config: dict,
                       startup: dict):
    """Rank 0 writes train/engine_info.json: per-rank optimizer-state sizes, attention backend, DeepSpeed config."""
    parts = [None] * world
    dist.all_gather_object(parts, {"rank": rank, "optimizer_state_numel": _optimizer_state_numel(engine)})
    if rank == 0:
        storage.write_json(storage.join(train_root, ENGINE_INFO), {
            "world_size": world, "params": n_params, "attn_implementation": attn_impl,
            "zero_stage": ds_config["zero_optimization"]["stage"], "ranks": parts, "deepspeed_config": ds_config,
            "startup_s": {k: round(v, 2) for k, v in startup.items()},
        })
