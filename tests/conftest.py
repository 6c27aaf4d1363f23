import socket

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
