"""The per-worker training loop Ray Train runs: DeepSpeed engine, packed-document batches, exact resume.

Ray Train has already created the torch process group (gloo on CPU, nccl on GPU); DeepSpeed adopts it. One
optimizer step = grad_accum micro-batches per data-parallel rank. The loss is the mean over every valid target
token of the whole global batch: each micro-batch's summed loss is scaled by (dp x grad_accum / N_global) so
DeepSpeed's own 1/grad_accum and 1/dp averaging leave exactly sum / N_global.

Entry point: `train_loop_per_worker(loop_config)`; `longctx.train.trainer.run_training` builds the config, a
`longctx.train.spec.LoopSpec`. The steps are `LoopRunner`'s methods: `build_engine`, `restore`, `train_step`,
`validate`, `checkpoint`, `early_stop`, `finish`, composed by `run`.
"""

from __future__ import annotations

import os
import tempfile
import time

import ray.train
import torch
import torch.distributed as dist

from longctx import storage
from longctx.eval.during_training import ledger_uri, read_ledger, should_stop, tune_metrics
from longctx.model.attention import attention_inputs
from longctx.model.load import load_causal_lm, local_model_dir, pick_attn_implementation
from longctx.progress import emit
from longctx.tracking import Tracker, run_id_for
from longctx.train import checkpoint as ckpt
from longctx.train.batches import Ledger, RowStream, collate, forward_inputs, parquet_tables, ray_data_tables
from longctx.train.deepspeed import build_deepspeed_config
from longctx.train.loss import CausalLMWithChunkedLoss, shift_targets
from longctx.train.metrics import StepLog, count_params, device_peak_flops, memory_stats, step_flops
from longctx.train.optim import adamw
from longctx.train.schedule import lr_lambda
from longctx.train.sequence_parallel import enable_ulysses, shard_for_rank
from longctx.train.spec import LoopSpec

# Set before DeepSpeed is imported (it picks its accelerator at import time).
_DS_ACCEL_ENV = "DS_ACCELERATOR"


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _disable_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed on plain torch.distributed collectives (gloo on CPU).

    NOTE: on CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op (`deepspeed_shm_comm`) the
    first time it starts: a C++ build of ~1 min per machine, serialised by a file lock under
    ~/.cache/torch_extensions that stays behind if a worker is killed mid-build and then blocks every later run.
    Gloo is what we test and is enough for CPU runs; GPU runs use nccl and never build it.
    """
    import importlib

    # NOTE: `import deepspeed.comm.torch as m` would bind the torch library (deepspeed.comm imports torch).
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def train_loop_per_worker(loop_config: dict) -> None:
    """The loop Ray Train runs on every worker; `loop_config` is a `LoopSpec` as a dict (`LoopSpec.to_dict`)."""
    LoopRunner(LoopSpec.from_dict(loop_config)).run()


class LoopRunner:
    """One worker's training run: `build_engine`, `restore`, then `train_step` / `validate` / `checkpoint` until
    `total_steps` (or the data or early stop ends it), then the final checkpoint and model (`run` composes them)."""

    def __init__(self, spec: LoopSpec):
        self.t_start = time.perf_counter()
        self.startup: dict[str, float] = {}  # seconds since the loop started, per phase (engine_info.json)
        self.spec = spec
        self.cfg = spec.config()
        self.tcfg = self.cfg.train
        self.during = self.cfg.eval.during_training
        self.layout = spec.batch_layout()
        self.total_steps = int(spec.total_steps)
        self.train_root = spec.train_root
        storage.configure(self.cfg.storage)

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.dp_rank = self.rank // self.layout.sequence_parallel
        self.is_rank0 = self.rank == 0
        self.device = _device(self.tcfg.use_gpu)
        self.sp, self.sp_rank = self.layout.sequence_parallel, self.rank % self.layout.sequence_parallel

    def run(self) -> None:
        self.build_engine()
        self.restore()
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
            if checkpoint_now:
                self.checkpoint()
            _maybe_inject_failure(self.spec, step, self.rank)
        self.finish()

    def build_engine(self) -> None:
        """Distributed init, the model (RoPE changes from config, trained at the new length), the DeepSpeed engine
        with our AdamW + cosine schedule and the parallel layout; writes engine_info.json."""
        cfg, tcfg, layout = self.cfg, self.tcfg, self.layout
        if not tcfg.use_gpu:
            os.environ.setdefault(_DS_ACCEL_ENV, "cpu")
        import deepspeed  # after DS_ACCELERATOR is set

        _disable_deepspeed_shm_comm()
        deepspeed.init_distributed(dist_backend="nccl" if tcfg.use_gpu else "gloo")
        torch.manual_seed(tcfg.seed)
        self.startup["imports_and_dist"] = time.perf_counter() - self.t_start

        # 1. Model.
        self.attn_impl = attn_impl = pick_attn_implementation(cfg.model.attn_implementation, self.device)
        max_pos = cfg.model.max_position_embeddings or cfg.data.seq_len
        self.lm = lm = load_causal_lm(cfg.model.path, cfg.model, device=self.device, attn_implementation=attn_impl,
                                      max_position_embeddings=max_pos)
        if tcfg.activation_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
        self.n_params = count_params(lm)
        self.startup["model_loaded"] = time.perf_counter() - self.t_start
        wrapped = CausalLMWithChunkedLoss(lm, chunk_tokens=tcfg.loss_chunk_tokens)

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
                 + " ".join(f"{k}={v}" for k, v in (lm.config.rope_parameters or {}).items()))

        self.startup["engine_ready"] = time.perf_counter() - self.t_start
        _write_engine_info(self.engine, self.train_root, self.rank, self.world, self.n_params, attn_impl, ds_config,
                           self.startup)

    def restore(self) -> None:
        """3. Resume: DeepSpeed state + the data ledger + the metrics history so far (Ray Train's checkpoint);
        then the step log, the row stream positioned after the rows already consumed, the validation rows."""
        cfg, tcfg, layout = self.cfg, self.tcfg, self.layout
        start_step, ledger, history = 0, Ledger(), []
        resume = ray.train.get_checkpoint()
        if resume is not None:
            with resume.as_directory() as folder:
                state = ckpt.read_trainer_state(folder)
                with ckpt.safe_deepspeed_load():
                    self.engine.load_checkpoint(os.path.join(folder, "deepspeed"), tag="state")
                if self.is_rank0 and self.during.enabled:
                    ckpt.ensure_eval_snapshot(folder, self.train_root, int(state["step"]),
                                              int(state["history"][-1]["tokens"]) if state["history"] else 0)
            start_step, ledger, history = int(state["step"]), Ledger.from_json(state["ledger"]), state["history"]
            if self.is_rank0:
                emit(f"[train] resumed at step {start_step} ({ledger.total()} rows already consumed)")
        self.start_step, self.step, self.ledger = start_step, start_step, ledger

        tracker = None
        if self.is_rank0:  # TensorBoard event files (and W&B / MLflow when configured) beside metrics.jsonl
            tracker = Tracker.open(cfg, storage.join(self.train_root, "tensorboard"),
                                   run_id=run_id_for(cfg, self.train_root), resume_step=start_step)
        self.log = StepLog(storage.join(self.train_root, "metrics.jsonl") if self.is_rank0 else None, history,
                           echo=self.is_rank0, tracker=tracker, flush_every_s=cfg.logging.flush_every_s)
        if self.spec.parquet_files:
            files = self.spec.parquet_files
            self.stream = RowStream(lambda: parquet_tables(files), dp_rank=self.dp_rank,
                                    data_parallel=layout.data_parallel, epochs=tcfg.epochs, ledger=ledger)
        else:  # a ray.data.Dataset, split by Ray Train across the data-parallel ranks
            shard = ray.train.get_dataset_shard("train")
            self.stream = RowStream(lambda: ray_data_tables(shard), dp_rank=self.dp_rank,
                                    data_parallel=layout.data_parallel, epochs=tcfg.epochs, ledger=ledger,
                                    shard_by_row_id=False)
        self.peak = device_peak_flops(str(self.device))
        model_dir = local_model_dir(cfg.model.path)
        self.tokenizer_dirs = [model_dir, local_model_dir(cfg.data.tokenizer)]
        self.val_rows = _validation_rows(cfg, self.dp_rank, layout.data_parallel) if tcfg.val_every else None
        self.tokens_seen = int(history[-1]["tokens"]) if history else 0

    def train_step(self) -> bool:
        """4. One optimizer step over grad_accum micro-batches (the packing-isolation proof before the first one);
        logs it. False (and no step) when the data ran out on any rank."""
        cfg, tcfg, layout, device, engine, lm = self.cfg, self.tcfg, self.layout, self.device, self.engine, self.lm
        sp, sp_rank = self.sp, self.sp_rank
        t0 = time.perf_counter()
        rows = self.stream.take(layout.micro_batch_size * layout.grad_accum)
        ran_out = _all_sum([0.0 if rows is not None else 1.0], device)[0]
        if ran_out:
            if self.is_rank0:
                emit(f"[train] data exhausted after {self.step} steps (planned {self.total_steps})")
            return False
        micro = [collate([r for _, r in rows[i : i + layout.micro_batch_size]], cfg.data.attention)
                 for i in range(0, len(rows), layout.micro_batch_size)]
        if self.step == self.start_step and tcfg.isolation_check and cfg.data.attention == "document":
            _prove_isolation(lm, micro[0], self.attn_impl, cfg, device, sp, sp_rank, self.mpu, self.is_rank0)
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
            input_ids, pos = m.input_ids, m.position_ids
            if sp > 1:  # this rank's shard of every row; the attention layers all-to-all the rest
                input_ids, pos, tgt = (shard_for_rank(t, sp_rank, sp) for t in (input_ids, pos, tgt))
                kwargs = {"position_ids": pos.to(device), "use_cache": False}
            else:
                input_ids, tgt, kwargs = forward_inputs(m, tgt, attn_implementation=self.attn_impl, device=device,
                                                        attention=cfg.data.attention, dtype=lm.dtype)
            loss_sum, _ = engine(input_ids.to(device), tgt.to(device), **kwargs)
            engine.backward(loss_sum * scale)
            engine.step()
            loss_sum_local += float(loss_sum.detach())
        for epoch, r in rows:
            self.ledger.add(epoch, r.row_id)
        self.step += 1
        step = self.step
        loss_total, tokens_step, nonpad, sumsq = _all_sum(
            [loss_sum_local, float(sum(m.tokens for m in micro)), float(sum(m.non_pad_tokens for m in micro)),
             float(sum(m.sum_sq_doc_lengths for m in micro))], device)
        if layout.sequence_parallel > 1:  # every SP rank of a group counted the same rows
            tokens_step, nonpad, sumsq = (x / layout.sequence_parallel for x in (tokens_step, nonpad, sumsq))
        step_rows = [None] * self.world  # which rows made this step (audit trail for exactly-once data)
        dist.all_gather_object(step_rows,
                               [r.row_id for _, r in rows] if self.rank % layout.sequence_parallel == 0 else [])
        dt = time.perf_counter() - t0
        self.tokens_seen += int(tokens_step)
        if self.is_rank0 and (step % tcfg.log_every == 0 or step == self.total_steps):
            world, n_params = self.world, self.n_params
            flops = step_flops(matmul_params=n_params["matmul"], tokens=int(nonpad),
                               num_layers=lm.config.num_hidden_layers, hidden_size=lm.config.hidden_size,
                               sum_sq_doc_lengths=int(sumsq))
            grad_norm = engine.get_global_grad_norm()
            record = {
                "step": step, "total_steps": self.total_steps, "loss": loss_total / max(n_global, 1.0),
                "lr": lr_used,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens": self.tokens_seen, "step_tokens": int(tokens_step), "loss_tokens": int(n_global),
                "step_time_s": dt, "tokens_per_s": tokens_step / dt, "tflops_per_s": flops / dt / 1e12 / world,
                "mfu": (flops / dt / world / self.peak) if self.peak else None, **memory_stats(str(device)),
                "epoch": rows[-1][0], "row_ids": sorted(i for part in step_rows for i in part),
            }
            self.log.add(record)
        return True

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
        """Report a checkpoint of the current step to Ray Train (collective), then publish its eval snapshot
        (rank 0, eval.during_training); returns the gathered HF state dict (rank 0)."""
        step, log, engine, is_rank0 = self.step, self.log, self.engine, self.is_rank0
        parts = [None] * self.world
        dist.all_gather_object(parts, self.ledger.to_json())
        merged = Ledger.merge([Ledger.from_json(p) for p in parts])
        hf_sd = ckpt.gather_hf_state_dict(engine, self.tcfg.zero_stage)
        with tempfile.TemporaryDirectory(prefix="longctx-ckpt-") as folder:
            engine.save_checkpoint(os.path.join(folder, "deepspeed"), tag="state")
            if is_rank0:
                ckpt.write_trainer_state(folder, {"step": step, "ledger": merged.to_json(), "history": log.history,
                                                  "layout": self.layout.as_dict()})
                ckpt.save_hf_model(self.lm, hf_sd, os.path.join(folder, "hf_model"), self.tokenizer_dirs)
                log.flush()
            last = log.history[-1] if (is_rank0 and log.history) else {}
            metrics = {k: last.get(k) for k in ("loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu")}
            if is_rank0 and self.during.enabled:  # the latest evaluated checkpoint's values, for Ray Tune
                metrics.update(tune_metrics(read_ledger(ledger_uri(self.train_root))))
            ray.train.report({"step": step, **metrics},
                             checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"checkpoint_{step:08d}")
        if is_rank0 and self.during.enabled:  # persisted: now the evaluator may see it (eval/during_training.py)
            ckpt.publish_eval_snapshot(self.lm, hf_sd, self.train_root, step, self.tokens_seen, self.tokenizer_dirs)
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
        """5. Final validation + checkpoint + the published HF model."""
        if self.val_rows is not None:
            self.record_validation(self.step, self.validate())
        hf_sd = self.checkpoint()
        if self.is_rank0:
            final_uri = storage.join(self.train_root, "final_model")
            with storage.publish_dir(final_uri, overwrite=True) as staging:
                ckpt.save_hf_model(self.lm, hf_sd, staging, self.tokenizer_dirs)
            self.log.close()
            emit(f"[train] final model: {final_uri}")
        dist.barrier()


def _prove_isolation(lm, micro, attn_impl: str, cfg, device, sp: int, sp_rank: int, mpu, is_rank0: bool) -> None:
    """The first micro-batch packed vs per document on this backend/layout (longctx.train.isolation); raises
    PackingLeakError (the run fails before its first optimizer step) when documents see each other."""
    from longctx.train.isolation import check_packing_isolation

    result = check_packing_isolation(lm, micro, attn_implementation=attn_impl, attention=cfg.data.attention,
                                     device=device, sp=sp, sp_rank=sp_rank,
                                     sp_group=mpu.get_sequence_parallel_group() if mpu is not None else None,
                                     tolerance=cfg.train.isolation_tolerance)
    if is_rank0:
        print(f"[train] {result.line()}", flush=True)


def _validation_rows(cfg, dp_rank: int, data_parallel: int) -> list[tuple[list[int], float]]:
    """This data-parallel rank's validation rows as (token ids, weight); padded with weight-0 repeats so every
    rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)."""
    from longctx.eval.documents import iter_texts
    from longctx.eval.perplexity import select_documents
    from longctx.model.load import load_tokenizer

    tcfg = cfg.train
    if tcfg.sequence_parallel > 1:
        raise ValueError("train.val_every needs train.sequence_parallel == 1 (validation rows are not sharded)")
    uri = tcfg.val_documents or cfg.eval.documents
    tok = load_tokenizer(cfg.data.tokenizer)
    docs, skipped = select_documents(tok, iter_texts(uri, cfg.eval.text_field), cfg.data.seq_len, tcfg.val_num_documents)
    if not docs:
        raise ValueError(f"train.val_every: {uri} has no document with data.seq_len={cfg.data.seq_len} tokens "
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
    from longctx import storage

    parts = [None] * world
    dist.all_gather_object(parts, {"rank": rank, "optimizer_state_numel": _optimizer_state_numel(engine)})
    if rank == 0:
        storage.write_json(storage.join(train_root, "engine_info.json"), {
            "world_size": world, "params": n_params, "attn_implementation": attn_impl,
            "zero_stage": ds_config["zero_optimization"]["stage"], "ranks": parts, "deepspeed_config": ds_config,
            "startup_s": {k: round(v, 2) for k, v in startup.items()},
        })


def _maybe_inject_failure(spec, step: int, rank: int) -> None:
    """Fault injection for tests: a hard process exit (no cleanup, like an OOM kill) once, at a given step.

    The trigger file makes it happen on the first attempt only: it is removed before exiting.
    """
    fail = spec.fail_at
    if not fail or step != fail["step"] or rank != fail.get("rank", 0):
        return
    trigger = fail["trigger_file"]
    if os.path.exists(trigger):
        os.remove(trigger)
        print(f"[train] injected failure: rank {rank} exits at step {step}", flush=True)
        os._exit(1)
