"""Step 1, the source: a lazy stream of text rows from the Hugging Face Hub or from local files.

    stream = load_text_stream("auto")   # WikiText-103 from the Hub if it answers within 5 s, else the sample
    stream = load_text_stream("hub", repo="Salesforce/wikitext", config="wikitext-2-raw-v1")
    stream = load_text_stream(data_files="books/*.jsonl", text_column="content")

The result is a `TextStream`: a `datasets.IterableDataset` (every datasets method works) that also
knows what it reads, `stream.source` (a `SourceInfo`: files and sizes or the Hub commit, the pieces
and their sizes, the document layout if known). Later steps take that value as it is; a stream
derived with datasets' own methods (`.take()`, `.repeat()`) is a plain IterableDataset again, and
`tokenize_stream` says that its checkpoints then identify it by its description only.

"auto" never waits on a dead network for long: the probe runs in a daemon thread and gives up after
HUB_PROBE_SECONDS. Asking for the Hub explicitly ("hub") fails within those seconds when it cannot
be reached, instead of silently reading something else. Reading pieces (`read_piece_text`) turns
a damaged file into one error naming the file and the line or row group, and a Hub that goes away
into WARNINGs and, after HUB_READ_DEADLINE_SECONDS, an error naming what was being read.
"""

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets

from .config import (
    DATASET_CONFIG,
    DATASET_REPO,
    DATASET_SPLIT,
    ROOT,
    SAMPLE_DIR,
    TEXT_COLUMN,
    WIKITEXT_CONFIGS,
)
from .files import (
    LOCAL_READ_ERRORS,
    DataFiles,
    fingerprint,
    local_config,
    local_data_files,
    local_pieces,
    located_error,
    mean_row_chars,
    open_local,
    parquet_pieces,
)
from .hub import choose_source, hub_pieces, load_hub_split, resolve_revision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceInfo:
    """What a text stream reads. Made by `load_text_stream`, carried by `TextStream.source`.

    description: one line for people ("local: data/wikitext_sample, 2 files").
    identity: what a checkpoint must match: {"files": fingerprint of paths, sizes, mtimes} for local
        files, {"hub": repo, "config", "revision": the resolved commit id} for the Hub; and "split".
    layout: "wikitext" when the source is known to be in WikiText's article layout, else None.
    row_chars: mean characters per row (parquet metadata or the first MiB), to size tokenizing batches.
    piece_names, piece_weights, piece_rows: one per piece (parquet row group or file) in reading
        order, where known: names for error messages, uncompressed bytes to balance ranks and
        workers, rows to check a checkpoint's positions before reading.
    """

    description: str
    identity: dict[str, str]
    layout: str | None = None
    row_chars: float | None = None
    piece_names: tuple[str, ...] | None = None
    piece_weights: tuple[int, ...] | None = field(default=None, repr=False)
    piece_rows: tuple[int, ...] | None = field(default=None, repr=False)
    local: tuple[tuple[str, int], ...] | None = field(default=None, repr=False)  # (file, row group or -1)
    builder: str | None = None  # "parquet", "json" or "text": how the local pieces are read
    files: tuple[str, ...] = field(default=(), repr=False)  # local files (their fingerprint is checked again)


class TextStream(datasets.IterableDataset):
    """A `datasets.IterableDataset` of text rows that knows what it reads: `source` (a SourceInfo).

    Made only by `load_text_stream` (from the stream `datasets.load_dataset` returns).
    """

    source: SourceInfo

    @classmethod
    def of(cls, stream: datasets.IterableDataset, source: SourceInfo) -> "TextStream":
        """`stream` as a TextStream with `source`; its description becomes `source.description`."""
        text = cls.__new__(cls)
        text.__setstate__(dict(stream.__getstate__()))  # datasets' own pickling state: all of it
        text.source = source
        text.info.description = source.description
        return text

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rows, as datasets yields them; a damaged local file raises one error naming it (and the
        line), not the bare decoding error from inside datasets."""
        try:
            yield from super().__iter__()
        except LOCAL_READ_ERRORS as err:
            raise located_error(self.source, err) from err


def select_text(stream: datasets.IterableDataset, text_column: str, where: str) -> datasets.IterableDataset:
    """`stream` with `text_column` renamed to "text" (only that column kept); ValueError naming the
    columns that exist if it has none of that name."""
    columns = stream.column_names
    if columns is not None and text_column not in columns:
        hint = "" if text_column != TEXT_COLUMN else " (pass text_column= to name another)"
        raise ValueError(f"no {text_column!r} column in {where}; its columns are {columns}{hint}")
    if text_column == TEXT_COLUMN:
        return stream
    return stream.select_columns([text_column]).rename_column(text_column, TEXT_COLUMN)


def is_wikitext(repo: str | None, config: str | None) -> bool:
    """True for the WikiText family: one of its four configs (on the Hub, or a copy in its layout)."""
    return config in WIKITEXT_CONFIGS and (repo is None or repo.split("/")[-1] == "wikitext")


def load_text_stream(
    source: str = "auto",
    *,
    data_files: DataFiles | None = None,
    split: str = DATASET_SPLIT,
    repo: str = DATASET_REPO,
    config: str | None = DATASET_CONFIG,
    revision: str | None = None,
    text_column: str = TEXT_COLUMN,
) -> TextStream:
    """Step 1: a lazy `TextStream` (a `datasets.IterableDataset`) of rows with a `text` column.

    source: "hub" streams `repo` / `config` / `split` at `revision` (default: wikitext-103-v1's
    train split, the default branch, resolved to its commit id); "local" streams the bundled sample
    (or `data_files`: .txt one row per line with its "\\n" kept, .json/.jsonl/.parquet with a text
    field); "auto" picks the Hub when it answers within 5 s, else local.
    text_column: the column holding the text (renamed to `text`; the others are dropped).
    The choice and why are in `stream.info.description` (e.g. "local: data/wikitext_sample, 2 files").
    """
    if data_files is not None and source == "auto":
        source, why = "local", "data_files given"
    else:
        source, why = choose_source(source, repo)
    if data_files is not None and source == "hub":
        raise ValueError("data_files are local files: use source='local' (or 'auto') with them")
    if source == "hub":
        return load_hub_stream(repo, config, split, revision, text_column)
    builder, files = local_data_files(data_files, split)
    stream = select_text(open_local(builder, files, split), text_column, files[0])
    where = os.path.relpath(SAMPLE_DIR, ROOT) if data_files is None else ", ".join(files[:3])
    note = "" if why in ("asked for", "data_files given") else f" ({why})"
    names, weights, rows = local_pieces(builder, files)
    wikitext = data_files is None or is_wikitext(None, local_config(files))
    info = SourceInfo(
        description=f"local: {where}, {len(files)} file{'s' * (len(files) > 1)}{note}",
        identity={"files": fingerprint(files), "split": split, "text_column": text_column},
        layout="wikitext" if wikitext else None,
        row_chars=mean_row_chars(builder, files),
        piece_names=names,
        piece_weights=weights,
        piece_rows=rows,
        local=parquet_pieces(files) if builder == "parquet" else tuple((f, -1) for f in files),
        builder=builder,
        files=tuple(files),
    )
    return TextStream.of(stream, info)


def load_hub_stream(
    repo: str, config: str | None, split: str, revision: str | None, text_column: str
) -> TextStream:
    """A Hub dataset's split as a TextStream, pinned to the commit `revision` resolves to now."""
    commit = resolve_revision(repo, revision)
    stream = select_text(load_hub_split(repo, config, split, commit), text_column, f"{repo} {config}")
    pinned = "" if revision in (None, commit) else f" at {revision}"
    names, weights, rows = hub_pieces(repo, config, split, commit)
    info = SourceInfo(
        description=f"hub: {repo} {config or ''} ({split}){pinned}".replace("  ", " "),
        identity={
            "hub": repo,
            "config": str(config),
            "split": split,
            "revision": commit,
            "text_column": text_column,
        },
        layout="wikitext" if is_wikitext(repo, config) else None,
        piece_names=names,
        piece_weights=weights,
        piece_rows=rows,
    )
    return TextStream.of(stream, info)


def peek_texts(stream: datasets.IterableDataset, n: int, source: SourceInfo | None) -> list[str]:
    """The texts of the first `n` rows of `stream`. A damaged local file raises the error reading it
    would (the file and line), not the bare decoding error from inside datasets."""
    try:
        return [row[TEXT_COLUMN] for row in itertools.islice(stream, n)]
    except LOCAL_READ_ERRORS as err:
        raise located_error(source, err) from err
