"""The difference-in-means interval on plain data: coverage of a known uplift, and the small-group rule."""

from __future__ import annotations

import numpy as np

from loyalty.offers.results import GroupStats, difference_in_means


def stats(values: np.ndarray) -> GroupStats:
    return GroupStats(int(values.size), float(values.sum()), float((values**2).sum()))


def test_variance_matches_numpy() -> None:
    values = np.array([1.0, 4.0, 9.0, 16.0])
    group = stats(values)
    assert abs(group.mean - values.mean()) < 1e-12
    assert abs(group.variance - values.var(ddof=1)) < 1e-9


def test_interval_covers_the_true_uplift_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(42)
    true_uplift, covered, trials = 5.0, 0, 400
    for _ in range(trials):
        treatment = rng.gamma(2.0, 20.0, size=800) + true_uplift
        holdout = rng.gamma(2.0, 20.0, size=200)
        uplift = difference_in_means(stats(treatment), stats(holdout))
        assert uplift.low is not None
        assert uplift.high is not None
        covered += uplift.low <= true_uplift <= uplift.high
    assert 0.92 <= covered / trials <= 0.98, covered / trials


def test_small_groups_give_an_estimate_but_no_interval() -> None:
    uplift = difference_in_means(stats(np.ones(100) * 3), stats(np.ones(10)))
    assert uplift.estimate == 2.0
    assert uplift.low is None
    assert uplift.insufficient_data
    assert difference_in_means(stats(np.ones(5)), stats(np.array([]))).estimate is None
