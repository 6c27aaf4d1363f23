"""Sandbox calls per second: a trivial program through the warm worker pool vs a cold worker
(a fresh interpreter, with its namespaces, for every call), side by side in one run.

    python bench/sandbox.py [--calls N] [--workers W]

Prints a table: calls, wall seconds, calls/s, mean and p95 latency per call, and the ratio.
Sequential calls measure per-call overhead; `--workers` threads also measure the pool's
throughput with calls in parallel.
"""
from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from r1core.code_rewards import SandboxConfig
from r1core.sandbox import Sandbox

PROGRAM = "def add(a, b):\n    return a + b\n"
CALLS = ["add(1, 2)"]


def measure(box: Sandbox, calls: int, threads: int) -> dict:
    latencies: list[float] = []

    def one(_):
        t = time.perf_counter()
        result = box.run(PROGRAM, CALLS)
        latencies.append(time.perf_counter() - t)
        assert result.ok and result.values == [{"value": 3}], result

    box.run(PROGRAM, CALLS)  # start the pool (not timed)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(calls)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"calls": calls, "wall_s": wall, "calls_per_s": calls / wall,
            "mean_ms": 1000 * statistics.mean(latencies), "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for label, warm, threads in (("warm pool, sequential", True, 1), ("cold process per call, sequential", False, 1),
                                 (f"warm pool, {args.workers} threads", True, args.workers),
                                 (f"cold process per call, {args.workers} threads", False, args.workers)):
        with Sandbox(SandboxConfig(workers=args.workers), warm=warm) as box:
            rows.append((label, box.mode, measure(box, args.calls, threads)))
    print(f"\nsandbox: a trivial program and one test call, {args.calls} calls per row ({rows[0][1]} mode)\n")
    print("| path | calls | wall (s) | calls/s | mean latency (ms) | p95 latency (ms) |")
    print("|---|---|---|---|---|---|")
    for label, _, m in rows:
        print(f"| {label} | {m['calls']} | {m['wall_s']:.2f} | {m['calls_per_s']:.1f} | {m['mean_ms']:.1f} | "
              f"{m['p95_ms']:.1f} |")
    for i in (0, 2):
        print(f"\nwarm / cold ({rows[i][0].split(', ')[1]}): {rows[i][2]['calls_per_s'] / rows[i + 1][2]['calls_per_s']:.1f}x")


if __name__ == "__main__":
    main()
