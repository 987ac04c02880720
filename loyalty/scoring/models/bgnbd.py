"""BG/NBD purchase model (Fader, Hardie & Lee 2005, "Counting your customers the easy way").

A customer buys at Poisson rate lambda ~ Gamma(r, alpha) (shape r, rate alpha) while alive and, after each repeat
purchase, drops out for good with probability p ~ Beta(a, b). A customer is summarised by x (repeat purchase
occasions), t_x (time from the first to the last occasion; 0 when x = 0) and T (time from the first occasion to
the end of observation). Times are in days throughout the service; alpha carries the time unit, r, a and b are
unit-free.

Fitting (`fit_bgnbd`) maximises the likelihood over the distinct (x, t_x, T) rows with integer weights, with an
exact-Hessian trust-region Newton method on log-parameters, from a deterministic start (r = 1, a = 1, b = 3 and
alpha matching the population's purchase rate), warm-started on a stratified subset of 20,000 rows when there
are more distinct rows than that.

The fit never raises. It returns the defaults below, with `fallback` saying why, when:
- an input is malformed: arrays of different lengths, non-finite values, negative or non-integer x, t_x < 0,
  t_x > T, negative weights, or an unknown time unit;
- fewer than MIN_CUSTOMERS = 500 customers (summed weights), or fewer than MIN_REPEATERS = 200 of them with
  x > 0 (this includes nobody repeating), or all customers share one (x, t_x, T) row;
- the optimiser does not converge, or an estimate leaves [1e-6, 1e6] (alpha relative to the mean T), which means
  the likelihood keeps improving towards a degenerate limit the data cannot pin down, or the result is not finite.

DEFAULT_BGNBD_PARAMS are the published CDNOW estimates (r = 0.2426, alpha = 4.4136 weeks, a = 0.7929,
b = 2.4259) with alpha converted to days (x 7): a mean purchase rate r / alpha of 2.9 a year while alive, and
1.44 repeat purchases expected in a new customer's first year.

Predictions are finite for every valid input, including x in the thousands and T of decades: the
likelihood uses log-gamma/log-beta differences and log-sum-exp, probability_alive a logistic of a
log-odds, and the conditional expectation an Euler-transformed Gauss hypergeometric function whose parameters
stay moderate as x grows, with a quadrature for the corners where the special function fails (see
_alive_expectation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import digamma, expit, gammaln, polygamma

from loyalty.scoring.models._alive_expectation import purchases_if_alive
from loyalty.scoring.models._columns import (
    CollapsedRows,
    FloatArray,
    as_float_vector,
    collapse_rows,
    stratified_subset,
)
from loyalty.scoring.models._optimise import LOG_PARAMETER_LIMIT, mean_objective, minimise

TimeUnit = Literal["day", "week"]
DAYS_PER_TIME_UNIT: dict[str, float] = {"day": 1.0, "week": 7.0}

MIN_CUSTOMERS = 500
MIN_REPEATERS = 200

# Warm start on a subset first when the full data have more distinct rows than this.
_WARM_START_ROWS = 20_000
_GTOL = 1e-10
_ACCEPT_GTOL = 1e-6
_MAX_ITERATIONS = 200


@dataclass(frozen=True, slots=True)
class BGNBDParams:
    """BG/NBD parameters; alpha is in the time unit of the data (days in the service)."""

    r: float
    alpha: float
    a: float
    b: float

    def __post_init__(self) -> None:
        for name in ("r", "alpha", "a", "b"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"BG/NBD parameter {name} must be finite and positive, got {value!r}")

    def as_array(self) -> FloatArray:
        return np.array([self.r, self.alpha, self.a, self.b], dtype=np.float64)

    def rescale_time(self, factor: float) -> BGNBDParams:
        """The same model for times multiplied by factor (days to weeks: factor = 1 / 7)."""
        return BGNBDParams(r=self.r, alpha=self.alpha * factor, a=self.a, b=self.b)


DEFAULT_BGNBD_PARAMS = BGNBDParams(r=0.2426, alpha=4.4136 * 7.0, a=0.7929, b=2.4259)


@dataclass(frozen=True, slots=True)
class BGNBDFit:
    """Outcome of fit_bgnbd; `fallback` is None when params are the maximum-likelihood estimates."""

    params: BGNBDParams
    log_likelihood: float | None
    n_customers: int
    n_rows: int
    converged: bool
    fallback: str | None
    iterations: int
    time_unit: str = "day"


class _Likelihood:
    """Log-likelihood with gradient and Hessian over collapsed (x, t_x, T) rows.

    Terms that depend on x alone or on T alone are summed per distinct value; only the log-sum-exp of the
    "still alive" and "dropped out after the last purchase" branches is evaluated per row of repeaters.
    """

    def __init__(self, rows: CollapsedRows) -> None:
        x_levels, tx_levels, T_levels = rows.levels
        x_codes, tx_codes, T_codes = rows.codes
        weights = rows.weights
        self.total_weight = float(weights.sum())
        self.x_levels = x_levels
        self.weight_by_x = np.bincount(x_codes, weights, minlength=x_levels.size)
        self.T_levels = T_levels
        self.weight_by_T = np.bincount(T_codes, weights, minlength=T_levels.size)
        self.purchases_by_T = np.bincount(T_codes, weights * x_levels[x_codes], minlength=T_levels.size)
        self.tx_levels = tx_levels
        repeater = x_levels[x_codes] > 0
        self.repeater_T_codes = T_codes[repeater]
        self.repeater_tx_codes = tx_codes[repeater]
        self.repeater_weights = weights[repeater]
        repeater_x = x_levels[x_codes[repeater]]
        self.repeater_x = repeater_x
        # Collapsed rows are sorted by x, so repeaters with equal x are contiguous groups.
        if repeater_x.size:
            self.group_starts = np.flatnonzero(np.concatenate(([True], repeater_x[1:] != repeater_x[:-1])))
        else:
            self.group_starts = np.empty(0, dtype=np.intp)
        self.group_x = repeater_x[self.group_starts]
        self.group_sizes = np.diff(np.append(self.group_starts, repeater_x.size))

    def _by_group(self, values: FloatArray) -> FloatArray:
        if self.group_starts.size == 0:
            return np.empty(0, dtype=np.float64)
        return np.add.reduceat(values, self.group_starts)

    def evaluate(self, theta: FloatArray, with_hessian: bool) -> tuple[float, FloatArray, FloatArray]:
        """Log-likelihood, gradient and (optionally) Hessian with respect to (r, alpha, a, b)."""
        r, alpha, a, b = (float(v) for v in theta)
        n = self.total_weight
        xs, wx = self.x_levels, self.weight_by_x
        gradient = np.zeros(4)
        hessian = np.zeros((4, 4))

        # Gamma(r + x) alpha^r / Gamma(r) and B(a, b + x) / B(a, b): depend on x only.
        log_lik = float(
            wx @ (gammaln(r + xs) + gammaln(b + xs) - gammaln(a + b + xs))
            + n * (r * math.log(alpha) - gammaln(r) + gammaln(a + b) - gammaln(b))
        )
        psi_ab = float(digamma(a + b))
        psi_abx = float(wx @ digamma(a + b + xs))
        gradient[0] = float(wx @ digamma(r + xs)) + n * (math.log(alpha) - float(digamma(r)))
        gradient[1] = n * r / alpha
        gradient[2] = n * psi_ab - psi_abx
        gradient[3] = float(wx @ digamma(b + xs)) + n * (psi_ab - float(digamma(b))) - psi_abx
        if with_hessian:
            tri_ab = float(polygamma(1, a + b))
            tri_abx = float(wx @ polygamma(1, a + b + xs))
            hessian[0, 0] = float(wx @ polygamma(1, r + xs)) - n * float(polygamma(1, r))
            hessian[0, 1] = n / alpha
            hessian[1, 1] = -n * r / alpha**2
            hessian[2, 2] = n * tri_ab - tri_abx
            hessian[2, 3] = n * tri_ab - tri_abx
            hessian[3, 3] = float(wx @ polygamma(1, b + xs)) + n * (tri_ab - float(polygamma(1, b))) - tri_abx

        # (alpha + T)^-(r + x): the alive branch, factored out of the log-sum-exp; depends on T only.
        log_alpha_T = np.log(alpha + self.T_levels)
        inv_alpha_T = 1.0 / (alpha + self.T_levels)
        exponent_weight = r * self.weight_by_T + self.purchases_by_T
        log_lik -= float(exponent_weight @ log_alpha_T)
        gradient[0] -= float(self.weight_by_T @ log_alpha_T)
        gradient[1] -= float(exponent_weight @ inv_alpha_T)
        if with_hessian:
            hessian[0, 1] -= float(self.weight_by_T @ inv_alpha_T)
            hessian[1, 1] += float(exponent_weight @ inv_alpha_T**2)

        if self.repeater_x.size:
            log_lik += self._add_dropout_branch(r, alpha, a, b, gradient, hessian, with_hessian)

        if with_hessian:
            hessian = np.triu(hessian) + np.triu(hessian, 1).T
        return log_lik, gradient, hessian

    def _add_dropout_branch(
        self,
        r: float,
        alpha: float,
        a: float,
        b: float,
        gradient: FloatArray,
        hessian: FloatArray,
        with_hessian: bool,
    ) -> float:
        """Adds softplus(d) per repeater row, d = log of the dropout-branch to alive-branch likelihood ratio."""
        log_alpha_T = np.log(alpha + self.T_levels)
        log_alpha_tx = np.log(alpha + self.tx_levels)
        inv_alpha_T = 1.0 / (alpha + self.T_levels)
        inv_alpha_tx = 1.0 / (alpha + self.tx_levels)
        log_gap = log_alpha_T[self.repeater_T_codes] - log_alpha_tx[self.repeater_tx_codes]
        inv_gap = inv_alpha_T[self.repeater_T_codes] - inv_alpha_tx[self.repeater_tx_codes]
        group_inv_b = 1.0 / (b + self.group_x - 1.0)
        group_log_odds = math.log(a) + np.log(group_inv_b)
        group_k = r + self.group_x
        k = r + self.repeater_x
        d = np.repeat(group_log_odds, self.group_sizes) + k * log_gap
        tail = np.exp(-np.abs(d))
        softplus = np.maximum(d, 0.0) + np.log1p(tail)
        sigma = np.where(d >= 0.0, 1.0, tail) / (1.0 + tail)
        w = self.repeater_weights
        ws = w * sigma
        k_inv_gap = k * inv_gap
        group_s = self._by_group(ws)
        gradient[0] += float(ws @ log_gap)
        gradient[1] += float(ws @ k_inv_gap)
        gradient[2] += float(group_s.sum()) / a
        gradient[3] -= float(group_s @ group_inv_b)
        if with_hessian:
            wv = ws * (1.0 - sigma)
            group_v = self._by_group(wv)
            group_v_log = self._by_group(wv * log_gap)
            group_v_inv = self._by_group(wv * inv_gap)
            inv_gap_sq = inv_alpha_T[self.repeater_T_codes] ** 2 - inv_alpha_tx[self.repeater_tx_codes] ** 2
            hessian[0, 0] += float(wv @ log_gap**2)
            hessian[0, 1] += float(wv @ (log_gap * k_inv_gap)) + float(ws @ inv_gap)
            hessian[0, 2] += float(group_v_log.sum()) / a
            hessian[0, 3] -= float(group_v_log @ group_inv_b)
            hessian[1, 1] += float(wv @ k_inv_gap**2) - float(ws @ (k * inv_gap_sq))
            hessian[1, 2] += float(group_v_inv @ group_k) / a
            hessian[1, 3] -= float(group_v_inv @ (group_k * group_inv_b))
            hessian[2, 2] += float(group_v.sum() - group_s.sum()) / a**2
            hessian[2, 3] -= float(group_v @ group_inv_b) / a
            hessian[3, 3] += float((group_v + group_s) @ group_inv_b**2)
        return float(w @ softplus)


def _validated_rows(
    x: ArrayLike, t_x: ArrayLike, T: ArrayLike, weights: ArrayLike | None
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray | None] | str:
    """Float vectors with x = 0 rows given t_x = 0 (the likelihood ignores it), or the reason they are unusable."""
    xv, txv, Tv = as_float_vector(x), as_float_vector(t_x), as_float_vector(T)
    wv = None if weights is None else as_float_vector(weights)
    sizes = {xv.size, txv.size, Tv.size} | (set() if wv is None else {wv.size})
    if len(sizes) != 1:
        return "x, t_x, T and weights must have the same length"
    problems = []
    finite = np.isfinite(xv) & np.isfinite(txv) & np.isfinite(Tv)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} rows with non-finite values")
    if np.any((xv < 0) | (xv != np.floor(xv))):
        problems.append("x must be a non-negative integer")
    if np.any(txv < 0):
        problems.append("t_x must be >= 0")
    if np.any(txv > Tv):
        problems.append("t_x must be <= T")
    if wv is not None and not np.all(np.isfinite(wv) & (wv >= 0)):
        problems.append("weights must be finite and >= 0")
    if problems:
        return "invalid input: " + "; ".join(problems)
    if wv is not None:
        kept = wv > 0
        if not kept.all():
            xv, txv, Tv, wv = xv[kept], txv[kept], Tv[kept], wv[kept]
    txv = np.where(xv > 0, txv, 0.0)
    return xv, txv, Tv, wv


def _fallback_fit(
    reason: str, time_unit: str, likelihood: _Likelihood | None, n_rows: int, iterations: int = 0
) -> BGNBDFit:
    unit = time_unit if time_unit in DAYS_PER_TIME_UNIT else "day"
    params = DEFAULT_BGNBD_PARAMS.rescale_time(1.0 / DAYS_PER_TIME_UNIT[unit])
    log_likelihood = None
    n_customers = 0
    if likelihood is not None:
        n_customers = round(likelihood.total_weight)
        if n_customers > 0:
            value = likelihood.evaluate(params.as_array(), with_hessian=False)[0]
            log_likelihood = value if math.isfinite(value) else None
    return BGNBDFit(
        params=params,
        log_likelihood=log_likelihood,
        n_customers=n_customers,
        n_rows=n_rows,
        converged=False,
        fallback=reason,
        iterations=iterations,
        time_unit=unit,
    )


def fit_bgnbd(
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,
    weights: ArrayLike | None = None,
    *,
    time_unit: TimeUnit = "day",
) -> BGNBDFit:
    """Maximum-likelihood BG/NBD fit; never raises, falls back to DEFAULT_BGNBD_PARAMS (see module docstring).

    Rows may be one per customer (weights=None) or already collapsed with integer weights; identical rows are
    collapsed here either way. `iterations` counts Newton iterations, including those of the warm start.
    """
    try:
        return _fit_bgnbd(x, t_x, T, weights, time_unit)
    except Exception as error:  # the fit must degrade to the defaults, whatever went wrong
        return _fallback_fit(f"unexpected error: {type(error).__name__}: {error}", time_unit, None, 0)


def _fit_bgnbd(x: ArrayLike, t_x: ArrayLike, T: ArrayLike, weights: ArrayLike | None, time_unit: str) -> BGNBDFit:
    if time_unit not in DAYS_PER_TIME_UNIT:
        return _fallback_fit(f"unknown time unit {time_unit!r}", time_unit, None, 0)
    validated = _validated_rows(x, t_x, T, weights)
    if isinstance(validated, str):
        return _fallback_fit(validated, time_unit, None, 0)
    xv, txv, Tv, wv = validated
    rows = collapse_rows([xv, txv, Tv], wv)
    likelihood = _Likelihood(rows)
    n_customers = likelihood.total_weight
    n_repeaters = float(likelihood.repeater_weights.sum())
    reason = None
    if n_customers < MIN_CUSTOMERS:
        reason = f"too few customers to fit: {n_customers:.0f} < {MIN_CUSTOMERS}"
    elif n_repeaters == 0:
        reason = "nobody made a repeat purchase"
    elif n_repeaters < MIN_REPEATERS:
        reason = f"too few repeat customers to fit: {n_repeaters:.0f} < {MIN_REPEATERS}"
    elif rows.n_rows == 1:
        reason = "all customers have the same (x, t_x, T)"
    if reason is not None:
        return _fallback_fit(reason, time_unit, likelihood, rows.n_rows)

    mean_T = float(rows.weights @ rows.column(2)) / n_customers
    time_scale = mean_T if mean_T > 0 else 1.0
    scale = np.array([1.0, time_scale, 1.0, 1.0])
    # With r = 1 the prior mean purchase rate r / alpha matches purchases per unit of observed time.
    purchases = float(rows.weights @ rows.column(0))
    exposure = float(rows.weights @ rows.column(2))
    start_alpha = exposure / purchases if exposure > 0 else 1.0
    start = np.log(np.array([1.0, start_alpha / time_scale, 1.0, 3.0]))

    iterations = 0
    if rows.n_rows > _WARM_START_ROWS:
        subset_rows = stratified_subset(rows, _WARM_START_ROWS)
        subset = _Likelihood(subset_rows)
        warm = minimise(mean_objective(subset, scale), start, 1e-7, 1e-5, _MAX_ITERATIONS)
        iterations += warm.iterations
        if np.any(np.abs(warm.log_params) > LOG_PARAMETER_LIMIT):
            # A stratified subset that runs off to a limit (converged there or stopped on the way) means the data
            # cannot identify a parameter (typically no visible dropout: b -> infinity). The full data follows the
            # same flat ridge at many times the cost per iteration (tens of seconds at a million customers), only
            # to reach the same fallback.
            estimate = ", ".join(
                f"{name}={value:.6g}"
                for name, value in zip(("r", "alpha", "a", "b"), scale * np.exp(warm.log_params), strict=True)
            )
            return _fallback_fit(
                f"estimate at a degenerate limit the data cannot identify (on a stratified subset of "
                f"{subset_rows.n_rows} rows: {estimate})",
                time_unit,
                likelihood,
                rows.n_rows,
                iterations,
            )
        if warm.converged:
            start = warm.log_params
    result = minimise(mean_objective(likelihood, scale), start, _GTOL, _ACCEPT_GTOL, _MAX_ITERATIONS)
    iterations += result.iterations
    if not result.converged:
        return _fallback_fit(
            f"optimiser did not converge: {result.message}", time_unit, likelihood, rows.n_rows, iterations
        )
    theta = scale * np.exp(result.log_params)
    estimate = ", ".join(f"{name}={value:.6g}" for name, value in zip(("r", "alpha", "a", "b"), theta, strict=True))
    if np.any(np.abs(result.log_params) > LOG_PARAMETER_LIMIT):
        return _fallback_fit(
            f"estimate at a degenerate limit the data cannot identify ({estimate})",
            time_unit,
            likelihood,
            rows.n_rows,
            iterations,
        )
    log_likelihood = -result.mean_negative_log_likelihood * n_customers
    if not (np.all(np.isfinite(theta)) and math.isfinite(log_likelihood)):
        return _fallback_fit(f"non-finite estimate ({estimate})", time_unit, likelihood, rows.n_rows, iterations)
    return BGNBDFit(
        params=BGNBDParams(*(float(v) for v in theta)),
        log_likelihood=log_likelihood,
        n_customers=round(n_customers),
        n_rows=rows.n_rows,
        converged=True,
        fallback=None,
        iterations=iterations,
        time_unit=time_unit,
    )


def _likelihood_for(x: ArrayLike, t_x: ArrayLike, T: ArrayLike, weights: ArrayLike | None) -> _Likelihood:
    validated = _validated_rows(x, t_x, T, weights)
    if isinstance(validated, str):
        raise ValueError(validated)
    xv, txv, Tv, wv = validated
    return _Likelihood(collapse_rows([xv, txv, Tv], wv))


def bgnbd_log_likelihood(
    params: BGNBDParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike, weights: ArrayLike | None = None
) -> float:
    """Total (weighted) log-likelihood, a density in the time unit of the data; raises ValueError on bad input."""
    return _likelihood_for(x, t_x, T, weights).evaluate(params.as_array(), with_hessian=False)[0]


def bgnbd_log_likelihood_gradient(
    params: BGNBDParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike, weights: ArrayLike | None = None
) -> FloatArray:
    """Analytic gradient of bgnbd_log_likelihood with respect to (r, alpha, a, b)."""
    return _likelihood_for(x, t_x, T, weights).evaluate(params.as_array(), with_hessian=False)[1]


def bgnbd_log_likelihood_hessian(
    params: BGNBDParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike, weights: ArrayLike | None = None
) -> FloatArray:
    """Analytic Hessian of bgnbd_log_likelihood; its negative inverse at the estimate is the covariance."""
    return _likelihood_for(x, t_x, T, weights).evaluate(params.as_array(), with_hessian=True)[2]


def _customer_arrays(x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    xv, txv, Tv = np.broadcast_arrays(
        np.asarray(x, dtype=np.float64), np.asarray(t_x, dtype=np.float64), np.asarray(T, dtype=np.float64)
    )
    valid = np.isfinite(xv) & np.isfinite(txv) & np.isfinite(Tv) & (xv >= 0) & (txv >= 0) & (txv <= Tv)
    if not valid.all():
        raise ValueError(
            f"{int((~valid).sum())} customers with invalid (x, t_x, T): need finite x >= 0 and 0 <= t_x <= T"
        )
    return xv, txv, Tv


def _log_odds_dropped_out(params: BGNBDParams, x: FloatArray, t_x: FloatArray, T: FloatArray) -> FloatArray:
    """log P(dropped out after the last purchase | data) - log P(alive | data); -inf when x = 0."""
    repeat = x > 0
    log_ratio = (params.r + x) * (np.log(params.alpha + T) - np.log(params.alpha + t_x))
    with np.errstate(divide="ignore"):
        log_prior_odds = math.log(params.a) - np.log(np.where(repeat, params.b + x - 1.0, 1.0))
    return np.where(repeat, log_prior_odds + log_ratio, -np.inf)


def probability_alive(params: BGNBDParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> FloatArray:
    """P(customer still alive at T | x, t_x, T); 1 when x = 0, since BG/NBD drops out only after a purchase."""
    xv, txv, Tv = _customer_arrays(x, t_x, T)
    return np.asarray(expit(-_log_odds_dropped_out(params, xv, txv, Tv)), dtype=np.float64)


def _purchases_if_alive(params: BGNBDParams, t: FloatArray, x: FloatArray, T: FloatArray) -> FloatArray:
    """E[purchases in (T, T + t] | alive at T, x, T] (see _alive_expectation)."""
    return purchases_if_alive(params.r, params.alpha, params.a, params.b, t, x, T)


def expected_purchases(params: BGNBDParams, t: ArrayLike, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> FloatArray:
    """E[purchases in the next t | x, t_x, T] (Fader, Hardie & Lee 2005, eq. 10); raises ValueError on bad input."""
    xv, txv, Tv = _customer_arrays(x, t_x, T)
    tv = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(tv) & (tv >= 0)):
        raise ValueError("t must be finite and >= 0")
    tv, xv, txv, Tv = np.broadcast_arrays(tv, xv, txv, Tv)
    alive = expit(-_log_odds_dropped_out(params, xv, txv, Tv))
    return np.asarray(alive * _purchases_if_alive(params, tv, xv, Tv), dtype=np.float64)


def expected_purchases_new_customer(params: BGNBDParams, t: ArrayLike) -> FloatArray:
    """E[X(t)]: expected repeat purchases in a period of length t after a customer's first purchase."""
    tv = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(tv) & (tv >= 0)):
        raise ValueError("t must be finite and >= 0")
    zeros = np.zeros_like(tv)
    return _purchases_if_alive(params, tv, zeros, zeros)
