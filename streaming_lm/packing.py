"""Step 3, packing: the rolling buffer that cuts token rows into fixed blocks. Pure numpy, no I/O.

Policy: rows are joined in order (documents already carry their EOS) and cut into blocks of exactly
`block_size` tokens; what is left after the last full block is carried into the next one, across
document boundaries, so every token lands in exactly one block. Only the end of a stream (or of one
rank's or worker's part of it) can hold fewer than `block_size` tokens: with `pad_last=True` it
becomes one padded block (mask 0, label -100 in collate_fn), otherwise it is dropped and reported
at WARNING (at most block_size - 1 tokens per part).

The buffer works on flat arrays: `push(ids)` appends a batch of tokens and returns every block now
complete as one (k, block_size) view, cut by slicing; per token the cost is one copy into the buffer.
"""

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .checks import check_positive_int, is_int
from .config import BLOCK_SIZE, EOS_TOKEN_ID, GPT2_VOCAB_SIZE, MAX_BLOCK_SIZE

logger = logging.getLogger(__name__)

Block = dict[str, np.ndarray]  # {"input_ids": (T,) int64, "attention_mask": (T,) int64}
GATHER_BLOCKS = 8  # group_texts_streaming joins rows once per 8 blocks' worth of tokens


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


def out_of_vocabulary(ids: np.ndarray, vocab_size: int) -> bool:
    """True if any id is outside [0, vocab_size) (two passes over the array, no copy)."""
    return bool(len(ids)) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size)


class RollingBuffer:
    """The packer's state: tokens read from the stream but not yet emitted in a block.

    `push(ids)` appends tokens and returns the blocks now complete, a (k, block_size) int64 view;
    `pushed` and `emitted` count tokens in and tokens out (in full blocks), so the carried tokens
    are always pushed - emitted. `finish()` ends the part: its tail padded or dropped.
    """

    def __init__(self, block_size: int = BLOCK_SIZE, *, vocab_size: int = GPT2_VOCAB_SIZE) -> None:
        self.block_size = check_block_size(block_size)
        self.vocab_size = vocab_size
        self._buf = np.empty(0, np.int64)  # the carry is buf[pos:]
        self._pos = 0
        self.pushed = 0  # tokens pushed so far
        self.emitted = 0  # tokens emitted in full blocks so far
        self.dropped = 0  # tokens of a final partial block that was not padded

    def carry(self) -> np.ndarray:
        """Tokens pushed but not yet emitted, as a (n,) int64 view."""
        return self._buf[self._pos :]

    def push(self, ids: np.ndarray) -> np.ndarray:
        """Append `ids` ((n,) integers in [0, vocab_size)); return the complete blocks, (k, T) int64."""
        if out_of_vocabulary(ids, self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        buf = np.concatenate([self._buf[self._pos :], ids], dtype=np.int64, casting="unsafe")
        size = self.block_size
        whole = len(buf) // size * size
        self._buf, self._pos = buf, whole
        self.pushed += len(ids)
        self.emitted += whole
        return buf[:whole].reshape(-1, size)  # (k, T): views, no copy

    def finish(self, pad_last: bool, pad_token_id: int = EOS_TOKEN_ID) -> Block | None:
        """End of the part: the tail as one padded block (`pad_last`), else dropped and counted."""
        tail = self.carry()
        self._buf, self._pos = self._buf[:0], 0
        if not len(tail):
            return None
        if not pad_last:
            self.dropped += len(tail)
            return None
        ids = np.full(self.block_size, pad_token_id, dtype=np.int64)
        ids[: len(tail)] = tail
        mask = (np.arange(self.block_size) < len(tail)).astype(np.int64)  # padding: mask 0, label -100
        self.emitted += len(tail)
        return {"input_ids": ids, "attention_mask": mask}


def as_blocks(blocks: np.ndarray) -> list[Block]:
    """A (k, T) array of complete blocks as k block dicts (views), with masks of ones."""
    masks = np.ones(blocks.shape, np.int64)
    return [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(blocks, masks)]


def warn_dropped(dropped: int, emitted: int, block_size: int, where: str = "this part") -> None:
    """The WARNING for a dropped tail, with its share of the part."""
    logger.warning(
        "dropped the final %d tokens of %s (< block_size=%d, %.2f %% of its %d tokens); "
        "pass pad_last=True to keep them",
        dropped,
        where,
        block_size,
        100 * dropped / (emitted + dropped),
        emitted + dropped,
    )


def warn_empty(empty: int, rows: int, first: int | None, where: str = "this part") -> None:
    """The WARNING for rows that gave no tokens (no text), naming the first one."""
    logger.warning(
        "%d of %d rows gave no tokens (no text: None or empty); the first is row %d of %s. "
        "Is the text under another key than 'text'? (load_text_stream(..., text_column=...))",
        empty,
        rows,
        first,
        where,
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
    packer = RollingBuffer(block_size, vocab_size=vocab_size)
    pad_token_id = check_token_id("pad_token_id", pad_token_id, vocab_size)
    return _group(examples, packer, pad_last, pad_token_id)


def _group(
    examples: Iterable[Any], packer: RollingBuffer, pad_last: bool, pad_token_id: int
) -> Iterator[Block]:
    gathered, count, rows, empty, first_empty = [], 0, 0, 0, None
    fill = packer.block_size * GATHER_BLOCKS
    for index, example in enumerate(examples):
        ids = as_id_array(token_ids(example, index), index)
        if ids.size == 0:
            empty, first_empty = empty + 1, index if first_empty is None else first_empty
        gathered.append(ids)
        count, rows = count + ids.size, index + 1
        if count >= fill:
            yield from as_blocks(_push_rows(packer, gathered, rows - len(gathered)))
            gathered, count = [], 0
    if gathered:
        yield from as_blocks(_push_rows(packer, gathered, rows - len(gathered)))
    if empty:
        warn_empty(empty, rows, first_empty)
    last = packer.finish(pad_last, pad_token_id)
    if last is not None:
        yield last
    elif packer.dropped:
        warn_dropped(packer.dropped, packer.emitted, packer.block_size)


def _push_rows(packer: RollingBuffer, rows: list[np.ndarray], first_index: int) -> np.ndarray:
    """Push gathered rows; a bad id names its row."""
    joined = np.concatenate(rows) if len(rows) > 1 else rows[0]
    if out_of_vocabulary(joined, packer.vocab_size):
        check_id_range(rows, first_index, packer.vocab_size)
    return packer.push(joined)
