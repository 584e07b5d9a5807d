"""RULER (NVIDIA/RULER, commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a): its 13 synthetic tasks generated at any
length with the evaluated model's tokenizer, in RULER's own formats, and scored by RULER's rules.

    from longctx.eval.ruler.generate import generate_ruler, write_ruler_samples
    samples = generate_ruler(tokenizer, cfg.eval.ruler, [4096, 8192])        # {length: {task: RULER rows}}
    from longctx.eval.ruler.score import score_ruler_rows
    score_ruler_rows(rows)                                                   # {task: score}, RULER's string match
    from longctx.eval.ruler.evaluate import evaluate_ruler
    evaluate_ruler(model, tokenizer, 4096, cfg.eval.ruler)                   # {task: score} at one length, no Ray

Modules: `constants` (RULER's templates and task table), `words` (word lists, zeta, sentence splitter),
`synthetic` (niah, variable tracking), `aggregation` (cwe, fwe), `qa` (SQuAD / HotpotQA), `generate` (tasks,
lengths, JSONL), `score` (post-processing, string match, averages), `suite` (inside `longctx eval run`),
`evaluate` (one model, no Ray). Portions are ported from NVIDIA/RULER under the Apache License 2.0; each
such module says which file it follows.
"""
