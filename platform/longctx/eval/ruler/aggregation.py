"""RULER's aggregation generators: common words extraction (cwe) and frequent words extraction (fwe).

Ported from NVIDIA/RULER (commit c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a;
`scripts/data/synthetic/common_words_extraction.py` and `freq_words_extraction.py`, Copyright (c) 2024
NVIDIA CORPORATION, Apache License 2.0) with the same random draws in the same order (see `synthetic.py`).
Changed: cwe reads RULER's `english_words.json` only when a length needs more distinct words than the
wonderwords lists hold (about 8,100; RULER loads it always), and says so when it is not given; fwe's zeta
comes from `words.zeta` instead of scipy.
"""

from __future__ import annotations

import random
import string

import numpy as np

from longctx.eval.ruler.synthetic import RulerLengthError, Task, fit_sample, search_size
from longctx.eval.ruler.words import cwe_words, read_english_words, zeta


class CommonWords(Task):
    """common_words_extraction.py: a numbered word list where 10 words repeat most; one-shot example first."""

    base_task = "common_words_extraction"

    def __init__(self, *, freq_cw: int = 30, freq_ucw: int = 3, num_cw: int = 10, num_fewshot: int = 1,
                 english_words: str | None = None, **kw):
        super().__init__(**kw)
        self.freq_cw, self.freq_ucw, self.num_cw, self.num_fewshot = freq_cw, freq_ucw, num_cw, num_fewshot
        self.words = cwe_words()
        random.Random(self.seed).shuffle(self.words)
        self.english_words_uri = english_words
        self._randle: list[str] | None = None

    def _randle_words(self, n: int) -> list[str]:
        if self._randle is None:
            if not self.english_words_uri:
                raise RulerLengthError(
                    f"{self.name} at {self.max_seq_length} tokens needs {n} distinct words, more than the "
                    f"{len(self.words)} of the shipped lists: RULER then draws from its english_words.json (a Git "
                    "LFS file in NVIDIA/RULER, scripts/data/synthetic/json/); give its path as eval.ruler.cwe_words")
            self._randle = read_english_words(self.english_words_uri)
        return self._randle

    def get_example(self, num_words: int, common_repeats: int = 30, uncommon_repeats: int = 3,
                    common_nums: int = 10) -> tuple[str, list[str]]:
        pool = self.words if num_words <= len(self.words) else self._randle_words(num_words)
        full = self.rng.sample(pool, num_words)
        common, uncommon = full[:common_nums], full[common_nums:]
        word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        random.Random(self.seed).shuffle(word_list)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common

    def generate_input_output(self, num_words: int) -> tuple[str, list[str]]:
        shots = []
        if self.max_seq_length < 4096:
            for _ in range(self.num_fewshot):
                shots.append(self.get_example(20, 3, 1, self.num_cw))
            context, answer = self.get_example(num_words, 6, 1, self.num_cw)
        else:
            for _ in range(self.num_fewshot):
                shots.append(self.get_example(40, 10, 3, self.num_cw))
            context, answer = self.get_example(num_words, self.freq_cw, self.freq_ucw, self.num_cw)
        shot_text = "\n".join(
            self.template.format(num_cw=self.num_cw, context=c, query="") + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(a)) for c, a in shots)
        return shot_text + "\n" + self.template.format(num_cw=self.num_cw, context=context, query=""), answer

    def generate(self, num_samples: int) -> list[dict]:
        ttg, budget, incremental = self.tokens_to_generate, self.max_seq_length, 10
        measure = lambda text: self.count(text) + ttg  # noqa: E731
        per_word = self.count(self.generate_input_output(4096)[0]) / 4096
        upper = max(int(budget // per_word) * 2, incremental * 2)
        num_words = search_size(self.generate_input_output, measure, incremental, upper, budget)
        rows = []
        for index in range(num_samples):
            text, answer, length = fit_sample(self.generate_input_output, measure, num_words, incremental, budget,
                                              f"{self.name} at {budget} tokens")
            rows.append(self._row(index, text, answer, length))
        return rows


class FrequentWords(Task):
    """freq_words_extraction.py: coded 6-letter words with Zipf(alpha) counts; the top one is noise ('...')."""

    base_task = "freq_words_extraction"

    def __init__(self, *, alpha: float = 2.0, coded_wordlen: int = 6, vocab_size: int = -1, **kw):
        super().__init__(**kw)
        self.alpha, self.coded_wordlen, self.vocab_size = alpha, coded_wordlen, vocab_size

    def generate_input_output(self, max_len: int, num_words: int = -1, vocab_size: int = 2000,
                              incremental: int = 10) -> tuple[str, list[str], int]:
        n_chars = self.coded_wordlen
        vocab = ["".join(self.rng.choices(string.ascii_lowercase, k=n_chars)) for _ in range(vocab_size)]
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(self.rng.choices(string.ascii_lowercase, k=n_chars)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # treat the top ranked as noise
        z = zeta(self.alpha)

        def gen_text(n: int):
            k = np.arange(1, len(vocab) + 1)
            counts = n * (k ** -self.alpha) / z
            words = [x for w, c in zip(vocab, counts.astype(int)) for x in [w] * c]
            random.Random(self.seed).shuffle(words)
            return self.template.format(context=" ".join(words), query=""), vocab[1:4]

        if num_words > 0:
            text, answer = gen_text(num_words)
            while self.count(text) > max_len:
                num_words -= incremental
                text, answer = gen_text(num_words)
        else:
            num_words = max_len // n_chars
            text, answer = gen_text(num_words)
            while self.count(text) < max_len:
                num_words += incremental
                text, answer = gen_text(num_words)
            num_words -= incremental
        text, answer = gen_text(num_words)
        return text, answer, num_words

    def generate(self, num_samples: int) -> list[dict]:
        ttg = self.tokens_to_generate
        max_len = self.max_seq_length - ttg
        vocab_size = max_len // 50 if self.vocab_size == -1 else self.vocab_size
        if vocab_size < 4 or max_len // 32 < 1:
            raise RulerLengthError(
                f"{self.name} at {self.max_seq_length} tokens: RULER's vocabulary of (length - {ttg}) // 50 = "
                f"{vocab_size} coded words is below the 4 it needs; use a length of at least {200 + ttg}")
        _, _, num_words = self.generate_input_output(max_len, vocab_size=vocab_size, incremental=max_len // 32)
        rows = []
        for index in range(num_samples):
            text, answer, _ = self.generate_input_output(max_len, num_words=num_words, vocab_size=vocab_size,
                                                         incremental=max_len // 32)
            rows.append(self._row(index, text, answer, self.count(text) + ttg))
        return rows
