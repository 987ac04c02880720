"""Settings from the environment (prefix ``LOYALTY_``) and an optional ``.env`` file."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent

# ISO 4217 currencies whose minor unit is not two digits; every other code has cents.
_MINOR_UNITS = {
    "BHD": 3, "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "IQD": 3, "ISK": 0, "JOD": 3, "JPY": 0, "KMF": 0,
    "KRW": 0, "KWD": 3, "LYD": 3, "OMR": 3, "PYG": 0, "RWF": 0, "TND": 3, "UGX": 0, "UYI": 0, "VND": 0,
    "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
}  # fmt: skip


class ConfigurationError(RuntimeError):
    """The service cannot start with the configuration it was given."""


class Settings(BaseSettings):
    """Everything an operator can set; names match API.md's configuration table."""

    model_config = SettingsConfigDict(env_prefix="LOYALTY_", env_file=".env", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./loyalty.db"
    secret_key: str | None = None
    tiers_file: Path = Path("config/tiers.toml")
    currency: str = "USD"
    recalc_cron: str = "0 3 * * *"
    timezone: str = "UTC"
    poll_seconds: float = Field(default=5.0, gt=0)
    customer_token_ttl: int = Field(default=900, gt=0, le=86_400)
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    rate_limit: int = Field(default=6000, gt=0)
    log_format: Literal["json", "plain"] = "json"
    log_level: str = "INFO"
    db_pool_size: int = Field(default=10, gt=0)
    db_max_overflow: int = Field(default=10, ge=0)
    # Connecting to PostgreSQL, or waiting for a free pooled connection, gives up after this and the request
    # answers 503 (a database that is down or restarting refuses at once; this bounds one that does not answer).
    db_timeout_seconds: float = Field(default=10.0, gt=0)
    # A request's API key is read from the database at most this often per process (0: on every request); a
    # key revoked by another process is refused within this time (at once by the process that revoked it).
    # Bounds how long a revoked key keeps working on other processes; kept to seconds on purpose.
    api_key_cache_seconds: float = Field(default=1.0, ge=0, le=5)
    # Badges each server process keeps in memory (PostgreSQL only; 0 turns the cache off), and the longest any is
    # kept: changes are announced by the database at once, and this bounds staleness only should the
    # announcements' connection fail unnoticed until its next probe (every poll_seconds).
    badge_cache_size: int = Field(default=100_000, ge=0)
    badge_cache_seconds: float = Field(default=60.0, gt=0)
    scheduler_enabled: bool = True
    # A running recalculation renews its lease every third of this; a replica that dies loses it after this long.
    recalc_lease_seconds: float = Field(default=60.0, ge=1)

    @field_validator("currency")
    @classmethod
    def _currency_code(cls, value: str) -> str:
        code = value.strip().upper()
        if len(code) != 3 or not code.isalpha():
            raise ValueError("must be a three-letter ISO 4217 code such as USD")
        return code

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def currency_exponent(self) -> int:
        """Digits after the decimal point the store currency allows."""
        return _MINOR_UNITS.get(self.currency, 2)

    @property
    def sqlite_path(self) -> Path | None:
        if not self.is_sqlite:
            return None
        raw = self.database_url.split("///", 1)[1] if "///" in self.database_url else ""
        if raw in ("", ":memory:"):
            return None
        return Path(raw.split("?", 1)[0])

    def resolved_secret_key(self) -> str:
        """The token-signing secret; on the embedded default it is generated once and kept beside the database."""
        if self.secret_key:
            if len(self.secret_key) < 32:
                raise ConfigurationError("LOYALTY_SECRET_KEY: must be at least 32 characters")
            return self.secret_key
        db_path = self.sqlite_path
        if db_path is None:
            if self.is_sqlite:
                # An in-memory database lives as long as the process, and so may its secret.
                return _EPHEMERAL_SECRET
            raise ConfigurationError(
                "LOYALTY_SECRET_KEY: required with PostgreSQL so that every replica signs customer tokens "
                "with the same secret (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        secret_file = db_path.with_name(db_path.name + ".secret")
        if not secret_file.exists():
            secret_file.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: two processes starting at once must not each write their own secret.
            try:
                fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_urlsafe(48))
        return secret_file.read_text().strip()


_EPHEMERAL_SECRET = secrets.token_urlsafe(48)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
