"""The `longctx` console script: one table of verbs, each a thin call into the library.

    longctx data prepare --config jobs/configs/tiny.yaml --set data.output=s3://bucket/packed/
    longctx data stats   --config FILE
    longctx data synth   cip|tables|retrieval --config FILE [--output URI] [--packed URI]
    longctx data clean   [--path FOLDER] [--prefix S3_URI]  (leftovers of killed runs and overwrites)
    longctx train        --config FILE            (same as jobs/long_pt.py; the same command again resumes the run)
    longctx sft          --config FILE            (same as jobs/long_sft.py)
    longctx eval run     --config FILE --set eval.model=URI
    longctx eval score   --predictions preds.jsonl --output scores.json   (LongBench, RULER or InfiniteBench rows)
    longctx eval ruler generate --config FILE --set eval.ruler.lengths=[4096,8192] --output DIR
    longctx tune         --config jobs/configs/sweep-rope-budget.yaml   (same as jobs/sweep.py; resumes by name)
    longctx rope suggest --head-dim 128 --train-len 4096 --target-len 32768
    longctx plan         --config FILE [--gpu h100] [--max-seq-len] [--json]   (memory per GPU, FLOPs, step time)
    longctx config show     --config FILE
    longctx config validate --config FILE [--kind pt|sft|eval|prepare|sweep]   (the job's checks before Ray)
    longctx config schema   [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from longctx import quiet


def _add_config_args(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    from longctx.config import EMBEDDED_DEFAULT  # deferred: CLI start-up time
    from longctx.jobargs import add_config_args  # deferred: CLI start-up time

    add_config_args(p, default_config or EMBEDDED_DEFAULT)


def _load(args, kind: str | None = None):
    """The config of `args`; with `kind`, also the checks that job runs before Ray starts (longctx.preflight)."""
    from longctx.config import load_config  # deferred: CLI start-up time

    cfg = load_config(args.config, args.overrides)
    if kind is not None:
        from longctx import preflight  # deferred: CLI start-up time

        preflight.require(cfg, kind)
    return cfg


def _cmd_data_prepare(args) -> int:
    from longctx.runs.recipes import prepare_summary, run_prepare  # deferred: CLI start-up time

    uri, manifest = run_prepare(_load(args, "prepare"), replace=args.overwrite)  # committed data is reused
    print(json.dumps(prepare_summary(manifest)))
    print(uri)
    return 0


def _cmd_data_stats(args) -> int:
    from longctx.data.pipeline import length_stats  # deferred: CLI start-up time
    from longctx.runs.steps import connect_ray  # deferred: CLI start-up time

    cfg = _load(args)
    connect_ray(cfg)
    length_stats(cfg)
    return 0


def _cmd_data_clean(args) -> int:
    import tempfile  # deferred: CLI start-up time

    from longctx import cleanup  # deferred: CLI start-up time

    removed = cleanup.remove_dead([args.tmp or tempfile.gettempdir(), *args.path])
    for path in removed:
        print(f"removed {path}")
    print(f"removed {len(removed)} folders of dead runs (folders of running ones are kept)")
    failed = 0
    if args.prefix:
        from longctx import storage  # deferred: CLI start-up time

        orphans = []
        for prefix in args.prefix:
            try:
                orphans += storage.remove_orphans(prefix)
            except storage.StorageError as e:  # e.g. its committed generation is incomplete: nothing removed
                print(f"longctx: {e}", file=sys.stderr)
                failed += 1
        for uri in orphans:
            print(f"removed {uri}")
        print(f"removed {len(orphans)} objects left by interrupted S3 overwrites")
    return 1 if failed else 0


def _cmd_data_synth(args) -> int:
    from longctx import storage  # deferred: CLI start-up time
    from longctx.runs.folder import SYNTH_DIR, open_run  # deferred: CLI start-up time
    from longctx.runs.steps import connect_ray  # deferred: CLI start-up time

    cfg = _load(args)
    run = None
    if not (args.output or cfg.synth.output):
        run = open_run(cfg, f"synth-{args.kind}")
    dest = args.output or storage.join(cfg.synth.output or run.path(SYNTH_DIR), args.kind)
    try:
        connect_ray(cfg)
        if args.kind == "cip":
            from longctx.data.synthetic.cip import synth_cip  # deferred: CLI start-up time

            result = synth_cip(cfg, dest, packed=args.packed)
            print(json.dumps({"uri": result["uri"], "rows": result["rows"], "cip": result["params"]["cip"]["rows"]}))
        else:
            from longctx.data.synthetic import retrieval, tables  # deferred: CLI start-up time

            fn = tables.synth_tables if args.kind == "tables" else retrieval.synth_retrieval
            result = fn(cfg, dest)
            print(json.dumps({"uri": result["uri"], **result["totals"], **result["timings"]}))
    finally:
        if run is not None:
            run.close()
    return 0


def _cmd_train(args) -> int:
    from longctx.runs.recipes import run_long_pt  # deferred: CLI start-up time

    cfg = _load(args, "pt")
    run_long_pt(cfg)
    return 0


def _cmd_sft(args) -> int:
    from longctx.runs.recipes import run_long_sft  # deferred: CLI start-up time

    run_long_sft(_load(args, "sft"))
    return 0


def _cmd_eval_run(args) -> int:
    cfg = _load(args, "eval")  # checks first: importing the runner imports torch
    from longctx.runs.recipes import run_eval  # deferred: CLI start-up time

    run_eval(cfg)
    return 0


def _cmd_eval_score(args) -> int:
    from longctx.eval.scoring import score_prediction_file  # deferred: CLI start-up time

    score_prediction_file(args.predictions, args.output)
    return 0


def _cmd_eval_ruler_generate(args) -> int:
    from longctx.eval.ruler.generate import iter_ruler, write_ruler_samples  # deferred: CLI start-up time
    from longctx.eval.ruler.suite import ruler_lengths  # deferred: CLI start-up time
    from longctx.eval.runner import ModelSpec, base_max_positions, tokenizer_uri  # deferred: CLI start-up time
    from longctx.model.load import load_tokenizer  # deferred: CLI start-up time

    cfg = _load(args)
    model = cfg.eval.model or cfg.model.path
    tok_uri = args.tokenizer or tokenizer_uri(ModelSpec(model), cfg)
    lengths = ruler_lengths(cfg.eval.ruler, cfg.eval.context_length or cfg.data.seq_len,
                            cfg.eval.base_context_length or base_max_positions(cfg.model.path))
    files = write_ruler_samples(args.output, iter_ruler(load_tokenizer(tok_uri), cfg.eval.ruler, lengths))
    print(f"wrote {len(files)} RULER files ({len(lengths)} lengths x {len(files) // max(1, len(lengths))} tasks, "
          f"{cfg.eval.ruler.num_samples} samples each, tokenizer {tok_uri}) under {args.output}")
    return 0


def _cmd_tune(args) -> int:
    from longctx.tune.sweep import run_sweep  # deferred: CLI start-up time

    summary = run_sweep(_load(args, "sweep"), fresh=args.fresh)
    if not summary["complete"]:
        return 3
    print(summary["results"])
    return 0


def _cmd_study(args) -> int:
    from longctx.runs.study import run_from_args  # deferred: CLI start-up time

    return run_from_args(args)


def _cmd_rope_suggest(args) -> int:
    from longctx.model.rope import suggest_rope_base  # deferred: CLI start-up time

    r = suggest_rope_base(args.head_dim, args.train_len, args.target_len)
    if args.target_len <= args.train_len:
        print(f"longctx: warning: --target-len {args.target_len} is not longer than --train-len {args.train_len}: "
              "nothing to extend, the model's own base already covers these positions; the bound below is only "
              "the formula's value (did you swap the two?)", file=sys.stderr)
    print(f"head_dim={r['head_dim']} train_len={r['train_len']} target_len={r['target_len']}")
    print(f"critical dimension d_c = {r['critical_dim']}")
    print(f"RoPE base lower bound (Liu et al. 2023, arXiv 2310.05209): {r['base_lower_bound']:.4g}")
    return 0


def _cmd_plan(args) -> int:
    from longctx.plan.planner import Planner  # deferred: CLI start-up time
    from longctx.plan.report import render  # deferred: CLI start-up time

    t0 = time.perf_counter()
    cfg = _load(args)
    if cfg.stages:  # a multi-stage recipe: every stage's plan, in order (each names its stage)
        from longctx.config import stage_config  # deferred: CLI start-up time

        for i, stage in enumerate(cfg.stages):
            print(f"stage {i + 1}/{len(cfg.stages)} {stage.name}:", file=sys.stderr if args.json else sys.stdout)
            code = _plan_one(stage_config(cfg, i), args, t0, Planner, render)
            if code:
                return code
        return 0
    return _plan_one(cfg, args, t0, Planner, render)


def _plan_one(cfg, args, t0, Planner, render) -> int:
    planner = Planner(cfg, gpu=args.gpu, mfu=args.mfu, gpus_per_node=args.gpus_per_node)
    plan = planner.max_seq_len() if args.max_seq_len else planner.plan()
    if plan is None:
        print(f"longctx plan: not even {planner.granularity():,} tokens per row fit this layout", file=sys.stderr)
        return 2
    nearest = planner.nearest_fit() if plan.fits is False else None
    if args.json:
        out = plan.as_json()
        if nearest:
            out["nearest_fit"] = {"changes": nearest[0], "total_gib": round(nearest[1].per_gpu_gib["total"], 3)}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(out))
    else:
        print(render(plan, cfg.model.path, cfg.train.num_workers, nearest))
    return 0


def _cmd_config(args) -> int:
    from longctx.config import dump_config, job_config_schema  # deferred: CLI start-up time

    if args.action == "schema":
        text = json.dumps(job_config_schema(), indent=2, sort_keys=True) + "\n"
        if args.output:
            from longctx import storage  # deferred: CLI start-up time

            storage.write_text(args.output, text)
            print(f"wrote {args.output}")
        else:
            sys.stdout.write(text)
        return 0
    if args.config is None:  # validate without --config: the embedded recipe of the job kind checked
        from longctx.config import EMBEDDED_DEFAULT, EMBEDDED_SFT_DEFAULT  # deferred: CLI start-up time

        args.config = EMBEDDED_SFT_DEFAULT if args.kind == "sft" else EMBEDDED_DEFAULT
    cfg = _load(args)
    if args.action == "show":
        sys.stdout.write(dump_config(cfg))
        return 0
    if not args.schema_only:
        from longctx import preflight  # deferred: CLI start-up time

        t0 = time.perf_counter()
        kind = args.kind or preflight.default_kind(cfg)
        preflight.require(cfg, kind, echo=False)  # PreflightError: every problem, exit 2
        print(f"{args.config}: valid for a {kind} job (schema, files, S3 access, layout, positions, attention "
              f"backend checked in {time.perf_counter() - t0:.1f}s)")
    else:
        print(f"{args.config}: valid (schema only)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from longctx import __version__  # deferred: CLI start-up time
    from longctx.config import EMBEDDED_SFT_DEFAULT  # deferred: CLI start-up time
    from longctx.jobargs import add_config_args  # deferred: CLI start-up time
    from longctx.plan.planner import DEFAULT_MFU  # deferred: CLI start-up time
    from longctx.train.gpus import PLAN_KINDS  # deferred: CLI start-up time

    parser = argparse.ArgumentParser(prog="longctx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"longctx {__version__}",
                        help="print the installed longctx version and exit")
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="prepare packed training data / corpus statistics")
    data_sub = data.add_subparsers(dest="action", required=True)
    for name, fn, help_ in [("prepare", _cmd_data_prepare, "tokenize, mix and pack into Parquet shards"),
                            ("stats", _cmd_data_stats, "per-source length statistics only")]:
        p = data_sub.add_parser(name, help=help_)
        _add_config_args(p)
        p.set_defaults(func=fn)
        if name == "prepare":
            p.add_argument("--overwrite", action="store_true", help="prepare again over an existing committed output")

    p = data_sub.add_parser("synth", help="synthetic long data: CIP-k packed rows, SynL tables or retrieval "
                            "instructions (chat JSONL for Long-SFT)")
    p.add_argument("kind", choices=["cip", "tables", "retrieval"],
                   help="cip: CIP-k packed rows; tables: SynL table QA; retrieval: retrieval instructions")
    _add_config_args(p)
    p.add_argument("--output", default=None, help="where to publish (default: synth.output/<kind>, else the run folder)")
    p.add_argument("--packed", default=None, help="cip: rewrite this committed packed folder instead of preparing "
                   "the configured corpus")
    p.set_defaults(func=_cmd_data_synth)

    p = data_sub.add_parser("clean", help="remove staging and token-cache folders left by killed runs")
    p.add_argument("--path", action="append", default=[], metavar="FOLDER",
                   help="also sweep .staging-* folders here (the parent of a local output; repeatable)")
    p.add_argument("--tmp", default=None, help="temp folder holding longctx-* work folders (default: the system's)")
    p.add_argument("--prefix", action="append", default=[], metavar="S3_URI",
                   help="also remove what interrupted overwrites left under this published s3:// prefix "
                        "(uncommitted generations, old files not yet deleted; repeatable)")
    p.set_defaults(func=_cmd_data_clean)

    train = verbs.add_parser("train", help="Long-PT: prepare data, train, evaluate (as jobs/long_pt.py)")
    _add_config_args(train)
    train.set_defaults(func=_cmd_train)

    sft = verbs.add_parser("sft", help="Long-SFT: chat data, loss on answers, from a Long-PT model (as jobs/long_sft.py)")
    _add_config_args(sft, EMBEDDED_SFT_DEFAULT)
    sft.set_defaults(func=_cmd_sft)

    ev = verbs.add_parser("eval", help="long-context evaluation")
    ev_sub = ev.add_subparsers(dest="action", required=True)
    p = ev_sub.add_parser("run", help="run the configured evaluations on eval.model")
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval_run)
    p = ev_sub.add_parser("score", help="score a predictions JSONL: LongBench, RULER or InfiniteBench rows")
    p.add_argument("--predictions", required=True,
                   help="JSONL (file, folder or s3:// prefix): LongBench rows (pred, answers, all_classes, dataset), "
                        "RULER rows (task, pred, outputs; RULER's <task>.jsonl files name their task) or InfiniteBench "
                        "rows (task, prediction, ground_truth; or preds_<task>.jsonl files)")
    p.add_argument("--output", required=True, help="where to write {dataset or task: score} JSON")
    p.set_defaults(func=_cmd_eval_score)
    ruler = ev_sub.add_parser("ruler", help="RULER tools")
    ruler_sub = ruler.add_subparsers(dest="ruler_action", required=True)
    p = ruler_sub.add_parser("generate", help="write RULER's samples (<output>/<length>/<task>.jsonl) with the "
                             "model's tokenizer")
    _add_config_args(p)
    p.add_argument("--output", required=True, help="folder (local or s3://) for <length>/<task>.jsonl")
    p.add_argument("--tokenizer", default=None, help="tokenizer to fit lengths with (default: eval.model's, else "
                   "model.path's, else data.tokenizer)")
    p.set_defaults(func=_cmd_eval_ruler_generate)

    tn = verbs.add_parser("tune", help="Ray Tune sweep of the Long-PT chain (as jobs/sweep.py)")
    _add_config_args(tn)
    tn.add_argument("--fresh", action="store_true", help="fail if a sweep of this name exists instead of resuming it")
    tn.set_defaults(func=_cmd_tune)

    from longctx.runs.study_args import add_study_args  # deferred: CLI start-up time

    st = verbs.add_parser("study", help="the papers' orderings side by side: baselines, data strategies, RoPE "
                          "sweep, retrieval vs tokens (as jobs/study.py)")
    add_study_args(st).set_defaults(func=_cmd_study)

    rope = verbs.add_parser("rope", help="RoPE tools")
    rope_sub = rope.add_subparsers(dest="action", required=True)
    p = rope_sub.add_parser("suggest", help="lower bound on the RoPE base for a target length (arXiv 2310.05209)")
    p.add_argument("--head-dim", type=int, required=True, help="attention head dimension (hidden_size / num_heads)")
    p.add_argument("--train-len", type=int, required=True, help="context length the model was pretrained at (tokens)")
    p.add_argument("--target-len", type=int, required=True, help="context length to extend to (tokens)")
    p.set_defaults(func=_cmd_rope_suggest)

    pl = verbs.add_parser("plan", help="will it fit? memory per GPU, CPU memory per node, FLOPs and step time of "
                          "the configured training job, from the model's config.json (no GPU, no weights, no Ray)")
    _add_config_args(pl)
    pl.add_argument("--gpu", choices=list(PLAN_KINDS), default=None,
                    help="GPU to plan for (default: train.gpu_type, a gpu_* marker in train.resources_per_worker, or "
                    "train.gpu_memory_gib); implies a GPU job")
    pl.add_argument("--max-seq-len", action="store_true", help="search the longest data.seq_len that fits this layout")
    pl.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    pl.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed MFU for step times (default %(default)s)")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, for CPU memory per node (default 8)")
    pl.set_defaults(func=_cmd_plan)

    conf = verbs.add_parser("config", help="show, validate or export the job config schema")
    conf_sub = conf.add_subparsers(dest="action", required=True)
    p = conf_sub.add_parser("show", help="print the resolved config (recipe + --set overrides, every default filled in)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)
    p = conf_sub.add_parser("validate", help="check a config as the job does before Ray starts: keys and values, "
                            "files and their first records, S3 access, batch layout, positions, attention backend")
    add_config_args(p, None, default_help="the embedded recipe of --kind: Long-SFT for sft, else Long-PT")
    p.add_argument("--kind", choices=["pt", "sft", "eval", "prepare", "sweep"], default=None,
                   help="the job to check for (default: sweep when tune.params is set, else pt); without --config "
                   "the embedded recipe of that kind is checked (the Long-SFT one for sft)")
    p.add_argument("--schema-only", action="store_true", help="check keys and values only")
    p.set_defaults(func=_cmd_config)
    p = conf_sub.add_parser("schema", help="export the JSON Schema of job configs")
    p.add_argument("--output", default=None, help="write here (local or s3://) instead of stdout")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from longctx.jobargs import exit_code  # deferred: CLI start-up time

    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        quiet.set_verbose()
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - one line and an exit code for what the user must fix
        code = exit_code(e)
        if code is None:
            raise
        print(f"longctx: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
