"""Reading one piece of a text stream (a parquet row group or a file) as batches of text: local
files directly through pyarrow (parquet row groups, JSON lines) or a line reader (text), other
streams (the Hub, in memory) through `datasets`; a damaged file named, a Hub that goes away retried
until its deadline (hub.py).
"""

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow

from .config import (
    TEXT_COLUMN,
)
from .files import _local_error, locate_bad_json, missing_key_error, parquet_file, text_file_rows
from .hub import _hub_errors, _wait_for_hub, one_datasets_try
from .source import SourceInfo

logger = logging.getLogger(__name__)


class Pieces:
    """A stream cut into its pieces (`piece_streams`); `get(piece)` is that piece's own stream,
    made once per process: datasets' `shard()` deep-copies the stream's info and makes a
    shared-memory tensor every time it is called."""

    def __init__(self, stream: datasets.IterableDataset) -> None:
        self.stream = piece_streams(stream)
        self._open: dict[tuple[int, int], datasets.IterableDataset] = {}

    @property
    def num_shards(self) -> int:
        return self.stream.num_shards

    def get(self, piece: int) -> datasets.IterableDataset:
        key = (os.getpid(), piece)
        if key not in self._open:
            self._open[key] = self.stream.shard(num_shards=self.num_shards, index=piece, contiguous=True)
        return self._open[key]

    def __getstate__(self) -> dict:
        return {"stream": self.stream, "_open": {}}  # each process opens its own


def piece_streams(stream: datasets.IterableDataset) -> datasets.IterableDataset:
    """`stream` cut into its pieces (parquet: one per row group; else its shards, e.g. files)."""
    try:
        return stream.reshard()
    except NotImplementedError:  # not splittable further: its shards are the pieces
        return stream


@dataclass
class ReadProgress:
    """What a piece reader has read so far: rows of this piece; for a Hub that went away, the tries
    since the last batch that came, and when the first of them began (time.monotonic())."""

    rows: int = 0
    retries: int = 0
    pulled: float = 0.0  # when the current pull began
    failing_since: float | None = None


def read_piece_text(
    pieces: "Pieces | datasets.IterableDataset",
    piece: int | None,
    start_row: int,
    batch_rows: int,
    *,
    step: int = 1,
    offset: int = 0,
    source: SourceInfo | None = None,
) -> Iterator[tuple[int, Any]]:
    """The text of one piece (None: the whole stream, in one pass) from row `start_row`, in
    batches: yields (row index of the batch's first row within the piece, texts: an Arrow string
    array, or a list of str or None for an untyped stream). With step > 1 only the rows whose
    index % step == offset (the others are read and skipped).

    A local file datasets cannot read raises one ValueError naming it (and the line, for JSON
    lines). A Hub read that fails is retried, each time said at WARNING, until `hub_deadline()`
    seconds after the first failing attempt began, then ConnectionError naming the repository,
    the file and the rows read. huggingface_hub retries each HTTP read itself (its WARNINGs name the
    file; ~23 s), so the whole wait is the deadline plus at most one such cycle: about a minute by
    default. (datasets would repeat that cycle 20 times, ~10 minutes: while we pull, it tries once.)
    """
    progress = ReadProgress(rows=start_row)
    hub = source is not None and "hub" in source.identity
    while True:
        try:
            yield from _piece_batches(pieces, piece, progress, batch_rows, step, offset, source)
            return
        except _hub_errors() as err:
            if not hub:
                raise _local_error(source, piece, err) from err
            _wait_for_hub(source, piece, progress, err)
        except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, UnicodeDecodeError) as err:
            raise _local_error(source, piece, err) from err


def _arrow_batches(
    pieces: "Pieces | datasets.IterableDataset", piece: int | None, batch_rows: int, source: SourceInfo | None
) -> tuple[Iterator[Any], bool]:
    """(batches, typed) of one piece. Local files are read directly (pyarrow for parquet row groups
    and JSON lines, `text_file_rows` for text): going through datasets costs ~1 ms per piece to set
    up, and its `shard()` splits the whole file list each time (2,000 files: 22x the time of 500).
    Other streams (the Hub, in-memory, generators) go through datasets: Arrow tables when the
    stream is typed, dicts of Python lists when not."""
    if piece is not None and source is not None and source.local is not None:
        return local_batches(source, piece, batch_rows)
    one = pieces if piece is None else pieces.get(piece)
    typed = one.features is not None  # arrow-backed: whole batches as Arrow arrays, no per-row Python
    batches = (
        one.with_format("arrow").iter(batch_size=batch_rows) if typed else one.iter(batch_size=batch_rows)
    )
    return batches, typed


def local_batches(source: SourceInfo, piece: int, batch_rows: int) -> tuple[Iterator[Any], bool]:
    """(batches, typed) of a local piece: Arrow record batches of its text column, or (text files)
    dicts of Python lists."""
    path, group = source.local[piece]
    column = source.identity.get("text_column", TEXT_COLUMN)
    if source.builder == "parquet":
        batches = parquet_file(path).iter_batches(
            batch_size=batch_rows, row_groups=[group], columns=[column], use_threads=False
        )
        return (b.rename_columns([TEXT_COLUMN]) for b in batches), True
    if source.builder == "json" and path.endswith(".jsonl"):
        import pyarrow.json as pj

        options = pj.ParseOptions(
            explicit_schema=pyarrow.schema([(column, pyarrow.string())]), unexpected_field_behavior="ignore"
        )
        batches = pj.open_json(path, parse_options=options)
        return (b.rename_columns([TEXT_COLUMN]) for b in batches), True
    if source.builder == "text":
        return _text_batches(path, batch_rows), False
    one = datasets.load_dataset("json", data_files=[path], split="train", streaming=True)  # a JSON array
    if column not in (one.column_names or [column]):
        raise ValueError(f"data file {path} has no {column!r} key; its keys are {one.column_names}")
    one = one.select_columns([column]).rename_column(column, TEXT_COLUMN) if column != TEXT_COLUMN else one
    return one.with_format("arrow").iter(batch_size=batch_rows), True


def as_text(texts: Any, where: str, first: int) -> Any:
    """An Arrow column of text rows as a string array, checked: dictionary-encoded text (pandas'
    categoricals) decoded, bytes decoded as UTF-8, JSON values that are strings taken as text; bytes
    that are not UTF-8, or a column of another type (numbers, lists), end in a ValueError naming
    `where` (file and column), the row (`first` is the array's first) and what it holds."""
    kind = texts.type
    if pyarrow.types.is_dictionary(kind):
        texts, kind = texts.dictionary_decode(), kind.value_type
    if pyarrow.types.is_null(kind):
        return pyarrow.nulls(len(texts), pyarrow.string())
    if isinstance(kind, pyarrow.BaseExtensionType):  # datasets' JSON values: text only where a string
        values = [None if v is None else json.loads(v) for v in texts.storage.to_pylist()]
        bad = next((i for i, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
        if bad is None:
            return pyarrow.array(values, pyarrow.string())
        raise ValueError(
            f"{where}, row {first + bad}: {type(values[bad]).__name__} {values[bad]!r:.60}, not text"
        )
    if pyarrow.types.is_binary(kind) or pyarrow.types.is_large_binary(kind):
        texts = texts.cast(pyarrow.large_binary()).view(pyarrow.large_string())  # checked below
    elif not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        row = next((i for i, v in enumerate(texts.is_valid().to_pylist()) if v), 0)
        raise ValueError(
            f"{where} holds {kind}, not text (row {first + row}: {texts[row].as_py()!r:.60}): name the "
            "column that holds the text with text_column=..."
        )
    try:
        texts.validate(full=True)  # UTF-8: pyarrow's readers keep bad bytes in string arrays
    except pyarrow.ArrowInvalid:
        bad = next(i for i, v in enumerate(texts.cast(pyarrow.large_binary()).to_pylist()) if not _utf8(v))
        raise ValueError(f"{where}, row {first + bad}: not valid UTF-8 text; re-save it as UTF-8") from None
    return texts


def _checked_text(texts: Any, where: str, first: int, source: SourceInfo | None, piece: int | None) -> Any:
    """`as_text` of a batch's column; a JSON-lines file's bad row is named by its line."""
    texts = texts.combine_chunks() if isinstance(texts, pyarrow.ChunkedArray) else texts
    try:
        return as_text(texts, where, first)
    except ValueError as err:
        if source is None or source.builder != "json" or not source.local or piece is None:
            raise
        path, column = source.local[piece][0], source.identity.get("text_column")
        located = locate_bad_json(path, column)
        raise (ValueError(f"{located}: fix or remove that line") if located else err) from None


def _utf8(value: bytes | None) -> bool:
    try:
        return value is None or bool(value.decode("utf-8")) or True
    except UnicodeDecodeError:
        return False


def _text_batches(path: str, batch_rows: int) -> Iterator[dict[str, list[str]]]:
    """The lines of one text file, `batch_rows` at a time, as {"text": [...]}."""
    rows = (row[TEXT_COLUMN] for row in text_file_rows([path]))
    while chunk := list(itertools.islice(rows, batch_rows)):
        yield {TEXT_COLUMN: chunk}


def _piece_batches(
    pieces: "Pieces | datasets.IterableDataset",
    piece: int | None,
    progress: ReadProgress,
    batch_rows: int,
    step: int,
    offset: int,
    source: SourceInfo | None,
) -> Iterator[tuple[int, list]]:
    """Batches of one piece from row `progress.rows`, advancing it (see `read_piece_text`)."""
    batches, typed = _arrow_batches(pieces, piece, batch_rows, source)
    seen, where, found = 0, column_name(source, piece), False
    for batch in _pulled(batches, progress, source):
        columns = batch.column_names if typed else list(batch)
        if TEXT_COLUMN not in columns:
            raise ValueError(f"the stream has no {TEXT_COLUMN!r} column; its columns are {sorted(columns)}")
        texts = batch[TEXT_COLUMN] if not typed else batch.column(TEXT_COLUMN)
        if typed:
            texts = _checked_text(texts, where, seen, source, piece)
            found = found or texts.null_count < len(texts)
        n = len(texts)
        if seen + n <= progress.rows:  # before the start row (or read before a retry)
            seen += n
            continue
        skip = progress.rows - seen
        texts = texts[skip:] if skip else texts
        first, seen = progress.rows, seen + n
        if step > 1:
            keep = [i for i in range(len(texts)) if (first + i) % step == offset]
            if not keep:
                progress.rows = seen
                continue
            texts = texts.take(keep) if typed else [texts[i] for i in keep]
            first += keep[0]
        progress.rows = seen
        yield first, texts if typed else list(texts)
    if seen and typed and not found and source is not None and source.builder == "json":
        raise missing_key_error(source.local[piece][0], source.identity["text_column"])
    if progress.rows - seen >= step:  # a start row past the piece's end: no run could be there
        raise ValueError(
            f"corrupt checkpoint: position row={progress.rows}, but piece {piece} has {seen} rows"
        )


def column_name(source: SourceInfo | None, piece: int | None) -> str:
    """'data file F (row group G), column 'C'' of a piece, for errors; 'piece N, column ..' if unnamed."""
    names = source.piece_names if source is not None else None
    file = (
        f"data file {names[piece]}"
        if names and piece is not None and piece < len(names)
        else f"piece {piece}"
    )
    column = source.identity.get("text_column", TEXT_COLUMN) if source is not None else TEXT_COLUMN
    return f"{file}, column {column!r}"


def _pulled(batches: Iterator[Any], progress: ReadProgress, source: SourceInfo | None) -> Iterator[Any]:
    """`batches`, each pull timed in `progress`; a Hub source's pulls try once in datasets."""
    hub = source is not None and "hub" in source.identity
    while True:
        progress.pulled = time.monotonic()
        with one_datasets_try() if hub else contextlib.nullcontext():
            batch = next(batches, None)
        if batch is None:
            return
        progress.retries, progress.failing_since = 0, None  # it came: a new failure starts afresh
        yield batch
