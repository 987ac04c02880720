"""`loyalty doctor`: read-only integrity checks of what is stored against what it was derived from.

Five checks, each reporting the rows it examined and every mismatch with a few example ids and a hint:

- ``orders-vs-figures``: refunds against their orders (never above the total, the order's ``refunded`` equal to
  their sum), and every customer's stored figures, model outputs and scores recomputed with the scoring code
  itself (``loyalty.scoring``) as of the instant the score row was computed.
- ``tiers-vs-rules``: every stored tier against the tier rules for the stored scores and figures, with pins,
  upgrades at once, holds in the grace period and downgrades after it; a tier row for every customer; the tier
  history a chain ending in the current tier.
- ``codes-vs-campaigns``: every code from a campaign send or a tier entry, one code per treatment member of a
  send and none for the holdout, the sends' counts equal to their member rows, opted-out customers left out,
  redemptions within the uses an offer allows and equal to the uses taken.
- ``outbox``: every event naming a stored row, every tier change, code and redemption announced, nothing left
  from before an erasure.
- ``references``: no row refers to a missing one, for every foreign key of the models and every reference the
  application keeps instead of one (``kept_reference``; on SQLite, foreign keys hold only on connections that turn
  them on, as the service's do and the sqlite3 shell's do not).

It never writes: one read-only transaction (REPEATABLE READ, READ ONLY on PostgreSQL; a deferred read on SQLite)
sees one snapshot for every check. The structural checks are set-based statements that return only the rows at
fault; the per-customer checks walk customers by primary key, PAGE at a time, so memory stays bounded at any size.

What a running system may show without being corrupt is not a mismatch. A customer with orders, refunds, events
or referrals (theirs or their referees') written after their score was computed is *stale*, awaiting a re-score,
and only counted in a note; SETTLE_SECONDS of slack covers a transaction that stamped its rows just before a
score was computed and committed just after. Scores re-scored in real time are checked against the last run's
model only when no newer run could have been in a process's model cache then; a changed tiers file (another
config hash than the last run's) is a note, and the checks that depend on it wait for the next run.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import BigInteger, Select, TextClause, TextualSelect, bindparam, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, defer

from loyalty.db.base import Base
from loyalty.db.migrate import current_revision, head_revision
from loyalty.db.models import (
    CampaignMember,
    CampaignSend,
    Customer,
    CustomerScore,
    CustomerTier,
    IssuedCode,
    Order,
    OutboxEvent,
    RecalcRun,
    Redemption,
    Refund,
    TierHistory,
)
from loyalty.db.session import READ_ONLY_OPTION, create_session_maker, read_only
from loyalty.db.staging import micros_of
from loyalty.db.types import DateTimeUTC
from loyalty.lib.clock import utcnow
from loyalty.lib.money import from_storage
from loyalty.recalc.assignments import score_columns
from loyalty.scoring.figures import Figures, load_figures, load_referral_edges, referral_figures
from loyalty.scoring.scores import SCORE_NAMES, ScoringModel, rank_on_cutoffs, score_inputs
from loyalty.tiers.config import TiersConfig
from loyalty.tiers.rules import PROSPECT, decide_tier, rank, tier_order
from loyalty.tiers.services import _stored_facts as stored_facts

CHECK_NAMES = ("orders-vs-figures", "tiers-vs-rules", "codes-vs-campaigns", "outbox", "references")
# Customers per page of the per-customer checks; an IN list of this many ids stays far below either database's
# limit on bound parameters even where a statement repeats the list (SQLite: 32,766).
PAGE = 2_000
SETTLE_SECONDS = 300.0
EXAMPLES = 5
# A money figure is stored in ten-thousandths, rounded once on the way in (by numpy in a full run, by Decimal in
# a re-score): one unit either way, and float noise.
MONEY_TOLERANCE = 1.0001e-4
# A full run ranks exactly; the check reads ranks off the run's 1,001-point cut-off grid, which lands within 0.1
# of the exact percentile (see loyalty.scoring.scores), plus rounding to two decimals.
SCORE_TOLERANCE = 0.15
# Recomputed raw score inputs may differ from the stored run's in the last bits (summation order, vector code
# paths); a tie in the population then sits on either side of the value.
RAW_RELATIVE_SLACK = 1e-9


class DoctorUnavailableError(RuntimeError):
    """The checks cannot run: no database, not at the latest migration, or it failed while reading."""


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class ProblemKind:
    key: str
    title: str
    hint: str


@dataclass
class Problem:
    kind: ProblemKind
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class CheckResult:
    """One check's outcome: what it examined (rows by kind), what it found, and what else is worth knowing."""

    name: str
    title: str
    hint: str
    examples_kept: int = EXAMPLES
    checked: dict[str, int] = field(default_factory=dict)
    problems: dict[str, Problem] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, kind: ProblemKind, example: str) -> None:
        problem = self.problems.setdefault(kind.key, Problem(kind))
        problem.count += 1
        if len(problem.examples) < self.examples_kept:
            problem.examples.append(example)

    @property
    def rows_checked(self) -> int:
        return sum(self.checked.values())

    @property
    def mismatches(self) -> int:
        return sum(problem.count for problem in self.problems.values())

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "ok": self.ok,
            "rows_checked": self.rows_checked,
            "checked": dict(self.checked),
            "mismatches": self.mismatches,
            "problems": [
                {
                    "problem": problem.kind.key,
                    "title": problem.kind.title,
                    "count": problem.count,
                    "examples": list(problem.examples),
                    "hint": problem.kind.hint,
                }
                for problem in self.problems.values()
            ],
            "notes": list(self.notes),
            "hint": self.hint,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Report:
    database: str
    checked_at: datetime
    tiers_config_hash: str
    last_run_id: int | None
    checks: list[CheckResult]

    @property
    def mismatches(self) -> int:
        return sum(check.mismatches for check in self.checks)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def check(self, name: str) -> CheckResult:
        return next(check for check in self.checks if check.name == name)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mismatches": self.mismatches,
            "database": self.database,
            "checked_at": self.checked_at.isoformat(),
            "tiers_config_hash": self.tiers_config_hash,
            "last_run_id": self.last_run_id,
            "checks": [check.as_json() for check in self.checks],
        }

    def render(self) -> str:
        """The report for people: one block per check, problems with examples and hints, notes, the verdict."""
        run = f"last recalculation run {self.last_run_id}" if self.last_run_id else "no recalculation run yet"
        lines = [
            f"loyalty doctor: {self.database} database, {run}, "
            f"tiers config {self.tiers_config_hash[:12]}, at {self.checked_at:%Y-%m-%d %H:%M:%S} UTC",
            "",
        ]
        for check in self.checks:
            verdict = "ok" if check.ok else _many(check.mismatches, "mismatch")
            examined = ", ".join(f"{count:,} {kind}" for kind, count in check.checked.items())
            lines.append(f"[{'OK' if check.ok else 'FAIL'}] {check.name}: {check.title}")
            lines.append(f"    {check.rows_checked:,} rows checked ({examined}) in {check.seconds:.1f} s: {verdict}")
            for problem in check.problems.values():
                lines.append(f"    - {problem.kind.title}: {problem.count:,}")
                lines.append(f"      e.g. {'; '.join(problem.examples)}")
                lines.append(f"      hint: {problem.kind.hint}")
            lines.extend(f"    note: {note}" for note in check.notes)
            lines.append("")
        if self.ok:
            lines.append(f"No mismatches in {_many(len(self.checks), 'check')}.")
        else:
            failed = sum(not check.ok for check in self.checks)
            lines.append(f"{_many(self.mismatches, 'mismatch')} in {failed} of {_many(len(self.checks), 'check')}.")
        return "\n".join(lines)


# ---------------------------------------------------------------- problem kinds

_RECALC = "Run `loyalty recalc`, which rewrites every customer's figures, scores and tier from the orders."


REFUNDS_EXCEED_ORDER = ProblemKind(
    "refunds-exceed-order",
    "refunds of an order add up to more than its total",
    "A refund was stored past the order's total, around the API's guard. Remove the wrong refund row (the API "
    "refuses such a refund with 422), then set the order's `refunded` to the sum of its refunds.",
)
REFUNDED_COLUMN = ProblemKind(
    "order-refunded-differs",
    "an order's `refunded` differs from the sum of its refunds",
    "Set customer_order.refunded to the sum of the order's refund rows: figures read net values from it.",
)
REFUND_CUSTOMER = ProblemKind(
    "refund-customer-differs",
    "a refund's customer is not its order's customer",
    "Set refund.customer_id to its order's customer_id, then run `loyalty recalc`.",
)
REFUND_BEFORE_ORDER = ProblemKind(
    "refund-before-order",
    "a refund is dated before its order was placed",
    "The API refuses such refunds; correct refunded_at from the shop's records.",
)
ORDER_CURRENCY = ProblemKind(
    "order-currency",
    "an order is in another currency than the store currency",
    "Orders in another currency are refused by the API; check LOYALTY_CURRENCY and how these orders got in.",
)
FIGURES_DIFFER = ProblemKind(
    "figures-differ",
    "stored figures differ from what the orders, refunds, events and referrals say as of the score's instant",
    _RECALC + " If the mismatch comes back, something writes activity or scores around the service.",
)
SCORES_DIFFER = ProblemKind(
    "scores-differ",
    "stored scores or model outputs differ from the run's model applied to the figures",
    _RECALC,
)
SCORE_RUN_UNKNOWN = ProblemKind(
    "score-run-unknown",
    "a score names a recalculation run that did not succeed",
    _RECALC,
)
NOT_SCORED = ProblemKind(
    "customer-not-scored",
    "a customer older than the last full recalculation has no score row",
    _RECALC,
)
QUALIFIED_DIFFERS = ProblemKind(
    "qualified-tier-differs",
    "the stored qualifying tier is not what the tier rules give for the stored scores and figures",
    _RECALC,
)
UPGRADE_NOT_APPLIED = ProblemKind(
    "upgrade-not-applied",
    "a customer sits below the tier they qualify for (upgrades apply at once)",
    _RECALC,
)
PROSPECT_WITH_ORDERS = ProblemKind(
    "prospect-with-paid-orders",
    "a prospect has paid orders",
    _RECALC,
)
DOWNGRADE_MISSED = ProblemKind(
    "downgrade-missed",
    "a full recalculation kept a customer above their tier after the grace period",
    _RECALC,
)
HOLD_WITHOUT_CLOCK = ProblemKind(
    "hold-without-grace-start",
    "a customer is held above their qualifying tier without a grace start (below_since)",
    _RECALC,
)
CLOCK_WITHOUT_HOLD = ProblemKind(
    "grace-start-without-hold",
    "a grace start (below_since) is set for a customer in the tier they qualify for, or pinned",
    _RECALC,
)
PIN_NOT_APPLIED = ProblemKind(
    "pin-not-applied",
    "a pinned customer is not in the pinned tier",
    "Remove and set the pin again (DELETE then PUT /v1/customers/{customer_id}/tier-pin).",
)
PIN_KEPT = ProblemKind(
    "pin-kept-after-end",
    "a pin was kept past its end",
    _RECALC + " It clears expired pins.",
)
UNKNOWN_TIER = ProblemKind(
    "unknown-tier",
    "a stored tier is not defined in the tiers config",
    _RECALC,
)
NO_TIER_ROW = ProblemKind(
    "customer-without-tier",
    "a customer older than the last full recalculation has no tier row",
    _RECALC,
)
SCORE_WITHOUT_TIER = ProblemKind(
    "score-without-tier",
    "a customer has a score row but no tier row",
    _RECALC,
)
HISTORY_CHAIN = ProblemKind(
    "history-chain-broken",
    "a tier history entry does not start from the tier the previous one ended in",
    "The history is append-only: look for rows inserted or deleted around the service in tier_history.",
)
HISTORY_LAST = ProblemKind(
    "history-differs-from-tier",
    "the current tier (or its `since`) differs from the customer's last tier history entry",
    "A tier row was changed without its history entry, or the history was edited. " + _RECALC,
)
HISTORY_WITHOUT_TIER = ProblemKind(
    "history-without-tier",
    "a customer has tier history but no tier row",
    _RECALC,
)
CODE_ORPHAN = ProblemKind(
    "code-without-source",
    "a code belongs to no campaign send and no tier entry",
    "Codes are issued only by a campaign send or a welcome offer; remove this one or find what inserted it.",
)
CODE_SEND_MISMATCH = ProblemKind(
    "code-send-mismatch",
    "a code's campaign or offer differs from its send's campaign and offer",
    "Correct issued_code.campaign_id / offer_id from its campaign send.",
)
CODE_WELCOME_MISMATCH = ProblemKind(
    "welcome-code-mismatch",
    "a welcome code names another customer's tier entry, or an entry that is not one",
    "Correct or remove the code: a welcome code celebrates its owner's own tier entry.",
)
HOLDOUT_WITH_CODE = ProblemKind(
    "holdout-member-with-code",
    "a holdout member of a send received a code",
    "The holdout is the control group: revoke the code and check the dispatch.",
)
CODE_WITHOUT_MEMBER = ProblemKind(
    "code-without-member",
    "a code from a send went to a customer who is not a member of that send",
    "Every send records its members with their codes; the member row or the code was changed around it.",
)
MEMBER_WITHOUT_CODE = ProblemKind(
    "member-without-code",
    "a treatment member of a send has no code",
    "Re-queue the send (its effects are idempotent: only the missing codes are issued).",
)
EXTRA_CAMPAIGN_CODES = ProblemKind(
    "extra-campaign-codes",
    "a customer holds more codes from a campaign than sends that treated them",
    "One code per send and customer: remove the duplicates.",
)
MEMBER_CAMPAIGN = ProblemKind(
    "member-campaign-mismatch",
    "a member row's campaign differs from its send's campaign",
    "Correct campaign_member.campaign_id from its send.",
)
SEND_COUNTS = ProblemKind(
    "send-counts-differ",
    "a send's issued / holdout counts differ from its member rows",
    "The counts are written with the members in one transaction; set them from the member rows.",
)
OPTED_OUT_CODE = ProblemKind(
    "code-to-opted-out",
    "a code was issued to a customer who had opted out of marketing",
    "Opted-out customers receive no campaign or welcome codes: revoke the code and check the sender.",
)
OVER_REDEEMED = ProblemKind(
    "code-over-redeemed",
    "a code was redeemed more times than its offer allows",
    "Void the extra redemptions (DELETE /v1/redemptions/{redemption_id}).",
)
USES_LEFT = ProblemKind(
    "uses-left-differ",
    "a code's uses left differ from its offer's uses minus its active redemptions",
    "Set issued_code.uses_left to the offer's uses_per_code minus the code's unvoided redemptions.",
)
REDEMPTION_OWNER = ProblemKind(
    "redemption-not-owner",
    "a redemption was made by another customer than the code's owner",
    "Void the redemption; codes are personal.",
)
REDEMPTION_EXPIRED = ProblemKind(
    "redemption-after-expiry",
    "a redemption was made after the code expired",
    "Void the redemption if the order should not have had the discount.",
)
REDEMPTION_MINIMUM = ProblemKind(
    "redemption-below-minimum",
    "a redemption's order total is below the offer's minimum",
    "Void the redemption if the order should not have had the discount.",
)
CODE_STATUS = ProblemKind(
    "code-status",
    "a code's status is unknown, or it is marked expired before its expiry",
    "Set the status back to `active`; the offers.expire_codes job expires codes when their time comes.",
)
CAMPAIGN_UNSENT = ProblemKind(
    "completed-campaign-unsent",
    "a campaign is completed without a finished send",
    "Check the campaign's sends (GET /v1/campaigns/{campaign_id}).",
)
EVENT_NOWHERE = ProblemKind(
    "outbox-event-dangling",
    "an outbox event names no stored row, or another customer than its row's",
    "Remove the event (webhook receivers would get an event about nothing), or restore the row it names.",
)
EVENT_TYPE_KEY = ProblemKind(
    "outbox-event-type-key",
    "an outbox event's type and key disagree",
    "Events are keyed `<type>:<id>`; correct or remove the event.",
)
HISTORY_UNANNOUNCED = ProblemKind(
    "tier-change-unannounced",
    "a tier change has no tier.changed event",
    "Tier changes and their events are written together: the history row or the event was changed around it.",
)
CODE_UNANNOUNCED = ProblemKind(
    "code-unannounced",
    "a code has no offer.issued event",
    "Codes and their events are written together: the code or the event was changed around it.",
)
REDEMPTION_UNANNOUNCED = ProblemKind(
    "redemption-unannounced",
    "a redemption has no offer.redeemed event",
    "Redemptions and their events are written together: the row or the event was changed around it.",
)
DANGLING_REFERENCE = ProblemKind(
    "dangling-reference",
    "a row refers to a row that does not exist",
    "The service's connections enforce foreign keys; on SQLite a tool that opens the file without "
    "`PRAGMA foreign_keys=ON` (the sqlite3 shell's default) does not. Restore the row referred to, or remove the "
    "rows that refer to it.",
)
ERASED_EVENT = ProblemKind(
    "erased-customer-event",
    "an outbox event about an erased customer is older than the erasure",
    "An erasure deletes the events about the customer; delete this one (and its webhook deliveries).",
)


# ---------------------------------------------------------------- context


@dataclass(frozen=True)
class _Run:
    """A succeeded, non-dry full run, as far as the checks need it."""

    id: int
    as_of: datetime
    started_at: datetime
    finished_at: datetime
    config_hash: str | None


@dataclass
class _Context:
    session: AsyncSession
    dialect: str
    tiers: TiersConfig
    currency: str
    now: datetime
    settle: timedelta
    # How long a process may keep re-scoring with an older run's model (its model cache lifetime).
    model_cache: timedelta
    examples: int
    runs: dict[int, _Run]
    config_hash: str = ""
    _by_finish: list[_Run] = field(default_factory=list)
    _finish_times: list[datetime] = field(default_factory=list)
    _models: dict[int, ScoringModel | None] = field(default_factory=dict)
    # Customers whose scores could not be re-derived (re-scored just after a run, or under another tiers file).
    unverified_scores: int = 0

    def __post_init__(self) -> None:
        self.config_hash = self.tiers.config_hash  # a hash of the whole config: computed once, read per customer
        self._by_finish = sorted(self.runs.values(), key=lambda run: run.finished_at)
        self._finish_times = [run.finished_at for run in self._by_finish]

    @property
    def latest(self) -> _Run | None:
        return self._by_finish[-1] if self._by_finish else None

    def label(self, customer_id: int, external_id: str | None) -> str:
        return f"customer {external_id}" if external_id is not None else f"customer #{customer_id} (erased)"

    def finished_by(self, instant: datetime) -> _Run | None:
        """The last run finished at or before ``instant``: the model a re-score then would normally use."""
        position = bisect.bisect_right(self._finish_times, instant)
        return self._by_finish[position - 1] if position else None

    def model_settled(self, instant: datetime) -> bool:
        """False when a run finished so shortly before ``instant`` that a process may still have used the one before
        (its model cache, plus the settle time for the run's commit to become visible)."""
        run = self.finished_by(instant)
        return run is None or instant - run.finished_at > self.model_cache + self.settle

    def config_matches(self, run: _Run | None) -> bool:
        """Whether scores computed under ``run`` (None: before any run) used the tiers file read now."""
        return run is None or run.config_hash == self.config_hash

    def missed_by_last_run(self, created_at: datetime, tier_written_at: datetime | None) -> bool:
        """A customer created well before the last run started should have been written by it (unless their tier
        was written since the run started, which made the run leave them to the newer write)."""
        latest = self.latest
        if latest is None or created_at > latest.started_at - self.settle:
            return False
        return tier_written_at is None or tier_written_at <= latest.started_at

    async def model(self, run: _Run | None) -> ScoringModel | None:
        if run is None:
            return ScoringModel.initial()
        if run.id not in self._models:
            row = (
                await self.session.execute(select(RecalcRun.model, RecalcRun.cutoffs).where(RecalcRun.id == run.id))
            ).one()
            try:
                self._models[run.id] = ScoringModel.from_record(row.model, row.cutoffs)
            except (KeyError, TypeError):
                self._models[run.id] = None  # a record without a model: its scores cannot be re-derived
        return self._models[run.id]

    async def rows(self, statement: Any, params: dict[str, Any] | None = None) -> AsyncIterator[Any]:
        """The rows of a statement, streamed in partitions: a check over millions of rows keeps a page in memory."""
        result = await self.session.stream(statement, params or {})
        async for partition in result.partitions(PAGE):
            for row in partition:
                yield row

    async def count(self, table: Any) -> int:
        return int(await self.session.scalar(select(func.count()).select_from(table)) or 0)


def _sql(sql: str, **types: Any) -> TextClause | TextualSelect:
    """A statement with typed instant and id-list parameters, and typed result columns where named."""
    statement = text(sql)
    if ":now" in sql:
        statement = statement.bindparams(bindparam("now", type_=DateTimeUTC()))
    if ":ids" in sql:
        statement = statement.bindparams(bindparam("ids", expanding=True))
    return statement.columns(**types) if types else statement


# ---------------------------------------------------------------- entry point


async def run_doctor(
    engine: AsyncEngine,
    tiers: TiersConfig,
    *,
    currency: str,
    model_cache_seconds: float,
    checks: Sequence[str] = CHECK_NAMES,
    examples: int = EXAMPLES,
    settle_seconds: float = SETTLE_SECONDS,
    now: datetime | None = None,
) -> Report:
    """Run the named checks in one read-only snapshot and report; raises DoctorUnavailableError when it cannot."""
    try:
        # Read-only here too: on SQLite a plain transaction would begin by taking the write lock.
        revision = await current_revision(engine.execution_options(**{READ_ONLY_OPTION: True}))
    except (OSError, DBAPIError, TimeoutError) as error:
        raise DoctorUnavailableError(f"cannot connect to the database: {error}") from None
    if revision != head_revision():
        raise DoctorUnavailableError(
            f"the database is at migration {revision or '(none)'}, this version expects {head_revision()}: "
            "run `loyalty db upgrade`"
        )
    dialect = engine.dialect.name
    # One snapshot for every check, and a transaction the database itself keeps from writing (PostgreSQL).
    options: dict[str, Any] = (
        {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True} if dialect == "postgresql" else {}
    )
    reader = read_only(create_session_maker(engine.execution_options(**options)))
    try:
        async with reader() as session:
            runs = {
                row.id: _Run(row.id, row.as_of, row.started_at, row.finished_at, row.config_hash)
                for row in await session.execute(
                    select(
                        RecalcRun.id,
                        RecalcRun.as_of,
                        RecalcRun.started_at,
                        RecalcRun.finished_at,
                        RecalcRun.config_hash,
                    ).where(RecalcRun.status == "succeeded", RecalcRun.dry_run.is_(False))
                )
            }
            context = _Context(
                session=session,
                dialect=dialect,
                tiers=tiers,
                currency=currency,
                now=now or utcnow(),
                settle=timedelta(seconds=settle_seconds),
                model_cache=timedelta(seconds=model_cache_seconds),
                examples=examples,
                runs=runs,
            )
            results = []
            for name in CHECK_NAMES:
                if name in checks:
                    began = time.perf_counter()
                    result = await _CHECKS[name](context)
                    result.seconds = time.perf_counter() - began
                    results.append(result)
            await session.rollback()
    except DBAPIError as error:
        raise DoctorUnavailableError(f"the checks could not finish: {error.orig}") from None
    latest = context.latest
    return Report(dialect, context.now, tiers.config_hash, latest.id if latest else None, results)


def _many(count: int, thing: str) -> str:
    plural = "es" if thing.endswith("ch") else "s"
    return f"{count:,} {thing}{'' if count == 1 else plural}"


def _new_result(context: _Context, name: str, title: str, hint: str) -> CheckResult:
    result = CheckResult(name, title, hint, examples_kept=context.examples)
    latest = context.latest
    if latest is not None and not context.config_matches(latest):
        result.notes.append(
            f"The tiers file (config {context.config_hash[:12]}) differs from the one the last recalculation "
            f"(run {latest.id}) used ({(latest.config_hash or '?')[:12]}): checks that depend on it are left out "
            "until the next `loyalty recalc`."
        )
    return result


# ---------------------------------------------------------------- orders vs figures

# Orders with refunds: their sum against the order's total and its `refunded`; one pass over the refunds.
_REFUND_SUMS_SQL = """
SELECT o.id, o.external_id, o.customer_id, c.external_id AS customer_external_id, o.total, o.refunded,
       r.amount AS refunds
FROM (SELECT order_id, SUM(amount) AS amount FROM refund GROUP BY order_id) r
JOIN customer_order o ON o.id = r.order_id
JOIN customer c ON c.id = o.customer_id
WHERE r.amount > o.total OR r.amount <> o.refunded
"""

# Orders that claim refunds without having any.
_REFUNDED_WITHOUT_REFUNDS_SQL = """
SELECT o.id, o.external_id, o.customer_id, c.external_id AS customer_external_id, o.total, o.refunded,
       0 AS refunds
FROM customer_order o JOIN customer c ON c.id = o.customer_id
WHERE o.refunded <> 0 AND NOT EXISTS (SELECT 1 FROM refund r WHERE r.order_id = o.id)
"""

_REFUND_MISFITS_SQL = """
SELECT r.external_id, o.external_id AS order_external_id, r.customer_id AS refund_customer_id,
       o.customer_id AS order_customer_id, CASE WHEN r.refunded_at < o.placed_at THEN 1 ELSE 0 END AS early
FROM refund r JOIN customer_order o ON o.id = r.order_id
WHERE r.customer_id <> o.customer_id OR r.refunded_at < o.placed_at
"""

_FOREIGN_CURRENCY_SQL = """
SELECT o.external_id, o.currency FROM customer_order o WHERE o.currency <> :currency
"""

_UNSCORED_SQL = """
SELECT c.id, c.external_id, c.created_at, t.updated_at AS tier_written_at
FROM customer c
LEFT JOIN customer_score s ON s.customer_id = c.id
LEFT JOIN customer_tier t ON t.customer_id = c.id
WHERE s.customer_id IS NULL
"""

# The latest write that a customer's figures depend on: their own activity, referrals touching them, and the
# activity of their referees two levels down (converted referrals and referred revenue).
_LATEST_WRITES_SQL = """
SELECT customer_id, MAX(written_at) AS written_at FROM (
    SELECT customer_id, created_at AS written_at FROM customer_order WHERE customer_id IN :ids
    UNION ALL SELECT customer_id, created_at FROM refund WHERE customer_id IN :ids
    UNION ALL SELECT customer_id, created_at FROM interaction_event WHERE customer_id IN :ids
    UNION ALL SELECT referrer_id, created_at FROM referral WHERE referrer_id IN :ids
    UNION ALL SELECT referee_id, created_at FROM referral WHERE referee_id IN :ids
    UNION ALL SELECT r.referrer_id, o.created_at FROM referral r
        JOIN customer_order o ON o.customer_id = r.referee_id WHERE r.referrer_id IN :ids
    UNION ALL SELECT r.referrer_id, f.created_at FROM referral r
        JOIN refund f ON f.customer_id = r.referee_id WHERE r.referrer_id IN :ids
    UNION ALL SELECT r.referrer_id, s.created_at FROM referral r
        JOIN referral s ON s.referrer_id = r.referee_id WHERE r.referrer_id IN :ids
    UNION ALL SELECT r.referrer_id, o.created_at FROM referral r
        JOIN referral s ON s.referrer_id = r.referee_id
        JOIN customer_order o ON o.customer_id = s.referee_id WHERE r.referrer_id IN :ids
    UNION ALL SELECT r.referrer_id, f.created_at FROM referral r
        JOIN referral s ON s.referrer_id = r.referee_id
        JOIN refund f ON f.customer_id = s.referee_id WHERE r.referrer_id IN :ids
) writes GROUP BY customer_id
"""

# How each stored column is compared with the recomputed one (see _agreement).
COUNT, MONEY, INSTANT, MEASURE, MODEL = "count", "money", "instant", "measure", "model"
# Figures that depend on the data alone.
DATA_COLUMNS = {
    "paid_orders": COUNT,
    "occasions": COUNT,
    "lifetime_spend": MONEY,
    "average_order_value": MONEY,
    "first_purchase_at": INSTANT,
    "last_purchase_at": INSTANT,
    "days_since_last": MEASURE,
    "frequency": COUNT,
    "recency_days": MEASURE,
    "age_days": MEASURE,
    "mean_repeat_spend": MEASURE,
    "reviews": COUNT,
    "shares": COUNT,
    "converted_referrals": COUNT,
}
# Figures that also depend on the `[scoring]` section of the tiers file (the window, the second-level decay).
CONFIG_COLUMNS = {"orders_in_window": COUNT, "net_spend": MONEY, "referred_revenue": MEASURE}
MODEL_COLUMNS = {"expected_purchases": MODEL, "p_alive": MODEL, "expected_spend": MODEL, "predicted_value": MODEL}
_KINDS = {**DATA_COLUMNS, **CONFIG_COLUMNS, **MODEL_COLUMNS}


def _number(value: Any) -> float:
    """A stored value on the scale score_columns computes: money in units, instants in epoch microseconds."""
    if value is None:
        return math.nan
    if isinstance(value, datetime):
        return float(micros_of(value))
    return float(value)


def _shown(kind: str, value: float) -> str:
    if math.isnan(value):
        return "none"
    if kind == MONEY:
        return f"{value:.4f}"
    if kind == INSTANT:
        return f"{datetime.fromtimestamp(value / 1e6):%Y-%m-%d}"
    if kind == COUNT:
        return f"{value:.0f}"
    return f"{value:.6g}"


def score_bounds(raw: NDArray[np.float64], grid: Sequence[float]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The percentile range a raw value may have been given, read off a run's cut-off grid.

    The low end counts the grid points strictly below the value, the high end also those within the last bits of
    it: where the population ties at a value, a recomputation a bit off it would otherwise jump the whole tie.
    """
    points = np.asarray(grid, dtype=np.float64)
    slack = np.abs(raw) * RAW_RELATIVE_SLACK + 1e-12
    low = np.searchsorted(points, raw - slack, side="left")
    high = np.searchsorted(points, raw + slack, side="left")
    size = max(points.size, 1)
    return np.round(100.0 * low / size, 2), np.round(100.0 * high / size, 2)


async def _figures_of(context: _Context, as_of: datetime, ids: Sequence[int]) -> Figures:
    """``load_figures`` for any number of customers, a page of ids per statement."""
    config = context.tiers.scoring
    parts = [await load_figures(context.session, as_of, config, ids[i : i + PAGE]) for i in range(0, len(ids), PAGE)]
    if len(parts) == 1:
        return parts[0]
    columns = {
        column.name: np.concatenate([getattr(part, column.name) for part in parts])
        for column in fields(Figures)
        if column.name != "as_of_day"
    }
    return Figures(**columns, as_of_day=parts[0].as_of_day)


@dataclass
class _Mismatch:
    customer_id: int
    label: str
    knew_until: datetime  # writes after this instant (less the slack) may be missing from the stored row
    kind: ProblemKind
    detail: str


async def _check_orders_and_figures(context: _Context) -> CheckResult:
    result = _new_result(
        context,
        "orders-vs-figures",
        "refunds agree with their orders; stored figures and scores agree with the orders, refunds and events",
        "Figures and scores are derived data: `loyalty recalc` rewrites them from the orders and refunds.",
    )
    session = context.session
    result.checked["orders"] = await context.count(Order)
    result.checked["refunds"] = await context.count(Refund)
    for sql in (_REFUND_SUMS_SQL, _REFUNDED_WITHOUT_REFUNDS_SQL):
        async for row in context.rows(text(sql)):
            refunds, total, refunded = (from_storage(int(value)) for value in (row.refunds, row.total, row.refunded))
            where = f"order {row.external_id} of {context.label(row.customer_id, row.customer_external_id)}"
            if refunds > total:
                result.add(REFUNDS_EXCEED_ORDER, f"{where}: refunds {refunds} > total {total}")
            if refunds != refunded:
                result.add(REFUNDED_COLUMN, f"{where}: refunded {refunded}, refunds add up to {refunds}")
    async for row in context.rows(text(_REFUND_MISFITS_SQL)):
        if row.refund_customer_id != row.order_customer_id:
            result.add(
                REFUND_CUSTOMER,
                f"refund {row.external_id} of order {row.order_external_id}: customer #{row.refund_customer_id}, "
                f"order's #{row.order_customer_id}",
            )
        if row.early:
            result.add(REFUND_BEFORE_ORDER, f"refund {row.external_id} of order {row.order_external_id}")
    async for row in context.rows(text(_FOREIGN_CURRENCY_SQL), {"currency": context.currency}):
        result.add(ORDER_CURRENCY, f"order {row.external_id} in {row.currency}")

    stale = 0
    await _prefer_indexes(context, True)
    scored = select(CustomerScore.__table__, Customer.external_id).join(
        Customer, Customer.id == CustomerScore.customer_id
    )
    async for page in _pages(session, scored, CustomerScore.customer_id):
        result.checked["customers"] = result.checked.get("customers", 0) + len(page)
        mismatches = await _compare_page(context, result, page)
        stale += await _settle_mismatches(context, result, mismatches)
    await _prefer_indexes(context, False)
    result.checked.setdefault("customers", 0)
    if context.unverified_scores:
        result.notes.append(
            f"Figures checked, scores not: {_many(context.unverified_scores, 'customer')} re-scored in real time "
            "within a model-cache period of a run (which model they used is not known), or under another tiers file."
        )
    if stale:
        result.notes.append(
            f"{_many(stale, 'customer')} with writes after their score was computed: stale, awaiting a re-score "
            "(the next full recalculation brings them up to date), not corrupt."
        )

    not_scored = 0
    async for row in context.rows(_sql(_UNSCORED_SQL, created_at=DateTimeUTC(), tier_written_at=DateTimeUTC())):
        if context.missed_by_last_run(row.created_at, row.tier_written_at):
            result.add(NOT_SCORED, context.label(row.id, row.external_id))
        else:
            not_scored += 1
    if not_scored:
        result.notes.append(f"Not scored yet: {_many(not_scored, 'customer')} who arrived after the last full run.")
    return result


async def _prefer_indexes(context: _Context, prefer: bool) -> None:
    """Steer PostgreSQL to the customer indexes for the page-by-page reads (in this transaction only).

    Each page's statements select a list of ids. PostgreSQL prices the comparison with a long id list so high that
    on a small or mid-sized shop it scans whole tables instead, once per page: seven times slower at 100,000
    customers (measured), and the walk takes one such scan per page. The set-based checks keep the default.
    """
    if context.dialect == "postgresql":
        await context.session.execute(text(f"SET LOCAL enable_seqscan = {'off' if prefer else 'on'}"))


async def _compare_page(context: _Context, result: CheckResult, page: Sequence[Any]) -> list[_Mismatch]:
    """Recompute a page of customers' figures, grouped by the instant their row is as of, and compare."""
    groups: dict[tuple[datetime, int | None], list[Any]] = defaultdict(list)
    for row in page:
        run = context.runs.get(row.run_id) if row.run_id is not None else None
        if row.run_id is not None and run is None:
            result.add(SCORE_RUN_UNKNOWN, f"{context.label(row.customer_id, row.external_id)}: run {row.run_id}")
        # A full run writes its own as_of; a real-time re-score its own instant (and keeps the run id).
        written_by = run.id if run is not None and row.as_of == run.as_of else None
        groups[(row.as_of, written_by)].append(row)
    mismatches: list[_Mismatch] = []
    for (as_of, run_id), rows in groups.items():
        mismatches.extend(await _compare_group(context, as_of, context.runs[run_id] if run_id else None, rows))
    return mismatches


async def _compare_group(
    context: _Context, as_of: datetime, written_by: _Run | None, rows: list[Any]
) -> list[_Mismatch]:
    """Customers whose rows are as of one instant: written by one full run, or re-scored together in real time.

    Their figures are recomputed with the scoring code itself, as the real-time re-score does for a few customers,
    and compared column by column as arrays; only the customers at fault are put into words.
    """
    config = context.tiers.scoring
    ids = [row.customer_id for row in rows]  # ascending, as the page and load_figures order them
    figures = await _figures_of(context, as_of, ids)
    assert figures.customer_id.tolist() == ids
    referrers, referees = await load_referral_edges(context.session, as_of, ids)
    referee_figures = await _figures_of(context, as_of, sorted(set(referees.tolist()))) if referees.size else None
    referrals = referral_figures(figures, referrers, referees, config.second_level_decay, referee_figures)

    # The model behind the scores: the writing run's own, or for a re-score the last run's before it, unless a
    # newer run had just finished (a process may still have held the previous model then).
    model_run = written_by if written_by is not None else context.finished_by(as_of)
    config_ok = context.config_matches(model_run)
    model = await context.model(model_run) if written_by is not None or context.model_settled(as_of) else None
    used = model or ScoringModel.initial()
    scores = score_inputs(figures, referrals, used.bgnbd, used.gamma_gamma, config, used.mean_order_value)
    rank_on_cutoffs(scores, figures.scored, used.cutoffs)
    expected = score_columns(figures, referrals, scores, slice(0, len(figures)))

    columns = {**DATA_COLUMNS, **(CONFIG_COLUMNS if config_ok else {})}
    # Column by column from the transposed rows: reading 20-odd attributes of thousands of rows one by one costs
    # more than the recomputation.
    positions = {name: index for index, name in enumerate(rows[0]._fields)}
    transposed = list(zip(*rows, strict=True))

    def column_of(name: str) -> NDArray[np.float64]:
        return np.array([_number(value) for value in transposed[positions[name]]], dtype=np.float64)

    stored = {name: column_of(name) for name in (*columns, *MODEL_COLUMNS)}
    wrong = {name: ~_agreement(kind, stored[name], expected[name]) for name, kind in columns.items()}
    figures_wrong = np.logical_or.reduce(list(wrong.values()))
    scores_wrong = np.zeros(len(rows), dtype=np.bool_)
    if config_ok and model is not None:
        for name, kind in MODEL_COLUMNS.items():
            wrong[name] = ~_agreement(kind, stored[name], expected[name])
        for name in SCORE_NAMES:
            column = f"{name}_score"
            stored[column] = column_of(column)
            grid = used.cutoffs.get(name) or []
            low, high = score_bounds(scores.raw[name], grid)
            ranked = figures.scored & (len(grid) > 0)
            low, high = np.where(ranked, low, 0.0), np.where(ranked, high, 0.0)
            wrong[column] = (stored[column] < low - SCORE_TOLERANCE) | (stored[column] > high + SCORE_TOLERANCE)
            expected[column] = (low + high) / 2
        scores_wrong = np.logical_or.reduce([wrong[name] for name in wrong if name not in columns]) & ~figures_wrong
    elif context.latest is not None:
        context.unverified_scores += len(rows)

    mismatches: list[_Mismatch] = []
    for position in np.flatnonzero(figures_wrong | scores_wrong).tolist():
        row = rows[position]
        problem, source = (
            (FIGURES_DIFFER, "recomputed") if figures_wrong[position] else (SCORES_DIFFER, "the run gives")
        )
        differences = [
            f"{name} stored {_shown(_KINDS.get(name, MODEL), stored[name][position])}, {source} "
            f"{_shown(_KINDS.get(name, MODEL), float(expected[name][position]))}"
            for name in wrong
            if wrong[name][position]
        ]
        knew_until = min(row.computed_at, written_by.started_at) if written_by is not None else row.computed_at
        label = context.label(row.customer_id, row.external_id)
        mismatches.append(_Mismatch(row.customer_id, label, knew_until, problem, "; ".join(differences[:3])))
    return mismatches


def _agreement(kind: str, stored: NDArray[np.float64], expected: NDArray[Any]) -> NDArray[np.bool_]:
    """Where a stored column agrees with the recomputed one (both missing counts as agreeing)."""
    recomputed = np.asarray(expected, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        if kind == COUNT:
            close = stored == recomputed
        elif kind == MONEY:
            close = np.abs(stored - recomputed) <= MONEY_TOLERANCE
        elif kind == INSTANT:
            close = np.abs(stored - recomputed) < 1.0
        elif kind == MEASURE:
            close = np.isclose(stored, recomputed, rtol=1e-9, atol=1e-9)
        else:
            close = np.isclose(stored, recomputed, rtol=1e-6, atol=1e-6)
    agreed: NDArray[np.bool_] = close | (np.isnan(stored) & np.isnan(recomputed))
    return agreed


async def _settle_mismatches(context: _Context, result: CheckResult, mismatches: list[_Mismatch]) -> int:
    """Report the mismatches of customers nothing was written for since their score; answer how many were stale."""
    if not mismatches:
        return 0
    latest: dict[int, datetime] = {}
    ids = sorted({mismatch.customer_id for mismatch in mismatches})
    statement = _sql(_LATEST_WRITES_SQL, customer_id=BigInteger(), written_at=DateTimeUTC())
    # The id list appears ten times in the statement: a fifth of a page keeps it within the parameter limits.
    step = PAGE // 5
    for start in range(0, len(ids), step):
        for row in await context.session.execute(statement, {"ids": ids[start : start + step]}):
            if row.written_at is not None:
                latest[int(row.customer_id)] = row.written_at
    stale = 0
    for mismatch in mismatches:
        written = latest.get(mismatch.customer_id)
        if written is not None and written > mismatch.knew_until - context.settle:
            stale += 1
        else:
            result.add(mismatch.kind, f"{mismatch.label}: {mismatch.detail}")
    return stale


# ---------------------------------------------------------------- tiers vs rules

_SCORE_WITHOUT_TIER_SQL = """
SELECT s.customer_id, c.external_id FROM customer_score s
JOIN customer c ON c.id = s.customer_id
LEFT JOIN customer_tier t ON t.customer_id = s.customer_id
WHERE t.customer_id IS NULL
"""

_NO_TIER_SQL = """
SELECT c.id, c.external_id, c.created_at FROM customer c
LEFT JOIN customer_tier t ON t.customer_id = c.id
WHERE t.customer_id IS NULL
"""

# Each entry must start from the tier the previous one (by id: the history is append-only) ended in.
_HISTORY_CHAIN_SQL = """
WITH ordered AS (
    SELECT customer_id, id, from_tier, to_tier,
           LAG(to_tier) OVER (PARTITION BY customer_id ORDER BY id) AS previous_tier,
           ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY id) AS position
    FROM tier_history
)
SELECT o.customer_id, c.external_id, o.id, o.from_tier, o.previous_tier
FROM ordered o JOIN customer c ON c.id = o.customer_id
WHERE (o.position = 1 AND o.from_tier IS NOT NULL)
   OR (o.position > 1 AND (o.from_tier IS NULL OR o.from_tier <> o.previous_tier))
"""

# The current tier is where the history ends, and `since` is when it last changed (a pin that kept the tier adds
# an entry without changing it).
_HISTORY_LAST_SQL = """
WITH last_entry AS (
    SELECT customer_id, to_tier, ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY id DESC) AS from_end
    FROM tier_history
),
last_change AS (
    SELECT customer_id, at, ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY id DESC) AS from_end
    FROM tier_history WHERE from_tier IS NULL OR from_tier <> to_tier
)
SELECT t.customer_id, c.external_id, t.tier, t.since, l.to_tier AS last_tier, g.at AS changed_at
FROM customer_tier t
JOIN customer c ON c.id = t.customer_id
LEFT JOIN last_entry l ON l.customer_id = t.customer_id AND l.from_end = 1
LEFT JOIN last_change g ON g.customer_id = t.customer_id AND g.from_end = 1
WHERE l.to_tier IS NULL OR l.to_tier <> t.tier OR g.at IS NULL OR g.at <> t.since
"""

_HISTORY_WITHOUT_TIER_SQL = """
SELECT h.customer_id, c.external_id, COUNT(*) AS entries FROM tier_history h
JOIN customer c ON c.id = h.customer_id
LEFT JOIN customer_tier t ON t.customer_id = h.customer_id
WHERE t.customer_id IS NULL
GROUP BY h.customer_id, c.external_id
"""


_TIER_COLUMNS = (
    CustomerTier.customer_id,
    CustomerTier.tier,
    CustomerTier.qualified_tier,
    CustomerTier.below_since,
    CustomerTier.pinned_tier,
    CustomerTier.pinned_until,
    CustomerTier.updated_at,
)


async def _pages(
    session: AsyncSession, statement: Select[*tuple[Any, ...]], key: InstrumentedAttribute[int]
) -> AsyncIterator[Any]:
    """The statement's rows ``PAGE`` at a time, in ``key`` order, each page after the last key seen (no offset
    to skip over, so every page costs the same however far the walk has come)."""
    last = 0
    while True:
        page = (await session.execute(statement.where(key > last).order_by(key).limit(PAGE))).all()
        if not page:
            return
        yield page
        last = page[-1].customer_id


async def _check_tiers(context: _Context) -> CheckResult:
    result = _new_result(
        context,
        "tiers-vs-rules",
        "stored tiers follow the tier rules, pins and grace periods; the tier history ends in the current tier",
        "Tiers are derived data: `loyalty recalc` applies the rules to every customer again.",
    )
    session = context.session
    configured = set(tier_order(context.tiers))
    # The score as the entity the rules' fact reader takes; of the tier row, only what the rules need (its texts
    # and progress would be decoded for nothing).
    tiered = (
        select(CustomerScore, *_TIER_COLUMNS, Customer.external_id)
        .select_from(CustomerTier)
        .join(Customer, Customer.id == CustomerTier.customer_id)
        .outerjoin(CustomerScore, CustomerScore.customer_id == CustomerTier.customer_id)
        .options(defer(CustomerScore.interests))
    )
    async for page in _pages(session, tiered, CustomerTier.customer_id):
        result.checked["tiers"] = result.checked.get("tiers", 0) + len(page)
        for row in page:
            _check_tier_row(
                context, result, configured, row, row.CustomerScore, context.label(row.customer_id, row.external_id)
            )
        session.expunge_all()
    result.checked.setdefault("tiers", 0)

    async for row in context.rows(text(_SCORE_WITHOUT_TIER_SQL)):
        result.add(SCORE_WITHOUT_TIER, context.label(row.customer_id, row.external_id))
    waiting = 0
    async for row in context.rows(_sql(_NO_TIER_SQL, created_at=DateTimeUTC())):
        if context.missed_by_last_run(row.created_at, None):
            result.add(NO_TIER_ROW, context.label(row.id, row.external_id))
        else:
            waiting += 1
    if waiting:
        result.notes.append(f"No tier yet: {_many(waiting, 'customer')} who arrived after the last full run.")

    result.checked["history entries"] = await context.count(TierHistory)
    async for row in context.rows(text(_HISTORY_CHAIN_SQL)):
        result.add(
            HISTORY_CHAIN,
            f"{context.label(row.customer_id, row.external_id)}: entry {row.id} from {row.from_tier or 'nothing'}, "
            f"previous entry ended in {row.previous_tier or 'nothing'}",
        )
    async for row in context.rows(_sql(_HISTORY_LAST_SQL, since=DateTimeUTC(), changed_at=DateTimeUTC())):
        label = context.label(row.customer_id, row.external_id)
        if row.last_tier is None:
            result.add(HISTORY_LAST, f"{label}: tier {row.tier} without any history")
        elif row.last_tier != row.tier:
            result.add(HISTORY_LAST, f"{label}: tier {row.tier}, history ends in {row.last_tier}")
        else:
            changed = f"{row.changed_at:%Y-%m-%d %H:%M:%S.%f}" if row.changed_at is not None else "none"
            result.add(HISTORY_LAST, f"{label}: since {row.since:%Y-%m-%d %H:%M:%S.%f}, last change {changed}")
    async for row in context.rows(text(_HISTORY_WITHOUT_TIER_SQL)):
        result.add(HISTORY_WITHOUT_TIER, f"{context.label(row.customer_id, row.external_id)}: {row.entries} entries")
    return result


def _check_tier_row(
    context: _Context,
    result: CheckResult,
    configured: set[str],
    tier_row: Any,
    score: CustomerScore | None,
    label: str,
) -> None:
    """One customer's stored tier (a row of _TIER_COLUMNS) against the rules, pins and grace."""
    tiers = context.tiers
    run = context.runs.get(score.run_id) if score is not None and score.run_id is not None else None
    by_run = run is not None and score is not None and score.as_of == run.as_of
    rules_run = run if by_run else context.finished_by(tier_row.updated_at)
    if not context.config_matches(rules_run):
        return  # decided under another tiers file: the next run decides again
    tier, qualified = tier_row.tier, tier_row.qualified_tier
    unknown = sorted({tier, qualified} - configured)
    if unknown:
        result.add(UNKNOWN_TIER, f"{label}: {', '.join(unknown)}")
        return
    rules = decide_tier(tiers, stored_facts(score)) if score is not None else PROSPECT
    if qualified != rules:
        result.add(QUALIFIED_DIFFERS, f"{label}: stored {qualified}, the rules give {rules}")
    if tier_row.pinned_tier is not None:
        if tier != tier_row.pinned_tier:
            result.add(PIN_NOT_APPLIED, f"{label}: pinned {tier_row.pinned_tier}, tier {tier}")
        if tier_row.pinned_until is not None and tier_row.pinned_until <= tier_row.updated_at:
            result.add(PIN_KEPT, f"{label}: pin ended {tier_row.pinned_until:%Y-%m-%d %H:%M}, kept at a later write")
        if tier_row.below_since is not None:
            result.add(CLOCK_WITHOUT_HOLD, f"{label}: pinned, grace started {tier_row.below_since:%Y-%m-%d}")
        return
    if tier == qualified:
        if tier_row.below_since is not None:
            result.add(CLOCK_WITHOUT_HOLD, f"{label}: in {tier}, grace started {tier_row.below_since:%Y-%m-%d}")
        return
    if rank(tiers, tier) > rank(tiers, qualified):
        if tier == PROSPECT:
            result.add(PROSPECT_WITH_ORDERS, f"{label}: qualifies for {qualified}")
        else:
            result.add(UPGRADE_NOT_APPLIED, f"{label}: in {tier}, qualifies for {qualified}")
        return
    # Held above the qualifying tier: only through a grace period, which a full run ends when it is over.
    if tier_row.below_since is None:
        result.add(HOLD_WITHOUT_CLOCK, f"{label}: in {tier}, qualifies for {qualified}")
        return
    written_by_run = by_run and score is not None and tier_row.updated_at == score.computed_at
    if written_by_run:
        grace = tiers.get(tier)
        grace_ends = tier_row.below_since + timedelta(days=grace.grace_days if grace is not None else 0)
        if qualified == PROSPECT:
            result.add(DOWNGRADE_MISSED, f"{label}: in {tier} without a paid order left (no grace applies)")
        elif tier_row.updated_at >= grace_ends:
            result.add(
                DOWNGRADE_MISSED,
                f"{label}: in {tier}, qualifies for {qualified} since {tier_row.below_since:%Y-%m-%d}, grace "
                f"ended {grace_ends:%Y-%m-%d}",
            )


# ---------------------------------------------------------------- codes vs campaigns

_ORPHAN_CODES_SQL = """
SELECT ic.code, ic.customer_id, c.external_id FROM issued_code ic JOIN customer c ON c.id = ic.customer_id
WHERE ic.send_id IS NULL AND ic.welcome_entry_id IS NULL
"""

_SEND_CODE_MISMATCH_SQL = """
SELECT ic.code, ic.campaign_id, ic.offer_id, s.campaign_id AS send_campaign_id, k.offer_id AS campaign_offer_id
FROM issued_code ic
JOIN campaign_send s ON s.id = ic.send_id
JOIN campaign k ON k.id = s.campaign_id
WHERE ic.campaign_id IS NULL OR ic.campaign_id <> s.campaign_id OR ic.offer_id <> k.offer_id
   OR ic.welcome_entry_id IS NOT NULL
"""

_WELCOME_CODE_MISMATCH_SQL = """
SELECT ic.code, ic.customer_id, h.customer_id AS entry_customer_id, h.kind
FROM issued_code ic JOIN tier_history h ON h.id = ic.welcome_entry_id
WHERE h.customer_id <> ic.customer_id OR h.kind NOT IN ('initial', 'upgrade', 'pinned')
"""

_CODES_OUTSIDE_TREATMENT_SQL = """
SELECT ic.code, ic.send_id, ic.customer_id, c.external_id, CASE WHEN m.send_id IS NULL THEN 0 ELSE 1 END AS member
FROM issued_code ic
JOIN customer c ON c.id = ic.customer_id
LEFT JOIN campaign_member m ON m.send_id = ic.send_id AND m.customer_id = ic.customer_id
WHERE ic.send_id IS NOT NULL AND (m.send_id IS NULL OR m.holdout)
"""

_MEMBERS_WITHOUT_CODE_SQL = """
SELECT m.send_id, m.campaign_id, m.customer_id, c.external_id
FROM campaign_member m
JOIN customer c ON c.id = m.customer_id
LEFT JOIN issued_code ic ON ic.send_id = m.send_id AND ic.customer_id = m.customer_id
WHERE NOT m.holdout AND ic.id IS NULL
"""

_EXTRA_CAMPAIGN_CODES_SQL = """
WITH held AS (
    SELECT campaign_id, customer_id, COUNT(*) AS codes FROM issued_code
    WHERE campaign_id IS NOT NULL GROUP BY campaign_id, customer_id
),
treated AS (
    SELECT campaign_id, customer_id, COUNT(*) AS sends FROM campaign_member
    WHERE NOT holdout GROUP BY campaign_id, customer_id
)
SELECT h.campaign_id, h.customer_id, c.external_id, h.codes, COALESCE(t.sends, 0) AS sends
FROM held h
JOIN customer c ON c.id = h.customer_id
LEFT JOIN treated t ON t.campaign_id = h.campaign_id AND t.customer_id = h.customer_id
WHERE h.codes > COALESCE(t.sends, 0)
"""

_MEMBER_CAMPAIGN_SQL = """
SELECT m.send_id, m.customer_id, c.external_id, m.campaign_id, s.campaign_id AS send_campaign_id
FROM campaign_member m JOIN campaign_send s ON s.id = m.send_id JOIN customer c ON c.id = m.customer_id
WHERE m.campaign_id <> s.campaign_id
"""

_SEND_COUNTS_SQL = """
SELECT s.id, s.campaign_id, s.issued, s.holdout, COALESCE(m.treatment, 0) AS treatment, COALESCE(m.held, 0) AS held
FROM campaign_send s
LEFT JOIN (
    SELECT send_id, SUM(CASE WHEN holdout THEN 0 ELSE 1 END) AS treatment,
           SUM(CASE WHEN holdout THEN 1 ELSE 0 END) AS held
    FROM campaign_member GROUP BY send_id
) m ON m.send_id = s.id
WHERE s.issued <> COALESCE(m.treatment, 0) OR s.holdout <> COALESCE(m.held, 0)
"""

# Customers opted out now whose profile has not changed since the code was issued: they were opted out then.
_OPTED_OUT_CODES_SQL = """
SELECT ic.code, ic.customer_id, c.external_id, ic.issued_at, c.updated_at
FROM issued_code ic JOIN customer c ON c.id = ic.customer_id
WHERE c.marketing_opt_out AND ic.issued_at > c.updated_at
"""

_REDEMPTION_TOTALS_SQL = """
SELECT ic.code, ic.customer_id, c.external_id, o.uses_per_code, ic.uses_left, COALESCE(r.active, 0) AS active
FROM issued_code ic
JOIN offer o ON o.id = ic.offer_id
JOIN customer c ON c.id = ic.customer_id
LEFT JOIN (SELECT code_id, COUNT(*) AS active FROM redemption WHERE voided_at IS NULL GROUP BY code_id) r
    ON r.code_id = ic.id
WHERE COALESCE(r.active, 0) > o.uses_per_code OR ic.uses_left + COALESCE(r.active, 0) <> o.uses_per_code
"""

_REDEMPTION_MISFITS_SQL = """
SELECT r.id, ic.code, r.customer_id, ic.customer_id AS owner_id,
       CASE WHEN r.redeemed_at >= ic.expires_at THEN 1 ELSE 0 END AS late,
       CASE WHEN o.min_order_total IS NOT NULL AND r.order_total < o.min_order_total THEN 1 ELSE 0 END AS below
FROM redemption r
JOIN issued_code ic ON ic.id = r.code_id
JOIN offer o ON o.id = ic.offer_id
WHERE r.customer_id <> ic.customer_id OR r.redeemed_at >= ic.expires_at
   OR (o.min_order_total IS NOT NULL AND r.order_total < o.min_order_total)
"""

_CODE_STATUS_SQL = """
SELECT code, status FROM issued_code
WHERE status NOT IN ('active', 'expired') OR (status = 'expired' AND expires_at > :now)
"""

_UNSENT_CAMPAIGNS_SQL = """
SELECT k.id, k.name FROM campaign k
WHERE k.status = 'completed'
  AND NOT EXISTS (SELECT 1 FROM campaign_send s WHERE s.campaign_id = k.id AND s.status = 'done')
"""


async def _check_codes(context: _Context) -> CheckResult:
    result = _new_result(
        context,
        "codes-vs-campaigns",
        "codes belong to a campaign send or a tier entry, one per treatment member, none for the holdout; "
        "redemptions within the uses allowed",
        "Codes and sends are written together by the dispatch; a re-queued send issues only what is missing.",
    )
    result.checked["codes"] = await context.count(IssuedCode)
    result.checked["campaign members"] = await context.count(CampaignMember)
    result.checked["sends"] = await context.count(CampaignSend)
    result.checked["redemptions"] = await context.count(Redemption)
    label = context.label
    async for row in context.rows(text(_ORPHAN_CODES_SQL)):
        result.add(CODE_ORPHAN, f"code {row.code} of {label(row.customer_id, row.external_id)}")
    async for row in context.rows(text(_SEND_CODE_MISMATCH_SQL)):
        result.add(
            CODE_SEND_MISMATCH,
            f"code {row.code}: campaign {row.campaign_id} offer {row.offer_id}, its send's campaign "
            f"{row.send_campaign_id} offer {row.campaign_offer_id}",
        )
    async for row in context.rows(text(_WELCOME_CODE_MISMATCH_SQL)):
        result.add(
            CODE_WELCOME_MISMATCH,
            f"code {row.code} of customer #{row.customer_id}: entry of #{row.entry_customer_id} ({row.kind})",
        )
    async for row in context.rows(text(_CODES_OUTSIDE_TREATMENT_SQL)):
        kind = HOLDOUT_WITH_CODE if row.member else CODE_WITHOUT_MEMBER
        result.add(kind, f"code {row.code} of {label(row.customer_id, row.external_id)} in send {row.send_id}")
    async for row in context.rows(text(_MEMBERS_WITHOUT_CODE_SQL)):
        result.add(
            MEMBER_WITHOUT_CODE,
            f"{label(row.customer_id, row.external_id)} in send {row.send_id} of campaign {row.campaign_id}",
        )
    async for row in context.rows(text(_EXTRA_CAMPAIGN_CODES_SQL)):
        result.add(
            EXTRA_CAMPAIGN_CODES,
            f"{label(row.customer_id, row.external_id)}: {row.codes} codes from campaign {row.campaign_id}, "
            f"treated in {row.sends} sends",
        )
    async for row in context.rows(text(_MEMBER_CAMPAIGN_SQL)):
        result.add(
            MEMBER_CAMPAIGN,
            f"{label(row.customer_id, row.external_id)} in send {row.send_id}: campaign {row.campaign_id}, "
            f"the send's {row.send_campaign_id}",
        )
    async for row in context.rows(text(_SEND_COUNTS_SQL)):
        result.add(
            SEND_COUNTS,
            f"send {row.id} of campaign {row.campaign_id}: issued {row.issued} / holdout {row.holdout}, "
            f"members {row.treatment} / {row.held}",
        )
    statement = _sql(_OPTED_OUT_CODES_SQL, issued_at=DateTimeUTC(), updated_at=DateTimeUTC())
    async for row in context.rows(statement):
        # A code issued while an opt-out was being committed is the race the settle time allows for.
        if row.issued_at - row.updated_at > context.settle:
            result.add(OPTED_OUT_CODE, f"code {row.code} of {label(row.customer_id, row.external_id)}")
    async for row in context.rows(text(_REDEMPTION_TOTALS_SQL)):
        where = f"code {row.code} of {label(row.customer_id, row.external_id)}"
        if row.active > row.uses_per_code:
            result.add(OVER_REDEEMED, f"{where}: {row.active} redemptions, {row.uses_per_code} allowed")
        if row.uses_left + row.active != row.uses_per_code:
            result.add(
                USES_LEFT, f"{where}: {row.uses_left} uses left, {row.active} redeemed, {row.uses_per_code} allowed"
            )
    async for row in context.rows(text(_REDEMPTION_MISFITS_SQL)):
        where = f"redemption {row.id} of code {row.code}"
        if row.customer_id != row.owner_id:
            result.add(REDEMPTION_OWNER, f"{where}: by #{row.customer_id}, owner #{row.owner_id}")
        if row.late:
            result.add(REDEMPTION_EXPIRED, where)
        if row.below:
            result.add(REDEMPTION_MINIMUM, where)
    async for row in context.rows(_sql(_CODE_STATUS_SQL), {"now": context.now}):
        result.add(CODE_STATUS, f"code {row.code}: {row.status}")
    async for row in context.rows(text(_UNSENT_CAMPAIGNS_SQL)):
        result.add(CAMPAIGN_UNSENT, f"campaign {row.id} ({row.name})")
    return result


# ---------------------------------------------------------------- outbox


def _key_number(dialect: str, prefix_length: int) -> str:
    """SQL for the id after an outbox key's `<type>:` prefix, NULL (PostgreSQL) or 0 (SQLite) when it is none."""
    tail = f"substr(e.dedupe_key, {prefix_length + 1})"
    if dialect == "postgresql":
        return f"CASE WHEN {tail} ~ '^[0-9]{{1,18}}$' THEN CAST({tail} AS BIGINT) END"
    return f"CAST({tail} AS INTEGER)"


# Each event names its row by key: the row must exist, with the same key and customer.
_DANGLING_SQL = """
SELECT e.id, e.event_type, e.dedupe_key FROM outbox_event e
LEFT JOIN {table} x ON x.{column} = {reference}
WHERE e.event_type = '{event_type}'
  AND (x.{column} IS NULL OR e.dedupe_key <> '{event_type}:' || {key} OR e.customer_id IS NULL
       OR e.customer_id <> x.customer_id)
"""

_DANGLING = (
    ("tier.changed", "tier_history", "id", "CAST(x.id AS VARCHAR(20))", True),
    ("offer.issued", "issued_code", "code", "x.code", False),
    ("offer.redeemed", "redemption", "id", "CAST(x.id AS VARCHAR(20))", True),
)

_TYPE_KEY_SQL = """
SELECT e.id, e.event_type, e.dedupe_key FROM outbox_event e
WHERE NOT ((e.event_type = 'tier.changed' AND e.dedupe_key LIKE 'tier.changed:%')
        OR (e.event_type = 'offer.issued' AND e.dedupe_key LIKE 'offer.issued:%')
        OR (e.event_type = 'offer.redeemed' AND e.dedupe_key LIKE 'offer.redeemed:%'))
"""

# Rows that must have been announced, looked up by the event key's unique index. An erasure deletes the events
# about the customer, so erased customers are left out.
_UNANNOUNCED = (
    (
        HISTORY_UNANNOUNCED,
        """
        SELECT h.id AS row_id, h.customer_id, c.external_id FROM tier_history h
        JOIN customer c ON c.id = h.customer_id
        LEFT JOIN outbox_event e ON e.dedupe_key = 'tier.changed:' || CAST(h.id AS VARCHAR(20))
        WHERE e.id IS NULL AND c.erased_at IS NULL
        """,
        "tier history entry",
    ),
    (
        CODE_UNANNOUNCED,
        """
        SELECT ic.code AS row_id, ic.customer_id, c.external_id FROM issued_code ic
        JOIN customer c ON c.id = ic.customer_id
        LEFT JOIN outbox_event e ON e.dedupe_key = 'offer.issued:' || ic.code
        WHERE e.id IS NULL AND c.erased_at IS NULL
        """,
        "code",
    ),
    (
        REDEMPTION_UNANNOUNCED,
        """
        SELECT r.id AS row_id, r.customer_id, c.external_id FROM redemption r
        JOIN customer c ON c.id = r.customer_id
        LEFT JOIN outbox_event e ON e.dedupe_key = 'offer.redeemed:' || CAST(r.id AS VARCHAR(20))
        WHERE e.id IS NULL AND c.erased_at IS NULL
        """,
        "redemption",
    ),
)

_ERASED_EVENTS_SQL = """
SELECT e.id, e.event_type, e.customer_id FROM outbox_event e JOIN customer c ON c.id = e.customer_id
WHERE c.erased_at IS NOT NULL AND e.created_at <= c.erased_at
"""


async def _check_outbox(context: _Context) -> CheckResult:
    result = _new_result(
        context,
        "outbox",
        "outbox events name stored rows; every tier change, code and redemption is announced",
        "Events are written in the same transaction as the change they announce; a mismatch means rows were "
        "changed around the service.",
    )
    result.checked["outbox events"] = await context.count(OutboxEvent)
    result.checked["tier history entries"] = await context.count(TierHistory)
    result.checked["codes"] = await context.count(IssuedCode)
    result.checked["redemptions"] = await context.count(Redemption)
    for event_type, table, column, key, numeric in _DANGLING:
        prefix_length = len(event_type) + 1
        reference = (
            _key_number(context.dialect, prefix_length) if numeric else f"substr(e.dedupe_key, {prefix_length + 1})"
        )
        # Only our own table names and SQL fragments are interpolated; there is no outside value in the statement.
        sql = _DANGLING_SQL.format(table=table, column=column, reference=reference, event_type=event_type, key=key)
        async for row in context.rows(text(sql)):
            result.add(EVENT_NOWHERE, f"event {row.id} ({row.dedupe_key})")
    async for row in context.rows(text(_TYPE_KEY_SQL)):
        result.add(EVENT_TYPE_KEY, f"event {row.id}: type {row.event_type}, key {row.dedupe_key}")
    for kind, sql, what in _UNANNOUNCED:
        async for row in context.rows(text(sql)):
            result.add(kind, f"{what} {row.row_id} of {context.label(row.customer_id, row.external_id)}")
    async for row in context.rows(text(_ERASED_EVENTS_SQL)):
        result.add(ERASED_EVENT, f"event {row.id} ({row.event_type}) about customer #{row.customer_id}")
    return result


# ---------------------------------------------------------------- references


def _foreign_keys() -> list[tuple[str, str, str, str, str]]:
    """(table, column, referred table, referred column, the table's first key column) for every foreign key, and
    every reference the application keeps instead of one (`kept_reference`)."""
    keys: list[tuple[str, str, str, str, str]] = []
    for table in Base.metadata.sorted_tables:
        first_key = next(iter(table.primary_key)).name
        references = {key.parent.name: (key.column.table.name, key.column.name) for key in table.foreign_keys}
        for each in table.columns:
            if "references" in each.info:
                referred, referred_column = each.info["references"].split(".")
                references[each.name] = (referred, referred_column)
        keys.extend((table.name, column, *references[column], first_key) for column in sorted(references))
    return keys


async def _check_references(context: _Context) -> CheckResult:
    result = _new_result(
        context,
        "references",
        "every row's customer, order, offer, campaign, send, code and event exists",
        "Foreign keys hold these, and on the order and send paths the statements that write them (a kept "
        "reference); a row pointing nowhere was written or deleted around them.",
    )
    keys = _foreign_keys()
    for table in dict.fromkeys(table for table, *_rest in keys):
        result.checked[table] = await context.count(Base.metadata.tables[table])
    for table, column, referred, referred_column, key in keys:
        # Identifiers from the service's own table metadata only; there is no outside value in the statement.
        sql = (
            f"SELECT c.{key} AS row_id, c.{column} AS missing FROM {table} c "  # noqa: S608
            f"LEFT JOIN {referred} p ON p.{referred_column} = c.{column} "
            f"WHERE c.{column} IS NOT NULL AND p.{referred_column} IS NULL"
        )
        async for row in context.rows(text(sql)):
            result.add(DANGLING_REFERENCE, f"{table} {key} {row.row_id}: {column} {row.missing} is not in {referred}")
    return result


_CHECKS: dict[str, Callable[[_Context], Awaitable[CheckResult]]] = {
    "orders-vs-figures": _check_orders_and_figures,
    "tiers-vs-rules": _check_tiers,
    "codes-vs-campaigns": _check_codes,
    "outbox": _check_outbox,
    "references": _check_references,
}
