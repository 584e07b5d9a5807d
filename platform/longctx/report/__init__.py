"""Run reports: `report.md` with markdown tables and a verdict, plus PNG plots, written to a run folder.

    from longctx.report import write_report
    path = write_report("runs/x", metrics, [("Data", data_md), ("Training", train_md)])

`metrics` is what `longctx.eval.runner.evaluate_models` returns (or a dict holding it under "eval"); the
run folder may be local or s3:// (everything goes through `longctx.storage`).
"""

from longctx.report.markdown import eval_markdown, verdict, write_report

__all__ = ["eval_markdown", "verdict", "write_report"]
