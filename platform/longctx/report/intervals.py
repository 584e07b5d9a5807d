"""95% intervals for the study's comparisons, and the verdict kinds they decide (pure numpy, seeded).

    a = {"doc-1": 3.10, "doc-2": 3.30, ...}             # per-item values of one model (one training seed)
    b = {"doc-1": 3.25, "doc-2": 3.41, ...}             # the same items, another model
    iv = diff_interval(a, b)                            # mean(a) - mean(b), paired bootstrap over the items
    ordering_kind(iv, "<")                              # "held" | "did not hold" | "undecided"
    threshold_kind(value_interval(pk), ">=", 0.9)       # a target like "passkey >= 90%"

Values are per item (`longctx.eval.items`: a document's NLL, a prompt's 0/1, a RULER sample's score). With
several training seeds a model is `{seed: {item: value}}`; the bootstrap is then two-level: every replicate
draws seeds with replacement (the same draw for both models when they share their seed labels: paired seeds,
otherwise one draw per model) and items with replacement (always the same draw for both models: paired
items), and the statistic is the mean over the drawn seeds of the mean over the drawn items. `strata` (item ->
group, e.g. a document's source) resamples within each group and weighs the groups equally (the mean over
sources of the per-source mean).

The interval is the 2.5th-97.5th percentile of the replicates. A claim "a < b" (`ordering_kind`) **held** when
the whole interval of a - b lies below the margin (it excludes the reverse ordering), **did not hold** when it
lies at or above it (it excludes the claim), and is **undecided** otherwise. Models that do not share their
items are refused: pairing is what the interval relies on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np

HELD, FAILED, UNDECIDED, NOT_RUN = "held", "did not hold", "undecided", "not run"
KINDS = (HELD, FAILED, UNDECIDED, NOT_RUN)
N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile interval (`level`), with how many seeds and items it rests on."""

    point: float
    lo: float
    hi: float
    level: float = 0.95
    seeds: int = 1
    items: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self, scale: float = 1.0, fmt: str = ".3f") -> str:
        def num(v: float) -> str:  # a negative zero or a round-off below 1e-12 shows as 0, not -0
            return f"{round(scale * v, 12) + 0.0:{fmt}}"

        return f"{num(self.point)} [{num(self.lo)}, {num(self.hi)}]"


class PairingError(ValueError):
    """Two models (or two seeds of one) were not evaluated on the same items."""


def _by_seed(values: Mapping) -> dict[str, dict[str, float]]:
    """{seed: {item: value}} from either that or a plain {item: value} (one seed)."""
    if values and all(isinstance(v, Mapping) for v in values.values()):
        return {str(k): dict(v) for k, v in values.items()}
    return {"0": dict(values)}


def _matrix(model: dict[str, dict[str, float]], ids: list[str], what: str) -> np.ndarray:
    rows = []
    for seed, vals in model.items():
        if set(vals) != set(ids):
            missing, extra = sorted(set(ids) - set(vals))[:3], sorted(set(vals) - set(ids))[:3]
            raise PairingError(f"{what}, seed {seed}: not the same items (missing {missing}, extra {extra}); "
                               "paired intervals need every model evaluated on the same documents / prompts")
        rows.append([float(vals[i]) for i in ids])
    m = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{what}: a value is not finite")
    return m


def _item_weights(ids: list[str], strata: Mapping[str, str] | None, n_boot: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(point weights (N,), bootstrap weights (B, N)): each stratum's items resampled within it, every stratum
    weighing 1/K, so `values @ weights` is the mean over strata of the per-stratum mean."""
    groups: dict[str, list[int]] = {}
    for j, i in enumerate(ids):
        groups.setdefault(str(strata[i]) if strata is not None else "", []).append(j)
    k = len(groups)
    point = np.zeros(len(ids))
    boot = np.zeros((n_boot, len(ids)))
    for idx in groups.values():
        point[idx] = 1.0 / (k * len(idx))
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        counts = np.zeros((n_boot, len(idx)))
        np.add.at(counts, (np.repeat(np.arange(n_boot), len(idx)), draws.ravel()), 1.0)
        boot[:, idx] = counts / (k * len(idx))
    return point, boot


def _seed_mean(per_seed: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """per_seed (S, B) statistics, draws (B, S') seed indices -> (B,) mean over the drawn seeds."""
    return np.take_along_axis(per_seed.T, draws, axis=1).mean(axis=1)


def diff_interval(a: Mapping, b: Mapping | None = None, *, strata: Mapping[str, str] | None = None,
                  n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> Interval:
    """Interval of mean(a) - mean(b) (or of mean(a) when `b` is None): paired over items, two-level over seeds
    when a model has several. Deterministic for a given `seed`."""
    sa = _by_seed(a)
    ids = sorted(next(iter(sa.values())))
    if not ids:
        raise ValueError("no items to compute an interval from")
    ma = _matrix(sa, ids, "first model")
    sb = _by_seed(b) if b is not None else None
    mb = _matrix(sb, ids, "second model") if sb is not None else None
    rng = np.random.default_rng(seed)
    w_point, w_boot = _item_weights(ids, strata, n_boot, rng)
    da = rng.integers(0, len(ma), size=(n_boot, len(ma)))
    stat = _seed_mean(ma @ w_boot.T, da)
    point = float((ma @ w_point).mean())
    if mb is not None:
        paired_seeds = sb is not None and sorted(sb) == sorted(sa) and len(sb) > 1
        db = da if paired_seeds else rng.integers(0, len(mb), size=(n_boot, len(mb)))
        if paired_seeds:  # same seed label -> same row order
            mb = mb[[list(sb).index(s) for s in sa]]
        stat = stat - _seed_mean(mb @ w_boot.T, db)
        point -= float((mb @ w_point).mean())
    lo, hi = np.quantile(stat, [(1 - level) / 2, (1 + level) / 2])
    seeds = max(len(ma), len(mb) if mb is not None else 0)
    # NOTE: rounded to 12 decimals, so 50 of 50 prompts is exactly 1.0 (not 0.9999999999999999) at a threshold
    return Interval(round(point, 12), round(float(lo), 12), round(float(hi), 12), level, seeds, len(ids))


def value_interval(a: Mapping, **kw) -> Interval:
    """Interval of mean(a): the same bootstrap with no second model."""
    return diff_interval(a, None, **kw)


def ordering_kind(iv: Interval, claim: str, margin: float = 0.0) -> str:
    """The kind of the claim `a <claim> b + margin` from the interval of a - b (claim "<", "<=", ">" or ">=")."""
    return threshold_kind(iv, claim, margin)


def threshold_kind(iv: Interval, claim: str, threshold: float) -> str:
    """held when the interval lies wholly on the claimed side of `threshold`, did not hold when wholly on the
    other side, undecided when it straddles it. For ">=" / "<=" the threshold itself is on the claimed side."""
    if claim in ("<", "<="):
        inside = iv.hi < threshold if claim == "<" else iv.hi <= threshold
        outside = iv.lo >= threshold if claim == "<" else iv.lo > threshold
    elif claim in (">", ">="):
        inside = iv.lo > threshold if claim == ">" else iv.lo >= threshold
        outside = iv.hi <= threshold if claim == ">" else iv.hi < threshold
    else:
        raise ValueError(f"claim must be one of <, <=, >, >= (got {claim!r})")
    return HELD if inside else FAILED if outside else UNDECIDED


def combine_kinds(kinds: Iterable[str]) -> str:
    """A claim made of several links: did not hold if any link did not, held if every link held, else
    undecided (not run when there is no link)."""
    kinds = list(kinds)
    if not kinds or NOT_RUN in kinds:
        return NOT_RUN
    if FAILED in kinds:
        return FAILED
    return HELD if all(k == HELD for k in kinds) else UNDECIDED


def count_kinds(verdicts: Iterable[dict]) -> dict[str, int]:
    """{kind: how many verdicts have it} over every kind, in a fixed order."""
    out = {k: 0 for k in KINDS}
    for v in verdicts:
        out[v["status"]] = out.get(v["status"], 0) + 1
    return out
