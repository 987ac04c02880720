"""Newton-type maximum likelihood over log-parameters, shared by the purchase models."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.optimize import minimize

from loyalty.scoring.models._columns import FloatArray

# Mean negative log-likelihood, its gradient and Hessian with respect to the log-parameters.
Evaluation = tuple[float, FloatArray, FloatArray]
Evaluator = Callable[[FloatArray], Evaluation]

# Parameters beyond e^±LOG_PARAMETER_LIMIT (relative to the data's own scale) mean the likelihood keeps
# improving towards a degenerate limit (no heterogeneity, nobody drops out...): the data do not identify them.
LOG_PARAMETER_LIMIT = float(np.log(1e6))
# Far outside the limit the special functions overflow, so trial steps beyond this box are simply rejected.
_LOG_PARAMETER_BOX = 60.0


class Likelihood(Protocol):
    """A weighted log-likelihood with its gradient and Hessian in the natural parameters theta."""

    total_weight: float

    def evaluate(self, theta: FloatArray, with_hessian: bool) -> tuple[float, FloatArray, FloatArray]: ...


def mean_objective(likelihood: Likelihood, scale: FloatArray) -> Evaluator:
    """Mean negative log-likelihood over log(theta / scale), with gradient and Hessian by the chain rule.

    Optimising the mean keeps gradient tolerances independent of the number of customers, and log(theta / scale)
    makes every parameter unit-free and positive.
    """

    def evaluate(log_params: FloatArray) -> Evaluation:
        theta = scale * np.exp(log_params)
        log_lik, gradient, hessian = likelihood.evaluate(theta, with_hessian=True)
        n = likelihood.total_weight
        log_gradient = theta * gradient
        log_hessian = np.outer(theta, theta) * hessian + np.diag(log_gradient)
        return -log_lik / n, -log_gradient / n, -log_hessian / n

    return evaluate


@dataclass(frozen=True, slots=True)
class OptimisationResult:
    log_params: FloatArray
    mean_negative_log_likelihood: float
    converged: bool
    iterations: int
    message: str


class _Memo:
    """Caches the last evaluation, because scipy asks for the value/gradient and the Hessian separately."""

    def __init__(self, evaluate: Evaluator) -> None:
        self._evaluate = evaluate
        self._point: FloatArray | None = None
        self._result: Evaluation | None = None

    def __call__(self, point: FloatArray) -> Evaluation:
        if self._point is None or self._result is None or not np.array_equal(point, self._point):
            if np.all(np.abs(point) <= _LOG_PARAMETER_BOX):
                value, gradient, hessian = self._evaluate(point)
            else:
                value, gradient, hessian = np.inf, np.zeros_like(point), np.eye(point.size)
            if not np.isfinite(value):
                # An infinite trial value makes the trust region shrink and reject the step.
                value = np.inf
            self._point = point.copy()
            self._result = (value, gradient, hessian)
        return self._result

    def value_and_gradient(self, point: FloatArray) -> tuple[float, FloatArray]:
        value, gradient, _ = self(point)
        return value, gradient

    def hessian(self, point: FloatArray) -> FloatArray:
        return self(point)[2]


def minimise(
    evaluate: Evaluator, start: FloatArray, gtol: float, accept_gtol: float, max_iterations: int
) -> OptimisationResult:
    """Exact-Hessian trust-region minimisation of a mean negative log-likelihood.

    The likelihoods here are cheap to differentiate twice analytically, and a Newton method converges
    quadratically, so a handful of passes over millions of rows reaches full precision. scipy gives up without
    "success" when rounding stops it from predicting any further decrease; a point whose gradient norm is below
    accept_gtol is still an optimum then.
    """
    memo = _Memo(evaluate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = minimize(
            memo.value_and_gradient,
            start,
            jac=True,
            hess=memo.hessian,
            method="trust-exact",
            options={"gtol": gtol, "maxiter": max_iterations},
        )
    log_params = np.asarray(result.x, dtype=np.float64)
    value, gradient, _ = memo(log_params)
    gradient_norm = float(np.linalg.norm(gradient))
    converged = (
        bool(np.all(np.isfinite(log_params)))
        and bool(np.isfinite(value))
        and np.isfinite(gradient_norm)
        and (bool(result.success) or gradient_norm <= accept_gtol)
    )
    return OptimisationResult(log_params, float(value), converged, int(result.nit), str(result.message))
