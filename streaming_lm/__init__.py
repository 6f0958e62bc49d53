"""A streaming language-modelling data pipeline: text stream -> GPT-2 tokens -> fixed blocks -> batches.

One module per step (the lab imports them through `lab2_helpers`), and the modules behind them:

    source.py     1. stream text rows from the Hub or local files (hub.py, files.py; pieces.py reads one)
    tokenize.py   2. GPT-2 ids as flat arrays, lazily (encoders.py; documents.py: where an EOS goes)
    cache.py         the token cache: each piece tokenized once, verified, read memory-mapped after
    packing.py    3. the rolling buffer: token arrays -> blocks of exactly block_size, pure numpy
    dataset.py    4. the torch IterableDataset: parts, epochs, state_dict / load_state_dict
    collate.py    5. blocks -> input_ids, attention_mask, labels
    loader.py     5. make_dataloader: batches, workers (shipping.py), epochs, even_steps, checkpoint
    parts.py         who reads what: pieces per rank and worker, elastic re-plans (pure)
    reading.py       how one part reads one source: plan -> tokens -> blocks, shuffle windows
    token_rows.py    token batches; token sources of rows already tokenized
    mixing.py        weighted mixtures (a single stream is a mixture of one)
    state.py         the checkpoint: one typed value, its schema, version and checks (plain.py converts)
    measure.py       token-length statistics, their plot, throughput, shuffle quality, unigram baseline
    training.py      the consumer: a small GPT-2, its optimizer, training steps, held-out loss
    baselines.py     the seed-style pipeline and the naive wrapper, to compare against
    config.py        constants with units;  checks.py  argument validators
"""
