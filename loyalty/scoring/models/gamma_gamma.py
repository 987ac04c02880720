"""Gamma-Gamma spend model (Fader, Hardie & Lee 2005, "RFM and CLV"; Colombo & Jiang 1999).

Each purchase of a customer is worth z ~ Gamma(p, nu) (shape p, rate nu) and nu ~ Gamma(q, gamma) across
customers, independently of the purchase process. A repeat customer is summarised by x (repeat occasions) and
mean_spend (the mean value of those x occasions); customers with x = 0 carry no spend information here. The
log-likelihood is the density of mean_spend given x, constants included (about -4055.9 on CDNOW).

`fit_gamma_gamma` maximises the weighted likelihood over the customers with x > 0 and mean_spend > 0; repeat
customers with mean_spend <= 0 (refunds, free orders) are outside the model's support and are left out and
counted in `n_excluded`. Like the BG/NBD fit it uses an exact-Hessian Newton method on log-parameters from a
deterministic start and never raises. It falls back to default parameters, with `fallback` saying why, when:
- an input is malformed: arrays of different lengths, negative or non-finite x, non-finite mean_spend for a
  customer with x > 0, or negative/non-finite weights;
- fewer than MIN_REPEATERS = 200 repeat customers with positive spend (summed weights), or all of them share one
  mean_spend;
- the optimiser does not converge, an estimate leaves [1e-6, 1e6] (gamma relative to the mean spend), the
  estimate has q <= 1 (the population's mean spend would be infinite), or the result is not finite.

Fallback rule: the shape parameters of the published CDNOW estimates (p = 6.25, q = 3.74) with gamma set so
that the population mean spend p * gamma / (q - 1) equals the weighted mean of the usable repeat mean spends:
each customer's expected spend is then their own mean shrunk towards the population mean with CDNOW's strength
(weight p * x / (p * x + q - 1) on their own mean). With no usable spend at all, gamma = 15.44 (CDNOW's value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import digamma, gammaln, polygamma

from loyalty.scoring.models._columns import (
    CollapsedRows,
    FloatArray,
    as_float_vector,
    collapse_rows,
    stratified_subset,
)
from loyalty.scoring.models._optimise import LOG_PARAMETER_LIMIT, mean_objective, minimise

MIN_REPEATERS = 200

_WARM_START_ROWS = 20_000
_GTOL = 1e-10
_ACCEPT_GTOL = 1e-6
_MAX_ITERATIONS = 200


@dataclass(frozen=True, slots=True)
class GammaGammaParams:
    """Gamma-Gamma parameters; gamma is in money units, p and q are unit-free; q > 1 for a finite mean."""

    p: float
    q: float
    gamma: float

    def __post_init__(self) -> None:
        for name in ("p", "q", "gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"Gamma-Gamma parameter {name} must be finite and positive, got {value!r}")
        if self.q <= 1.0:
            raise ValueError(f"Gamma-Gamma q must exceed 1 for a finite mean spend, got {self.q!r}")

    @property
    def population_mean_spend(self) -> float:
        """Mean spend per purchase of a customer with no spend history."""
        return self.p * self.gamma / (self.q - 1.0)


CDNOW_GAMMA_GAMMA_PARAMS = GammaGammaParams(p=6.25, q=3.74, gamma=15.44)


def default_gamma_gamma_params(population_mean_spend: float | None = None) -> GammaGammaParams:
    """CDNOW's shape parameters with gamma matching the given population mean spend (if positive and finite)."""
    shape = CDNOW_GAMMA_GAMMA_PARAMS
    if population_mean_spend is None or not (math.isfinite(population_mean_spend) and population_mean_spend > 0):
        return shape
    return GammaGammaParams(p=shape.p, q=shape.q, gamma=population_mean_spend * (shape.q - 1.0) / shape.p)


@dataclass(frozen=True, slots=True)
class GammaGammaFit:
    """Outcome of fit_gamma_gamma; `fallback` is None when params are the maximum-likelihood estimates."""

    params: GammaGammaParams
    log_likelihood: float | None
    n_customers: int
    n_rows: int
    n_excluded: int
    converged: bool
    fallback: str | None
    iterations: int


class _Likelihood:
    """Log-likelihood with gradient and Hessian over collapsed (x, mean_spend) rows of repeat customers."""

    def __init__(self, rows: CollapsedRows) -> None:
        x_levels, _ = rows.levels
        x_codes, _ = rows.codes
        weights = rows.weights
        x = rows.column(0)
        spend = rows.column(1)
        self.total_weight = float(weights.sum())
        self.x_levels = x_levels
        self.weight_by_x = np.bincount(x_codes, weights, minlength=x_levels.size)
        self.weights = weights
        self.weighted_x = weights * x
        self.x_spend = x * spend
        log_spend = np.log(spend)
        self.sum_log_spend = float(weights @ log_spend)
        self.sum_x_log_spend = float(self.weighted_x @ log_spend)
        self.sum_x_log_x = float(self.weight_by_x @ (x_levels * np.log(x_levels)))

    def evaluate(self, theta: FloatArray, with_hessian: bool) -> tuple[float, FloatArray, FloatArray]:
        """Log-likelihood, gradient and (optionally) Hessian with respect to (p, q, gamma)."""
        p, q, gamma = (float(v) for v in theta)
        n = self.total_weight
        xs, wx = self.x_levels, self.weight_by_x
        shape = p * xs + q
        log_gamma = math.log(gamma)
        denominator = self.x_spend + gamma
        log_denominator = np.log(denominator)
        inverse = 1.0 / denominator
        sum_log = float(self.weights @ log_denominator)
        sum_x_log = float(self.weighted_x @ log_denominator)
        sum_inv = float(self.weights @ inverse)
        sum_x_inv = float(self.weighted_x @ inverse)

        log_lik = (
            float(wx @ (gammaln(shape) - gammaln(p * xs)))
            - n * float(gammaln(q))
            + n * q * log_gamma
            + p * self.sum_x_log_spend
            - self.sum_log_spend
            + p * self.sum_x_log_x
            - p * sum_x_log
            - q * sum_log
        )
        psi_shape = digamma(shape)
        gradient = np.array(
            [
                float(wx @ (xs * (psi_shape - digamma(p * xs)))) + self.sum_x_log_spend + self.sum_x_log_x - sum_x_log,
                float(wx @ psi_shape) - n * float(digamma(q)) + n * log_gamma - sum_log,
                n * q / gamma - p * sum_x_inv - q * sum_inv,
            ]
        )
        hessian = np.zeros((3, 3))
        if with_hessian:
            tri_shape = polygamma(1, shape)
            sum_inv_sq = float(self.weights @ inverse**2)
            sum_x_inv_sq = float(self.weighted_x @ inverse**2)
            hessian[0, 0] = float(wx @ (xs**2 * (tri_shape - polygamma(1, p * xs))))
            hessian[0, 1] = float(wx @ (xs * tri_shape))
            hessian[0, 2] = -sum_x_inv
            hessian[1, 1] = float(wx @ tri_shape) - n * float(polygamma(1, q))
            hessian[1, 2] = n / gamma - sum_inv
            hessian[2, 2] = -n * q / gamma**2 + p * sum_x_inv_sq + q * sum_inv_sq
            hessian = np.triu(hessian) + np.triu(hessian, 1).T
        return log_lik, gradient, hessian


def _usable_rows(
    mean_spend: ArrayLike, x: ArrayLike, weights: ArrayLike | None
) -> tuple[FloatArray, FloatArray, FloatArray | None, int] | str:
    """Repeat customers with positive spend (and the weight of those left out), or why the input is unusable."""
    spend, xv = as_float_vector(mean_spend), as_float_vector(x)
    wv = None if weights is None else as_float_vector(weights)
    if spend.size != xv.size or (wv is not None and wv.size != xv.size):
        return "mean_spend, x and weights must have the same length"
    problems = []
    if not np.all(np.isfinite(xv) & (xv >= 0)):
        problems.append("x must be finite and >= 0")
    repeat = xv > 0
    if not np.all(np.isfinite(spend[repeat])):
        problems.append("mean_spend must be finite for customers with x > 0")
    if wv is not None and not np.all(np.isfinite(wv) & (wv >= 0)):
        problems.append("weights must be finite and >= 0")
    if problems:
        return "invalid input: " + "; ".join(problems)
    counted = repeat if wv is None else repeat & (wv > 0)
    usable = counted & (spend > 0)
    excluded = counted & ~usable
    n_excluded = int(excluded.sum()) if wv is None else round(float(wv[excluded].sum()))
    return spend[usable], xv[usable], None if wv is None else wv[usable], n_excluded


def _fallback_fit(
    reason: str,
    likelihood: _Likelihood | None,
    n_rows: int,
    n_excluded: int,
    mean_spend: float | None,
    iterations: int = 0,
) -> GammaGammaFit:
    params = default_gamma_gamma_params(mean_spend)
    log_likelihood = None
    n_customers = 0
    if likelihood is not None:
        n_customers = round(likelihood.total_weight)
        if n_customers > 0:
            value = likelihood.evaluate(np.array([params.p, params.q, params.gamma]), with_hessian=False)[0]
            log_likelihood = value if math.isfinite(value) else None
    return GammaGammaFit(
        params=params,
        log_likelihood=log_likelihood,
        n_customers=n_customers,
        n_rows=n_rows,
        n_excluded=n_excluded,
        converged=False,
        fallback=reason,
        iterations=iterations,
    )


def fit_gamma_gamma(mean_spend: ArrayLike, x: ArrayLike, weights: ArrayLike | None = None) -> GammaGammaFit:
    """Maximum-likelihood Gamma-Gamma fit on repeat customers; never raises (fallbacks in the module docstring).

    Takes every customer (x = 0 rows are ignored) so callers can pass the columns of a CustomerSummary.
    """
    try:
        return _fit_gamma_gamma(mean_spend, x, weights)
    except Exception as error:  # the fit must degrade to the defaults, whatever went wrong
        return _fallback_fit(f"unexpected error: {type(error).__name__}: {error}", None, 0, 0, None)


def _fit_gamma_gamma(mean_spend: ArrayLike, x: ArrayLike, weights: ArrayLike | None) -> GammaGammaFit:
    usable = _usable_rows(mean_spend, x, weights)
    if isinstance(usable, str):
        return _fallback_fit(usable, None, 0, 0, None)
    spend, xv, wv, n_excluded = usable
    if spend.size == 0:
        return _fallback_fit("no repeat customers with positive spend", None, 0, n_excluded, None)
    rows = collapse_rows([xv, spend], wv)
    likelihood = _Likelihood(rows)
    n_customers = likelihood.total_weight
    mean_of_spend = float(rows.weights @ rows.column(1)) / n_customers

    def fallback(reason: str, iterations: int = 0) -> GammaGammaFit:
        return _fallback_fit(reason, likelihood, rows.n_rows, n_excluded, mean_of_spend, iterations)

    if n_customers < MIN_REPEATERS:
        return fallback(f"too few repeat customers with positive spend: {n_customers:.0f} < {MIN_REPEATERS}")
    if rows.levels[1].size == 1:
        return fallback("all repeat customers have the same mean spend")

    scale = np.array([1.0, 1.0, mean_of_spend])
    # Start at CDNOW-like shapes with the prior mean p * gamma / (q - 1) equal to the observed mean spend.
    start = np.log(np.array([4.0, 3.0, 0.5]))
    iterations = 0
    if rows.n_rows > _WARM_START_ROWS:
        subset = _Likelihood(stratified_subset(rows, _WARM_START_ROWS))
        warm = minimise(mean_objective(subset, scale), start, 1e-7, 1e-5, _MAX_ITERATIONS)
        iterations += warm.iterations
        if warm.converged and np.all(np.abs(warm.log_params) <= LOG_PARAMETER_LIMIT):
            start = warm.log_params
    result = minimise(mean_objective(likelihood, scale), start, _GTOL, _ACCEPT_GTOL, _MAX_ITERATIONS)
    iterations += result.iterations
    if not result.converged:
        return fallback(f"optimiser did not converge: {result.message}", iterations)
    theta = scale * np.exp(result.log_params)
    estimate = ", ".join(f"{name}={value:.6g}" for name, value in zip(("p", "q", "gamma"), theta, strict=True))
    if np.any(np.abs(result.log_params) > LOG_PARAMETER_LIMIT):
        return fallback(f"estimate at a degenerate limit the data cannot identify ({estimate})", iterations)
    log_likelihood = -result.mean_negative_log_likelihood * n_customers
    if not (np.all(np.isfinite(theta)) and math.isfinite(log_likelihood)):
        return fallback(f"non-finite estimate ({estimate})", iterations)
    if theta[1] <= 1.0:
        return fallback(f"estimate has q <= 1, so the mean spend would be infinite ({estimate})", iterations)
    return GammaGammaFit(
        params=GammaGammaParams(p=float(theta[0]), q=float(theta[1]), gamma=float(theta[2])),
        log_likelihood=log_likelihood,
        n_customers=round(n_customers),
        n_rows=rows.n_rows,
        n_excluded=n_excluded,
        converged=True,
        fallback=None,
        iterations=iterations,
    )


def gamma_gamma_log_likelihood(
    params: GammaGammaParams, mean_spend: ArrayLike, x: ArrayLike, weights: ArrayLike | None = None
) -> float:
    """Total log-likelihood over repeat customers with positive spend; raises ValueError on malformed input."""
    usable = _usable_rows(mean_spend, x, weights)
    if isinstance(usable, str):
        raise ValueError(usable)
    spend, xv, wv, _ = usable
    if spend.size == 0:
        return 0.0
    likelihood = _Likelihood(collapse_rows([xv, spend], wv))
    return likelihood.evaluate(np.array([params.p, params.q, params.gamma]), with_hessian=False)[0]


def expected_spend(params: GammaGammaParams, mean_spend: ArrayLike, x: ArrayLike) -> FloatArray:
    """E[value of a purchase | mean_spend, x] = (gamma + x * mean_spend) * p / (p * x + q - 1).

    Customers with x = 0 get the population mean. A negative mean_spend (net refunds) counts as 0, so the
    estimate never goes below zero. Raises ValueError for non-finite inputs or x < 0.
    """
    spend = np.asarray(mean_spend, dtype=np.float64)
    xv = np.asarray(x, dtype=np.float64)
    spend, xv = np.broadcast_arrays(spend, xv)
    if not np.all(np.isfinite(xv) & (xv >= 0)):
        raise ValueError("x must be finite and >= 0")
    if not np.all(np.isfinite(spend) | (xv == 0)):
        raise ValueError("mean_spend must be finite for customers with x > 0")
    observed = np.where(xv > 0, np.maximum(np.where(np.isfinite(spend), spend, 0.0), 0.0), 0.0)
    return np.asarray((params.gamma + xv * observed) * params.p / (params.p * xv + params.q - 1.0), dtype=np.float64)
