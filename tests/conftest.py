import pytest

from r1core.config import DataConfig, PretrainConfig
from r1core.reasoning_tasks import generate_split, pretraining_corpus
from r1core.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def rows():
    return generate_split(DataConfig(num_train=300, num_heldout=20))


@pytest.fixture(scope="session")
def tokenizer(rows):
    train, _ = rows
    return train_tokenizer(pretraining_corpus(train, PretrainConfig(corpus_docs=500), seed=0), vocab_size=400)
