"""The garbage collector of a server process, settled once the process has started."""

from __future__ import annotations

import gc

# Collections of the youngest generation run after this many new container objects (CPython's default: 700).
# A request keeps thousands alive until it answers (a batch's orders, its rows and statement parameters, the
# response), so at the default they survived young collections, filled the oldest generation, and brought full
# collections of the whole heap: about 90 ms each, every few batches of 1,000 orders (gc.callbacks, bench_batch's
# batches on the main loop).
YOUNG_THRESHOLD = 10_000


def settle_after_startup() -> None:
    """Exclude what startup built from every later collection, and collect the young generation less often.

    Modules, the routes, the tables' metadata, the API's schemas and settings live as long as the process, yet
    every full collection walked them all. ``gc.freeze`` moves them to a generation that is never collected;
    garbage of startup is collected first so that none is kept. Only for a process that serves until it exits: a
    process that builds many apps (a test run) would keep each one's frozen cycles for good.
    """
    gc.collect()
    gc.freeze()
    _young, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
