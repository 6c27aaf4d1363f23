"""What a Ray Train job costs before and after its training loop, through our own `fit`.

Runs N jobs whose loop does only what every stage's does first and last (`worker_setup`: the
job validated, torch threads, the Ray Train context and the MLflow tracking of rank 0; then
`finish`), on a local Ray and a throwaway MLflow store, and prints per job: the time from
`fit()` to the loop's first line (Ray Train: controller, worker group, process group), the
worker's set-up (our module's imports, tracking), and from the loop's end to `fit()` returning.
The first job also pays the first import of Ray Train in this process. Then the same loops as
one job of N parts (`ray_jobs.fit` of several parts, as a distill student's three stages run),
against the N jobs' sum.

    python bench/ray_train_startup.py [--jobs 3] [--poll S]   (--poll: runtime.train_poll_interval_s)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from r1core.config import RuntimeConfig, TrainComputeConfig
from tasks import ray_jobs, tracking
from tasks.jobs import TrainJob


def empty_loop(config: dict) -> None:
    started = time.time()
    job, ctx = ray_jobs.worker_setup(config, TrainJob)
    ready = time.time()
    ctx.finish()
    Path(config["marks"]).write_text(json.dumps({"started": started, "ready": ready, "ended": time.time()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--poll", type=float, default=RuntimeConfig().train_poll_interval_s)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        runtime = RuntimeConfig(workdir=d, num_cpus=2, ray_dashboard=False, train_poll_interval_s=args.poll)
        print(f"{'job':>3} {'fit -> loop s':>14} {'worker set-up s':>16} {'loop end -> return s':>21} {'total s':>8}")

        def part(i: int):
            job = TrainJob(stage=f"startup/{i}", tracking_uri=tracking.tracking_uri(runtime),
                           run_id=tracking.start_run(runtime, f"startup-{i}"), tracking_outage_s=30,
                           checkpoint_dir=f"{d}/ckpt{i}", output_dir=f"{d}/out{i}", compute=TrainComputeConfig(), seed=0)
            marks = Path(d) / f"marks{i}.json"
            return (lambda config, _m=str(marks): empty_loop({**config, "marks": _m})), job, marks

        totals = []
        for i in range(args.jobs):
            loop, job, marks = part(i)
            t0 = time.time()
            ray_jobs.fit([(loop, job)], runtime, f"startup-{i}")
            t1 = time.time()
            m = json.loads(marks.read_text())
            totals.append(t1 - t0)
            print(f"{i:>3} {m['started'] - t0:>14.1f} {m['ready'] - m['started']:>16.1f} {t1 - m['ended']:>21.1f} "
                  f"{t1 - t0:>8.1f}")
        # the same parts as one job (`fit` of several parts: a student's base, SFT and RL)
        parts = [part(args.jobs + i)[:2] for i in range(args.jobs)]
        t0 = time.time()
        ray_jobs.fit(parts, runtime, "startup-parts")
        together = time.time() - t0
        print(f"{args.jobs} jobs one after another: {sum(totals):.1f} s; the same {args.jobs} loops as one job of "
              f"{args.jobs} parts: {together:.1f} s (saved {sum(totals) - together:.1f} s)")

if __name__ == "__main__":
    main()
