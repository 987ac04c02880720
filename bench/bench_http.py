"""HTTP throughput and latency of the badge read and order ingestion, against a real server driven by wrk.

    .venv/bin/python bench/bench_http.py [--database-url URL] [--customers 20000] [--duration 10] [--repeat 3]
        [--servers serve,uvloop-httptools:2,asyncio-h11:1] [--profile DIR] [--keep]

Without ``--database-url`` it creates a scratch PostgreSQL database ``bench_http_<random>`` on
``--postgres-admin-url`` and drops it at the end (``--keep`` keeps it and prints its URL for a re-run); ``sqlite``
as the URL means a fresh SQLite file in a temporary directory. An empty database is migrated, filled with demo data
(``loyalty demo``) and recalculated (``loyalty recalc``) so every customer has a tier; a database that already
holds demo data is used as it is. Keys come from ``loyalty keys create``. All of it runs the real commands in
subprocesses.

For each server configuration it starts the real app (``loyalty serve`` for ``serve``, else uvicorn with the named
event loop and HTTP parser, both the way ``serve`` runs it) and the bench-only bare-insert app from ``bench/http``
on the same server with the same worker count; all configurations' servers run side by side (idle unless driven)
and each of the ``--repeat`` rounds drives every configuration in turn with wrk (a separate process):

- ``GET /health/live`` and the badge ``GET /v1/customers/{id}/tier`` at 64 connections: throughput and their ratio;
- the badge at 8 connections: p50 and p99 latency; beside the badge at 64, the share of its reads that the server's
  badge cache answered (its ``/metrics`` before and after; the cache fills from the warm-up on, and each round's
  orders make it forget the badges of the customers they re-score, as on a live shop);
- ``POST /v1/orders`` (unique order ids, a quarter of them for new customers, each re-scored in the request) and the
  bare INSERT at 16 connections: throughput and their ratio; ``POST /v1/orders`` at 8 connections: p99.

Figures are medians over the rounds; each ratio is taken within one round, so load from other work on the machine
falls on both sides of it. Beside throughput it reports the server's CPU time per request (all its processes, from
/proc), which moves less than throughput when other work competes for the cores. ``--profile DIR`` then samples
the real server with py-spy during one more run of each 64- and 16-connection scenario and prints the functions
holding the largest share of samples (raw stacks, for flame graphs, in DIR). The servers run with production
defaults (JSON access log at INFO, rate limiter on) except a rate limit high enough never to answer 429, and the
timer off, so no scheduled work lands inside a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import make_url, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from loyalty.db.models import Customer
from loyalty.settings import PROJECT_ROOT

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "http"
SECRET_KEY = "bench-http-secret-key-long-enough-for-hs256-0123456789"
WRK_LINE = re.compile(r"^BENCH (\{.*\})$", re.MULTILINE)
BADGE_CACHE_READS = re.compile(r'^loyalty_badge_cache_reads_total\{result="(hit|miss)"\} (\S+)$', re.MULTILINE)
NEW_CUSTOMER_SHARE = 0.25
TARGETS = {
    "badge_ratio": 0.50,
    "badge_p99_ms": 10.0,
    "orders_rps": 500.0,
    "orders_ratio": 0.50,
    "orders_p99_ms": 50.0,
}


# ---------------------------------------------------------------- database


async def _admin_execute(admin_url: str, statement: str) -> None:
    admin = create_async_engine(make_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await admin.dispose()


@contextmanager
def scratch_database(arguments: argparse.Namespace, workdir: Path) -> Iterator[str]:
    """The database URL to benchmark: the one given, or a scratch one that is removed afterwards."""
    if arguments.database_url and arguments.database_url != "sqlite":
        yield arguments.database_url
        return
    if arguments.database_url == "sqlite":
        yield f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
        return
    name = f"bench_http_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin_execute(arguments.postgres_admin_url, f'CREATE DATABASE "{name}"'))
    url = make_url(arguments.postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        if arguments.keep:
            print(f"kept the database: --database-url {url}")
        else:
            asyncio.run(_admin_execute(arguments.postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def server_environment(database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "LOYALTY_DATABASE_URL": database_url,
        "LOYALTY_SECRET_KEY": SECRET_KEY,
        "LOYALTY_TIERS_FILE": str(PROJECT_ROOT / "config" / "tiers.toml"),
        "LOYALTY_CURRENCY": "USD",
        "LOYALTY_RATE_LIMIT": "1000000000",
        "LOYALTY_SCHEDULER_ENABLED": "false",
    }


def loyalty_command(environment: dict[str, str], *arguments: str) -> str:
    """Run ``loyalty ARGUMENTS`` as a user would; answers its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "loyalty.cli", *arguments],
        env=environment,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        output = done.stdout[-2000:] + done.stderr[-4000:]
        sys.exit(f"loyalty {' '.join(arguments)} failed ({done.returncode}):\n{output}")
    return done.stdout


async def _customer_ids(database_url: str) -> list[str]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.scalars(select(Customer.external_id).where(Customer.external_id.like("demo-%")))
            return [str(external_id) for external_id in rows]
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class Fixture:
    database_url: str
    environment: dict[str, str]
    ids_file: Path
    storefront_key: str
    customers: int


def prepare(database_url: str, customers: int, workdir: Path) -> Fixture:
    """Migrate, load demo data and recalculate when the database has none; create a storefront key."""
    environment = server_environment(database_url)
    loyalty_command(environment, "db", "upgrade")
    existing = asyncio.run(_customer_ids(database_url))
    if not existing:
        started = time.perf_counter()
        print(f"loading {customers:,} demo customers ...", flush=True)
        loyalty_command(environment, "demo", "--customers", str(customers))
        print(f"  {time.perf_counter() - started:.0f} s; full recalculation ...", flush=True)
        started = time.perf_counter()
        run = json.loads(loyalty_command(environment, "recalc"))
        print(f"  run {run['run_id']} {run['status']} in {time.perf_counter() - started:.0f} s", flush=True)
        existing = asyncio.run(_customer_ids(database_url))
    else:
        print(f"using the {len(existing):,} demo customers already in the database", flush=True)
    ids_file = workdir / "customer_ids.txt"
    ids_file.write_text("\n".join(existing) + "\n")
    key = loyalty_command(environment, "keys", "create", "--name", "bench-http", "--scope", "storefront")
    return Fixture(database_url, environment, ids_file, key.strip().splitlines()[-1], len(existing))


# ---------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerConfig:
    """A server setup to measure: ``serve`` is `loyalty serve` as shipped; others name uvicorn's loop and parser."""

    name: str
    workers: int | None  # None: what `loyalty serve` chooses by default

    @property
    def label(self) -> str:
        return self.name if self.workers is None else f"{self.name}:{self.workers}"

    @classmethod
    def parse(cls, text_value: str) -> ServerConfig:
        name, _sep, workers = text_value.partition(":")
        if name != "serve" and len(name.split("-")) != 2:
            raise argparse.ArgumentTypeError(f"{text_value!r}: use serve[:N] or LOOP-HTTP[:N], e.g. uvloop-httptools:2")
        return cls(name, int(workers) if workers else None)

    def uvicorn_options(self) -> list[str]:
        """The options `loyalty serve` passes to uvicorn, with this configuration's loop and parser."""
        loop, http = ("auto", "auto") if self.name == "serve" else self.name.split("-")
        return [
            "--host", "127.0.0.1", "--loop", loop, "--http", http, "--no-access-log", "--no-server-header",
            "--proxy-headers", "--log-level", "warning",
        ]  # fmt: skip


def _serve_default_workers() -> int:
    from loyalty.cli import serve

    return int(next(option.default for option in serve.params if option.name == "workers"))  # type: ignore[arg-type]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: uvicorn's workers when it forks them, else the process itself."""
        listing = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        children = [int(pid) for pid in listing.stdout.split()]
        # A multiprocessing resource tracker may sit beside the workers; it never imports the app.
        workers = [pid for pid in children if "loyalty" in _command_line(pid) or "uvicorn" in _command_line(pid)]
        return workers or [self.process.pid]

    def badge_cache_reads(self) -> tuple[float, float] | None:
        """(hits, misses) of the badge cache so far, from /metrics; None where the server has no such figures.
        With several workers this is the one worker that answered the scrape."""
        try:
            with urllib.request.urlopen(self.base_url + "/metrics", timeout=5) as response:
                exposition = response.read().decode()
        except OSError:
            return None
        reads = dict(BADGE_CACHE_READS.findall(exposition))
        if "hit" not in reads or "miss" not in reads:
            return None
        return float(reads["hit"]), float(reads["miss"])

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server and its workers so far."""
        listing = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        ticks = 0
        for pid in [self.process.pid, *(int(p) for p in listing.stdout.split())]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of proc(5)
        return ticks / os.sysconf("SC_CLK_TCK")


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running(command: list[str], environment: dict[str, str], workdir: Path, ready_path: str) -> Iterator[Server]:
    port = _free_port()
    command = [*command, "--port", str(port)]
    log_path = workdir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=environment, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(server.base_url + ready_path, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"server {' '.join(command)} did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def real_server_command(config: ServerConfig, workers: int) -> list[str]:
    if config.name == "serve":
        return [sys.executable, "-m", "loyalty.cli", "serve", "--host", "127.0.0.1", "--workers", str(workers)]
    return [
        sys.executable, "-m", "uvicorn", "loyalty.app:create_server_app", "--factory", "--workers", str(workers),
        *config.uvicorn_options(),
    ]  # fmt: skip


def bare_server_command(config: ServerConfig, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "--app-dir", str(SCRIPTS), "bare_insert_app:create_app", "--factory",
        "--workers", str(workers), *config.uvicorn_options(),
    ]  # fmt: skip


# ---------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    server_cpu_seconds: float = 0.0
    # Share of the run's badge reads the server's badge cache answered (NaN: not a badge run, or no cache).
    cache_hit_share: float = float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_ms(self) -> float:
        """Server CPU per request: less sensitive than throughput to what else runs on the machine."""
        return 1000 * self.server_cpu_seconds / max(self.requests, 1)


def run_wrk(
    server: Server, path: str, script: str, connections: int, duration: float, *script_arguments: str
) -> WrkResult:
    url = server.base_url + path
    threads = min(2, connections)
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
        "-s", str(SCRIPTS / script), url, "--", *script_arguments,
    ]  # fmt: skip
    cache_before = server.badge_cache_reads() if script == "badge.lua" else None
    cpu_before = server.cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    cpu_used = server.cpu_seconds() - cpu_before
    cache_after = server.badge_cache_reads() if cache_before is not None else None
    cache_hit_share = float("nan")
    if cache_before is not None and cache_after is not None:
        hits, misses = (after - before for after, before in zip(cache_after, cache_before, strict=True))
        cache_hit_share = hits / (hits + misses) if hits + misses else float("nan")
    match = WRK_LINE.search(done.stdout)
    if done.returncode != 0 or match is None:
        sys.exit(f"wrk failed ({done.returncode}): {' '.join(command)}\n{done.stdout}\n{done.stderr}")
    figures = json.loads(match.group(1))
    return WrkResult(
        requests=figures["requests"],
        seconds=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1000,
        p90_ms=figures["p90_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        non_2xx=figures["non_2xx"],
        socket_errors=figures["socket_errors"],
        server_cpu_seconds=cpu_used,
        cache_hit_share=cache_hit_share,
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    target: str  # "real" or "bare"
    script: str
    connections: int

    def arguments(self, fixture: Fixture, round_tag: str) -> list[str]:
        if self.script == "badge.lua":
            return [str(fixture.ids_file), fixture.storefront_key]
        if self.script == "orders.lua":
            return [str(fixture.ids_file), fixture.storefront_key, round_tag, str(NEW_CUSTOMER_SHARE)]
        return []


# Interleaved, so that each ratio's two sides run within seconds of each other.
SCENARIOS = (
    Scenario("live@64", "real", "live.lua", 64),
    Scenario("badge@64", "real", "badge.lua", 64),
    Scenario("badge@8", "real", "badge.lua", 8),
    Scenario("bare_insert@16", "bare", "orders.lua", 16),
    Scenario("orders@16", "real", "orders.lua", 16),
    Scenario("orders@8", "real", "orders.lua", 8),
)
PATHS = {"live.lua": "/health/live", "badge.lua": "/", "orders.lua": "/"}


@dataclass
class ConfigResults:
    config: ServerConfig
    workers: int
    rounds: list[dict[str, WrkResult]] = field(default_factory=list)
    hot_spots: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    def median(self, value: str) -> float:
        return statistics.median(_figure(round_results, value) for round_results in self.rounds)

    def values(self, value: str) -> list[float]:
        return [_figure(round_results, value) for round_results in self.rounds]


def _figure(results: dict[str, WrkResult], value: str) -> float:
    derived = {
        "badge_ratio": lambda: results["badge@64"].rps / results["live@64"].rps,
        "orders_ratio": lambda: results["orders@16"].rps / results["bare_insert@16"].rps,
    }
    if value in derived:
        return derived[value]()
    scenario, _sep, attribute = value.rpartition(".")
    return float(getattr(results[scenario], attribute))


def measure(
    configs: list[ServerConfig], fixture: Fixture, arguments: argparse.Namespace, workdir: Path
) -> list[ConfigResults]:
    """Every configuration's servers run side by side, idle unless driven, and the rounds alternate between them:
    a change in the machine's other load then falls on every configuration alike, not on whichever ran last.
    """
    with ExitStack() as stack:
        measured: list[tuple[ConfigResults, dict[str, Server]]] = []
        for config in configs:
            workers = config.workers or _serve_default_workers()
            real = running(real_server_command(config, workers), fixture.environment, workdir, "/health/ready")
            bare = running(bare_server_command(config, workers), fixture.environment, workdir, "/")
            servers = {"real": stack.enter_context(real), "bare": stack.enter_context(bare)}
            measured.append((ConfigResults(config, workers), servers))
            # Warm-up: every worker opens its pool connections and reads the scoring model before anything counts.
            for scenario in SCENARIOS:
                run_wrk(
                    servers[scenario.target],
                    PATHS[scenario.script],
                    scenario.script,
                    scenario.connections,
                    2,
                    *scenario.arguments(fixture, f"w{uuid.uuid4().hex[:6]}"),
                )
        for round_number in range(arguments.repeat):
            for results, servers in measured:
                round_results: dict[str, WrkResult] = {}
                for scenario in SCENARIOS:
                    server = servers[scenario.target]
                    result = run_wrk(
                        server,
                        PATHS[scenario.script],
                        scenario.script,
                        scenario.connections,
                        arguments.duration,
                        *scenario.arguments(fixture, f"r{round_number}{uuid.uuid4().hex[:6]}"),
                    )
                    if result.non_2xx or result.socket_errors:
                        print(
                            f"  warning: {scenario.name}: {result.non_2xx} non-2xx, {result.socket_errors} socket"
                            f" errors (server log: {server.log_path})",
                            flush=True,
                        )
                    round_results[scenario.name] = result
                results.rounds.append(round_results)
                label = results.config.label
                print(f"  {label} round {round_number + 1}: {_round_summary(round_results)}", flush=True)
        if arguments.profile is not None:
            for results, servers in measured:
                for scenario in SCENARIOS:
                    if scenario.target == "real" and scenario.connections != 8:
                        directory = arguments.profile / results.config.label
                        results.hot_spots[scenario.name] = profile(
                            servers["real"], scenario, fixture, arguments.duration, directory
                        )
    return [results for results, _servers in measured]


def _round_summary(results: dict[str, WrkResult]) -> str:
    return ", ".join(f"{name} {result.rps:,.0f}/s p99 {result.p99_ms:.1f} ms" for name, result in results.items())


# ---------------------------------------------------------------- profile


def profile(
    server: Server, scenario: Scenario, fixture: Fixture, duration: float, directory: Path
) -> list[tuple[str, float]]:
    """Sample the server's worker(s) with py-spy while wrk drives the scenario; answers the hottest functions."""
    directory.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    raw = directory / f"{scenario.name.replace('@', '-')}.txt"
    samplers = []
    for index, pid in enumerate(server.worker_pids()):
        output = raw.with_suffix(f".{index}.txt")
        samplers.append(
            subprocess.Popen(
                [str(py_spy), "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate", "250",
                 "--format", "raw", "--output", str(output), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
    time.sleep(0.5)
    run_wrk(
        server,
        PATHS[scenario.script],
        scenario.script,
        scenario.connections,
        duration,
        *scenario.arguments(fixture, f"p{uuid.uuid4().hex[:6]}"),
    )
    for sampler in samplers:
        sampler.wait(timeout=duration + 30)
    stacks: Counter[str] = Counter()
    for output in directory.glob(raw.stem + ".*.txt"):
        for line in output.read_text().splitlines():
            stack, _sep, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks[stack] += int(count)
    return hottest_functions(stacks)


def hottest_functions(stacks: Counter[str], limit: int = 20) -> list[tuple[str, float]]:
    """Share of samples per function: inclusive (once per stack, however deep it recurses), then its own time.

    The process's start-up frames (runpy, click, the server's run loop) hold every sample and are left out.
    """
    total = sum(stacks.values()) or 1
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = [_short_frame(frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own["self: " + frames[-1]] += count
    boilerplate = ("<frozen runpy>", "click/", "asyncio/runners.py", "uvicorn/server.py", "uvicorn/_compat.py")
    hottest = [(f, n / total) for f, n in inclusive.most_common() if not any(b in f for b in boilerplate)]
    return hottest[:limit] + [(f, n / total) for f, n in own.most_common(limit // 2)]


def _short_frame(frame: str) -> str:
    # py-spy writes "function (path/to/file.py:line)"; the line is noise once functions are summed.
    name, _sep, location = frame.partition(" (")
    location = location.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", str(PROJECT_ROOT) + "/"):
        if marker in location:
            location = location.split(marker, 1)[1]
    return f"{name} ({location})"


# ---------------------------------------------------------------- report


ROWS = (
    ("GET /health/live @64, req/s", "live@64.rps", "{:,.0f}", None),
    ("GET /health/live, server CPU ms/req", "live@64.cpu_ms", "{:.2f}", None),
    ("badge GET /v1/customers/{id}/tier @64, req/s", "badge@64.rps", "{:,.0f}", None),
    ("badge, server CPU ms/req", "badge@64.cpu_ms", "{:.2f}", None),
    ("badge reads from the badge cache @64", "badge@64.cache_hit_share", "{:.0%}", None),
    ("badge / live ratio", "badge_ratio", "{:.0%}", ("≥", "badge_ratio", "{:.0%}")),
    ("badge @8, p50 ms", "badge@8.p50_ms", "{:.2f}", None),
    ("badge @8, p99 ms", "badge@8.p99_ms", "{:.2f}", ("<", "badge_p99_ms", "{:g} ms")),
    ("bare INSERT app @16, req/s", "bare_insert@16.rps", "{:,.0f}", None),
    ("bare INSERT app, server CPU ms/req", "bare_insert@16.cpu_ms", "{:.2f}", None),
    ("POST /v1/orders @16, req/s", "orders@16.rps", "{:,.0f}", ("≥", "orders_rps", "{:g}/s")),
    ("POST /v1/orders, server CPU ms/req", "orders@16.cpu_ms", "{:.2f}", None),
    ("orders / bare INSERT ratio", "orders_ratio", "{:.0%}", ("≥", "orders_ratio", "{:.0%}")),
    ("POST /v1/orders @16, p99 ms", "orders@16.p99_ms", "{:.1f}", None),
    ("POST /v1/orders @8, p50 ms", "orders@8.p50_ms", "{:.2f}", None),
    ("POST /v1/orders @8, p99 ms", "orders@8.p99_ms", "{:.2f}", ("<", "orders_p99_ms", "{:g} ms")),
)


def _meets(comparison: str, value: float, target: float) -> bool:
    return value >= target if comparison == "≥" else value < target


def print_report(all_results: list[ConfigResults], fixture: Fixture, arguments: argparse.Namespace) -> None:
    database = make_url(fixture.database_url).get_backend_name()
    print()
    print(
        f"{database}, {fixture.customers:,} demo customers, wrk {arguments.duration:g} s per figure, "
        f"median of {arguments.repeat} rounds (each round's values in brackets); load average before: "
        f"{arguments.load_before}, after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs"
    )
    label_width = max(len(row[0]) for row in ROWS)
    headers = [f"{r.config.label} ({r.workers} worker{'s' if r.workers > 1 else ''})" for r in all_results]
    column_width = max(24, *(len(header) for header in headers))
    print(f"{'':<{label_width}}  " + "  ".join(f"{h:>{column_width}}" for h in headers) + "  target")
    for label, value, number_format, target in ROWS:
        cells = []
        for results in all_results:
            median = results.median(value)
            cell = number_format.format(median)
            if target is not None:
                cell += " ✓" if _meets(target[0], median, TARGETS[target[1]]) else " ✗"
            cells.append(cell)
        target_text = f"{target[0]} {target[2].format(TARGETS[target[1]])}" if target else ""
        print(f"{label:<{label_width}}  " + "  ".join(f"{c:>{column_width}}" for c in cells) + f"  {target_text}")
    if arguments.verbose:
        print()
        for results in all_results:
            for label, value, number_format, _target in ROWS:
                spread = ", ".join(number_format.format(v) for v in results.values(value))
                print(f"{results.config.label:<22} {label:<{label_width}} [{spread}]")
    for results in all_results:
        for scenario_name, hot in results.hot_spots.items():
            print(f"\nprofile of {results.config.label}, {scenario_name}: inclusive share of samples")
            for frame, share in hot:
                print(f"  {share:6.1%}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database-url", help="a migrated or empty database; 'sqlite' for a scratch SQLite file")
    parser.add_argument("--postgres-admin-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--customers", type=int, default=20_000, help="demo customers to load into an empty database")
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every scenario; figures are medians")
    parser.add_argument(
        "--servers",
        type=lambda value: [ServerConfig.parse(part) for part in value.split(",")],
        default=[ServerConfig("serve", None)],
        help="comma-separated: serve[:N] (`loyalty serve`) or LOOP-HTTP[:N] (uvicorn, e.g. asyncio-h11:1)",
    )
    parser.add_argument("--profile", type=Path, help="also profile the real server with py-spy, output here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch PostgreSQL database")
    parser.add_argument("--verbose", action="store_true", help="print every round's values too")
    arguments = parser.parse_args()
    arguments.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with (
        tempfile.TemporaryDirectory(prefix="loyalty-bench-http-") as directory,
        scratch_database(arguments, Path(directory)) as database_url,
    ):
        workdir = Path(directory)
        fixture = prepare(database_url, arguments.customers, workdir)
        print(f"measuring {', '.join(config.label for config in arguments.servers)} ...", flush=True)
        print_report(measure(arguments.servers, fixture, arguments, workdir), fixture, arguments)


if __name__ == "__main__":
    main()
