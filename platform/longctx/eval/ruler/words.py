"""Word lists, the Riemann zeta function and the sentence splitter RULER's generators draw on.

RULER samples needle keys from every "adjective-noun" pair of the `wonderwords` package's lists (6.2 million
sorted strings) and common words from its nouns + adjectives + verbs. The three lists ship in
`assets/ruler/` (wonderwords 3.0.1, MIT licence, `assets/ruler/LICENSE-wonderwords.txt`), so samples do not
depend on which wonderwords version is installed. `AdjNounWords` is that sorted pair list without building
it (10 s and 0.9 GB in Python): same length, same element at every index, so `random.choice` draws the same
word as RULER's list for the same random state.
"""

from __future__ import annotations

import bisect
import io
import json
import math
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

from longctx import storage
from longctx.eval.haystack import split_sentences


def _read_list(name: str) -> list[str]:
    # NOTE: as wonderwords reads them: readlines() then rstrip() of each line
    text = resources.files("longctx").joinpath("assets", "ruler", name).read_text(encoding="utf-8")
    return [w.rstrip() for w in io.StringIO(text).readlines()]


@lru_cache(maxsize=1)
def word_lists() -> dict[str, list[str]]:
    """{"nouns", "adjectives", "verbs"} as wonderwords' `_get_words_from_text_file` returns them."""
    return {"nouns": _read_list("nounlist.txt"), "adjectives": _read_list("adjectivelist.txt"),
            "verbs": _read_list("verblist.txt")}


class AdjNounWords(Sequence):
    """`sorted(set(f"{adj}-{noun}" for adj in adjectives for noun in nouns))`, indexable without building it.

    Words of two adjectives interleave in that order only when one adjective plus "-" starts the other
    ("old" and "old-fashioned"); such groups are built and sorted, every other adjective is a block of all
    nouns in sorted order, and the blocks follow each other in the order of "<adjective>-".
    """

    def __init__(self, adjectives: Sequence[str], nouns: Sequence[str]):
        adj = set(adjectives)
        self._nouns = sorted(set(nouns))
        groups: dict[str, list[str]] = {}
        for a in adj:
            s = a + "-"
            root = next(s[:i] for i, c in enumerate(s) if c == "-" and s[:i] in adj)
            groups.setdefault(root, []).append(a)
        self._blocks: list[str | list[str]] = []
        self._starts: list[int] = []
        total = 0
        for root in sorted(groups, key=lambda r: r + "-"):
            members = groups[root]
            block: str | list[str] = root if len(members) == 1 else sorted(
                {f"{a}-{n}" for a in members for n in self._nouns})
            self._starts.append(total)
            self._blocks.append(block)
            total += len(self._nouns) if isinstance(block, str) else len(block)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        b = bisect.bisect_right(self._starts, i) - 1
        block, off = self._blocks[b], i - self._starts[b]
        return f"{block}-{self._nouns[off]}" if isinstance(block, str) else block[off]


@lru_cache(maxsize=1)
def niah_words() -> AdjNounWords:
    """The needle-key words of RULER's niah.py (adjective-noun pairs)."""
    w = word_lists()
    return AdjNounWords(w["adjectives"], w["nouns"])


def cwe_words() -> list[str]:
    """RULER's common-words vocabulary before its seeded shuffle: sorted(set(nouns + adjectives + verbs))."""
    w = word_lists()
    return sorted(set(w["nouns"] + w["adjectives"] + w["verbs"]))


def read_english_words(uri: str) -> list[str]:
    """The values of RULER's `english_words.json` (a JSON object), used by cwe when it needs more words."""
    try:
        data = json.loads(storage.read_text(uri))
    except (OSError, ValueError) as e:
        raise ValueError(f"{uri}: cannot read RULER's english_words.json ({e})") from e
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{uri}: expected a non-empty JSON object of words (RULER's english_words.json)")
    return list(data.values())


def zeta(s: float) -> float:
    """Riemann zeta(s) for s > 1 (scipy.special.zeta as RULER's fwe uses it), to double precision.

    Euler-Maclaurin summation with N = 16 and six Bernoulli terms; zeta(2) is returned as pi^2 / 6, the
    double scipy gives.
    """
    if s <= 1:
        raise ValueError(f"zeta needs s > 1, got {s}")
    if s == 2.0:
        return math.pi ** 2 / 6
    n = 16
    total = math.fsum(k ** -s for k in range(1, n))
    total += n ** (1 - s) / (s - 1) + 0.5 * n ** -s
    bernoulli = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730)
    rising, fact = s, 2.0  # s (s+1) ... (s+2j-2) and (2j)!
    for j, b in enumerate(bernoulli, 1):
        total += b / fact * rising * n ** (-s - 2 * j + 1)
        rising *= (s + 2 * j - 1) * (s + 2 * j)
        fact *= (2 * j + 1) * (2 * j + 2)
    return total


def sent_tokenize(text: str) -> list[str]:
    """Sentences of whitespace-normalised essay text.

    NOTE: RULER uses nltk's Punkt model here, which needs a data download; this splits after . ! ? (and
    their CJK forms) followed by whitespace, which agrees with Punkt on plain prose and differs on
    abbreviations ("Mr. Smith") and quotes after a full stop. Only the essay haystack's needle positions
    depend on it.
    """
    return split_sentences(text)
