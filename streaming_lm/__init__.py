"""A streaming language-modelling data pipeline: text stream -> GPT-2 tokens -> fixed blocks -> batches.

One module per step (the lab imports them through `lab2_helpers`):

    source.py    1. stream text rows from the Hub or local files (the 5 s Hub probe, file fingerprints)
    tokenize.py  2. GPT-2 ids, lazily, one EOS per document (HF and tiktoken backends)
    packing.py   3. the rolling buffer: token rows -> blocks of exactly block_size, pure numpy
    parts.py        who reads what: pieces per rank and worker, the per-epoch piece order (pure)
    dataset.py   4. the torch IterableDataset: parts, epochs, shuffle windows, resumable state
    resume.py       checkpoint checks: settings, files, tokenizer, corrupt fields, num_workers
    loader.py    5. collate_fn and make_dataloader (a torchdata StatefulDataLoader: epochs, even_steps)
    measure.py      token-length statistics, their plot, throughput, shuffle quality
    training.py     the consumer: a small GPT-2, its optimizer, training steps, held-out loss
    baselines.py    the seed-style pipeline and the naive wrapper, to compare against
    config.py       constants with units;  checks.py  argument validators
"""
