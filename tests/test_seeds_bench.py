"""bench/seeds.py's command-line answers, which the Makefile's `demo-seeds` and `ablation-lc`
pass on to `r1 run`: the ablation's override is a valid config change that weights the
language-consistency reward 0 and nothing else, and each seed's cold-start model is that seed's."""
from __future__ import annotations

import shlex
import subprocess
import sys

from r1core.config import PROJECT_ROOT, load_config

TINY = PROJECT_ROOT / "configs" / "tiny.yaml"


def seeds_bench(*args: str) -> str:
    done = subprocess.run([sys.executable, "bench/seeds.py", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.strip()


def test_the_ablation_override_weights_language_consistency_0_and_changes_nothing_else():
    flag, override = shlex.split(seeds_bench("--ablation-args"))
    assert flag == "--set"
    base, ablated = load_config(TINY), load_config(TINY, [override])
    assert base.reasoning_rl.rewards["language_consistency"] > 0
    assert ablated.reasoning_rl.rewards["language_consistency"] == 0
    assert ablated.model_dump(exclude={"reasoning_rl"}) == base.model_dump(exclude={"reasoning_rl"})
    assert ablated.run_dir() != base.run_dir()  # its own run folder: the seed's pipeline is not touched


def test_each_seeds_cold_start_model_is_in_that_seeds_run_folder():
    dirs = [seeds_bench("--cold-start-of", str(seed)) for seed in (0, 1)]
    for seed, d in enumerate(dirs):
        assert d == str(load_config(TINY, [f"runtime.seed={seed}"]).run_dir() / "cold_start_sft" / "model")
    assert dirs[0] != dirs[1]
