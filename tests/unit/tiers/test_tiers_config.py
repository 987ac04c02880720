"""The tiers file: the shipped one is valid; a broken one names the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from loyalty.app import create_app
from loyalty.settings import PROJECT_ROOT, Settings
from loyalty.tiers.config import TiersConfigError, load_tiers, parse_tiers

SHIPPED = PROJECT_ROOT / "config" / "tiers.toml"


def test_shipped_file_is_valid_and_ordered() -> None:
    config = load_tiers(SHIPPED)
    assert [tier.id for tier in config.tier] == ["vip", "nurture", "one_time", "prospect"]
    vip = config.get("vip")
    assert vip is not None
    assert vip.combinator == "any"
    assert [c.subject for c in vip.conditions] == ["value", "influence"]
    assert vip.grace_days == 30
    assert len(config.config_hash) == 64


@pytest.mark.parametrize(
    ("toml", "field", "reason"),
    [
        ('[[tier]]\nid = "gold"\nname = "Gold"\n', "tier[0].id", "Input should be"),
        (
            '[[tier]]\nid = "vip"\nname = "VIP"\nany = [{ score = "value", gte = 180 }]\n'
            '[[tier]]\nid = "one_time"\nname = "M"\n',
            "tier[0].any[0]",
            "between 0 and 100",
        ),
        (
            '[[tier]]\nid = "vip"\nname = "VIP"\nany = [{ score = "value", figure = "net_spend", gte = 1 }]\n'
            '[[tier]]\nid = "one_time"\nname = "M"\n',
            "tier[0].any[0]",
            "exactly one of",
        ),
        (
            '[[tier]]\nid = "vip"\nname = "VIP"\nall = [{ figure = "spend", gte = 1 }]\n'
            '[[tier]]\nid = "one_time"\nname = "M"\n',
            "tier[0].all[0].figure",
            "Input should be",
        ),
        ('[[tier]]\nid = "vip"\nname = "VIP"\ngrace_days = -1\n', "tier[0].grace_days", "greater than or equal"),
        (
            '[[tier]]\nid = "vip"\nname = "VIP"\nany = [{ score = "value", gte = 80 }]\n',
            "tier",
            "must have no conditions",
        ),
        ('[[tier]]\nid = "vip"\nname = "A"\n[[tier]]\nid = "vip"\nname = "B"\n', "tier", "repeated: vip"),
        ('[[tier]]\nid = "vip"\nname = "VIP"\ncolour = "gold"\n', "tier[0].colour", "Extra inputs"),
        ("[[tier]\nid = 1", "syntax", ""),
    ],
)
def test_broken_files_say_where_and_why(tmp_path: Path, toml: str, field: str, reason: str) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(toml)
    with pytest.raises(TiersConfigError) as caught:
        load_tiers(path)
    assert str(path) in str(caught.value)
    fields = [f for f, _ in caught.value.errors]
    assert field in fields, caught.value.errors
    assert reason in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TiersConfigError, match="No such file"):
        load_tiers(tmp_path / "absent.toml")


def test_json_form_for_previews() -> None:
    config = parse_tiers({"tier": [{"id": "one_time", "name": "Member"}]})
    assert config.tier[0].conditions == ()


def test_start_up_stops_on_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text('[[tier]]\nid = "vip"\nname = ""\n')
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db", tiers_file=path, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(TiersConfigError, match=r"tier\[0\]\.name"):
        create_app(settings)
