"""The lab's paired comparison: Student's t against published values and a hand computation."""

import math
import statistics

import pytest

from recipe_dist.lab.stats import established, paired, t_quantile, t_sf2


@pytest.mark.parametrize("df,q975", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (1000, 1.962)])
def test_t_quantiles_match_the_table(df, q975):
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=1e-3)


def test_two_sided_p_matches_closed_forms():
    # df=1 is Cauchy: p = 1 - 2 atan(t) / pi; df=2: p = 1 - t / sqrt(2 + t^2).
    for t in (0.3, 1.0, 2.5, 10.0):
        assert t_sf2(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9)
        assert t_sf2(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)


def test_paired_difference_by_hand():
    a, b = [20.7, 20.5, 19.6], [22.9, 21.0, 35.1]
    r = paired(a, b)
    d = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(d) / math.sqrt(3)
    assert r["mean_diff"] == pytest.approx(statistics.fmean(d))
    assert r["ci95"] == pytest.approx([statistics.fmean(d) - 4.3027 * se, statistics.fmean(d) + 4.3027 * se], abs=1e-3)
    assert 0.2 < r["p"] < 0.5 and not established(r)  # the example: -6.1, not established with n = 3
    assert established(paired([1.0, 1.1, 0.9, 1.2], [0.0, 0.1, 0.0, 0.1]))


def test_one_replicate_or_no_spread_supports_no_claim_and_unpaired_input_is_refused():
    assert paired([1.0], [0.0])["ci95"] is None and not established(paired([1.0], [0.0]))
    same = paired([7.8, 7.8], [0.0, 0.0])  # identical differences: no interval, no claim
    assert same["ci95"] is None and same["p"] is None and same["mean_diff"] == 7.8 and not established(same)
    with pytest.raises(ValueError, match="pair them"):
        paired([1.0, 2.0], [1.0])


def test_equal_differences_up_to_rounding_support_no_claim():
    r = paired([20.7, 20.5, 19.6], [20.6, 20.4, 19.5])  # every difference 0.1, give or take 1e-15
    assert r["ci95"] is None and not established(r)
