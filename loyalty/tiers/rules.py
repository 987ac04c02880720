"""Tier rules: which tier a customer's figures earn, why, what the next tier needs, and what to store.

Pure: no web or database code, so the same functions serve the set-based recalculation (millions of customers, in
chunks), the preview of a candidate config and the real-time path (one customer per request).

- ``evaluate`` decides the tier a customer qualifies for, with the explanation and the progress to the next tier;
  ``evaluate_many`` does it for an iterable; ``decide_tier`` and ``rank_many`` (columnar, numpy) skip the texts
  for callers that only count tiers, such as the preview.
- ``assign`` turns a decision into what is stored, applying upgrades at once, the retention grace before a
  downgrade, and marketing pins.

Ranking: the paying tiers in file order (earlier = higher), then ``prospect`` lowest, wherever it sits in the file
and even when the file leaves it out (a customer without a paid order is a prospect either way).

Comparisons are inclusive and tolerate float noise of one part in 10⁹ of the threshold, so a net spend summed to
199.99999999997 meets ``gte = 200`` and ``eq = 1`` matches an occasions count of 1.0. A score or figure absent from
the facts (or NaN) fails every condition on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from loyalty.tiers.config import SCORES, Condition, Tier, TiersConfig

PROSPECT = "prospect"
_PROSPECT_FALLBACK_NAME = "Prospect"
_NO_PAID_ORDER = "no paid order yet"
_RELATIVE_TOLERANCE = 1e-9
_EMPTY: Mapping[str, float] = MappingProxyType({})

AssignmentKind = Literal["initial", "upgrade", "downgrade", "pinned", "pin_expired", "unchanged", "held"]


# --- Data -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CustomerFacts:
    """What the rules read about one customer.

    ``paid_orders`` counts orders with a net total above zero: a fully refunded or cancelled order is not paid.
    ``scores`` maps ``value``, ``frequency``, ``influence`` to 0-100; ``figures`` maps names from
    ``loyalty.tiers.config.FIGURES`` to numbers. A name left out makes every condition on it fail.
    """

    paid_orders: int
    scores: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    figures: Mapping[str, float] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True, slots=True)
class Missing:
    """One thing the customer still needs for the next tier: ``figure`` must change by ``needed``.

    ``needed`` is a signed change: positive to rise (``("net_spend", 120.0)``, ``("occasions", 2.0)``), negative to
    fall (``("days_since_last", -10.0)``); counts are whole, money is rounded up to the cent. When the figure is
    unknown, ``needed`` is the threshold itself. Score items a translator cannot turn into an action are named
    ``"<score>_score"`` (``("value_score", 18.0)``).

    ``current`` and ``target`` carry the figure before and after, only for wording ("raise your value score from
    62 to 80"); they take no part in equality, so ``Missing("net_spend", 120.0)`` compares by figure and need, the
    two fields the API publishes.
    """

    figure: str
    needed: float
    current: float | None = field(default=None, compare=False, kw_only=True)
    target: float | None = field(default=None, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class Progress:
    """The way to the next tier up: ``text`` for people, ``missing`` for programs (the same items)."""

    next_tier: str | None
    text: str
    missing: tuple[Missing, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """The tier the facts earn, the conditions that held (none for a tier without conditions), and the texts."""

    tier: str
    matched: tuple[Condition, ...]
    explanation: str
    progress: Progress


@dataclass(frozen=True, slots=True)
class TierState:
    """What is stored for a customer now; every field None for a customer without a tier yet.

    ``below_since`` is when the customer stopped qualifying for ``tier`` (the start of the grace period).
    A pin with ``pinned_until`` None has no end date and stays active until removed.
    """

    tier: str | None
    since: datetime | None
    below_since: datetime | None
    pinned_tier: str | None
    pinned_until: datetime | None


@dataclass(frozen=True, slots=True)
class Assignment:
    """What to store after a decision, and whether it is a change worth a history entry.

    ``changed`` is True only when ``tier`` differs from the stored one; a ``held`` result may still start the grace
    period (``below_since`` set), so store ``below_since`` every time. ``pinned_tier``/``pinned_until`` are the
    pin to keep: the stored one while it is active, None once it has expired (or names a tier no longer
    configured), so that an expired pin is applied once and not again on every later recalculation.
    """

    tier: str
    since: datetime
    below_since: datetime | None
    changed: bool
    kind: AssignmentKind
    reason: str
    pinned_tier: str | None = None
    pinned_until: datetime | None = None


class ScoreTranslator(Protocol):
    """Turns "value score ≥ 80" into something a customer can act on, such as "spend 120.00 more".

    ``missing_for_score`` is asked only for a condition the customer does not meet; ``target`` is the bound it
    fails (``gte``, ``lte`` or ``eq``). Returning None means the translator has nothing to offer for it, and the
    default score wording is used instead. ``phrase`` words the items this translator returned;
    ``phrase_missing`` covers figure names and ``<score>_score`` items for translators that return those.
    """

    def missing_for_score(self, score: str, target: float, facts: CustomerFacts) -> Missing | None: ...

    def phrase(self, missing: Missing) -> str: ...


class DefaultScoreTranslator:
    """Speaks in scores: ``Missing("value_score", 18.0)`` phrased "raise your value score from 62 to 80"."""

    __slots__ = ()

    def missing_for_score(self, score: str, target: float, facts: CustomerFacts) -> Missing | None:
        return _score_points_missing(score, target, facts.scores.get(score))

    def phrase(self, missing: Missing) -> str:
        return phrase_missing(missing)


DEFAULT_TRANSLATOR = DefaultScoreTranslator()


class ColumnScoreTranslator(Protocol):
    """A ``ScoreTranslator`` for many customers at once (``evaluate_columns``): ``offset`` is the customer's place
    in the columns and ``current`` their score (NaN when unknown), in place of the facts of one customer."""

    def missing_for_score_at(self, score: str, target: float, offset: int, current: float) -> Missing | None: ...

    def phrase(self, missing: Missing) -> str: ...


class DefaultColumnTranslator:
    """``DefaultScoreTranslator`` for columns: speaks in score points."""

    __slots__ = ()

    def missing_for_score_at(self, score: str, target: float, offset: int, current: float) -> Missing | None:
        return _score_points_missing(score, target, current)

    def phrase(self, missing: Missing) -> str:
        return phrase_missing(missing)


def _score_points_missing(score: str, target: float, current: float | None) -> Missing:
    if current is None or math.isnan(current):
        return Missing(f"{score}_score", target, target=target)
    return Missing(f"{score}_score", target - current, current=current, target=target)


# --- Words ------------------------------------------------------------------------------------------------------

_Style = Literal["count", "money", "number"]


@dataclass(frozen=True, slots=True)
class _Words:
    singular: str
    plural: str
    style: _Style
    whole: bool = False  # a count of things: what is needed rounds up to whole units


_SCORE_WORDS = {name: _Words(f"{name} score", f"{name} score", "number") for name in SCORES}
# "count" figures read number-first ("3 purchase occasions ≥ 2"); the others label-first ("net spend 240.00").
_FIGURE_WORDS: dict[str, _Words] = {
    "occasions": _Words("purchase occasion", "purchase occasions", "count", whole=True),
    "orders_in_window": _Words("order in the window", "orders in the window", "count", whole=True),
    "net_spend": _Words("net spend", "net spend", "money"),
    "average_order_value": _Words("average order value", "average order value", "money"),
    "days_since_last": _Words("day since the last order", "days since the last order", "count"),
    "predicted_value": _Words("predicted value", "predicted value", "money"),
    "expected_purchases": _Words("expected purchases", "expected purchases", "number"),
    "p_alive": _Words("probability of being active", "probability of being active", "number"),
    "converted_referrals": _Words("converted referral", "converted referrals", "count", whole=True),
    "referred_revenue": _Words("revenue from referred customers", "revenue from referred customers", "money"),
    "reviews": _Words("review", "reviews", "count", whole=True),
    "shares": _Words("social share", "social shares", "count", whole=True),
}


def _plural(count: float, singular: str, plural: str) -> str:
    return singular if count == 1 else plural


def _number(value: float) -> str:
    """At most two decimals and no trailing zeros: 86, 86.5, 0.87."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _money(value: float) -> str:
    return f"{value:.2f}"


def _words_for(name: str) -> _Words:
    return _SCORE_WORDS.get(name) or _FIGURE_WORDS.get(name) or _Words(name, name, "number")


def _format_value(words: _Words, value: float) -> str:
    return _money(value) if words.style == "money" else _number(value)


def _bounds_text(words: _Words, condition: Condition) -> str:
    """The comparison alone: "≥ 80", "= 1", "between 2 and 5"."""
    if condition.eq is not None:
        return f"= {_format_value(words, condition.eq)}"
    if condition.gte is not None and condition.lte is not None:
        return f"between {_format_value(words, condition.gte)} and {_format_value(words, condition.lte)}"
    if condition.gte is not None:
        return f"≥ {_format_value(words, condition.gte)}"
    assert condition.lte is not None  # Condition validation requires a comparison
    return f"≤ {_format_value(words, condition.lte)}"


def _describe_condition(condition: Condition) -> str:
    """The rule without figures: "value score ≥ 80", "purchase occasions ≥ 2"."""
    words = _words_for(condition.subject)
    return f"{words.plural} {_bounds_text(words, condition)}"


def _fact_describer(condition: Condition) -> Callable[[float], str]:
    """The rule with the customer's figure: "value score 86 ≥ 80", "3 purchase occasions ≥ 2"; the words and
    bounds are worked out once per condition, the figure per customer."""
    words = _words_for(condition.subject)
    bounds = _bounds_text(words, condition)
    if words.style == "count":
        singular, plural = words.singular, words.plural
        return lambda value: f"{_number(value)} {_plural(value, singular, plural)} {bounds}"
    return lambda value: f"{words.singular} {_format_value(words, value)} {bounds}"


def describe_rule(tier: Tier) -> str:
    """The entry rule in words, for ``GET /v1/tiers``' ``rule_text``: "value score ≥ 80 or influence score ≥ 90"."""
    if tier.id == PROSPECT:
        return "no paid order yet"
    if not tier.conditions:
        return "any other customer with a paid order"
    joiner = " or " if tier.combinator == "any" else " and "
    return joiner.join(_describe_condition(condition) for condition in tier.conditions)


def _count_action(verb: str, singular: str, plural: str) -> Callable[[float], str]:
    def phrase(amount: float) -> str:
        return f"{verb} {_number(amount)} more {_plural(amount, singular, plural)}"

    return phrase


# How a customer raises each figure; figures without an entry get "raise your <figure> by <amount>".
_RAISE_ACTIONS: dict[str, Callable[[float], str]] = {
    "net_spend": lambda amount: f"spend {_money(amount)} more",
    "occasions": _count_action("place", "order", "orders"),
    "orders_in_window": _count_action("place", "order", "orders"),
    "converted_referrals": lambda amount: (
        f"refer {_number(amount)} more {_plural(amount, 'friend who buys', 'friends who buy')}"
    ),
    "reviews": _count_action("write", "review", "reviews"),
    "shares": _count_action("make", "social share", "social shares"),
    "referred_revenue": lambda amount: f"have the friends you referred spend {_money(amount)} more",
    "days_since_last": lambda amount: f"wait {_number(amount)} more {_plural(amount, 'day', 'days')} without an order",
}


def phrase_missing(missing: Missing) -> str:
    """Plain words for one missing item: "spend 120.00 more", "place 2 more orders", "write 1 more review",
    "refer 1 more friend who buys", "place an order" (days since the last order must fall), "raise your value
    score from 62 to 80". Score translators can delegate the items they express as figures to this."""
    name, needed = missing.figure, missing.needed
    score = name.removesuffix("_score")
    if name != score and score in SCORES:
        return _phrase_score(score, missing)
    words = _words_for(name)
    if needed >= 0:
        action = _RAISE_ACTIONS.get(name)
        if action is not None:
            return action(needed)
        return f"raise your {words.singular} by {_format_value(words, needed)}"
    if name == "days_since_last":
        # Any order brings days since the last order to zero, whatever the bound.
        return "place an order"
    return f"lower your {words.singular} by {_format_value(words, -needed)}"


def _phrase_score(score: str, missing: Missing) -> str:
    label = f"{score} score"
    if missing.current is not None and missing.target is not None:
        verb = "raise" if missing.target >= missing.current else "lower"
        return f"{verb} your {label} from {_number(missing.current)} to {_number(missing.target)}"
    if missing.target is not None:
        return f"raise your {label} to {_number(missing.target)}"
    verb = "raise" if missing.needed >= 0 else "lower"
    return f"{verb} your {label} by {_number(abs(missing.needed))}"


# --- Compiled rules ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Check:
    """A condition reduced to an inclusive interval, so gte, lte, eq and ranges are one comparison."""

    condition: Condition
    is_score: bool
    name: str
    lower: float
    upper: float
    describe: Callable[[float], str] = field(compare=False)  # the fact in words: see _fact_describer

    def value(self, facts: CustomerFacts) -> float:
        return (facts.scores if self.is_score else facts.figures).get(self.name, math.nan)

    def holds(self, value: float) -> bool:
        return self.lower <= value <= self.upper  # False for NaN, i.e. for an absent figure


@dataclass(frozen=True, slots=True)
class _CompiledTier:
    tier: Tier
    checks: tuple[_Check, ...]
    any: bool


@dataclass(frozen=True, slots=True)
class _Rules:
    paying: tuple[_CompiledTier, ...]  # file order, highest first
    prospect_name: str
    order: tuple[str, ...]  # tier ids by rank
    # The same for every customer without a paid order, often most of a shop's list: built once.
    prospect_decision: Decision

    @property
    def prospect_rank(self) -> int:
        return len(self.paying)


def _tolerance(threshold: float) -> float:
    return _RELATIVE_TOLERANCE * max(1.0, abs(threshold))


def _compile_check(condition: Condition) -> _Check:
    lower, upper = -math.inf, math.inf
    if condition.eq is not None:
        lower, upper = condition.eq - _tolerance(condition.eq), condition.eq + _tolerance(condition.eq)
    if condition.gte is not None:
        lower = condition.gte - _tolerance(condition.gte)
    if condition.lte is not None:
        upper = condition.lte + _tolerance(condition.lte)
    return _Check(condition, condition.score is not None, condition.subject, lower, upper, _fact_describer(condition))


def _compile(config: TiersConfig) -> _Rules:
    paying = tuple(
        _CompiledTier(tier, tuple(_compile_check(c) for c in tier.conditions), tier.combinator == "any")
        for tier in config.tier
        if tier.id != PROSPECT
    )
    prospect = config.get(PROSPECT)
    prospect_name = prospect.name if prospect is not None else _PROSPECT_FALLBACK_NAME
    # The lowest paying tier has no conditions (the config guarantees it): a first paid order is all it takes.
    first_order = Progress(paying[-1].tier.id, "place a first order", (Missing("occasions", 1.0, current=0.0),))
    return _Rules(
        paying,
        prospect_name,
        (*(compiled.tier.id for compiled in paying), PROSPECT),
        Decision(PROSPECT, (), f"{prospect_name}: {_NO_PAID_ORDER}", first_order),
    )


# Keyed by id() with the config kept alive alongside, so an id can never be reused by another config while cached;
# a handful of entries covers the live config plus previews of candidates.
_COMPILED: dict[int, tuple[TiersConfig, _Rules]] = {}
_COMPILED_LIMIT = 8


def _rules_for(config: TiersConfig) -> _Rules:
    cached = _COMPILED.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1]
    rules = _compile(config)
    if len(_COMPILED) >= _COMPILED_LIMIT:
        _COMPILED.clear()
    _COMPILED[id(config)] = (config, rules)
    return rules


def rank(config: TiersConfig, tier_id: str) -> int:
    """0 for the first paying tier in the file, then down the file; ``prospect`` ranks last.

    Raises ValueError for an id the config does not define (``prospect`` is always defined).
    """
    try:
        return _rules_for(config).order.index(tier_id)
    except ValueError:
        raise ValueError(f"tier {tier_id!r} is not in the tiers config") from None


def tier_order(config: TiersConfig) -> tuple[str, ...]:
    """Tier ids by rank, highest first, ending with ``prospect``: ``tier_order(config)[rank]`` is the id."""
    return _rules_for(config).order


# --- Evaluation -------------------------------------------------------------------------------------------------


def _tier_index(rules: _Rules, facts: CustomerFacts) -> int:
    if facts.paid_orders <= 0:
        return rules.prospect_rank
    scores, figures = facts.scores, facts.figures
    # An `any` tier is settled by its first condition that holds, an `all` tier by its first that fails. Written
    # out rather than as any()/all() over the check methods: this is the per-customer inner loop of a full run.
    for index, compiled in enumerate(rules.paying):
        matches = not compiled.any
        for check in compiled.checks:
            holds = check.lower <= (scores if check.is_score else figures).get(check.name, math.nan) <= check.upper
            if holds == compiled.any:
                matches = holds
                break
        if matches or not compiled.checks:
            return index
    # Unreachable for a validated config (its last paying tier has no conditions); prospect keeps it total.
    return rules.prospect_rank


def decide_tier(config: TiersConfig, facts: CustomerFacts) -> str:
    """Only the tier id, without explanation or progress: for counting (previews) rather than showing."""
    rules = _rules_for(config)
    return rules.order[_tier_index(rules, facts)]


def evaluate(config: TiersConfig, facts: CustomerFacts, translator: ScoreTranslator | None = None) -> Decision:
    """The tier the facts earn: prospect without a paid order, else the first paying tier in file order whose
    conditions match (``any``: one holds; ``all``: every one holds; none: always), with the explanation and the
    progress to the tier above. ``translator`` words score gaps (default: in score points)."""
    rules = _rules_for(config)
    index = _tier_index(rules, facts)
    return _decision(rules, index, facts, translator or DEFAULT_TRANSLATOR)


def evaluate_many(
    config: TiersConfig, facts_iterable: Iterable[CustomerFacts], translator: ScoreTranslator | None = None
) -> Iterator[Decision]:
    """``evaluate`` for each facts in turn, lazily, compiling the config once; feed it a chunk at a time."""
    rules = _rules_for(config)
    wording = translator or DEFAULT_TRANSLATOR
    for facts in facts_iterable:
        yield _decision(rules, _tier_index(rules, facts), facts, wording)


def rank_many(
    config: TiersConfig,
    paid_orders: ArrayLike,
    scores: Mapping[str, ArrayLike],
    figures: Mapping[str, ArrayLike],
) -> NDArray[np.int64]:
    """The tier rank of every customer from columns (one entry per customer in each array), as ``evaluate`` would
    decide it; ``tier_order(config)[rank]`` names the tier. A column left out, or NaN in it, fails the conditions
    on it, as an absent figure does. No explanation or progress: for the set-based recalculation and previews."""
    rules = _rules_for(config)
    paid = np.asarray(paid_orders)
    ranks = np.full(paid.shape[0], rules.prospect_rank, dtype=np.int64)
    undecided = paid > 0
    for index, compiled in enumerate(rules.paying):
        if not undecided.any():
            break
        if compiled.checks:
            matches = _column_matches(compiled, scores, figures, paid.shape[0])
            entering = undecided & matches
        else:
            entering = undecided.copy()
        ranks[entering] = index
        undecided &= ~entering
    return ranks


def _column_matches(
    compiled: _CompiledTier, scores: Mapping[str, ArrayLike], figures: Mapping[str, ArrayLike], size: int
) -> NDArray[np.bool_]:
    combined: NDArray[np.bool_] | None = None
    for check in compiled.checks:
        column = (scores if check.is_score else figures).get(check.name)
        if column is None:
            holds = np.zeros(size, dtype=np.bool_)
        else:
            values = np.asarray(column, dtype=np.float64)
            holds = (values >= check.lower) & (values <= check.upper)
        if combined is None:
            combined = holds
        elif compiled.any:
            combined |= holds
        else:
            combined &= holds
    assert combined is not None  # only called for tiers with conditions
    return combined


# --- Evaluation by columns --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecisionColumns:
    """``evaluate`` for many customers, one entry per customer in each list: the tier id, the explanation's detail
    (without the leading tier name: what ``assign_decided`` quotes), the explanation and the progress."""

    tiers: list[str]
    details: list[str]
    explanations: list[str]
    progress: list[Progress]


_DEFAULT_COLUMN_TRANSLATOR = DefaultColumnTranslator()


def evaluate_columns(
    config: TiersConfig,
    paid_orders: ArrayLike,
    scores: Mapping[str, ArrayLike],
    figures: Mapping[str, ArrayLike],
    translator: ColumnScoreTranslator | None = None,
) -> DecisionColumns:
    """``evaluate`` for every customer of the columns (read as ``rank_many`` reads them), with the same texts.

    The full recalculation's inner loop: customers are grouped by their tier and by which conditions of it (for the
    explanation) and of the tier above (for the progress) hold, and each group is worded condition by condition over
    plain floats, with the same wording functions as ``evaluate``, instead of customer by customer through facts.
    """
    rules = _rules_for(config)
    wording = translator or _DEFAULT_COLUMN_TRANSLATOR
    paid = np.asarray(paid_orders)
    size = paid.shape[0]
    ranks = rank_many(config, paid, scores, figures)
    columns = _Columns(scores, figures, size)
    prospect = rules.prospect_decision
    details = [_NO_PAID_ORDER] * size
    explanations = [prospect.explanation] * size
    progress = [prospect.progress] * size
    for index in np.unique(ranks).tolist():
        if index == rules.prospect_rank:
            continue
        members = np.flatnonzero(ranks == index)
        compiled = rules.paying[index]
        prefix = f"{compiled.tier.name}: "
        group_details = _column_details(compiled, members, columns, paid)
        group_progress = _column_progress(rules, index, members, columns, wording)
        for position, detail, step in zip(members.tolist(), group_details, group_progress, strict=True):
            details[position] = detail
            explanations[position] = prefix + detail
            progress[position] = step
    order = rules.order
    return DecisionColumns([order[r] for r in ranks.tolist()], details, explanations, progress)


class _Columns:
    """The chunk's value of each score or figure a check reads (NaN where unknown), and where each check holds."""

    def __init__(self, scores: Mapping[str, ArrayLike], figures: Mapping[str, ArrayLike], size: int) -> None:
        self._sources = (figures, scores)
        self._size = size
        self._values: dict[tuple[bool, str], NDArray[np.float64]] = {}
        self._holds: dict[int, NDArray[np.bool_]] = {}

    def values(self, is_score: bool, name: str) -> NDArray[np.float64]:
        key = (is_score, name)
        if key not in self._values:
            column = self._sources[is_score].get(name)
            if column is None:
                self._values[key] = np.full(self._size, np.nan)
            else:
                self._values[key] = np.asarray(column, dtype=np.float64)
        return self._values[key]

    def holds(self, check: _Check) -> NDArray[np.bool_]:
        known = self._holds.get(id(check))
        if known is None:
            values = self.values(check.is_score, check.name)
            known = self._holds[id(check)] = (values >= check.lower) & (values <= check.upper)
        return known


def _column_details(
    compiled: _CompiledTier, members: NDArray[np.intp], columns: _Columns, paid: NDArray[Any]
) -> list[str]:
    """The explanation's detail of each member of the tier, as ``_decision`` words it."""
    if not compiled.checks:
        occasions = columns.values(False, "occasions")[members]
        counts = np.where(np.isnan(occasions), paid[members].astype(np.float64), occasions)
        return _worded(_purchases_text, counts.tolist())
    details = [""] * members.size
    checks = compiled.checks
    held = [columns.holds(check)[members] for check in checks]
    for selected, which in _patterns(held):
        positions = members[selected]
        parts = [
            _worded(check.describe, columns.values(check.is_score, check.name)[positions].tolist())
            for check, holds in zip(checks, which, strict=True)
            if holds
        ]
        texts = parts[0] if len(parts) == 1 else [" and ".join(words) for words in zip(*parts, strict=True)]
        for place, text in zip(selected.tolist(), texts, strict=False):
            details[place] = text
    return details


def _column_progress(
    rules: _Rules, index: int, members: NDArray[np.intp], columns: _Columns, translator: ColumnScoreTranslator
) -> list[Progress]:
    """The progress of each member of paying tier ``index`` to the tier above, as ``_progress`` words it."""
    if index == 0:
        return [_TOP_TIER_PROGRESS] * members.size
    target = rules.paying[index - 1]
    meets = _meets_rule(target)
    if not target.checks:
        return [meets] * members.size
    result = [meets] * members.size
    checks = target.checks
    held = [columns.holds(check)[members] for check in checks]
    for selected, which in _patterns(held):
        if target.any and any(which):
            continue
        positions = members[selected]
        failing = [
            _column_gaps(check, columns.values(check.is_score, check.name)[positions].tolist(), positions, translator)
            for check, holds in zip(checks, which, strict=True)
            if not holds
        ]
        for place, gaps in zip(selected.tolist(), zip(*failing, strict=True), strict=True):
            result[place] = _progress_from_gaps(target, gaps)
    return result


def _column_gaps(
    check: _Check, values: list[float], positions: NDArray[np.intp], translator: ColumnScoreTranslator
) -> list[tuple[Missing, str]]:
    """``_gap`` for a failing check, for each of the customers at ``positions`` (values are theirs)."""
    if not check.is_score:
        return _worded(lambda value: _figure_gap(check, _failed_bound(check, value), value), values)
    gaps: list[tuple[Missing, str]] = []
    for value, offset in zip(values, positions.tolist(), strict=True):
        target = _failed_bound(check, value)
        translated = translator.missing_for_score_at(check.name, target, offset, value)
        gaps.append(_score_gap(check.name, target, translated, translator.phrase, value))
    return gaps


def _patterns(held: list[NDArray[np.bool_]]) -> Iterator[tuple[NDArray[np.intp], tuple[bool, ...]]]:
    """The customers (indices into the columns of ``held``) that share each combination of checks holding."""
    codes = np.zeros(held[0].size, dtype=np.int64)
    for bit, holds in enumerate(held):
        codes |= holds.astype(np.int64) << bit
    for code in np.unique(codes).tolist():
        yield np.flatnonzero(codes == code), tuple(bool(code >> bit & 1) for bit in range(len(held)))


_Worded = TypeVar("_Worded")


def _worded(word: Callable[[float], _Worded], values: list[float]) -> list[_Worded]:
    """``word(value)`` for each value, computed once per distinct value (figures repeat a lot within a chunk)."""
    known: dict[float, _Worded] = {}
    result: list[_Worded] = []
    append = result.append
    for value in values:
        text = known.get(value)
        # 0.0 and -0.0 are one key but may read differently ("-0.00"): zero is worded every time.
        if text is None or not value:
            text = known[value] = word(value)
        append(text)
    return result


def _decision(rules: _Rules, index: int, facts: CustomerFacts, translator: ScoreTranslator) -> Decision:
    if index == rules.prospect_rank:
        return rules.prospect_decision
    compiled = rules.paying[index]
    tier = compiled.tier
    if not compiled.checks:
        matched: tuple[Condition, ...] = ()
        detail = _purchases_so_far(facts)
    else:
        conditions: list[Condition] = []
        facts_text: list[str] = []
        for check in compiled.checks:
            value = check.value(facts)
            if check.holds(value):
                conditions.append(check.condition)
                facts_text.append(check.describe(value))
        matched = tuple(conditions)
        detail = " and ".join(facts_text)
    return Decision(tier.id, matched, f"{tier.name}: {detail}", _progress(rules, index, facts, translator))


def _purchases_so_far(facts: CustomerFacts) -> str:
    # Occasions are what a customer thinks of as purchases (same-day orders are one); orders stand in without them.
    count = facts.figures.get("occasions", math.nan)
    if math.isnan(count):
        count = float(facts.paid_orders)
    return _purchases_text(count)


def _purchases_text(count: float) -> str:
    if count == 1:
        return "one purchase so far"
    return f"{_number(count)} purchases so far"


_TOP_TIER_PROGRESS = Progress(None, "top tier reached", ())


# --- Progress ---------------------------------------------------------------------------------------------------


def progress_for(
    config: TiersConfig, tier_id: str, facts: CustomerFacts, translator: ScoreTranslator | None = None
) -> Progress:
    """The progress from any tier to the one above it, e.g. from the stored tier of a customer held in grace or
    pinned, which may differ from the tier the facts earn. Raises ValueError for a tier the config does not define.
    """
    return _progress(_rules_for(config), rank(config, tier_id), facts, translator or DEFAULT_TRANSLATOR)


def _progress(rules: _Rules, index: int, facts: CustomerFacts, translator: ScoreTranslator) -> Progress:
    if index == 0:
        return _TOP_TIER_PROGRESS
    if index == rules.prospect_rank:
        return rules.prospect_decision.progress
    target = rules.paying[index - 1]
    if not target.checks:
        return _meets_rule(target)
    values = [(check, check.value(facts)) for check in target.checks]
    if target.any and any(check.holds(value) for check, value in values):
        return _meets_rule(target)
    return _progress_from_gaps(
        target, [_gap(check, value, facts, translator) for check, value in values if not check.holds(value)]
    )


def _meets_rule(target: _CompiledTier) -> Progress:
    return Progress(target.tier.id, f"meets the rule for {target.tier.name}", ())


def _progress_from_gaps(target: _CompiledTier, gaps: Sequence[tuple[Missing, str]]) -> Progress:
    """The progress to ``target`` from what each failing condition of it still needs (the same phrase once)."""
    if len(gaps) == 1:
        missing, phrase = gaps[0]
        return Progress(target.tier.id, phrase, (missing,))
    items: list[Missing] = []
    phrases: list[str] = []
    for missing, phrase in gaps:
        if phrase not in phrases:
            items.append(missing)
            phrases.append(phrase)
    if not phrases:
        return _meets_rule(target)
    joiner = " or " if target.any else " and "
    return Progress(target.tier.id, joiner.join(phrases), tuple(items))


def _failed_bound(check: _Check, value: float) -> float:
    """The threshold the value misses: the lower bound when below it (or unknown), else the upper one."""
    condition = check.condition
    if condition.eq is not None:
        return condition.eq
    if condition.gte is not None and (math.isnan(value) or value < check.lower):
        return condition.gte
    assert condition.lte is not None  # a failing condition without a missed gte must have missed its lte
    return condition.lte


def _gap(check: _Check, value: float, facts: CustomerFacts, translator: ScoreTranslator) -> tuple[Missing, str]:
    target = _failed_bound(check, value)
    if check.is_score:
        translated = translator.missing_for_score(check.name, target, facts)
        return _score_gap(check.name, target, translated, translator.phrase, facts.scores.get(check.name))
    return _figure_gap(check, target, value)


def _score_gap(
    score: str, target: float, translated: Missing | None, phrase: Callable[[Missing], str], current: float | None
) -> tuple[Missing, str]:
    """A translator's answer with its phrase, or the default wording in score points when it has none."""
    if translated is not None:
        return translated, phrase(translated)
    fallback = _score_points_missing(score, target, current)
    return fallback, phrase_missing(fallback)


def _figure_gap(check: _Check, target: float, value: float) -> tuple[Missing, str]:
    if math.isnan(value):
        missing = Missing(check.name, target, target=target)
        return missing, f"needs {_describe_condition(check.condition)}"
    missing = Missing(check.name, _round_need(_words_for(check.name), target - value), current=value, target=target)
    return missing, phrase_missing(missing)


def _round_need(words: _Words, needed: float) -> float:
    """Round away from zero to what is actually enough: whole units for counts, whole cents for money."""
    magnitude = abs(needed)
    if words.whole:
        magnitude = float(math.ceil(magnitude - _tolerance(magnitude)))
    elif words.style == "money":
        magnitude = math.ceil(round(magnitude * 100, 6)) / 100
    return math.copysign(magnitude, needed)


# --- Assignment -------------------------------------------------------------------------------------------------


def _as_text(moment: datetime) -> str:
    """A date when the instant is a UTC midnight ("2027-01-01"), else date and time in UTC."""
    utc = moment.astimezone(UTC) if moment.tzinfo is not None else moment
    if (utc.hour, utc.minute, utc.second, utc.microsecond) == (0, 0, 0, 0):
        return utc.date().isoformat()
    return utc.strftime("%Y-%m-%d %H:%M UTC")


def _tier_name(config: TiersConfig, tier_id: str) -> str:
    tier = config.get(tier_id)
    if tier is not None:
        return tier.name
    return _rules_for(config).prospect_name if tier_id == PROSPECT else tier_id


def _detail(config: TiersConfig, decision: Decision) -> str:
    """The explanation without its leading tier name: the history already records the tier."""
    return decision.explanation.removeprefix(f"{_tier_name(config, decision.tier)}: ")


def _is_configured(config: TiersConfig, tier_id: str) -> bool:
    return tier_id in _rules_for(config).order


def pin_in_force(config: TiersConfig, pinned_tier: str | None, pinned_until: datetime | None, now: datetime) -> bool:
    """A pin holds while it has not expired (one without an end never does) and names a tier the config defines."""
    return (
        pinned_tier is not None and _is_configured(config, pinned_tier) and (pinned_until is None or pinned_until > now)
    )


def assign(
    config: TiersConfig,
    current: TierState,
    decision: Decision,
    now: datetime,
    *,
    allow_downgrade: bool,
    pin_reason: str | None = None,
) -> Assignment:
    """What to store for a customer given the stored state and a fresh decision.

    In order of precedence:

    1. An active pin (``pinned_tier`` set and ``pinned_until`` after ``now``, or without an end) wins over
       everything: the pinned tier, kind ``pinned`` when that is a change. The grace clock is not kept while pinned.
    2. An expired pin (or a pin to a tier the config no longer defines) no longer applies: the tier is the
       decision's, at once and in either direction, kind ``pin_expired`` when it changes (the pin was the reason
       for the stored tier, so there is no grace to honour). The returned pin fields are None: store them.
    3. A customer without a tier gets the decision, kind ``initial``.
    4. A stored tier the config no longer defines is replaced by the decision at once (upgrade or downgrade by the
       order of the stable ids): there is nothing to hold the customer in.
    5. A higher decision upgrades at once; the same tier is ``unchanged``. Both clear ``below_since``.
    6. A lower decision downgrades only when ``allow_downgrade`` (a scheduled or manual full recalculation; the
       real-time path passes False) and the current tier's ``grace_days`` have passed since ``below_since`` (a
       tier with no grace downgrades on the first full recalculation that finds the customer below it).
       Otherwise the tier is ``held`` and ``below_since`` starts now if it was not set.
       A ``prospect`` decision (no paid order left: everything refunded or cancelled) skips the grace, since
       there is no purchase left to be loyal for, but like every downgrade waits for a full recalculation.

    ``since`` becomes ``now`` when the tier changes and is otherwise kept (``now`` if it was never stored).
    ``pin_reason`` is the marketing reason quoted in the history text of a pin.
    """
    detail = _detail(config, decision)
    return assign_decided(
        config, current, decision.tier, detail, now, allow_downgrade=allow_downgrade, pin_reason=pin_reason
    )


def assign_decided(
    config: TiersConfig,
    current: TierState,
    decided: str,
    detail: str,
    now: datetime,
    *,
    allow_downgrade: bool,
    pin_reason: str | None = None,
) -> Assignment:
    """``assign`` for a decision given as its tier and its explanation without the leading tier name, as
    ``evaluate_columns`` gives them."""
    pinned_tier, pinned_until = current.pinned_tier, current.pinned_until
    if pinned_tier is not None:
        if pin_in_force(config, pinned_tier, pinned_until, now):
            return _pinned(current, pinned_tier, pinned_until, now, pin_reason)
        expired = _pin_expired(config, current, decided, detail, now)
        if expired is not None:
            return expired
    if current.tier is None or current.tier == decided:
        return Assignment(decided, *settled(current.tier, current.since, detail, now))
    since = current.since or now
    if not _is_configured(config, current.tier):
        return _replace_unconfigured(current.tier, decided, detail, now)
    if rank(config, decided) < rank(config, current.tier):
        return Assignment(decided, now, None, True, "upgrade", f"upgrade: {detail}")
    return _lower(config, current.tier, since, current.below_since, decided, detail, now, allow_downgrade)


def settled(
    stored: str | None, since: datetime | None, detail: str, now: datetime
) -> tuple[datetime, None, bool, AssignmentKind, str]:
    """What ``assign_decided`` stores besides the tier in its two commonest cases, as plain values for the full
    run's inner loop: no stored tier (``initial``), or the decided tier stored already (``unchanged``), either way
    without a pin (the caller checks that). ``since``, ``below_since``, ``changed``, ``kind``, ``reason``."""
    if stored is None:
        return now, None, True, "initial", f"initial: {detail}"
    return since or now, None, False, "unchanged", f"unchanged: {detail}"


def _pinned(
    current: TierState, pinned_tier: str, pinned_until: datetime | None, now: datetime, pin_reason: str | None
) -> Assignment:
    until = f" until {_as_text(pinned_until)}" if pinned_until is not None else ""
    reason = f"pinned by marketing{until}" + (f": {pin_reason}" if pin_reason else "")
    if current.tier == pinned_tier:
        return Assignment(
            pinned_tier, current.since or now, None, False, "unchanged", reason, pinned_tier, pinned_until
        )
    return Assignment(pinned_tier, now, None, True, "pinned", reason, pinned_tier, pinned_until)


def _pin_expired(
    config: TiersConfig, current: TierState, decided: str, detail: str, now: datetime
) -> Assignment | None:
    """The decision applied at once over an expired pin; None when there is no stored tier to replace."""
    if current.tier is None:
        return None
    if current.pinned_until is not None and _is_configured(config, current.pinned_tier or ""):
        ended = f"pin expired {_as_text(current.pinned_until)}"
    else:
        ended = f"pin to {current.pinned_tier}, no longer configured, dropped"
    if current.tier == decided:
        reason = f"unchanged, {ended}: {detail}"
        return Assignment(current.tier, current.since or now, None, False, "unchanged", reason)
    return Assignment(decided, now, None, True, "pin_expired", f"{ended}: {detail}")


def _replace_unconfigured(stored_tier: str, decided: str, detail: str, now: datetime) -> Assignment:
    stable = (*_STABLE_ORDER, stored_tier)
    kind: AssignmentKind = "upgrade" if _STABLE_ORDER.index(decided) < stable.index(stored_tier) else "downgrade"
    reason = f"{kind}: {stored_tier} is no longer a configured tier; {detail}"
    return Assignment(decided, now, None, True, kind, reason)


# The stable ids from best to lowest: orders a stored tier that a changed config no longer defines.
_STABLE_ORDER = ("vip", "nurture", "one_time", PROSPECT)


def _lower(
    config: TiersConfig,
    tier_id: str,
    since: datetime,
    below_since: datetime | None,
    decided: str,
    detail: str,
    now: datetime,
    allow_downgrade: bool,
) -> Assignment:
    name = _tier_name(config, tier_id)
    started = below_since or now
    if decided == PROSPECT:
        if allow_downgrade:
            return Assignment(PROSPECT, now, None, True, "downgrade", f"downgrade without grace: {detail}")
        reason = f"held in {name}: no paid order left, downgrade at the next full recalculation"
        return Assignment(tier_id, since, started, False, "held", reason)
    tier = config.get(tier_id)
    grace_days = tier.grace_days if tier is not None else 0
    grace_ends = started + timedelta(days=grace_days)
    if now >= grace_ends:
        if allow_downgrade:
            reason = f"downgrade after {grace_days}-day grace: {detail}" if grace_days else f"downgrade: {detail}"
            return Assignment(decided, now, None, True, "downgrade", reason)
        ended = f"grace ended {_as_text(grace_ends)}, " if grace_days else ""
        reason = f"held in {name}: {ended}downgrade at the next full recalculation"
        return Assignment(tier_id, since, started, False, "held", reason)
    return Assignment(tier_id, since, started, False, "held", f"held in {name}: grace until {_as_text(grace_ends)}")


__all__ = [
    "DEFAULT_TRANSLATOR",
    "PROSPECT",
    "Assignment",
    "AssignmentKind",
    "ColumnScoreTranslator",
    "CustomerFacts",
    "Decision",
    "DecisionColumns",
    "DefaultColumnTranslator",
    "DefaultScoreTranslator",
    "Missing",
    "Progress",
    "ScoreTranslator",
    "TierState",
    "assign",
    "assign_decided",
    "decide_tier",
    "describe_rule",
    "evaluate",
    "evaluate_columns",
    "evaluate_many",
    "phrase_missing",
    "pin_in_force",
    "progress_for",
    "rank",
    "rank_many",
    "settled",
    "tier_order",
]
