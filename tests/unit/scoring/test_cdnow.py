"""The CDNOW cohort: summaries and estimates must reproduce the published figures (tests/data/cdnow/README.md)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from loyalty.scoring.models import (
    BGNBDParams,
    CustomerSummary,
    bgnbd_log_likelihood,
    expected_purchases,
    fit_bgnbd,
    fit_gamma_gamma,
    gamma_gamma_log_likelihood,
    probability_alive,
    summarise_transactions,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "cdnow"
# Orders carry dates only, i.e. they are timed at the start of their day. The published T is measured to the
# start of 1997-09-30 (T = 38.86 weeks = 272 days for the 1997-01-01 customers), so as_of is that instant,
# which still counts the orders dated 1997-09-30 because as_of is inclusive.
AS_OF = np.datetime64("1997-09-30T00:00")
DAYS_PER_WEEK = 7.0
TOTAL_REPEAT_PURCHASES = 2457
PUBLISHED_BGNBD_WEEKS = {"r": 0.2426, "alpha": 4.4136, "a": 0.7929, "b": 2.4259}
PUBLISHED_BGNBD_LOG_LIKELIHOOD_WEEKS = -9582.43
PUBLISHED_GAMMA_GAMMA = {"p": 6.25, "q": 3.74, "gamma": 15.44}


def significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits - 1}e}")


@pytest.fixture(scope="module")
def summary() -> CustomerSummary:
    raw = np.loadtxt(DATA / "CDNOW_sample.txt", dtype=str)
    dates = np.array([f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in raw[:, 2]], dtype="datetime64[D]")
    return summarise_transactions(raw[:, 1].astype(np.int64), dates, raw[:, 4].astype(np.float64), AS_OF)


@pytest.fixture(scope="module")
def published() -> np.ndarray:
    return np.genfromtxt(DATA / "cdnow_customers_summary_with_transactions.csv", delimiter=",", names=True)


def test_summary_reproduces_the_published_one(summary: CustomerSummary, published: np.ndarray) -> None:
    assert summary.n_customers == published.size == 2357
    np.testing.assert_array_equal(summary.key, published["ID"].astype(np.int64))
    np.testing.assert_array_equal(summary.x, published["x"])
    # The CSV prints two decimals: agreement to half a unit in the last place.
    half_cent = 0.005 + 1e-9
    np.testing.assert_allclose(summary.t_x / DAYS_PER_WEEK, published["t_x"], rtol=0, atol=half_cent)
    np.testing.assert_allclose(summary.T / DAYS_PER_WEEK, published["T"], rtol=0, atol=half_cent)
    np.testing.assert_allclose(summary.mean_repeat_spend, published["zbar"], rtol=0, atol=half_cent)
    assert summary.x.sum() == TOTAL_REPEAT_PURCHASES


def test_end_of_day_as_of_changes_only_T(summary: CustomerSummary) -> None:
    raw = np.loadtxt(DATA / "CDNOW_sample.txt", dtype=str)
    dates = np.array([f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in raw[:, 2]], dtype="datetime64[D]")
    end_of_day = np.datetime64("1997-09-30T23:59:59.999999")
    later = summarise_transactions(raw[:, 1].astype(np.int64), dates, raw[:, 4].astype(np.float64), end_of_day)
    np.testing.assert_array_equal(later.x, summary.x)
    np.testing.assert_array_equal(later.t_x, summary.t_x)
    np.testing.assert_allclose(later.T - summary.T, 1.0 - 1e-6 / 86400, rtol=0, atol=1e-9)


def test_bgnbd_estimates_in_weeks_match_the_published_ones(summary: CustomerSummary) -> None:
    fit = fit_bgnbd(summary.x, summary.t_x / DAYS_PER_WEEK, summary.T / DAYS_PER_WEEK, time_unit="week")
    assert fit.fallback is None
    assert fit.converged
    assert fit.n_customers == 2357
    for name, value in PUBLISHED_BGNBD_WEEKS.items():
        assert significant(getattr(fit.params, name)) == significant(value), name
    assert fit.log_likelihood is not None
    assert fit.log_likelihood == pytest.approx(PUBLISHED_BGNBD_LOG_LIKELIHOOD_WEEKS, abs=0.1)


def test_bgnbd_fit_in_days_rescales_alpha_and_the_density(summary: CustomerSummary) -> None:
    weeks = fit_bgnbd(summary.x, summary.t_x / DAYS_PER_WEEK, summary.T / DAYS_PER_WEEK, time_unit="week")
    days = fit_bgnbd(summary.x, summary.t_x, summary.T)
    assert days.fallback is None
    assert days.time_unit == "day"
    assert days.params.r == pytest.approx(weeks.params.r, rel=1e-6)
    assert days.params.alpha == pytest.approx(weeks.params.alpha * DAYS_PER_WEEK, rel=1e-6)
    assert days.params.a == pytest.approx(weeks.params.a, rel=1e-6)
    assert days.params.b == pytest.approx(weeks.params.b, rel=1e-6)
    # Each repeat purchase time is a density in the time unit: x factors of 1/7 per customer.
    assert days.log_likelihood is not None
    assert days.log_likelihood == pytest.approx(
        PUBLISHED_BGNBD_LOG_LIKELIHOOD_WEEKS - TOTAL_REPEAT_PURCHASES * math.log(7.0), abs=0.1
    )
    published_in_days = BGNBDParams(**PUBLISHED_BGNBD_WEEKS).rescale_time(DAYS_PER_WEEK)
    assert bgnbd_log_likelihood(published_in_days, summary.x, summary.t_x, summary.T) == pytest.approx(
        PUBLISHED_BGNBD_LOG_LIKELIHOOD_WEEKS - TOTAL_REPEAT_PURCHASES * math.log(7.0), abs=0.1
    )


def test_conditional_expectation_matches_the_published_worked_example() -> None:
    # Fader, Hardie & Lee's note on implementing BG/NBD in Excel: customer with x = 2, t_x = 30.43, T = 38.86.
    params = BGNBDParams(**PUBLISHED_BGNBD_WEEKS)
    assert expected_purchases(params, 39.0, 2, 30.43, 38.86) == pytest.approx(1.226, abs=5e-4)
    alive = probability_alive(params, 2, 30.43, 38.86)
    assert 0.0 < float(alive) < 1.0


def test_gamma_gamma_estimates_match_the_published_ones(summary: CustomerSummary) -> None:
    fit = fit_gamma_gamma(summary.mean_repeat_spend, summary.x)
    assert fit.fallback is None
    assert fit.converged
    assert fit.n_customers == 946
    assert fit.n_excluded == 0
    for name, value in PUBLISHED_GAMMA_GAMMA.items():
        assert significant(getattr(fit.params, name)) == significant(value), name
    assert fit.log_likelihood is not None
    assert fit.log_likelihood == pytest.approx(-4055.9, abs=0.1)
    assert gamma_gamma_log_likelihood(fit.params, summary.mean_repeat_spend, summary.x) == pytest.approx(
        fit.log_likelihood, abs=1e-6
    )
