"""Settings: environment names, the generated secret on the embedded default, the PostgreSQL requirement."""

from __future__ import annotations

from pathlib import Path

import pytest

from loyalty.app import create_app
from loyalty.settings import PROJECT_ROOT, ConfigurationError, Settings


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOYALTY_CURRENCY", "eur")
    monkeypatch.setenv("LOYALTY_RATE_LIMIT", "42")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.currency, settings.rate_limit) == ("EUR", 42)
    assert settings.database_url == "sqlite+aiosqlite:///./loyalty.db"


def test_currency_exponent() -> None:
    assert Settings(currency="JPY", _env_file=None).currency_exponent == 0  # type: ignore[call-arg]
    assert Settings(currency="KWD", _env_file=None).currency_exponent == 3  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="ISO 4217"):
        Settings(currency="dollars", _env_file=None)  # type: ignore[call-arg]


def test_sqlite_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/shop.db", _env_file=None)  # type: ignore[call-arg]
    first = settings.resolved_secret_key()
    assert len(first) >= 32
    assert (tmp_path / "shop.db.secret").stat().st_mode & 0o777 == 0o600
    assert settings.resolved_secret_key() == first


def test_postgres_requires_a_secret() -> None:
    settings = Settings(
        database_url="postgresql+asyncpg://u@127.0.0.1/db",
        tiers_file=PROJECT_ROOT / "config" / "tiers.toml",
        _env_file=None,  # type: ignore[call-arg]
    )
    with pytest.raises(ConfigurationError, match="LOYALTY_SECRET_KEY"):
        create_app(settings)


def test_short_secret_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="at least 32"):
        Settings(secret_key="short", _env_file=None).resolved_secret_key()  # type: ignore[call-arg]


def test_bad_cron_stops_start_up(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db",
        tiers_file=PROJECT_ROOT / "config" / "tiers.toml",
        recalc_cron="every night",
        _env_file=None,  # type: ignore[call-arg]
    )
    with pytest.raises(ValueError, match="expected 5 fields"):
        create_app(settings)
