"""Draws from the BG/NBD and Gamma-Gamma generative processes, for tests and benchmarks.

Times are continuous, in the unit of alpha. The BG/NBD customer makes a first purchase at time 0, buys at
Poisson rate lambda ~ Gamma(r, alpha) while alive, and after each repeat purchase drops out with probability
p ~ Beta(a, b): the number of repeat purchases before dropping out is N ~ Geometric(p) on {1, 2, ...}.
With K ~ Poisson(lambda T) arrivals in (0, T], x = min(K, N) and, given K, the x-th arrival time is T times a
Beta(x, K - x + 1) order statistic; the customer is alive at T when N > K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from loyalty.scoring.models._columns import FloatArray, as_float_vector
from loyalty.scoring.models.bgnbd import BGNBDParams
from loyalty.scoring.models.gamma_gamma import GammaGammaParams


@dataclass(frozen=True, slots=True)
class SimulatedCustomers:
    """Calibration summaries plus the latent truth and a holdout period after T."""

    x: FloatArray
    t_x: FloatArray
    T: FloatArray
    alive: NDArray[np.bool_]
    purchase_rate: FloatArray
    dropout_probability: FloatArray
    holdout_purchases: FloatArray


def simulate_bgnbd(
    params: BGNBDParams, T: ArrayLike, rng: np.random.Generator, holdout: float = 0.0
) -> SimulatedCustomers:
    """One customer per entry of T; holdout_purchases counts repeat purchases in (T, T + holdout]."""
    ages = as_float_vector(T)
    n = ages.size
    rate = rng.gamma(params.r, 1.0 / params.alpha, n)
    dropout = rng.beta(params.a, params.b, n)
    arrivals = rng.poisson(rate * ages)
    allowed = rng.geometric(dropout)
    x = np.minimum(arrivals, allowed)
    t_x = np.zeros(n)
    repeat = x > 0
    t_x[repeat] = ages[repeat] * rng.beta(x[repeat], arrivals[repeat] - x[repeat] + 1)
    alive = allowed > arrivals
    holdout_purchases = np.zeros(n)
    if holdout > 0:
        # Inter-purchase times are memoryless and the count until dropout is geometric, so an alive customer
        # restarts at T with N - K purchases left.
        later = rng.poisson(rate[alive] * holdout)
        holdout_purchases[alive] = np.minimum(later, allowed[alive] - arrivals[alive])
    return SimulatedCustomers(
        x=x.astype(np.float64),
        t_x=t_x,
        T=ages,
        alive=alive,
        purchase_rate=rate,
        dropout_probability=dropout,
        holdout_purchases=holdout_purchases,
    )


@dataclass(frozen=True, slots=True)
class SimulatedSpend:
    """Mean value of each customer's x repeat purchases (0 when x = 0) and their true mean value p / nu."""

    mean_spend: FloatArray
    true_mean_spend: FloatArray


def simulate_gamma_gamma(params: GammaGammaParams, x: ArrayLike, rng: np.random.Generator) -> SimulatedSpend:
    """Purchase values z ~ Gamma(p, nu), nu ~ Gamma(q, gamma); the sum of x of them is Gamma(p x, nu)."""
    counts = as_float_vector(x)
    nu = rng.gamma(params.q, 1.0 / params.gamma, counts.size)
    mean_spend = np.zeros(counts.size)
    repeat = counts > 0
    mean_spend[repeat] = rng.gamma(params.p * counts[repeat], 1.0 / nu[repeat]) / counts[repeat]
    return SimulatedSpend(mean_spend=mean_spend, true_mean_spend=params.p / nu)
