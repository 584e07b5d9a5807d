"""The papers' orderings, measured side by side on a laptop: `jobs/study.py` / `longctx study`.

    from longctx.runs.study import run_study
    report = run_study(load_config(None), "runs/study", steps=10, seeds=3)   # parts a, b, c, d, e

Parts (letters as in docs/study.md):
  a. training-free baselines (naive, PI, dynamic NTK, YaRN) vs Long-PT (one trial per training seed,
     `a-long-pt-s<k>`): NLL beyond base, passkey and RULER NIAH at 4x base;
  b. Fu et al.'s data strategies on a per-source long-tailed corpus (`data.synthetic.longtail`), same token
     budget: per-source upsampling vs global upsampling vs cut at the base length, one trial per strategy and
     seed (`b-<strategy>-s<k>`); NLL beyond base per source;
  c. LongSkywork's long-SFT stage: part a's Long-PT model (seed 0), then two short Long-SFT runs on the
     platform's own synthetic retrieval (passkey, key-value, multi-needle) and SynL table conversations at
     lengths between the base length and the training length, one rendered with the chat template and one as
     plain text (the format of the passkey and RULER prompts); passkey, RULER NIAH and needle at 4x base,
     before and after;
  d. Index's RoPE base sweep around the `rope suggest` bound: NLL beyond base per base;
  e. Fu et al.'s data-quantity curve: passkey and NLL beyond base vs tokens trained, from part a's run with
     `eval.during_training` on.

The study folder is a run (config, attempts, one driver's lease) and every trial a sub-run of it,
`trials/<name>/`, through the same steps as a job (`longctx.runs.steps`): its data is checked against the trial
(the handoff check), and running the same study again resumes it (finished trials are kept, a changed setting is
refused, naming the keys). Every trial saves its evaluation (`trials/<name>/eval/metrics.json`, and part e's
`checkpoint_eval.jsonl`) and `train_summary.json`; `study.json` holds the numbers taken from them and the
verdicts computed from those (`longctx.runs.study_report`), so anyone can recompute the report from the saved
per-trial metrics. Every evaluation saves its per-item results (documents, prompts), so each verdict is decided
by 95% bootstrap intervals (paired over items, two-level over seeds x items; `longctx.runs.study_verdicts`):
held, did not hold or undecided. The report's first lines count each kind and state every verdict with its
numbers and intervals; an ordering that failed or could not be decided is never hidden. Two tiers: the full
study (`--seeds 3`) and `--quick` (one seed, fewer steps and prompts: what CI's shortened study runs).
"""


from __future__ import annotations

import gzip
import json
import math
import sys
import time
from typing import Any, Callable

from longctx import storage
from longctx.config import ConfigError, JobConfig, load_config
from longctx.runs.handoff import PreparedDataMismatch
from longctx.model.rope import suggest_rope_base
from longctx.runs.folder import DATA_DIR, SYNTH_DIR, RunContext, open_run
from longctx.runs.identity import ResumeRefused
from longctx.runs.steps import connect_ray, evaluate_step, finish, prepare_step, setup_logging, train_step
from longctx.runs.study_args import FULL, NIAH_TASKS, QUICK
from longctx.runs.study_report import PLAN, STRATEGIES, STUDY_JSON, trial_numbers, verdicts, write_study_report

# NOTE: importing this module (for `run_study`, or `longctx study` once its options are parsed: the parser is in
# `longctx.runs.study_args`) brings torch through `runs.steps`; Ray, Ray Data and transformers (seconds more) are
# imported inside the functions that run the study, so a usage error or a refused resume is reported without them.

TRIAL_SUMMARY = "train_summary.json"
TRIALS = "trials"




def _cfg(base: JobConfig, **updates: Any) -> JobConfig:
    """A copy of `base` with dotted-path updates (validated like a config file)."""
    tree = json.loads(base.model_dump_json())
    for path, value in updates.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return JobConfig.model_validate(tree)


# ----------------------------------------------------------------------------------------------- trials
def _hint(root: str) -> str:
    return (f"The study in {root} was run with other settings: run it again with those, or choose another "
            f"--output for a new study.")


def _sub_run(study: RunContext, cfg: JobConfig, name: str) -> RunContext:
    return open_run(cfg, "study-trial", root=storage.join(study.root, TRIALS, name), run_id=name,
                    owned_by=study.root, hint=_hint(study.root))


def _trial(study: RunContext, cfg: JobConfig, name: str, data_uri: str, *, data: str = "pt",
           specs: Callable[[str], dict] | None = None, eval_cfg: JobConfig | None = None) -> tuple[dict, dict]:
    """One trial as a sub-run `trials/<name>/`: its data at `data_uri` (prepared, or reused after the handoff
    check), training, and the evaluation of `specs(final_model_uri)` under `eval_cfg` (default: the trial's
    config). A finished trial is kept. Returns (train summary, data manifest)."""
    run = _sub_run(study, cfg, name)
    if run.finished:
        from longctx.data.pipeline import load_manifest  # deferred: see the NOTE at the imports

        return json.loads(storage.read_text(run.path(TRIAL_SUMMARY))), load_manifest(data_uri)
    t0 = time.time()
    uri, manifest = prepare_step(run, run.cfg, data, uri=data_uri)
    out = train_step(run, run.cfg, uri)
    if specs is not None:
        evaluate_step(run, eval_cfg or run.cfg, specs(out.final_model_uri))
    summary = {"steps": out.steps, "tokens": out.tokens, "final_loss": out.final_loss,
               "final_model": out.final_model_uri, "seconds": round(time.time() - t0, 1)}
    finish(run, summary, metrics_name=TRIAL_SUMMARY)
    return summary, manifest




# Part c's plain-text format: each turn's text on its own line, no role markers (what the passkey and RULER
# prompts look like); the loss still covers only the answers. Prefix-stable, as Long-SFT's masking needs.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] != 'assistant' %}{{ '\\n' }}{% endif %}"
                  "{% endfor %}")
SFT_FORMATS = {"chat": "Long-PT + long-SFT (chat)", "plain": "Long-PT + long-SFT (plain text)"}


def _long_sft(study: RunContext, base: JobConfig, long_pt_model: str, sft_steps: int, base_len: int,
              pk_len: int, e_updates: dict) -> dict:
    """Part c: synthetic retrieval + SynL table conversations (between the base length and the training length),
    two Long-SFT runs of `sft_steps` from `long_pt_model` on the same conversations, one rendered with the chat
    template (`c-long-sft-chat`) and one as plain text (`c-long-sft-plain`), and passkey, needle and RULER NIAH
    (`e_updates`) at `pk_len` before and after. Returns what the SFT data holds (for the report)."""
    from longctx.data.pipeline import load_manifest  # deferred: see the NOTE at the imports
    from longctx.data.synthetic import synth_retrieval, synth_tables  # deferred: likewise
    from longctx.eval.runner import ModelSpec  # deferred: likewise

    root = study.root
    seq_len = base.data.seq_len
    rows = sft_steps * max(1, base.train.global_batch_tokens // seq_len)
    synth_out = storage.join(root, SYNTH_DIR)
    s_cfg = _cfg(base, **{
        "synth.output": synth_out, "synth.seed": base.train.seed,
        # about two conversations per packed row (lengths spread over [base, seq_len]), retrieval twice the tables
        "synth.retrieval.num_samples": max(4, 2 * rows), "synth.retrieval.min_tokens": base_len,
        "synth.retrieval.max_tokens": seq_len, "synth.retrieval.haystack_max_chars": 2_000_000,
        "synth.tables.num_samples": max(2, rows), "synth.tables.min_tokens": base_len,
        "synth.tables.max_tokens": seq_len})
    sets = {}
    for kind, fn in (("retrieval", synth_retrieval), ("tables", synth_tables)):
        uri = storage.join(synth_out, kind)
        sets[kind] = load_manifest(uri) if storage.is_committed(uri) else fn(s_cfg)
    sft_cfg = _cfg(s_cfg, **{
        "model.path": long_pt_model, "train.max_steps": sft_steps, "train.epochs": 2, "train.checkpoint_every": 0,
        "train.lr": base.train.lr / 2,  # Index: Long-SFT at half the Long-PT learning rate
        "data.sources": {"retrieval": storage.join(synth_out, "retrieval", "part-*.jsonl"),
                         "synl": storage.join(synth_out, "tables", "part-*.jsonl")},
        "data.sft.mix": {"retrieval": 2 / 3, "synl": 1 / 3}, "data.token_budget": None})
    e_cfg = _cfg(base, **{"eval.passkey.lengths": [pk_len], "eval.needle.enabled": True,
                          "eval.needle.lengths": [pk_len], "eval.perplexity": False, "eval.baselines": [],
                          **e_updates})
    plain_uri = storage.join(root, "sft-plain.jinja")
    storage.write_text(plain_uri, PLAIN_TEMPLATE)
    out: dict[str, dict] = {}
    for fmt, label in SFT_FORMATS.items():
        f_cfg = sft_cfg if fmt == "chat" else _cfg(sft_cfg, **{"data.sft.chat_template": plain_uri})

        def specs(final, fmt=fmt, label=label):  # Long-PT itself is evaluated once, beside the chat model
            before = {"Long-PT": ModelSpec(long_pt_model, role="long_pt")} if fmt == "chat" else {}
            return {**before, label: ModelSpec(final, role=f"long_sft_{fmt}")}

        summary, manifest = _trial(study, f_cfg, f"c-long-sft-{fmt}", storage.join(root, DATA_DIR, f"long-sft-{fmt}"),
                                   data="sft", specs=specs, eval_cfg=e_cfg)
        totals = manifest.get("totals", {})
        out[fmt] = {"conversations": manifest.get("conversations"), "rows": totals.get("rows"),
                    "loss_tokens": totals.get("loss_tokens"), "steps": summary["steps"],
                    "final_loss": summary["final_loss"]}
    return {**out["chat"], "formats": out,
            "samples": {k: v.get("totals", {}).get("samples", v.get("totals", {}).get("records"))
                        for k, v in sets.items()}}




def _heldout_by_source(cfg: JobConfig, root: str, sources: list[str]) -> dict[str, str]:
    """Per-source held-out files (eval.documents split on its `source` field)."""
    raw = storage.read_bytes(cfg.eval.documents)
    text = gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode()
    out = {}
    for src in sources:
        lines = [ln for ln in text.splitlines() if ln.strip() and json.loads(ln).get("source") == src]
        if not lines:
            raise ValueError(f"{cfg.eval.documents}: no held-out document of source {src!r} (records need a "
                             f"'source' field)")
        uri = storage.join(root, "heldout", f"{src}.jsonl")
        storage.write_text(uri, "\n".join(lines) + "\n")
        out[src] = uri
    return out



def run_study(cfg: JobConfig, out_dir: str, *, steps: int = 40, parts: str = "abcde",
              rope_factors: tuple[float, ...] = (0.1, 1.0, 10.0), corpus_max_documents: int | None = None,
              eval_documents: int | None = None, sft_steps: int | None = None, seeds: int = 1,
              niah_samples: int = 25, passkey_trials: int | None = None) -> dict:
    """Run the study's parts into `out_dir`; returns {"verdicts", "numbers", "report"}. Part c trains
    `sft_steps` Long-SFT steps (default: half of `steps`, at least 1) from part a's model. Part a's Long-PT and
    part b's trials run once per training seed (`seeds`: data.seed and train.seed + 0, 1, ...; trial names end in
    `-s<k>`). RULER's NIAH tasks (`NIAH_TASKS`, `niah_samples` each; 0: off) run at 4x the base length beside
    passkey in parts a and c; `passkey_trials` per depth sets the number of passkey prompts (default: the
    config's eval.passkey.trials). Running it again into the same folder resumes it: finished trials are kept; other
    settings are refused, naming them."""
    setup_logging()
    root = storage.normalize(out_dir)
    study = open_run(cfg, "study", root=root, run_id=root.rstrip("/").rsplit("/", 1)[-1], hint=_hint(root))
    try:
        args = {"steps": steps, "corpus_max_documents": corpus_max_documents, "eval_documents": eval_documents,
                "sft_steps": sft_steps, "seeds": seeds, "niah_samples": niah_samples, "passkey_trials": passkey_trials}
        _check_same_study(root, args)
        connect_ray(study.cfg)
        return _run_parts(study, args, parts, rope_factors)
    finally:
        study.close()


def _check_same_study(root: str, args: dict) -> None:
    """The trials' configs carry most study options (a changed one is refused by the trial's own check); the
    long-tailed corpus of part b is rebuilt in place, so its size is compared here."""
    uri = storage.join(root, PLAN)
    old = json.loads(storage.read_text(uri)).get("args") if storage.exists(uri) else None
    diffs = [f"--{k.replace('_', '-')}: {old[k]} -> {v}" for k, v in args.items() if old and k in old and old[k] != v]
    if diffs:
        raise ResumeRefused(f"{uri} records other study options ({'; '.join(diffs)}). {_hint(root)}")


def _run_parts(study: RunContext, args: dict, parts: str, rope_factors: tuple[float, ...]) -> dict:
    from longctx.data.synthetic.longtail import build_long_tailed_corpus  # deferred: see the NOTE at the imports
    from longctx.eval.runner import ModelSpec, default_model_specs, eval_lengths  # deferred: likewise

    cfg, root, steps = study.cfg, study.root, args["steps"]
    t_start = time.time()
    context, base_len = eval_lengths(cfg, cfg.model.path)
    pk_len = 4 * base_len
    common = {"train.max_steps": steps, "train.checkpoint_every": 0, "eval.context_length": context,
              "eval.base_context_length": base_len, "eval.passkey.lengths": [pk_len],
              "eval.scaling_factor": context / base_len}
    if args["eval_documents"]:
        common["eval.num_documents"] = args["eval_documents"]
    if args["passkey_trials"]:
        common["eval.passkey.trials"] = args["passkey_trials"]
    base = _cfg(cfg, **common)
    head_dim = _head_dim(cfg.model.path)
    bound = suggest_rope_base(head_dim, base_len, context)["base_lower_bound"]
    seeds = list(range(args["seeds"]))
    plan: dict[str, Any] = {"parts": parts, "steps": steps, "context_length": context, "base_length": base_len,
                            "passkey_length": pk_len, "rope_bound": bound, "seed": cfg.train.seed, "sources": [],
                            "rope_trials": {}, "timings_s": {}, "args": args, "seeds": seeds,
                            "a_trials": {}, "b_models": {},
                            "niah_tasks": list(NIAH_TASKS) if args["niah_samples"] else []}
    # RULER's NIAH at 4x base beside passkey (parts a and c): answers are 7-digit numbers, so 16 tokens suffice
    niah = {"eval.ruler.enabled": True, "eval.ruler.lengths": [pk_len], "eval.ruler.tasks": list(NIAH_TASKS),
            "eval.ruler.num_samples": args["niah_samples"], "eval.ruler.tokens_to_generate": {"niah": 16}} \
        if args["niah_samples"] else {}
    storage.write_json(storage.join(root, PLAN), plan)
    timings = plan["timings_s"]

    data_uri = None
    if set(parts) & set("acde"):
        t0 = time.time()
        data_uri, _ = prepare_step(study, base, uri=storage.join(root, DATA_DIR, "default"))
        timings["data_default"] = round(time.time() - t0, 1)
    if "a" in parts or "c" in parts or "e" in parts:
        t0 = time.time()
        for k in seeds:  # seed 0 (the config's seeds) also evaluates the baselines and runs part e's checkpoints
            baselines = ["naive", "pi", "dynamic_ntk", "yarn"] if k == 0 else []
            a_cfg = _cfg(_seeded(base, k), **{"eval.baselines": baselines,
                                              "train.checkpoint_every": max(1, steps // 4),
                                              "eval.during_training.enabled": "e" in parts and k == 0,
                                              "eval.during_training.passkey_lengths": [pk_len],
                                              "eval.during_training.num_documents": min(8, base.eval.num_documents),
                                              **niah})
            k_uri = data_uri if k == 0 else storage.join(root, DATA_DIR, f"default-s{k}")  # prepared by the trial
            out, _ = _trial(study, a_cfg, f"a-long-pt-s{k}", k_uri,
                            specs=lambda final, c=a_cfg: default_model_specs(c, c.model.path, final))
            plan["a_trials"][str(k)] = f"a-long-pt-s{k}"
            timings[f"a_s{k}"] = out["seconds"]
            if k == 0:
                a_out = out
        timings["a"] = round(time.time() - t0, 1)
    if "c" in parts:
        t0 = time.time()
        plan["sft_steps"] = args["sft_steps"] or max(1, steps // 2)
        plan["c_data"] = _long_sft(study, base, a_out["final_model"], plan["sft_steps"], base_len, pk_len, niah)
        timings["c"] = round(time.time() - t0, 1)
    if "b" in parts:
        t0 = time.time()
        stats = build_long_tailed_corpus(storage.join(root, "corpus"), seed=cfg.data.seed,
                                         max_documents=args["corpus_max_documents"], short_max_tokens=base_len)
        plan["corpus"] = stats
        sources = sorted(stats["sources"])
        plan["sources"] = sources
        budget = int(1.25 * steps * base.train.global_batch_tokens)  # every strategy trains `steps` full steps
        finals = {}
        for label, strategy in STRATEGIES.items():
            for k in seeds:  # the seed also draws the upsampling (data.seed), so each seed has its own data
                s_cfg = _cfg(_seeded(base, k), **{"data.sources": {s: stats["sources"][s]["uri"] for s in sources},
                                                  "data.strategy": strategy, "data.cut_len": base_len,
                                                  "data.token_budget": budget})
                out, manifest = _trial(study, s_cfg, f"b-{label}-s{k}", storage.join(root, DATA_DIR, f"{label}-s{k}"))
                if k == 0:
                    plan.setdefault("b_data", {})[label] = {
                        s: {"long_share_in": v.get("in", {}).get("long_share"),
                            "long_share_out": v.get("out", {}).get("long_share"), "share_out": v.get("out_share")}
                        for s, v in manifest.get("sources", {}).items()}
                name = label if len(seeds) == 1 else f"{label} s{k}"
                finals[name] = out["final_model"]
                plan["b_models"][name] = {"strategy": label, "seed": k}
                timings[f"b-{label}-s{k}"] = out["seconds"]
        held = _heldout_by_source(base, root, sources)
        b_run = _sub_run(study, base, "b-strategies")  # one evaluation per source of the three trials' models
        if not b_run.finished:
            for i, src in enumerate(sources):
                e_cfg = _cfg(base, **{"eval.documents": held[src], "eval.passkey.enabled": i == 0,
                                      "eval.num_documents": min(base.eval.num_documents, 16)})
                specs = {name: ModelSpec(uri, role=plan["b_models"][name]["strategy"]) for name, uri in finals.items()}
                evaluate_step(b_run, e_cfg, specs, out=b_run.path(f"eval-{src}"))
            finish(b_run, {"models": finals, "sources": sources})
        timings["b"] = round(time.time() - t0, 1)
    if "d" in parts:
        t0 = time.time()
        thetas = {rope_grid_point(bound, f) for f in rope_factors}
        if "a" in parts and cfg.model.rope_theta:
            plan["rope_trials"][f"{cfg.model.rope_theta:g}"] = "a-long-pt-s0"  # part a's run is one point
            thetas.discard(float(cfg.model.rope_theta))
        for theta in sorted(thetas):
            name = f"d-rope-{theta:g}"
            d_cfg = _cfg(base, **{"model.rope_theta": theta})
            summary, _ = _trial(study, d_cfg, name, data_uri,
                                specs=lambda final: {"Long-PT": ModelSpec(final, role="trained")})
            timings[name] = summary["seconds"]
            plan["rope_trials"][f"{theta:g}"] = name
        timings["d"] = round(time.time() - t0, 1)
    timings["total"] = round(time.time() - t_start, 1)
    storage.write_json(storage.join(root, PLAN), plan)
    nums = trial_numbers(root)
    verdict = verdicts(nums)
    storage.write_json(storage.join(root, STUDY_JSON), {"numbers": nums, "verdicts": verdict})
    report = write_study_report(root, nums, verdict)
    print(f"[longctx] study report: {report}", flush=True)
    return {"verdicts": verdict, "numbers": nums, "report": report}


def _seeded(cfg: JobConfig, k: int) -> JobConfig:
    """Training seed k of a trial: data.seed and train.seed moved by k (k = 0: the config as it is). The data
    seed is the one that matters: it orders the packed rows (and draws part b's upsampling); train.seed only
    seeds torch, and the models train from the same base with no dropout."""
    return cfg if k == 0 else _cfg(cfg, **{"data.seed": cfg.data.seed + k, "train.seed": cfg.train.seed + k})


def rope_grid_point(bound: float, factor: float) -> float:
    """bound x factor rounded *up* to 4 significant digits: the point at factor 1 is never below the bound (a
    rounded-down 1.138e5 under a 1.1383e5 bound would fail the sweep's verdict by rounding alone)."""
    x = bound * factor
    e = math.floor(math.log10(x)) - 3
    return float(f"{math.ceil(x / 10 ** e - 1e-9) * 10 ** e:.6g}")


def _head_dim(model_uri: str) -> int:
    from transformers import AutoConfig  # deferred: see the NOTE at the imports

    from longctx.model.load import local_model_dir  # deferred: likewise (imports transformers)

    c = AutoConfig.from_pretrained(local_model_dir(model_uri))
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)



# -------------------------------------------------------------------------------------------------- command
def run_from_args(args) -> int:
    """Run the study from parsed `add_study_args` options; 2 on a usage error or a refused resume."""
    for k, v in {**FULL, **(QUICK if args.quick else {})}.items():  # the tier's values where not given
        if getattr(args, k) is None:
            setattr(args, k, v)
    bad = set(args.parts) - set("abcde")
    if bad or args.steps < 1 or (args.sft_steps is not None and args.sft_steps < 1) or args.eval_documents < 0 \
            or args.corpus_max_documents < 0 or args.seeds < 1 or args.niah_samples < 0 or args.passkey_trials < 1:
        print(f"study: --parts takes letters from 'abcde' (got {args.parts!r}); --steps, --sft-steps, --seeds "
              "and --passkey-trials >= 1; --eval-documents, --corpus-max-documents and --niah-samples >= 0",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        factors = tuple(float(x) for x in args.rope_factors.split(",") if x.strip())
    except (ConfigError, ValueError) as e:
        print(f"study: {e}", file=sys.stderr)
        return 2
    try:
        out = run_study(cfg, args.output, steps=args.steps, parts=args.parts, rope_factors=factors,
                        corpus_max_documents=args.corpus_max_documents or None,
                        eval_documents=args.eval_documents or None, sft_steps=args.sft_steps or 2 * args.steps,
                        seeds=args.seeds, niah_samples=args.niah_samples, passkey_trials=args.passkey_trials)
    except (ConfigError, PreparedDataMismatch) as e:  # a refused resume, or data that does not fit a trial
        print(f"study: {e}", file=sys.stderr)
        return 2
    for v in out["verdicts"]:
        print(f"[study] {v['status'].upper()}: {v['target']} -- {v['detail']}")
    print(out["report"])
    return 0
