"""Step 3, packing: the rolling buffer that cuts token rows into fixed blocks. Pure numpy, no I/O.

Policy: rows are joined in order (documents already carry their EOS) and cut into blocks of exactly
`block_size` tokens; what is left after the last full block is carried into the next one, across
document boundaries, so every token lands in exactly one block. Only the end of a stream (or of one
rank's or worker's part of it) can hold fewer than `block_size` tokens: with `pad_last=True` it
becomes one padded block (mask 0, label -100 in collate_fn), otherwise it is dropped and reported
at WARNING (at most block_size - 1 tokens per part).
"""

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .checks import check_positive_int, is_int
from .config import BLOCK_SIZE, EOS_TOKEN_ID, FILL_BLOCKS, GPT2_VOCAB_SIZE, MAX_BLOCK_SIZE

logger = logging.getLogger(__name__)

Block = dict[str, np.ndarray]  # {"input_ids": (T,) int64, "attention_mask": (T,) int64}


def check_block_size(block_size: Any) -> int:
    """`block_size` as an int in 1..MAX_BLOCK_SIZE, else ValueError."""
    return check_positive_int("block_size", block_size, maximum=MAX_BLOCK_SIZE)


def check_token_id(name: str, value: Any, vocab_size: int) -> int:
    """`value` as an int in [0, vocab_size), else ValueError naming `name`."""
    if not is_int(value) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
    return int(value)


def token_ids(example: Any, index: int | None = None) -> Any:
    """The token ids of one stream row: a dict with `input_ids`, or a sequence of ints itself."""
    if isinstance(example, dict):
        if "input_ids" not in example:
            raise ValueError(f"row {index} has no 'input_ids' (keys: {sorted(example)})")
        return example["input_ids"]
    return example


def as_id_array(row: Any, index: int) -> np.ndarray:
    """One row of token ids as a (n,) integer array; ValueError naming the row if not integers."""
    ids = np.asarray(row).reshape(-1)
    if ids.size == 0:
        return ids.astype(np.int64)  # np.asarray([]) is float64
    if ids.dtype.kind not in "iu":
        raise ValueError(f"row {index}: token ids must be integers, got dtype {ids.dtype} ({ids[:3]} ...)")
    return ids


def check_id_range(rows: list[np.ndarray], first_index: int, vocab_size: int) -> None:
    """ValueError naming the first row whose ids are outside [0, vocab_size)."""
    for index, ids in enumerate(rows, first_index):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise ValueError(f"row {index}: token id {bad} is outside the vocabulary [0, {vocab_size})")


class RowBatch(list):
    """Token rows the packer reads together before it yields a block. A reader that takes rows
    from its source a batch at a time hands them over as one RowBatch, so that between two blocks
    the source's position is never inside rows the packer has not read (checkpoints stay exact)."""


class RollingBuffer:
    """The packer's state: tokens read from the stream but not yet emitted in a block.

    `pack(rows)` yields (block_size,) int64 views; between two yields `carry()` is exactly the
    tokens read and not yet emitted, which is what a checkpoint must keep. Rows are gathered until
    FILL_BLOCKS blocks' worth, joined in one numpy call and cut into views: per token the cost is one
    int conversion, never a Python-level copy of the buffer (no `buf = buf[256:]`).
    """

    def __init__(
        self,
        block_size: int = BLOCK_SIZE,
        carry: Iterable[int] = (),
        blocks: int = 0,
        tokens: int = 0,
        *,
        vocab_size: int = GPT2_VOCAB_SIZE,
    ) -> None:
        self.block_size = check_block_size(block_size)
        self.vocab_size = vocab_size
        self._buf = np.asarray(carry, dtype=np.int64).reshape(-1)  # emitted tokens are buf[:pos]
        self._pos = 0
        self._pending: list[np.ndarray] = []  # rows read but not yet joined into buf
        self._n_pending = 0
        self.blocks, self.tokens = blocks, tokens  # emitted so far: blocks, real (unpadded) tokens
        self.rows = self.empty_rows = 0  # rows read in this pass; rows without tokens among them
        self.first_empty_row: int | None = None
        self.dropped = 0  # tokens in a final partial block that was not padded

    def carry(self) -> np.ndarray:
        """Tokens read but not yet emitted, as a (n,) int64 array."""
        # unsafe cast: rows are integer arrays (checked in _read), their range is checked in _join
        return np.concatenate([self._buf[self._pos :], *self._pending], dtype=np.int64, casting="unsafe")

    def _read(self, row: Any) -> None:
        if isinstance(row, RowBatch):  # read whole before any block is cut: see RowBatch
            for one in row:
                self._read(one)
            return
        ids = as_id_array(token_ids(row, self.rows), self.rows)
        if ids.size == 0 and self.first_empty_row is None:
            self.first_empty_row = self.rows
        self.empty_rows += ids.size == 0
        self.rows += 1
        self._pending.append(ids)
        self._n_pending += ids.size

    def _join(self) -> None:
        joined = self.carry()
        if len(joined) and (joined.min() < 0 or joined.max() >= self.vocab_size):  # one check per join
            check_id_range(self._pending, self.rows - len(self._pending), self.vocab_size)
            raise ValueError(f"the carried tokens hold ids outside the vocabulary [0, {self.vocab_size})")
        self._buf, self._pos = joined, 0
        self._pending, self._n_pending = [], 0

    def _cut(self) -> Iterator[Block]:
        """Yield every full block left in buf."""
        size, ones = self.block_size, np.ones(self.block_size, dtype=np.int64)
        while len(self._buf) - self._pos >= size:
            self._pos += size
            self.blocks, self.tokens = self.blocks + 1, self.tokens + size
            yield {"input_ids": self._buf[self._pos - size : self._pos], "attention_mask": ones.copy()}

    def pack(
        self, rows: Iterable[Any], *, pad_last: bool = False, pad_token_id: int = EOS_TOKEN_ID
    ) -> Iterator[Block]:
        """Yield dicts of `input_ids` and `attention_mask`, each (block_size,) int64."""
        pad_token_id = check_token_id("pad_token_id", pad_token_id, self.vocab_size)
        fill = self.block_size * FILL_BLOCKS
        for row in rows:
            self._read(row)
            if self._n_pending >= fill:
                self._join()
                yield from self._cut()
        self._join()
        yield from self._cut()
        yield from self._finish(pad_last, pad_token_id)

    def _finish(self, pad_last: bool, pad_token_id: int) -> Iterator[Block]:
        """The end of the pass: pad or drop the tail, and report what had no tokens or was dropped."""
        tail, size = self.carry(), self.block_size
        self._buf, self._pos = tail[:0], 0
        if self.empty_rows:
            logger.warning(
                "%d of %d rows gave no tokens (no text: None or empty); the first is row %d of this part. "
                "Is the text under another key than 'text'?",
                self.empty_rows,
                self.rows,
                self.first_empty_row,
            )
        if len(tail) and pad_last:
            ids = np.full(size, pad_token_id, dtype=np.int64)
            ids[: len(tail)] = tail
            mask = (np.arange(size) < len(tail)).astype(np.int64)  # padding: mask 0, label -100 in collate_fn
            self.blocks, self.tokens = self.blocks + 1, self.tokens + len(tail)
            yield {"input_ids": ids, "attention_mask": mask}
        elif len(tail):
            self.dropped += len(tail)
            logger.warning(
                "dropped the final %d tokens of this part (< block_size=%d, %.2f %% of its %d tokens); "
                "pass pad_last=True to keep them",
                len(tail),
                size,
                100 * len(tail) / (self.tokens + len(tail)),
                self.tokens + len(tail),
            )


def group_texts_streaming(
    examples: Iterable[Any],
    block_size: int = BLOCK_SIZE,
    *,
    pad_last: bool = False,
    pad_token_id: int = EOS_TOKEN_ID,
    vocab_size: int = GPT2_VOCAB_SIZE,
) -> Iterator[Block]:
    """Step 3: the rolling buffer. Token rows in, fixed blocks out, every token exactly once.

    examples: iterable of dicts with `input_ids` (e.g. `tokenize_stream` output) or of id sequences
    (integers in [0, vocab_size)). Yields dicts of `input_ids` and `attention_mask`, each a
    (block_size,) int64 numpy array. Rows are joined across document boundaries; the final tail
    shorter than a block is padded with `pad_token_id` (mask 0) if `pad_last`, else dropped (at most
    block_size - 1 tokens, reported at WARNING).
    """
    return RollingBuffer(block_size, vocab_size=vocab_size).pack(
        examples, pad_last=pad_last, pad_token_id=pad_token_id
    )
