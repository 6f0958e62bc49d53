"""Shared fixtures (the offline switches are in the top-level conftest.py)."""

import datasets
import pytest

import lab2_helpers as L
from streaming_lm import config as C

# Two tiny articles in the Hub's WikiText row layout, with a section and blank rows.
WIKI_ROWS = [
    "",
    " = Valkyria Chronicles = \n",
    "",
    " The game began development in 2010 . \n",
    " It met with positive sales in Japan . \n",
    "",
    " = = Gameplay = = \n",
    "",
    " As with previous games , battles are turn @-@ based . \n",
    "",
    " = Tower Building of the Little Rock Arsenal = \n",
    "",
    " The building was built in 1840 . \n",
]


def text_stream(rows, num_shards=1):
    """A streaming datasets.IterableDataset with a `text` column, split into `num_shards` shards."""
    return datasets.Dataset.from_dict({"text": rows}).to_iterable_dataset(num_shards=num_shards)


@pytest.fixture(scope="session")
def tokenizer():
    return L.load_tokenizer()


@pytest.fixture(scope="session")
def fast_tokenizer():
    return L.load_tokenizer(backend="tiktoken")


@pytest.fixture(scope="session")
def sample_rows():
    """All rows of the bundled sample, in order, read with pyarrow (independently of the helpers)."""
    import pyarrow.parquet as pq

    files = sorted(C.SAMPLE_DIR.glob(C.SAMPLE_FILES))
    return [row for f in files for row in pq.read_table(f)["text"].to_pylist()]
