"""A streaming language-modelling data pipeline: text stream -> GPT-2 tokens -> fixed blocks -> batches.

One module per step (the lab imports them through `lab2_helpers`):

    source.py    1. stream text rows from the Hub or local files; read a piece as Arrow text batches
    tokenize.py  2. GPT-2 ids as flat arrays, lazily, one EOS per document (HF and tiktoken backends)
    packing.py   3. the rolling buffer: token arrays -> blocks of exactly block_size, pure numpy
    parts.py        who reads what: pieces per rank and worker, positions, elastic re-plans (pure)
    reading.py      how one part reads: its plan -> token batches -> blocks, shuffle windows, its state
    dataset.py   4. the torch IterableDataset: parts, epochs, state_dict / load_state_dict (verified)
    state.py        the checkpoint's schema and version: one envelope, digests, refusals
    loader.py    5. collate_fn and make_dataloader (batches shipped several at a time, epochs, even_steps)
    mixing.py       weighted mixtures of several sources
    measure.py      token-length statistics, their plot, throughput, shuffle quality, unigram baseline
    training.py     the consumer: a small GPT-2, its optimizer, training steps, held-out loss
    baselines.py    the seed-style pipeline and the naive wrapper, to compare against
    config.py       constants with units;  checks.py  argument validators
"""
