"""Gamma-Gamma: parameter recovery and conditional expected spend on simulated customers, fallbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loyalty.scoring.models import (
    CDNOW_GAMMA_GAMMA_PARAMS,
    GammaGammaFit,
    GammaGammaParams,
    default_gamma_gamma_params,
    expected_spend,
    fit_gamma_gamma,
    gamma_gamma_log_likelihood,
)
from loyalty.scoring.models.simulation import SimulatedSpend, simulate_gamma_gamma

N_REPEATERS = 100_000
Z_LIMIT = 4.0

SCENARIOS = {
    "cdnow": GammaGammaParams(p=6.25, q=3.74, gamma=15.44),
    # Few, very variable purchases per customer and a wide spread of customers' mean spend.
    "heterogeneous": GammaGammaParams(p=1.5, q=2.5, gamma=120.0),
    "consistent_big_baskets": GammaGammaParams(p=20.0, q=12.0, gamma=40.0),
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[GammaGammaParams, np.ndarray, SimulatedSpend]:
    params = SCENARIOS[request.param]
    rng = np.random.default_rng(99)
    x = 1.0 + rng.poisson(2.5, N_REPEATERS)
    return params, x, simulate_gamma_gamma(params, x, rng)


@pytest.fixture(scope="module")
def fitted(
    scenario: tuple[GammaGammaParams, np.ndarray, SimulatedSpend],
) -> tuple[GammaGammaFit, np.ndarray]:
    """The fit and the covariance of its log-parameters, shared by the tests of one scenario."""
    _, x, sim = scenario
    fit = fit_gamma_gamma(sim.mean_spend, x)
    return fit, log_parameter_covariance(fit.params, sim.mean_spend, x)


def log_parameter_covariance(params: GammaGammaParams, spend: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Covariance of log(p), log(q), log(gamma) from a finite-difference observed information."""
    base = np.log([params.p, params.q, params.gamma])

    def ll(point: np.ndarray) -> float:
        p, q, gamma = np.exp(point)
        return gamma_gamma_log_likelihood(GammaGammaParams(p=p, q=q, gamma=gamma), spend, x)

    step = 1e-4
    hessian = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            shifts = np.zeros((4, 3))
            shifts[0, [i, j]] += step
            shifts[1, i] += step
            shifts[1, j] -= step
            shifts[2, i] -= step
            shifts[2, j] += step
            shifts[3, [i, j]] -= step
            if i == j:
                shifts = np.zeros((4, 3))
                shifts[0, i], shifts[1, i], shifts[2, i], shifts[3, i] = 2 * step, 0, 0, -2 * step
            values = [ll(base + shift) for shift in shifts]
            hessian[i, j] = (values[0] - values[1] - values[2] + values[3]) / (4 * step * step)
    return np.asarray(np.linalg.inv(-hessian))


def with_log_shift(params: GammaGammaParams, shift: np.ndarray) -> GammaGammaParams:
    p, q, gamma = np.exp(np.log([params.p, params.q, params.gamma]) + shift)
    return GammaGammaParams(p=p, q=q, gamma=gamma)


def test_fit_recovers_the_simulated_parameters(
    scenario: tuple[GammaGammaParams, np.ndarray, SimulatedSpend], fitted: tuple[GammaGammaFit, np.ndarray]
) -> None:
    truth, _, _ = scenario
    fit, covariance = fitted
    assert fit.fallback is None
    assert fit.converged
    assert fit.n_customers == N_REPEATERS
    standard_errors = np.sqrt(np.diag(covariance))
    assert np.all(standard_errors < 0.1)
    estimate = np.log([fit.params.p, fit.params.q, fit.params.gamma])
    z = (estimate - np.log([truth.p, truth.q, truth.gamma])) / standard_errors
    assert np.all(np.abs(z) < Z_LIMIT), z


@pytest.mark.parametrize("use_fitted", [False, True], ids=["true_params", "fitted_params"])
def test_expected_spend_matches_the_customers_true_mean(
    scenario: tuple[GammaGammaParams, np.ndarray, SimulatedSpend],
    fitted: tuple[GammaGammaFit, np.ndarray],
    use_fitted: bool,
) -> None:
    truth, x, sim = scenario
    params = fitted[0].params if use_fitted else truth
    predicted = expected_spend(params, sim.mean_spend, x)
    residuals = sim.true_mean_spend - predicted
    # With fitted parameters the estimation error moves whole groups together: add its delta-method variance.
    covariance = fitted[1] if use_fitted else np.zeros((3, 3))
    step = 1e-5
    for order in (np.argsort(x, kind="stable"), np.argsort(sim.mean_spend)):
        for group in np.array_split(order, 5):
            gradient = np.array(
                [
                    (
                        expected_spend(with_log_shift(params, step * e), sim.mean_spend[group], x[group]).sum()
                        - expected_spend(with_log_shift(params, -step * e), sim.mean_spend[group], x[group]).sum()
                    )
                    / (2 * step)
                    for e in np.eye(3)
                ]
            )
            variance = float((residuals[group] ** 2).sum()) + float(gradient @ covariance @ gradient)
            assert abs(residuals[group].sum()) / math.sqrt(variance) < Z_LIMIT


def test_new_customers_get_the_population_mean() -> None:
    params = CDNOW_GAMMA_GAMMA_PARAMS
    assert expected_spend(params, 0.0, 0) == pytest.approx(params.p * params.gamma / (params.q - 1))
    assert params.population_mean_spend == pytest.approx(35.22, abs=0.01)
    assert expected_spend(params, -40.0, 2) == pytest.approx(expected_spend(params, 0.0, 2))
    with pytest.raises(ValueError, match="finite"):
        expected_spend(params, np.nan, 3)
    with pytest.raises(ValueError, match="x must be"):
        expected_spend(params, 10.0, -1)
    with pytest.raises(ValueError, match="q must exceed 1"):
        GammaGammaParams(p=1.0, q=0.9, gamma=1.0)


def test_non_positive_spends_are_excluded_and_counted() -> None:
    truth = SCENARIOS["cdnow"]
    rng = np.random.default_rng(4)
    x = 1.0 + rng.poisson(2.0, 5000)
    spend = simulate_gamma_gamma(truth, x, rng).mean_spend
    spend[:40] = 0.0
    spend[40:50] = -5.0
    with_zeros = np.concatenate([spend, np.zeros(100)])
    counts = np.concatenate([x, np.zeros(100)])
    fit = fit_gamma_gamma(with_zeros, counts)
    assert fit.fallback is None
    assert fit.n_excluded == 50
    assert fit.n_customers == 4950
    clean = fit_gamma_gamma(spend[50:], x[50:])
    assert fit.params == clean.params


def test_weighted_rows_give_the_same_fit() -> None:
    rng = np.random.default_rng(8)
    x = 1.0 + rng.poisson(1.0, 20_000)
    spend = np.round(simulate_gamma_gamma(SCENARIOS["cdnow"], x, rng).mean_spend, 0)
    rows, counts = np.unique(np.column_stack([x, spend]), axis=0, return_counts=True)
    per_customer = fit_gamma_gamma(spend, x)
    weighted = fit_gamma_gamma(rows[:, 1], rows[:, 0], weights=counts)
    assert weighted.n_rows == per_customer.n_rows == len(rows)
    np.testing.assert_allclose(
        [weighted.params.p, weighted.params.q, weighted.params.gamma],
        [per_customer.params.p, per_customer.params.q, per_customer.params.gamma],
        rtol=1e-7,
    )


def small_sample(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = 1.0 + np.arange(n) % 3
    return 20.0 + np.arange(n) % 17, x


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (small_sample(150), "too few repeat customers"),
        ((np.zeros(1000), np.zeros(1000)), "no repeat customers"),
        ((np.full(1000, 25.0), np.full(1000, 2.0)), "same mean spend"),
        ((np.array([np.nan, 3.0]), np.array([1.0, 1.0])), "mean_spend must be finite"),
        ((np.ones(3), np.ones(2)), "same length"),
        ((np.array(["x"]), np.array([1.0])), "unexpected error"),
    ],
    ids=["tiny", "nobody_repeats", "identical_spend", "nan_spend", "ragged", "not_numbers"],
)
def test_fit_falls_back_with_a_reason(data: tuple[np.ndarray, np.ndarray], reason: str) -> None:
    fit = fit_gamma_gamma(*data)
    assert fit.fallback is not None
    assert reason in fit.fallback
    assert not fit.converged
    assert np.all(np.isfinite(expected_spend(fit.params, [0.0, 30.0], [0, 2])))


def test_fallback_defaults_match_the_observed_mean_spend() -> None:
    spend, x = small_sample(150)
    fit = fit_gamma_gamma(spend, x)
    assert fit.params.p == CDNOW_GAMMA_GAMMA_PARAMS.p
    assert fit.params.q == CDNOW_GAMMA_GAMMA_PARAMS.q
    assert fit.params.population_mean_spend == pytest.approx(spend.mean())
    assert fit_gamma_gamma(np.zeros(10), np.zeros(10)).params == CDNOW_GAMMA_GAMMA_PARAMS
    assert default_gamma_gamma_params(None) == CDNOW_GAMMA_GAMMA_PARAMS


def test_estimate_with_infinite_mean_spend_falls_back() -> None:
    rng = np.random.default_rng(12)
    x = 1.0 + rng.poisson(2.0, 20_000)
    nu = rng.gamma(0.6, 1.0 / 10.0, x.size)
    spend = rng.gamma(3.0 * x, 1.0 / nu) / x
    fit = fit_gamma_gamma(spend, x)
    assert fit.fallback is not None
    assert "q <= 1" in fit.fallback
    assert np.all(np.isfinite(expected_spend(fit.params, spend, x)))
