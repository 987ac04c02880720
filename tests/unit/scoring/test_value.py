"""predict: the predicted value is the product of the two models, discounted by steps, finite."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from loyalty.scoring.models import (
    CDNOW_GAMMA_GAMMA_PARAMS,
    DEFAULT_BGNBD_PARAMS,
    BGNBDParams,
    expected_purchases,
    expected_spend,
    predict,
    probability_alive,
)

X = np.array([0.0, 1.0, 4.0, 30.0, 5000.0])
T_X = np.array([0.0, 20.0, 300.0, 350.0, 19_990.0])
T = np.array([10.0, 200.0, 365.0, 400.0, 20_000.0])
SPEND = np.array([0.0, 25.0, 40.0, 12.5, 80.0])


def predicted_value(*arguments: Any, **settings: Any) -> np.ndarray:
    return predict(*arguments, **settings).predicted_value


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_predict_gives_each_prediction_exactly_as_alone(rate: float) -> None:
    """The re-score takes all four from ``predict``; they must be the standalone functions' values to the bit."""
    together = predict(
        DEFAULT_BGNBD_PARAMS, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, horizon_days=365.0, annual_discount_rate=rate
    )
    assert np.array_equal(together.expected_purchases, expected_purchases(DEFAULT_BGNBD_PARAMS, 365.0, X, T_X, T))
    assert np.array_equal(together.probability_alive, probability_alive(DEFAULT_BGNBD_PARAMS, X, T_X, T))
    assert np.array_equal(together.expected_spend, expected_spend(CDNOW_GAMMA_GAMMA_PARAMS, SPEND, X))
    if rate == 0.0:
        assert np.array_equal(together.predicted_value, together.expected_purchases * together.expected_spend)
    else:
        assert np.all(together.predicted_value < together.expected_purchases * together.expected_spend)


def test_undiscounted_value_is_purchases_times_spend() -> None:
    value = predicted_value(DEFAULT_BGNBD_PARAMS, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, horizon_days=365.0)
    purchases = expected_purchases(DEFAULT_BGNBD_PARAMS, 365.0, X, T_X, T)
    spend = expected_spend(CDNOW_GAMMA_GAMMA_PARAMS, SPEND, X)
    np.testing.assert_allclose(value, purchases * spend, rtol=1e-12)
    assert np.all(predicted_value(DEFAULT_BGNBD_PARAMS, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, 0.0) == 0)


def test_discounting_matches_fine_steps_and_shrinks_value() -> None:
    params = BGNBDParams(r=2.0, alpha=10.0, a=0.8, b=20.0)
    plain = predicted_value(params, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, 730.0)
    monthly = predicted_value(params, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, 730.0, annual_discount_rate=0.1)
    daily = predicted_value(
        params, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, 730.0, annual_discount_rate=0.1, discount_step_days=1.0
    )
    positive = plain > 0
    assert np.all(monthly[positive] < plain[positive])
    # Over two years at 10% the discount is between (1.1)^-2 and 1 of the undiscounted value.
    assert np.all(monthly[positive] > plain[positive] / 1.1**2)
    np.testing.assert_allclose(monthly, daily, rtol=1e-3)
    zero_rate = predicted_value(params, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, 730.0, annual_discount_rate=0.0)
    np.testing.assert_array_equal(zero_rate, plain)


def test_constant_rate_customer_discounts_like_a_continuous_annuity() -> None:
    # A customer with no dropout (b huge, x = 0 so alive) and a near-certain rate buys evenly over time.
    params = BGNBDParams(r=1e5, alpha=1e5 / 0.1, a=1e-3, b=1e5)
    rate = 0.05
    value = predicted_value(params, CDNOW_GAMMA_GAMMA_PARAMS, [0.0], [0.0], [0.0], [0.0], 365.25, rate, 1.0)
    annuity = 0.1 * 365.25 * (1 - 1.05**-1) / np.log(1.05)
    assert float(value[0]) / CDNOW_GAMMA_GAMMA_PARAMS.population_mean_spend == pytest.approx(annuity, rel=1e-3)


def test_value_is_finite_for_extreme_customers_and_settings_are_checked() -> None:
    value = predicted_value(DEFAULT_BGNBD_PARAMS, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, 3650.0, 0.2)
    assert np.all(np.isfinite(value))
    assert np.all(value >= 0)
    with pytest.raises(ValueError, match="horizon"):
        predicted_value(DEFAULT_BGNBD_PARAMS, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, -1.0)
    with pytest.raises(ValueError, match="discount"):
        predicted_value(DEFAULT_BGNBD_PARAMS, CDNOW_GAMMA_GAMMA_PARAMS, X, T_X, T, SPEND, 365.0, -1.0)
