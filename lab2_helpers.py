"""The lab's one import: the public API of the streaming LM pipeline, step by step.

    import lab2_helpers as L

    stream = L.load_text_stream("auto")                     # 1. streaming_lm/source.py
    tokens = L.tokenize_stream(stream, L.load_tokenizer())   # 2. streaming_lm/tokenize.py
    blocks = L.group_texts_streaming(tokens)                 # 3. streaming_lm/packing.py
    dataset = L.StreamingLMIterableDataset(tokens)           # 4. streaming_lm/dataset.py
    loader = L.make_dataloader(dataset)                      # 5. streaming_lm/loader.py, collate.py
    stats = L.sample_stats(tokens)                           #    streaming_lm/measure.py
    model = L.make_model()                                   #    streaming_lm/training.py

The logic lives in the `streaming_lm` package, one module per step; this file only re-exports it.
Who reads what (ranks, workers, shuffled pieces, elastic re-plans) is streaming_lm/parts.py; how a
part reads is streaming_lm/reading.py; the checkpoint's schema is streaming_lm/state.py; mixtures
of several sources are streaming_lm/mixing.py; baselines for comparison (the seed-style pipeline,
the naive wrapper) are streaming_lm/baselines.py.
"""

from streaming_lm.baselines import NaiveDataset, seed_style_loader
from streaming_lm.cache import cache_size
from streaming_lm.collate import collate_fn
from streaming_lm.config import BATCH_SIZE, BLOCK_SIZE, DATASET_CONFIG, DATASET_NAME, EOS_TOKEN_ID
from streaming_lm.dataset import StreamingLMIterableDataset, progress_by_part
from streaming_lm.documents import starts_document
from streaming_lm.encoders import load_tokenizer
from streaming_lm.loader import make_dataloader
from streaming_lm.measure import (
    measure_throughput,
    plot_token_lengths,
    sample_stats,
    shuffle_quality,
    token_counts,
    unigram_cross_entropy,
)
from streaming_lm.mixing import mix_streams
from streaming_lm.packing import group_texts_streaming
from streaming_lm.source import load_text_stream
from streaming_lm.state import gather_states
from streaming_lm.tokenize import tokenize_stream
from streaming_lm.training import TINY, WARMUP_STEPS, evaluate, make_model, make_optimizer, train_steps

__all__ = [
    "BATCH_SIZE",
    "BLOCK_SIZE",
    "DATASET_CONFIG",
    "DATASET_NAME",
    "EOS_TOKEN_ID",
    "NaiveDataset",
    "StreamingLMIterableDataset",
    "TINY",
    "WARMUP_STEPS",
    "cache_size",
    "collate_fn",
    "evaluate",
    "gather_states",
    "group_texts_streaming",
    "load_text_stream",
    "load_tokenizer",
    "make_dataloader",
    "make_model",
    "make_optimizer",
    "measure_throughput",
    "mix_streams",
    "plot_token_lengths",
    "progress_by_part",
    "sample_stats",
    "seed_style_loader",
    "shuffle_quality",
    "starts_document",
    "token_counts",
    "tokenize_stream",
    "train_steps",
    "unigram_cross_entropy",
]
