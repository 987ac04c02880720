"""Benchmark: BG/NBD + Gamma-Gamma fits on simulated populations, side by side with lifetimes 0.11.3.

Run from the repository root:

    .venv/bin/python bench/bench_models.py [--sizes 100000,1000000,10000000]

lifetimes runs in its own virtualenv (see bench/README-models.md), as a subprocess on the same data passed
through an .npz file; this file doubles as that subprocess (--lifetimes-worker) and then imports nothing of the
service. Populations are simulated from the BG/NBD and Gamma-Gamma processes with CDNOW's estimates in days,
customers acquired uniformly over the two years before the as_of instant (midnight), with t_x and T in whole
days as the service produces them and spends in cents.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LIFETIMES_PYTHON = ROOT / "bench" / ".venv-lifetimes" / "bin" / "python"
ACQUISITION_DAYS = 730


def significant_figures_agreeing(ours: float, theirs: float) -> int:
    """Largest n <= 10 with both values equal once rounded to n significant figures."""
    agreeing = 0
    for digits in range(1, 11):
        if float(f"{ours:.{digits - 1}e}") != float(f"{theirs:.{digits - 1}e}"):
            break
        agreeing = digits
    return agreeing


def max_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_lifetimes_worker(path: Path, repeats: int) -> None:
    """Fits lifetimes' defaults on the saved data and prints one JSON line."""
    warnings.simplefilter("ignore")
    # Only importable in the lifetimes virtualenv, where nothing of the service is.
    from lifetimes import BetaGeoFitter, GammaGammaFitter

    data = np.load(path)
    x, t_x, T, spend = data["x"], data["t_x"], data["T"], data["spend"]
    repeat = x > 0
    bg_times, gg_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        bg = BetaGeoFitter().fit(x, t_x, T)
        bg_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        gg = GammaGammaFitter().fit(x[repeat], spend[repeat])
        gg_times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "bgnbd": {name: float(bg.params_[name]) for name in ("r", "alpha", "a", "b")},
                "gamma_gamma": {
                    "p": float(gg.params_["p"]),
                    "q": float(gg.params_["q"]),
                    "gamma": float(gg.params_["v"]),
                },
                "bgnbd_seconds": statistics.median(bg_times),
                "gamma_gamma_seconds": statistics.median(gg_times),
                "runs": repeats,
                "max_rss_mib": max_rss_mib(),
            }
        )
    )


def simulate(n: int, seed: int) -> dict[str, np.ndarray]:
    from loyalty.scoring.models import DEFAULT_BGNBD_PARAMS, GammaGammaParams
    from loyalty.scoring.models.simulation import simulate_bgnbd, simulate_gamma_gamma

    rng = np.random.default_rng(seed)
    T = rng.integers(1, ACQUISITION_DAYS + 1, n).astype(np.float64)
    customers = simulate_bgnbd(DEFAULT_BGNBD_PARAMS, T, rng)
    spend = simulate_gamma_gamma(GammaGammaParams(p=6.25, q=3.74, gamma=15.44), customers.x, rng)
    return {
        "x": customers.x,
        "t_x": np.minimum(np.round(customers.t_x), T),
        "T": T,
        "spend": np.where(customers.x > 0, np.round(spend.mean_spend, 2), 0.0),
    }


def time_ours(data: dict[str, np.ndarray], repeats: int) -> dict[str, Any]:
    from loyalty.scoring.models import fit_bgnbd, fit_gamma_gamma

    bg_times, gg_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        bg = fit_bgnbd(data["x"], data["t_x"], data["T"])
        bg_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        gg = fit_gamma_gamma(data["spend"], data["x"])
        gg_times.append(time.perf_counter() - start)
    tracemalloc.start()
    fit_bgnbd(data["x"], data["t_x"], data["T"])
    bg_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    fit_gamma_gamma(data["spend"], data["x"])
    gg_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"bg": bg, "gg": gg, "bg_seconds": bg_times, "gg_seconds": gg_times, "peaks": (bg_peak, gg_peak)}


def time_lifetimes(data: dict[str, np.ndarray], repeats: int) -> dict[str, Any] | str:
    if not LIFETIMES_PYTHON.exists():
        return f"skipped: {LIFETIMES_PYTHON.relative_to(ROOT)} not found (see bench/README-models.md)"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "population.npz"
        np.savez(path, **data)
        completed = subprocess.run(
            [
                str(LIFETIMES_PYTHON),
                str(Path(__file__).resolve()),
                "--lifetimes-worker",
                str(path),
                "--repeats",
                str(repeats),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if completed.returncode != 0:
        return "failed: " + completed.stderr.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def report(n: int, data: dict[str, np.ndarray], ours: dict[str, Any], theirs: dict[str, Any] | str) -> None:
    bg, gg = ours["bg"], ours["gg"]
    bg_seconds = statistics.median(ours["bg_seconds"])
    gg_seconds = statistics.median(ours["gg_seconds"])
    runs = len(ours["bg_seconds"])
    repeaters = int((data["x"] > 0).sum())
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\n=== {n:,} customers ({repeaters:,} repeaters, max x {int(data['x'].max())}); load average {load} ===")
    print(
        f"unique rows: BG/NBD (x, t_x, T) {bg.n_rows:,} ({bg.n_rows / n:.1%} of customers); "
        f"Gamma-Gamma (x, mean spend) {gg.n_rows:,}"
    )
    print(
        f"ours: fallbacks bgnbd={bg.fallback} gamma_gamma={gg.fallback}; "
        f"Newton iterations {bg.iterations}/{gg.iterations}"
    )
    print(
        f"ours fit time, median of {runs}: BG/NBD {bg_seconds:.3f} s, Gamma-Gamma {gg_seconds:.3f} s, "
        f"total {bg_seconds + gg_seconds:.3f} s"
    )
    bg_peak, gg_peak = ours["peaks"]
    print(
        f"ours peak memory allocated during the fit (tracemalloc, inputs excluded): BG/NBD {bg_peak / 2**20:.1f} MiB, "
        f"Gamma-Gamma {gg_peak / 2**20:.1f} MiB; process max RSS so far (getrusage, incl. simulation) "
        f"{max_rss_mib():.0f} MiB"
    )
    if isinstance(theirs, str):
        print(f"lifetimes: {theirs}")
        return
    print(
        f"lifetimes default fit, median of {theirs['runs']}: BetaGeoFitter {theirs['bgnbd_seconds']:.3f} s, "
        f"GammaGammaFitter {theirs['gamma_gamma_seconds']:.3f} s; subprocess max RSS {theirs['max_rss_mib']:.0f} MiB"
    )
    print(
        f"speed ratio lifetimes/ours: BG/NBD {theirs['bgnbd_seconds'] / bg_seconds:.1f}x, "
        f"Gamma-Gamma {theirs['gamma_gamma_seconds'] / gg_seconds:.1f}x, total "
        f"{(theirs['bgnbd_seconds'] + theirs['gamma_gamma_seconds']) / (bg_seconds + gg_seconds):.1f}x"
    )
    rows = [(name, getattr(bg.params, name), theirs["bgnbd"][name]) for name in ("r", "alpha", "a", "b")]
    rows += [(name, getattr(gg.params, name), theirs["gamma_gamma"][name]) for name in ("p", "q", "gamma")]
    print(f"{'param':>6} {'ours':>14} {'lifetimes':>14} {'rel diff':>10} {'sig figs':>8}")
    for name, mine, other in rows:
        relative = abs(mine - other) / abs(other)
        print(
            f"{name:>6} {mine:>14.8g} {other:>14.8g} {relative:>10.1e} {significant_figures_agreeing(mine, other):>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="comma-separated customer counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of our fit (median reported)")
    parser.add_argument("--lifetimes-max", type=int, default=1_000_000, help="largest size to run lifetimes on")
    parser.add_argument("--lifetimes-repeats", type=int, default=3, help="timed lifetimes runs below 1M customers")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--lifetimes-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lifetimes_worker is not None:
        run_lifetimes_worker(args.lifetimes_worker, args.repeats)
        return

    sys.path.insert(0, str(ROOT))
    import scipy

    print(
        f"python {sys.version.split()[0]}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"{os.cpu_count()} CPUs; simulated with CDNOW estimates in days (r=0.2426, alpha=30.8952, a=0.7929, "
        f"b=2.4259; p=6.25, q=3.74, gamma=15.44); T whole days uniform on 1..{ACQUISITION_DAYS}, "
        "t_x rounded to whole days, spends in cents"
    )
    for n in (int(size) for size in args.sizes.split(",")):
        data = simulate(n, args.seed)
        # Fewer timed runs where one run already takes seconds.
        repeats = args.repeats if n <= 1_000_000 else max(1, math.ceil(args.repeats / 2))
        ours = time_ours(data, repeats)
        if n > args.lifetimes_max:
            theirs: dict[str, Any] | str = (
                f"skipped at {n:,} customers (--lifetimes-max {args.lifetimes_max:,}); "
                f"run with --lifetimes-max {n} to include it"
            )
        else:
            theirs = time_lifetimes(data, args.lifetimes_repeats if n < 1_000_000 else 1)
        report(n, data, ours, theirs)
        del data, ours


if __name__ == "__main__":
    main()
