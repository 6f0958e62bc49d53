"""Step 2, tokenize: GPT-2 ids for a text stream, lazily, with one EOS in front of each document.

Two backends give identical ids: Hugging Face's GPT2TokenizerFast (the default) and tiktoken's
GPT-2 encoding built from the same bundled files (4.5-10x faster, docs/benchmark.md).

The document rule decides where an EOS (50256) goes:
- "wikitext" (the Hub's WikiText and the bundled sample): an article opens at a top-level heading
  row " = Title = \\n"; sections (" = = Sub = = ") and paragraphs continue it; blank rows are layout.
- "rows" (users' files, in-memory data): every row is a document of its own.
"""

import functools
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .checks import check_choice, check_positive_int
from .config import (
    DATASET_CONFIG,
    EOS_TOKEN_ID,
    LAYOUTS,
    TEXT_COLUMN,
    TOKENIZE_BATCH_CHARS,
    TOKENIZE_BATCH_ROWS,
    TOKENIZE_CHARS,
    TOKENIZER_BACKENDS,
    TOKENIZER_DIR,
)

logger = logging.getLogger(__name__)


class TiktokenGPT2:
    """tiktoken's GPT-2 encoding built from the bundled files, called like a HF tokenizer.

    `tok(texts)["input_ids"]` -> list of id lists, identical to GPT2TokenizerFast's ids; a literal
    "<|endoftext|>" in text is ordinary text unless `split_special_tokens=False`. A list is encoded
    in `num_threads` contiguous chunks, one thread inside a DataLoader worker, where the workers are
    the parallelism. Measured on 2 cores: one future per chunk ran 3x faster than tiktoken's own
    encode_batch (one future per text) on the sample's short rows, 1.4x on whole chapters.
    """

    eos_token = "<|endoftext|>"
    eos_token_id = EOS_TOKEN_ID

    def __init__(self, folder: str | Path = TOKENIZER_DIR, num_threads: int | None = None) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        folder = Path(folder)
        ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "merges.txt"), str(folder / "vocab.json"))
        specials = {self.eos_token: EOS_TOKEN_ID}
        self.encoding = tiktoken.Encoding(
            name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens=specials
        )
        self.name_or_path = str(folder)
        self.vocab_size = self.encoding.n_vocab
        self.num_threads = num_threads or os.cpu_count() or 1
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid: int | None = None

    def _encode_chunk(self, texts: Sequence[str], allowed: str | set) -> list[list[int]]:
        if allowed:
            return [self.encoding.encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]
        return [self.encoding.encode_ordinary(t) for t in texts]

    def __call__(self, text: str | Sequence[str], split_special_tokens: bool = True, **_ignored: Any) -> dict:
        """Encode a string or a list of strings; returns {"input_ids": ids or list of ids}."""
        allowed = set() if split_special_tokens else "all"
        if isinstance(text, str):
            return {"input_ids": self._encode_chunk([text], allowed)[0]}
        texts = list(text)
        in_worker = torch.utils.data.get_worker_info() is not None
        threads = 1 if in_worker else min(self.num_threads, len(texts))
        if threads <= 1:
            return {"input_ids": self._encode_chunk(texts, allowed)}
        size = -(-len(texts) // threads)
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        encoded = self._pool().map(self._encode_chunk, chunks, itertools.repeat(allowed))
        return {"input_ids": [ids for chunk in encoded for ids in chunk]}

    def _pool(self) -> ThreadPoolExecutor:
        """One thread pool per process, made on first use (a pool per call cost ~0.3 ms)."""
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor, self._executor_pid = ThreadPoolExecutor(self.num_threads), os.getpid()
        return self._executor

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_executor": None, "_executor_pid": None}  # threads do not pickle

    def decode(self, ids: Sequence[int], **_ignored: Any) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"TiktokenGPT2(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(name_or_path: str | None = None, *, backend: str = "hf") -> Any:
    """The GPT-2 tokenizer. None: the bundled files (ids identical to the Hub's `gpt2`), offline.

    backend="hf" (default): transformers' GPT2TokenizerFast; any other `name_or_path` goes to
    AutoTokenizer.from_pretrained. backend="tiktoken": `TiktokenGPT2`, same ids, 4.5-10x faster.
    """
    check_choice("backend", backend, TOKENIZER_BACKENDS)
    if backend == "tiktoken":
        if name_or_path is not None:
            raise ValueError("backend='tiktoken' reads only the bundled GPT-2 files: leave name_or_path=None")
        return TiktokenGPT2()
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if name_or_path is None:
        # Not GPT2TokenizerFast(vocab_file=..., merges_file=...): in transformers 5.x that builds an
        # empty tokenizer. from_pretrained(folder) reads the two files correctly (4.x and 5.x).
        return GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    return AutoTokenizer.from_pretrained(name_or_path)


def tokenizer_identity(tokenizer: Any) -> str:
    """What a checkpoint records of the tokenizer: the bundled GPT-2 files (either backend: same
    ids) or its name, with the vocabulary size."""
    name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    if Path(name).resolve() == TOKENIZER_DIR.resolve():
        name = "gpt2 (bundled files)"
    size = getattr(tokenizer, "vocab_size", None)
    return f"{name}, vocab {size}"


def starts_document(text: str, layout: str = "wikitext") -> bool:
    """True if this row opens a new document (and so gets an EOS in front of it).

    "wikitext": an article opens at a top-level heading row " = Title = \\n" (not " = = Sub = = ").
    "rows": every row is a document.
    """
    if layout == "rows":
        return True
    return text.startswith(" = ") and not text.startswith(" = = ") and text.rstrip("\n").endswith(" = ")


def resolve_layout(stream: datasets.IterableDataset, layout: str = "auto") -> str:
    """Document rule: "wikitext" for the Hub's WikiText and the bundled sample, else "rows"."""
    check_choice("layout", layout, LAYOUTS)
    if layout != "auto":
        return layout
    return "wikitext" if stream.info.config_name == DATASET_CONFIG else "rows"


def check_encodable(texts: Sequence[str], indices: Sequence[int]) -> None:
    """UnicodeError naming the row if a text cannot be UTF-8 encoded (a lone surrogate): HF's
    tokenizer would fail with an unclear TypeError and tiktoken would silently write U+FFFD."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        for index, text in zip(indices, texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                bad = text[err.start : err.end].encode("unicode_escape").decode()
                raise ValueError(
                    f"row {index}, column {TEXT_COLUMN!r}: not valid Unicode text ({bad} at character "
                    f"{err.start}, a lone surrogate): fix the source text"
                ) from None


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> Iterator[list[int]]:
    """Yield the token ids of each text, tokenizing about TOKENIZE_CHARS characters per call, so
    the tokenizer's lists of Python ints (~32 bytes a token) never hold more than that at once."""
    start = 0
    while start < len(texts):
        end, chars = start + 1, len(texts[start])
        while end < len(texts) and chars + len(texts[end]) <= TOKENIZE_CHARS:
            chars += len(texts[end])
            end += 1
        chunk = texts[start:end]
        yield from tokenizer(chunk, add_special_tokens=False, split_special_tokens=True, verbose=False)[
            "input_ids"
        ]
        start = end


def _tokenize_batch(
    batch: dict,
    indices: list[int],
    *,
    tokenizer: Any,
    eos_token_id: int | None,
    layout: str,
    drop_blank: bool,
) -> dict:
    """Batched map function: {"text": [B strings]} -> {"input_ids": [<=B int32 arrays]}.

    WikiText's blank rows ("") are layout and dropped (`drop_blank`); any other row without text
    (None, or "" in the "rows" layout) stays as a 0-token row, so that the packer counts it.
    """
    if TEXT_COLUMN not in batch:
        raise ValueError(f"the stream has no {TEXT_COLUMN!r} column; its columns are {sorted(batch)}")
    rows, kept, keep_index = [], [], []
    for index, text in zip(indices, batch[TEXT_COLUMN]):
        if text is not None and not isinstance(text, str):
            kind = type(text).__name__
            raise TypeError(
                f"row {index}, column {TEXT_COLUMN!r}: expected a string or None, got {kind} {text!r:.60}"
            )
        if text == "" and layout == "wikitext" and drop_blank:
            continue
        rows.append(None if not text else len(kept))
        if text:
            kept.append(text)
            keep_index.append(index)
    check_encodable(kept, keep_index)
    encoded = list(encode_texts(tokenizer, kept))
    out = []
    for slot in rows:
        if slot is None:
            out.append(np.empty(0, dtype=np.int32))
            continue
        text, ids = kept[slot], encoded[slot]
        start = int(eos_token_id is not None and starts_document(text, layout))
        row = np.empty(start + len(ids), dtype=np.int32)  # 4 bytes a token, not a Python int's ~32
        row[start:] = ids
        if start:
            row[0] = eos_token_id
        out.append(row)
    return {"input_ids": out}


def tokenize_stream(
    stream: datasets.IterableDataset,
    tokenizer: Any,
    *,
    separate_documents: bool = True,
    layout: str = "auto",
    batch_rows: int = TOKENIZE_BATCH_ROWS,
) -> datasets.IterableDataset:
    """Step 2: lazily tokenize a text stream -> `datasets.IterableDataset` of {"input_ids": (n,) int32}.

    No padding, no truncation, one output row per input row (WikiText's blank rows dropped; rows
    without text are 0-token rows, counted and reported by the packer). Memory holds one batch of
    `batch_rows` rows (fewer for local files of long rows: about TOKENIZE_BATCH_CHARS characters)
    plus one tokenizer call's Python lists (<= TOKENIZE_CHARS characters).
    With `separate_documents`, EOS (50256) goes in front of every row that opens a document:
    `layout` "wikitext" (WikiText articles), "rows" (every row) or "auto" (wikitext for the Hub's
    WikiText and the bundled sample, rows for anything else). A literal "<|endoftext|>" in the text
    is encoded as ordinary text, never as the separator.
    """
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"tokenizer must be a callable tokenizer (see load_tokenizer()), got {tokenizer!r}")
    batch_rows = check_positive_int("batch_rows", batch_rows)
    row_chars = getattr(stream, "mean_row_chars", None)  # set by load_text_stream for local files
    if row_chars:  # long documents: fewer rows per batch, so memory holds ~TOKENIZE_BATCH_CHARS of text
        batch_rows = max(1, min(batch_rows, int(TOKENIZE_BATCH_CHARS // row_chars)))
    if isinstance(stream, datasets.Dataset):
        stream = stream.to_iterable_dataset()
    if not isinstance(stream, datasets.IterableDataset):
        raise TypeError(f"tokenize_stream needs a datasets.IterableDataset, got {type(stream).__name__}")
    layout = resolve_layout(stream, layout)
    columns = stream.column_names  # None when unknown (from_generator): the map names them instead
    if columns is not None and TEXT_COLUMN not in columns:
        raise ValueError(f"the stream has no {TEXT_COLUMN!r} column; its columns are {columns}")
    eos = tokenizer.eos_token_id if separate_documents else None
    settings = {
        "tokenizer": tokenizer_identity(tokenizer),
        "layout": layout,
        "separate_documents": separate_documents,
    }
    source, provenance = (
        stream,
        getattr(stream, "provenance", {"source": stream.info.description or "stream"}),
    )
    known = columns is not None  # unknown columns stay until after the map: no row may be dropped then
    fn = functools.partial(
        _tokenize_batch, tokenizer=tokenizer, eos_token_id=eos, layout=layout, drop_blank=known
    )
    if known:  # keep only `text`, so that dropping blank rows cannot misalign other columns
        stream = stream.select_columns([TEXT_COLUMN])
    remove = [TEXT_COLUMN] if known else None
    mapped = stream.map(fn, batched=True, batch_size=batch_rows, with_indices=True, remove_columns=remove)
    mapped = mapped if known else mapped.select_columns(["input_ids"])
    mapped.provenance = {**provenance, **settings}  # what a checkpoint must match
    mapped.piece_weights = getattr(source, "piece_weights", None)  # sizes of the pieces, if known
    return mapped
