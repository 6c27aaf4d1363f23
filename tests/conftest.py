import socket
from pathlib import Path

import pytest

from r1core.config import DataConfig, PretrainConfig
from r1core.problems import (
    final_of,
    generate_split,
    long_cot,
    pretraining_corpus,
    readable_response,
    write_rows,
)
from r1core.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def rows():
    return generate_split(DataConfig(num_train=300, num_heldout=20))


@pytest.fixture(scope="session")
def tokenizer(rows):
    train, _ = rows
    return train_tokenizer(pretraining_corpus(train, PretrainConfig(corpus_docs=500), seed=0), vocab_size=400)


def write_model_dir(path: Path, model_cfg, tokenizer, seed: int) -> str:
    """A randomly initialised model of `model_cfg` and the tokenizer, as an HF directory."""
    from r1core.modeling import build_model

    build_model(model_cfg, tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _write_seed_examples(data_cfg, path, n: int = 8) -> list[dict]:
    """`n` candidate cold-start examples of our own for the config's train rows: all readable
    and right except the 7th (mixes languages) and the 8th (wrong answer)."""
    train, _ = generate_split(data_cfg)
    chains = [r for r in train if r["task"] == "chain_sum"]  # short enough for the micro SFT sequence
    examples = []
    for i, r in enumerate(chains[:n]):
        langs = [r["language"]] * len(r["steps"])
        if i == 6:
            langs[0] = "ru" if r["language"] == "en" else "en"
        examples.append({**r, "completion": readable_response(*long_cot(r, langs), "999" if i == 7 else final_of(r))})
    write_rows(examples, path)
    return examples


@pytest.fixture(scope="session")
def write_seed_examples():
    return _write_seed_examples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function giving a TCP port free on 127.0.0.1 right now."""
    return _free_port


@pytest.fixture(scope="module")
def prefect_harness():
    """Prefect's test harness (a temporary API and database) for the module's flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ----------------------------------------------------------------- no store outside temporary dirs
# What a run leaves where its workdir is: MLflow's database and artifacts, Ray's results, Prefect's
# database, the runs' outputs (any SQLite file at the top: a test's tracking URI names its own). Tests
# keep them in their tmp_path; the demo's `.r1/` is left alone.
STORE_GLOBS = ("*.db", "mlruns", "ray_results", "runs/*", "prefect/*.db", ".r1/mlflow.db", ".r1/mlruns",
               ".r1/ray_results/*", ".r1/runs/*", ".r1/prefect/*.db")


def store_snapshot(roots) -> dict[str, float]:
    """Store paths under `roots` -> their modification time."""
    found = {}
    for root in roots:
        for pattern in STORE_GLOBS:
            for path in Path(root).glob(pattern):
                found[str(path)] = path.stat().st_mtime
    return found


def changed_stores(before: dict[str, float], after: dict[str, float]) -> list[str]:
    return sorted(p for p, mtime in after.items() if before.get(p) != mtime)


def _store_roots():
    from r1core.config import PROJECT_ROOT

    return {PROJECT_ROOT, Path.cwd()}


def pytest_sessionstart(session):
    session.config.stash[_STORES] = store_snapshot(_store_roots())


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when the tests left a store (or wrote to one) outside their temporary dirs."""
    leaked = changed_stores(session.config.stash.get(_STORES, {}), store_snapshot(_store_roots()))
    if leaked:
        session.config.get_terminal_writer().line(
            f"FAILED: the tests wrote stores outside their temporary directories: {leaked}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_STORES = pytest.StashKey[dict]()
