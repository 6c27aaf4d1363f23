"""Hostile programs through the code rewards: each scores 0 (or None where unscorable), the host
is unharmed, and no process is left running. Real processes, real limits, no mocks."""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from r1core import code_rewards
from r1core.code_rewards import CodeRewardConfig, SandboxConfig, normalise_tests, run_tests
from r1core.sandbox import Sandbox

SECRET = f"s3cret-{uuid.uuid4().hex}"
LIMITS = {"workers": 2, "wall_s": 3.0, "cpu_s": 2, "memory_mb": 256, "processes": 16, "file_size_mb": 1,
          "open_files": 32, "output_bytes": 32768}
ADD_TESTS = [{"call": "add(1, 2)", "expected": 3}, {"call": "add(20, 22)", "expected": 42}]
ADD_ROW = {"task": "code", "answer": "", "tests": ADD_TESTS, "id": "add"}
ECHO_ROW = {"task": "code", "answer": "", "id": "sums",
            "tests": [{"stdin": "1 2\n20 22\n", "stdout": "3\n42\n"}]}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    # Secrets in the host's environment must not reach any program: one of our own and one in
    # a variable MLflow reads, set only for this module (a later test must not write to it)
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["R1_TEST_SECRET"] = SECRET
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/{SECRET}.db"
    code_rewards.configure(CodeRewardConfig(sandbox=LIMITS))
    box = code_rewards.sandbox()
    box.run("pass")  # start the workers
    yield box
    code_rewards.configure(None)
    os.environ.pop("R1_TEST_SECRET")
    if saved_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def code_tests_reward(program: str, row: dict = ADD_ROW) -> float | None:
    code_rewards._run_tests.cache_clear()
    answer = f" <think> t </think> <answer> {program} </answer>"
    return code_rewards.code_scores([answer.split("<answer>")[1].split("</answer>")[0]], [row])["code_tests"][0]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def assert_nothing_left(box: Sandbox) -> None:
    """Each worker process may have its namespaced server below it, and nothing else."""
    allowed = 1 if box.mode == "namespaced" else 0
    for worker in box._idle:
        left = _descendants(worker.proc.pid)
        assert len(left) <= allowed, f"processes left under worker {worker.proc.pid}: {left}"


def test_an_honest_program_passes(sandbox):
    assert code_tests_reward("def add(a, b):\n    return a + b") == 1.0
    assert code_tests_reward("def add(a, b):\n    return 3") == 0.5
    assert code_tests_reward("import sys\nfor line in sys.stdin:\n    a, b = map(int, line.split())\n"
                             "    print(a + b)", ECHO_ROW) == 1.0


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "sleep forever": "import time\ntime.sleep(10 ** 6)",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "fork and exit, leaving a child": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    for fd in (0, 1, 2, 3):\n        os.close(fd)\n"
        "    time.sleep(10 ** 6)\ndef add(a, b):\n    return a + b"),
    "10 GB allocation": "x = bytearray(10 * 1024 ** 3)\ndef add(a, b):\n    return a + b",
    "1 GB of output": "import sys\nfor _ in range(16384):\n    sys.stdout.write('x' * 65536)\n"
                      "def add(a, b):\n    return a + b",
    "closing stdout and the result channel": "import os\nfor fd in (1, 2, 3):\n    os.close(fd)\n"
                                             "def add(a, b):\n    return a + b",
    "reading stdin": "import sys\ndata = sys.stdin.read()\ndef add(a, b):\n    return len(data)",
    "__subclasses__ to subprocess": (
        "popen = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0]\n"
        "popen(['sh', '-c', 'sleep 1000 & kill -9 -1']).wait()\ndef add(a, b):\n    return 0"),
    "ctypes": ("import ctypes, os\nlibc = ctypes.CDLL(None)\nlibc.setuid(0)\nlibc.kill(1, 9)\nlibc.kill(os.getppid(), 9)\n"
               "def add(a, b):\n    return ctypes.c_int(a).value - b"),
    "sys.exit(0) before the tests": "import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)",
    "__eq__ always True": "class Anything:\n    def __eq__(self, other):\n        return True\n"
                          "def add(a, b):\n    return Anything()",
    "monkey-patching the harness": (
        "import builtins, json, os\nbuiltins.eval = lambda *a, **k: 3\njson.dumps = lambda *a, **k: '3'\n"
        "real = os.write\nos.write = lambda fd, data: real(fd, b'3\\n')\ndef add(a, b):\n    return None"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(sandbox, name):
    t0 = time.monotonic()
    reward = code_tests_reward(HOSTILE[name])
    assert reward in (0.0, None), f"{name}: reward {reward}"
    assert time.monotonic() - t0 < LIMITS["wall_s"] + 8
    assert_nothing_left(sandbox)
    assert code_tests_reward("def add(a, b):\n    return a + b") == 1.0  # the sandbox still works


def test_printing_only_the_first_expected_line_fails(sandbox):
    assert code_tests_reward("print(3)", ECHO_ROW) == 0.0


def test_limits_report_why(sandbox):
    assert sandbox.run("while True:\n    pass").status in ("killed", "timeout")
    assert sandbox.run("import time\ntime.sleep(100)").status == "timeout"
    assert sandbox.run("print('x' * 10 ** 6)").status == "output_limit"
    big = sandbox.run("x = bytearray(10 * 1024 ** 3)")
    assert big.status == "error" and "MemoryError" in big.stderr
    write = sandbox.run("open('big', 'wb').write(b'x' * (4 << 20))")
    assert write.status in ("killed", "error"), write
    assert sandbox.run("import sys\nprint(repr(sys.stdin.read()))").stdout.strip() == "''"


def test_no_secret_of_the_parent_is_visible(sandbox):
    probe = ("import os\nprint(dict(os.environ))\n"
             "for pid in ('1', 'self', str(os.getppid())):\n"
             "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
             "    except OSError as e:\n        print('denied', pid, e.errno)")
    result = sandbox.run(probe)
    assert result.status == "ok", result
    assert SECRET not in result.stdout + result.stderr
    assert "MLFLOW" not in result.stdout


def test_writes_outside_the_working_directory_do_not_reach_the_host(sandbox, tmp_path):
    home_canary = Path.home() / f".r1-sandbox-canary-{uuid.uuid4().hex}"
    home_canary.write_text("keep me")
    targets = [f"/tmp/r1-escape-{uuid.uuid4().hex}", str(tmp_path / "escape"), str(Path.home() / "r1-escape")]
    try:
        program = (f"import os, shutil\nfor path in {targets!r}:\n    try:\n        open(path, 'w').write('x')\n"
                   "    except OSError as e:\n        print('blocked', path, e.errno)\n"
                   f"for victim in ({str(home_canary)!r},):\n    try:\n        os.remove(victim)\n"
                   "    except OSError as e:\n        print('blocked', victim, e.errno)\n"
                   "shutil.rmtree(os.path.expanduser('~root'), ignore_errors=True)\n"
                   "open('inside', 'w').write('fine')\nprint(open('inside').read())")
        result = sandbox.run(program)
        assert result.status == "ok" and result.stdout.strip().endswith("fine"), result
        assert home_canary.read_text() == "keep me"
        for target in targets:
            if sandbox.mode == "namespaced" or not target.startswith("/tmp/"):
                assert not Path(target).exists(), target
    finally:
        home_canary.unlink()
        for target in targets:
            Path(target).unlink(missing_ok=True)


def test_no_network(sandbox):
    if sandbox.mode != "namespaced":  # no network isolation in the fallback: it must refuse when asked to
        with pytest.raises(RuntimeError, match="require_isolation"):
            Sandbox(SandboxConfig(**LIMITS, require_isolation=True))
        return
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(server)))
    thread.start()
    program = (f"import socket\nfor addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
               "    try:\n        socket.create_connection(addr, timeout=1).sendall(b'leak')\n        print('connected', addr)\n"
               "    except OSError as e:\n        print('blocked', addr, e.errno)")
    result = sandbox.run(program)
    thread.join()
    server.close()
    assert result.status == "ok" and "connected" not in result.stdout, result
    assert accepted == [None]


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


def test_unavailable_sandbox_is_none_and_counted():
    box = Sandbox(SandboxConfig(**LIMITS))
    box._take = lambda: None  # as when the worker cannot be started (e.g. no interpreter)
    result = box.run("print(1)")
    assert result.status == "unavailable" and box.counts["unavailable"] == 1
    code_rewards._run_tests.cache_clear()
    saved = code_rewards._Shared.pool
    code_rewards._Shared.pool = box
    try:
        scores = code_rewards.code_scores(["def add(a, b):\n    return a + b"], [ADD_ROW])
        assert scores["code_tests"] == [None] and scores["code_exec"] == [None]
        assert code_rewards.sandbox_counts()["unavailable"] == 2
    finally:
        code_rewards._Shared.pool = saved
        code_rewards._run_tests.cache_clear()


def test_test_forms_and_their_errors():
    assert normalise_tests(["assert add(1, 2) == 3"], "f.jsonl row 1") == [{"call": "add(1, 2)", "expected": 3}]
    check = normalise_tests(["assert add(1, 2) > 2", "assert True, 'always'"], "f.jsonl row 4")[0]
    assert check["asserts"] == 2 and check["counted"] == [0] and check["stubs"] == ["add"]
    with pytest.raises(ValueError, match="f.jsonl row 5: test 1: only 'assert ...' strings are tests"):
        normalise_tests(["print(add(1, 2))"], "f.jsonl row 5")
    with pytest.raises(ValueError, match="f.jsonl row 6: test 1: .* does not parse"):
        normalise_tests(["assert add(1, 2) =="], "f.jsonl row 6")
    with pytest.raises(ValueError, match="row 7: the test code has no assert that uses the solution"):
        normalise_tests(["assert True"], "row 7")
    with pytest.raises(ValueError, match="row 2: `tests` must be a non-empty list"):
        normalise_tests([], "row 2")


def test_python_expr_uses_exactly_the_given_numbers(sandbox):
    row = {"task": "python_expr", "answer": "5", "numbers": [3, 4, 2]}
    assert run_tests("3 + 4 - 2", row).all_passed
    assert not run_tests("5", row).all_passed  # right value, numbers not used
    assert not run_tests("3 + 4 + 2 - 4", row).all_passed  # an extra number
    assert run_tests("3 +", row).parses is False


def test_code_rows_from_a_local_file(sandbox, tmp_path):
    """MBPP / HumanEval-style rows: assert strings become calls at load time, a bad test names
    its row, and HumanEval's `candidate` is the row's entry point."""
    from r1core.problems import read_rows
    from r1core.rewards import verify
    from r1core.validation import read_checked

    rows = [{"prompt": "Write add(a, b).", "task": "code", "entry_point": "add",
             "tests": ["assert add(1, 2) == 3", "assert candidate(20, 22) == 42"]},
            {"prompt": "Write sub(a, b).", "task": "code", "tests": ["assert sub(1, 2) < 0"]},
            {"prompt": "Write mul(a, b).", "task": "code", "tests": ["mul(1, 2) == 2"]}]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    good, bad = read_checked(path)
    assert len(good) == 2 and good[0]["tests"][1] == {"call": "candidate(20, 22)", "expected": 42}
    assert bad[0]["line"] == 3 and "test 1: only 'assert ...' strings are tests" in bad[0]["reason"]
    with pytest.raises(ValueError, match=r"mbpp.jsonl: row 3: code row: test 1"):
        read_rows(path)
    assert verify("def sub(a, b):\n    return a - b", good[1]) is True
    assert verify("def sub(a, b):\n    return b - a", good[1]) is False
    row = good[0]
    assert verify("```python\ndef add(a, b):\n    return a + b\n```", row) is True
    assert verify("def add(a, b):\n    return a - b", row) is False
