"""Shared fixtures (the offline switches are in the top-level conftest.py)."""

import datasets
import numpy as np
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


def real_tokens_in_order(blocks_or_batches):
    """The tokens under attention_mask 1, in the order they were yielded (blocks or batches)."""
    return [
        int(t)
        for b in blocks_or_batches
        for t in np.asarray(b["input_ids"]).reshape(-1)[np.asarray(b["attention_mask"]).reshape(-1) == 1]
    ]


def real_tokens_sorted(blocks_or_batches):
    """The tokens under attention_mask 1, sorted: compare multisets across workers and ranks."""
    return sorted(real_tokens_in_order(blocks_or_batches))


def row_tokens_sorted(rows):
    """All tokens of a list of token rows, sorted."""
    return sorted(int(t) for row in rows for t in row)


def unique_token_stream(n_rows=60, num_shards=6, seed=0):
    """(stream, rows): a tokenized stream of `n_rows` rows of 0-40 ids each, in `num_shards` shards.

    Row r holds ids r*500, r*500+1, ...: every token is unique, so one seen twice or never is
    caught by comparing sorted lists, not by eye."""
    lengths = np.random.default_rng(seed).integers(0, 41, size=n_rows)
    rows = [list(range(r * 500, r * 500 + n)) for r, n in enumerate(lengths)]
    return datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=num_shards), rows


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

    files = sorted(C.SAMPLE_DIR.glob(C.SAMPLE_FILES.format(split="train")))
    return [row for f in files for row in pq.read_table(f)["text"].to_pylist()]
