"""From figures to scores: the purchase models fitted once, predictions, and percentile scores 0-100.

A score is the customer's percentile among scored customers (those with a paid order): the share of them with a
strictly lower value, so tied values share the lower rank and a figure that is zero for most scores 0 for them.
A full run computes it exactly and keeps a grid of cut-offs; re-scoring one customer between runs places their
value on that grid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from loyalty.scoring.config import ScoringConfig
from loyalty.scoring.figures import Figures, FloatArray, ReferralFigures
from loyalty.scoring.models import (
    DEFAULT_BGNBD_PARAMS,
    BGNBDFit,
    BGNBDParams,
    GammaGammaFit,
    GammaGammaParams,
    default_gamma_gamma_params,
    fit_bgnbd,
    fit_gamma_gamma,
    predict,
)

SCORE_NAMES = ("value", "frequency", "influence")
# 1001 points: a customer re-scored between runs lands within 0.1 of the percentile a full run would give.
CUTOFF_POINTS = 1001


@dataclass(frozen=True)
class ScoringModel:
    """What a full run fitted and measured, kept in its run record for re-scoring single customers."""

    bgnbd: BGNBDParams
    gamma_gamma: GammaGammaParams
    cutoffs: dict[str, list[float]]
    mean_order_value: float

    @classmethod
    def initial(cls) -> ScoringModel:
        """Before any full run: documented default parameters and no population to rank against."""
        return cls(DEFAULT_BGNBD_PARAMS, default_gamma_gamma_params(), {}, 0.0)

    @functools.cached_property
    def grids(self) -> dict[str, FloatArray]:
        """The cut-offs as arrays, for ``rank_on_cutoffs``: made once per model, not once per re-scored order
        (turning three lists of 1001 floats into arrays was a third of the ranking's time)."""
        return {name: np.asarray(grid or [], dtype=np.float64) for name, grid in self.cutoffs.items()}

    @classmethod
    def from_record(cls, model: dict[str, Any], cutoffs: dict[str, list[float]]) -> ScoringModel:
        bg, gg = model["bgnbd"], model["gamma_gamma"]
        return cls(
            BGNBDParams(r=bg["r"], alpha=bg["alpha"], a=bg["a"], b=bg["b"]),
            GammaGammaParams(p=gg["p"], q=gg["q"], gamma=gg["gamma"]),
            cutoffs,
            float(model.get("mean_order_value", 0.0)),
        )


@dataclass
class Scores:
    """Model outputs, score inputs and scores, aligned with the figures they came from."""

    expected_purchases: FloatArray
    p_alive: FloatArray
    expected_spend: FloatArray
    predicted_value: FloatArray
    raw: dict[str, FloatArray]
    score: dict[str, FloatArray]


def fit_models(figures: Figures) -> tuple[BGNBDFit, GammaGammaFit]:
    """Fit BG/NBD on every scored customer and Gamma-Gamma on the repeaters; never raises."""
    scored = figures.scored
    x, t_x, age = figures.frequency[scored], figures.recency[scored], figures.age[scored]
    bgnbd = fit_bgnbd(x, t_x, age)
    gamma_gamma = fit_gamma_gamma(figures.mean_repeat_spend[scored], x)
    return bgnbd, gamma_gamma


def model_record(bgnbd: BGNBDFit, gamma_gamma: GammaGammaFit, mean_order_value: float) -> dict[str, Any]:
    """The run record's `model` (API.md): parameters with log-likelihoods, time unit and any fallback."""
    fallbacks = []
    if bgnbd.fallback:
        fallbacks.append(f"bgnbd: {bgnbd.fallback}")
    if gamma_gamma.fallback:
        fallbacks.append(f"gamma_gamma: {gamma_gamma.fallback}")
    bg, gg = bgnbd.params, gamma_gamma.params
    return {
        "bgnbd": {"r": bg.r, "alpha": bg.alpha, "a": bg.a, "b": bg.b, "log_likelihood": bgnbd.log_likelihood},
        "gamma_gamma": {"p": gg.p, "q": gg.q, "gamma": gg.gamma, "log_likelihood": gamma_gamma.log_likelihood},
        "time_unit": bgnbd.time_unit,
        "fallback": "; ".join(fallbacks) or None,
        "customers_fitted": bgnbd.n_customers,
        "repeaters_fitted": gamma_gamma.n_customers,
        "mean_order_value": mean_order_value,
    }


def mean_order_value(figures: Figures) -> float:
    orders = float(figures.paid_orders.sum())
    return float(figures.lifetime_spend.sum() / orders) if orders > 0 else 0.0


def score_inputs(
    figures: Figures,
    referrals: ReferralFigures,
    bgnbd: BGNBDParams,
    gamma_gamma: GammaGammaParams,
    config: ScoringConfig,
    order_value: float,
) -> Scores:
    """Predictions and the raw value behind each score; scores are filled in by a ranking function."""
    scored = figures.scored
    # The models are defined for customers with a purchase; everyone else predicts nothing.
    x, t_x, age = figures.frequency[scored], figures.recency[scored], figures.age[scored]
    mean_spend = figures.mean_repeat_spend[scored]
    horizon = float(config.horizon_days)

    def spread(values: FloatArray) -> FloatArray:
        full = np.zeros(len(figures), dtype=np.float64)
        full[scored] = _safe(values)
        return full

    predictions = predict(
        bgnbd,
        gamma_gamma,
        x,
        t_x,
        age,
        mean_spend,
        horizon_days=horizon,
        annual_discount_rate=config.annual_discount_rate,
    )
    purchases = spread(predictions.expected_purchases)
    alive = spread(predictions.probability_alive)
    spend = spread(predictions.expected_spend)
    value = spread(predictions.predicted_value)
    weights = config.influence
    revenue_in_orders = referrals.referred_revenue / order_value if order_value > 0 else np.zeros(len(figures))
    influence = (
        weights.converted_referral * referrals.converted_referrals
        + weights.referred_revenue * revenue_in_orders
        + weights.review * figures.reviews
        + weights.share * figures.shares
    )
    raw = {
        "value": config.value_blend * value + (1.0 - config.value_blend) * figures.net_spend,
        "frequency": purchases,
        "influence": influence.astype(np.float64),
    }
    return Scores(purchases, alive, spend, value, raw, {})


def _safe(values: FloatArray) -> FloatArray:
    """Model outputs are finite by construction; this keeps one odd row from ever writing NaN (or an infinity).

    ``np.where`` rather than ``np.nan_to_num``: the same zeros, at a fraction of its fixed cost, which the
    real-time path pays four times for every order it re-scores."""
    array = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(array), array, 0.0)


def rank_exactly(scores: Scores, scored: NDArray[np.bool_]) -> dict[str, list[float]]:
    """Exact percentiles over the scored population; returns the cut-off grid to keep with the run."""
    cutoffs: dict[str, list[float]] = {}
    population = int(scored.sum())
    for name in SCORE_NAMES:
        raw = scores.raw[name]
        ordered = np.sort(raw[scored])
        if population == 0:
            scores.score[name] = np.zeros_like(raw)
            cutoffs[name] = []
            continue
        lower = np.searchsorted(ordered, raw, side="left")
        scores.score[name] = np.where(scored, np.round(100.0 * lower / population, 2), 0.0)
        grid = np.quantile(ordered, np.linspace(0.0, 1.0, CUTOFF_POINTS), method="inverted_cdf")
        cutoffs[name] = [float(v) for v in grid]
    return cutoffs


def rank_on_cutoffs(
    scores: Scores, scored: NDArray[np.bool_], cutoffs: Mapping[str, Sequence[float] | FloatArray]
) -> None:
    """Percentiles read off a full run's cut-off grid (0 for everyone before the first run)."""
    for name in SCORE_NAMES:
        raw = scores.raw[name]
        listed = cutoffs.get(name)
        grid = np.asarray(listed if listed is not None else [], dtype=np.float64)
        if grid.size == 0:
            scores.score[name] = np.zeros_like(raw)
            continue
        lower = np.searchsorted(grid, raw, side="left")
        scores.score[name] = np.where(scored, np.round(100.0 * lower / grid.size, 2), 0.0)


def raw_for_score(cutoffs: dict[str, list[float]], name: str, target_score: float) -> float | None:
    """The smallest raw value that reaches ``target_score`` on the grid (for progress texts)."""
    grid = cutoffs.get(name) or []
    if not grid:
        return None
    position = min(len(grid) - 1, max(0, math.ceil(target_score / 100.0 * len(grid))))
    # Reaching the percentile needs strictly more than the values ranked below it.
    below = grid[position - 1] if position > 0 else grid[0]
    return float(np.nextafter(below, math.inf)) if position > 0 else float(grid[0])
