"""The study's verdict rules on hand-made numbers (the end-to-end run is tests/test_study.py)."""

from longctx.runs.study import rope_grid_point
from longctx.runs.study_report import TARGET_NLL, TARGET_ROPE, verdicts


def _status(nums, target):
    return next(v["status"] for v in verdicts(nums) if v["target"] == target)


def test_rope_grid_point_at_the_bound_is_never_below_it():
    bound = 113834.65286067824
    assert rope_grid_point(bound, 1.0) == 113900.0 >= bound
    assert rope_grid_point(bound, 0.1) == 11390.0 and rope_grid_point(bound, 10.0) == 1139000.0
    assert rope_grid_point(1e4, 1.0) == 1e4  # exact values stay exact
    d = {"nll_beyond_base_by_theta": {"11390": 3.21, "113900": 3.147, "1139000": 3.149}, "bound": bound}
    assert _status({"d": d}, TARGET_ROPE) == "held"
    d["nll_beyond_base_by_theta"]["11390"] = 3.0  # best below the bound: the ordering failed and says so
    assert _status({"d": d}, TARGET_ROPE) == "did not hold"


def test_nll_ordering_needs_every_link():
    a = {n: {"role": r, "nll_beyond_base": v, "nll_within_base": 3.0, "passkey_4x": 0.0}
         for n, r, v in [("t", "trained", 3.1), ("y", "yarn", 3.2), ("d", "dynamic_ntk", 3.22), ("p", "pi", 3.5),
                         ("n", "naive", 3.8)]}
    assert _status({"a": a}, TARGET_NLL) == "held"
    a["p"]["nll_beyond_base"] = 4.4  # PI worse than naive (what the toy run measured)
    assert _status({"a": a}, TARGET_NLL) == "did not hold"
