"""longctx: extend a pretrained LLM's context window on Ray (data engineering, Long-PT/Long-SFT, evaluation).

Public entry points live in the submodules jobs import: `longctx.config`, `longctx.storage`,
`longctx.data.pipeline`, `longctx.train.trainer`, `longctx.eval.runner`, `longctx.cli`.
"""

__version__ = "0.1.0"
