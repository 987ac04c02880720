"""Secrets never reach the logs, at any log level: API keys, customer tokens, webhook signing secrets, the
token-signing key and the database password, in the app, in a real `loyalty serve` and in the CLI.

Every log line is captured as the service writes it (the JSON format, which carries each record's `extra` fields
and tracebacks), at DEBUG so that libraries' chattiest output is included, and searched for each secret.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.access.services import create_key
from loyalty.app import create_app
from loyalty.db.session import transaction
from loyalty.lib.logging import JsonFormatter, RequestIdFilter
from loyalty.settings import PROJECT_ROOT, Settings
from loyalty.webhooks.signing import SECRET_PREFIX
from tests.support import loyalty_environment, loyalty_server, run_loyalty

# Accepted and ignored by the test server's trust authentication, so it can stand in for a real password.
DB_PASSWORD = "db-pw-" + secrets.token_hex(12)
WEBHOOK = {"url": "https://hooks.example.com/loyalty", "events": ["tier.changed"]}


class CapturedLogs(logging.Handler):
    """Every record that reaches the logger it is attached to, formatted as the service formats it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.addFilter(RequestIdFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextmanager
def captured_logs(logger_name: str = "") -> Iterator[CapturedLogs]:
    """Capture a logger (the root by default). Attach it after `create_app`, which replaces the root's handlers."""
    handler = CapturedLogs()
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`create_app` configures the process's logging; put back what the tests before had, DEBUG stays here."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


def with_password(url: str) -> str:
    """The URL with the password set (PostgreSQL; an SQLite URL has none to set)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    return parsed.set(password=DB_PASSWORD).render_as_string(hide_password=False)


def assert_no_secret(output: str, found: dict[str, str]) -> None:
    for name, secret in found.items():
        assert secret, name
        assert secret not in output, f"the {name} appears in the output"
    # Any webhook secret, including one the test never saw (generated for an insert that failed).
    assert SECRET_PREFIX not in output


@asynccontextmanager
async def inserts_refused(engine: AsyncEngine, table: str) -> AsyncIterator[None]:
    """A trigger that makes the database refuse every insert into ``table``: a fault after the app sent the row."""
    async with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execute(
                text(
                    "CREATE FUNCTION refuse_insert() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'insert refused by the test'; END $$"
                )
            )
            await connection.execute(
                text(
                    f"CREATE TRIGGER refuse_insert BEFORE INSERT ON {table} "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_insert()"
                )
            )
        else:
            await connection.execute(
                text(
                    f"CREATE TRIGGER refuse_insert BEFORE INSERT ON {table} "
                    "BEGIN SELECT RAISE(ABORT, 'insert refused by the test'); END"
                )
            )
    try:
        yield
    finally:
        async with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                await connection.execute(text(f"DROP TRIGGER refuse_insert ON {table}"))
                await connection.execute(text("DROP FUNCTION refuse_insert()"))
            else:
                await connection.execute(text("DROP TRIGGER refuse_insert"))


@pytest.mark.usefixtures("restore_logging")
async def test_the_app_logs_no_secret_at_debug_level(settings, keys, engine, session_maker) -> None:
    debug = settings.model_copy(
        update={"log_level": "DEBUG", "log_format": "json", "database_url": with_password(settings.database_url)}
    )
    wrong_key = "lty_" + secrets.token_urlsafe(32)
    app = create_app(debug)
    with captured_logs() as logs:
        async with AsyncTestClient(app=app) as client:
            async with transaction(session_maker) as session:
                _key, created_key = await create_key(session, "created while logging", "storefront")
            for key in (keys.storefront, keys.marketing, keys.admin, created_key):
                assert (await client.get("/v1/tiers", headers={"X-API-Key": key})).status_code == 200
            storefront = keys.headers("storefront")
            assert (await client.put("/v1/customers/c-1", json={}, headers=storefront)).status_code == 201
            token = (await client.post("/v1/customers/c-1/token", headers=storefront)).json()["token"]
            assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).status_code == 200
            # Refused credentials: a wrong key, a tampered token, and each on the other kind of route.
            assert (await client.get("/v1/tiers", headers={"X-API-Key": wrong_key})).status_code == 401
            tampered = {"Authorization": f"Bearer {token}x"}
            assert (await client.get("/v1/me", headers=tampered)).status_code == 401
            assert (await client.get("/v1/tiers", headers={"Authorization": f"Bearer {token}"})).status_code == 401
            assert (await client.get("/v1/me", headers=storefront)).status_code == 401
            # The dashboard takes a key in a form body.
            signed_in = await client.post("/dashboard/sign-in", data={"key": keys.marketing}, follow_redirects=False)
            assert signed_in.status_code == 303
            refused = await client.post("/dashboard/sign-in", data={"key": wrong_key}, follow_redirects=False)
            assert refused.status_code == 401
            created = await client.post("/v1/webhooks", json=WEBHOOK, headers=keys.headers("admin"))
            assert created.status_code == 201
            webhook_secret = created.json()["secret"]
            # A database error on the statement that carries a new webhook's secret: its traceback is logged.
            async with inserts_refused(engine, "webhook_endpoint"):
                failed = await client.post("/v1/webhooks", json=WEBHOOK, headers=keys.headers("admin"))
            assert failed.status_code == 500
    assert "unhandled error" in logs.text
    assert '"status": 401' in logs.text  # the access lines of the refusals were captured too
    assert_no_secret(
        logs.text,
        {
            "storefront key": keys.storefront,
            "marketing key": keys.marketing,
            "admin key": keys.admin,
            "key created while logging": created_key,
            "wrong key": wrong_key,
            "customer token": token,
            "customer token's signature": token.rsplit(".", 1)[1],
            "webhook secret": webhook_secret,
            "token-signing key": settings.secret_key or "",
            **({"database password": DB_PASSWORD} if DB_PASSWORD in debug.database_url else {}),
        },
    )


UNREACHABLE_URL = f"postgresql+asyncpg://loyalty:{DB_PASSWORD}@127.0.0.1:1/loyalty"


@pytest.mark.usefixtures("restore_logging")
async def test_an_unreachable_database_does_not_log_its_password() -> None:
    unreachable = Settings(
        database_url=UNREACHABLE_URL,
        secret_key=secrets.token_urlsafe(48),
        tiers_file=PROJECT_ROOT / "config" / "tiers.toml",
        scheduler_enabled=False,
        db_timeout_seconds=2.0,
        log_level="DEBUG",
        log_format="json",
        _env_file=None,  # type: ignore[call-arg]
    )
    app = create_app(unreachable)
    with captured_logs() as logs:
        async with AsyncTestClient(app=app) as client:
            assert (await client.get("/health/ready")).status_code == 503
            assert (await client.get("/v1/tiers", headers={"X-API-Key": "lty_" + "x" * 43})).status_code == 503
    assert "database unavailable" in logs.text
    assert_no_secret(logs.text, {"database password": DB_PASSWORD})


def _environment(database_url: str, signing_key: str) -> dict[str, str]:
    """A `loyalty` process's environment logging everything, as JSON, with a signing key the test looks for."""
    settings = Settings(
        database_url=database_url,
        secret_key=signing_key,
        tiers_file=PROJECT_ROOT / "config" / "tiers.toml",
        _env_file=None,  # type: ignore[call-arg]
    )
    return loyalty_environment(settings, log_level="DEBUG", log_format="json")


async def test_a_real_server_and_the_cli_log_no_secret(settings, session_maker, tmp_path) -> None:
    signing_key = secrets.token_urlsafe(48)
    environment = _environment(with_password(settings.database_url), signing_key)
    cli_log = tmp_path / "keys-create.log"
    arguments = ["keys", "create", "--name", "checkout", "--scope", "storefront"]
    created = await run_loyalty(arguments, environment, cli_log, within=60)
    assert created.returncode == 0, cli_log.read_text()
    # The CLI prints a new key once, alone on stdout's last line, and nowhere else.
    cli_output, _newline, storefront_key = created.output.strip().rpartition("\n")
    cli_output += cli_log.read_text()
    async with transaction(session_maker) as session:
        _key, admin_key = await create_key(session, "admin", "admin")
    wrong_key = "lty_" + secrets.token_urlsafe(32)
    server_log = tmp_path / "serve.log"
    async with loyalty_server(environment, server_log) as server, httpx.AsyncClient(base_url=server.url) as client:
        storefront = {"X-API-Key": storefront_key}
        assert (await client.put("/v1/customers/c-1", json={}, headers=storefront)).status_code == 201
        token = (await client.post("/v1/customers/c-1/token", headers=storefront)).json()["token"]
        assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).status_code == 200
        assert (await client.get("/v1/tiers", headers={"X-API-Key": wrong_key})).status_code == 401
        assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {token}x"})).status_code == 401
        signed_in = await client.post("/dashboard/sign-in", data={"key": admin_key}, follow_redirects=False)
        assert signed_in.status_code == 303
        webhook = await client.post("/v1/webhooks", json=WEBHOOK, headers={"X-API-Key": admin_key})
        assert webhook.status_code == 201
    server_output = server_log.read_text()
    assert "/v1/webhooks" in server_output  # its access line: the capture works
    found = {
        "storefront key": storefront_key,
        "admin key": admin_key,
        "wrong key": wrong_key,
        "customer token": token,
        "webhook secret": webhook.json()["secret"],
        "token-signing key": signing_key,
    }
    if DB_PASSWORD in environment["LOYALTY_DATABASE_URL"]:
        found["database password"] = DB_PASSWORD
    assert_no_secret(server_output, found)
    assert_no_secret(cli_output, found)


async def test_the_cli_does_not_print_the_password_of_a_database_it_cannot_reach(tmp_path) -> None:
    environment = _environment(UNREACHABLE_URL, secrets.token_urlsafe(48))
    log = tmp_path / "keys-list.log"
    result = await run_loyalty(["keys", "list"], environment, log, within=60)
    errors = log.read_text()
    assert result.returncode != 0
    assert "Connect" in errors or "refused" in errors, errors[-2000:]
    assert DB_PASSWORD not in result.output + errors
