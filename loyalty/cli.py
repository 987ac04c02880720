"""The `loyalty` command."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TextIO, TypeVar

import click
from sqlalchemy import select

from loyalty.settings import ConfigurationError, Settings, get_settings

T = TypeVar("T")


def _run(coroutine_factory: Callable[[], Awaitable[T]]) -> T:
    async def runner() -> T:
        return await coroutine_factory()

    return asyncio.run(runner())


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


async def _with_engine(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    from loyalty.db.session import create_engine

    engine = create_engine(settings)
    try:
        return await work(engine)
    finally:
        await engine.dispose()


@click.group()
@click.version_option(package_name="loyalty")
def main() -> None:
    """Loyalty: scores, tiers and offers for an online shop."""


# ---------------------------------------------------------------- serve


# One worker by default, by measurement (bench/bench_http.py, 2 cores shared with PostgreSQL): a second worker gave
# no more throughput on any route (within the run-to-run spread) and slightly more CPU per request, as it has no
# core of its own to use; on SQLite, workers would also queue for its one write lock. Scale out with replicas, or
# --workers where cores are spare. uvicorn's "auto" loop and parser are uvloop and httptools (uvicorn[standard]):
# against asyncio and h11 they took a third less server CPU per /health/live request and a fifth less per insert.
@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="Worker processes.")
@click.option("--demo", is_flag=True, help="On an empty database, load demo data and print an admin key first.")
@click.option("--demo-customers", default=5000, show_default=True, type=int)
def serve(host: str, port: int, workers: int, demo: bool, demo_customers: int) -> None:
    """Run the API and the scheduler (migrates the embedded SQLite database first)."""
    import uvicorn

    from loyalty.app import create_app
    from loyalty.lib.logging import configure_logging

    settings = get_settings()
    try:
        create_app(settings)  # fail fast on bad configuration, with the file, field and reason
    except (ConfigurationError, ValueError) as error:
        _fail(str(error))
    if settings.is_sqlite:
        _run(lambda: _with_engine(settings, _upgrade))
    if demo:
        _run(lambda: _with_engine(settings, lambda engine: _demo_if_empty(engine, settings, demo_customers)))
    configure_logging(settings.log_format, settings.log_level)
    uvicorn.run(
        "loyalty.app:create_server_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        server_header=False,
    )


async def _demo_if_empty(engine: Any, settings: Settings, customers: int) -> None:
    from loyalty.access.services import create_key
    from loyalty.db.models import ApiKey, Customer
    from loyalty.db.session import create_session_maker, transaction
    from loyalty.demo.generator import load_demo
    from loyalty.tiers.config import load_tiers

    session_maker = create_session_maker(engine)
    async with session_maker() as session:
        has_customers = await session.scalar(select(Customer.id).limit(1)) is not None
        has_demo_key = await session.scalar(select(ApiKey.id).where(ApiKey.name == "demo").limit(1)) is not None
    if not has_customers:
        click.echo(f"Loading demo data: {customers} customers ...")
        summary = await load_demo(engine, customers=customers)
        click.echo(f"Loaded {summary.customers} customers, {summary.orders} orders in {summary.seconds:.1f} s")
        run = await _recalculate(engine, settings, load_tiers(settings.tiers_file), None, False)
        if run is not None:
            click.echo(f"Recalculated tiers: run {run.run_id} {run.status} in {sum(run.phases.values()):.1f} s")
    if not has_demo_key:
        async with transaction(session_maker) as session:
            _key, plain = await create_key(session, "demo", "admin")
        click.echo("Demo admin key (shown once; try: curl -H 'X-API-Key: <key>' localhost:8000/v1/tiers):")
        click.echo(plain)


# ---------------------------------------------------------------- db


@main.group()
def db() -> None:
    """Database schema."""


async def _upgrade(engine: Any) -> None:
    from loyalty.db.migrate import upgrade_database

    await upgrade_database(engine)


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations up to the latest."""
    settings = get_settings()
    _run(lambda: _with_engine(settings, _upgrade))
    click.echo("database is at the latest migration")


# ---------------------------------------------------------------- keys


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what uses the key.")
@click.option("--scope", required=True, type=click.Choice(["storefront", "marketing", "admin"]))
def keys_create(name: str, scope: str) -> None:
    """Create a key and print it once, alone on the last line."""
    from loyalty.access.services import create_key
    from loyalty.db.session import create_session_maker, transaction

    async def work(engine: Any) -> tuple[int, str]:
        async with transaction(create_session_maker(engine)) as session:
            key, plain = await create_key(session, name, scope)
            return key.id, plain

    try:
        key_id, plain = _run(lambda: _with_engine(get_settings(), work))
    except ValueError as error:
        _fail(str(error))
    click.echo(f"Created key {key_id} ({scope}) for {name!r}. Store it now: it cannot be shown again.")
    click.echo(plain)


@keys.command("list")
def keys_list() -> None:
    """List keys (never their secrets)."""
    from loyalty.access.services import list_keys
    from loyalty.db.session import create_session_maker

    async def work(engine: Any) -> list[Any]:
        async with create_session_maker(engine)() as session:
            return await list_keys(session)

    rows = _run(lambda: _with_engine(get_settings(), work))
    click.echo(f"{'key_id':>6}  {'prefix':<12} {'scope':<10} {'status':<8} {'created_at':<20} name")
    for key in rows:
        status = "revoked" if key.revoked_at else "active"
        created = key.created_at.strftime("%Y-%m-%d %H:%M")
        click.echo(f"{key.id:>6}  {key.prefix + '…':<12} {key.scope:<10} {status:<8} {created:<20} {key.name}")


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke a key; every running server refuses it within LOYALTY_API_KEY_CACHE_SECONDS (1 s by default)."""
    from loyalty.access.services import revoke_key
    from loyalty.db.session import create_session_maker, transaction

    async def work(engine: Any) -> bool:
        async with transaction(create_session_maker(engine)) as session:
            return await revoke_key(session, key_id)

    if not _run(lambda: _with_engine(get_settings(), work)):
        _fail(f"no active key with key_id {key_id}")
    click.echo(f"revoked key {key_id}")


# ---------------------------------------------------------------- recalc


def _parse_instant(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("use RFC 3339, e.g. 2026-11-01T00:00:00Z", param_hint="--as-of") from None
    if instant.tzinfo is None:
        raise click.BadParameter("needs an offset, e.g. 2026-11-01T00:00:00Z", param_hint="--as-of")
    return instant


async def _recalculate(engine: Any, settings: Settings, tiers: Any, as_of: datetime | None, dry_run: bool) -> Any:
    """Queue a manual run, claim it and carry it out in this process; None when another run is active."""
    from loyalty.db.session import create_session_maker, transaction
    from loyalty.recalc import runs
    from loyalty.recalc.full import execute_run
    from loyalty.recalc.services import get_run

    session_maker = create_session_maker(engine)
    async with transaction(session_maker) as session:
        await runs.expire_stale_runs(session)
    async with transaction(session_maker) as session:
        run_id = await runs.enqueue_run(session, trigger="manual", as_of=as_of, dry_run=dry_run)
    if run_id is None:
        return None
    async with transaction(session_maker) as session:
        claimed = await runs.claim_next_run(session, settings.recalc_lease_seconds)
    assert claimed is not None
    await execute_run(session_maker, claimed.id, tiers, settings.recalc_lease_seconds)
    async with session_maker() as session:
        return await get_run(session, claimed.id)


@main.command()
@click.option("--as-of", "as_of_text", default=None, help="Replay as of this RFC 3339 instant.")
@click.option("--dry-run", is_flag=True, help="Compute and record the run without writing scores or tiers.")
def recalc(as_of_text: str | None, dry_run: bool) -> None:
    """Run a full recalculation now and print its run record."""
    from loyalty.tiers.config import TiersConfigError, load_tiers

    settings = get_settings()
    as_of = _parse_instant(as_of_text)
    try:
        tiers = load_tiers(settings.tiers_file)
    except TiersConfigError as error:
        _fail(str(error))

    async def work(engine: Any) -> Any:
        if settings.is_sqlite:
            await _upgrade(engine)
        return await _recalculate(engine, settings, tiers, as_of, dry_run)

    run = _run(lambda: _with_engine(settings, work))
    if run is None:
        _fail("a recalculation is already queued or running; see GET /v1/recalculations")
    click.echo(json.dumps(run.model_dump(mode="json"), indent=2))
    if run.status != "succeeded":
        sys.exit(1)


# ---------------------------------------------------------------- doctor


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, for monitoring.")
@click.option(
    "--check",
    "only",
    multiple=True,
    metavar="NAME",
    help="Run only this check (repeatable); the names are the ones the report prints.",
)
@click.option("--examples", default=5, show_default=True, type=click.IntRange(1, 100), help="Example ids per problem.")
def doctor(as_json: bool, only: tuple[str, ...], examples: int) -> None:
    """Check stored data for integrity, read-only: exit 0 when clean, 1 on any mismatch, 2 when it cannot check."""
    from loyalty.ops.doctor import CHECK_NAMES, DoctorUnavailableError, run_doctor
    from loyalty.tiers.config import TiersConfigError, load_tiers

    unknown = [name for name in only if name not in CHECK_NAMES]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not one of {', '.join(CHECK_NAMES)}", param_hint="--check")
    settings = get_settings()
    # Connecting to a missing SQLite file would create it: the doctor writes nothing, not even that.
    if settings.sqlite_path is not None and not settings.sqlite_path.exists():
        _fail(f"no database at {settings.sqlite_path} (LOYALTY_DATABASE_URL)")
    try:
        tiers = load_tiers(settings.tiers_file)
    except TiersConfigError as error:
        _fail(str(error))

    async def work(engine: Any) -> Any:
        return await run_doctor(
            engine,
            tiers,
            currency=settings.currency,
            model_cache_seconds=settings.poll_seconds,
            checks=only or CHECK_NAMES,
            examples=examples,
        )

    try:
        report = _run(lambda: _with_engine(settings, work))
    except DoctorUnavailableError as error:
        _fail(str(error))
    click.echo(json.dumps(report.as_json(), indent=2) if as_json else report.render())
    sys.exit(0 if report.ok else 1)


# ---------------------------------------------------------------- import


@main.group("import")
def import_() -> None:
    """Import history from CSV files; re-running a file imports nothing twice."""


_REJECTS_HELP = "Where skipped and rejected rows go, with a reason column. Default: FILE.rejects.csv."
_BATCH_HELP = "Records written per transaction."


@import_.command("orders")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format", "file_format", type=click.Choice(["generic", "shop-export"]), default="generic", show_default=True
)
@click.option("--rejects", "rejects_path", type=click.Path(dir_okay=False, path_type=Path), help=_REJECTS_HELP)
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1, 100_000), help=_BATCH_HELP)
def import_orders(file: Path, file_format: str, rejects_path: Path | None, batch_size: int) -> None:
    """Import order history: a generic CSV or a shop platform's order export (one row per line item)."""
    from loyalty.activity import importer

    _import_file(
        file,
        rejects_path,
        lambda engine, lines, rejects, progress: importer.import_orders(
            engine,
            lines,
            file_format="shop-export" if file_format == "shop-export" else "generic",
            rejects=rejects,
            batch_size=batch_size,
            progress=progress,
        ),
    )


@import_.command("customers")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rejects", "rejects_path", type=click.Path(dir_okay=False, path_type=Path), help=_REJECTS_HELP)
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1, 100_000), help=_BATCH_HELP)
def import_customers(file: Path, rejects_path: Path | None, batch_size: int) -> None:
    """Import customer profiles: customer_id, email, joined_at, marketing_opt_out; other columns are attributes."""
    from loyalty.activity import importer

    _import_file(
        file,
        rejects_path,
        lambda engine, lines, rejects, progress: importer.import_customers(
            engine, lines, rejects=rejects, batch_size=batch_size, progress=progress
        ),
    )


@import_.command("events")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rejects", "rejects_path", type=click.Path(dir_okay=False, path_type=Path), help=_REJECTS_HELP)
@click.option("--batch-size", default=5000, show_default=True, type=click.IntRange(1, 100_000), help=_BATCH_HELP)
def import_events(file: Path, rejects_path: Path | None, batch_size: int) -> None:
    """Import interaction events: event_id, customer_id, type, target, occurred_at."""
    from loyalty.activity import importer

    _import_file(
        file,
        rejects_path,
        lambda engine, lines, rejects, progress: importer.import_events(
            engine, lines, rejects=rejects, batch_size=batch_size, progress=progress
        ),
    )


class _ImportProgress:
    """A one-line progress report on stderr: records, rate, share of the file read and the time left."""

    def __init__(self, binary: BinaryIO, total_bytes: int) -> None:
        self._binary = binary
        self._total = max(total_bytes, 1)
        self._started = time.perf_counter()

    def __call__(self, summary: Any) -> None:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        done = min(self._binary.tell(), self._total)
        rate = summary.records / elapsed
        remaining = elapsed * (self._total - done) / done if done else 0.0
        eta = str(timedelta(seconds=round(remaining)))
        click.echo(
            f"\r{summary.records:,} {summary.kind}, {rate:,.0f}/s, {100 * done / self._total:.0f}%, ETA {eta}   ",
            nl=False,
            err=True,
        )


def _import_file(
    file: Path,
    rejects_path: Path | None,
    run: Callable[[Any, Iterable[str], TextIO, Callable[[Any], None]], Awaitable[Any]],
) -> None:
    from loyalty.activity.importer import ImportFileError

    settings = get_settings()
    rejects_path = rejects_path or file.with_name(file.name + ".rejects.csv")
    # Bytes read so far come from the binary file under the text layer: the share of the file done, for the ETA.
    # utf-8-sig drops the byte order mark spreadsheet programs write; newline="" is what the csv module expects.
    with (
        file.open("rb") as binary,
        io.TextIOWrapper(binary, encoding="utf-8-sig", newline="") as lines,
        rejects_path.open("w", encoding="utf-8", newline="") as rejects,
    ):
        progress = _ImportProgress(binary, file.stat().st_size)

        async def work(engine: Any) -> Any:
            if settings.is_sqlite:
                await _upgrade(engine)
            return await run(engine, lines, rejects, progress)

        try:
            summary = _run(lambda: _with_engine(settings, work))
        except ImportFileError as error:
            click.echo(err=True)
            _fail(f"{file}: {error}")
    click.echo(err=True)
    figures = [
        ("rows read", summary.rows),
        (f"{summary.kind} imported", summary.imported),
        *([("refunds imported", summary.refunds)] if summary.kind == "orders" else []),
        *([("customers updated", summary.updated)] if summary.kind == "customers" else []),
        ("duplicates (already stored)", summary.duplicates),
        ("skipped", summary.skipped),
        ("rejected", summary.rejected),
        ("customers created", summary.customers_created),
    ]
    click.echo(f"Imported {file} in {summary.seconds:.1f} s ({summary.rows / max(summary.seconds, 1e-9):,.0f} rows/s)")
    for label, value in figures:
        click.echo(f"  {label:<28} {value:>12,}")
    if summary.skipped or summary.rejected:
        click.echo(f"Skipped and rejected rows, each with its reason: {rejects_path}")
        for reason, count in summary.reasons.most_common(5):
            click.echo(f"  {count:>8,} × {reason}")
    else:
        click.echo(f"Nothing skipped or rejected ({rejects_path} has the header only).")
    if summary.kind != "customers" and summary.imported:
        click.echo(
            "Imported history is not scored one order at a time: the next full recalculation (`loyalty recalc` or "
            "the scheduled run) scores these customers."
        )


# ---------------------------------------------------------------- demo


@main.command()
@click.option("--customers", default=5000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--seed", default=7, show_default=True, type=int)
def demo(customers: int, seed: int) -> None:
    """Fill the database with realistic generated shop data."""
    from loyalty.demo.generator import load_demo

    settings = get_settings()

    async def work(engine: Any) -> Any:
        if settings.is_sqlite:
            await _upgrade(engine)
        return await load_demo(engine, customers=customers, seed=seed, progress=_progress)

    try:
        summary = _run(lambda: _with_engine(settings, work))
    except ValueError as error:
        _fail(str(error))
    click.echo(
        f"\nLoaded {summary.customers} customers, {summary.orders} orders, {summary.refunds} refunds, "
        f"{summary.events} events, {summary.referrals} referrals in {summary.seconds:.1f} s"
    )


def _progress(phase: str, done: int, total: int) -> None:
    click.echo(f"\r{phase}: {done}/{total}", nl=False)


if __name__ == "__main__":
    main()
