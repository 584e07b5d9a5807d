"""Long-context evaluation of every committed checkpoint while training runs (`eval.during_training`).

    watcher = CheckpointWatcher(cfg, train_root, run_id="r").start()   # the train step, before trainer.fit()
    result = trainer.fit()
    records = watcher.finish()                                # evaluates what is left, writes the plot

The training loop publishes the HF model of each checkpoint it has persisted as a committed snapshot
(`longctx.train.snapshots.publish_eval_snapshot`, `<train root>/eval_snapshots/step_<N>/`). A thread in the
driver polls for committed snapshots and hands them, in step order, to a pool of Ray actors (`CheckpointEvaluator`,
`eval.during_training.actors` of them, one checkpoint each at a time) that reserve their own CPUs
(`eval.during_training.num_cpus` each): the workers never wait for an evaluation, and an evaluation that cannot
be scheduled (no spare CPUs) only waits until training ends. The pool is plain Ray actors, not a Ray Data actor
pool: checkpoints arrive one by one over the whole run, while a Ray Data pipeline reads a dataset it can list.

Each evaluation is one JSON line of `<train root>/checkpoint_eval.jsonl` (the run's metrics; step, tokens
trained, NLL by position and beyond the base length, passkey, needle; read and written by
`longctx.train.snapshots`, its one reader). That file is also the exactly-once ledger: a step already in it is never evaluated again, so re-running a run (resume) skips what was done; a
snapshot is removed only after its record is written (a crash in between costs one repeated evaluation, never
a second record). The training loop reads the ledger at checkpoint steps to report the latest values to Ray
Tune (`ckpt_passkey`, `ckpt_needle`, `ckpt_neg_nll_beyond_base`, `ckpt_nll_beyond_base`, `ckpt_step`) and
to stop early when the retrieval objective stops improving (`early_stop_patience`).

Each record also goes to the run's trackers as it is written (`checkpoint_eval/<metric>` at the checkpoint's
step; TensorBoard under `<train root>/tensorboard/checkpoint_eval`, W&B/MLflow runs `<run>-checkpoint_eval`), so
retrieval can be watched while training runs; the ledger makes that exactly once too.

Nothing here is trained or evaluated twice for the sake of bookkeeping: the actor calls the same plain functions
as the end-of-run evaluation (`perplexity.py`, `passkey.py`, `needle.py`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any

from longctx import storage
from longctx.config import JobConfig
from longctx.eval.documents import iter_texts
from longctx.eval.haystack import load_haystack_text
from longctx.eval.needle import build_needle_prompts, score_needle, summarize_needle
from longctx.tracking import Tracker, checkpoint_eval_scalars
from longctx.train.snapshots import committed_eval_snapshots, ledger_uri, read_ledger, write_ledger

log = logging.getLogger(__name__)

PLOT = "checkpoint_eval.png"


# ------------------------------------------------------------------------------------------------- actor
def eval_settings(cfg) -> dict:
    """(context length, base length, passkey lengths) the checkpoints are evaluated at."""
    from longctx.eval.runner import base_max_positions  # deferred: pulls in torch, used only here

    dt = cfg.eval.during_training
    context = int(dt.context_length or cfg.eval.context_length or cfg.data.seq_len)
    base_len = int(cfg.eval.base_context_length or base_max_positions(cfg.model.path))
    lengths = list(dt.passkey_lengths or [context]) if dt.passkey else []
    return {"context_length": context, "base_context_length": base_len, "passkey_lengths": lengths}


class CheckpointEvaluator:
    """Ray actor: builds the documents and prompts once, then evaluates one snapshot per call."""

    def __init__(self, cfg_json: dict, hold_s: float | None = None):
        import torch  # deferred: heavy import, used only here

        from longctx.eval.passkey import build_passkey_prompts  # deferred: pulls in torch, used only here
        from longctx.eval.perplexity import select_documents  # deferred: pulls in torch, used only here
        from longctx.model.load import load_tokenizer  # deferred: pulls in torch, used only here

        cfg = JobConfig.model_validate(cfg_json)
        storage.configure(cfg.storage)
        self.cfg = cfg
        self.hold_s = hold_s
        self.held = False
        dt, ev = cfg.eval.during_training, cfg.eval
        torch.set_num_threads(max(1, int(dt.num_cpus)))  # stay inside the CPUs this actor reserved
        self.settings = eval_settings(cfg)
        self.tok = load_tokenizer(cfg.data.tokenizer)
        context = self.settings["context_length"]
        self.docs: list[list[int]] = []
        if ev.perplexity:
            self.docs, skipped = select_documents(self.tok, iter_texts(ev.documents, ev.text_field), context,
                                                  dt.num_documents)
            if not self.docs:
                raise ValueError(f"eval.during_training: {ev.documents} has no document with {context} tokens "
                                 f"({skipped} too short)")
        self.passkey = (build_passkey_prompts(self.tok, self.settings["passkey_lengths"], ev.passkey.depths,
                                              dt.passkey_trials, ev.seed) if self.settings["passkey_lengths"] else [])
        self.needle = []
        if dt.needle:
            nd = ev.needle
            text = load_haystack_text(nd.haystack, nd.text_field, min_chars=16 * max(nd.lengths))
            self.needle = build_needle_prompts(self.tok, text, nd.lengths, nd.depths, nd.variants, nd.num_needles,
                                               nd.trials, ev.seed)

    def evaluate(self, snapshot_uri: str) -> dict:
        import torch  # deferred: heavy import, used only here

        from longctx.eval.generate import greedy_generate  # deferred: pulls in torch, used only here
        from longctx.eval.passkey import run_passkey_batch, score_passkey_rows  # deferred: pulls in torch, used only here
        from longctx.eval.perplexity import position_nll_sums, summarize_position_nll  # deferred: pulls in torch, used only here
        from longctx.eval.runner import ModelSpec  # deferred: pulls in torch, used only here

        t0 = time.time()
        info = json.loads(storage.read_text(storage.published_path(snapshot_uri, "snapshot.json")))
        ev = self.cfg.eval
        model = ModelSpec(snapshot_uri).load(self.cfg.model, "cuda" if torch.cuda.is_available() else "cpu")
        context, base_len = self.settings["context_length"], self.settings["base_context_length"]
        rec: dict[str, Any] = {"step": int(info["step"]), "tokens": int(info["tokens"]),
                               "committed_at": info.get("committed_at"), "eval_started_at": t0,
                               "evaluator_pid": os.getpid(),
                               "context_length": context, "base_context_length": base_len}
        bs = ev.batch_size
        if self.docs:
            nll_sum, count = position_nll_sums(model, self.docs, bs)
            ppl = summarize_position_nll(nll_sum, count, ev.bucket_edges, base_len)
            rec.update(nll_overall=ppl["overall_nll"], nll_within_base=ppl.get("nll_within_base"),
                       nll_beyond_base=ppl.get("nll_beyond_base"),
                       nll_by_bucket={"buckets": ppl["buckets"], "mean_nll": ppl["mean_nll"]})
        if self.passkey:
            rows = []
            for i in range(0, len(self.passkey), bs):
                rows += run_passkey_batch(model, self.tok, self.passkey[i : i + bs], ev.prefill_chunk_tokens)
            scored = score_passkey_rows(rows)
            rec.update(passkey=scored["overall"], passkey_by_length=scored["accuracy_by_length"],
                       passkey_key_nll=scored.get("key_nll_by_length"))
        if self.needle:
            nrows = []
            for p in self.needle:
                out = greedy_generate(model, [p.input_ids], max_new_tokens=p.max_new_tokens,
                                      eos_token_id=self.tok.eos_token_id, prefill_chunk=ev.prefill_chunk_tokens)[0]
                pred = self.tok.decode(out, skip_special_tokens=True)
                nrows.append({"variant": p.variant, "length": p.length, "depth": p.depth, "prediction": pred,
                              "score": score_needle(p.variant, pred, p.reference, p.keywords)})
            summary = summarize_needle(nrows)
            rec["needle"] = sum(v["mean"] for v in summary.values()) / len(summary)
            rec["needle_by_variant"] = {k: v["mean"] for k, v in summary.items()}
        if self.hold_s is not None and not self.held:
            self.held = True
            rec["held_for_later_commit"] = self._hold(snapshot_uri, rec["step"], t0)
        rec["eval_finished_at"] = time.time()
        rec["eval_s"] = round(rec["eval_finished_at"] - t0, 3)
        return rec

    def _hold(self, snapshot_uri: str, step: int, t0: float) -> bool:
        """Fault-test hook (`hold_s`): keep the first evaluation open until training commits a later checkpoint
        (True), or `hold_s` passes (False). Training that waited for its evaluator would never commit one."""
        train_root = snapshot_uri.rstrip("/").rsplit("/", 2)[0]
        deadline = time.time() + self.hold_s
        while time.time() < deadline:
            for s, uri in committed_eval_snapshots(train_root):
                if s > step:
                    info = json.loads(storage.read_text(storage.published_path(uri, "snapshot.json")))
                    if (info.get("committed_at") or 0) > t0:
                        return True
            time.sleep(0.1)
        return False


# ----------------------------------------------------------------------------------------------- watcher
class CheckpointWatcher:
    """Driver-side thread: finds committed snapshots, evaluates each exactly once on the actor, keeps the ledger."""

    def __init__(self, cfg, train_root: str, *, run_id: str, hold_s: float | None = None):
        self.cfg = cfg
        self.run_id = run_id
        """The run's id (the trackers' run name), as the run folder names it."""
        self.hold_s = hold_s
        """Fault tests only: the first evaluation stays open until a later checkpoint is committed (see
        `CheckpointEvaluator._hold`), so that a test can prove training does not wait for evaluation."""
        self.dt = cfg.eval.during_training
        self.train_root = storage.normalize(train_root)
        self.ledger = ledger_uri(self.train_root)
        self.records = read_ledger(self.ledger)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._actors: list = []
        self._tracker = None
        self._inflight: dict[int, tuple[str, Any, Any]] = {}
        """step -> (snapshot uri, actor, object ref) of the evaluations running now (at most one per actor)."""
        self.evaluated: list[int] = []
        """Steps evaluated by this watcher (not those found already in the ledger)."""
        self.error: BaseException | None = None

    def done_steps(self) -> set[int]:
        return {int(r["step"]) for r in self.records}

    def start(self) -> "CheckpointWatcher":
        import ray  # deferred: heavy import, used only here

        settings = eval_settings(self.cfg)  # a bad model path or base length fails before training starts
        if settings["passkey_lengths"]:  # so does a passkey length too short for the prompt (in the driver)
            from longctx.eval.passkey import build_passkey_prompts  # deferred: pulls in torch, used only here
            from longctx.model.load import load_tokenizer  # deferred: pulls in torch, used only here

            try:
                build_passkey_prompts(load_tokenizer(self.cfg.data.tokenizer), settings["passkey_lengths"], [0.5], 1)
            except ValueError as exc:
                raise ValueError(f"eval.during_training.passkey_lengths={settings['passkey_lengths']}: {exc}") from exc
        cls = ray.remote(num_cpus=self.dt.num_cpus, num_gpus=self.dt.num_gpus, max_restarts=1)(CheckpointEvaluator)
        cfg_json = json.loads(self.cfg.model_dump_json())
        self._actors = [cls.remote(cfg_json, self.hold_s) for _ in range(self.dt.actors)]
        self._tracker = Tracker.open(self.cfg, storage.join(self.train_root, "tensorboard", "checkpoint_eval"),
                                     run_id=self.run_id, role="checkpoint_eval",
                                     rank_zero_only=False)
        self._thread = threading.Thread(target=self._run, name="longctx-checkpoint-eval", daemon=True)
        self._thread.start()
        log.info("evaluating every committed checkpoint under %s (ledger %s)", self.train_root, self.ledger)
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.poll()
                self._stop.wait(self.dt.poll_s)
        except BaseException as exc:  # surfaced by finish(); training itself is never interrupted by it
            log.exception("checkpoint evaluation failed")
            self.error = exc

    def pending(self) -> list[tuple[int, str]]:
        """Committed snapshots not yet in the ledger; snapshots already recorded are removed (unless kept)."""
        done = self.done_steps()
        out = []
        for step, uri in committed_eval_snapshots(self.train_root):
            if step in done:
                if not self.dt.keep_snapshots and step not in self._inflight:
                    storage.remove_tree(uri)  # by exact key (the run folder's name may hold `*?[`)
            else:
                out.append((step, uri))
        return out

    def poll(self, wait_s: float = 0.0) -> bool:
        """Collect finished evaluations and start pending ones on idle actors (lowest step first); True while
        work is in flight or pending."""
        import ray  # deferred: heavy import, used only here

        if self._inflight:
            refs = {ref: step for step, (_, _, ref) in self._inflight.items()}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
            for ref in sorted(ready, key=lambda r: refs[r]):
                step = refs[ref]
                uri, _, _ = self._inflight.pop(step)
                self._record(step, uri, ray.get(ref))
        todo = [(s, u) for s, u in self.pending() if s not in self._inflight]
        busy = {id(actor) for _, actor, _ in self._inflight.values()}
        idle = [a for a in self._actors if id(a) not in busy]
        for (step, uri), actor in zip(todo, idle):
            self._inflight[step] = (uri, actor, actor.evaluate.remote(uri))
        return bool(self._inflight) or bool(todo)

    def _record(self, step: int, uri: str, rec: dict) -> None:
        if step in self.done_steps():
            return
        rec["snapshot"] = uri
        self.records = sorted([*self.records, rec], key=lambda r: r["step"])
        write_ledger(self.ledger, self.records)
        self.evaluated.append(step)
        if self._tracker is not None:
            self._tracker.log(checkpoint_eval_scalars(rec), step)
            self._tracker.flush()
        print(f"[eval] checkpoint step {step} ({rec['tokens']:,} tokens): "
              f"NLL beyond base {_fmt(rec.get('nll_beyond_base'))}, passkey {_fmt(rec.get('passkey'))}"
              + (f", needle {_fmt(rec.get('needle'))}" if "needle" in rec else "")
              + f" ({rec['eval_s']:.1f}s)", flush=True)

    def finish(self, drain: bool = True, timeout_s: float | None = None) -> list[dict]:
        """Stop polling; with `drain`, evaluate every committed snapshot still pending (the final checkpoint).
        Writes the plot beside the ledger and returns all records of the run."""
        import ray  # deferred: heavy import, used only here

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"eval.during_training failed: {self.error}") from self.error
        deadline = None if timeout_s is None else time.time() + timeout_s
        if drain:
            while self.poll(wait_s=1.0):
                if deadline is not None and time.time() > deadline:
                    log.warning("eval.during_training: stopped draining after %.0fs; pending checkpoints are "
                                "evaluated when the run is resumed", timeout_s)
                    break
            self.pending()  # removes the last evaluated snapshot
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        if self.records:
            storage.write_bytes(storage.join(self.train_root, PLOT), plot_checkpoint_eval(self.records))
        return self.records


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------------------------------------- report
def plot_checkpoint_eval(records: list[dict]) -> bytes:
    """PNG: retrieval (passkey, needle) and NLL beyond the base length against tokens trained."""
    from longctx.report.plots import STYLE, png_bytes, plt  # deferred: pulls in matplotlib, used only here

    tokens = [r["tokens"] for r in records]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        # needle: NeedleBench's 0-100 score, drawn as a fraction on the same 0-1 axis as passkey accuracy
        for key, label, style, scale in (("passkey", "passkey accuracy", "o-", 1.0),
                                         ("needle", "needle score / 100", "s-", 0.01)):
            pts = [(t, scale * r[key]) for t, r in zip(tokens, records) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xlabel("tokens trained")
        ax.set_ylabel("retrieval (0-1)")
        ax.set_ylim(-0.05, 1.05)
        ax2 = ax.twinx()
        pts = [(t, r["nll_beyond_base"]) for t, r in zip(tokens, records)
               if r.get("nll_beyond_base") is not None and math.isfinite(r["nll_beyond_base"])]
        if pts:
            ax2.plot(*zip(*pts), "^--", color="tab:red", label="NLL beyond base")
        ax2.set_ylabel("NLL beyond base (nats)", color="tab:red")
        ax2.grid(False)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="best", fontsize=8)
        ax.set_title("Retrieval and NLL beyond base vs tokens trained")
        return png_bytes(fig)


def checkpoint_eval_section(records: list[dict], plot_name: str | None = None) -> str:
    """Markdown table of the per-checkpoint evaluations (for a run report)."""
    if not records:
        return "No checkpoint was evaluated during training.\n"
    lines = ([f"![retrieval and NLL beyond base vs tokens trained]({plot_name})\n"] if plot_name else []) + [
        "| step | tokens trained | NLL within base | NLL beyond base | passkey | needle | eval s |",
        "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['step']} | {r['tokens']:,} | {_fmt(r.get('nll_within_base'))} | "
                     f"{_fmt(r.get('nll_beyond_base'))} | {_fmt(r.get('passkey'))} | {_fmt(r.get('needle'))} | "
                     f"{r.get('eval_s', 0):.1f} |")
    return "\n".join(lines) + "\n"


def start_watcher(cfg, train_root: str, *, run_id: str, hold_s: float | None = None) -> CheckpointWatcher | None:
    """The watcher for a training run when `eval.during_training.enabled`, started; else None."""
    if not cfg.eval.during_training.enabled:
        return None
    return CheckpointWatcher(cfg, train_root, run_id=run_id, hold_s=hold_s).start()
