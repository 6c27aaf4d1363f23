"""bench/orchestration.py's split of overlapping stage runs: the parts of one Ray Train job ran one
after another (their loops add up), separate jobs at the same time overlapped (the longest
counts)."""
from __future__ import annotations

import importlib.util

from r1core.config import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("orchestration_bench", PROJECT_ROOT / "bench" / "orchestration.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def row(stage, start, end, loop, job=None, evaluation=0.0):
    return {"stage": stage, "start": start, "end": end, "wall": end - start, "loop": loop, "eval": evaluation,
            "eval_wall": evaluation, "data": 0.0, "in_job": evaluation > 0, "job": job}


def test_parts_of_one_job_add_up_and_concurrent_jobs_overlap():
    rows = [row("sft", 0, 50, 30, job="j-sft", evaluation=5),
            row("rm/a", 60, 150, 70, job="j-a"), row("rm/b", 60.5, 148, 65, job="j-b"),
            row("s/base", 160, 260, 40, job="j-s", evaluation=4), row("s/sft", 160.2, 260, 12, job="j-s", evaluation=7),
            row("s/rl", 160.4, 260, 17, job="j-s", evaluation=3)]
    sft, rms, student = bench.merge_overlapping(rows)
    assert (sft["loop"], sft["eval"], sft["wall"]) == (30, 5, 50)
    assert rms["stage"] == "rm/a + rm/b" and (rms["loop"], rms["wall"]) == (70, 90)  # the longer of two at once
    assert student["stage"] == "s/base + s/sft + s/rl"
    assert (student["loop"], student["eval"], student["wall"]) == (69, 14, 100)  # one after another
    assert student["in_job"]


def test_runs_without_a_job_tag_that_overlap_count_the_longest():
    (merged,) = bench.merge_overlapping([row("a", 0, 10, 6), row("b", 0.5, 12, 8)])
    assert (merged["loop"], merged["wall"]) == (8, 12)


def test_cpu_use_is_split_into_compute_and_orchestration_seconds(tmp_path):
    """`vmstat -t 1` lines (UTC): headers skipped, seconds outside the run's span left out, each
    second's use 100 - idle - iowait, placed in a compute interval or not."""
    from datetime import datetime, timezone

    def line(second: int, idle: int, iowait: int = 0) -> str:
        stamp = datetime.fromtimestamp(1_000 + second, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        return f" 2  0 0 100 10 100 0 0 0 0 900 2000 {90 - idle} 10 {idle} {iowait} 0 {stamp}"

    log = tmp_path / "vmstat.log"
    log.write_text("\n".join([
        "procs -----------memory---------- ---swap-- -----io---- -system-- ------cpu----- -----timestamp-----",
        " r  b   swpd   free   buff  cache   si   so    bi    bo   in   cs us sy id wa st                 UTC",
        line(0, 90), line(1, 5), line(2, 10), line(3, 60, 20), line(4, 0), line(5, 0), line(9, 50)]))
    busy = bench.cpu_busy(str(log), start=1_000.5, end=1_005.5, intervals=[(1_000.5, 1_002), (1_004, 1_005)])
    assert busy == {"compute": [95, 90, 100], "orchestration": [20, 100]}
