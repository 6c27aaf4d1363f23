"""Rejection sampling at scale: verify + filter + dedupe + write 600,000 candidates, through the
stage's Ray Data pipeline and through a plain single-process loop, side by side in one run.

    python bench/rejection_sampling.py [--candidates 600000] [--cpus 2]

The candidates are synthetic (no model needed): completions for the tiny profile's tasks with
lengths drawn from a long-tailed distribution, and a reject mix like real samples': wrong
answers, malformed and truncated outputs, mixed languages, long paragraphs, code blocks,
over-long responses, eval-set questions, exact and near duplicates. Both paths run the same
functions (`annotate_rows`, `judge_rows`, `select`, `kept_table`, `write_parts`) on the same parquet shards and
must keep the same rows. Prints rows/s for each, their ratio, wall times and peak memory (of
this process and all its children, Ray's included; see `PeakMemory`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from r1core.config import DataConfig, PipelineConfig, RuntimeConfig
from r1core.problems import PHRASES, final_of, generate_split, long_cot, readable_response
from r1core.rejection_sampling import annotate_rows, reason_counts, select
from tasks.ray_jobs import ensure_ray
from tasks.rejection_sampling import SAMPLE_SCHEMA, annotate_with_ray, judge_rows, kept_table, write_parts

SHARDS = 24


class PeakMemory:
    """Peak memory of this process tree while the block runs: the private resident memory of
    every process (RSS - shared) plus the largest shared set, once (Ray's object store and the
    libraries are mapped by many processes; summing RSS would count them in each). Read from
    /proc/PID/statm every 0.5 s: cheap enough not to slow what it measures."""

    def __init__(self):
        self.peak = self.overall = 0
        self._stop = threading.Event()

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_full_info().pss
            self.peak, self.overall = max(self.peak, total), max(self.overall, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def candidate(row: dict, heldout: list[dict], rng: random.Random, index: int, previous: list[str]) -> dict:
    """One synthetic candidate for `row`, of a kind drawn from the reject mix."""
    lang = row["language"]
    other = "ru" if lang == "en" else "en"
    reasoning, summary = long_cot(row)
    # long-tailed length: extra reflection sentences (the paper's "aha" re-checks)
    sentences = [PHRASES[lang]["step"].format(a=a, op=PHRASES[lang]["ops"]["+"], b=b, c=a + b)
                 for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(min(60, int(rng.lognormvariate(1.2, 1.0)))))]
    reflection = "\n\n".join(" ".join(sentences[i : i + 8]) for i in range(0, len(sentences), 8))
    text = readable_response(f"{reasoning} {reflection}", summary, final_of(row))
    finish = "stop"
    u = rng.random()
    if u < 0.15:  # wrong answer
        text = readable_response(f"{reasoning} {reflection}", summary, str(int(row["answer"]) + 1))
    elif u < 0.23:  # mixed language
        text = readable_response(*long_cot(row, [other] + [lang] * (len(row["steps"]) - 1)), final_of(row))
    elif u < 0.31:  # malformed: no summary, or a tag missing
        text = text.replace("<summary>", "").replace("</summary>", "") if rng.random() < 0.5 else text[:-10]
    elif u < 0.36:  # truncated
        text, finish = text[: len(text) // 2], "length"
    elif u < 0.39:  # one long paragraph
        text = text.replace("<think>", "<think> " + " ".join([reasoning] * 12))
    elif u < 0.41:  # a code block
        text = text.replace("<think>", "<think>\n```python\nprint(1 + 1)\n```\n")
    elif u < 0.45:  # over-long, in short paragraphs
        text = text.replace("<think>", "<think>" + f"\n\n{reasoning}" * 30)
    elif u < 0.46:  # an eval question
        row = heldout[index % len(heldout)]
        text = readable_response(*long_cot(row), final_of(row))
    elif u < 0.56 and previous:  # an exact duplicate (spacing differs)
        text = previous[index % len(previous)].replace(" ", "  ")
    elif u < 0.62 and previous:  # a near duplicate: one word added
        text = previous[index % len(previous)].replace("</summary>", "indeed </summary>")
    return {"sample_id": f"{row['id']}-{index:03d}", "id": row["id"], "sample": index, "task": row["task"], "language": row["language"],
            "problem": row["problem"], "question": row["question"], "prompt": row["prompt"], "answer": row["answer"],
            "numbers": row["numbers"], "completion": text, "finish_reason": finish}


def build(n: int, out: Path, seed: int = 0) -> tuple[list[str], list[dict]]:
    """`n` candidates in SHARDS parquet files; returns (files, held-out rows)."""
    train, heldout = generate_split(DataConfig(num_train=3000, num_heldout=200))
    rng = random.Random(seed)
    files, previous = [], []
    per_shard = -(-n // SHARDS)
    for s in range(SHARDS):
        rows = []
        for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
            c = candidate(train[i % len(train)], heldout, rng, i, previous)
            rows.append(c)
            if len(previous) < 5000 and rng.random() < 0.05:
                previous.append(c["completion"])
        files.append(str(out / f"shard-{s:05d}.parquet"))
        pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), files[-1])
    return files, heldout


def finish(cfg: PipelineConfig, rows: list[dict], files: list[str], out: Path) -> list[dict]:
    """What both paths share after the per-row work: judge (none needed here), select, write."""
    rs = cfg.rejection_sampling
    judge_rows(cfg, rows, files, None)
    final = select(rows, rs.per_problem, {True: rs.reasoning_examples, False: rs.non_reasoning_examples},
                   rs.near_duplicate_threshold)
    out.mkdir(parents=True, exist_ok=True)
    write_parts(kept_table(final, files), out, rs.rows_per_output_shard)
    return final


def single_process(cfg: PipelineConfig, files: list[str], eval_texts: list[str], out: Path) -> list[dict]:
    rows = [r for f in files
            for r in annotate_rows(pq.read_table(f).to_pylist(), cfg.rejection_sampling, tuple(eval_texts))]
    return finish(cfg, rows, files, out)


def with_ray_data(cfg: PipelineConfig, files: list[str], eval_texts: list[str], out: Path) -> list[dict]:
    rows = annotate_with_ray(files, cfg.rejection_sampling, eval_texts)
    return finish(cfg, rows, files, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=600_000)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # quotas above the candidate count: every row that passes is kept (the paper's ~600k + ~200k)
    cfg = PipelineConfig(rejection_sampling={"reasoning_examples": args.candidates, "non_reasoning_examples": 0,
                                             "per_problem": args.candidates, "max_words": 200,
                                             "judge": {"audit_rows": 0}},  # no judge model here
                         runtime=RuntimeConfig(num_cpus=args.cpus))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_dir, PeakMemory() as mem:
        tmp = Path(tmp_dir)
        t0 = time.perf_counter()
        files, heldout = build(args.candidates, tmp)
        t_build = time.perf_counter() - t0
        eval_texts = [r["question"] for r in heldout]
        results, times, peaks = {}, {}, {}
        for name, run in (("single-process loop", single_process), ("Ray Data pipeline", with_ray_data)):
            if name.startswith("Ray"):
                ensure_ray(cfg.runtime)  # start-up counted: it is part of what a run pays
            mem.peak = 0
            t0 = time.perf_counter()
            results[name] = run(cfg, files, eval_texts, tmp / name.split()[0])
            times[name], peaks[name] = time.perf_counter() - t0, mem.peak
        ray.shutdown()
    total = time.perf_counter() - t_start
    loop, data = results["single-process loop"], results["Ray Data pipeline"]
    assert [(r["sample_id"], r["reason"]) for r in loop] == [(r["sample_id"], r["reason"]) for r in data], \
        "the two paths disagree"
    counts = reason_counts(data)
    print(f"\n{args.candidates:,} candidates on {args.cpus} CPUs (built in {t_build:.1f} s)\n")
    print("| path | wall (s) | rows/s | peak memory (GiB) |\n|---|---|---|---|")
    for name in results:
        print(f"| {name} | {times[name]:.1f} | {args.candidates / times[name]:,.0f} | {peaks[name] / 2**30:.2f} |")
    ratio = times["single-process loop"] / times["Ray Data pipeline"]
    print(f"\nRay Data / single-process throughput ratio: {ratio:.2f}x   total wall time: {total:.1f} s   "
          f"peak memory of the whole run: {mem.overall / 2**30:.2f} GiB")
    print("\n| outcome | rows |\n|---|---|")
    for k, v in counts.items():
        print(f"| {k} | {v:,} |")


if __name__ == "__main__":
    main()
