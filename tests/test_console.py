"""`tasks.console`: what the terminal gets and what the run's log gets, in a real process whose
stdout and stderr are pipes (as under `make demo | tee`), quiet and with -v."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROGRAM = textwrap.dedent("""
    import logging, os, sys, warnings
    from pathlib import Path
    from tasks import console

    with console.attach(Path(sys.argv[1]), verbose=sys.argv[2] == "1", interval_s=3600) as log:
        print("library chatter on stdout")
        print("a traceback-looking line on stderr", file=sys.stderr)
        os.write(1, b"a C-level write\\n")
        warnings.warn("a library warning")
        logging.getLogger("some.lib").warning("a logged warning")
        for step in range(1, 6):
            console.progress("r1_zero", step, 5, f"step {step}/5", "reward 0.5")
        console.say("done r1_zero: pass@1 0.3")
    print("after: back on the terminal")
""")

NOISE = ["library chatter on stdout", "a traceback-looking line on stderr", "a C-level write",
         "a library warning", "a logged warning"]


@pytest.mark.parametrize("verbose", [False, True])
def test_the_terminal_gets_progress_and_summaries_the_log_gets_everything(tmp_path, verbose):
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path / "logs"), "1" if verbose else "0"],
                          check=False, cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    terminal = done.stdout + done.stderr
    (log,) = (tmp_path / "logs").glob("driver-*.log")
    logged = log.read_text()
    assert terminal.count(f"r1: logs of this run: {log}") == 2  # at the start and at the end
    assert "after: back on the terminal" in done.stdout and "after:" not in logged
    for line in NOISE:
        assert line in logged
        assert (line in terminal) == verbose, (line, terminal)
    assert "done r1_zero: pass@1 0.3" in logged and "done r1_zero: pass@1 0.3" in terminal
    if not verbose:  # not a terminal: the first step's line only (the summary line says it ended)
        shown = [line for line in done.stdout.splitlines() if "r1_zero" in line and "step" in line]
        assert [line.split()[1:3] for line in shown] == [["step", "1/5"]], done.stdout
        assert len(done.stdout.splitlines()) == 5, done.stdout  # two log paths, a step, the summary, after


def test_unattached_say_prints_and_progress_is_silent(capsys):
    from tasks import console

    console.progress("r1_zero", 1, 5, "step 1/5", "reward 0.5")
    console.say("a summary")
    assert capsys.readouterr().out == "a summary\n"
