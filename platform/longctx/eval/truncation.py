"""Middle truncation of over-long prompts (LongBench's pred.py rule, Index's OpenCompass fix).

    ids = middle_truncate(tokenizer(prompt)["input_ids"], max_prompt_len=max_seq_len - max_new_tokens)

The prompt is tokenized whole, without truncation; when it is longer than max_prompt_len, its first and
last max_prompt_len // 2 token ids are kept (ids are cut, not text). The instruction at the start and the
question at the end survive; the middle of the context goes. Cutting from the left or right instead would
drop the instruction or the question and measure nothing.
"""

from __future__ import annotations

from typing import Sequence


def max_prompt_len(max_seq_len: int, max_new_tokens: int) -> int:
    """Prompt budget: the context window minus the tokens the answer may take."""
    budget = int(max_seq_len) - int(max_new_tokens)
    if budget < 2:
        raise ValueError(
            f"max_seq_len={max_seq_len} leaves no room for a prompt after max_new_tokens={max_new_tokens}; "
            "raise eval.longbench.max_seq_len"
        )
    return budget


def middle_truncate(ids: Sequence[int], max_len: int) -> list[int]:
    """`ids` unchanged if it fits, else its first and last max_len // 2 ids."""
    ids = list(ids)
    if len(ids) <= max_len:
        return ids
    half = max_len // 2
    return ids[:half] + ids[len(ids) - half :]
