"""Long-context evaluation: perplexity by position, passkey, needle grid, LongBench/LEval-format tasks, RULER,
InfiniteBench.

Entry points (everything else is internal):

    from longctx.eval.runner import ModelSpec, default_model_specs, evaluate_models
    specs = default_model_specs(cfg, base_uri, trained_uri)          # base (naive), + PI / dynamic NTK / YaRN, Long-PT
    metrics = evaluate_models(cfg, specs, out_dir)                    # Ray Data actors; writes out_dir/metrics.json
    from longctx.report import write_report
    write_report(run_dir, metrics, [("Training", md)])                # report.md + PNGs

Plain functions without Ray, for notebooks and tests: `perplexity.perplexity_by_position`,
`passkey.build_passkey_prompts` / `passkey.run_passkey`, `generate.greedy_generate`,
`ruler.evaluate.evaluate_ruler` (RULER at one length).
"""
