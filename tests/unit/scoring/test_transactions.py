"""summarise_transactions: occasion, cut-off and time conventions, against a per-customer reference."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from loyalty.scoring.models import summarise_transactions

DAY = np.timedelta64(1, "D")


def reference_summary(
    keys: np.ndarray, stamps: np.ndarray, values: np.ndarray, as_of: np.datetime64
) -> dict[object, tuple[int, float, float, float]]:
    """Straightforward per-customer loop over the documented conventions."""
    by_customer: dict[object, dict[np.datetime64, float]] = defaultdict(lambda: defaultdict(float))
    for key, stamp, value in zip(keys.tolist(), stamps, values.tolist(), strict=True):
        if stamp <= as_of:
            by_customer[key][stamp.astype("datetime64[D]")] += value
    result = {}
    for key, occasions in by_customer.items():
        days = sorted(occasions)
        x = len(days) - 1
        t_x = float((days[-1] - days[0]) / DAY)
        T = float((as_of - days[0].astype("datetime64[us]")) / np.timedelta64(1, "us")) / 86_400e6
        repeat = [occasions[d] for d in days[1:]]
        result[key] = (x, t_x, T, float(np.mean(repeat)) if repeat else 0.0)
    return result


def test_matches_the_reference_on_random_logs() -> None:
    rng = np.random.default_rng(7)
    n = 4000
    keys = rng.integers(0, 300, n)
    start = np.datetime64("2023-01-01T00:00:00", "s")
    stamps = start + rng.integers(0, 400 * 86400, n).astype("timedelta64[s]")
    values = np.round(rng.gamma(2.0, 20.0, n), 2)
    as_of = np.datetime64("2023-11-15T13:30:00", "us")
    summary = summarise_transactions(keys, stamps, values, as_of)
    expected = reference_summary(keys, stamps.astype("datetime64[us]"), values, as_of)
    assert summary.key.tolist() == sorted(expected)
    got = np.column_stack([summary.x, summary.t_x, summary.T, summary.mean_repeat_spend])
    want = np.array([expected[k] for k in summary.key.tolist()])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(summary.occasions, summary.x.astype(np.int64) + 1)


def test_same_day_purchases_are_one_occasion_at_the_start_of_the_day() -> None:
    stamps = np.array(
        ["2024-03-01T09:00", "2024-03-01T23:59", "2024-03-05T08:00", "2024-03-05T20:00", "2024-03-11T12:00"],
        dtype="datetime64[m]",
    )
    summary = summarise_transactions(["c"] * 5, stamps, [10.0, 5.0, 7.0, 3.0, 30.0], np.datetime64("2024-03-20"))
    assert summary.x.tolist() == [2.0]
    assert summary.t_x.tolist() == [10.0]
    assert summary.T.tolist() == [19.0]
    # Repeat occasions are worth 10 (7 + 3) and 30; the first occasion (15) is not a repeat.
    assert summary.mean_repeat_spend.tolist() == [20.0]
    assert summary.first_occasion.tolist() == [np.datetime64("2024-03-01", "D").item()]
    assert summary.last_occasion.tolist() == [np.datetime64("2024-03-11", "D").item()]


def test_as_of_is_inclusive_and_later_customers_are_absent() -> None:
    as_of = np.datetime64("2024-06-30T18:00:00")
    stamps = np.array(
        ["2024-06-01T10:00", "2024-06-30T18:00", "2024-06-30T18:00:01", "2024-07-01T00:00"],
        dtype="datetime64[s]",
    )
    summary = summarise_transactions([1, 1, 1, 2], stamps, [1.0, 2.0, 4.0, 8.0], as_of)
    assert summary.key.tolist() == [1]
    assert summary.x.tolist() == [1.0]
    assert summary.mean_repeat_spend.tolist() == [2.0]
    assert summary.t_x.tolist() == [29.0]
    assert summary.T.tolist() == [29.75]


def test_single_occasion_customers_have_zero_repeat_spend() -> None:
    summary = summarise_transactions(
        ["a", "b", "b"],
        np.array(["2024-01-01", "2024-01-02", "2024-01-02"], dtype="datetime64[D]"),
        [12.0, 3.0, 4.0],
        np.datetime64("2024-01-10"),
    )
    assert summary.key.tolist() == ["a", "b"]
    assert summary.x.tolist() == [0.0, 0.0]
    assert summary.t_x.tolist() == [0.0, 0.0]
    assert summary.T.tolist() == [9.0, 8.0]
    assert summary.mean_repeat_spend.tolist() == [0.0, 0.0]


def test_aware_as_of_is_converted_to_utc() -> None:
    stamps = np.array(["2024-05-01T22:30"], dtype="datetime64[m]")
    # 02:00 on 2 May at UTC+3 is 23:00 on 1 May UTC: the 22:30 UTC order counts, T is 23 hours.
    as_of = datetime(2024, 5, 2, 2, 0, tzinfo=timezone(timedelta(hours=3)))
    summary = summarise_transactions([1], stamps, [5.0], as_of)
    assert summary.T.tolist() == [pytest.approx(23.0 / 24.0)]


def test_before_1970_days_floor_correctly() -> None:
    stamps = np.array(["1969-12-31T23:00", "1970-01-01T01:00"], dtype="datetime64[m]")
    summary = summarise_transactions([1, 1], stamps, [1.0, 2.0], np.datetime64("1970-01-02"))
    assert summary.x.tolist() == [1.0]
    assert summary.t_x.tolist() == [1.0]
    assert summary.T.tolist() == [2.0]


def test_empty_and_malformed_input() -> None:
    empty = summarise_transactions(
        [1], np.array(["2025-01-01"], dtype="datetime64[D]"), [1.0], np.datetime64("2024-01-01")
    )
    assert empty.n_customers == 0
    assert empty.x.size == empty.T.size == 0
    with pytest.raises(ValueError, match="same length"):
        summarise_transactions([1, 2], np.array(["2024-01-01"], dtype="datetime64[D]"), [1.0], "2024-02-01")
    with pytest.raises(ValueError, match="NaT"):
        summarise_transactions([1], np.array(["NaT"], dtype="datetime64[D]"), [1.0], "2024-02-01")
    with pytest.raises(ValueError, match="finite"):
        summarise_transactions([1], np.array(["2024-01-01"], dtype="datetime64[D]"), [np.nan], "2024-02-01")
