"""A streaming language-modelling data pipeline: text stream -> GPT-2 tokens -> fixed blocks -> batches.

One module per step (the lab imports them through `lab2_helpers`):

    source.py    1. stream text rows from the Hub or local files (and the 5 s Hub probe)
    tokenize.py  2. GPT-2 ids, lazily, one EOS per document (HF and tiktoken backends)
    packing.py   3. the rolling buffer: token rows -> blocks of exactly block_size, pure numpy
    dataset.py   4. the torch IterableDataset: who reads what (ranks, workers), resumable state
    loader.py    5. collate_fn and make_dataloader (torchdata's StatefulDataLoader)
    measure.py   token-length statistics, their plot, throughput
    baselines.py the seed-style pipeline and the naive wrapper, to compare against
    config.py    constants with units;  checks.py  argument validators
"""
