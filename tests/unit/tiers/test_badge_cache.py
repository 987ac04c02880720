"""The badge cache's own rules: it serves only while listening, a read racing a change keeps nothing, it holds at
most its size, and nothing longer than its lifetime."""

from __future__ import annotations

import time

from loyalty.tiers.badge_cache import BadgeCache


def listening_cache(size: int = 10, seconds: float = 60.0) -> BadgeCache:
    cache = BadgeCache(size, seconds)
    cache.start()
    return cache


def test_it_serves_nothing_until_it_listens_and_forgets_everything_when_it_stops() -> None:
    cache = BadgeCache(10, 60.0)
    cache.put("c-1", 1, b"vip", cache.generation)
    assert cache.get("c-1") is None
    cache.start()
    cache.put("c-1", 1, b"vip", cache.generation)
    assert cache.get("c-1") == b"vip"
    cache.stop()
    assert cache.get("c-1") is None
    assert len(cache) == 0
    # Listening again does not bring back what was held before.
    cache.start()
    assert cache.get("c-1") is None


def test_a_read_that_began_before_a_change_keeps_nothing() -> None:
    cache = listening_cache()
    began = cache.generation
    # The change's notification arrives while the read is still waiting for the database.
    cache.notified("1")
    cache.put("c-1", 1, b"nurture", began)
    assert cache.get("c-1") is None
    # A read that began after it is kept.
    cache.put("c-1", 1, b"vip", cache.generation)
    assert cache.get("c-1") == b"vip"


def test_notifications_forget_by_internal_id_or_all() -> None:
    cache = listening_cache()
    for number in (1, 2, 3):
        cache.put(f"c-{number}", number, b"vip", cache.generation)
    cache.notified("2")
    assert [cache.get(f"c-{n}") is not None for n in (1, 2, 3)] == [True, False, True]
    cache.notified("*")
    assert len(cache) == 0
    cache.put("c-1", 1, b"vip", cache.generation)
    # Someone else's payload on the channel: forgetting everything is the safe reading of it.
    cache.notified("not-an-id")
    assert cache.get("c-1") is None


def test_it_holds_at_most_its_size_dropping_the_least_recently_read() -> None:
    cache = listening_cache(size=2)
    cache.put("c-1", 1, b"vip", cache.generation)
    cache.put("c-2", 2, b"vip", cache.generation)
    assert cache.get("c-1") is not None
    cache.put("c-3", 3, b"vip", cache.generation)
    assert len(cache) == 2
    assert cache.get("c-2") is None
    assert cache.get("c-1") is not None
    assert cache.get("c-3") is not None
    # The dropped badge's notification finds nothing, and takes nothing else with it.
    cache.notified("2")
    assert len(cache) == 2


def test_an_entry_expires_after_the_cache_lifetime_or_when_it_would_read_differently() -> None:
    cache = listening_cache(seconds=0.6)
    cache.put("c-1", 1, b"vip", cache.generation)
    # A pinned badge whose pin lapses sooner than the lifetime, and one whose pin lapses later.
    cache.put("c-2", 2, b"pinned", cache.generation, changes_in=0.05)
    cache.put("c-3", 3, b"pinned", cache.generation, changes_in=3600)
    assert cache.get("c-1") is not None
    time.sleep(0.15)
    assert cache.get("c-2") is None
    assert cache.get("c-1") is not None
    time.sleep(0.5)
    assert cache.get("c-1") is None
    assert cache.get("c-3") is None


def test_hits_and_misses_are_counted_while_listening() -> None:
    cache = listening_cache()
    assert cache.get("c-1") is None
    cache.put("c-1", 1, b"vip", cache.generation)
    cache.get("c-1")
    cache.get("c-1")
    assert (cache.hits, cache.misses) == (2, 1)


def test_a_size_of_zero_keeps_nothing() -> None:
    cache = listening_cache(size=0)
    cache.put("c-1", 1, b"vip", cache.generation)
    assert cache.get("c-1") is None
