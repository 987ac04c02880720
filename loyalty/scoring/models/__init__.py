"""Purchase models for predicted customer value: BG/NBD, Gamma-Gamma and the transaction summaries they use.

Pure NumPy/SciPy, columnar: fits take per-customer (or collapsed, weighted) arrays, predictions take chunks of
arrays. Time unit: days. Fallback rules and defaults are documented in the bgnbd and gamma_gamma modules.
"""

from loyalty.scoring.models.bgnbd import (
    DEFAULT_BGNBD_PARAMS,
    BGNBDFit,
    BGNBDParams,
    bgnbd_log_likelihood,
    bgnbd_log_likelihood_gradient,
    bgnbd_log_likelihood_hessian,
    expected_purchases,
    expected_purchases_new_customer,
    fit_bgnbd,
    probability_alive,
)
from loyalty.scoring.models.gamma_gamma import (
    CDNOW_GAMMA_GAMMA_PARAMS,
    GammaGammaFit,
    GammaGammaParams,
    default_gamma_gamma_params,
    expected_spend,
    fit_gamma_gamma,
    gamma_gamma_log_likelihood,
)
from loyalty.scoring.models.transactions import CustomerSummary, summarise_transactions
from loyalty.scoring.models.value import Predictions, predict

__all__ = [
    "CDNOW_GAMMA_GAMMA_PARAMS",
    "DEFAULT_BGNBD_PARAMS",
    "BGNBDFit",
    "BGNBDParams",
    "CustomerSummary",
    "GammaGammaFit",
    "GammaGammaParams",
    "Predictions",
    "bgnbd_log_likelihood",
    "bgnbd_log_likelihood_gradient",
    "bgnbd_log_likelihood_hessian",
    "default_gamma_gamma_params",
    "expected_purchases",
    "expected_purchases_new_customer",
    "expected_spend",
    "fit_bgnbd",
    "fit_gamma_gamma",
    "gamma_gamma_log_likelihood",
    "predict",
    "probability_alive",
    "summarise_transactions",
]
