"""BG/NBD: likelihood derivatives, parameter recovery and predictions on simulated populations, fallbacks."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import betaln

from loyalty.scoring.models import (
    DEFAULT_BGNBD_PARAMS,
    BGNBDParams,
    bgnbd_log_likelihood,
    bgnbd_log_likelihood_gradient,
    bgnbd_log_likelihood_hessian,
    expected_purchases,
    expected_purchases_new_customer,
    fit_bgnbd,
    probability_alive,
)
from loyalty.scoring.models._alive_expectation import _closed_form_any_a, quadrature_if_alive
from loyalty.scoring.models.simulation import SimulatedCustomers, simulate_bgnbd

N_CUSTOMERS = 100_000
HOLDOUT_DAYS = 365.0
# |z| above 4 has probability ~6e-5 per comparison under the model, so a failure means a real discrepancy.
Z_LIMIT = 4.0

SCENARIOS = {
    # CDNOW's estimates in days, customers acquired over two years.
    "cdnow_like": (BGNBDParams(r=0.243, alpha=30.9, a=0.793, b=2.426), (1, 730)),
    # Mean rate 0.5 a day (~180 purchases a year, up to ~1500 in the sample), rare dropout.
    "frequent_buyers": (BGNBDParams(r=2.0, alpha=4.0, a=1.5, b=300.0), (30, 730)),
    # One purchase every ~150 days, dropout probability ~0.43 per purchase, ages up to four years.
    "rare_buyers_high_churn": (BGNBDParams(r=0.8, alpha=120.0, a=3.0, b=4.0), (180, 1500)),
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[BGNBDParams, SimulatedCustomers]:
    params, (youngest, oldest) = SCENARIOS[request.param]
    rng = np.random.default_rng(2024)
    ages = rng.integers(youngest, oldest + 1, N_CUSTOMERS).astype(np.float64)
    return params, simulate_bgnbd(params, ages, rng, holdout=HOLDOUT_DAYS)


def grouped_z_scores(residuals: np.ndarray, order: np.ndarray, n_groups: int = 5) -> list[float]:
    """Sum of residuals over groups of customers, in units of its standard error (residual mean 0 under H0)."""
    scores = []
    for group in np.array_split(order, n_groups):
        total = residuals[group].sum()
        spread = math.sqrt(float((residuals[group] ** 2).sum()))
        scores.append(0.0 if spread == 0.0 and total == 0.0 else total / spread)
    return scores


def test_fit_recovers_the_simulated_parameters(scenario: tuple[BGNBDParams, SimulatedCustomers]) -> None:
    truth, sim = scenario
    fit = fit_bgnbd(sim.x, sim.t_x, sim.T)
    assert fit.fallback is None
    assert fit.converged
    assert fit.n_customers == N_CUSTOMERS
    covariance = np.linalg.inv(-bgnbd_log_likelihood_hessian(fit.params, sim.x, sim.t_x, sim.T))
    standard_errors = np.sqrt(np.diag(covariance))
    # The check has teeth: every parameter is pinned down to a few percent at this sample size.
    assert np.all(standard_errors / truth.as_array() < 0.05)
    z = (fit.params.as_array() - truth.as_array()) / standard_errors
    assert np.all(np.abs(z) < Z_LIMIT), z


@pytest.mark.parametrize("use_fitted", [False, True], ids=["true_params", "fitted_params"])
def test_holdout_purchases_and_alive_match_simulation(
    scenario: tuple[BGNBDParams, SimulatedCustomers], use_fitted: bool
) -> None:
    truth, sim = scenario
    params = fit_bgnbd(sim.x, sim.t_x, sim.T).params if use_fitted else truth
    by_frequency = np.argsort(sim.x, kind="stable")
    predicted = expected_purchases(params, HOLDOUT_DAYS, sim.x, sim.t_x, sim.T)
    assert np.all(np.isfinite(predicted))
    holdout_z = grouped_z_scores(sim.holdout_purchases - predicted, by_frequency)
    assert max(abs(z) for z in holdout_z) < Z_LIMIT, holdout_z
    alive = probability_alive(params, sim.x, sim.t_x, sim.T)
    alive_z = grouped_z_scores(sim.alive - alive, by_frequency)
    assert max(abs(z) for z in alive_z) < Z_LIMIT, alive_z


@pytest.mark.parametrize("horizon", [30.0, 365.0, 1500.0])
def test_new_customer_expectation_matches_simulation(horizon: float) -> None:
    rng = np.random.default_rng(11)
    for params, _ in SCENARIOS.values():
        sim = simulate_bgnbd(params, np.full(N_CUSTOMERS, horizon), rng)
        expected = float(expected_purchases_new_customer(params, horizon))
        standard_error = sim.x.std() / math.sqrt(N_CUSTOMERS)
        assert abs(sim.x.mean() - expected) < Z_LIMIT * standard_error


def test_weighted_rows_give_the_same_fit_as_one_row_per_customer() -> None:
    params, (youngest, oldest) = SCENARIOS["cdnow_like"]
    rng = np.random.default_rng(5)
    sim = simulate_bgnbd(params, rng.integers(youngest, oldest + 1, 20_000).astype(np.float64), rng)
    t_x = np.round(sim.t_x)
    rows, counts = np.unique(np.column_stack([sim.x, t_x, sim.T]), axis=0, return_counts=True)
    per_customer = fit_bgnbd(sim.x, t_x, sim.T)
    weighted = fit_bgnbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=counts)
    assert per_customer.fallback is None
    assert weighted.fallback is None
    assert weighted.n_customers == per_customer.n_customers == 20_000
    assert weighted.n_rows == per_customer.n_rows == len(rows)
    np.testing.assert_allclose(weighted.params.as_array(), per_customer.params.as_array(), rtol=1e-7)
    assert weighted.log_likelihood == pytest.approx(per_customer.log_likelihood, rel=1e-10)


EXTREME_X = np.array([5000.0, 0.0, 1.0, 3000.0, 20.0])
EXTREME_TX = np.array([19_990.0, 0.0, 0.0, 10_000.0, 20_000.0])
EXTREME_T = np.array([20_000.0, 20_000.0, 20_000.0, 15_000.0, 20_000.0])


@pytest.mark.parametrize(
    "params",
    [BGNBDParams(r=0.25, alpha=30.0, a=0.8, b=2.5), BGNBDParams(r=3.0, alpha=2.0, a=1.2, b=400.0)],
    ids=["cdnow_like", "frequent"],
)
def test_likelihood_gradient_and_hessian_are_finite_and_exact_at_extremes(params: BGNBDParams) -> None:
    ll = bgnbd_log_likelihood(params, EXTREME_X, EXTREME_TX, EXTREME_T)
    gradient = bgnbd_log_likelihood_gradient(params, EXTREME_X, EXTREME_TX, EXTREME_T)
    hessian = bgnbd_log_likelihood_hessian(params, EXTREME_X, EXTREME_TX, EXTREME_T)
    assert math.isfinite(ll)
    assert np.all(np.isfinite(gradient))
    assert np.all(np.isfinite(hessian))
    theta = params.as_array()
    for i in range(4):
        step = 1e-6 * theta[i]
        up, down = theta.copy(), theta.copy()
        up[i] += step
        down[i] -= step
        ll_up = bgnbd_log_likelihood(BGNBDParams(*up), EXTREME_X, EXTREME_TX, EXTREME_T)
        ll_down = bgnbd_log_likelihood(BGNBDParams(*down), EXTREME_X, EXTREME_TX, EXTREME_T)
        assert (ll_up - ll_down) / (2 * step) == pytest.approx(gradient[i], rel=1e-5, abs=1e-6 * abs(ll) / theta[i])
        grad_up = bgnbd_log_likelihood_gradient(BGNBDParams(*up), EXTREME_X, EXTREME_TX, EXTREME_T)
        grad_down = bgnbd_log_likelihood_gradient(BGNBDParams(*down), EXTREME_X, EXTREME_TX, EXTREME_T)
        scale = np.abs(gradient).max() / theta[i] + np.abs(hessian[:, i]).max()
        np.testing.assert_allclose((grad_up - grad_down) / (2 * step), hessian[:, i], rtol=1e-5, atol=1e-6 * scale)


def purchases_if_alive_by_quadrature(params: BGNBDParams, t: float, x: float, age: float) -> float:
    """E[(1 - (1 + p u)^-(r + x)) / p] for p ~ Beta(a, b + x), u = t / (alpha + age), by adaptive quadrature.

    Integrates over s = log p (dp / p = ds), splitting at the Beta mode and at the purchase-saturation point.
    """
    k, beta, u, a = params.r + x, params.b + x, t / (params.alpha + age), params.a
    log_norm = betaln(a, beta)

    def integrand(s: float) -> float:
        p = math.exp(s)
        return -math.expm1(-k * math.log1p(p * u)) * math.exp((a - 1) * s + (beta - 1) * math.log1p(-p) - log_norm)

    mode = math.log(a / (a + beta))
    breaks = sorted({mode, -math.log1p(u), -math.log(k * u), mode - 5 / math.sqrt(a), mode + 3 / math.sqrt(a)})
    breaks = [point for point in breaks if point < 0]
    edges = [min(-60 / a, breaks[0] - 40 / a), *breaks, 0.0]
    return sum(quad(integrand, lo, hi, limit=1000, epsabs=0, epsrel=1e-12)[0] for lo, hi in pairwise(edges))


@pytest.mark.parametrize(
    ("params", "t", "x", "age"),
    [
        (BGNBDParams(0.243, 30.9, 0.793, 2.426), 365.0, 2.0, 200.0),
        (BGNBDParams(0.243, 30.9, 0.793, 2.426), 365.0, 5000.0, 20_000.0),
        (BGNBDParams(0.243, 30.9, 0.793, 2.426), 365.0, 20_000.0, 7300.0),
        (BGNBDParams(2.0, 4.0, 1.5, 300.0), 3650.0, 0.0, 0.0),
        (BGNBDParams(0.5, 10.0, 1.0, 2.0), 365.0, 3.0, 100.0),
        (BGNBDParams(0.5, 10.0, 1.00005, 2.0), 365.0, 3.0, 100.0),
        (BGNBDParams(0.2, 30.0, 0.3, 0.7), 365.0, 0.0, 0.0),
        (BGNBDParams(0.5, 0.01, 0.5, 0.2), 36_500.0, 0.0, 0.0),
        (BGNBDParams(50.0, 1.0, 10.0, 0.2), 1000.0, 0.0, 0.0),
        # Corners where scipy's hyp2f1 returns NaN and the quadrature takes over.
        (BGNBDParams(0.2, 1.0, 0.3, 300.0), 1200.0, 0.0, 0.0),
        (BGNBDParams(2.0, 30.0, 5.0, 100.0), 365.0, 0.0, 0.0),
        (BGNBDParams(2.0, 1.0, 5.0, 1.0), 300.0, 1000.0, 29.0),
    ],
    ids=[
        "cdnow",
        "x5000",
        "x20000",
        "frequent_new",
        "a_one",
        "a_near_one",
        "c_zero",
        "z_near_one",
        "large_r",
        "large_b_young",
        "integer_a",
        "integer_a_large_x",
    ],
)
@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # reference reports 1e-12 unreachable
def test_closed_form_matches_numerical_integration(params: BGNBDParams, t: float, x: float, age: float) -> None:
    # t_x = T makes P(alive) easy to divide out; for x = 0 it is 1.
    alive = float(probability_alive(params, x, age, age))
    value = float(expected_purchases(params, t, x, age, age)) / alive
    assert value == pytest.approx(purchases_if_alive_by_quadrature(params, t, x, age), rel=1e-7)


def test_quadrature_safety_net_agrees_with_the_closed_form_where_both_work() -> None:
    rng = np.random.default_rng(9)
    n = 400
    for _ in range(5):
        a = float(10 ** rng.uniform(-1.3, 1.5))
        beta = 10 ** rng.uniform(-1, 4, n)
        k = 10 ** rng.uniform(-1.5, 4, n)
        u = 10 ** rng.uniform(-3, 4, n)
        closed = _closed_form_any_a(a, beta, k, u / (1 + u))
        usable = np.isfinite(closed)
        assert usable.mean() > 0.8
        # The closed form subtracts nearly equal numbers when u k is small: absolute error ~eps (a + beta) / |a - 1|.
        cancellation = 1e-14 * (a + beta[usable]) / abs(a - 1)
        quadrature = quadrature_if_alive(a, beta[usable], k[usable], u[usable])
        assert np.all(np.abs(quadrature - closed[usable]) <= 1e-8 * closed[usable] + cancellation)


def test_predictions_are_finite_and_bounded_for_extreme_inputs() -> None:
    x = np.array([0, 1, 5000, 100_000, 3000, 1, 0], dtype=np.float64)
    t_x = np.array([0, 0, 19_990, 36_500, 0, 36_500, 0], dtype=np.float64)
    T = np.array([0, 36_500, 20_000, 36_500, 36_500, 36_500, 1e-9], dtype=np.float64)
    for params in [DEFAULT_BGNBD_PARAMS, BGNBDParams(5.0, 0.5, 0.05, 1000.0), BGNBDParams(0.01, 5000.0, 20.0, 0.1)]:
        alive = probability_alive(params, x, t_x, T)
        assert np.all((alive >= 0) & (alive <= 1))
        for horizon in [0.0, 1.0, 365.0, 36_500.0]:
            purchases = expected_purchases(params, horizon, x, t_x, T)
            assert np.all(np.isfinite(purchases))
            assert np.all(purchases >= 0)
        shorter = expected_purchases(params, 30.0, x, t_x, T)
        longer = expected_purchases(params, 365.0, x, t_x, T)
        assert np.all(longer >= shorter)
    assert np.all(expected_purchases(DEFAULT_BGNBD_PARAMS, 0.0, x, t_x, T) == 0)


def test_prediction_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="invalid"):
        probability_alive(DEFAULT_BGNBD_PARAMS, [1.0], [5.0], [4.0])
    with pytest.raises(ValueError, match="invalid"):
        expected_purchases(DEFAULT_BGNBD_PARAMS, 10.0, [np.nan], [0.0], [4.0])
    with pytest.raises(ValueError, match="t must be"):
        expected_purchases_new_customer(DEFAULT_BGNBD_PARAMS, -1.0)
    with pytest.raises(ValueError, match="positive"):
        BGNBDParams(r=0.0, alpha=1.0, a=1.0, b=1.0)


def population(n: int, repeaters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.zeros(n)
    x[:repeaters] = 1 + np.arange(repeaters) % 4
    t_x = np.where(x > 0, 10.0 + np.arange(n) % 50, 0.0)
    T = 100.0 + np.arange(n) % 30
    return x, t_x, T


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (population(50, 20), "too few customers"),
        (population(2000, 0), "nobody made a repeat purchase"),
        (population(2000, 150), "too few repeat customers"),
        ((np.full(1000, 2.0), np.full(1000, 10.0), np.full(1000, 100.0)), "same (x, t_x, T)"),
        ((np.array([1.0, np.nan]), np.array([0.0, 0.0]), np.array([5.0, 5.0])), "non-finite"),
        ((np.array([1.0]), np.array([6.0]), np.array([5.0])), "t_x must be <= T"),
        ((np.array([-1.0]), np.array([0.0]), np.array([5.0])), "non-negative integer"),
        ((np.array([1.5]), np.array([0.0]), np.array([5.0])), "non-negative integer"),
        ((np.ones(3), np.ones(2), np.ones(3)), "same length"),
        ((np.array(["a"]), np.array([0.0]), np.array([5.0])), "unexpected error"),
    ],
    ids=[
        "tiny",
        "nobody_repeats",
        "few_repeaters",
        "identical_rows",
        "nan",
        "t_x_after_T",
        "negative_x",
        "fractional_x",
        "ragged",
        "not_numbers",
    ],
)
def test_fit_falls_back_to_defaults_with_a_reason(data: tuple[np.ndarray, np.ndarray, np.ndarray], reason: str) -> None:
    fit = fit_bgnbd(*data)
    assert fit.fallback is not None
    assert reason in fit.fallback
    assert fit.params == DEFAULT_BGNBD_PARAMS
    assert not fit.converged
    assert fit.log_likelihood is None or math.isfinite(fit.log_likelihood)
    predicted = expected_purchases(fit.params, 365.0, [0.0, 3.0], [0.0, 20.0], [100.0, 100.0])
    assert np.all(np.isfinite(predicted))


def test_fallback_defaults_follow_the_time_unit_and_weights() -> None:
    fit = fit_bgnbd(*population(50, 20), time_unit="week")
    assert fit.params.alpha == pytest.approx(4.4136)
    assert fit.time_unit == "week"
    negative = fit_bgnbd(*population(1000, 400), weights=-np.ones(1000))
    assert negative.fallback is not None
    assert "weights" in negative.fallback
    unknown = fit_bgnbd(*population(1000, 400), time_unit="fortnight")  # type: ignore[arg-type]
    assert unknown.fallback is not None
    assert "time unit" in unknown.fallback


def test_data_that_do_not_identify_the_model_fall_back() -> None:
    # Identical purchase rates and nobody ever dropping out: the likelihood keeps rising as r, alpha -> inf
    # and a -> 0, so there is no finite estimate.
    rng = np.random.default_rng(3)
    T = rng.integers(100, 400, 5000).astype(np.float64)
    x = rng.poisson(0.05 * T).astype(np.float64)
    t_x = np.where(x > 0, T * rng.beta(np.maximum(x, 1), 1), 0.0)
    fit = fit_bgnbd(x, t_x, T)
    assert fit.fallback is not None
    assert "degenerate" in fit.fallback or "converge" in fit.fallback
    assert fit.params == DEFAULT_BGNBD_PARAMS


def test_a_large_population_that_does_not_identify_the_model_falls_back_from_its_subset() -> None:
    # The same unidentifiable data, but more distinct rows than the warm start uses: the subset's degenerate
    # estimate settles it, without following the flat ridge over every row.
    rng = np.random.default_rng(5)
    T = rng.integers(100, 1100, 80_000).astype(np.float64)
    x = rng.poisson(0.05 * T).astype(np.float64)
    t_x = np.where(x > 0, np.floor(T * rng.beta(np.maximum(x, 1), 1)), 0.0)
    fit = fit_bgnbd(x, t_x, T)
    assert fit.fallback is not None
    assert "degenerate" in fit.fallback
    assert "stratified subset" in fit.fallback
    assert fit.params == DEFAULT_BGNBD_PARAMS
