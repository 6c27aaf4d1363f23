"""Every user mistake of issue 20, table-driven through the CLI: exit 2, one line on stderr naming
the culprit (file, row or field), no traceback, nothing started and nothing written under the
workdir's `runs/`. Most rows run `flows.cli.main` in this process (the same code path as the
`r1` script, without ~5 s of imports per row); the last test runs the real script."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_model_dir
from test_training import MICRO

from flows.cli import main
from r1core.config import PROJECT_ROOT

ROWS = [{"prompt": f"What is {i} + 1? Answer:", "answer": str(i + 1), "task": "chain_sum"} for i in range(200)]


def _jsonl(path: Path, rows: list, extra: list[bytes] = ()) -> str:
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows) + b"".join(extra))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("inputs")
    (d / "bad.yaml").write_text("r1_zero:\n  steps: 3\n bad: [1,\n")
    (d / "latin1.yaml").write_bytes("profile: caf\xe9\n".encode("latin-1"))
    (d / "list.yaml").write_text("- 1\n- 2\n")
    f = {"dir": d, "heldout": _jsonl(d / "heldout.jsonl", ROWS[:20]),
         "empty": _jsonl(d / "empty.jsonl", []),
         "notjson": _jsonl(d / "notjson.jsonl", [], [b"this is not json\n", b"{'single': 'quotes'}\n"]),
         "halfbad": _jsonl(d / "halfbad.jsonl", ROWS[20:30], [b"[1, 2, 3]\n"] * 5 + [b"{\"prompt\": 7}\n"] * 5),
         "within": _jsonl(d / "within.jsonl", ROWS[20:], [b"{broken\n"]),
         "huge": _jsonl(d / "huge.jsonl", [{**ROWS[21], "prompt": "x" * (10 << 20)}]),
         "binary": _jsonl(d / "binary.jsonl", [], [b"\xff\xfe\x00\x81garbage\x00\n", b"\xc3\x28\n"]),
         "cyrillic_bad": _jsonl(d / "cyr.jsonl", [{"prompt": "Сколько будет 2+2?", "answer": ["4"], "task": "chain_sum"}])}
    good = Path(write_model_dir(d / "model", MICRO, tokenizer, seed=0))
    (d / "empty_model").mkdir()
    truncated = d / "truncated_model"
    shutil.copytree(good, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    f.update(good_model=str(good), empty_model=str(d / "empty_model"), truncated_model=str(truncated))
    return f


def _cases():
    # (id, argv given {workdir, files}, what stderr must name)
    run = ["run", "pipeline"]
    return [
        ("yaml-syntax", lambda f: [*run, "--config", f"{f['dir']}/bad.yaml"], ["bad.yaml", "line 3"]),
        ("yaml-not-utf8", lambda f: [*run, "--config", f"{f['dir']}/latin1.yaml"], ["latin1.yaml", "UTF-8"]),
        ("yaml-not-a-mapping", lambda f: [*run, "--config", f"{f['dir']}/list.yaml"], ["list.yaml", "mapping"]),
        ("config-missing", lambda f: [*run, "--config", f"{f['dir']}/nope.yaml"], ["nope.yaml"]),
        ("unknown-field", lambda f: [*run, "--set", "pretrain.stepz=3"], ["pretrain.stepz"]),
        ("unknown-section", lambda f: [*run, "--set", "pretrian.steps=3"], ["pretrian"]),
        ("mistyped-field", lambda f: [*run, "--set", "r1_zero.steps=many"], ["r1_zero.steps"]),
        ("negative-field", lambda f: [*run, "--set", "r1_zero.lr=-1"], ["r1_zero.lr"]),
        ("override-not-yaml", lambda f: [*run, "--set", "r1_zero.steps=[1,"], ["r1_zero.steps"]),
        ("override-no-equals", lambda f: [*run, "--set", "r1_zero.steps"], ["r1_zero.steps"]),
        ("data-file-missing", lambda f: [*run, "--set", f"data.train_file={f['dir']}/none.jsonl",
                                         "--set", f"data.heldout_file={f['heldout']}"], ["none.jsonl"]),
        ("data-empty", lambda f: _data(f, "empty"), ["data.train_file", "empty.jsonl", "no usable rows"]),
        ("data-not-json", lambda f: _data(f, "notjson"), ["data.train_file", "notjson.jsonl", "invalid JSON"]),
        ("data-half-bad", lambda f: _data(f, "halfbad"), ["data.train_file", "halfbad.jsonl", "error budget"]),
        ("data-10MB-prompt", lambda f: _data(f, "huge"), ["data.train_file", "huge.jsonl", "longer than"]),
        ("data-not-utf8", lambda f: _data(f, "binary"), ["data.train_file", "binary.jsonl", "UTF-8"]),
        ("data-row-type", lambda f: _data(f, "cyrillic_bad"), ["cyr.jsonl", "field 'answer' is list"]),
        ("heldout-bad", lambda f: [*run, "--set", f"data.train_file={f['within']}",
                                   "--set", f"data.heldout_file={f['halfbad']}"], ["data.heldout_file", "halfbad.jsonl"]),
        ("prompts-file-bad", lambda f: [*run, "--set", f"rejection_sampling.prompts_file={f['notjson']}"],
         ["rejection_sampling.prompts_file", "notjson.jsonl"]),
        ("base-model-empty", lambda f: [*run, "--set", "pretrain.enabled=false",
                                        "--set", f"model.pretrained_path={f['empty_model']}"],
         ["model.pretrained_path", "empty_model", "config.json"]),
        ("base-model-truncated", lambda f: [*run, "--set", "pretrain.enabled=false",
                                            "--set", f"model.pretrained_path={f['truncated_model']}"],
         ["model.pretrained_path", "model.safetensors", "truncated"]),
        ("init-model-empty", lambda f: ["run", "stage", "reasoning_rl", "--init-model", f["empty_model"]],
         ["--init-model", "empty_model"]),
        ("init-model-truncated", lambda f: ["run", "stage", "reasoning_rl", "--init-model", f["truncated_model"]],
         ["--init-model", "model.safetensors"]),
        ("init-model-missing", lambda f: ["run", "stage", "reasoning_rl", "--init-model", "/nonexistent/model"],
         ["--init-model", "/nonexistent/model"]),
        ("init-model-unregistered", lambda f: ["run", "stage", "reasoning_rl", "--init-model",
                                               "models:/does-not-exist@champion"],
         ["--init-model", "models:/does-not-exist@champion"]),
        ("init-model-not-for-stage", lambda f: ["run", "stage", "pretrain_base", "--init-model", f["good_model"]],
         ["--init-model", "pretrain_base"]),
        ("eval-unregistered", lambda f: ["eval", "--model", "models:/does-not-exist@champion", "--data", f["heldout"]],
         ["--model", "models:/does-not-exist@champion"]),
        ("eval-model-missing", lambda f: ["eval", "--model", "/nonexistent", "--data", f["heldout"]],
         ["--model", "/nonexistent"]),
        ("eval-model-truncated", lambda f: ["eval", "--model", f["truncated_model"], "--data", f["heldout"]],
         ["--model", "model.safetensors"]),
        ("eval-data-bad", lambda f: ["eval", "--model", f["good_model"], "--data", f["halfbad"]],
         ["--data", "halfbad.jsonl"]),
        ("eval-data-missing", lambda f: ["eval", "--model", f["good_model"], "--data", "/nonexistent.jsonl"],
         ["--data", "/nonexistent.jsonl"]),
        ("eval-base-url-without-name", lambda f: ["eval", "--model", f["good_model"], "--data", f["heldout"],
                                                  "--base-url", "http://127.0.0.1:9"], ["--served-model"]),
    ]


def _data(f, name):
    return ["run", "pipeline", "--set", f"data.train_file={f[name]}", "--set", f"data.heldout_file={f['heldout']}"]


@pytest.mark.parametrize("case, argv, names", _cases(), ids=[c[0] for c in _cases()])
def test_a_bad_input_exits_2_with_one_line_naming_it(files, tmp_path, capsys, monkeypatch, case, argv, names):
    workdir = tmp_path / "work"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = argv(files)
    at = args.index("--set") if "--set" in args else len(args)
    args = [*args[:at], "--set", f"runtime.workdir={workdir}", *args[at:]]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r1: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert not (workdir / "runs").exists() and not (workdir / "ray_results").exists()  # nothing started or written


def test_rows_within_the_error_budget_pass_and_doctor_counts_them(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    code = main(["doctor", "--set", f"runtime.workdir={tmp_path}", "--set", f"data.train_file={files['within']}",
                 "--set", f"data.heldout_file={files['heldout']}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "data.train_file" in out and "180 rows, 1 malformed" in out and "data.heldout_file" in out


def test_the_script_itself_exits_2_without_a_traceback_and_shows_it_with_v(files, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    r1 = [sys.executable, "-m", "flows.cli"]
    quiet = subprocess.run([*r1, "run", "pipeline", "--set", f"runtime.workdir={tmp_path}",
                            "--set", f"data.train_file={files['huge']}", "--set", f"data.heldout_file={files['heldout']}"],
                           check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr + quiet.stdout
    assert quiet.stderr.strip().count("\n") == 0 and "huge.jsonl" in quiet.stderr
    loud = subprocess.run([*r1, "run", "pipeline", "-v", "--config", f"{files['dir']}/bad.yaml"],
                          check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "bad.yaml" in loud.stderr


def test_a_model_missing_from_an_existing_store_is_named(files, tmp_path, capsys, monkeypatch):
    from r1core.config import RuntimeConfig
    from tasks.tracking import experiment_id

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment_id(RuntimeConfig(workdir=str(tmp_path)))  # the store exists, the model does not
    capsys.readouterr()
    for argv in (["eval", "--model", "models:/r1@champion", "--data", files["heldout"]],
                 ["run", "stage", "sft", "--init-model", "models:/r1-sft/7"]):
        assert main([*argv, "--set", f"runtime.workdir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "not in the MLflow store" in err and argv[-1 if argv[0] == "run" else 2] in err


def test_r1_eval_compares_models_prompt_by_prompt_and_a_model_against_itself_differs_by_zero(files, tmp_path, capsys,
                                                                                          tokenizer):
    other = write_model_dir(tmp_path / "other", MICRO, tokenizer, seed=1)
    common = ["--data", files["heldout"], "--k", "2", "--set", f"runtime.workdir={tmp_path}",
              "--set", "eval.num_prompts=4", "--set", "eval.sampling.max_new_tokens=4"]
    good = files["good_model"]
    assert main(["eval", "--model", good, "--model", good, "--model", other, *common]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["models"]) == {good, other}
    differences = out[f"minus {good}"]
    assert set(differences) == {good, other}  # the repeated model is a comparison of its own
    for name in ("pass@1", "readability"):
        same = differences[good][name]
        assert same["difference"] == same["low"] == same["high"] == 0  # same prompts, same samples' seeds
        assert differences[other][name]["low"] <= differences[other][name]["difference"] <= differences[other][name]["high"]


def _raised(make):
    try:
        make()
    except Exception as e:  # noqa: BLE001 - the chain as Python builds it is what is under test
        return e
    raise AssertionError("nothing raised")


def _wrapped(inner: BaseException, outer: type[Exception], text: str):
    def make():
        try:
            raise inner
        except BaseException as e:
            raise outer(text) from e
    return make


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),  # the OS, raised directly
    _wrapped(OSError(28, "No space left on device"), RuntimeError, "Training worker failed"),  # Ray's wrapper
    _wrapped(OSError(122, "Disk quota exceeded"), ValueError, "write failed"),  # a quota, by errno
    _wrapped(RuntimeError("(sqlite3.OperationalError) database or disk is full"), RuntimeError,
             "(raised as a result of Query-invoked autoflush; consider ...)"),  # MLflow's store over SQLite
    _wrapped(RuntimeError("Aucun espace: No Space Left On Device"), OSError, "io"),  # any case
    _wrapped(_raised(_wrapped(OSError(28, "x"), KeyError, "k")), RuntimeError, "two wrappers deep"),
], ids=["oserror", "under-ray", "quota-errno", "sqlite-in-mlflow", "mixed-case", "two-deep"])
def test_a_full_disk_is_named_wherever_in_the_chain_it_surfaced(error):
    from flows.cli import failure_line

    e = error if isinstance(error, BaseException) else _raised(error)
    line = failure_line(e)
    assert line.startswith("No space left on device") and "\n" not in line, line


def test_other_failures_keep_their_type_and_first_line_and_a_cyclic_chain_ends():
    from flows.cli import failure_line

    e = RuntimeError("the worker died\nline two")
    assert failure_line(e) == "RuntimeError: the worker died"
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a  # a cycle: must not loop
    assert failure_line(a) == "ValueError: a"
    assert failure_line(OSError(2, "No such file or directory")).startswith("FileNotFoundError")
